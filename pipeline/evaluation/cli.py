"""``agentpipe evaluate``: judge trajectory files; ``evaluate repair`` / ``evaluate rerun-failed`` fix failures."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.errors import ConfigError
    from pipeline.evaluation.runner import EvaluationConfig, run_evaluation
    from pipeline.llm.options import backend_options

    if not args.trajectories or not args.evaluator:
        raise ConfigError("evaluate: --trajectories FILE and --evaluator SPEC are required "
                          "(or use 'evaluate repair' / 'evaluate rerun-failed')")
    cfg = EvaluationConfig(
        trajectories=Path(args.trajectories), evaluator=args.evaluator, metrics=args.metrics,
        replicates=args.replicates, temperature=args.temperature, seed=args.seed,
        max_new_tokens=args.max_new_tokens, compat=args.compat,
        quantization=None if args.quantization in (None, "none") else args.quantization, cache=args.cache,
        force=args.force, chunk_size=args.chunk_size, scoring=args.scoring,
        backend_options=backend_options(args),
    )
    bars: list = []

    def progress(done: int, total: int) -> None:
        if not bars:  # created on first progress, so an early error prints nothing else
            from tqdm import tqdm

            bars.append(tqdm(total=total, unit="judgement", file=sys.stderr, dynamic_ncols=True))
        bars[0].total, bars[0].n = total, done
        bars[0].refresh()

    show = not args.no_progress and sys.stderr.isatty()
    try:
        res = run_evaluation(cfg, progress=progress if show else None, wait=args.wait)
    finally:
        for bar in bars:
            bar.close()
    from pipeline.cli import report_result

    report_result(trajectories=res.trajectory_file, eval_files={t: str(p) for t, p in res.eval_files.items()},
                  scored=res.scored, parse_failed=res.parse_failed, errors=res.errors)
    files = ", ".join(p.name for p in res.eval_files.values())
    skipped = f", already complete: {', '.join(res.skipped)}" if res.skipped else ""
    print(f"evaluate: {res.requests} judgements ({res.scored} scored, {res.parse_failed} parse failures, "
          f"{res.errors} errors) in {res.wall_s:.1f} s{skipped} → {files}")
    return 0


def _cmd_repair(args: argparse.Namespace) -> int:
    from pipeline.evaluation.judges import eval_types_for
    from pipeline.evaluation.repair import eval_files_under, repair_file

    total_missing = total_repaired = 0
    unfixable = []
    for rf, t in eval_files_under(Path(args.data_dir), eval_types_for(args.eval_types), args.model_filter):
        rep = repair_file(rf.eval_files[t], t, dry_run=args.dry_run)
        total_missing += rep.missing
        total_repaired += rep.repaired
        unfixable += [(rep.path, i) for i in rep.unfixable]
        if rep.missing:
            print(f"{rep.path}: {rep.missing} without a score, {rep.repaired} repaired, {len(rep.unfixable)} unfixable")
    verb = "would repair" if args.dry_run else "repaired"
    print(f"repair: {total_missing} judgements without a score, {verb} {total_repaired}, {len(unfixable)} unfixable")
    if args.show_unfixable:
        for path, i in unfixable:
            print(f"  unfixable: {path} eval_id {i}")
    return 0


def _cmd_rerun(args: argparse.Namespace) -> int:
    from pipeline.evaluation.judges import eval_types_for
    from pipeline.evaluation.repair import rerun_failed

    rep = rerun_failed(Path(args.data_dir), eval_types_for(args.eval_types), args.evaluator,
                       temperature=args.temperature, max_rounds=args.max_retries, compat=args.compat,
                       progress=print)
    print(f"rerun-failed: {rep.fixed} fixed in {rep.rounds} rounds, {len(rep.remaining)} still failed")
    for path, i in rep.remaining:
        print(f"  still failed: {path} eval_id {i}")
    return 0 if not rep.remaining else 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    from pipeline.evaluation.report import add_report_parser
    from pipeline.llm.options import add_backend_arguments


    add_report_parser(sub)
    p = sub.add_parser("evaluate", help="score trajectories for safety and helpfulness",
                       description="Judge a trajectory file with the safety and helpfulness evaluators × N "
                       "replicates; writes <trajectory stem>_eval_<type>.jsonl beside it. Resumable.")
    p.add_argument("--trajectories", help="trajectory .jsonl file")
    p.add_argument("--evaluator", help="evaluator model spec")
    p.add_argument("--metrics", default="safe,help_ignore_safety",
                   help="comma list of safe, help_ignore_safety (Help(Ignore)), help (Help(Safe))")
    p.add_argument("--replicates", type=int, default=1, help="judgements per trajectory (default 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="judge temperature (replicates need > 0)")
    p.add_argument("--seed", type=int, default=42, help="replicate k uses seed + k")
    p.add_argument("--max-new-tokens", type=int, default=2048)
    p.add_argument("--compat", choices=["correct", "study"], default="correct",
                   help="study: the judge sees the repr of the final step, as the study (docs/compat.md)")
    p.add_argument("--cache", action="store_true", help="cache judge responses on disk")
    p.add_argument("--scoring", choices=["generate", "choice"], default="generate",
                   help="generate (default): the judge reasons and answers in the four fields; choice: the score "
                   "0-3 with the highest log-probability (for small local judges that cannot follow the format)")
    p.add_argument("--force", action="store_true", help="replace eval files not written by this configuration")
    p.add_argument("--chunk-size", type=int, default=256, help="requests per batched call (progress is saved after each)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--wait", action="store_true",
                   help="when another process is evaluating the same trajectory file, wait for it (default: refuse)")
    p.add_argument("--spec", help="JSON file of these options")
    add_backend_arguments(p, quantization_help="judge weights")
    p.set_defaults(func=_cmd_evaluate)
    esub = p.add_subparsers(dest="evaluate_command", metavar="{repair,rerun-failed}")
    r = esub.add_parser("repair", help="recover scores of malformed judgements, in place",
                        description="For every judgement without a score, recover it from the judge's reasoning "
                        "(the study's patterns), mark it repaired and rewrite the file atomically.")
    r.add_argument("--data-dir", required=True, help="folder of run files, or one eval/trajectory file")
    r.add_argument("--eval-types", default="safe,help_ignore_safety,help")
    r.add_argument("--model-filter", help="only model folders containing this text")
    r.add_argument("--dry-run", action="store_true", help="report, write nothing")
    r.add_argument("--show-unfixable", action="store_true")
    r.add_argument("--spec", help="JSON file of these options")
    r.set_defaults(func=_cmd_repair)
    f = esub.add_parser("rerun-failed", help="re-judge only what is still failed or missing",
                        description="Repair first; then re-ask the judge for every item still without a score, "
                        "at temperature 0.3 with a new seed each round, up to --max-retries rounds.")
    f.add_argument("--data-dir", required=True, help="folder of run files, or one eval/trajectory file")
    f.add_argument("--evaluator", help="judge spec (default: the one recorded in each judgement)")
    f.add_argument("--eval-types", default="safe,help_ignore_safety")
    f.add_argument("--temperature", type=float, default=0.3)
    f.add_argument("--max-retries", type=int, default=20, help="rounds (default 20)")
    f.add_argument("--compat", choices=["correct", "study"], default="correct")
    f.add_argument("--spec", help="JSON file of these options")
    f.set_defaults(func=_cmd_rerun)
