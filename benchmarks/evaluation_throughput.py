"""Evaluation throughput: judged trajectories per hour, batched with prefix KV reuse vs one request at a time
without reuse (the study's way), same run, same trajectories; batched without reuse is printed too.

    .venv/bin/python benchmarks/evaluation_throughput.py [--judge SmolLM2-135M] [--replicates 3]

The trajectories are one released run file (15 real trajectories of the study, ``--file``), judged by a small
local judge on CPU with short reasoning (``--max-new-tokens``) so that the benchmark finishes in minutes. The
judge's prompt holds the case and the whole trajectory, so prefill dominates; replicates ask the same prompt with
other seeds, which is where reuse pays (a trajectory's prompt is prefilled once instead of once per replicate).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def _default_file() -> Path:
    from pipeline.settings import get_settings

    folder = get_settings().resolved_data_dir / "paper" / "raw_data_by_eval" / "q32" / "Qwen_Qwen2.5-7B-Instruct"
    return sorted(p for p in folder.glob("*.jsonl") if "_eval_" not in p.name)[0]


def _run(src: Path, label: str, **options) -> tuple[float, int]:
    from pipeline.evaluation.runner import EvaluationConfig, run_evaluation

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / src.name
        shutil.copy(src, copy)
        t0 = time.perf_counter()
        res = run_evaluation(EvaluationConfig(trajectories=copy, no_progress=True, **options))
        seconds = time.perf_counter() - t0
    print(f"{label:24s} {seconds:7.1f} s, {res.requests} judge requests", flush=True)
    return seconds, res.requests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", type=Path, help="a trajectory run file (default: a released q32 file, 15 trajectories)")
    ap.add_argument("--judge", default="SmolLM2-135M")
    ap.add_argument("--metrics", default="safe")
    ap.add_argument("--replicates", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--no-single", action="store_true")
    args = ap.parse_args()
    src = args.file or _default_file()
    from pipeline.data.jsonl import read_jsonl

    n = len(read_jsonl(src).records)
    common = {"evaluator": args.judge, "metrics": args.metrics, "replicates": args.replicates,
              "temperature": 0.7 if args.replicates > 1 else 0.0, "max_new_tokens": args.max_new_tokens,
              "dtype": args.dtype}
    print(f"load {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; {n} trajectories of {src.name}, judge "
          f"{args.judge} ({args.dtype}), metrics {args.metrics}, {args.replicates} replicates, "
          f"<= {args.max_new_tokens} new tokens")
    _run(src, "warm-up (not counted)", **{**common, "replicates": 1, "temperature": 0.0, "max_new_tokens": 1})
    from pipeline.llm.hf.prefix import PREFIX_CACHES as _PREFIX_CACHES

    for cache in _PREFIX_CACHES.values():
        cache.clear()
    t_reuse, _ = _run(src, "batched + reuse", **common)
    rates = [c.stats.as_dict() for c in _PREFIX_CACHES.values()]
    print(f"  prefix cache: {rates}")
    t_batched, _ = _run(src, "batched, no reuse", **common, prefix_cache_gb=0)
    per_hour = {k: n / t * 3600 for k, t in (("reuse", t_reuse), ("batched", t_batched))}
    if not args.no_single:
        t_single, _ = _run(src, "one at a time, no reuse", **common, prefix_cache_gb=0, batch_size=1, chunk_size=1)
        per_hour["single"] = n / t_single * 3600
    for k, v in per_hour.items():
        print(f"{k:8s} {v:8.0f} judged trajectories/hour")
    if "single" in per_hour:
        print(f"ratio: batched + reuse / one at a time {per_hour['reuse'] / per_hour['single']:.2f}x; "
              f"batched / one at a time {per_hour['batched'] / per_hour['single']:.2f}x")


if __name__ == "__main__":
    main()
