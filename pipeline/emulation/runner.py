"""The batched, resumable emulation runner.

All active cases advance one step per batched backend call: first the agent step of every case waiting on
its agent, then the emulator step of every case waiting on the emulator. A run over N cases therefore makes
O(steps) batched calls, not O(N × steps) single calls; finished cases leave the batch.

Durability: a case's record is appended (one fsync'ed line) to ``<output>.part`` the moment it finishes.
A rerun of the same configuration skips finished cases and redoes the rest (failed cases included); a
SIGKILL loses at most the cases in flight. When every case is done the records are sorted by ``case_idx``
and written atomically to the output file, followed by its manifest.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.data.cases import CaseSet, load_named_case_set
from pipeline.data.jsonl import JsonlAppender, atomic_write_json, atomic_write_jsonl, read_jsonl
from pipeline.data.locks import writer_lock
from pipeline.data.manifest import is_complete as manifest_complete
from pipeline.data.manifest import write_manifest
from pipeline.data.naming import RunFileName, extract_seed, file_quantization, sanitize_model_name
from pipeline.data.split import TOOLEMU_CASES, contiguous_ranges, test_cases
from pipeline.emulation.compat import get_compat
from pipeline.emulation.episode import Episode, Limits
from pipeline.emulation.prompts import agent as agent_prompts
from pipeline.emulation.prompts import emulator as emulator_prompts
from pipeline.errors import ConfigError, DataError
from pipeline.llm import ChatBackend, ChatRequest
from pipeline.llm.spec import parse_model_spec
from pipeline.settings import get_settings

log = logging.getLogger("pipeline.emulation")


@dataclass
class EmulationConfig:
    """Everything that defines an emulation run (and so its output file)."""

    agent: str
    emulator: str
    evaluator: str = "none"  # only names the file: evaluation writes its results beside it
    emulator_mode: str = "adversarial"
    case_set: str = "toolemu"
    case_range: tuple[int, int] | None = None  # half-open; None = every case of the set
    test_only: bool = False
    seed: int | None = None  # split seed for test_only (default: _s<N> in the agent name)
    shard: tuple[int, int] | None = None  # (i, n): the i-th (0-based) of n contiguous parts of the range
    quantization: str | None = None  # agent only; the emulator always runs unquantized (SPEC §2.4)
    #: Name the agent's files/folder by this label instead of the model (e.g. ``SmolLM2-135M-sample1`` for one of
    #: several sampled runs of a model in a trajectory pool). Avoid ``_s<N>``: that reads as a split seed.
    agent_label: str | None = None
    compat: str = "correct"
    limits: Limits = field(default_factory=Limits)
    max_steps: int | None = -1  # -1 = the compat mode's default
    out_dir: Path | None = None  # default: $AGENTPIPE_HOME/trajectories
    cache: tuple[str, ...] = ()  # roles whose LLM responses are cached on disk
    backend_options: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """What must match for partial output to be resumed."""
        d = asdict(self)
        for k in ("out_dir", "cache", "backend_options", "shard"):
            d.pop(k)
        d["prompt_versions"] = {"agent": agent_prompts.PROMPT_VERSION, "emulator": emulator_prompts.PROMPT_VERSION}
        return d


@dataclass
class EmulationResult:
    path: Path
    cases: list[int]
    newly_done: int
    already_done: int
    failed: int
    skipped_complete: bool = False
    batches: int = 0
    wall_s: float = 0.0
    agent_tokens: int = 0


def plan(cfg: EmulationConfig, case_set: CaseSet) -> tuple[list[int], tuple[int, int], Path]:
    """(case indices to run, the range that names the file, output path)."""
    n = len(case_set)
    start, end = cfg.case_range or (0, n)
    if not 0 <= start < end <= n:
        raise ConfigError(f"--cases {start}-{end}: expected a range within 0-{n} for case set '{cfg.case_set}'")
    if cfg.shard is not None:
        i, parts = cfg.shard
        if not 0 <= i < parts <= end - start:
            raise ConfigError(f"--shard {i}/{parts}: expected 0 <= i < n <= {end - start}")
        a, b = contiguous_ranges(parts, end - start)[i]
        start, end = start + a, start + b
    cases = list(range(start, end))
    if cfg.test_only:
        label = cfg.agent_label or parse_model_spec(cfg.agent).name
        seed = cfg.seed if cfg.seed is not None else extract_seed(label)
        if seed is None:
            raise ConfigError(f"--test-only: no --seed given and no _s<N> in the agent name '{label}'")
        # one split for every case set: the study's split of indices 0..143, restricted to the set's cases
        test = set(test_cases(seed, max(n, TOOLEMU_CASES)))
        cases = [c for c in cases if c in test]
    agent, emu = parse_model_spec(cfg.agent), parse_model_spec(cfg.emulator)
    # the evaluator part of the name is what evaluation will use (the spec's name), so they share one file
    evaluator = parse_model_spec(cfg.evaluator).name if cfg.evaluator != "none" else "none"
    agent_name = sanitize_model_name(cfg.agent_label) if cfg.agent_label else agent.name
    name = RunFileName(agent_name, emu.name, evaluator, quantization=file_quantization(cfg.quantization),
                       case_range=(start, end))
    out_dir = cfg.out_dir or get_settings().home / "trajectories"
    return cases, (start, end), out_dir / agent_name / name.filename()


def _part_path(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def _load_records(path: Path, part: Path, identity: dict[str, Any], restart: bool) -> dict[int, dict]:
    """Records from earlier runs of this configuration (final and partial file): case → its latest record,
    successes preferred over failures."""
    meta = part.with_name(part.name + ".json")
    if restart:
        part.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
    if part.exists() and meta.exists():
        earlier = json.loads(meta.read_text())
        if earlier != json.loads(json.dumps(identity, default=str)):
            raise DataError(f"{part}: partial output of a different configuration; rerun with --restart to discard it")
    records: dict[int, dict] = {}
    for source in (path, part):
        if source.exists() and not restart:
            for rec in read_jsonl(source).records:  # a truncated tail (crash) is ignored: that case is redone
                if "error" not in rec or "error" in records.get(rec["case_idx"], {"error": 1}):
                    records[rec["case_idx"]] = rec  # a success is never replaced by a later failure
    return records


def run_emulation(cfg: EmulationConfig, *, agent_backend: ChatBackend | None = None,
                  emulator_backend: ChatBackend | None = None, restart: bool = False,
                  progress: Callable[[dict[str, Any]], None] | None = None, wait: bool = False) -> EmulationResult:
    """Emulate every planned case of ``cfg``; resumable and idempotent (see the module docstring)."""
    return run_emulations([cfg], agent_backend=agent_backend, emulator_backend=emulator_backend, restart=restart,
                          progress=progress, wait=wait)[0]


@dataclass
class _Job:
    """One agent's run: its configuration, files and the records of earlier runs."""

    cfg: EmulationConfig
    path: Path
    identity: dict[str, Any]
    cases: list[int]
    records: dict[int, dict]
    todo: list[int]
    result: EmulationResult
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def part(self) -> Path:
        return _part_path(self.path)


def run_emulations(cfgs: list[EmulationConfig], *, agent_backend: ChatBackend | None = None,
                   emulator_backend: ChatBackend | None = None, restart: bool = False,
                   progress: Callable[[dict[str, Any]], None] | None = None,
                   wait: bool = False) -> list[EmulationResult]:
    """Emulate several agents on one emulator together: every agent's episodes advance in the same batched
    calls, and agents that are adapters of one base model are answered by one backend (one engine or loaded
    model, one batch). Each agent gets its own run file, identical to running it alone. The configurations
    must agree on everything but the agent (and its label). One process writes a run file at a time: another
    one on the same file refuses at once (or, with ``wait``, waits for it)."""
    if not cfgs:
        return []
    _check_compatible(cfgs)
    first = cfgs[0]
    if first.emulator_mode not in ("adversarial", "standard"):
        raise ConfigError(f"--emulator-mode {first.emulator_mode}: expected adversarial or standard")
    case_set = load_named_case_set(first.case_set)
    paths = [plan(cfg, case_set)[2] for cfg in cfgs]
    if len(set(paths)) != len(paths):
        raise ConfigError("--agent: two agents would write the same run file; give each a distinct --agent-label")
    with ExitStack() as locks:
        for path in paths:
            locks.enter_context(writer_lock(path, wait=wait, what="run file"))
        return _run_locked(cfgs, case_set, agent_backend, emulator_backend, restart, progress)


def _run_locked(cfgs: list[EmulationConfig], case_set: CaseSet, agent_backend: ChatBackend | None,
                emulator_backend: ChatBackend | None, restart: bool,
                progress: Callable[[dict[str, Any]], None] | None) -> list[EmulationResult]:
    t0 = time.monotonic()
    first = cfgs[0]
    compat = get_compat(first.compat)
    jobs = [_prepare(cfg, case_set, compat.name, restart) for cfg in cfgs]
    active = [j for j in jobs if j.todo]
    if active:
        max_steps = compat.max_steps if first.max_steps == -1 else first.max_steps
        limits = Limits(**{**asdict(first.limits), "max_steps": max_steps})
        for j in active:
            atomic_write_json(j.part.with_name(j.part.name + ".json"), j.identity)
        route = _routes(active, agent_backend, emulator_backend)
        owner: dict[int, _Job] = {}
        episodes = []
        for j in active:
            for c in j.todo:
                ep = Episode(case_idx=c, case=case_set.cases[c], toolkits=case_set.toolkits_for(case_set.cases[c]),
                             compat=compat, limits=limits, mode=first.emulator_mode)
                owner[id(ep)] = j
                episodes.append(ep)
        already = sum(j.result.already_done for j in jobs)
        total = sum(len(j.cases) for j in jobs)

        def report(stats: AdvanceStats, n_active: int) -> None:
            if progress:
                progress({"done": already + stats.done, "failed": stats.failed, "total": total,
                          "active": n_active, "batches": stats.batches, "agent_tokens": stats.agent_tokens})

        with ExitStack() as stack:
            appenders = {id(j): stack.enter_context(JsonlAppender(j.part)) for j in active}

            def persist(finished: list[Episode]) -> None:
                for ep in finished:
                    j = owner[id(ep)]
                    appenders[id(j)].append(ep.record(j.extra))
                    j.result.failed += ep.error is not None
                    j.result.newly_done += ep.error is None
                    j.result.agent_tokens += ep.usage["agent"].completion_tokens

            stats = advance(episodes, lambda ep, role: route(owner[id(ep)], role), persist, report)
        for j in active:
            j.result.batches = stats.batches
            j.records = _load_records(j.path, j.part, j.identity, restart=False)
    for j in jobs:
        if not j.result.skipped_complete:
            _finish(j)
        j.result.wall_s = time.monotonic() - t0
    return [j.result for j in jobs]


def _check_compatible(cfgs: list[EmulationConfig]) -> None:
    """Several agents run together only when their runs differ in the agent alone."""
    def shared(c: EmulationConfig) -> dict[str, Any]:
        d = asdict(c)
        for k in ("agent", "agent_label"):
            d.pop(k)
        return d

    ref = shared(cfgs[0])
    for c in cfgs[1:]:
        diff = sorted(k for k, v in shared(c).items() if v != ref[k])
        if diff:
            raise ConfigError(f"--agent: agents emulated together must share every other option; {c.agent} "
                              f"differs in {', '.join(diff)}")


def _prepare(cfg: EmulationConfig, case_set: CaseSet, compat_name: str, restart: bool) -> _Job:
    cases, _, path = plan(cfg, case_set)
    identity = cfg.identity() | {"cases": cases}
    if not restart and manifest_complete(path, identity):
        result = EmulationResult(path, cases, 0, len(cases), 0, skipped_complete=True)
        return _Job(cfg, path, identity, cases, {}, [], result)
    records = _load_records(path, _part_path(path), identity, restart)
    todo = [c for c in cases if "error" in records.get(c, {"error": 1})]  # failed cases are retried
    extra = {"agent_model": cfg.agent, "emulator_model": cfg.emulator, "emulator_mode": cfg.emulator_mode,
             "compat": compat_name, "quantization": cfg.quantization or "none",
             "prompt_versions": identity["prompt_versions"]}
    return _Job(cfg, path, identity, cases, records, todo, EmulationResult(path, cases, 0, len(cases) - len(todo), 0),
                extra)


def _finish(j: _Job) -> None:
    """Every case has a record: write the sorted file; failed cases stay as error records (a rerun retries
    them) and the manifest says "partial" until none is left."""
    if not all(c in j.records for c in j.cases):
        return
    failed = sum("error" in j.records[c] for c in j.cases)
    atomic_write_jsonl(j.path, [j.records[c] for c in j.cases])
    write_manifest(j.path, stage="emulate", config=j.identity, status="complete" if not failed else "partial",
                   counts={"cases": len(j.cases), "failed": failed,
                           "steps": sum(len(r.get("intermediate_steps", [])) for r in j.records.values())})
    j.part.unlink(missing_ok=True)
    j.part.with_name(j.part.name + ".json").unlink(missing_ok=True)


#: The backend that answers a role's request, and the adapter it answers with (None: the backend's own spec).
Route = tuple[ChatBackend, str | None]


def _routes(jobs: list[_Job], agent_backend: ChatBackend | None,
            emulator_backend: ChatBackend | None) -> Callable[[_Job, str], Route]:
    """Backends for every job's agent and the shared emulator. Agents that are adapters of one base model
    share one backend on that base, each request naming its adapter; vLLM engines of different models split
    the memory budget (``get_backends``)."""
    from pipeline.llm import get_backends

    first = jobs[0].cfg
    roles: dict[str, tuple[str, dict[str, Any]]] = {}
    agent_of: dict[int, tuple[str, str | None]] = {}
    for j in jobs:
        spec = parse_model_spec(j.cfg.agent)
        opts = dict(first.backend_options)
        if first.quantization:
            opts["quantization"] = first.quantization
        if len(jobs) > 1 and spec.adapter and spec.backend in ("hf", "vllm"):
            base = j.cfg.agent.rsplit("+", 1)[0]
            role, adapter = f"agent:{base}", spec.adapter
        else:
            base, role, adapter = j.cfg.agent, f"agent:{j.cfg.agent}", None
        roles[role] = (base, opts)
        agent_of[id(j)] = (role, adapter)
    roles["emulator"] = (first.emulator, dict(first.backend_options))
    fixed: dict[str, ChatBackend] = {}
    if emulator_backend is not None:
        fixed["emulator"] = emulator_backend
    if agent_backend is not None:
        fixed.update({r: agent_backend for r in roles if r != "emulator"})
    caches = {r: get_settings().home / "cache" / "llm.sqlite" if r.split(":")[0] in first.cache else None
              for r in roles}
    backends = fixed | get_backends({r: v for r, v in roles.items() if r not in fixed}, caches=caches)

    def route(job: _Job, role: str) -> Route:
        if role == "emulator":
            return backends["emulator"], None
        name, adapter = agent_of[id(job)]
        return backends[name], adapter

    return route


@dataclass
class AdvanceStats:
    batches: int = 0
    done: int = 0
    failed: int = 0
    agent_tokens: int = 0


def advance(episodes: list[Episode], backends: dict[str, ChatBackend] | Callable[[Episode, str], Route],
            on_finished: Callable[[list[Episode]], None] | None = None,
            progress: Callable[[AdvanceStats, int], None] | None = None) -> AdvanceStats:
    """Run episodes to the end: per round, one batched agent call and one batched emulator call (one per
    backend when episodes are routed to several).

    ``backends``: role → backend, or a function (episode, role) → (backend, adapter) for episodes of several
    agents. ``on_finished`` receives the episodes that ended in a round (to persist them at once);
    ``progress`` gets the running stats and the number still active.
    """
    if isinstance(backends, dict):
        table = backends
        route: Callable[[Episode, str], Route] = lambda ep, role: (table[role], None)  # noqa: E731
    else:
        route = backends
    stats = AdvanceStats()
    active = list(episodes)
    while active:
        for role in ("agent", "emulator"):
            batch = [ep for ep in active if not ep.done and ep.wants == role]
            if not batch:
                continue
            groups: dict[int, tuple[ChatBackend, list[tuple[Episode, ChatRequest]]]] = {}
            for ep in batch:
                backend, adapter = route(ep, role)
                req = ep.next_request()
                if adapter:
                    req = replace(req, adapter=adapter)
                groups.setdefault(id(backend), (backend, []))[1].append((ep, req))
            for backend, items in groups.values():
                responses = backend.generate([req for _, req in items])
                stats.batches += 1
                for (ep, _), resp in zip(items, responses):
                    ep.feed(role, resp)
        finished = [ep for ep in active if ep.done]
        if finished:
            if on_finished:
                on_finished(finished)
            for ep in finished:
                stats.failed += ep.error is not None
                stats.done += ep.error is None
                stats.agent_tokens += ep.usage["agent"].completion_tokens
        active = [ep for ep in active if not ep.done]
        if progress:
            progress(stats, len(active))
    return stats
