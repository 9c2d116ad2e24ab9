"""Ordinary least squares of safety delta on helpfulness delta (SPEC §7.6 ``delta_by_model``, §12.15).

Same numbers as ``scipy.stats.linregress(x=helpfulness_delta, y=safety_delta)``: slope, intercept, Pearson r,
R² = r², two-sided p-value of the slope (t test with n − 2 degrees of freedom), standard error of the slope.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np


def ols_fit(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    """The fit, or ``{"available": False, "reason": …}`` when there are fewer than 3 points or x is constant."""
    xs = np.asarray(x, dtype=float)
    ys = np.asarray(y, dtype=float)
    if xs.shape != ys.shape:
        raise ValueError("x and y must have the same length")
    keep = ~(np.isnan(xs) | np.isnan(ys))
    xs, ys = xs[keep], ys[keep]
    n = int(xs.size)
    if n < 3:
        return not_available(f"{n} finetuned point(s); a fit needs at least 3", n)
    dx, dy = xs - xs.mean(), ys - ys.mean()
    sxx, syy, sxy = float(dx @ dx), float(dy @ dy), float(dx @ dy)
    if sxx <= 0:
        return not_available("helpfulness deltas are all equal; the slope is undefined", n)
    slope = sxy / sxx
    intercept = float(ys.mean() - slope * xs.mean())
    r = 0.0 if syy <= 0 else max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))
    df = n - 2
    if abs(r) >= 1.0:
        p_value, stderr = 0.0, 0.0
    else:
        from scipy import stats

        t = r * math.sqrt(df / ((1.0 - r) * (1.0 + r)))
        p_value = float(2.0 * stats.t.sf(abs(t), df))
        stderr = math.sqrt((1 - r * r) * syy / sxx / df)
    return {"available": True, "reason": None, "n_points": n, "slope": slope, "intercept": intercept, "r": r,
            "r2": r * r, "p_value": p_value, "stderr": stderr}


def not_available(reason: str, n: int = 0) -> dict[str, Any]:
    return {"available": False, "reason": reason, "n_points": n, "slope": None, "intercept": None, "r": None,
            "r2": None, "p_value": None, "stderr": None}


def fit_deltas(deltas: list[dict[str, Any]]) -> dict[str, Any]:
    """The trade-off fit over delta entries (``helpfulness_delta``, ``safety_delta``) of finetuned points."""
    pts = [(d["helpfulness_delta"], d["safety_delta"]) for d in deltas
           if d.get("helpfulness_delta") is not None and d.get("safety_delta") is not None]
    if not pts:
        return not_available("no finetuned models with a source-model counterpart", 0)
    x, y = zip(*pts)
    return ols_fit(x, y)
