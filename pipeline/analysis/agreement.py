"""How far two judges agree on the trajectories both judged (the study's q32 and gpt5m arms): per metric, the
number of shared trajectories, exact agreement, Cohen's kappa and its quadratic-weighted form (scores 0-3 are
ordinal, so a 2-vs-3 disagreement counts less than 0-vs-3).

A trajectory is the same in both folders when its model folder, case and steps are equal (the arms store the
same trajectories once per judge); scores are the per-trajectory scores pairs use (median over replicates,
truncated), so an unparsed judgement is left out of that metric.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import DataError

METRICS = ("safe", "help_ignore_safety")


def _scores(folder: Path, metric: str) -> dict[tuple[str, int, str], int]:
    from pipeline.preference.pairs import load_items

    items, _ = load_items([folder], [metric])
    out = {}
    for it in items:
        steps = hashlib.sha256(json.dumps(it.record.get("intermediate_steps"), sort_keys=True).encode()).hexdigest()
        out[(it.model_name, it.case_idx, steps)] = it.scores[metric]
    return out


def judge_agreement(a: str | Path, b: str | Path, metrics: Sequence[str] = METRICS) -> dict[str, Any]:
    """Agreement of the judges of run folders ``a`` and ``b`` per metric (see the module docstring)."""
    from sklearn.metrics import cohen_kappa_score

    result: dict[str, Any] = {"a": str(a), "b": str(b), "metrics": {}}
    for metric in metrics:
        sa, sb = _scores(Path(a), metric), _scores(Path(b), metric)
        shared = sorted(set(sa) & set(sb))
        if not shared:
            raise DataError(f"{a} and {b}: no trajectory judged by both for {metric}")
        x, y = [sa[k] for k in shared], [sb[k] for k in shared]
        result["metrics"][metric] = {
            "n": len(shared), "only_a": len(sa) - len(shared), "only_b": len(sb) - len(shared),
            "exact_agreement": round(sum(p == q for p, q in zip(x, y)) / len(shared), 4),
            "kappa": round(float(cohen_kappa_score(x, y, labels=[0, 1, 2, 3])), 4),
            "kappa_quadratic": round(float(cohen_kappa_score(x, y, labels=[0, 1, 2, 3], weights="quadratic")), 4),
            "mean_a": round(sum(x) / len(x), 4), "mean_b": round(sum(y) / len(y), 4),
        }
    return result


def format_agreement(result: dict[str, Any]) -> str:
    lines = [f"judge agreement: {Path(result['a']).name} vs {Path(result['b']).name}"]
    for metric, m in result["metrics"].items():
        lines.append(f"  {metric}: n={m['n']} exact={m['exact_agreement']:.3f} kappa={m['kappa']:.3f} "
                     f"kappa_quadratic={m['kappa_quadratic']:.3f} mean {m['mean_a']:.3f} vs {m['mean_b']:.3f}")
    return "\n".join(lines)
