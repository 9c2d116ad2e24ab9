"""How far two judges agree on the trajectories both judged (the study's q32 and gpt5m arms): per metric, the
number of shared trajectories, exact agreement, Cohen's kappa and its quadratic-weighted form (scores 0-3 are
ordinal, so a 2-vs-3 disagreement counts less than 0-vs-3).

A trajectory is the same for both judges when its model folder, case and steps are equal (the study stores the
same trajectories once per judge); scores are the per-trajectory scores pairs use (median over replicates,
truncated), so an unparsed judgement is left out of that metric. Two folders (``judge_agreement``: the released
``raw_data_by_eval/q32`` and ``…/gpt5m``), or the judges inside one runs folder (``agreement_within``: the source
models of ``results/match_eval_results`` are judged by both arms).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

from pipeline.data.scored import compare_scores
from pipeline.errors import DataError

METRICS = ("safe", "help_ignore_safety")


def _scores(folders: Sequence[Path], metric: str, judge: str | None = None) -> dict[tuple[str, int, str], int]:
    from pipeline.data.scored import load_items

    items, _ = load_items(folders, [metric], judge=judge)
    out = {}
    for it in items:
        steps = hashlib.sha256(json.dumps(it.record.get("intermediate_steps"), sort_keys=True).encode()).hexdigest()
        out[(it.model_name, it.case_idx, steps)] = it.scores[metric]
    return out


def judge_agreement(a: str | Path, b: str | Path, metrics: Sequence[str] = METRICS) -> dict[str, Any]:
    """Agreement of the judges of run folders ``a`` and ``b`` per metric (see the module docstring)."""
    result: dict[str, Any] = {"a": str(a), "b": str(b), "metrics": {}}
    for metric in metrics:
        m = compare_scores(_scores([Path(a)], metric), _scores([Path(b)], metric))
        if m is None:
            raise DataError(f"{a} and {b}: no trajectory judged by both for {metric}")
        result["metrics"][metric] = m
    return result


def agreement_within(runs: str | Path, metrics: Sequence[str] = METRICS) -> list[dict[str, Any]]:
    """Per pair of judges found in ``runs``, their agreement on the model folders both judged (only those
    folders are read); empty when one judge judged everything."""
    from pipeline.analysis.names import evaluator_short
    from pipeline.data.runfiles import find_run_files

    judges_of: dict[Path, set[str]] = defaultdict(set)
    for rf in find_run_files(runs):
        judges_of[rf.path.parent].add(rf.name.evaluator)
    out = []
    judges = sorted(set().union(*judges_of.values())) if judges_of else []
    for ja, jb in combinations(judges, 2):
        folders = sorted(f for f, js in judges_of.items() if {ja, jb} <= js)
        if not folders:
            continue
        result: dict[str, Any] = {"a": evaluator_short(ja), "b": evaluator_short(jb), "folders": len(folders),
                                  "metrics": {}}
        for metric in metrics:
            m = compare_scores(_scores(folders, metric, ja), _scores(folders, metric, jb))
            if m is not None:
                result["metrics"][metric] = m
        out.append(result)
    return out


def format_agreement(result: dict[str, Any]) -> str:
    lines = [f"judge agreement: {Path(result['a']).name} vs {Path(result['b']).name}"]
    for metric, m in result["metrics"].items():
        lines.append(f"  {metric}: n={m['n']} exact={m['exact_agreement']:.3f} kappa={m['kappa']:.3f} "
                     f"kappa_quadratic={m['kappa_quadratic']:.3f} mean {m['mean_a']:.3f} vs {m['mean_b']:.3f}")
    return "\n".join(lines)
