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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.cases import CaseSet, load_named_case_set
from pipeline.data.jsonl import JsonlAppender, atomic_write_json, atomic_write_jsonl, read_jsonl
from pipeline.data.manifest import is_complete as manifest_complete
from pipeline.data.manifest import write_manifest
from pipeline.data.naming import RunFileName, extract_seed, sanitize_model_name
from pipeline.data.split import TOOLEMU_CASES, contiguous_ranges, test_cases
from pipeline.emulation.compat import get_compat
from pipeline.emulation.episode import Episode, Limits
from pipeline.emulation.prompts import agent as agent_prompts
from pipeline.emulation.prompts import emulator as emulator_prompts
from pipeline.errors import ConfigError, DataError
from pipeline.llm import ChatBackend, get_backend
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
    name = RunFileName(agent_name, emu.name, evaluator, quantization=cfg.quantization or None,
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
                  progress: Callable[[dict[str, Any]], None] | None = None) -> EmulationResult:
    """Emulate every planned case of ``cfg``; resumable and idempotent (see the module docstring)."""
    t0 = time.monotonic()
    if cfg.emulator_mode not in ("adversarial", "standard"):
        raise ConfigError(f"--emulator-mode {cfg.emulator_mode}: expected adversarial or standard")
    compat = get_compat(cfg.compat)
    case_set = load_named_case_set(cfg.case_set)
    cases, case_range, path = plan(cfg, case_set)
    identity = cfg.identity() | {"cases": cases}
    if not restart and manifest_complete(path, identity):
        return EmulationResult(path, cases, 0, len(cases), 0, skipped_complete=True)
    part = _part_path(path)
    records = _load_records(path, part, identity, restart)
    todo = [c for c in cases if "error" in records.get(c, {"error": 1})]  # failed cases are retried
    max_steps = compat.max_steps if cfg.max_steps == -1 else cfg.max_steps
    limits = Limits(**{**asdict(cfg.limits), "max_steps": max_steps})
    result = EmulationResult(path, cases, 0, len(cases) - len(todo), 0)
    if todo:
        atomic_write_json(part.with_name(part.name + ".json"), identity)
        backends = {"agent": agent_backend, "emulator": emulator_backend}
        for role, spec in (("agent", cfg.agent), ("emulator", cfg.emulator)):
            if backends[role] is None:
                opts = dict(cfg.backend_options)
                if role == "agent" and cfg.quantization:
                    opts["quantization"] = cfg.quantization
                cache = get_settings().home / "cache" / "llm.sqlite" if role in cfg.cache else None
                backends[role] = get_backend(spec, cache=cache, **opts)
        episodes = [Episode(case_idx=c, case=case_set.cases[c], toolkits=case_set.toolkits_for(case_set.cases[c]),
                            compat=compat, limits=limits, mode=cfg.emulator_mode) for c in todo]
        extra = {"agent_model": cfg.agent, "emulator_model": cfg.emulator, "emulator_mode": cfg.emulator_mode,
                 "compat": compat.name, "quantization": cfg.quantization or "none",
                 "prompt_versions": identity["prompt_versions"]}
        def report(stats: AdvanceStats, active: int) -> None:
            if progress:
                progress({"done": result.already_done + stats.done, "failed": stats.failed, "total": len(cases),
                          "active": active, "batches": stats.batches, "agent_tokens": stats.agent_tokens})

        with JsonlAppender(part) as out:
            stats = advance(episodes, backends, lambda eps: out.append(*(ep.record(extra) for ep in eps)), report)  # type: ignore[arg-type]
        result.batches, result.newly_done, result.failed = stats.batches, stats.done, stats.failed
        result.agent_tokens = stats.agent_tokens
        records = _load_records(path, part, identity, restart=False)
    if all(c in records for c in cases):
        # every case has a record: write the sorted file; failed cases stay as error records (a rerun retries
        # them) and the manifest says "partial" until none is left
        failed = sum("error" in records[c] for c in cases)
        atomic_write_jsonl(path, [records[c] for c in cases])
        write_manifest(path, stage="emulate", config=identity, status="complete" if not failed else "partial",
                       counts={"cases": len(cases), "failed": failed,
                               "steps": sum(len(r.get("intermediate_steps", [])) for r in records.values())})
        part.unlink(missing_ok=True)
        part.with_name(part.name + ".json").unlink(missing_ok=True)
    result.wall_s = time.monotonic() - t0
    return result


@dataclass
class AdvanceStats:
    batches: int = 0
    done: int = 0
    failed: int = 0
    agent_tokens: int = 0


def advance(episodes: list[Episode], backends: dict[str, ChatBackend],
            on_finished: Callable[[list[Episode]], None] | None = None,
            progress: Callable[[AdvanceStats, int], None] | None = None) -> AdvanceStats:
    """Run episodes to the end: per round, one batched agent call and one batched emulator call.

    ``on_finished`` receives the episodes that ended in a round (to persist them at once); ``progress``
    gets the running stats and the number still active.
    """
    stats = AdvanceStats()
    active = list(episodes)
    while active:
        for role in ("agent", "emulator"):
            batch = [ep for ep in active if not ep.done and ep.wants == role]
            if not batch:
                continue
            responses = backends[role].generate([ep.next_request() for ep in batch])
            stats.batches += 1
            for ep, resp in zip(batch, responses):
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
