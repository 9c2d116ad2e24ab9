"""``agentpipe report``: the unified report of each run configuration (SPEC §7.2), plus what evaluation needs.

The analysis module builds the study's report (per-case median over replicates, per-metric statistics,
replicate agreement). This adds an ``evaluation`` block per metric: the per-case *mean* over replicates
(the median stays in ``per_case``, for pair building), the count of judgements by status (ok, parse_failed,
repaired, rerun, error, skipped, invalid_score: a stored score off the 0-3 scale), of failed judgements and of
cases without a score, and the judges' tokens and cost. Means are over valid scores only. With a
tracking URI configured, each report is also logged as an MLflow run in the ``evaluation`` experiment.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, model_validator

from pipeline.data.reports import METRIC_NAMES, build_report, collect_config_scores, write_reports
from pipeline.data.jsonl import atomic_write_text, read_jsonl
from pipeline.data.naming import parse_run_filename
from pipeline.data.locks import writer_lock
from pipeline.data.manifest import read_manifest, write_manifest
from pipeline.data.records import SCORE_KEYS, invalid_score, valid_score
from pipeline.errors import DataError
from pipeline.stage import StageConfig, StageResult, begin_output, check_out_not_inputs, content_digest, prior_output

log = logging.getLogger(__name__)
#: metric names in MLflow and model cards, per eval type


@dataclass
class ReportResult:
    paths: list[Path]
    problems: list[str]
    tracked_runs: list[str]
    #: one line per configuration lacking expected cases or with files skipped (``coverage.Gap.describe``)
    partial: list[str] = field(default_factory=list)


#: judgement statuses without a score: a failed call, an unparsable answer, a stored score off the 0-3 scale
FAILED_STATUSES = ("error", "parse_failed", "invalid_score")


def _judgement_status(rep: dict[str, Any], key: str) -> str:
    """A judgement's status; a stored score that is not an integer 0-3 (an older version or another tool wrote
    it) is ``invalid_score`` whatever status was recorded beside it."""
    value = (rep.get("eval_scores") or {}).get(key)
    if invalid_score(value):
        return "invalid_score"
    return rep.get("status", "ok" if value is not None else ("error" if "error" in rep else "parse_failed"))


def _evaluation_block(traj_files: list[str], eval_type: str, cases: list[int]) -> dict[str, Any]:
    key = SCORE_KEYS[eval_type]
    means: dict[int, float | None] = {}
    status: Counter = Counter()
    tokens = cost = 0.0
    priced = unpriced = 0
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
                status[_judgement_status(rep, key)] += 1
                usage = rep.get("usage") or {}
                tokens += (usage.get("prompt_tokens") or 0) + (usage.get("completion_tokens") or 0)
                cost += usage.get("cost_usd") or 0.0  # null: a local judge (no cost) or unpriced (counted)
                priced += usage.get("cost_usd") is not None  # a failed call has no cost either
                unpriced += bool(usage.get("unpriced"))
                value = valid_score((rep.get("eval_scores") or {}).get(key))
                if value is not None:
                    scores.append(float(value))
            means[case_ids[rec["eval_id"]]] = statistics.fmean(scores) if scores else None
    judged = sum(status.values())
    failed = sum(status[s] for s in FAILED_STATUSES)
    return {"per_case_mean": [means.get(c) for c in cases], "status_counts": dict(sorted(status.items())),
            "failed_judgements": failed, "cases_without_score": sum(means.get(c) is None for c in cases),
            "parse_failure_rate": failed / judged if judged else None,
            "judge_tokens": int(tokens),
            # unknown (null) when every call was of a model missing from the price table; else the priced calls'
            # sum, with the number of calls it leaves out
            "judge_cost_usd": None if unpriced and not priced else round(cost, 6),
            "judge_unpriced_calls": unpriced}


def build_and_write_reports(runs: Path, out: Path, *, track: bool = True,
                            human_labels: Path | None = None) -> ReportResult:
    """Unified reports for every configuration under ``runs``, written below ``out/<evaluator>/``; with human
    labels (``agentpipe track feedback``) each report also gets ``human_agreement`` per metric."""
    from pipeline.tracking.feedback import human_agreement, read_feedback

    from pipeline.data.coverage import expected_cases, find_gaps

    labels = read_feedback(human_labels) if human_labels is not None else []
    collected = collect_config_scores(runs, warn=False)
    gaps = find_gaps(collected)
    by_key = {(g.model_dir, g.emulator, g.evaluator, g.quantization): g for g in gaps}
    reports = []
    for cfg in collected.configs:
        rep = build_report(cfg)
        gap = by_key.get(cfg.key)
        # what the report does not cover is in the report itself, never only in a log
        rep.content["coverage"] = gap.to_json() if gap else {
            "expected_cases": len(expected_cases(cfg.model_dir, set(collected.universe))), "missing_cases": 0,
            "missing_case_idx": [], "skipped_files": []}
        cases = rep.content["per_case"]["case_idx"]
        rep.content["evaluation"] = {t: _evaluation_block(cfg.files, t, cases) for t in cfg.scores}
        if labels:
            rep.content["human_agreement"] = human_agreement(labels, cfg.files)
        reports.append(rep)
    paths = write_reports(reports, out)
    tracked = []
    if track:
        for rep, path, cfg in zip(reports, paths, collected.configs):
            run_id = _track(rep.content, path, cfg.files)
            if run_id:
                tracked.append(run_id)
    return ReportResult(paths, [f"{p.path}: {p.reason}" for p in collected.problems], tracked,
                        [g.describe() for g in gaps])


def _track(content: dict[str, Any], path: Path, files: list[str]) -> str | None:
    """Log one report as an MLflow evaluation run (journaled beside the report; replayable), with every
    trajectory of its run files as a trace of that run (judgements as assessments)."""
    from pipeline.tracking import Tracker, resolve_tracking_uri

    if resolve_tracking_uri() is None:
        return None
    meta = content["meta"]
    folder = path.with_name(path.name.removesuffix(".json") + ".tracking")
    metrics: dict[str, float] = {}
    for eval_type, name in METRIC_NAMES:
        stats = (content.get(eval_type) or {}).get(SCORE_KEYS[eval_type])
        if stats and stats.get("mean") is not None:
            metrics[f"mean_{name}"] = stats["mean"]
            metrics[f"missing_{name}"] = stats["missing_scores"]
        ev = content.get("evaluation", {}).get(eval_type)
        if ev:
            if ev["parse_failure_rate"] is not None:
                metrics[f"parse_failure_rate_{name}"] = ev["parse_failure_rate"]
            metrics[f"judge_tokens_{name}"] = ev["judge_tokens"]
            if ev["judge_cost_usd"] is not None:  # unknown is not logged as 0
                metrics[f"judge_cost_usd_{name}"] = ev["judge_cost_usd"]
            if ev.get("judge_unpriced_calls"):
                metrics[f"judge_unpriced_calls_{name}"] = ev["judge_unpriced_calls"]
        human = content.get("human_agreement", {}).get(eval_type)
        if human:
            metrics.update({f"human_{k}_{name}": human[k] for k in ("labels", "accuracy", "kappa")
                            if human[k] is not None})
    if "coverage" in content:
        metrics["missing_cases"] = content["coverage"]["missing_cases"]
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
        if files:
            t.log_traces(*files)  # sent together: one bulk write for the configuration's files
        return t.run_id


class ReportConfig(StageConfig):
    """``agentpipe report``: the unified reports of one folder of runs. Its output folder is bound to that
    folder: reports of another ``--runs`` are refused there (they would mix)."""

    stage: ClassVar[str] = "report"
    not_in_fingerprint: ClassVar[frozenset[str]] = frozenset({"out", "no_track", "force", "human_labels"})

    runs: Path | None = Field(default=None, description="folder of model folders (default "
                              "$AGENTPIPE_HOME/trajectories)")
    out: Path | None = Field(default=None, description="report root (default $AGENTPIPE_HOME/reports)")
    no_track: bool = Field(default=False, description="do not log to MLflow")
    human_labels: Path | None = Field(default=None, description="reviewers' labels from `agentpipe track feedback` "
                                      "(default $AGENTPIPE_HOME/feedback/evaluation.jsonl when it exists): adds "
                                      "judge-human agreement to each report")
    force: bool = Field(default=False, description="a report folder of other runs is moved aside as "
                        "<name>.replaced-<time> (default: refuse)")

    @model_validator(mode="after")
    def _defaults(self) -> ReportConfig:
        from pipeline.settings import get_settings

        home = get_settings().home
        self.runs = Path(self.runs or home / "trajectories").resolve()
        self.out = Path(self.out or home / "reports")
        if self.human_labels is None and (home / "feedback" / "evaluation.jsonl").is_file():
            self.human_labels = home / "feedback" / "evaluation.jsonl"
        return self


def report(cfg: ReportConfig) -> StageResult:
    """The ``report`` stage: rebuilt when its runs changed since the last report of the same folder."""
    assert cfg.runs is not None and cfg.out is not None
    if not cfg.runs.is_dir():
        raise DataError(f"--runs {cfg.runs}: not a folder")
    if cfg.human_labels is not None and not cfg.human_labels.is_file():
        raise DataError(f"--human-labels {cfg.human_labels}: file not found")
    check_out_not_inputs(cfg.out, [cfg.runs, cfg.human_labels], cfg.stage)
    if cfg.human_labels is not None:
        from pipeline.tracking.feedback import read_feedback

        read_feedback(cfg.human_labels)  # a bad labels file fails here, before the report folder is claimed
    # labels are an input: new labels rebuild the reports
    inputs = content_digest([cfg.runs, *([cfg.human_labels] if cfg.human_labels else [])])
    if prior_output(cfg.out, cfg.fingerprint(), cfg.stage, force=cfg.force, inputs=inputs, derived=True):
        m = read_manifest(cfg.out) or {}
        return StageResult(stage=cfg.stage, status="skipped", outputs={"reports": m.get("counts", {}).get("paths", [])},
                           counts={"reports": m.get("counts", {}).get("reports", 0),
                                   "partial_configurations": m.get("counts", {}).get("partial_configurations", 0)},
                           problems=[], mlflow_runs=[])
    with writer_lock(cfg.out, wait=False, what="report folder"):
        begin_output(cfg.out, cfg.stage, cfg.fingerprint())
        res = build_and_write_reports(cfg.runs, cfg.out, track=not cfg.no_track, human_labels=cfg.human_labels)
        paths = [str(p) for p in res.paths]
        write_manifest(cfg.out, stage=cfg.stage, config=cfg.fingerprint(), inputs_digest=inputs,
                       counts={"reports": len(paths), "skipped_files": len(res.problems), "paths": paths,
                               "partial_configurations": len(res.partial)})
    return StageResult(stage=cfg.stage, status="complete", outputs={"reports": paths},
                       counts={"reports": len(paths), "skipped_files": len(res.problems),
                               "partial_configurations": len(res.partial)}, problems=res.problems,
                       partial=res.partial, mlflow_runs=res.tracked_runs)


def add_report_parser(sub: Any) -> None:
    from pipeline.cli_args import add_config_arguments

    p = sub.add_parser("report", help="unified reports of evaluated runs (and MLflow evaluation runs)",
                       description="Write the unified report of every configuration under --runs (a folder of "
                       "model folders) to --out/<evaluator>/…_unified_report.json; log each as an MLflow run when "
                       "a tracking URI is configured. A rerun rebuilds them when the runs changed, else skips.")
    add_config_arguments(p, ReportConfig)
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: Any):  # noqa: ANN202 - returns a StageResult
    from pipeline.cli_args import config_from_args

    cfg = config_from_args(ReportConfig, args)
    res = report(cfg)
    if res.status == "skipped":
        print(f"report: {res.counts['reports']} unified reports up to date (same runs, unchanged) → {cfg.out}")
        if res.counts["partial_configurations"]:
            print(f"report: {res.counts['partial_configurations']} configurations lack cases (see their reports' "
                  "coverage)")
        return res
    for p in res.problems:
        print(f"report: skipped {p}")
    for p in res.partial:
        print(f"report: partial: {p}")
    for p in res.outputs["reports"]:
        print(f"report: {p}")
        for line in _score_summary(Path(p)):
            print(f"report:   {line}")
    print(f"report: {res.counts['reports']} unified reports, {len(res.problems)} files skipped"
          + (f", {len(res.partial)} configurations lack cases (counted in their reports' coverage)"
             if res.partial else "")
          + (f", {len(res.mlflow_runs)} MLflow runs" if res.mlflow_runs else ""))
    return res


def _score_summary(path: Path) -> list[str]:
    """Per metric of a written report: its mean, over how many valid scores, and how many judgements failed."""
    content = json.loads(path.read_text())
    lines = []
    for eval_type, name in METRIC_NAMES:
        stats = (content.get(eval_type) or {}).get(SCORE_KEYS[eval_type])
        if not stats:
            continue
        ev = content.get("evaluation", {}).get(eval_type) or {}
        mean = "none" if stats["mean"] is None else f"{stats['mean']:.3f}"
        lines.append(f"{name}: mean {mean} over {stats['valid_scores']} valid scores, "
                     f"{ev.get('failed_judgements', 0)} judgements failed")
    return lines
