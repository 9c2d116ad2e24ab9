"""DPO training overhead: one demo training (2 optimizer steps, batch 1) as trl runs it vs as ``agentpipe train``
runs it, each in a fresh process, wall time and peak resident memory, with the losses of both.

    .venv/bin/python benchmarks/dpo_training.py [--pairs FILE] [--quantization bf16|none]

The pairs default to the demo's help pair set (``$AGENTPIPE_HOME/pairs/help_demo_msd1_mcs1_s0.jsonl``, written by
``make demo``). Baseline in the same run: trl's own layout, a pass per row (``--no-share-prompt``) with the LM head
scoring every position on CPU, as trl does without Triton (both variants get the allocator settings of
``pipeline/training/cpu_memory.py`` unless ``AGENTPIPE_LEAN_CPU_TRAINING_MEMORY=0``). Peak RSS in GiB.
Target (issue 27): ≤ 45 s and ≤ 2 GB, same losses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import sys
from pipeline.training import TrainConfig, train
import pipeline.training.callbacks as cb
if sys.argv[3] == "baseline":  # trl's own CPU path: every position through the LM head
    cb.score_completions_only_on_cpu = lambda: False
cfg = TrainConfig(model="SmolLM2-135M", pairs=sys.argv[1], seed=0, out=sys.argv[2], max_steps=2, batch_size=1,
                  gradient_accumulation_steps=1, save_steps=1, logging_steps=1, eval_steps=999999, max_length=4096,
                  max_prompt_length=4096, register_model=False, quantization=sys.argv[4],
                  share_prompt=sys.argv[3] != "baseline")
train(cfg)
"""


def run(variant: str, pairs: str, quantization: str, root: Path) -> dict:
    out = root / variant
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, pairs, str(out), variant, quantization],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"{variant}: training failed\n{proc.stderr.read()[-2000:]}")
    metrics = json.loads((out / "training_metrics.json").read_text())
    steps = [h for h in metrics["log_history"] if "loss" in h]
    return {"wall_s": wall, "peak_rss_gb": usage.ru_maxrss / 1024 ** 2,
            "losses": [round(h["loss"], 6) for h in steps], "grad_norms": [round(h["grad_norm"], 4) for h in steps]}


def main() -> None:
    home = Path(os.environ.get("AGENTPIPE_HOME", "runs"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default=str(home / "pairs" / "help_demo_msd1_mcs1_s0.jsonl"))
    ap.add_argument("--quantization", default="bf16", help="bf16 (the demo's) or none (float32)")
    args = ap.parse_args()
    if not Path(args.pairs).is_file():
        raise SystemExit(f"--pairs {args.pairs}: no such file (run `make demo` first, or pass a pair set)")
    with tempfile.TemporaryDirectory() as tmp:
        results = {v: run(v, args.pairs, args.quantization, Path(tmp)) for v in ("baseline", "agentpipe")}
    for v, r in results.items():
        print(f"{v:10s} {r['wall_s']:6.1f} s  peak RSS {r['peak_rss_gb']:5.2f} GiB  losses {r['losses']}  "
              f"grad norms {r['grad_norms']}")
    b, a = results["baseline"], results["agentpipe"]
    print(f"speed-up {b['wall_s'] / a['wall_s']:.2f}x, memory {b['peak_rss_gb'] / a['peak_rss_gb']:.2f}x less "
          f"(target: <= 45 s, <= 2 GB, same losses; 1 GiB = 1.074 GB)")


if __name__ == "__main__":
    main()
