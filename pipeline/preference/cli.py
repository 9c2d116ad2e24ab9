"""``agentpipe pairs``: build one DPO pair set from evaluated run folders (SPEC §4)."""

from __future__ import annotations

import argparse
import sys


def _cmd_pairs(args: argparse.Namespace):  # noqa: ANN202 - returns a StageResult
    from pipeline.cli_args import config_from_args
    from pipeline.preference.stage import PairsConfig, build_pairs

    res = build_pairs(config_from_args(PairsConfig, args))
    path = res.outputs["pairs"]
    if res.status == "skipped":
        print(f"pairs: {path} is up to date (same configuration and inputs)")
        return res
    c = res.counts
    dropped = f", {c['dropped_too_long']} dropped as too long" if res.length_filtered else ""
    print(f"pairs: {c['pairs']} pairs over {c['cases']} cases from {c['items']} scored trajectories{dropped} -> "
          f"{path} ({res.wall_s:.1f} s)")
    skipped = getattr(res, "incomplete_files_skipped", [])
    if skipped:  # the study skips them too (SPEC §4.1); said, so a pair set from partial data is never silent
        print(f"pairs: {len(skipped)} incomplete trajectory file(s) skipped (fewer trajectories than their case "
              f"range), e.g. {skipped[0]}; listed in the stats file", file=sys.stderr)
    return res


def add_parser(sub: argparse._SubParsersAction) -> None:
    from pipeline.cli_args import add_config_arguments
    from pipeline.preference.stage import PairsConfig

    p = sub.add_parser(
        "pairs", help="build a DPO preference pair set from evaluated trajectories",
        description="Pair every two trajectories of a case whose scores differ by at least --min-score-difference "
        "(chosen at least --min-chosen-score), render them in trl's conversational format and write "
        "<out>/<name>.jsonl with <name>.stats.json and a manifest. Name: <metrics>_<evaluator>[options][_s<seed>]; "
        "help_ignore_safety + --metric2 safe --mode both is the paper's 'both'. A set of the same name made by "
        "another configuration or from changed evaluations is refused (--force keeps it aside).")
    add_config_arguments(p, PairsConfig)
    p.set_defaults(func=_cmd_pairs)
