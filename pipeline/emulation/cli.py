"""``agentpipe emulate``: run an agent in the emulated tool sandbox over a case range."""

from __future__ import annotations

import argparse
import sys

from pipeline.errors import ConfigError


def _range(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.split("-", 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': expected START-END (half-open), e.g. 0-144") from None
    if not 0 <= a < b:
        raise argparse.ArgumentTypeError(f"'{text}': expected 0 <= START < END")
    return a, b


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/", 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': expected i/n, e.g. 0/10 (0-based)") from None
    return i, n


def _cmd_emulate(args: argparse.Namespace) -> int:
    from pipeline.emulation.episode import Limits
    from pipeline.emulation.runner import EmulationConfig, run_emulations

    roles = tuple(r for r in (args.cache or "").split(",") if r)
    if set(roles) - {"agent", "emulator"}:
        raise ConfigError(f"--cache {args.cache}: expected a comma list of agent, emulator")
    from pipeline.llm.options import backend_options

    agents = list(dict.fromkeys(args.agent))
    if args.agent_label and len(agents) > 1:
        raise ConfigError("--agent-label names one agent's files; it cannot be used with several --agent")
    cfgs = [EmulationConfig(
        agent=agent, emulator=args.emulator, evaluator=args.evaluator, emulator_mode=args.emulator_mode,
        case_set=args.case_set, case_range=args.cases, test_only=args.test_only, seed=args.seed, shard=args.shard,
        quantization=None if args.quantization in (None, "none") else args.quantization, compat=args.compat,
        agent_label=args.agent_label,
        limits=Limits(max_agent_tokens=args.max_agent_tokens, max_tokens_per_call=args.max_tokens_per_call,
                      max_continuations=args.max_continuations, agent_temperature=args.agent_temperature,
                      agent_seed=args.agent_seed),
        max_steps=args.max_steps, out_dir=args.out, cache=roles,
        backend_options=backend_options(args),
    ) for agent in agents]
    bar = _progress_bar(args.no_progress)
    try:
        results = run_emulations(cfgs, restart=args.restart, progress=bar.update if bar else None, wait=args.wait)
    finally:
        if bar:
            bar.close()
    from pipeline.cli import report_result

    if len(results) == 1:
        report_result(trajectories=results[0].path, cases=len(results[0].cases), failed=results[0].failed)
    else:
        report_result(trajectories=[str(r.path) for r in results], cases=sum(len(r.cases) for r in results),
                      failed=sum(r.failed for r in results))
    for cfg, result in zip(cfgs, results):
        who = f" {cfg.agent}:" if len(results) > 1 else ""
        if result.skipped_complete:
            print(f"emulate:{who} already complete ({len(result.cases)} cases) → {result.path}")
            continue
        rate = result.agent_tokens / result.wall_s if result.wall_s else 0.0
        print(f"emulate:{who} {len(result.cases)} cases ({result.newly_done} new, {result.already_done} already "
              f"done, {result.failed} failed) in {result.batches} batched calls, {result.wall_s:.1f} s, "
              f"{rate:.0f} agent tok/s → {result.path}")
    return 1 if any(r.failed for r in results) else 0


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
    return None if disabled or not sys.stderr.isatty() else _Bar()


def add_parser(sub: argparse._SubParsersAction) -> None:
    from pipeline.llm.options import add_backend_arguments

    p = sub.add_parser("emulate", help="run an agent in the LLM-emulated tool sandbox",
                       description="Emulate trajectories: the agent acts on each case's tools, the emulator LLM "
                       "plays the tools. All active cases advance one step per batched call. Resumable: a rerun "
                       "skips finished cases. Output: $AGENTPIPE_HOME/trajectories/<agent>/<run file>.jsonl")
    p.add_argument("--agent", required=True, action="append",
                   help="agent model spec (nickname, Hub id, path, vllm:, openai:, base+adapter); repeat it to "
                   "emulate several agents together (adapters of one base model share one engine and batch; "
                   "each agent gets its own run file)")
    p.add_argument("--emulator", required=True, help="emulator model spec")
    p.add_argument("--evaluator", default="none", help="evaluator spec, only to name the file (default none)")
    p.add_argument("--emulator-mode", choices=["adversarial", "standard"], default="adversarial")
    p.add_argument("--case-set", default="toolemu", help="toolemu (default), demo or a cases .json path")
    p.add_argument("--cases", type=_range, help="case index range START-END (half-open; default all)")
    p.add_argument("--test-only", action="store_true", help="only the test cases of the split seed")
    p.add_argument("--seed", type=int, help="split seed for --test-only (default: _s<N> in the agent name)")
    p.add_argument("--shard", type=_shard, help="i/n: run the i-th (0-based) of n contiguous parts of the range")
    p.add_argument("--compat", choices=["correct", "study"], default="correct",
                   help="correct (default) or the study's quirks, see docs/compat.md")
    p.add_argument("--max-steps", type=int, default=-1, help="cap on agent steps (default: 30; study: none)")
    p.add_argument("--max-agent-tokens", type=int, default=8000, help="cumulative agent output tokens (cl100k)")
    p.add_argument("--max-tokens-per-call", type=int, default=2048, help="new-token cap per LLM call")
    p.add_argument("--max-continuations", type=int, default=5, help="re-prompts after an unparseable output")
    p.add_argument("--agent-temperature", type=float, default=0.0, help="agent sampling temperature (default 0)")
    p.add_argument("--agent-seed", type=int, help="agent sampling seed (with --agent-temperature > 0)")
    p.add_argument("--agent-label", help="name the agent's folder/files by this label (e.g. one sampled run of a "
                   "model in a trajectory pool: SmolLM2-135M-sample1); avoid _s<N>")
    p.add_argument("--cache", help="cache LLM responses on disk for these roles: agent,emulator")
    p.add_argument("--out", type=_path, help="output root (default $AGENTPIPE_HOME/trajectories)")
    p.add_argument("--restart", action="store_true", help="discard partial output of an earlier run and start over")
    p.add_argument("--wait", action="store_true",
                   help="when another process is writing the same run file, wait for it (default: refuse at once)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--spec", help="JSON file of these options (stage spec, as the Airflow operator passes)")
    add_backend_arguments(p, quantization_help="agent weights (the emulator runs unquantized)")
    p.set_defaults(func=_cmd_emulate)


def _path(text: str):  # noqa: ANN202 - argparse type
    from pathlib import Path

    return Path(text)
