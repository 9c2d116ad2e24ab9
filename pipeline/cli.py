"""The ``agentpipe`` command line. Each stage adds one sub-command here (see ``COMMANDS``).

Expected failures (bad input, missing files) print one line ``agentpipe: error: …`` and exit 2;
nothing already written is damaged because every stage writes atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline import __version__
from pipeline.errors import PipelineError


# ------------------------------------------------------------------------------------------------ data
def _cmd_data_fetch(args: argparse.Namespace) -> int:
    from pipeline.data.fetch import fetch
    from pipeline.settings import get_settings

    data_dir = args.data_dir or get_settings().resolved_data_dir
    src = args.source.resolve() if args.source else None
    if src is not None and src == data_dir.resolve():
        print(f"data already in place: --from and the data directory are both {src}")
        return 0
    res = fetch(data_dir, source_dir=src, sources=args.only, workers=args.workers)
    print(f"data fetch: {res.fetched} files fetched and verified, {res.already_present} already present "
          f"(data directory {data_dir})")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from pipeline.data.cases import load_named_case_set
    from pipeline.data.check import check_runs, format_case_set, format_runs
    from pipeline.settings import get_settings

    data_dir = args.data_dir or get_settings().resolved_data_dir
    cs = load_named_case_set(args.cases, data_dir)
    print(format_case_set(cs))
    runs = args.runs
    if runs is None and not args.no_runs and args.cases == "toolemu":
        default = data_dir / "paper" / "raw_data_by_eval"
        runs = default if default.is_dir() else None
    if runs is None:
        return 0
    summary = check_runs(runs)
    print(format_runs(summary))
    for problem in summary.problems:
        print(f"agentpipe: error: {problem}", file=sys.stderr)
    return 2 if summary.problems else 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="get and check the data sets (cases, toolkits, released runs)")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="{fetch,check}")
    f = dsub.add_parser("fetch", help="download (or copy with --from) and verify the data sets",
                        description="Download the ToolEmu cases/toolkits and the study's released runs listed in "
                        "assets/manifest.json into the data directory, verifying sha256; --from copies them from "
                        "a local folder with the same layout instead.")
    f.add_argument("--from", dest="source", type=Path, metavar="DIR", help="copy from this local folder")
    f.add_argument("--data-dir", type=Path, help="destination (default: the configured data directory)")
    f.add_argument("--only", action="append", choices=["toolemu", "paper"], help="fetch only this source")
    f.add_argument("--workers", type=int, default=8, help="parallel downloads (default 8)")
    f.set_defaults(func=_cmd_data_fetch)
    c = dsub.add_parser("check", help="validate cases, toolkits and run files and print counts",
                        description="Load and validate a case set and every run file under a folder "
                        "(trajectories and eval files), then print counts. Exit 2 on any problem.")
    c.add_argument("--data-dir", type=Path, help="data directory (default: configured, ../shared/data)")
    c.add_argument("--cases", default="toolemu", help="case set: toolemu, demo or a cases .json path")
    c.add_argument("--runs", type=Path, help="folder of run files (default: <data-dir>/paper/raw_data_by_eval)")
    c.add_argument("--no-runs", action="store_true", help="check only the case set")
    c.set_defaults(func=_cmd_data_check)


# ----------------------------------------------------------------------------------------------- split
def _cmd_split(args: argparse.Namespace) -> int:
    from pipeline.data.split import split_cases

    train, test = split_cases(args.seed, args.n_cases)
    if args.json:
        print(json.dumps({"seed": args.seed, "train": train, "test": test}))
    else:
        print(f"seed {args.seed}: {len(train)} train, {len(test)} test cases")
        print("train: " + " ".join(map(str, train)))
        print("test:  " + " ".join(map(str, test)))
    return 0


def _add_split(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("split", help="print a seed's train/test case indices",
                       description="The study's seeded 50/50 case split: CPython shuffle of the case indices, "
                       "second half = test.")
    p.add_argument("--seed", type=int, required=True, help="split seed (as in _s<seed> model names)")
    p.add_argument("--n-cases", type=int, default=144, help="number of cases (default 144)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_split)


#: Sub-commands, in the order of the pipeline. A new stage adds its ``_add_<stage>`` function here.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_data, _add_split]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentpipe", description="Post-training LLM agents on safety and "
                                     "helpfulness: emulate, evaluate, build DPO pairs, train, analyse.")
    parser.add_argument("--version", action="version", version=f"agentpipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser




def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``agentpipe`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PipelineError as e:
        print(f"agentpipe: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("agentpipe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
