"""Evaluate a trajectory file with one or more judges × N replicates, batched and resumable.

Every (line, eval type, replicate) is one request; all go through the LLM interface in chunks. Each
finished replicate is appended (fsync'ed) to ``<eval file>.part``; a rerun skips what is there, so a crash
never loses finished work nor corrupts a file. When an eval file has every replicate of every line, its
records are assembled in line order (``eval_id`` = line index), written atomically, and a manifest follows.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

import pipeline.evaluation.doubles  # noqa: F401 - registers the test double scripted:judge
from pipeline.data.jsonl import JsonlAppender, atomic_write_json, atomic_write_jsonl, read_jsonl
from pipeline.data.locks import writer_lock
from pipeline.data.manifest import file_digest, write_manifest
from pipeline.data.naming import RunFileName, parse_run_filename
from pipeline.data.records import SCORE_KEYS, replicate_consistency, valid_score
from pipeline.data.runfiles import load_trajectories
from pipeline.data.toolkit_registry import judged_toolkits, toolkit_registry, toolkits_digest
from pipeline.data.toolkits import Toolkit
from pipeline.errors import ConfigError, DataError, PipelineError
from pipeline.evaluation.judges import (CHOICE_PREFIX, CHOICES, STRUCTURED_MIN_TOKENS, JudgeTag, answer_pattern,
                                       answer_schema, choice_judgement, episode_digest, eval_types_for,
                                       judge_messages,
                                       prompt_version, read_judgement, trajectory_digest)
from pipeline.llm import ChatBackend, ChatRequest, GenerationConfig, get_backend
from pipeline.llm.options import NOT_IN_FINGERPRINT, BackendOptions
from pipeline.llm.spec import parse_model_spec
from pipeline.llm.types import SAMPLING_VERSION, request_seed
from pipeline.settings import get_settings
from pipeline.stage import StageConfig, StageResult, journal_paths, journaled_output, move_aside


class EvaluationConfig(StageConfig, BackendOptions):
    """One trajectory file judged by one evaluator; each eval file is bound to its fingerprint (these fields but
    those in ``not_in_fingerprint``, its metric, the judge prompt's version and the trajectory file's sha256)."""

    stage: ClassVar[str] = "evaluate"
    not_in_fingerprint: ClassVar[frozenset[str]] = NOT_IN_FINGERPRINT | {
        "trajectories", "metrics", "cache", "chunk_size", "force", "wait", "no_progress", "batch", "batch_wait",
        "batch_poll_s"}

    trajectories: Path = Field(description="trajectory .jsonl file")
    evaluator: str = Field(description="evaluator model spec")
    metrics: str = Field(default="safe,help_ignore_safety", description="comma list of safe, help_ignore_safety "
                         "(Help(Ignore)), help (Help(Safe))")
    replicates: int = Field(default=1, ge=1, description="judgements per trajectory")
    temperature: float = Field(default=0.0, ge=0, description="judge temperature (replicates need > 0)")
    seed: int = Field(default=42, ge=0, description="sampling seed: each judgement samples with a seed derived from it, "
                      "the metric, the replicate and the judged prompt")
    max_new_tokens: int = Field(default=2048, ge=1)
    compat: Literal["correct", "study"] = Field(default="correct", description="study: the judge sees the repr of "
                                                "the final step, as the study (docs/compat.md)")
    #: "generate": the judge writes its reasoning and the four fields (the study); "choice": constrained
    #: scoring from the log-probabilities of the scores 0-3 (local models too small to follow the format)
    scoring: Literal["generate", "choice"] = Field(default="generate", description="generate: the judge reasons and "
                                                   "answers in the four fields; choice: the score 0-3 with the highest "
                                                   "log-probability (small local judges that cannot follow the format)")
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = Field(
        default=None, description="how much an API reasoning judge (gpt-5*, o-series) reasons before answering "
        "(default: the model's own); refused for other judges")
    structured: bool = Field(default=False, description="constrain the judge's answer to the answer format "
                             "(the four fields in order, a rubric label, a score 0-3); the prompt is unchanged "
                             "(vllm:<model>: decoded under a regex; openai:<model>: a JSON-schema response format)")
    cache: bool = Field(default=False, description="cache judge responses on disk")
    batch: bool = Field(default=False, description="an API judge answers through the OpenAI Batch API (half price, "
                        "within 24 h): the same requests and records, journaled beside the trajectory file so that "
                        "a killed run reattaches to its batch")
    batch_wait: bool = Field(default=True, description="with --batch: poll until the batch ends (--no-batch-wait: "
                             "return at once, status waiting (exit 75); the same command collects later)")
    batch_poll_s: float = Field(default=30.0, gt=0, description="with --batch: seconds between polls")
    chunk_size: int = Field(default=256, ge=1, description="requests per batched call (progress is saved after each)")
    force: bool = Field(default=False, description="eval files of a different configuration (or not written by "
                        "agentpipe) are moved aside as <name>.replaced-<time> and judged again (default: refuse)")
    wait: bool = Field(default=False, description="when another process is evaluating the same trajectory file, "
                       "wait for it (default: refuse at once)")
    no_progress: bool = Field(default=False, description="no progress bar")

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: str) -> str:
        eval_types_for(v)  # raises on an unknown metric
        return v

    @model_validator(mode="after")
    def _reasoning(self) -> EvaluationConfig:
        if self.reasoning_effort is not None:
            if parse_model_spec(self.evaluator).backend != "openai":
                raise ValueError(f"reasoning_effort: evaluator {self.evaluator} is not an API judge; a local model "
                                 "takes no reasoning_effort")
            from pipeline.llm import settings_not_sent

            settings_not_sent(self.evaluator, GenerationConfig(temperature=self.temperature,
                                                               reasoning_effort=self.reasoning_effort))
        return self

    @model_validator(mode="after")
    def _structured(self) -> EvaluationConfig:
        if self.structured:
            if parse_model_spec(self.evaluator).backend not in ("vllm", "openai"):
                raise ValueError(f"structured: evaluator {self.evaluator}: constrained answers need the vLLM engine "
                                 "(vllm:<model>: a regex) or an OpenAI-compatible API (openai:<model>: a JSON schema)")
            if self.scoring == "choice":
                raise ValueError("structured: choice scoring has no written answer to constrain; drop --structured")
            if self.max_new_tokens < STRUCTURED_MIN_TOKENS:
                raise ValueError(f"structured: max_new_tokens {self.max_new_tokens}: a structured answer needs at "
                                 f"least {STRUCTURED_MIN_TOKENS} (its fixed parts alone take about 40 tokens)")
        return self

    @model_validator(mode="after")
    def _batch(self) -> EvaluationConfig:
        if self.batch:
            if parse_model_spec(self.evaluator).backend != "openai":
                raise ValueError(f"batch: evaluator {self.evaluator} is not an OpenAI-compatible API judge "
                                 "(openai:<model> or gpt-*); a local judge batches by itself")
            if self.scoring == "choice":
                raise ValueError("batch: choice scoring reads a local model's log-probabilities; drop --batch")
            if self.cache:
                raise ValueError("batch: the response cache answers request by request; drop --cache")
        return self

    def fingerprint(self) -> dict[str, Any]:
        data = super().fingerprint()
        if not self.structured:  # free text, as every eval file written before the option existed records
            data.pop("structured", None)
        if self.reasoning_effort is None:  # the model's default, likewise
            data.pop("reasoning_effort", None)
        return data

    def versions(self) -> dict[str, Any]:
        # generated judgements sampled with per-request seeds (SAMPLING_VERSION); greedy ones and choice scoring
        # (choice_seed) are unchanged, so their files keep their fingerprint
        return {"sampling": SAMPLING_VERSION} if self.temperature > 0 and self.scoring == "generate" else {}

    def identity(self, eval_type: str, trajectories_sha256: str, toolkits_sha256: str) -> dict[str, Any]:
        """The fingerprint of one eval file (``toolkits_sha256``: of the tool specifications the judge sees)."""
        from pipeline.llm import settings_not_sent

        # settings the judge is not sent (an OpenAI reasoning model's temperature): recorded, or refused
        not_sent = settings_not_sent(self.evaluator, GenerationConfig(temperature=self.temperature))
        return {"eval_type": eval_type, **self.fingerprint(), **({"not_sent": not_sent} if not_sent else {}),
                "prompt_version": prompt_version(eval_type),
                "trajectories_sha256": trajectories_sha256, "toolkits_sha256": toolkits_sha256}


@dataclass
class EvaluationResult:
    trajectory_file: Path
    eval_files: dict[str, Path]
    requests: int = 0
    scored: int = 0
    parse_failed: int = 0
    errors: int = 0
    skipped: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)  # eval files with failed requests left
    #: a replay judge's answers found by the episode's course (its rebuilt final log differs from the recording)
    by_episode: int = 0
    wall_s: float = 0.0
    #: with ``batch``: the batch's id, status and journal; ``waiting`` while it runs (nothing assembled yet)
    batch: dict[str, Any] | None = None
    waiting: bool = False


def _target_trajectory(path: Path, evaluator_name: str, force: bool) -> Path:
    """Trajectory and eval files share a stem that names the evaluator: evaluating with another evaluator
    links the trajectory file under that evaluator's name first (SPEC §2.2). A copy there with other content
    (``path`` was replaced since) is refused, or with ``force`` moved aside and linked anew: judging it would
    pass its judgements off as those of ``path``."""
    name = parse_run_filename(path.name)
    if name.evaluator == evaluator_name:
        return path
    target = path.with_name(type(name)(**{**asdict(name), "evaluator": evaluator_name}).filename())
    if target.exists() and not filecmp.cmp(path, target, shallow=False):  # the bytes (a copy is fine: cp -r)
        if not force:
            raise DataError(f"--trajectories {path}: {target.name} beside it holds other trajectories (the copy "
                            f"judged under {evaluator_name}'s name: was {path.name} replaced?); rerun with --force "
                            "to judge these (the old copy and its judgements are kept aside)")
        move_aside(target)
    if not target.exists():
        try:
            os.link(path, target)
        except OSError:
            target.write_bytes(path.read_bytes())
    return target


def evaluate(cfg: EvaluationConfig, *, backend: ChatBackend | None = None,
             progress: Callable[[int, int], None] | None = None) -> StageResult:
    """The ``evaluate`` stage: ``run_evaluation`` as a ``StageResult``; incomplete while a request failed (an
    evaluation whose every request failed is never complete)."""
    res = run_evaluation(cfg, backend=backend, progress=progress)
    if len(res.skipped) < len(res.eval_files) and not res.waiting:
        _track_run(cfg, res)
    status = ("waiting" if res.waiting else "incomplete" if res.incomplete else
              "skipped" if len(res.skipped) == len(res.eval_files) else "complete")
    return StageResult(stage="evaluate", status=status,
                       outputs={"trajectories": str(res.trajectory_file),
                                "eval_files": {t: str(p) for t, p in res.eval_files.items()}},
                       counts={"requests": res.requests, "scored": res.scored, "parse_failed": res.parse_failed,
                               "errors": res.errors, **({"replayed_by_episode": res.by_episode} if res.by_episode
                                                        else {})}, incomplete=res.incomplete, skipped=res.skipped,
                       wall_s=res.wall_s, **({"batch": res.batch} if res.batch else {}))


def _track_run(cfg: EvaluationConfig, res: EvaluationResult) -> None:
    """The MLflow run of a judged trajectory file: judgements by status, judge tokens and USD (whole files)."""
    from collections import Counter

    from pipeline.tracking.stage_runs import LOCAL_BACKENDS, add_usage, log_stage_run

    usage: dict[str, dict[str, float]] = {}
    status: Counter = Counter()
    for path in res.eval_files.values():
        for rec in read_jsonl(path).records if path.exists() else []:
            for rep in rec["replicates"] if isinstance(rec.get("replicates"), list) else [rec]:
                status[rep.get("status") or "ok"] += 1
                add_usage(usage, "judge", rep.get("usage"))
    log_stage_run("evaluate", res.trajectory_file, experiment="evaluation",
                  params={**cfg.fingerprint(), **({"batch": True} if cfg.batch else {})},
                  counts={"judgements": sum(status.values()), **{f"judgements_{k}": v for k, v in status.items()}},
                  usage=usage, wall_s=res.wall_s,
                  gpus=None if parse_model_spec(cfg.evaluator).backend in LOCAL_BACKENDS else 0)


def run_evaluation(cfg: EvaluationConfig, *, backend: ChatBackend | None = None,
                   progress: Callable[[int, int], None] | None = None) -> EvaluationResult:
    """Judge a trajectory file (resumable; see the module docstring). One process evaluates a trajectory file
    at a time: another one on the same file refuses at once (or, with ``wait``, waits for it)."""
    t0 = time.monotonic()
    eval_types = eval_types_for(cfg.metrics)
    path = Path(cfg.trajectories)
    try:
        name = parse_run_filename(path.name)
    except PipelineError as e:
        raise DataError(f"--trajectories {path}: not a trajectory file ({e})") from None
    if not name.is_trajectory_file:
        raise DataError(f"--trajectories {path}: not a trajectory file (it is an eval or report file: suffix "
                        f"'{name.suffix}')")
    if not path.is_file():
        raise DataError(f"--trajectories {path}: trajectory file not found")
    trajectories = load_trajectories(path)
    if not trajectories:  # judging nothing would write empty eval files that read as complete
        raise DataError(f"--trajectories {path}: no trajectories in the file")
    # checked before anything is written (the evaluator's link of the trajectory file included)
    toolkits = judged_toolkits([t.case for t in trajectories if not t.failed], toolkit_registry(),
                               f"--trajectories {path}")
    evaluator_name = parse_model_spec(cfg.evaluator).name
    target = _target_trajectory(path, evaluator_name, cfg.force)
    tname = parse_run_filename(target.name)
    result = EvaluationResult(target, {t: target.with_name(tname.eval_file(t).filename()) for t in eval_types})
    with writer_lock(target, wait=cfg.wait, what="trajectory file's evaluation"):
        _evaluate_locked(cfg, backend, progress, trajectories, toolkits, target, result)
    result.wall_s = time.monotonic() - t0
    return result


def _meta(out: Path) -> Path:
    """The fingerprint of a partial evaluation (``<eval file>.part.json``), written before its first line."""
    return journal_paths(out)[1]


def _evaluate_locked(cfg: EvaluationConfig, backend: ChatBackend | None, progress: Callable[[int, int], None] | None,
                     trajectories: list[Any], toolkits: dict[str, Toolkit], target: Path,
                     result: EvaluationResult) -> None:
    if not cfg.batch:  # judgements a batch still holds are collected with --batch, not paid for twice
        from pipeline.evaluation.batch import check_no_pending_batch

        check_no_pending_batch(target, force=cfg.force)
    records = [t.model_dump(exclude_unset=True) for t in trajectories]
    sha, tk_sha = file_digest(target), toolkits_digest(toolkits)
    identities = {t: json.loads(json.dumps(cfg.identity(t, sha, tk_sha), default=str)) for t in result.eval_files}
    if not cfg.force:  # every eval file is checked before anything is moved or written
        for t, out in result.eval_files.items():
            journaled_output(out, identities[t], "evaluate", force=False)
    todo: dict[str, list[tuple[int, int]]] = {}
    for t, out in result.eval_files.items():
        if journaled_output(out, identities[t], "evaluate", force=cfg.force):
            result.skipped.append(t)
            continue
        done = _load_part(out)
        # a failed request is retried; a malformed answer is data (``evaluate repair`` / ``rerun-failed``)
        todo[t] = [(i, k) for i in range(len(records)) for k in range(cfg.replicates)
                   if (i, k) not in done or done[(i, k)].get("status") == "error"]
        atomic_write_json(_meta(out), identities[t])
    pending = [(t, i, k) for t, items in todo.items() for i, k in items]
    if pending:
        backend = backend or _judge_backend(cfg)
        run = parse_run_filename(target.name)
        if cfg.batch:
            _judge_batch(cfg, backend, records, toolkits, pending, result, progress, run)
            if result.waiting:  # the batch runs: nothing to assemble yet; the same command collects
                return
        else:
            _judge(cfg, backend, records, toolkits, pending, result, progress, run)
        from pipeline.evaluation.replay import ReplayJudge

        if isinstance(backend, ReplayJudge):
            result.by_episode = backend.by_episode
    for t, out in result.eval_files.items():
        if t in result.skipped:
            continue
        entries = _load_part(out)
        if len(entries) != len(records) * cfg.replicates:
            result.incomplete.append(t)
            continue
        statuses = [e.get("status") for e in entries.values()]
        failed = statuses.count("error")
        atomic_write_jsonl(out, _assemble(entries, len(records), cfg.replicates, SCORE_KEYS[t]))
        counts = _counts(read_jsonl(out).records, SCORE_KEYS[t]) | {
            "errors": statuses.count("error"), "parse_failed": statuses.count("parse_failed")}
        write_manifest(out, stage="evaluate", config=identities[t], inputs={"trajectories": target},
                       counts=counts, status="incomplete" if failed else "complete")
        if failed:  # the journal stays: a rerun retries exactly the failed judgements
            result.incomplete.append(t)
        else:
            _part(out).unlink(missing_ok=True)
            _meta(out).unlink(missing_ok=True)
    if cfg.batch:
        from pipeline.evaluation.batch import batch_done

        batch_done(target)  # every answer is in the eval files (or their journals): the batch is collected


def _judge_backend(cfg: EvaluationConfig) -> ChatBackend:
    """The evaluator's backend. A ``replay:`` evaluator is this stage's replay judge (it answers in the judge's
    format, which this stage owns), built here rather than by ``pipeline.llm`` (which imports no stage)."""
    spec = parse_model_spec(cfg.evaluator)
    if spec.backend == "replay":
        from pipeline.evaluation.replay import ReplayJudge

        if cfg.cache:  # the cache keys on the messages, the replay on the trajectory: a hit could be another's
            raise ConfigError(f"--cache: the replay judge {cfg.evaluator} answers from its recording; drop --cache")
        return ReplayJudge(spec)
    return get_backend(cfg.evaluator, cache=get_settings().home / "cache" / "llm.sqlite" if cfg.cache else None,
                       **({"quantization": cfg.quantization} if cfg.quantization else {}), **cfg.backend_options())


def _part(out: Path) -> Path:
    return journal_paths(out)[0]


def _load_part(out: Path) -> dict[tuple[int, int], dict]:
    """(line, replicate) → its latest judgement; a failed request never replaces an answer."""
    part = _part(out)
    if not part.exists():
        return {}
    entries: dict[tuple[int, int], dict] = {}
    for r in read_jsonl(part).records:
        key = (r["eval_id"], r["replicate"])
        if key not in entries or r.get("status") != "error" or entries[key].get("status") == "error":
            entries[key] = r
    return entries


def choice_seed(seed: int, eval_type: str, messages: list[dict[str, str]]) -> int:
    """The sampling seed of one sampled choice judgement: one stream per (seed, metric, judged prompt). A seed
    shared by every trajectory would draw the same uniform number for all of them, so similar score
    distributions would give the same score everywhere (across lines and across sampled runs of one case)."""
    text = json.dumps([seed, eval_type, messages], sort_keys=True)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


#: what a judgement of a trajectory whose emulation failed records (nothing to judge)
_NO_EPISODE = {"eval_scores": {}, "status": "skipped", "error": "trajectory has no episode (its emulation failed)"}


def _request(cfg: EvaluationConfig, t: str, i: int, k: int, rec: dict, registry: dict[str, Toolkit],
             run: RunFileName) -> ChatRequest:
    """The judge's request for line ``i``'s metric ``t``, replicate ``k`` (the same in every mode)."""
    toolkits = [registry[n] for n in rec["case"]["Toolkits"]]  # every one checked by judged_toolkits
    messages = judge_messages(t, rec, toolkits, study_final_step=cfg.compat == "study")
    # one seed per (metric, line's prompt, replicate): a judgement does not depend on its chunk or batch
    seed = request_seed(cfg.seed, "judge", t, k, messages) if cfg.temperature > 0 else None
    api = cfg.structured and parse_model_spec(cfg.evaluator).backend == "openai"
    config = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=seed,
                              regex=answer_pattern(t, cfg.max_new_tokens) if cfg.structured and not api else None,
                              json_schema=answer_schema(t) if api else None, reasoning_effort=cfg.reasoning_effort)
    tag = JudgeTag(t, i, k, rec.get("case_idx"), trajectory_digest(rec), run.agent, run.emulator, episode_digest(rec))
    return ChatRequest(messages=messages, config=config, replicate=k, tag=tag, role="judge")


def _json_answers(cfg: EvaluationConfig) -> bool:
    """Structured answers of an API judge come as JSON (``answer_schema``)."""
    return cfg.structured and parse_model_spec(cfg.evaluator).backend == "openai"


def _count(result: EvaluationResult, fields: dict[str, Any]) -> None:
    result.requests += 1
    status = fields["status"]
    result.scored += status == "ok"
    result.parse_failed += status == "parse_failed"
    result.errors += status == "error"


def _judge_batch(cfg: EvaluationConfig, backend: ChatBackend, records: list[dict], registry: dict[str, Toolkit],
                 pending: list[tuple[str, int, int]], result: EvaluationResult,
                 progress: Callable[[int, int], None] | None, run: RunFileName) -> None:
    """Every pending judgement in one batch (``pipeline.evaluation.batch``); its answers saved as a synchronous
    run saves them, once the batch has ended."""
    from pipeline.evaluation.batch import judge_in_batch

    if cfg.scoring == "choice":
        raise ConfigError("--batch: choice scoring reads a local model's log-probabilities; drop --batch")
    items = [((t, i, k), _request(cfg, t, i, k, records[i], registry, run)) for t, i, k in pending
             if "error" not in records[i]]
    no_episode = [(t, i, k) for t, i, k in pending if "error" in records[i]]
    responses, info = (judge_in_batch(backend, cfg.evaluator, result.trajectory_file, items, wait=cfg.batch_wait,
                                      poll_s=cfg.batch_poll_s, force=cfg.force,
                                      progress=None if cfg.no_progress else print)
                       if items else ({}, None))
    result.batch = info
    if responses is None:
        result.waiting = True
        return
    by_type: dict[str, list[dict]] = defaultdict(list)
    for t, i, k in no_episode:
        by_type[t].append({"eval_id": i, "replicate": k, **_NO_EPISODE})
    for (t, i, k), _ in items:
        j = read_judgement(t, responses[(t, i, k)], cfg.evaluator, json_answer=_json_answers(cfg))
        by_type[t].append({"eval_id": i, "replicate": k, **j.fields})
        _count(result, j.fields)
    for t, entries in by_type.items():
        with JsonlAppender(_part(result.eval_files[t])) as appender:
            appender.append(*entries)
    if progress:
        progress(len(pending), len(pending))


def _judge(cfg: EvaluationConfig, backend: ChatBackend, records: list[dict], registry: dict[str, Toolkit],
           pending: list[tuple[str, int, int]], result: EvaluationResult,
           progress: Callable[[int, int], None] | None, run: RunFileName) -> None:
    appenders = {t: JsonlAppender(_part(out)) for t, out in result.eval_files.items() if t not in result.skipped}
    try:
        for start in range(0, len(pending), cfg.chunk_size):
            chunk = pending[start:start + cfg.chunk_size]
            requests, batch = [], []
            for t, i, k in chunk:
                rec = records[i]
                if "error" in rec:  # the emulation of this case failed: nothing to judge
                    appenders[t].append({"eval_id": i, "replicate": k, **_NO_EPISODE})
                    continue
                requests.append(_request(cfg, t, i, k, rec, registry, run))
                batch.append((t, i, k))
            by_type: dict[str, list[dict]] = defaultdict(list)
            if cfg.scoring == "choice":
                logprobs = backend.score_choices(requests, CHOICE_PREFIX, CHOICES) if requests else []
                judged = [choice_judgement(t, lp, cfg.evaluator, temperature=cfg.temperature,
                                           seed=choice_seed(cfg.seed + k, t, req.messages))
                          for (t, _, k), lp, req in zip(batch, logprobs, requests)]
            else:
                responses = backend.generate(requests) if requests else []
                judged = [read_judgement(t, resp, cfg.evaluator, json_answer=_json_answers(cfg))
                          for (t, _, _), resp in zip(batch, responses)]
            for (t, i, k), j in zip(batch, judged):
                by_type[t].append({"eval_id": i, "replicate": k, **j.fields})
                _count(result, j.fields)
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
        scores = [valid_score((r.get("eval_scores") or {}).get(key)) for r in reps]
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
