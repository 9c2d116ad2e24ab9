"""``agentpipe pairs``: build one DPO pair set from evaluated run folders (SPEC §4)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def _cmd_pairs(args: argparse.Namespace) -> int:
    from pipeline.data.cases import load_named_case_set
    from pipeline.data.manifest import file_digest, is_complete
    from pipeline.preference.pairs import PairConfig, build_pair_set, length_tag, write_pair_set
    from pipeline.settings import get_settings

    t0 = time.perf_counter()
    split = args.split or ("train" if args.seed is not None else "all")
    cfg = PairConfig(metric=args.metric, metric2=args.metric2, mode=args.mode,
                     min_score_difference=args.min_score_difference, min_chosen_score=args.min_chosen_score,
                     consistency=args.consistency, seed=args.seed, split=split)
    run_dirs = [Path(d) for d in args.data_dir]
    evaluator = args.evaluator or "+".join(d.resolve().name for d in run_dirs)
    tokenizer = _tokenizer(args.tokenizer) if args.tokenizer else None
    name = cfg.name(evaluator, length_tag(tokenizer, args.max_length, args.max_prompt_length))
    out = Path(args.out)
    path = out / f"{name}.jsonl"
    manifest_config = {
        "pairs": {k: v for k, v in vars(cfg).items()}, "evaluator": evaluator, "judge": args.judge,
        "cases": args.cases,
        "tokenizer": args.tokenizer, "max_length": args.max_length, "max_prompt_length": args.max_prompt_length,
        "inputs": {str(d.resolve()): file_digest(d) for d in run_dirs if d.is_dir()},
    }
    if not args.force and path.is_file() and is_complete(path, manifest_config):
        print(f"pairs: {path} is up to date (same config and inputs); --force rebuilds it")
        return 0
    case_set = load_named_case_set(args.cases, get_settings().resolved_data_dir)
    result = build_pair_set(run_dirs, cfg, evaluator=evaluator, case_set=case_set, tokenizer=tokenizer,
                            max_length=args.max_length, max_prompt_length=args.max_prompt_length, judge=args.judge)
    write_pair_set(result, out, manifest_config=manifest_config)
    s = result.stats
    dropped = f", {s['dropped_too_long']} dropped as too long" if tokenizer is not None else ""
    print(f"pairs: {s['pairs']} pairs over {s['cases_with_pairs']} cases from {s['load']['items']} scored "
          f"trajectories{dropped} -> {path} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _tokenizer(spec: str):
    from transformers import AutoTokenizer

    from pipeline.data.naming import expand_model_name
    from pipeline.errors import ConfigError
    from pipeline.llm.local_models import resolve_local_model

    path = resolve_local_model(expand_model_name(spec))
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ConfigError(f"--tokenizer {spec}: cannot load '{path}' ({str(e).splitlines()[0]})") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    from pipeline.preference.pairs import CONSISTENCY, METRICS

    p = sub.add_parser(
        "pairs", help="build a DPO preference pair set from evaluated trajectories",
        description="Pair every two trajectories of a case whose scores differ by at least --min-score-difference "
        "(chosen at least --min-chosen-score), render them in trl's conversational format and write "
        "<out>/<name>.jsonl with <name>.stats.json and a manifest. Name: <metrics>_<evaluator>[options][_s<seed>]; "
        "help_ignore_safety + --metric2 safe --mode both is the paper's 'both'.")
    p.add_argument("--data-dir", action="append", required=True, metavar="DIR",
                   help="run folder with trajectory and eval files, searched recursively (repeatable)")
    p.add_argument("--metric", required=True, choices=list(METRICS), help="metric that picks chosen/rejected")
    p.add_argument("--metric2", choices=list(METRICS), help="second metric (see --mode)")
    p.add_argument("--mode", choices=["both", "average"], default="both",
                   help="both: metric 2 must agree and pass the same rules; average: also require the mean of "
                   "the two metrics to pass them (default both)")
    p.add_argument("--min-score-difference", type=int, default=2, help="minimum chosen - rejected gap (default 2)")
    p.add_argument("--min-chosen-score", type=int, default=2, help="minimum chosen score (default 2)")
    p.add_argument("--consistency", choices=list(CONSISTENCY), default="none",
                   help="replicate-agreement filter (needs multi-replicate evaluations; default none)")
    p.add_argument("--seed", type=int, help="split seed: pair only that seed's train (or --split test) cases")
    p.add_argument("--split", choices=["train", "test", "all"],
                   help="which cases of the seed's split (default train with --seed, all without)")
    p.add_argument("--evaluator", help="evaluator name used in the file name (default: the run folder's name)")
    p.add_argument("--judge", help="the judge whose evaluations are paired, when the folders hold several (the "
                   "evaluator part of the run-file names, e.g. Qwen_Qwen3-32B, or its model spec)")
    p.add_argument("--cases", default="toolemu", help="case set for the toolkits in the prompt (default toolemu)")
    p.add_argument("--tokenizer", metavar="MODEL",
                   help="drop pairs longer than --max-length/--max-prompt-length tokens with this model's chat "
                   "template (the name gets _tok-<model>[_ml<N>][_mpl<N>]; training filters again anyway)")
    p.add_argument("--max-length", type=int, default=8192, help="max prompt+completion tokens (default 8192)")
    p.add_argument("--max-prompt-length", type=int, default=8192, help="max prompt tokens (default 8192)")
    p.add_argument("--force", action="store_true", help="rebuild even when the output is up to date")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    p.set_defaults(func=_cmd_pairs)
