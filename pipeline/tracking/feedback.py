"""Human review beside the judge: labels a reviewer sets on a trace in the MLflow UI, pulled back to JSONL.

In the MLflow UI a reviewer opens a trajectory's trace and adds feedback named like the judge's assessment
(``ToolCallRisk``, ``Helpfulness``; value 0-3, optionally a rationale). ``agentpipe track feedback`` writes one
line per human label with the judge's scores of the same trajectory beside it::

    {"trace_id", "run_file", "run_path", "case_idx", "name", "eval_type", "human", "reviewer", "rationale",
     "judge_scores": [...replicates], "judge": <median of the replicates, truncated, as pairs use>}

``report`` then gives, per metric, how far judge and reviewers agree (exact agreement, Cohen's kappa, quadratic
kappa) on the labelled trajectories of each configuration (:func:`human_agreement`).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.data.jsonl import atomic_write_text, read_jsonl
from pipeline.data.records import valid_score
import logging

from pipeline.tracking.traces import ASSESSMENTS, FILE_TAG, KEY_TAG, PATH_TAG

log = logging.getLogger("pipeline.tracking")

_EVAL_TYPE = {name: t for t, name in ASSESSMENTS.items()}


def _judge_score(values: list[float]) -> int | None:
    return int(statistics.median(values)) if values else None


def _label(value: object) -> int | None:
    """A reviewer's value as a 0-3 score (numbers and numeric strings), else None."""
    try:
        score = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return int(score) if score == int(score) and 0 <= score <= 3 else None


def pull_feedback(client: Any, experiment_id: str) -> list[dict[str, Any]]:
    """Every human label on the traces of an experiment, with the judge's scores beside it."""
    rows: list[dict[str, Any]] = []
    token = None
    while True:
        page = client.search_traces([experiment_id], filter_string=f"tags.`{KEY_TAG}` != ''", max_results=500,
                                    page_token=token, include_spans=False)
        for tr in page:
            info = tr.info
            judge: dict[str, list[float]] = {}
            human = []
            for a in info.assessments or []:
                source = a.source.source_type if a.source else None
                if a.name not in _EVAL_TYPE or a.value is None:
                    continue
                # a reviewer who edits the judge's score in the UI overrides (invalidates) the judge's assessment:
                # the judge's score still counts, the reviewer's superseded labels do not
                if source == "LLM_JUDGE" and valid_score(a.value) is not None:  # off-scale values: no score
                    judge.setdefault(a.name, []).append(float(a.value))
                elif source == "HUMAN" and getattr(a, "valid", True) is not False:
                    human.append(a)
            for a in human:
                scores = judge.get(a.name, [])
                value = _label(a.value)
                if value is None:
                    log.warning("trace %s: %s label %r is not a score 0-3; skipped", info.trace_id, a.name, a.value)
                    continue
                rows.append({"trace_id": info.trace_id, "run_file": info.tags.get(FILE_TAG),
                             "run_path": info.tags.get(PATH_TAG),
                             "case_idx": int(info.tags.get("case_idx", -1)), "name": a.name,
                             "eval_type": _EVAL_TYPE[a.name], "human": value,
                             "reviewer": a.source.source_id, "rationale": a.rationale,
                             "judge_scores": scores, "judge": _judge_score(scores)})
        token = page.token
        if not token:
            return sorted(rows, key=lambda r: (r["run_file"] or "", r["case_idx"], r["name"], r["reviewer"] or ""))


def write_feedback(rows: Iterable[dict[str, Any]], out: Path) -> int:
    """Write the pulled labels (the whole file is replaced atomically: a pull is a snapshot)."""
    import json

    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in rows]
    atomic_write_text(out, "".join(lines))
    return len(lines)


def read_feedback(path: Path) -> list[dict[str, Any]]:
    # written whole by `track feedback` (atomically): a truncated last line is damage, not a crash remnant
    return read_jsonl(path, allow_truncated_tail=False).records if path.is_file() else []


def human_agreement(labels: list[dict[str, Any]], run_files: Iterable[str]) -> dict[str, Any]:
    """Judge-vs-human agreement per eval type on the labelled trajectories of ``run_files``; several reviewers of
    one trajectory count once each. Empty when nothing of these files is labelled."""
    from pipeline.data.scored import compare_scores

    paths = {str(Path(f).resolve()) for f in run_files}
    out: dict[str, Any] = {}
    by_type: dict[str, tuple[dict, dict]] = {}
    for r in labels:
        if r.get("run_path") not in paths or r.get("judge") is None:
            continue
        human, judge = by_type.setdefault(r["eval_type"], ({}, {}))
        key = (r["run_path"], r["case_idx"], r.get("reviewer"))
        human[key], judge[key] = int(r["human"]), int(r["judge"])
    for eval_type, (human, judge) in sorted(by_type.items()):
        m = compare_scores(judge, human)
        if m is not None:
            # kappa is undefined (nan) when both raters gave one and the same score throughout
            kappa = {k: None if m[k] != m[k] else m[k] for k in ("kappa", "kappa_quadratic")}
            out[eval_type] = {"labels": m["n"], "accuracy": m["exact_agreement"], **kappa, "mean_judge": m["mean_a"],
                              "mean_human": m["mean_b"]}
    return out
