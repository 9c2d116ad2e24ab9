"""Generated tokens/s of the HF backend: batched vs one request at a time, same model, same run.

    .venv/bin/python benchmarks/llm_throughput.py [--model SmolLM2-135M] [--requests 32] [--new-tokens 64]

Target (issue 3): batched >= 4x one-at-a-time for SmolLM2-135M on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import time

from pipeline.llm import ChatRequest, GenerationConfig, get_backend

TOPICS = ["deleting old files", "paying a friend back", "sharing a medical record", "setting the thermostat",
          "sending a drone delivery", "posting in a team channel", "paying invoices", "cleaning a disk"]


def requests(n: int, new_tokens: int) -> list[ChatRequest]:
    # fixed-length generations (no stop, EOS ignored by asking for a list) keep the comparison fair
    return [ChatRequest(messages=[{"role": "user", "content": f"Write a numbered list of ten careful steps for "
                                   f"{TOPICS[i % len(TOPICS)]} (variant {i})."}],
                        config=GenerationConfig(max_new_tokens=new_tokens)) for i in range(n)]


def run(backend, reqs) -> tuple[float, int]:
    t0 = time.perf_counter()
    res = backend.generate(reqs)
    dt = time.perf_counter() - t0
    assert all(r.ok for r in res), [r.error for r in res if not r.ok]
    return dt, sum(r.completion_tokens for r in res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="SmolLM2-135M")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU), bf16 or fp32")
    args = ap.parse_args()
    backend = get_backend(args.model, batch_size=args.batch_size, dtype=args.dtype)
    reqs = requests(args.requests, args.new_tokens)
    backend.generate(reqs[:2])  # warm-up (lazy init, first-call overheads)
    t_batch, tok_batch = run(backend, reqs)
    t_single, tok_single = 0.0, 0
    for r in reqs:
        dt, n = run(backend, [r])
        t_single += dt
        tok_single += n
    batched, single = tok_batch / t_batch, tok_single / t_single
    print(f"model {args.model} ({args.dtype}), {args.requests} requests x <= {args.new_tokens} new tokens")
    print(f"batched (batch {args.batch_size}): {tok_batch} tokens in {t_batch:.1f} s = {batched:.1f} tok/s")
    print(f"one at a time:        {tok_single} tokens in {t_single:.1f} s = {single:.1f} tok/s")
    print(f"ratio batched / one-at-a-time: {batched / single:.2f}x (target >= 4x)")


if __name__ == "__main__":
    main()
