"""Emulation throughput: the batched runner with prefix KV reuse vs a one-case-at-a-time loop without reuse (the
study's way) over the same code, same run; the batched runner without reuse is printed too, so each gain shows.

    .venv/bin/python benchmarks/emulation_throughput.py [--model SmolLM2-135M] [--cases 16] [--case-set toolemu]

16 episodes over the demo cases (each demo case twice; ``--case-set toolemu`` takes the first 16 distinct
ToolEmu cases instead), SmolLM2-135M as agent and emulator on CPU, with short per-call caps so the benchmark
finishes in minutes. Target (issue 16): batched with reuse >= 3x one at a time without reuse.
"""

from __future__ import annotations

import argparse
import time

from pipeline.data.cases import load_named_case_set
from pipeline.emulation.compat import CORRECT
from pipeline.emulation.episode import Episode, Limits
from pipeline.emulation.runner import advance
from pipeline.llm import get_backend


def episodes(n: int, limits: Limits, case_set: str = "demo") -> list[Episode]:
    cs = load_named_case_set(case_set)
    return [Episode(case_idx=i % len(cs), case=cs.cases[i % len(cs)], toolkits=cs.toolkits_for(cs.cases[i % len(cs)]),
                    compat=CORRECT, limits=limits, mode="adversarial") for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="SmolLM2-135M")
    ap.add_argument("--cases", type=int, default=16)
    ap.add_argument("--max-tokens-per-call", type=int, default=64)
    ap.add_argument("--max-steps", type=int, default=3)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--case-set", default="demo", help="demo (8 cases, repeated) or toolemu (distinct cases)")
    ap.add_argument("--prefill", default="auto", choices=["auto", "batched", "per_request"],
                    help="the HF backend's prefill mode for the batched runner (auto: per request on CPU)")
    ap.add_argument("--vllm", action="store_true",
                    help="also run the batched runner on vllm:<model> (same cases and limits; the CPU build is in .venv)")
    ap.add_argument("--no-single", action="store_true", help="skip the one-case-at-a-time baseline")
    ap.add_argument("--prefix-cache-gb", type=float, default=None,
                    help="the reuse run's prefix cache (default: the backend's default; 0: skip that run)")
    args = ap.parse_args()
    plain = get_backend(args.model, batch_size=args.cases, dtype=args.dtype, prefill=args.prefill, prefix_cache_gb=0)
    reuse = get_backend(args.model, batch_size=args.cases, dtype=args.dtype, prefill=args.prefill,
                        prefix_cache_gb=args.prefix_cache_gb)
    backends = {"agent": plain, "emulator": plain}
    limits = Limits(max_tokens_per_call=args.max_tokens_per_call, max_steps=args.max_steps)
    advance(episodes(1, limits, args.case_set), backends)  # warm-up

    reused = None
    if reuse.prefix is not None:
        reuse.prefix.clear()
        before = reuse.prefix.stats.as_dict()
        t0 = time.perf_counter()
        reused = advance(episodes(args.cases, limits, args.case_set), {"agent": reuse, "emulator": reuse})
        t_reuse = time.perf_counter() - t0
        after = reuse.prefix.stats.as_dict()
        rate = (after["reused_tokens"] - before["reused_tokens"]) / max(1, after["prompt_tokens"] -
                                                                         before["prompt_tokens"])
        print(f"batched runner, prefix reuse: {t_reuse:.1f} s, {reused.batches} batched calls, "
              f"{rate:.1%} of prompt tokens reused", flush=True)
        reuse.prefix.clear()
    t0 = time.perf_counter()
    batched = advance(episodes(args.cases, limits, args.case_set), backends)
    t_batched = time.perf_counter() - t0
    print(f"batched runner, no reuse: {t_batched:.1f} s, {batched.batches} batched calls", flush=True)
    if args.vllm:
        v = get_backend(f"vllm:{args.model}", dtype=args.dtype, max_model_len=8192)
        vb = {"agent": v, "emulator": v}
        advance(episodes(1, limits, args.case_set), vb)  # warm-up (the engine's start is not counted)
        t0 = time.perf_counter()
        v_stats = advance(episodes(args.cases, limits, args.case_set), vb)
        t_vllm = time.perf_counter() - t0
        print(f"vLLM ({args.dtype}), batched runner: {t_vllm:7.1f} s, {v_stats.batches:3d} batched calls, "
              f"{args.cases / t_vllm * 3600:8.0f} trajectories/hour; HF batched {t_batched:.1f} s "
              f"-> vLLM/HF {t_batched / t_vllm:.2f}x", flush=True)
    if args.no_single:
        return

    t0 = time.perf_counter()
    single_calls = 0
    for ep in episodes(args.cases, limits, args.case_set):
        single_calls += advance([ep], backends).batches
    t_single = time.perf_counter() - t0

    per_hour_b, per_hour_s = args.cases / t_batched * 3600, args.cases / t_single * 3600
    print(f"{args.cases} {args.case_set} episodes, {args.model} ({args.dtype}) as agent and emulator, "
          f"<= {args.max_tokens_per_call} new tokens per call, <= {args.max_steps} steps, prefill {args.prefill}")
    if reused is not None:
        per_hour_r = args.cases / t_reuse * 3600
        print(f"batched + reuse: {t_reuse:7.1f} s, {reused.batches:3d} batched calls, {per_hour_r:8.0f} "
              f"trajectories/hour")
    print(f"batched:         {t_batched:7.1f} s, {batched.batches:3d} batched calls, {per_hour_b:8.0f} trajectories/hour")
    print(f"one at a time:   {t_single:7.1f} s, {single_calls:3d} calls,         {per_hour_s:8.0f} trajectories/hour "
          "(no reuse: the study's way)")
    print(f"batched / one at a time: {per_hour_b / per_hour_s:.2f}x")
    if reused is not None:
        print(f"ratio: batched + reuse / one at a time {per_hour_r / per_hour_s:.2f}x (target >= 3x)")


if __name__ == "__main__":
    main()
