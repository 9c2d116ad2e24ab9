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
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

import pipeline.emulation.doubles  # noqa: F401 - registers the test doubles scripted:agent and scripted:emulator
from pipeline.data.cases import CaseSet, load_named_case_set
from pipeline.data.jsonl import JsonlAppender, atomic_write_json, atomic_write_jsonl, read_jsonl
from pipeline.data.locks import writer_lock
from pipeline.data.manifest import write_manifest
from pipeline.data.naming import (RunFileName, confined_path, extract_seed, file_quantization,
                                   sanitize_model_name)
from pipeline.data.split import TOOLEMU_CASES, contiguous_ranges, test_cases
from pipeline.emulation.compat import get_compat
from pipeline.emulation.episode import ENGINE_VERSION, Episode, Limits
from pipeline.emulation.replay import ReplayBackend  # also registers the replay: backend (get_backend)
from pipeline.data import agent_prompt as agent_prompts
from pipeline.emulation.prompts import emulator as emulator_prompts
from pipeline.errors import ConfigError
from pipeline.llm import ChatBackend, ChatRequest
from pipeline.llm.options import NOT_IN_FINGERPRINT, BackendOptions
from pipeline.llm.spec import parse_model_spec
from pipeline.llm.types import SAMPLING_VERSION
from pipeline.settings import get_settings
from pipeline.stage import StageConfig, StageResult, journal_paths, journaled_output

log = logging.getLogger("pipeline.emulation")


def _range(value: Any) -> Any:
    if isinstance(value, str):
        try:
            a, b = (int(x) for x in value.split("-", 1))
        except ValueError:
            raise ValueError(f"'{value}': expected START-END (half-open), e.g. 0-144") from None
        value = (a, b)
    if value is not None and not 0 <= value[0] < value[1]:
        raise ValueError(f"'{value[0]}-{value[1]}': expected 0 <= START < END")
    return value


def _shard(value: Any) -> Any:
    if isinstance(value, str):
        try:
            i, n = (int(x) for x in value.split("/", 1))
        except ValueError:
            raise ValueError(f"'{value}': expected i/n, e.g. 0/10 (0-based)") from None
        value = (i, n)
    return value


class EmulationConfig(StageConfig, BackendOptions):
    """Everything that defines an emulation run: one run file per agent, each bound to its fingerprint (every
    field but those in ``not_in_fingerprint``, with that agent alone, the planned cases and the prompt versions)."""

    stage: ClassVar[str] = "emulate"
    not_in_fingerprint: ClassVar[frozenset[str]] = NOT_IN_FINGERPRINT | {
        "agent", "shard", "out", "cache", "force", "wait", "no_progress", "max_attempts"}

    agent: list[str] = Field(min_length=1, description="agent model spec (nickname, Hub id, path, vllm:, openai:, "
                             "base+adapter); repeat it to emulate several agents together (adapters of one base "
                             "share one engine and batch; each agent gets its own run file)")
    emulator: str = Field(description="emulator model spec")
    evaluator: str = Field(default="none", description="evaluator spec, only to name the file (evaluation writes "
                           "its results beside it)")
    emulator_mode: Literal["adversarial", "standard"] = "adversarial"
    case_set: str = Field(default="toolemu", description="toolemu, demo or a cases .json path")
    cases: tuple[int, int] | None = Field(default=None, description="case index range START-END (half-open; "
                                          "default all)", json_schema_extra={"cli_type": "text", "metavar": "START-END"})
    test_only: bool = Field(default=False, description="only the test cases of the split seed")
    seed: int | None = Field(default=None, ge=0, description="split seed for --test-only (default: _s<N> in the "
                             "agent name)")
    shard: tuple[int, int] | None = Field(default=None, description="run the i-th (0-based) of n contiguous parts of "
                                          "the range", json_schema_extra={"cli_type": "text", "metavar": "i/n"})
    compat: Literal["correct", "study"] = Field(default="correct", description="correct or the study's quirks, see "
                                                "docs/compat.md")
    max_steps: int | None = Field(default=-1, description="cap on agent steps (-1: the compat mode's: 30, study "
                                  "none)")
    max_agent_tokens: int = Field(default=8000, ge=1, description="cumulative agent output tokens (cl100k)")
    max_tokens_per_call: int = Field(default=2048, ge=1, description="new-token cap per LLM call")
    max_continuations: int = Field(default=5, ge=0, description="re-prompts after an unparseable output")
    max_attempts: int = Field(default=3, ge=1, description="tries of an LLM call that errors before its case fails")
    agent_temperature: float = Field(default=0.0, ge=0, description="agent sampling temperature")
    agent_seed: int | None = Field(default=None, ge=0, description="sampling seed (needed with --agent-temperature "
                                   "> 0): each call samples with a seed derived from it, the case and the prompt")
    agent_label: str | None = Field(default=None, description="name the agent's folder/files by this label (e.g. "
                                    "one sampled run of a model in a trajectory pool: SmolLM2-135M-sample1); avoid "
                                    "_s<N>")
    cache: str = Field(default="", description="cache LLM responses on disk for these roles: agent,emulator")
    out: Path | None = Field(default=None, description="output root (default $AGENTPIPE_HOME/trajectories)")
    force: bool = Field(default=False, description="a run file (or partial run) of a different configuration is "
                        "moved aside as <name>.replaced-<time> and the run starts over (default: refuse)")
    wait: bool = Field(default=False, description="when another process is writing the same run file, wait for it "
                       "(default: refuse at once)")
    no_progress: bool = Field(default=False, description="no progress bar")

    _check_range = field_validator("cases", mode="before")(_range)
    _check_shard = field_validator("shard", mode="before")(_shard)

    @field_validator("agent", mode="before")
    @classmethod
    def _agents(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else list(dict.fromkeys(v))

    @field_validator("max_steps")
    @classmethod
    def _max_steps(cls, v: int | None) -> int | None:
        if v is not None and v != -1 and v < 1:
            raise ValueError("must be >= 1 (or -1: the compat mode's cap)")
        return v

    @field_validator("cache")
    @classmethod
    def _roles(cls, v: str) -> str:
        roles = [r for r in v.split(",") if r]
        if set(roles) - {"agent", "emulator"}:
            raise ValueError(f"'{v}': expected a comma list of agent, emulator")
        return ",".join(roles)

    @model_validator(mode="after")
    def _seeded(self) -> EmulationConfig:
        # an unseeded sampled run could never be reproduced or resumed into the same answers
        if self.agent_temperature > 0 and self.agent_seed is None:
            raise ValueError("--agent-temperature > 0 needs --agent-seed (sampled answers are drawn from it)")
        return self

    @model_validator(mode="after")
    def _one_label(self) -> EmulationConfig:
        if self.agent_label and len(self.agent) > 1:
            raise ValueError("--agent-label names one agent's files; it cannot be used with several --agent")
        return self

    @property
    def limits(self) -> Limits:
        return Limits(max_agent_tokens=self.max_agent_tokens, max_tokens_per_call=self.max_tokens_per_call,
                      max_continuations=self.max_continuations, max_attempts=self.max_attempts,
                      agent_temperature=self.agent_temperature,
                      agent_seed=self.agent_seed)

    def versions(self) -> dict[str, Any]:
        sampled = {"sampling": SAMPLING_VERSION} if self.agent_temperature > 0 else {}
        return {"agent_prompt": agent_prompts.PROMPT_VERSION, "emulator_prompt": emulator_prompts.PROMPT_VERSION,
                "engine": ENGINE_VERSION, **sampled}

    def identity(self, agent: str, cases: list[int]) -> dict[str, Any]:
        """The fingerprint of one agent's run file (with the settings its models are not sent, if any)."""
        return {"agent": agent, **self.fingerprint(), "cases": cases, **self.not_sent(agent)}

    def not_sent(self, agent: str) -> dict[str, Any]:
        """``{"not_sent": {role: settings}}`` for models that are not sent some requested settings (an OpenAI
        reasoning model's temperature, …), else {}; raises ``ConfigError`` for one that cannot be left out."""
        from pipeline.emulation.compat import OBSERVATION_STOPS, get_compat
        from pipeline.llm import GenerationConfig, settings_not_sent

        stops = OBSERVATION_STOPS if get_compat(self.compat).stop_at_observation else ()
        roles = {"agent": settings_not_sent(agent, GenerationConfig(temperature=self.agent_temperature,
                                                                    stop=stops)),
                 "emulator": settings_not_sent(self.emulator, GenerationConfig())}
        roles = {role: names for role, names in roles.items() if names}
        return {"not_sent": roles} if roles else {}


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


def plan(cfg: EmulationConfig, agent: str, case_set: CaseSet) -> tuple[list[int], tuple[int, int], Path]:
    """(case indices to run, the range that names the file, output path) of one agent."""
    n = len(case_set)
    start, end = cfg.cases or (0, n)
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
        label = cfg.agent_label or parse_model_spec(agent).name
        seed = cfg.seed if cfg.seed is not None else extract_seed(label)
        if seed is None:
            raise ConfigError(f"--test-only: no --seed given and no _s<N> in the agent name '{label}'")
        # one split for every case set: the study's split of indices 0..143, restricted to the set's cases
        test = set(test_cases(seed, max(n, TOOLEMU_CASES)))
        cases = [c for c in cases if c in test]
    spec, emu = parse_model_spec(agent), parse_model_spec(cfg.emulator)
    # the evaluator part of the name is what evaluation will use (the spec's name), so they share one file
    evaluator = parse_model_spec(cfg.evaluator).name if cfg.evaluator != "none" else "none"
    agent_name = sanitize_model_name(cfg.agent_label) if cfg.agent_label else spec.name
    name = RunFileName(agent_name, emu.name, evaluator, quantization=file_quantization(cfg.quantization),
                       case_range=(start, end))
    out_dir = cfg.out or get_settings().home / "trajectories"
    folder = confined_path(out_dir, agent_name, "--agent-label" if cfg.agent_label else "--agent")
    return cases, (start, end), folder / name.filename()


def _part_path(path: Path) -> Path:
    return journal_paths(path)[0]


def _meta_path(path: Path) -> Path:
    """The fingerprint of a partial run (``<run file>.part.json``), written before its first record."""
    return journal_paths(path)[1]


def _load_records(path: Path, part: Path) -> dict[int, dict]:
    """Records of earlier runs of this configuration (final and partial file): case → its latest record,
    successes preferred over failures."""
    records: dict[int, dict] = {}
    for source in (path, part):
        if source.exists():
            for rec in read_jsonl(source).records:  # a truncated tail (crash) is ignored: that case is redone
                if "error" not in rec or "error" in records.get(rec["case_idx"], {"error": 1}):
                    records[rec["case_idx"]] = rec  # a success is never replaced by a later failure
    return records


def run_emulation(cfg: EmulationConfig, *, agent_backend: ChatBackend | None = None,
                  emulator_backend: ChatBackend | None = None,
                  progress: Callable[[dict[str, Any]], None] | None = None) -> EmulationResult:
    """Emulate the planned cases of ``cfg``'s one agent; resumable and idempotent (see the module docstring)."""
    if len(cfg.agent) != 1:
        raise ConfigError("run_emulation takes one agent; use run_emulations for several")
    return run_emulations(cfg, agent_backend=agent_backend, emulator_backend=emulator_backend,
                          progress=progress)[0]


@dataclass
class _Job:
    """One agent's run: its configuration, files and the records of earlier runs."""

    agent: str
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


def emulate(cfg: EmulationConfig, *, agent_backend: ChatBackend | None = None,
            emulator_backend: ChatBackend | None = None,
            progress: Callable[[dict[str, Any]], None] | None = None) -> StageResult:
    """The ``emulate`` stage: every agent of ``cfg`` (see ``run_emulations``); incomplete while any case failed."""
    t0 = time.monotonic()
    runs = run_emulations(cfg, agent_backend=agent_backend, emulator_backend=emulator_backend, progress=progress)
    _track_runs(cfg, runs, time.monotonic() - t0)
    failed = sum(r.failed for r in runs)
    status = "incomplete" if failed else "skipped" if all(r.skipped_complete for r in runs) else "complete"
    paths = [str(r.path) for r in runs]
    return StageResult(stage="emulate", status=status,
                       outputs={"trajectories": paths[0] if len(paths) == 1 else paths},
                       counts={"cases": sum(len(r.cases) for r in runs), "failed": failed,
                               "new": sum(r.newly_done for r in runs)},
                       runs=[asdict(r) | {"path": str(r.path)} for r in runs])


def _uses_gpu(specs: list[str]) -> bool:
    """Whether any of these models runs locally (HF or vLLM), i.e. on the GPUs when there are some; API models
    do not (scripted test doubles stand in for local models)."""
    from pipeline.tracking.stage_runs import LOCAL_BACKENDS

    return any(parse_model_spec(s).backend in LOCAL_BACKENDS for s in specs)


def _track_runs(cfg: EmulationConfig, runs: list[EmulationResult], wall_s: float) -> None:
    """One MLflow run per run file: its counts, tokens and USD per role (whole file), time and GPU-hours."""
    from pipeline.tracking.stage_runs import add_usage, log_stage_run

    worked = [r for r in runs if not r.skipped_complete]
    for r in worked:
        usage: dict[str, dict[str, float]] = {}
        records = read_jsonl(r.path).records if r.path.exists() else []
        for rec in records:
            for role, u in (rec.get("usage") or {}).items():
                add_usage(usage, role, u)
        log_stage_run("emulate", r.path, experiment="evaluation", params=cfg.fingerprint(),
                      counts={"cases": len(records), "failed": sum("error" in rec for rec in records),
                              "new": r.newly_done},
                      usage=usage, wall_s=wall_s, share=1 / len(worked),  # agents emulated together share it
                      gpus=None if _uses_gpu([*cfg.agent, cfg.emulator]) else 0)


def run_emulations(cfg: EmulationConfig, *, agent_backend: ChatBackend | None = None,
                   emulator_backend: ChatBackend | None = None,
                   progress: Callable[[dict[str, Any]], None] | None = None) -> list[EmulationResult]:
    """Emulate every agent of ``cfg`` on one emulator together: every agent's episodes advance in the same
    batched calls, and agents that are adapters of one base model are answered by one backend (one engine or
    loaded model, one batch). Each agent gets its own run file, identical to running it alone. One process writes
    a run file at a time: another one on the same file refuses at once (or, with ``wait``, waits for it)."""
    case_set = load_named_case_set(cfg.case_set)
    paths = [plan(cfg, agent, case_set)[2] for agent in cfg.agent]
    if len(set(paths)) != len(paths):
        raise ConfigError("--agent: two agents would write the same run file; give each a distinct --agent-label")
    with ExitStack() as locks:
        for path in paths:
            locks.enter_context(writer_lock(path, wait=cfg.wait, what="run file"))
        return _run_locked(cfg, case_set, agent_backend, emulator_backend, progress)


def _run_locked(cfg: EmulationConfig, case_set: CaseSet, agent_backend: ChatBackend | None,
                emulator_backend: ChatBackend | None,
                progress: Callable[[dict[str, Any]], None] | None) -> list[EmulationResult]:
    t0 = time.monotonic()
    compat = get_compat(cfg.compat)
    plans = [(agent, *plan(cfg, agent, case_set)) for agent in cfg.agent]
    for agent, cases, _, path in plans:  # every run file is checked before anything is written or moved
        if not cfg.force:
            journaled_output(path, _json(cfg.identity(agent, cases)), "emulate", force=False)
    jobs = [_prepare(cfg, agent, cases, path, compat.name) for agent, cases, _, path in plans]
    active = [j for j in jobs if j.todo]
    if active:
        max_steps = compat.max_steps if cfg.max_steps == -1 else cfg.max_steps
        limits = Limits(**{**asdict(cfg.limits), "max_steps": max_steps})
        for j in active:
            atomic_write_json(_meta_path(j.path), j.identity)
        route = _routes(cfg, active, agent_backend, emulator_backend)
        owner: dict[int, _Job] = {}
        episodes = []
        for j in active:
            for c in j.todo:
                ep = Episode(case_idx=c, case=case_set.cases[c], toolkits=case_set.toolkits_for(case_set.cases[c]),
                             compat=compat, limits=limits, mode=cfg.emulator_mode)
                agent = route(j, "agent")[0]
                agent = getattr(agent, "inner", agent)  # a cached backend: the replay inside it
                if not compat.sorted_unexpected_names and isinstance(agent, ReplayBackend):
                    ep.name_order = agent.name_order(c)  # a set's print order is the recording's (compat.md)
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
                    j.result.newly_done += ep.error is None
                    j.result.agent_tokens += ep.usage["agent"].completion_tokens

            stats = advance(episodes, lambda ep, role: route(owner[id(ep)], role), persist, report)
        for j in active:
            j.result.batches = stats.batches
            j.records = _load_records(j.path, j.part)
    for j in jobs:
        if not j.result.skipped_complete:
            _finish(j)
        j.result.wall_s = time.monotonic() - t0
    return [j.result for j in jobs]


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _prepare(cfg: EmulationConfig, agent: str, cases: list[int], path: Path, compat_name: str) -> _Job:
    identity = _json(cfg.identity(agent, cases))
    if journaled_output(path, identity, "emulate", force=cfg.force):
        result = EmulationResult(path, cases, 0, len(cases), 0, skipped_complete=True)
        return _Job(agent, path, identity, cases, {}, [], result)
    records = _load_records(path, _part_path(path))
    todo = [c for c in cases if "error" in records.get(c, {"error": 1})]  # failed cases are retried
    extra = {"agent_model": agent, "emulator_model": cfg.emulator, "emulator_mode": cfg.emulator_mode,
             "compat": compat_name, "quantization": cfg.quantization or "none",
             "prompt_versions": {"agent": agent_prompts.PROMPT_VERSION, "emulator": emulator_prompts.PROMPT_VERSION}}
    return _Job(agent, path, identity, cases, records, todo,
                EmulationResult(path, cases, 0, len(cases) - len(todo), 0), extra)


def _finish(j: _Job) -> None:
    """Every case has a record: write the sorted file; failed cases stay as error records (a rerun retries
    them) and the manifest says "incomplete" until none is left."""
    if not all(c in j.records for c in j.cases):
        j.result.failed = sum(c not in j.records for c in j.cases)
        return
    failed = sum("error" in j.records[c] for c in j.cases)
    j.result.failed = failed
    atomic_write_jsonl(j.path, [j.records[c] for c in j.cases])
    write_manifest(j.path, stage="emulate", config=j.identity, status="complete" if not failed else "incomplete",
                   counts={"cases": len(j.cases), "failed": failed,
                           "steps": sum(len(r.get("intermediate_steps", [])) for r in j.records.values())})
    j.part.unlink(missing_ok=True)
    _meta_path(j.path).unlink(missing_ok=True)


#: The backend that answers a role's request, and the adapter it answers with (None: the backend's own spec).
Route = tuple[ChatBackend, str | None]


def _routes(cfg: EmulationConfig, jobs: list[_Job], agent_backend: ChatBackend | None,
            emulator_backend: ChatBackend | None) -> Callable[[_Job, str], Route]:
    """Backends for every job's agent and the shared emulator. Agents that are adapters of one base model
    share one backend on that base, each request naming its adapter; vLLM engines of different models split
    the memory budget (``get_backends``)."""
    from pipeline.llm import get_backends

    roles: dict[str, tuple[str, dict[str, Any]]] = {}
    agent_of: dict[int, tuple[str, str | None]] = {}
    for j in jobs:
        spec = parse_model_spec(j.agent)
        opts = cfg.backend_options()
        if cfg.quantization:
            opts["quantization"] = cfg.quantization
        if len(jobs) > 1 and spec.adapter and spec.backend in ("hf", "vllm"):
            base = j.agent.rsplit("+", 1)[0]
            role, adapter = f"agent:{base}", spec.adapter
        else:
            base, role, adapter = j.agent, f"agent:{j.agent}", None
        roles[role] = (base, opts)
        agent_of[id(j)] = (role, adapter)
    roles["emulator"] = (cfg.emulator, cfg.backend_options())
    fixed: dict[str, ChatBackend] = {}
    if emulator_backend is not None:
        fixed["emulator"] = emulator_backend
    if agent_backend is not None:
        fixed.update({r: agent_backend for r in roles if r != "emulator"})
    caches = {r: get_settings().home / "cache" / "llm.sqlite" if r.split(":")[0] in cfg.cache.split(",") else None
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
