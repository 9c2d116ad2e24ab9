"""The ``agentpipe`` command line. Each stage adds one sub-command here (see ``COMMANDS``).

Expected failures (bad input, missing files) print one line ``agentpipe: error: …`` and exit 2;
nothing already written is damaged because every stage writes atomically.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline import __version__
from pipeline.errors import PipelineError
from pipeline.stage import StageResult


def _at_least(low: float, kind: type = int) -> Callable[[str], float]:
    """An argparse ``type`` for a number ``>= low`` (a value out of range is refused by the parser, exit 2)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value

    return parse


# ------------------------------------------------------------------------------------------------ data
def _cmd_data_fetch(args: argparse.Namespace) -> int:
    from pipeline.data.fetch import fetch
    from pipeline.data.results import ARCHIVE_SUFFIXES, fetch_results, writable_data_dir
    from pipeline.settings import get_settings

    data_dir = args.data_dir or get_settings().resolved_data_dir
    if data_dir.exists() and not data_dir.is_dir():
        raise PipelineError(f"--data-dir {data_dir}: not a folder")
    only = args.only or ["toolemu", "paper", "results"]
    src = args.source.resolve() if args.source else None
    if src is not None and not src.exists():
        raise PipelineError(f"--from {src}: no such file or folder")
    results_from = src
    if src is not None and src.is_file():  # an archive holds the results only
        if not src.name.endswith(ARCHIVE_SUFFIXES):
            raise PipelineError(f"--from {src}: expected a folder or a results archive ({', '.join(ARCHIVE_SUFFIXES)})")
        only = ["results"]
    elif src is not None:
        archive = src / "paper" / "results.tar.xz"
        results_from = archive if archive.is_file() else src / "paper"
    files = [s for s in only if s != "results"]
    if files:
        if src is not None and src == data_dir.resolve():
            print(f"data already in place: --from and the data directory are both {src}")
        else:
            res = fetch(data_dir, source_dir=src, sources=files, workers=args.workers)
            print(f"data fetch: {res.fetched} files fetched and verified, {res.already_present} already present "
                  f"(data directory {data_dir})")
    if "results" in only:
        target = writable_data_dir(data_dir)
        if target != data_dir:
            print(f"data fetch: the data directory {data_dir} is read-only; the results go under {target}")
        res = fetch_results(target, results_from)
        verb = "already present and verified" if res.already_present else "fetched and verified"
        print(f"data fetch: the study's results, {res.files} files {verb} → {res.path} "
              "(match_eval_results, cross_eval_results)")
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
    f.add_argument("--from", dest="source", type=Path, metavar="DIR|ARCHIVE",
                   help="copy from this local folder (same layout as the data directory), or unpack the results "
                   "from this archive (results.tar.xz)")
    f.add_argument("--data-dir", type=Path, help="destination (default: the configured data directory)")
    f.add_argument("--only", action="append", choices=["toolemu", "paper", "results"],
                   help="fetch only this source (paper: the released trajectories; results: the released "
                   "evaluations of the finetuned models)")
    f.add_argument("--workers", type=_at_least(1), default=8, help="parallel downloads (default 8)")
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
    p.add_argument("--seed", type=_at_least(0), required=True, help="split seed (as in _s<seed> model names)")
    p.add_argument("--n-cases", type=_at_least(2), default=144, help="number of cases (default 144)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_split)


# ------------------------------------------------------------------------------------------------- llm
def _cmd_llm_chat(args: argparse.Namespace) -> int:
    import pipeline.emulation.doubles  # noqa: F401 - registers scripted:agent and scripted:emulator
    import pipeline.evaluation.doubles  # noqa: F401 - registers scripted:judge
    from pipeline.llm import ChatRequest, GenerationConfig, get_backend

    from pipeline.cli_args import validate_config
    from pipeline.llm.options import BackendOptions

    opts = validate_config(BackendOptions, {k: v for k, v in vars(args).items() if k in BackendOptions.model_fields})
    backend = get_backend(args.model, **opts.backend_options(),
                          **({"quantization": opts.quantization} if opts.quantization else {}))
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": args.prompt})
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           stop=tuple(args.stop or ()), seed=args.seed)
    [resp] = backend.generate([ChatRequest(messages=messages, config=cfg)])
    if not resp.ok:
        print(f"agentpipe: error: {args.model}: {resp.error}", file=sys.stderr)
        return 1
    print(resp.text)
    cost = f", ${resp.cost_usd:.6f}" if resp.cost_usd is not None else ""
    print(f"[{resp.finish_reason}; {resp.prompt_tokens} prompt + {resp.completion_tokens} completion tokens; "
          f"{resp.latency_s:.2f} s{cost}]", file=sys.stderr)
    return 0


def _add_llm(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("llm", help="try a model backend")
    lsub = p.add_subparsers(dest="llm_command", required=True, metavar="{chat}")
    c = lsub.add_parser("chat", help="one chat completion from any model spec",
                        description="Send one prompt to a model spec (nickname, Hub id or path, vllm:<id>, "
                        "openai:<model>, base+adapter) and print the reply; usage goes to stderr.")
    c.add_argument("prompt", help="the user message")
    c.add_argument("--model", required=True, help="model spec, e.g. SmolLM2-135M or openai:gpt-5-mini")
    c.add_argument("--system", help="optional system message")
    c.add_argument("--max-new-tokens", type=_at_least(1), default=256, help="token cap (default 256)")
    c.add_argument("--temperature", type=_at_least(0.0, float), default=0.0,
                   help="sampling temperature (default 0 = greedy)")
    c.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    c.add_argument("--seed", type=_at_least(0), help="sampling seed")
    from pipeline.cli_args import add_config_arguments
    from pipeline.llm.options import BackendOptions

    add_config_arguments(c.add_argument_group("model backend", "local backends (HF transformers, vLLM)"),
                         BackendOptions, spec=False)
    c.set_defaults(func=_cmd_llm_chat)


# ---------------------------------------------------------------------------------------------- replay
def _cmd_replay(args: argparse.Namespace) -> int:
    """Trajectories replay through the emulation stage's engine, judgements through the evaluation stage's
    replay judge: the command lives here, above both stages (a stage imports no other)."""
    from pipeline.cli_args import config_from_args
    from pipeline.data.jsonl import atomic_write_json
    from pipeline.emulation.replay import ReplayConfig, format_table, replay_runs

    cfg = config_from_args(ReplayConfig, args)
    if cfg.judgements:
        from pipeline.evaluation.replay import replay_judgements

        if cfg.compat != "study":
            raise PipelineError(f"--compat {cfg.compat}: applies to replayed trajectories, not to --judgements")
        report = replay_judgements(cfg.runs)
        table = report.table()
    else:
        report = replay_runs(cfg.runs, cfg.compat)
        table = format_table(report)
    print(report.line())
    if table:
        print(table)
    if cfg.out:
        atomic_write_json(cfg.out, report.to_json())
        print(f"details: {cfg.out}")
    return 0


def _add_replay(sub: argparse._SubParsersAction) -> None:
    from pipeline.cli_args import add_config_arguments
    from pipeline.emulation.replay import ReplayConfig

    r = sub.add_parser("replay", help="drive recorded trajectories (or judgements) through the pipeline and compare",
                       description="Replay every trajectory under --runs: the agent's recorded outputs and the "
                       "emulator's recorded replies go through the real engine (parsing, validation, token budget, "
                       "continuations, stop rules); the rebuilt trajectory is compared with the record (steps, "
                       "tools, inputs, observations, final output, stop). --compat study checks the engine "
                       "reproduces the study; --compat correct shows which episodes the project's defaults would "
                       "end differently, and why. --judgements replays the recorded judgements instead: each "
                       "eval file's judgements are answered by the replay judge (replay:DIR#<judge>) and read by "
                       "the project's parser, and the scores are compared with the recorded ones. See "
                       "docs/compat.md.")
    add_config_arguments(r, ReplayConfig, spec=False)
    r.set_defaults(func=_cmd_replay)


#: Built-in sub-commands.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_data, _add_split, _add_llm, _add_replay]
#: Stage sub-commands, in pipeline order: each module has ``add_parser(subparsers)`` and imports nothing heavy
#: at module level (torch, transformers, mlflow load inside the command functions).
STAGE_CLIS = ["pipeline.emulation.cli", "pipeline.evaluation.cli", "pipeline.preference.cli",
              "pipeline.training.cli", "pipeline.analysis.cli", "pipeline.tracking.cli"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentpipe", description="Post-training LLM agents on safety and "
                                     "helpfulness: emulate, evaluate, build DPO pairs, train, analyse.",
                                     epilog="API models (openai:): AGENTPIPE_API_TIMEOUT_S sets the seconds one "
                                     "request attempt may take (default 300), AGENTPIPE_API_RETRIES the retries "
                                     "after a timeout, connection error, 429 or 5xx (default 6).")
    parser.add_argument("--version", action="version", version=f"agentpipe {__version__}")
    parser.add_argument("--result", type=Path, metavar="FILE",
                        help="write the command's result (status, output paths, counts) as JSON to FILE")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    for name in STAGE_CLIS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and name.startswith(e.name):  # that stage is not built (yet)
                continue
            raise
        module.add_parser(sub)
    return parser




def _check_result_path(path: Path | None) -> None:
    """Refuse a ``--result`` path that cannot take a file before the command does any work."""
    if path is None:
        return
    if path.is_dir():
        raise PipelineError(f"--result {path}: is a folder; expected a file path for the JSON result")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:  # the nearest existing ancestor must be a folder
        parent = parent.parent
    if not parent.is_dir():
        raise PipelineError(f"--result {path}: {parent} is not a folder")


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the parsed command; expected failures become one line on stderr and their exit code."""
    try:
        _check_result_path(args.result)
        out = args.func(args)
        if isinstance(out, StageResult) and out.stage == "report":
            from pipeline.training.registry import cards_from_reports

            # trained models' cards take their test scores; also when the reports were up to date (idempotent), so
            # a rerun after a crash between the reports and the cards fills them in
            cards_from_reports(out.outputs.get("reports", []))
        # a stage returns its StageResult (status, outputs, counts); other commands an exit code
        code, data = (out.exit_code, out.to_json()) if isinstance(out, StageResult) else (int(out or 0), {})
        if args.result is not None:
            from pipeline.data.jsonl import atomic_write_json

            atomic_write_json(args.result, {"command": argv, "exit_code": code, **data})
        return code
    except PipelineError as e:
        print(f"agentpipe: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("agentpipe: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in _STORAGE_FULL:
            raise
        print(f"agentpipe: error: {storage_full_message(e)}", file=sys.stderr)
        return 2


#: errors of a full or read-only storage: the user frees space (or remounts) and reruns; nothing else is wrong
_STORAGE_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def storage_full_message(e: OSError) -> str:
    """One line for a full disk, an exceeded quota or a read-only file system: the path, what happened, what to do
    (every stage resumes where it stopped, so finished work is kept)."""
    what = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system"}[e.errno]
    fix = "make it writable" if e.errno == errno.EROFS else "free space"
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{what} ({e.strerror}); {fix} and rerun the same command: finished work is kept"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``agentpipe`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        code = _run(args, argv)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
        return code
    except BrokenPipeError:
        # the reader went away (`agentpipe … | head -1`): as Python's docs recommend (signal module, "Note on
        # SIGPIPE"), point stdout at devnull so the interpreter's final flush does not raise again, and end quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
