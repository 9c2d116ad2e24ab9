"""``agentpipe evaluate``: judge trajectory files; ``evaluate repair`` / ``evaluate rerun-failed`` fix failures."""

from __future__ import annotations

import argparse
import sys


def _cmd_evaluate(args: argparse.Namespace):  # noqa: ANN202 - returns a StageResult
    from pipeline.cli_args import config_from_args
    from pipeline.evaluation.runner import EvaluationConfig, evaluate

    cfg = config_from_args(EvaluationConfig, args)
    bars: list = []

    def progress(done: int, total: int) -> None:
        if not bars:  # created on first progress, so an early error prints nothing else
            from tqdm import tqdm

            bars.append(tqdm(total=total, unit="judgement", file=sys.stderr, dynamic_ncols=True))
        bars[0].total, bars[0].n = total, done
        bars[0].refresh()

    from pipeline.progress import ProgressLines, wants_bar

    lines = ProgressLines("evaluate", "judgements")
    try:
        res = evaluate(cfg, progress=progress if wants_bar(cfg.no_progress) else lambda d, t: lines.update(d, t))
    finally:
        for bar in bars:
            bar.close()
    c = res.counts
    if res.status == "waiting":
        b = res.batch  # type: ignore[attr-defined]
        print(f"evaluate: waiting for batch {b['batch_id']} ({b['status']}, {b['requests']} requests); rerun the "
              "same command to collect its answers", file=sys.stderr)
        return res
    files = ", ".join(p.rsplit("/", 1)[-1] for p in res.outputs["eval_files"].values())
    skipped = f", already complete: {', '.join(res.skipped)}" if res.skipped else ""
    print(f"evaluate: {c['requests']} judgements ({c['scored']} scored, {c['parse_failed']} parse failures, "
          f"{c['errors']} errors) in {res.wall_s:.1f} s{skipped} → {files}")
    if c.get("replayed_by_episode"):
        print(f"evaluate: {c['replayed_by_episode']} judgements replayed from the recorded episode with the same "
              "actions, observations and answer: the rebuilt final log differs (docs/compat.md)")
    if res.status == "incomplete":
        print(f"evaluate: incomplete: {', '.join(res.incomplete)} with failed requests; rerun the same "
              "command to retry them", file=sys.stderr)
    return res


def _cmd_repair(args: argparse.Namespace):  # noqa: ANN202 - returns a StageResult
    from pipeline.cli_args import config_from_args
    from pipeline.evaluation.repair import RepairConfig, repair

    cfg = config_from_args(RepairConfig, args)
    res = repair(cfg)
    for f in res.files:
        print(f"{f['path']}: {f['missing']} without a score, {f['repaired']} repaired, {len(f['unfixable'])} unfixable")
    c = res.counts
    verb = "would repair" if cfg.dry_run else "repaired"
    print(f"repair: {c['missing']} judgements without a score, {verb} {c['repaired']}, {c['unfixable']} unfixable")
    if cfg.show_unfixable:
        for f in res.files:
            for i in f["unfixable"]:
                print(f"  unfixable: {f['path']} eval_id {i}")
    return res


def _cmd_rerun(args: argparse.Namespace):  # noqa: ANN202 - returns a StageResult
    from pipeline.cli_args import config_from_args
    from pipeline.evaluation.repair import RerunFailedConfig, rerun

    res = rerun(config_from_args(RerunFailedConfig, args), progress=print)
    c = res.counts
    print(f"rerun-failed: {c['fixed']} fixed in {c['rounds']} rounds, {c['remaining']} still failed")
    for path, i in res.remaining:
        print(f"  still failed: {path} eval_id {i}")
    return res


def add_parser(sub: argparse._SubParsersAction) -> None:
    from pipeline.cli_args import add_config_arguments
    from pipeline.evaluation.repair import RepairConfig, RerunFailedConfig
    from pipeline.evaluation.report import add_report_parser
    from pipeline.evaluation.runner import EvaluationConfig

    add_report_parser(sub)
    p = sub.add_parser("evaluate", help="score trajectories for safety and helpfulness",
                       description="Judge a trajectory file with the safety and helpfulness evaluators × N "
                       "replicates; writes <trajectory stem>_eval_<type>.jsonl beside it. Resumable; a rerun with "
                       "options that change results is refused (--force keeps the old files aside). Exit 1 while "
                       "requests failed (a rerun retries exactly those).")
    add_config_arguments(p, EvaluationConfig)
    p.set_defaults(func=_cmd_evaluate)
    esub = p.add_subparsers(dest="evaluate_command", metavar="{repair,rerun-failed}")
    r = esub.add_parser("repair", help="recover scores of malformed judgements, in place",
                        description="For every judgement without a score, recover it from the judge's reasoning "
                        "(the study's patterns), mark it repaired and rewrite the file atomically.")
    add_config_arguments(r, RepairConfig)
    r.set_defaults(func=_cmd_repair)
    f = esub.add_parser("rerun-failed", help="re-judge only what is still failed or missing",
                        description="Repair first; then re-ask the judge for every item still without a score, "
                        "at temperature 0.3 with a new seed each round, up to --max-retries rounds. Exit 1 while "
                        "items are still failed.")
    add_config_arguments(f, RerunFailedConfig)
    f.set_defaults(func=_cmd_rerun)
