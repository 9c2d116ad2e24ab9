"""Pareto frontier of (helpfulness, safety) points, with bootstrap confidence intervals over test cases.

(The study computes no frontier; this is new.) A point is one (source model, quantization, training stages)
configuration, its scores the unweighted mean over its rows (seeds, and evaluators for the pooled arm). A
point is on the frontier when no other point is at least as good on both axes and better on one (both axes
are maximised; identical points are both on it).

Bootstrap: every replicate resamples the case indices of each distinct case set (a seed's test split, or all
cases) with replacement, the same draw for every row sharing that case set (a paired bootstrap, so points
evaluated on the same cases are compared on the same resample); a row's resampled score is the mean of its
valid scores on the drawn cases, a point's the mean over its rows. Reported per point: percentile CIs of both
scores and the fraction of replicates in which the point is on the frontier.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.analysis.aggregate import aggregate_scores

GROUP_BY = ("source_model", "quantization", "training_stages")


def non_dominated(helpfulness: np.ndarray, safety: np.ndarray) -> np.ndarray:
    """Boolean mask of the non-dominated points (maximising both); works on the last axis of (…, P) arrays.
    NaN points are never on the frontier and never dominate."""
    h = np.asarray(helpfulness, dtype=float)
    s = np.asarray(safety, dtype=float)
    valid = ~(np.isnan(h) | np.isnan(s))
    hj, hi = h[..., :, None], h[..., None, :]
    sj, si = s[..., :, None], s[..., None, :]
    dominates = (hj >= hi) & (sj >= si) & ((hj > hi) | (sj > si)) & valid[..., :, None]
    return valid & ~dominates.any(axis=-2)


def model_name(entry: dict[str, Any], show_quant: bool) -> str:
    """The source model, with its quantization when the model appears with several."""
    name = entry["source_model"]
    if show_quant:
        name += f" ({entry.get('quantization') or 'none'})"
    return name


def point_name(entry: dict[str, Any], show_quant: bool) -> str:
    name = model_name(entry, show_quant)
    return name if entry["label"] == "base" else f"{name} {entry['label']}"


def frontier_points(rows: list, n_bootstrap: int = 1000, seed: int = 42,
                    confidence: float = 0.95) -> dict[str, Any]:
    """Points, frontier members and the position of the ``both`` configurations for a set of rows."""
    agg = [e for e in aggregate_scores(rows, GROUP_BY) if e["helpfulness"] is not None and e["safety"] is not None]
    quants: dict[str, set] = {}
    for e in agg:
        quants.setdefault(e["source_model"], set()).add(e["quantization"])
    h = np.array([e["helpfulness"] for e in agg], dtype=float)
    s = np.array([e["safety"] for e in agg], dtype=float)
    on = non_dominated(h, s) if agg else np.zeros(0, dtype=bool)
    boot = bootstrap_points(agg, n_bootstrap, seed, confidence) if n_bootstrap > 0 and agg else None
    points = []
    for i, e in enumerate(agg):
        show_quant = len(quants[e["source_model"]]) > 1
        p = {"name": point_name(e, show_quant), "model": model_name(e, show_quant), "source_model": e["source_model"],
             "quantization": e["quantization"], "label": e["label"],
             "training_stages": [list(t) for t in e["training_stages"]],
             "helpfulness": float(h[i]), "safety": float(s[i]), "n_rows": e["n_models"], "on_frontier": bool(on[i])}
        if boot is not None:
            p.update(boot[i])
        points.append(p)
    members = sorted((p for p in points if p["on_frontier"]), key=lambda p: (p["helpfulness"], -p["safety"]))
    both = []
    for i, p in enumerate(points):
        if any(m == "both" for m, _ in p["training_stages"]):
            dominated_by = [q["name"] for j, q in enumerate(points) if j != i
                            and q["helpfulness"] >= p["helpfulness"] and q["safety"] >= p["safety"]
                            and (q["helpfulness"] > p["helpfulness"] or q["safety"] > p["safety"])]
            both.append({"name": p["name"], "status": "on" if p["on_frontier"] else "inside",
                         "dominated_by": dominated_by, "frontier_probability": p.get("frontier_probability")})
    return {"n_points": len(points), "n_bootstrap": n_bootstrap if boot is not None else 0,
            "confidence_level": confidence, "members": [m["name"] for m in members], "points": points,
            "both_configs": both}


def bootstrap_points(agg: list[dict[str, Any]], n_bootstrap: int, seed: int = 42,
                     confidence: float = 0.95) -> list[dict[str, Any]] | None:
    """Per point: ``helpfulness_ci``, ``safety_ci`` and ``frontier_probability`` (None where a row of the point
    has no per-case scores, e.g. a report written by the study)."""
    rng = np.random.default_rng(seed)
    draws: dict[tuple, np.ndarray] = {}
    boot_h = np.full((n_bootstrap, len(agg)), np.nan)
    boot_s = np.full((n_bootstrap, len(agg)), np.nan)
    ok = np.ones(len(agg), dtype=bool)
    for i, e in enumerate(agg):
        hs, ss = [], []
        for row in e["members"]:
            if row.cases is None or "safety" not in row.per_case or "helpfulness" not in row.per_case:
                ok[i] = False
                break
            key = tuple(row.cases.tolist())
            if key not in draws:
                n = len(key)
                draws[key] = rng.integers(0, n, size=(n_bootstrap, n)) if n else np.zeros((n_bootstrap, 0), int)
            idx = draws[key]
            with np.errstate(invalid="ignore"), _quiet():
                hs.append(np.nanmean(row.per_case["helpfulness"][idx], axis=1))
                ss.append(np.nanmean(row.per_case["safety"][idx], axis=1))
        if ok[i]:
            with _quiet():
                boot_h[:, i] = np.nanmean(np.vstack(hs), axis=0)
                boot_s[:, i] = np.nanmean(np.vstack(ss), axis=0)
    prob = non_dominated(boot_h, boot_s).mean(axis=0)
    lo, hi = 100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2
    out = []
    for i in range(len(agg)):
        if not ok[i]:
            out.append({"helpfulness_ci": None, "safety_ci": None, "frontier_probability": None})
            continue
        out.append({"helpfulness_ci": [float(np.nanpercentile(boot_h[:, i], lo)),
                                       float(np.nanpercentile(boot_h[:, i], hi))],
                    "safety_ci": [float(np.nanpercentile(boot_s[:, i], lo)), float(np.nanpercentile(boot_s[:, i], hi))],
                    "frontier_probability": float(prob[i])})
    return out


class _quiet:
    """Silence numpy's "mean of empty slice" warnings (all-missing resamples are NaN, as intended)."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", category=RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)
