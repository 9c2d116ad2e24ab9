"""Aggregation over rows and deltas vs the source model or the parent stage (SPEC §7.4).

* ``aggregate_scores(rows, group_by)``: unweighted mean over rows (rows = seed × evaluator × … reports) of each
  field, ``<field>_std`` (sample standard deviation, 0 for one row), ``n_models`` (rows), ``n_samples`` (sum of
  per-row valid counts); dimensions not grouped by are None. A row whose field is missing does not count for
  that field (missing is missing, never 0).
* ``compute_deltas(agg, group_by, relative_to)``: ``base`` = the row with no training stages and the same
  non-training dimensions; ``parent`` = the row with the same stages minus the last one.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any, Iterable

from pipeline.analysis.names import model_sort_key
from pipeline.analysis.rows import ReportRow
from pipeline.analysis.stages import stage_label

GROUP_DIMS = ("source_model", "evaluator_model", "emulator_model", "quantization", "last_finetune_type",
              "num_stages", "training_stages", "metric_sequence", "origin", "eval_short", "seed", "model_name")
TRAINING_DIMS = frozenset({"last_finetune_type", "num_stages", "training_stages", "metric_sequence", "origin",
                           "model_name"})
FIELDS = ("helpfulness", "safety")
_METRIC_ORDER = {"help": 0, "safe": 1, "both": 2}


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate_scores(rows: Iterable[ReportRow], group_by: Iterable[str],
                     fields: Iterable[str] = FIELDS) -> list[dict[str, Any]]:
    """Groups of rows with their mean scores (see the module docstring); ``members`` holds the rows."""
    group_by = tuple(group_by)
    fields = tuple(fields)
    unknown = [g for g in group_by if g not in GROUP_DIMS]
    if unknown:
        raise ValueError(f"cannot group by {unknown}; expected some of {', '.join(GROUP_DIMS)}")
    groups: dict[tuple, list[ReportRow]] = defaultdict(list)
    for row in rows:
        dims = row.dims()
        groups[tuple(dims[g] for g in group_by)].append(row)
    out = []
    for key, members in groups.items():
        entry: dict[str, Any] = {d: None for d in GROUP_DIMS}
        entry.update(zip(group_by, key))
        for f in fields:
            values = [getattr(r, f) for r in members if getattr(r, f) is not None]
            entry[f], entry[f"{f}_std"] = _mean_std(values)
        entry["n_models"] = len(members)
        entry["n_samples"] = sum(r.n_samples for r in members)
        if "training_stages" in group_by:
            entry["label"] = stage_label(entry["training_stages"]) if entry["training_stages"] else "base"
        entry["members"] = members
        out.append(entry)
    out.sort(key=entry_sort_key)
    return out


def stages_sort_key(training_stages: tuple | None) -> tuple:
    """Row order of SPEC §7.7: base first, last metric H < S < S&H, fewer stages first, earlier stages, beta."""
    st = tuple(training_stages or ())
    if not st:
        return (0,)
    return (1, _METRIC_ORDER.get(st[-1][0], 9), len(st), tuple(_METRIC_ORDER.get(m, 9) for m, _ in st),
            tuple(float(b) if _is_float(b) else 0.0 for _, b in st))


def _is_float(x: str) -> bool:
    try:
        float(x)
        return True
    except ValueError:
        return False


def entry_sort_key(e: dict[str, Any]) -> tuple:
    src = e.get("source_model")
    return (model_sort_key(src) if src else (), str(e.get("evaluator_model") or ""), str(e.get("quantization") or ""),
            stages_sort_key(e.get("training_stages")), str(e.get("origin") or ""))


def compute_deltas(agg: list[dict[str, Any]], group_by: Iterable[str], relative_to: str = "base",
                   fields: Iterable[str] = FIELDS) -> list[dict[str, Any]]:
    """Deltas of every finetuned group vs its base (source) or parent group; unmatched groups are left out."""
    if relative_to not in ("base", "parent"):
        raise ValueError(f"relative_to '{relative_to}': expected base or parent")
    fields = tuple(fields)
    other = [g for g in group_by if g not in TRAINING_DIMS]
    index: dict[tuple, dict[str, Any]] = {}
    for e in agg:
        index[(tuple(e[g] for g in other), tuple(e.get("training_stages") or ()))] = e
    out = []
    for e in agg:
        stages = tuple(e.get("training_stages") or ())
        if not stages:
            continue
        ref_stages = () if relative_to == "base" else stages[:-1]
        ref = index.get((tuple(e[g] for g in other), ref_stages))
        if ref is None:
            continue
        d = dict(e)
        d["reference_stages"] = ref_stages
        for f in fields:
            d[f"base_{f}"] = ref[f]
            d[f"{f}_delta"] = None if e[f] is None or ref[f] is None else e[f] - ref[f]
        d["reference"] = ref
        out.append(d)
    return out
