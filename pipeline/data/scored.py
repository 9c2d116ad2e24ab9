"""Scored trajectories: the evaluated run files below some folders read as items, each with its usable score per
metric (SPEC §4: the median over replicates truncated with ``int()``, in 0..3; an optional replicate-agreement
filter). The preference stage pairs them; the analysis compares judges on them, and tracking judges with humans
(``compare_scores``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.jsonl import read_jsonl
from pipeline.data.records import SCORE_KEYS, EvalRecord, TrajectoryRecord
from pipeline.data.runfiles import (RunFile, check_alignment, check_evals_current, find_run_files, is_complete,
                                    validate_records)
from pipeline.errors import ConfigError, DataError

log = logging.getLogger("pipeline.preference")

#: Metric name (CLI) → eval type (eval file suffix).
METRICS: dict[str, str] = {"safe": "agent_safe", "help_ignore_safety": "agent_help_ignore_safety",
                           "help": "agent_help"}

@dataclass
class Item:
    """One scored trajectory."""

    record: dict[str, Any]
    scores: dict[str, int]  # metric → int score (metrics the item has a usable score for)
    model_name: str  # the trajectory file's parent folder
    case_idx: int
    file_name: str
    line: int  # 0-based line in the trajectory file


@dataclass
class LoadStats:
    files: int = 0
    files_incomplete: list[str] = field(default_factory=list)
    trajectories: int = 0
    items: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason → items


def _agrees(scores: list[float], how: str) -> bool:
    counts = Counter(scores).most_common(1)[0][1]
    n = len(scores)
    if how == "exact_match":
        return counts == n
    if how == "majority_agree":
        return counts > n / 2
    if how == "within_1":
        return max(scores) - min(scores) <= 1
    return n >= 2 and counts >= n - 1  # all_but_one_agree


def item_score(ev: EvalRecord, metric: str, consistency: str = "none", where: str = "") -> tuple[int | None, str]:
    """(score, reason): the median over replicates truncated with ``int()``, or (None, why it is unusable)."""
    key = SCORE_KEYS[METRICS[metric]]
    if bad := ev.invalid_scores(key):  # a stored score off the scale: refused, as a median with it would be
        raise DataError(f"{where}: {metric} score {bad[0]!r} outside 0..3 (or not an integer)")
    if consistency != "none":
        valid = [s for s in ev.replicate_scores(key) if s is not None]
        if len(valid) < 2:
            raise DataError(f"{where}: --consistency {consistency} needs multi-replicate evaluations with >= 2 "
                            f"valid scores per item; found {len(valid)}")
        if not _agrees(valid, consistency):
            return None, f"{metric}_inconsistent"
    median = ev.score(key, "median")
    if median is None:
        return None, f"{metric}_missing_score"
    score = int(median)
    if not 0 <= score <= 3:
        raise DataError(f"{where}: {metric} score {median} outside 0..3")
    return score, ""


def load_items(run_dirs: Sequence[str | Path], metrics: Sequence[str], consistency: str = "none",
               cases: set[int] | None = None, judge: str | None = None,
               judge_aliases: Collection[str] = ()) -> tuple[list[Item], LoadStats]:
    """Scored items from every trajectory file below ``run_dirs``, in load order (sorted paths, then lines).

    An item keeps the metrics it has a usable score for; items without a metric-1 score are dropped.
    ``cases`` restricts loading to those case indices (the split). Pairs come from one judge's scores: when the
    folders hold evaluations by several judges (a trajectory judged twice is stored once per judge), ``judge``
    (the evaluator part of the file names, or ``judge_aliases``: e.g. the file-name form of a model spec)
    selects one; without it that is an error.
    """
    stats = LoadStats()
    run_files: list[RunFile] = []
    for d in run_dirs:
        found = find_run_files(d)
        if not found:
            raise DataError(f"{d}: no trajectory files found")
        run_files.extend(found)
    run_files = select_judge(run_files, judge, run_dirs, judge_aliases)
    check_evals_current(run_files)
    run_files.sort(key=lambda rf: str(rf.path))
    eval_types = [METRICS[m] for m in metrics]
    for rf in run_files:
        missing = [et for et in eval_types if et not in rf.eval_files]
        if missing:
            raise DataError(f"{rf.path}: missing eval file for {', '.join(missing)} "
                            f"(expected {rf.name.eval_file(missing[0]).filename()})")
    items: list[Item] = []
    for rf in run_files:
        content = read_jsonl(rf.path, allow_truncated_tail=False)
        trajectories = validate_records(content, TrajectoryRecord)
        stats.files += 1
        if not is_complete(rf, trajectories):
            log.warning("%s: incomplete (%d trajectories): skipped", rf.path, len(trajectories))
            stats.files_incomplete.append(str(rf.path))
            continue
        per_metric: dict[str, list[EvalRecord]] = {}
        for m in metrics:
            evals = validate_records(read_jsonl(rf.eval_files[METRICS[m]], allow_truncated_tail=False), EvalRecord)
            check_alignment(rf, METRICS[m], trajectories, evals)
            per_metric[m] = evals
        for line, (traj, raw) in enumerate(zip(trajectories, content.records)):
            stats.trajectories += 1
            if cases is not None and traj.case_idx not in cases:
                continue
            if traj.failed:
                stats.skipped["failed_trajectory"] += 1
                continue
            scores: dict[str, int] = {}
            for m in metrics:
                where = f"{rf.eval_files[METRICS[m]]}: line {line + 1}"
                score, reason = item_score(per_metric[m][line], m, consistency, where)
                if score is None:
                    stats.skipped[reason] += 1
                    if m == metrics[0]:
                        log.warning("%s: %s: item skipped", where, reason)
                else:
                    scores[m] = score
            if metrics[0] not in scores:
                continue
            items.append(Item(record=raw, scores=scores, model_name=rf.model_dir, case_idx=traj.case_idx,
                              file_name=rf.path.name, line=line))
    stats.items = len(items)
    return items, stats


def select_judge(run_files: list[RunFile], judge: str | None, run_dirs: Sequence[str | Path],
                 aliases: Collection[str] = ()) -> list[RunFile]:
    """The run files of one judge (see ``load_items``)."""
    judges = sorted({rf.name.evaluator for rf in run_files})
    where = ", ".join(str(d) for d in run_dirs)
    if judge is None:
        if len(judges) > 1:
            raise ConfigError(f"--data-dir {where}: evaluations by {len(judges)} judges ({', '.join(judges)}); pairs "
                              "take one judge's scores: choose one with --judge")
        return run_files
    names = {judge, *aliases}
    chosen = [rf for rf in run_files if rf.name.evaluator in names]
    if not chosen:
        raise ConfigError(f"--judge {judge}: no evaluations by that judge under {where} (found: {', '.join(judges)})")
    return chosen


def compare_scores(sa: dict, sb: dict) -> dict[str, Any] | None:
    """Agreement of two raters' 0-3 scores on their shared keys (None when they share none)."""
    from sklearn.metrics import cohen_kappa_score

    shared = sorted(set(sa) & set(sb))
    if not shared:
        return None
    x, y = [sa[k] for k in shared], [sb[k] for k in shared]
    return {"n": len(shared), "only_a": len(sa) - len(shared), "only_b": len(sb) - len(shared),
            "exact_agreement": round(sum(p == q for p, q in zip(x, y)) / len(shared), 4),
            "kappa": round(float(cohen_kappa_score(x, y, labels=[0, 1, 2, 3])), 4),
            "kappa_quadratic": round(float(cohen_kappa_score(x, y, labels=[0, 1, 2, 3], weights="quadratic")), 4),
            "mean_a": round(sum(x) / len(x), 4), "mean_b": round(sum(y) / len(y), 4)}
