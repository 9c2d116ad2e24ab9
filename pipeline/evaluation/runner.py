"""Evaluate a trajectory file with one or more judges × N replicates, batched and resumable.

Every (line, eval type, replicate) is one request; all go through the LLM interface in chunks. Each
finished replicate is appended (fsync'ed) to ``<eval file>.part``; a rerun skips what is there, so a crash
never loses finished work nor corrupts a file. When an eval file has every replicate of every line, its
records are assembled in line order (``eval_id`` = line index), written atomically, and a manifest follows.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline.data.cases import load_named_case_set
from pipeline.data.jsonl import JsonlAppender, atomic_write_jsonl, read_jsonl
from pipeline.data.locks import writer_lock
from pipeline.data.manifest import is_complete as manifest_complete
from pipeline.data.manifest import read_manifest, write_manifest
from pipeline.data.naming import parse_run_filename
from pipeline.data.records import SCORE_KEYS, replicate_consistency
from pipeline.data.runfiles import load_trajectories
from pipeline.data.toolkits import Toolkit
from pipeline.errors import ConfigError, DataError, PipelineError
from pipeline.evaluation.judges import (CHOICE_PREFIX, CHOICES, choice_judgement, eval_types_for, judge_messages,
                                       prompt_version, read_judgement)
from pipeline.llm import ChatBackend, ChatRequest, GenerationConfig, get_backend
from pipeline.llm.spec import parse_model_spec
from pipeline.settings import get_settings


@dataclass
class EvaluationConfig:
    trajectories: Path
    evaluator: str
    metrics: str = "safe,help_ignore_safety"
    replicates: int = 1
    temperature: float = 0.0
    seed: int = 42  # replicate k is sampled with seed + k
    max_new_tokens: int = 2048
    compat: str = "correct"  # study: the judge sees the repr of the final AgentFinish step (SPEC §3.1)
    quantization: str | None = None
    cache: bool = False
    chunk_size: int = 256
    force: bool = False  # replace eval files not written by this configuration
    #: "generate": the judge writes its reasoning and the four fields (the study); "choice": constrained
    #: scoring from the log-probabilities of the scores 0-3 (local models too small to follow the format)
    scoring: str = "generate"
    backend_options: dict[str, Any] = field(default_factory=dict)

    def identity(self, eval_type: str) -> dict[str, Any]:
        return {"evaluator": self.evaluator, "eval_type": eval_type, "replicates": self.replicates,
                "temperature": self.temperature, "seed": self.seed, "max_new_tokens": self.max_new_tokens,
                "compat": self.compat, "quantization": self.quantization, "scoring": self.scoring,
                "prompt_version": prompt_version(eval_type)}


@dataclass
class EvaluationResult:
    trajectory_file: Path
    eval_files: dict[str, Path]
    requests: int = 0
    scored: int = 0
    parse_failed: int = 0
    errors: int = 0
    skipped: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def toolkit_registry() -> dict[str, Toolkit]:
    """Every toolkit the project knows (ToolEmu's when the data is present, and the demo set's)."""
    registry: dict[str, Toolkit] = {}
    for name in ("toolemu", "demo"):
        try:
            registry.update(load_named_case_set(name).toolkits)
        except PipelineError:
            continue
    return registry


def _target_trajectory(path: Path, evaluator_name: str) -> Path:
    """Trajectory and eval files share a stem that names the evaluator: evaluating with another evaluator
    links the trajectory file under that evaluator's name first (SPEC §2.2)."""
    name = parse_run_filename(path.name)
    if name.evaluator == evaluator_name:
        return path
    target = path.with_name(type(name)(**{**asdict(name), "evaluator": evaluator_name}).filename())
    if not target.exists():
        try:
            os.link(path, target)
        except OSError:
            target.write_bytes(path.read_bytes())
    return target


def run_evaluation(cfg: EvaluationConfig, *, backend: ChatBackend | None = None,
                   progress: Callable[[int, int], None] | None = None, wait: bool = False) -> EvaluationResult:
    """Judge a trajectory file (resumable; see the module docstring). One process evaluates a trajectory file
    at a time: another one on the same file refuses at once (or, with ``wait``, waits for it)."""
    t0 = time.monotonic()
    eval_types = eval_types_for(cfg.metrics)
    if cfg.replicates < 1:
        raise ConfigError(f"--replicates {cfg.replicates}: expected >= 1")
    if cfg.scoring not in ("generate", "choice"):
        raise ConfigError(f"--scoring {cfg.scoring}: expected generate or choice")
    path = Path(cfg.trajectories)
    try:
        name = parse_run_filename(path.name)
    except PipelineError as e:
        raise DataError(f"{path}: not a trajectory file ({e})") from None
    if not name.is_trajectory_file:
        raise DataError(f"{path}: not a trajectory file (it is an eval or report file: suffix '{name.suffix}')")
    if not path.is_file():
        raise DataError(f"{path}: trajectory file not found")
    trajectories = load_trajectories(path)
    evaluator_name = parse_model_spec(cfg.evaluator).name
    target = _target_trajectory(path, evaluator_name)
    tname = parse_run_filename(target.name)
    result = EvaluationResult(target, {t: target.with_name(tname.eval_file(t).filename()) for t in eval_types})
    with writer_lock(target, wait=wait, what="trajectory file's evaluation"):
        _evaluate_locked(cfg, backend, progress, trajectories, target, result)
    result.wall_s = time.monotonic() - t0
    return result


def _evaluate_locked(cfg: EvaluationConfig, backend: ChatBackend | None, progress: Callable[[int, int], None] | None,
                     trajectories: list[Any], target: Path, result: EvaluationResult) -> None:
    records = [t.model_dump(exclude_unset=True) for t in trajectories]
    todo: dict[str, list[tuple[int, int]]] = {}
    done: dict[str, dict[tuple[int, int], dict]] = {}
    for t, out in result.eval_files.items():
        identity = cfg.identity(t)
        if out.exists() and manifest_complete(out, identity):
            result.skipped.append(t)
            continue
        if out.exists() and not cfg.force and read_manifest(out) is None:
            raise DataError(f"{out}: eval file exists and was not written by agentpipe; use --force to replace it")
        done[t] = _load_part(out)
        todo[t] = [(i, k) for i in range(len(records)) for k in range(cfg.replicates) if (i, k) not in done[t]]
    pending = [(t, i, k) for t, items in todo.items() for i, k in items]
    if pending:
        backend = backend or get_backend(
            cfg.evaluator, cache=get_settings().home / "cache" / "llm.sqlite" if cfg.cache else None,
            **({"quantization": cfg.quantization} if cfg.quantization else {}), **cfg.backend_options)
        _judge(cfg, backend, records, pending, result, progress)
    for t, out in result.eval_files.items():
        if t in result.skipped:
            continue
        entries = _load_part(out)
        if len(entries) == len(records) * cfg.replicates:
            atomic_write_jsonl(out, _assemble(entries, len(records), cfg.replicates, SCORE_KEYS[t]))
            write_manifest(out, stage="evaluate", config=cfg.identity(t), inputs={"trajectories": target},
                           counts=_counts(read_jsonl(out).records, SCORE_KEYS[t]))
            _part(out).unlink(missing_ok=True)


def _part(out: Path) -> Path:
    return out.with_name(out.name + ".part")


def _load_part(out: Path) -> dict[tuple[int, int], dict]:
    part = _part(out)
    if not part.exists():
        return {}
    return {(r["eval_id"], r["replicate"]): r for r in read_jsonl(part).records}


def choice_seed(seed: int, eval_type: str, messages: list[dict[str, str]]) -> int:
    """The sampling seed of one sampled choice judgement: one stream per (seed, metric, judged prompt). A seed
    shared by every trajectory would draw the same uniform number for all of them, so similar score
    distributions would give the same score everywhere (across lines and across sampled runs of one case)."""
    text = json.dumps([seed, eval_type, messages], sort_keys=True)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _judge(cfg: EvaluationConfig, backend: ChatBackend, records: list[dict], pending: list[tuple[str, int, int]],
           result: EvaluationResult, progress: Callable[[int, int], None] | None) -> None:
    registry = toolkit_registry()
    appenders = {t: JsonlAppender(_part(out)) for t, out in result.eval_files.items() if t not in result.skipped}
    try:
        for start in range(0, len(pending), cfg.chunk_size):
            chunk = pending[start:start + cfg.chunk_size]
            requests, batch = [], []
            for t, i, k in chunk:
                rec = records[i]
                if "error" in rec:  # the emulation of this case failed: nothing to judge
                    appenders[t].append({"eval_id": i, "replicate": k, "eval_scores": {}, "status": "skipped",
                                         "error": "trajectory has no episode (its emulation failed)"})
                    continue
                toolkits = [registry[n] for n in rec["case"]["Toolkits"] if n in registry]
                messages = judge_messages(t, rec, toolkits, study_final_step=cfg.compat == "study")
                config = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                          seed=cfg.seed + k)
                requests.append(ChatRequest(messages=messages, config=config, replicate=k, tag=(t, i, k)))
                batch.append((t, i, k))
            by_type: dict[str, list[dict]] = defaultdict(list)
            if cfg.scoring == "choice":
                logprobs = backend.score_choices(requests, CHOICE_PREFIX, CHOICES) if requests else []
                judged = [choice_judgement(t, lp, cfg.evaluator, temperature=cfg.temperature,
                                           seed=choice_seed(cfg.seed + k, t, req.messages))
                          for (t, _, k), lp, req in zip(batch, logprobs, requests)]
            else:
                responses = backend.generate(requests) if requests else []
                judged = [read_judgement(t, resp, cfg.evaluator) for (t, _, _), resp in zip(batch, responses)]
            for (t, i, k), j in zip(batch, judged):
                by_type[t].append({"eval_id": i, "replicate": k, **j.fields})
                result.requests += 1
                status = j.fields["status"]
                result.scored += status == "ok"
                result.parse_failed += status == "parse_failed"
                result.errors += status == "error"
            for t, entries in by_type.items():
                appenders[t].append(*entries)
            if progress:
                progress(min(start + cfg.chunk_size, len(pending)), len(pending))
    finally:
        for a in appenders.values():
            a.close()


def _assemble(entries: dict[tuple[int, int], dict], n_lines: int, replicates: int, key: str) -> list[dict]:
    """Records in line order: flat for one replicate, ``replicates`` + ``consistency`` for several."""
    out = []
    for i in range(n_lines):
        reps = [{k: v for k, v in entries[(i, r)].items() if k != "eval_id"} for r in range(replicates)]
        if replicates == 1:
            rep = reps[0]
            rep.pop("replicate", None)
            out.append({**rep, "eval_id": i})
            continue
        scores = [(r.get("eval_scores") or {}).get(key) for r in reps]
        rec: dict[str, Any] = {"eval_id": i, "replicates": reps, "consistency": replicate_consistency(scores)}
        if all(s is None for s in scores):
            rec["error"] = "All replicates failed"
        out.append(rec)
    return out


def _counts(records: list[dict], key: str) -> dict[str, int]:
    from pipeline.data.records import EvalRecord

    evals = [EvalRecord.model_validate(r) for r in records]
    return {"records": len(evals), "scored": sum(e.score(key) is not None for e in evals),
            "missing": sum(e.score(key) is None for e in evals)}
