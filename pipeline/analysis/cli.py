"""``agentpipe analyze``: aggregate run folders into unified reports, print the results table, run everything.

    agentpipe analyze aggregate --runs DIR --out DIR [--split all|train|test] [--seed N ...] [--strict]
                                [--allow-partial]
    agentpipe analyze table REPORTS... | --runs DIR [--split …] [--seed N ...] [--allow-partial]
                            [--no-sample-sizes] [--show-consistency] [--no-color]
    agentpipe analyze all --runs DIR --out DIR [--split auto|test|all] [--seed N ...] [--n-bootstrap 1000]
                          [--setting match|cross] [--formats png pdf] [--allow-partial]

Partial data (a configuration lacking expected cases, an invalid file) is refused in one line naming the missing
cases per model unless --allow-partial is given (``pipeline.data.coverage``).

Nothing heavy is imported at module level (matplotlib, scipy, numpy load inside the commands).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.errors import ConfigError


def _cmd_aggregate(args: argparse.Namespace):  # noqa: ANN202 - returns a StageResult
    from pipeline.analysis.aggregate_stage import AggregateConfig, aggregate_stage
    from pipeline.cli_args import config_from_args

    cfg = config_from_args(AggregateConfig, args)
    res = aggregate_stage(cfg)
    if res.status == "skipped":
        print(f"analyze aggregate: {res.counts.get('reports', 0)} unified reports up to date (same configuration, "
              f"runs unchanged) → {cfg.out}")
        return res
    print(f"analyze aggregate: {res.counts['reports']} unified reports ({cfg.split} split"
          + (f", seeds {', '.join(map(str, res.seeds))}" if res.seeds else "") + f") from "
          f"{res.counts['files_processed']} trajectory files in {cfg.runs} → {cfg.out}")
    if res.skipped_files:
        print(f"  {len(res.skipped_files)} file(s) skipped (incomplete or invalid; see aggregate_summary.json)")
    if res.skipped_configs:
        print(f"  {len(res.skipped_configs)} configuration(s) left out (see aggregate_summary.json)")
    if res.partial:
        print(f"  partial data (--allow-partial): {len(res.partial)} configuration(s) lack cases or had files "
              "skipped (see aggregate_summary.json)")
    return res


def _cmd_table(args: argparse.Namespace) -> int:
    from pipeline.analysis.rows import load_reports, row_from_content
    from pipeline.analysis.tables import format_results_table

    if bool(args.paths) == bool(args.runs):
        raise ConfigError("give report files/folders or --runs DIR (not both)")
    if args.runs:
        from pipeline.analysis.partition import partition
        from pipeline.data.reports import collect_config_scores

        split = args.split or ("test" if args.seed else "all")
        if split == "all" and args.seed:
            raise ConfigError("--seed selects a seed's train or test cases; expected --split train or --split test")
        from pipeline.data.coverage import require_complete

        collected = collect_config_scores(args.runs, warn=args.allow_partial)
        for g in require_complete(collected, allow_partial=args.allow_partial, where=f"--runs {args.runs}"):
            print(f"agentpipe: warning: partial data: {g.describe()}", file=sys.stderr)
        rows = [row_from_content(r.content, r.filename) for r in partition(collected.configs, split, args.seed).reports]
    else:
        rows = load_reports(args.paths)
    color = not args.no_color and sys.stdout.isatty()
    print(format_results_table(rows, sample_sizes=not args.no_sample_sizes, consistency=args.show_consistency,
                               color=color))
    return 0


def _cmd_agreement(args: argparse.Namespace) -> int:
    from pipeline.analysis.agreement import format_agreement, judge_agreement

    for d in (args.a, args.b):
        if not d.is_dir():
            raise ConfigError(f"{d}: not a folder of run files")
    result = judge_agreement(args.a, args.b, [m.strip() for m in args.metrics.split(",") if m.strip()])
    print(format_agreement(result))
    if args.out:
        from pipeline.data.jsonl import atomic_write_json

        atomic_write_json(args.out, result)
    return 0


def _cmd_all(args: argparse.Namespace):  # noqa: ANN202 - returns a StageResult
    from pipeline.analysis.run import AnalyzeConfig, analyze
    from pipeline.cli_args import config_from_args

    cfg = config_from_args(AnalyzeConfig, args)
    result, res = analyze(cfg)
    if res is None:
        print(f"analyze all: up to date (same configuration, runs unchanged) → {cfg.out}")
        return result
    s = res.summary
    print(f"analyze all: {s['counts']['rows_analysed']} reports analysed ({s['split']} split, setting "
          f"{s['setting']}) → {res.out}")
    for arm, a in s["arms"].items():
        fit = (f"R²={a['r2']:.3f} slope={a['slope']:.3f} p={a['p_value']:.2g} n={a['n_points']}"
               if a["fit"]["available"] else f"fit n/a ({a['fit']['reason']})")
        pers = a["persistence"]
        if pers["available"]:
            parts = []
            for beta, lvl in pers["by_beta"].items():
                avg = lvl.get("average") or {}
                ps, ph = avg.get("persist_s"), avg.get("persist_h")
                s_txt = "–" if ps is None else f"{ps:.2f}"
                h_txt = "–" if ph is None else f"{ph:.2f}"
                parts.append(f"β={beta}: S {s_txt}, H {h_txt}")
            pers_txt = "persistence " + "; ".join(parts)
        else:
            pers_txt = "persistence n/a"
        print(f"  {arm}: {fit}; {pers_txt}; frontier: {', '.join(a['frontier']['members'])}")
    if s.get("partial_models"):
        print(f"  partial data (--allow-partial): {len(s['partial_configurations'])} configuration(s) of "
              f"{', '.join(s['partial_models'])} lack cases (see summary.json)")
    print(f"  {len(res.plots)} plot files in {res.out / 'plots'}, {len(res.tables)} table files in "
          f"{res.out / 'tables'}, summary {res.summary_path}")
    run_id = None if cfg.no_track else _track(res)
    if run_id:
        print(f"  MLflow analysis run {run_id}")
    result.outputs["mlflow_run"] = run_id
    return result


def _track(res) -> str | None:  # noqa: ANN001 - AnalysisResult, imported lazily
    """Log the summary figures, plots and tables as an MLflow run of the ``analysis`` experiment."""
    from pipeline.tracking import Tracker, resolve_tracking_uri

    if resolve_tracking_uri() is None:
        return None
    with Tracker.open(res.out / "tracking", experiment="analysis", run_name=_run_name(res.out)) as t:
        partial = res.summary.get("partial_models") or []
        t.log_params({"split": res.summary["split"], "setting": res.summary["setting"],
                      "reports": res.summary["counts"]["rows_analysed"], "partial_models": ",".join(partial) or "none"})
        t.set_tags({"partial_data": "true" if partial else "false", "setting": res.summary["setting"]})
        t.log_metrics(res.metrics())
        t.log_artifact(res.summary_path, "analysis")
        for p in res.plots:
            t.log_artifact(p, "plots")
        for p in res.tables:
            t.log_artifact(p, "tables")
        return t.run_id


def _run_name(out: Path) -> str:
    """The analysis folder's name; a per-setting folder (``<name>/match``, ``<name>/cross``, see
    ``pipeline.analysis.run.setting_outputs``) is ``<name>/match``: the two settings' runs, each with its own
    figures, plots and tables, are told apart by name and by their ``setting`` tag."""
    from pipeline.analysis.run import SETTINGS

    return f"{out.parent.name}/{out.name}" if out.name in SETTINGS else out.name


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed '{text}': expected a non-negative integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"seed '{text}': expected a non-negative integer")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from pipeline.analysis.aggregate_stage import AggregateConfig
    from pipeline.analysis.run import AnalyzeConfig
    from pipeline.cli_args import add_config_arguments

    p = subparsers.add_parser("analyze", help="unified reports, trade-off fit, Pareto frontier, persistence, plots, "
                              "tables", description="Analyse evaluated runs (SPEC §7): a --runs folder holds model "
                              "folders of trajectory and eval files, as the study's results/match_eval_results.")
    sub = p.add_subparsers(dest="analyze_command", required=True, metavar="{aggregate,table,agreement,all}")

    a = sub.add_parser("aggregate", help="unified reports from run folders (optionally a seed's train/test cases)",
                       description="Write one unified report per (model folder, emulator, evaluator, quantization) "
                       "to OUT/<evaluator>/. With --split train|test, finetuned folders are restricted to the cases "
                       "of their own _s<seed>, and source folders are reported once per seed as <folder>_s<seed> "
                       "(seeds of their finetuned counterparts, or every --seed given).")
    add_config_arguments(a, AggregateConfig)
    a.set_defaults(func=_cmd_aggregate)

    t = sub.add_parser("table", help="print the results table (SPEC §7.8)",
                       description="Print Agent | Type | Dataset | Emu | Eval | Help(Ignore) | Safety | Seed for "
                       "unified reports (files or folders), or for run folders aggregated on the fly (--runs).")
    t.add_argument("paths", nargs="*", type=Path, help="report files or folders")
    t.add_argument("--runs", type=Path, metavar="DIR", help="aggregate this folder of model folders instead")
    t.add_argument("--split", choices=["all", "train", "test"], help="with --runs: cases to keep")
    t.add_argument("--seed", type=_seed, action="append", help="with --runs: split seed(s)")
    t.add_argument("--allow-partial", action="store_true", help="with --runs: show what is there when "
                   "configurations lack expected cases or files are invalid (default: refuse partial data)")
    t.add_argument("--no-sample-sizes", action="store_true", help="hide (n=N)")
    t.add_argument("--show-consistency", action="store_true", help="replicate agreement exact/all-but-one/within-1 %%")
    t.add_argument("--no-color", action="store_true", help="no ANSI bold for source rows")
    t.set_defaults(func=_cmd_table)

    ag = sub.add_parser("agreement", help="how far two judges agree on the trajectories both judged",
                        description="Per metric: shared trajectories, exact agreement, Cohen's kappa and its "
                        "quadratic-weighted form, e.g. the study's arms: --a …/raw_data_by_eval/q32 --b "
                        "…/raw_data_by_eval/gpt5m.")
    ag.add_argument("--a", type=Path, required=True, metavar="DIR", help="run folder judged by one judge")
    ag.add_argument("--b", type=Path, required=True, metavar="DIR", help="the same trajectories judged by another")
    ag.add_argument("--metrics", default="safe,help_ignore_safety", help="comma list (default: both paper metrics)")
    ag.add_argument("--out", type=Path, metavar="FILE", help="also write the figures as JSON")
    ag.set_defaults(func=_cmd_agreement)

    al = sub.add_parser("all", help="reports, fit, frontier, persistence, plots, tables and summary.json",
                        description="Everything in one command: OUT/reports/{all,test}/, OUT/plots/ (PNG+PDF), "
                        "OUT/tables/ (LaTeX+Markdown), OUT/persistence_stats.json and OUT/summary.json with, per "
                        "evaluator arm and pooled, r2, r, slope, intercept, p_value, n_points, persistence and "
                        "the frontier members. Works on source models only (fit and persistence then not available). "
                        "Reads only what it builds from --runs; a rerun skips when nothing changed.")
    add_config_arguments(al, AnalyzeConfig)
    al.set_defaults(func=_cmd_all)
