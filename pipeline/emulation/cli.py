"""``agentpipe emulate``: run an agent in the emulated tool sandbox over a case range."""

from __future__ import annotations

import argparse
import sys


def _cmd_emulate(args: argparse.Namespace):  # noqa: ANN202 - returns a StageResult
    from pipeline.cli_args import config_from_args
    from pipeline.emulation.runner import EmulationConfig, emulate

    cfg = config_from_args(EmulationConfig, args)
    bar = _progress_bar(cfg.no_progress)
    try:
        result = emulate(cfg, progress=bar.update if bar else _lines())
    finally:
        if bar:
            bar.close()
    for run in result.runs:
        who = f" {run['path'].split('/')[-2]}:" if len(result.runs) > 1 else ""
        if run["skipped_complete"]:
            print(f"emulate:{who} already complete ({len(run['cases'])} cases) → {run['path']}")
            continue
        rate = run["agent_tokens"] / run["wall_s"] if run["wall_s"] else 0.0
        print(f"emulate:{who} {len(run['cases'])} cases ({run['newly_done']} new, {run['already_done']} already "
              f"done, {run['failed']} failed) in {run['batches']} batched calls, {run['wall_s']:.1f} s, "
              f"{rate:.0f} agent tok/s → {run['path']}")
    if result.status == "incomplete":
        print(f"emulate: incomplete: {result.counts['failed']} case(s) failed; rerun the same command to retry them",
              file=sys.stderr)
    return result


class _Bar:
    """tqdm bar created on the first update (so an early error prints only its one line)."""

    def __init__(self) -> None:
        self.t0: float | None = None
        self.bar = None

    def update(self, p: dict) -> None:
        import time

        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=p["total"], unit="case", file=sys.stderr, dynamic_ncols=True)
        self.t0 = self.t0 or time.monotonic()
        self.bar.total = p["total"]
        self.bar.n = p["done"] + p["failed"]
        rate = p["agent_tokens"] / max(1e-9, time.monotonic() - self.t0)
        self.bar.set_postfix(active=p["active"], calls=p["batches"], tok_s=f"{rate:.0f}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress_bar(disabled: bool) -> _Bar | None:
    from pipeline.progress import wants_bar

    return _Bar() if wants_bar(disabled) else None


def _lines():  # noqa: ANN202 - the progress callback for logs
    from pipeline.progress import ProgressLines

    lines = ProgressLines("emulate", "cases")
    return lambda p: lines.update(p["done"] + p["failed"], p["total"],
                                  f"{p['failed']} failed, {p['active']} active, {p['batches']} batched calls")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from pipeline.cli_args import add_config_arguments
    from pipeline.emulation.runner import EmulationConfig

    p = sub.add_parser("emulate", help="run an agent in the LLM-emulated tool sandbox",
                       description="Emulate trajectories: the agent acts on each case's tools, the emulator LLM "
                       "plays the tools. All active cases advance one step per batched call. Resumable: a rerun "
                       "of the same configuration skips finished cases and retries failed ones; a rerun with "
                       "options that change results is refused (--force keeps the old run aside). Output: "
                       "$AGENTPIPE_HOME/trajectories/<agent>/<run file>.jsonl. Exit 1 while cases failed.")
    add_config_arguments(p, EmulationConfig)
    p.set_defaults(func=_cmd_emulate)
