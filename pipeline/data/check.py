"""``agentpipe data check``: validate cases, toolkits and run files and count what is there."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.cases import CaseSet
from pipeline.data.jsonl import read_jsonl
from pipeline.data.records import SCORE_KEYS
from pipeline.data.records import TrajectoryRecord
from pipeline.data.runfiles import check_alignment, find_run_files, is_complete, load_evals, validate_records
from pipeline.errors import PipelineError


@dataclass
class RunsSummary:
    """Counts over a folder of run files. Keys of the counters are evaluator names (as in file names)."""

    root: Path
    trajectory_files: int = 0
    eval_files: int = 0
    trajectories: Counter = field(default_factory=Counter)  # evaluator → trajectories
    by_agent: Counter = field(default_factory=Counter)  # (model folder, evaluator) → trajectories
    failed_trajectories: Counter = field(default_factory=Counter)
    evaluations: Counter = field(default_factory=Counter)  # (evaluator, eval type) → records
    without_score: Counter = field(default_factory=Counter)  # (evaluator, eval type) → records lacking a score
    incomplete_files: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def check_runs(root: str | Path) -> RunsSummary:
    """Read every run file below ``root``; problems are collected (one line each), not raised."""
    summary = RunsSummary(root=Path(root))
    try:
        run_files = find_run_files(root)
    except PipelineError as e:
        summary.problems.append(str(e))
        return summary
    for rf in run_files:
        summary.trajectory_files += 1
        content = read_jsonl(rf.path)
        if not content.complete:
            summary.problems.append(f"{rf.path}: line {content.truncated_line} is truncated (interrupted write); "
                                    "expected one complete JSON object per line")
        try:
            trajectories = validate_records(content, TrajectoryRecord)
        except PipelineError as e:
            summary.problems.append(str(e))
            continue
        evaluator = rf.name.evaluator
        summary.trajectories[evaluator] += len(trajectories)
        summary.by_agent[(rf.model_dir, evaluator)] += len(trajectories)
        summary.failed_trajectories[evaluator] += sum(t.failed for t in trajectories)
        try:
            if not is_complete(rf, trajectories):
                summary.incomplete_files.append(rf.path)
        except PipelineError as e:
            summary.problems.append(f"{rf.path}: {e}")
        for eval_type, path in sorted(rf.eval_files.items()):
            summary.eval_files += 1
            try:
                evals = load_evals(path)
                check_alignment(rf, eval_type, trajectories, evals)
            except PipelineError as e:
                summary.problems.append(str(e))
                continue
            key = SCORE_KEYS[eval_type]
            summary.evaluations[(evaluator, eval_type)] += len(evals)
            summary.without_score[(evaluator, eval_type)] += sum(e.score(key) is None for e in evals)
            off_scale = [(i + 1, bad) for i, e in enumerate(evals) for bad in e.invalid_scores(key)]
            if off_scale:  # e.g. written by an older version or another tool: read as parse failures
                lines = ", ".join(str(n) for n, _ in off_scale[:5]) + (", …" if len(off_scale) > 5 else "")
                summary.problems.append(f"{path}: {len(off_scale)} stored {key} scores not an integer 0-3 (lines "
                                        f"{lines}; e.g. {off_scale[0][1]!r}): read as parse failures")
    return summary


def format_case_set(cs: CaseSet) -> str:
    return (f"cases: {len(cs.cases)} ({cs.cases_path})\n"
            f"toolkits: {len(cs.toolkits)} with {cs.tool_count()} tools ({cs.toolkits_path})")


def format_runs(s: RunsSummary) -> str:
    evaluators = sorted(s.trajectories)
    lines = [f"run files under {s.root}: {s.trajectory_files} trajectory files, {s.eval_files} eval files"]
    for ev in evaluators:
        lines.append(f"evaluator {ev}: {s.trajectories[ev]} trajectories ({s.failed_trajectories[ev]} failed)")
        for eval_type in SCORE_KEYS:
            if (ev, eval_type) in s.evaluations:
                lines.append(f"  {eval_type}: {s.evaluations[(ev, eval_type)]} evaluations, "
                             f"{s.without_score[(ev, eval_type)]} without a score")
    agents = sorted({a for a, _ in s.by_agent})
    if agents:
        width = max(len(a) for a in agents)
        lines.append("trajectories per model folder and evaluator:")
        lines.append("  " + "model".ljust(width) + "".join(f"  {ev:>14}" for ev in evaluators))
        for a in agents:
            lines.append("  " + a.ljust(width) + "".join(f"  {s.by_agent.get((a, ev), 0):>14}" for ev in evaluators))
    if s.incomplete_files:
        lines.append(f"incomplete trajectory files: {len(s.incomplete_files)}")
    return "\n".join(lines)
