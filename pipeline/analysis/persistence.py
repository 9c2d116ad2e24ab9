"""Persistence of a first training objective through a second one (SPEC §7.5), exactly as the study.

For source model M, evaluator E and beta β with the configurations S (safe only), H (help only), S→H and H→S
(both stages at β):

    Persist(S, β) = (Safety(S→H) − Safety(H)) / (Safety(S) − Safety(H))
    Persist(H, β) = (Help(H→S) − Help(S)) / (Help(H) − Help(S))

* Test-set per-case scores only. A (M, β, seed, E) unit is used only when all four configurations exist for the
  seed and the six score sets cover identical case sets (else a warning and the unit is skipped).
* Within a key ``E|M`` each Safety(·)/Help(·) is the mean over all pooled (seed, case) pairs: the ratio of
  seed-pooled means, not a mean of per-seed ratios.
* A denominator ≤ 1e-9 gives None (warning).
* ``by_model_and_evaluator["E|M"]``, ``by_model[M]`` (mean over evaluators of the per-key ratios),
  ``by_evaluator[E]`` (mean over models), ``average`` (mean over all keys): averages of ratios; None keys are
  dropped from the averages. (The study also leaves an entry whose estimate is None out of its JSON; here it is
  kept with the value None, so that the reader sees which configuration had no positive denominator.)
* Bootstrap (``n_bootstrap`` > 0): ``random.Random(42)`` (one per beta), each iteration resamples the cases with
  replacement independently per seed within each key (keys, then seeds, in sorted order), recomputes every
  estimate; iterations giving None are skipped, more than half skipped is an error; CI = 2.5/97.5 percentiles.

Keys are never silently merged: two configurations of the same kind for one (E, M, β, seed), e.g. the match
and the cross evaluation of ``help_q32`` and ``help_gpt5m`` models by one evaluator, raise ``DataError``.
"""

from __future__ import annotations

import random
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from pipeline.analysis.rows import ReportRow
from pipeline.errors import DataError

MIN_DENOMINATOR = 1e-9
KINDS = ("S", "H", "SH", "HS")
#: (kind, metric) of the six score sets, in formula order
SCORE_SETS = (("SH", "safety"), ("H", "safety"), ("S", "safety"), ("HS", "helpfulness"), ("S", "helpfulness"),
              ("H", "helpfulness"))


class PersistenceError(DataError):
    """The bootstrap could not produce a confidence interval (more than half of the iterations skipped)."""


def config_kind(training_stages: tuple[tuple[str, str], ...]) -> tuple[str, str] | None:
    """(kind, beta) for the four persistence configurations, None for any other configuration."""
    st = tuple(training_stages)
    if len(st) == 1 and st[0][0] in ("safe", "help"):
        return ("S" if st[0][0] == "safe" else "H", st[0][1])
    if len(st) == 2 and st[0][1] == st[1][1]:
        metrics = (st[0][0], st[1][0])
        if metrics == ("safe", "help"):
            return ("SH", st[0][1])
        if metrics == ("help", "safe"):
            return ("HS", st[0][1])
    return None


@dataclass
class _Unit:
    """One seed of one key: the six score sets restricted to their common cases."""

    seed: int
    cases: list[int]
    arrays: dict[tuple[str, str], np.ndarray]


def _ratio(a: float, b: float, c: float, d: float) -> float | None:
    den = c - d
    if not den > MIN_DENOMINATOR:
        return None
    return (a - b) / den


def _key_estimates(units: list[_Unit], idx: list[np.ndarray] | None = None) -> tuple[float | None, float | None]:
    pooled = {}
    for ss in SCORE_SETS:
        parts = [u.arrays[ss] if idx is None else u.arrays[ss][i] for u, i in zip(units, idx or [None] * len(units))]
        pooled[ss] = float(np.concatenate(parts).mean())
    ps = _ratio(pooled[("SH", "safety")], pooled[("H", "safety")], pooled[("S", "safety")], pooled[("H", "safety")])
    ph = _ratio(pooled[("HS", "helpfulness")], pooled[("S", "helpfulness")], pooled[("H", "helpfulness")],
                pooled[("S", "helpfulness")])
    return ps, ph


def _components(units: list[_Unit]) -> dict[str, float]:
    names = {("SH", "safety"): "safety_SH", ("H", "safety"): "safety_H", ("S", "safety"): "safety_S",
             ("HS", "helpfulness"): "help_HS", ("S", "helpfulness"): "help_S", ("H", "helpfulness"): "help_H"}
    return {names[ss]: float(np.concatenate([u.arrays[ss] for u in units]).mean()) for ss in SCORE_SETS}


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _levels(key_values: dict[tuple[str, str], tuple[float | None, float | None]]) -> dict[tuple, tuple]:
    """Every estimate: ("key", E, M), ("model", M), ("evaluator", E), ("average",) → (persist_s, persist_h)."""
    out: dict[tuple, tuple] = {}
    for (e, m), v in key_values.items():
        out[("key", e, m)] = v
    for level, pos in (("model", 1), ("evaluator", 0)):
        groups: dict[str, list] = defaultdict(list)
        for k, v in key_values.items():
            groups[k[pos]].append(v)
        for name, vals in groups.items():
            out[(level, name)] = (_mean([v[0] for v in vals]), _mean([v[1] for v in vals]))
    vals = list(key_values.values())
    out[("average",)] = (_mean([v[0] for v in vals]), _mean([v[1] for v in vals]))
    return out


def _warn(msg: str) -> None:
    print(f"agentpipe: warning: {msg}", file=sys.stderr)


def collect_units(rows: list[ReportRow], warn: Callable[[str], None] = _warn
                  ) -> tuple[dict[str, dict[tuple[str, str], list[_Unit]]], list[str]]:
    """beta → (evaluator, source model) → usable seed units; and the reasons units were skipped."""
    index: dict[tuple, ReportRow] = {}
    for row in rows:
        if not row.finetuned:
            continue
        kind = config_kind(row.training_stages)
        if kind is None:
            continue
        if row.seed is None:
            raise DataError(f"{row.agent}: finetuned model without a seed; persistence needs test-split reports")
        k = (kind[1], row.evaluator, row.source_model, row.seed, kind[0])
        if k in index:
            other = index[k]
            raise DataError(f"persistence: two {kind[0]} configurations for evaluator {row.evaluator}, model "
                            f"{row.source_model}, beta {kind[1]}, seed {row.seed}: {other.agent} and {row.agent}; "
                            "expected one (do not mix match- and cross-evaluated models; use --setting)")
        index[k] = row
    grouped: dict[tuple, dict[str, ReportRow]] = defaultdict(dict)
    for (beta, e, m, seed, kind), row in index.items():
        grouped[(beta, e, m, seed)][kind] = row
    out: dict[str, dict[tuple[str, str], list[_Unit]]] = defaultdict(lambda: defaultdict(list))
    skipped = []
    for (beta, e, m, seed) in sorted(grouped):
        configs = grouped[(beta, e, m, seed)]
        where = f"evaluator {e}, model {m}, beta {beta}, seed {seed}"
        missing = [k for k in KINDS if k not in configs]
        if missing:
            skipped.append(f"{where}: configuration(s) {', '.join(missing)} missing")
            warn(f"persistence: skipped {skipped[-1]}")
            continue
        sets = {}
        for kind, metric in SCORE_SETS:
            row = configs[kind]
            if row.cases is None or metric not in row.per_case:
                raise DataError(f"{row.path or row.agent}: no per-case scores in the report; persistence needs "
                                "reports written by `agentpipe analyze aggregate`")
            values = row.per_case[metric]
            sets[(kind, metric)] = {int(c): float(v) for c, v in zip(row.cases, values) if not np.isnan(v)}
        case_sets = {frozenset(d) for d in sets.values()}
        if len(case_sets) != 1:
            skipped.append(f"{where}: the six score sets do not cover identical case sets")
            warn(f"persistence: skipped {skipped[-1]}")
            continue
        cases = sorted(next(iter(case_sets)))
        if not cases:
            skipped.append(f"{where}: no scored cases")
            continue
        arrays = {ss: np.array([sets[ss][c] for c in cases], dtype=float) for ss in SCORE_SETS}
        out[beta][(e, m)].append(_Unit(seed=seed, cases=cases, arrays=arrays))
    return out, skipped


def compute_persistence(rows: list[ReportRow], n_bootstrap: int = 0, seed: int = 42, confidence: float = 0.95,
                        warn: Callable[[str], None] = _warn) -> dict[str, Any]:
    """The study's ``persistence_stats.json`` content (plus per-key components and skipped units)."""
    units, skipped = collect_units(rows, warn)
    all_seeds = sorted({u.seed for by_key in units.values() for us in by_key.values() for u in us})
    by_beta: dict[str, Any] = {}
    for beta in sorted(units):
        keys = dict(sorted(units[beta].items()))
        point = {k: _key_estimates(us) for k, us in keys.items()}
        estimates = _levels(point)
        cis = _bootstrap(keys, estimates, n_bootstrap, seed, confidence) if n_bootstrap > 0 else {}
        by_beta[beta] = _render(keys, estimates, cis, warn, beta)
    return {"metadata": {"n_bootstrap": n_bootstrap, "confidence_level": confidence, "seeds": all_seeds,
                         "skipped_units": skipped},
            "persistence": {"by_beta": by_beta}}


def _bootstrap(keys: dict[tuple[str, str], list[_Unit]], estimates: dict[tuple, tuple], n_bootstrap: int,
               seed: int, confidence: float) -> dict[tuple, dict[str, list[float] | None]]:
    rng = random.Random(seed)
    samples: dict[tuple, tuple[list[float], list[float]]] = {lvl: ([], []) for lvl in estimates}
    for _ in range(n_bootstrap):
        key_values = {}
        for k, us in keys.items():
            idx = [np.array(rng.choices(range(len(u.cases)), k=len(u.cases)), dtype=int) for u in us]
            key_values[k] = _key_estimates(us, idx)
        for lvl, (ps, ph) in _levels(key_values).items():
            if ps is not None:
                samples[lvl][0].append(ps)
            if ph is not None:
                samples[lvl][1].append(ph)
    lo, hi = 100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2
    out: dict[tuple, dict[str, list[float] | None]] = {}
    for lvl, (s_vals, h_vals) in samples.items():
        res: dict[str, list[float] | None] = {}
        for name, vals, est in (("s", s_vals, estimates[lvl][0]), ("h", h_vals, estimates[lvl][1])):
            if est is None:
                res[name] = None
                continue
            if n_bootstrap - len(vals) > n_bootstrap / 2:
                raise PersistenceError(
                    f"persistence bootstrap for {'/'.join(map(str, lvl))}: {n_bootstrap - len(vals)} of {n_bootstrap} "
                    f"iterations had a non-positive denominator for Persist({name.upper()}); expected at most half")
            res[name] = [float(np.percentile(vals, lo)), float(np.percentile(vals, hi))]
        out[lvl] = res
    return out


def _entry(est: tuple, ci: dict | None) -> dict[str, Any]:
    e: dict[str, Any] = {"persist_s": est[0], "persist_h": est[1]}
    if ci is not None:
        for name in ("s", "h"):
            bounds = ci.get(name)
            e[f"persist_{name}_ci_lower"] = bounds[0] if bounds else None
            e[f"persist_{name}_ci_upper"] = bounds[1] if bounds else None
    return e


def _render(keys: dict[tuple[str, str], list[_Unit]], estimates: dict[tuple, tuple], cis: dict, warn, beta: str
            ) -> dict[str, Any]:
    out: dict[str, Any] = {"by_model_and_evaluator": {}, "by_model": {}, "by_evaluator": {}, "average": None}
    for lvl, est in estimates.items():
        if est == (None, None):
            warn(f"persistence: beta {beta}, {'/'.join(lvl)}: no positive denominator (both values None)")
        for name, v in zip("SH", est):
            if v is None and est != (None, None):
                warn(f"persistence: beta {beta}, {'/'.join(lvl)}: Persist({name}) denominator not positive (None)")
        entry = _entry(est, cis.get(lvl) if cis else None)
        if lvl[0] == "key":
            _, e, m = lvl
            us = keys[(e, m)]
            entry.update({"seeds": [u.seed for u in us], "n_pairs": sum(len(u.cases) for u in us),
                          "components": _components(us)})
            out["by_model_and_evaluator"][f"{e}|{m}"] = entry
        elif lvl[0] == "model":
            out["by_model"][lvl[1]] = entry
        elif lvl[0] == "evaluator":
            out["by_evaluator"][lvl[1]] = entry
        else:
            out["average"] = entry
    for section in ("by_model_and_evaluator", "by_model", "by_evaluator"):
        out[section] = dict(sorted(out[section].items()))
    return out
