"""``agentpipe report``: the unified report of each run configuration (SPEC §7.2), plus what evaluation needs.

The analysis module builds the study's report (per-case median over replicates, per-metric statistics,
replicate agreement). This adds an ``evaluation`` block per metric: the per-case *mean* over replicates
(the median stays in ``per_case``, for pair building), the count of judgements by status (ok, parse_failed,
repaired, rerun, error, skipped) and of cases without a score, and the judges' tokens and cost. With a
tracking URI configured, each report is also logged as an MLflow run in the ``evaluation`` experiment.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.analysis.reports import build_report, collect_config_scores, write_reports
from pipeline.data.jsonl import atomic_write_text, read_jsonl
from pipeline.data.naming import parse_run_filename
from pipeline.data.records import SCORE_KEYS


@dataclass
class ReportResult:
    paths: list[Path]
    problems: list[str]
    tracked_runs: list[str]


def _evaluation_block(traj_files: list[str], eval_type: str, cases: list[int]) -> dict[str, Any]:
    key = SCORE_KEYS[eval_type]
    means: dict[int, float | None] = {}
    status: Counter = Counter()
    tokens = cost = 0.0
    for traj in traj_files:
        tpath = Path(traj)
        epath = tpath.with_name(parse_run_filename(tpath.name).eval_file(eval_type).filename())
        if not epath.exists():
            continue
        case_ids = [r.get("case_idx") for r in read_jsonl(tpath).records]
        for rec in read_jsonl(epath).records:
            reps = rec["replicates"] if isinstance(rec.get("replicates"), list) else [rec]
            scores = []
            for rep in reps:
                status[rep.get("status", "ok" if (rep.get("eval_scores") or {}).get(key) is not None
                                else ("error" if "error" in rep else "parse_failed"))] += 1
                usage = rep.get("usage") or {}
                tokens += (usage.get("prompt_tokens") or 0) + (usage.get("completion_tokens") or 0)
                cost += usage.get("cost_usd") or 0.0
                value = (rep.get("eval_scores") or {}).get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    scores.append(float(value))
            means[case_ids[rec["eval_id"]]] = statistics.fmean(scores) if scores else None
    judged = sum(status.values())
    return {"per_case_mean": [means.get(c) for c in cases], "status_counts": dict(sorted(status.items())),
            "cases_without_score": sum(means.get(c) is None for c in cases),
            "parse_failure_rate": (status["parse_failed"] + status["error"]) / judged if judged else None,
            "judge_tokens": int(tokens), "judge_cost_usd": round(cost, 6)}


def build_and_write_reports(runs: Path, out: Path, *, track: bool = True) -> ReportResult:
    """Unified reports for every configuration under ``runs``, written below ``out/<evaluator>/``."""
    collected = collect_config_scores(runs, warn=False)
    reports = []
    for cfg in collected.configs:
        rep = build_report(cfg)
        cases = rep.content["per_case"]["case_idx"]
        rep.content["evaluation"] = {t: _evaluation_block(cfg.files, t, cases) for t in cfg.scores}
        reports.append(rep)
    paths = write_reports(reports, out)
    tracked = []
    if track:
        for rep, path in zip(reports, paths):
            run_id = _track(rep.content, path)
            if run_id:
                tracked.append(run_id)
    return ReportResult(paths, [f"{p.path}: {p.reason}" for p in collected.problems], tracked)


def _track(content: dict[str, Any], path: Path) -> str | None:
    """Log one report as an MLflow evaluation run (journaled beside the report; replayable)."""
    from pipeline.tracking import Tracker, resolve_tracking_uri

    if resolve_tracking_uri() is None:
        return None
    meta = content["meta"]
    folder = path.with_name(path.name.removesuffix(".json") + ".tracking")
    metrics: dict[str, float] = {}
    for eval_type, name in (("agent_safe", "safety"), ("agent_help_ignore_safety", "helpfulness_ignore_safety"),
                            ("agent_help", "helpfulness")):
        stats = (content.get(eval_type) or {}).get(SCORE_KEYS[eval_type])
        if stats and stats.get("mean") is not None:
            metrics[f"mean_{name}"] = stats["mean"]
            metrics[f"missing_{name}"] = stats["missing_scores"]
        ev = content.get("evaluation", {}).get(eval_type)
        if ev:
            if ev["parse_failure_rate"] is not None:
                metrics[f"parse_failure_rate_{name}"] = ev["parse_failure_rate"]
            metrics[f"judge_tokens_{name}"] = ev["judge_tokens"]
            metrics[f"judge_cost_usd_{name}"] = ev["judge_cost_usd"]
    table = io.StringIO()
    per_case = content["per_case"]
    columns = [c for c in ("agent_safe", "agent_help_ignore_safety", "agent_help") if c in per_case]
    writer = csv.writer(table)
    writer.writerow(["case_idx", *columns])
    for i, c in enumerate(per_case["case_idx"]):
        writer.writerow([c, *[per_case[col][i] for col in columns]])
    csv_path = folder / "per_case_scores.csv"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(csv_path, table.getvalue())
    with Tracker.open(folder, experiment="evaluation", run_name=meta["agent"],
                      tags={"agent": meta["agent"], "emulator": meta["emulator"], "evaluator": meta["evaluator"]}) as t:
        if not t.resumed:
            t.log_params({"agent": meta["agent"], "emulator": meta["emulator"], "evaluator": meta["evaluator"],
                          "quantization": meta["quantization"] or "none", "n_cases": meta["n_cases"],
                          "split": meta["split"]})
        t.log_metrics(metrics)
        t.log_artifact(path, "report")
        t.log_artifact(csv_path, "report")
        return t.run_id


def add_report_parser(sub: Any) -> None:
    p = sub.add_parser("report", help="unified reports of evaluated runs (and MLflow evaluation runs)",
                       description="Write the unified report of every configuration under --runs (a folder of "
                       "model folders) to --out/<evaluator>/…_unified_report.json; log each as an MLflow run when "
                       "a tracking URI is configured.")
    p.add_argument("--runs", type=Path, help="folder of model folders (default $AGENTPIPE_HOME/trajectories)")
    p.add_argument("--out", type=Path, help="report root (default $AGENTPIPE_HOME/reports)")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.add_argument("--spec", help="JSON file of these options")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: Any) -> int:
    from pipeline.cli import report_result
    from pipeline.settings import get_settings

    home = get_settings().home
    res = build_and_write_reports(args.runs or home / "trajectories", args.out or home / "reports",
                                  track=not args.no_track)
    for p in res.problems:
        print(f"report: skipped {p}")
    for p in res.paths:
        print(f"report: {p}")
    report_result(reports=[str(p) for p in res.paths], skipped=len(res.problems), mlflow_runs=res.tracked_runs)
    print(f"report: {len(res.paths)} unified reports, {len(res.problems)} files skipped"
          + (f", {len(res.tracked_runs)} MLflow runs" if res.tracked_runs else ""))
    return 0
