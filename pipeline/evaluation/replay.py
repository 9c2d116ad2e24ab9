"""The replay judge: answers judge requests with the judgements a recording holds, and the agreement report.

``ReplayJudge`` (evaluator spec ``replay:<run file or folder>[#<judge name>]``) reads the eval files beside the
recorded trajectory files (``<stem>_eval_agent_safe.jsonl``, ``<stem>_eval_agent_help_ignore_safety.jsonl``;
``eval_id`` = the trajectory's line) — with a name, only those of the run files judged by that judge — and
answers each judge request with the recorded judgement of THAT trajectory and metric. A request names its
trajectory by digest (``JudgeTag.trajectory``), so the file judged may order its cases differently from the
recording. The answer is the recorded fields rebuilt as the judge's ``Field: value`` lines (a recorded
unparseable answer: its raw text), and it goes through ``read_judgement`` as a live judge's answer does. A
trajectory with no recorded judgement gets a failed response, never a default score.

``replay_judgements`` drives every eval file below a folder through the replay judge and the parser and compares
the parsed scores with the recorded ``eval_scores`` (``agentpipe replay --judgements``).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.jsonl import read_jsonl
from pipeline.data.naming import parse_run_filename
from pipeline.data.runfiles import RunFile, find_run_files
from pipeline.errors import DataError, PipelineError
from pipeline.evaluation.judges import METRICS, JudgeTag, episode_digest, read_judgement, trajectory_digest
from pipeline.evaluation.parsing import FIELDS
from pipeline.llm.base import ChatBackend, Progress
from pipeline.llm.spec import ModelSpec
from pipeline.llm.types import ChatRequest, ChatResponse

log = logging.getLogger("pipeline.evaluation")

#: eval type → the metric's name in messages (``safe``, ``help_ignore_safety``, ``help``)
_METRIC = {t: m for m, t in METRICS.items()}
#: what a recorded judgement keeps for its answer (the rest — usage, scores — is not the judge's text)
_KEPT = (*FIELDS, "status", "error", "raw")


@dataclass(frozen=True)
class Recorded:
    """One recorded judgement record (all its replicates) of a trajectory, and where it is."""

    file: Path
    line: int
    agent: str
    emulator: str
    replicates: tuple[dict[str, Any], ...]

    @property
    def where(self) -> str:
        return f"{self.file.name}:{self.line + 1}"


def _slim(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: rec[k] for k in _KEPT if k in rec}


def replicates_of(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """The replicates of an eval record: its ``replicates`` list, or the flat record as replicate 0."""
    reps = rec.get("replicates")
    return [r for r in reps if isinstance(r, dict)] if isinstance(reps, list) else [rec]


def judge_run_files(root: Path, judge: str | None, what: str) -> list[RunFile]:
    """The run files below ``root`` (a folder, or one trajectory file) that have eval files, judged by ``judge``
    (the evaluator part of their names) when one is given."""
    if root.is_file():
        name = parse_run_filename(root.name)
        if not name.is_trajectory_file:
            raise DataError(f"{what}: {root} is not a trajectory file")
        rf = RunFile(root, name)
        for t in METRICS.values():
            ef = root.with_name(name.eval_file(t).filename())
            if ef.is_file():
                rf.eval_files[t] = ef
        run_files = [rf]
    elif root.is_dir():
        run_files = find_run_files(root)
    else:
        raise DataError(f"{what}: no run file or folder at {root}")
    found = [rf for rf in run_files if rf.eval_files and (judge is None or rf.name.evaluator == judge)]
    if not found:
        by = f" judged by {judge}" if judge else ""
        raise DataError(f"{what}: no eval files{by} beside the trajectory files at {root}")
    return found


def recorded_judgements(run_files: Sequence[RunFile]
                        ) -> tuple[dict[tuple[str, str], list[Recorded]], dict[tuple[str, str], list[Recorded]]]:
    """(eval type, trajectory digest) → the recorded judgements of that trajectory, and the same keyed by the
    episode digest; one pass over the files."""
    by_trajectory: dict[tuple[str, str], list[Recorded]] = defaultdict(list)
    by_episode: dict[tuple[str, str], list[Recorded]] = defaultdict(list)
    for rf in run_files:
        trajectories = read_jsonl(rf.path).records
        digests = [(trajectory_digest(t), episode_digest(t)) for t in trajectories]
        for t, ef in sorted(rf.eval_files.items()):
            for n, rec in enumerate(read_jsonl(ef).records):
                i = _line_of(rec, n, ef, len(trajectories))
                recorded = Recorded(ef, i, rf.name.agent, rf.name.emulator, tuple(_slim(r) for r in replicates_of(rec)))
                by_trajectory[(t, digests[i][0])].append(recorded)
                by_episode[(t, digests[i][1])].append(recorded)
    return by_trajectory, by_episode


def _line_of(rec: dict[str, Any], n: int, path: Path, lines: int) -> int:
    i = rec.get("eval_id")
    if not isinstance(i, int) or not 0 <= i < lines:
        raise DataError(f"{path}: line {n + 1}: eval_id {i!r} is not a line of its trajectory file "
                        f"(expected 0-{lines - 1})")
    return i


def answer_text(judgement: dict[str, Any]) -> str:
    """A recorded judgement as the judge's answer: its raw text when it was kept (an answer that did not parse),
    else the four fields as ``Field: value`` lines (a field recorded as null is left out, as it was absent)."""
    if isinstance(judgement.get("raw"), str):
        return judgement["raw"]
    return "\n".join(f"{f}: {judgement[f]}" for f in FIELDS if judgement.get(f) is not None)


def _answer(judgement: dict[str, Any]) -> ChatResponse:
    if judgement.get("status") in ("error", "skipped"):  # no answer was recorded: none is replayed
        return ChatResponse.failure(f"replay: the recorded judgement has status {judgement['status']} "
                                    f"({judgement.get('error')})")
    return ChatResponse(text=answer_text(judgement), finish_reason="stop")


class ReplayJudge(ChatBackend):
    """Answers judge requests (``role`` judge, ``tag`` a ``JudgeTag``) from a recording's eval files."""

    def __init__(self, spec: ModelSpec, run_files: Sequence[RunFile] | None = None) -> None:
        self.spec = spec
        self.revision = f"replay:{spec.model}"
        files = run_files if run_files is not None else judge_run_files(Path(spec.model), spec.label, spec.raw)
        self._table, self._episodes = recorded_judgements(files)
        #: answers singled out among differing recorded judgements of one trajectory by the run's names
        self.told_apart = 0
        #: answers for a rebuilt episode whose final log differs from its recording (found by its course)
        self.by_episode = 0

    def answer(self, tag: JudgeTag) -> ChatResponse:
        """The recorded judgement of the tagged trajectory, metric and replicate; a failed response when there is
        none, or when several differ and the judged file's agent and emulator do not single one out."""
        metric, case = _METRIC.get(tag.eval_type, tag.eval_type), tag.case_idx
        found = self._table.get((tag.eval_type, tag.trajectory))
        if not found and tag.episode:
            # the same actions, observations and answer, another final log (3 of the 15,840 finetuned episodes
            # rebuild so, docs/compat.md): the recorded judgement of that episode, of this run only, counted and
            # logged
            found = [r for r in self._episodes.get((tag.eval_type, tag.episode), [])
                     if (r.agent, r.emulator) == (tag.agent, tag.emulator)]
            if found:
                self.by_episode += 1
                log.warning("replay: case %s: the rebuilt final log differs from the recording's; answered with the "
                            "recorded %s judgement of the same episode (%s)", case, metric, found[0].where)
        if not found:
            return ChatResponse.failure(f"replay: no recorded {metric} judgement of this trajectory (case {case})")
        answers = [(r, r.replicates[tag.replicate]) for r in found if tag.replicate < len(r.replicates)]
        if not answers:
            return ChatResponse.failure(f"replay: no recorded replicate {tag.replicate} of the {metric} judgement "
                                        f"of this trajectory (case {case})")
        if len(_distinct(answers)) > 1:  # the same trajectory judged apart (e.g. two models' identical runs)
            same_run = [(r, j) for r, j in answers if (r.agent, r.emulator) == (tag.agent, tag.emulator)]
            if len(_distinct(same_run)) != 1:
                return ChatResponse.failure(
                    f"replay: {len(_distinct(answers))} different recorded {metric} judgements of this trajectory "
                    f"(case {case}), none singled out by the run {tag.agent}/{tag.emulator}: "
                    + ", ".join(r.where for r, _ in answers[:3]))
            answers = same_run
            self.told_apart += 1
        return _answer(answers[0][1])

    def generate(self, requests: Sequence[ChatRequest], progress: Progress | None = None) -> list[ChatResponse]:
        out = []
        for n, r in enumerate(requests):
            if r.role != "judge" or not isinstance(r.tag, JudgeTag):
                out.append(ChatResponse.failure(f"replay judge: answers judge requests that name their trajectory "
                                                f"(role judge, a JudgeTag), not role {r.role}"))
            else:
                out.append(self.answer(r.tag))
            if progress:
                progress(n + 1, len(requests))
        return out


def _distinct(answers: Sequence[tuple[Recorded, dict[str, Any]]]) -> set[str]:
    return {json.dumps(j, sort_keys=True, default=str) for _, j in answers}


# ------------------------------------------------------------------------------------------ agreement report
#: Kinds of disagreement between a replayed and a recorded judgement.
KINDS = ("not answered", "parse failed", "scored where the record is not", "other score")


@dataclass
class JudgementReport:
    total: int = 0
    identical: int = 0
    by_kind: Counter = field(default_factory=Counter)
    examples: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind → first file, line, detail
    differences: list[dict[str, Any]] = field(default_factory=list)
    by_judge: dict[str, dict[str, int]] = field(default_factory=dict)
    #: judgements answered only by telling apart the differing recorded judgements of one trajectory by the run
    told_apart: int = 0
    wall_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.identical / self.total if self.total else 0.0

    def line(self) -> str:
        return f"replay: {self.identical} of {self.total} judgements identical ({100 * self.rate:.2f} %)"

    def table(self) -> str:
        """Disagreements by kind with one example each."""
        return "\n".join(f"  {kind:<30} {n:>6}  e.g. {self.examples[kind]['file'].rsplit('/', 1)[-1]} line "
                         f"{self.examples[kind]['line'] + 1}: {self.examples[kind]['detail'][:100]}"
                         for kind, n in self.by_kind.most_common())

    def to_json(self) -> dict[str, Any]:
        return {"total": self.total, "identical": self.identical, "rate": self.rate,
                "by_kind": dict(self.by_kind.most_common()), "examples": self.examples, "by_judge": self.by_judge,
                "told_apart": self.told_apart,
                "wall_s": round(self.wall_s, 2), "differences": self.differences}


def _kind(recorded: dict[str, Any], replayed: ChatResponse, parsed: dict[str, Any]) -> tuple[str, str] | None:
    """(kind, detail) of a disagreement between a recorded judgement and its replay, or None."""
    want = recorded.get("eval_scores") or {}
    if not replayed.ok:
        return "not answered", str(replayed.error)
    if parsed == want:
        return None
    if not parsed:
        return "parse failed", f"recorded {want}, the parser read none"
    if not want:
        return "scored where the record is not", f"recorded none, parsed {parsed}"
    return "other score", f"recorded {want} → parsed {parsed}"


def replay_judgements(runs: Path) -> JudgementReport:
    """Every recorded judgement below ``runs`` answered by the replay judge of its judge and read by the
    project's parser, compared with the recorded scores."""
    t0 = time.monotonic()
    if not Path(runs).is_dir():
        raise DataError(f"--runs {runs}: not a folder of run files")
    try:
        run_files = [rf for rf in find_run_files(runs) if rf.eval_files]
    except PipelineError as e:
        raise DataError(f"--runs {runs}: {e}") from None
    if not run_files:
        raise DataError(f"--runs {runs}: no eval files beside trajectory files below the folder")
    report = JudgementReport()
    for judge in sorted({rf.name.evaluator for rf in run_files}):
        mine = [rf for rf in run_files if rf.name.evaluator == judge]
        backend = ReplayJudge(ModelSpec(raw=f"replay:{runs}#{judge}", backend="replay", model=str(runs), label=judge),
                              run_files=mine)
        before = (report.total, report.identical)
        for rf in mine:
            _compare_file(rf, judge, backend, report)
        report.told_apart += backend.told_apart
        report.by_judge[judge] = {"total": report.total - before[0], "identical": report.identical - before[1]}
    report.wall_s = time.monotonic() - t0
    return report


def _compare_file(rf: RunFile, judge: str, backend: ReplayJudge, report: JudgementReport) -> None:
    trajectories = read_jsonl(rf.path).records
    for t, ef in sorted(rf.eval_files.items()):
        items, requests = [], []
        for n, rec in enumerate(read_jsonl(ef).records):
            i = _line_of(rec, n, ef, len(trajectories))
            for k, rep in enumerate(replicates_of(rec)):
                tag = JudgeTag(t, i, k, trajectories[i].get("case_idx"), trajectory_digest(trajectories[i]),
                               rf.name.agent, rf.name.emulator, episode_digest(trajectories[i]))
                requests.append(ChatRequest(messages=[], replicate=k, tag=tag, role="judge"))
                items.append((i, k, rep))
        for (i, k, rep), resp in zip(items, backend.generate(requests)):
            parsed = read_judgement(t, resp, judge).fields["eval_scores"]
            report.total += 1
            diff = _kind(rep, resp, parsed)
            if diff is None:
                report.identical += 1
                continue
            kind, detail = diff
            report.by_kind[kind] += 1
            item = {"file": str(ef), "line": i, "replicate": k, "kind": kind, "detail": detail}
            report.examples.setdefault(kind, item)
            report.differences.append(item)
