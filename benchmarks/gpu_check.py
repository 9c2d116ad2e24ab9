"""The GPU check: one command that measures the project's GPU paths and writes the figures as JSON.

    make gpu-wheels                                   # here, once: cp312 wheels + ToolEmu cases into gpu-wheels/
    python3 benchmarks/gpu_check.py --out gpu_check.json     # on the GPU node (≤ 8 minutes on one H200)

It runs on a bare GPU node without network whose image has Python 3.12, CUDA torch, transformers, peft and
accelerate: what else it needs (trl, datasets, bitsandbytes, pydantic, bpe-openai) comes from the wheels in
``gpu-wheels/`` (install them with ``pip install --no-index --no-deps --target DIR gpu-wheels/*.whl`` and put DIR on
PYTHONPATH; see the README's GPU section). vLLM is too large to travel that way and is not checked here.

Sections (each timed, each failure recorded and the next section run):
1. ``hf_generate``: the HF backend on CUDA bf16, 32 requests x 64 new tokens, batched vs one at a time.
2. ``emulation``: 16 ToolEmu cases (``--case-set``) with the model as agent and emulator, the batched runner vs one
   case at a time (the study's way): trajectories/hour and the ratio.
3. ``dpo_bf16``: 20 DPO+LoRA steps in bf16 with gradient checkpointing: steps/s, peak GPU memory.
4. ``qlora_int4``: 10 QLoRA steps on NF4 weights (when bitsandbytes imports): steps/s, peak memory.
5. ``merge``: the adapter merged into the base with the logit check (max |logit diff|).
6. ``choice_scoring``: log-probability scoring of 64 judge prompts: prompts/s, agreement with greedy answers.

``--model``: a model folder or nickname; default SmolLM2-135M when its wheel or converted folder is there, else a
random model of SmolLM2-135M's shape (30 layers, hidden 576) with the tiny tokenizer, so the timings keep their
meaning where the 98 MB SmolLM2 wheel cannot travel (the JSON says which). ``--device cpu --quick`` runs every
section small on CPU, so the script is tested where no GPU is.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emulation_throughput import episodes  # noqa: E402

from pipeline.llm import ChatRequest, GenerationConfig, get_backend  # noqa: E402

PROMPTS = ["Delete all my old files.", "Send $500 to Bob", "What is the weather in Paris?", "Share my medical record",
           "Please turn the heating off while I am away for two weeks in January.", "List the files in /tmp",
           "Book a flight to Paris and pay with my card", "Summarise my unread email"]


def section(results: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> None:
    t0 = time.perf_counter()
    try:
        results[name] = {"ok": True, **fn()}
    except Exception as e:  # a broken section is a finding, not the end of the check
        results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    results[name]["wall_s"] = round(time.perf_counter() - t0, 2)
    print(f"[{name}] {json.dumps({k: v for k, v in results[name].items() if k != 'traceback'})}", flush=True)


def resolve_model(arg: str | None, work: Path) -> tuple[str, str]:
    """(model path or spec, what it is)."""
    if arg:
        return arg, "given"
    try:
        from pipeline.llm.local_models import smollm2

        return str(smollm2()), "SmolLM2-135M-Instruct"
    except Exception:
        pass
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pipeline.llm.local_models import tiny_llama

    tok_dir = tiny_llama(work / "tiny")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    out = work / "smollm2-shaped"
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out), "random model of SmolLM2-135M's shape (SmolLM2 wheel not installed)"


def hf_generate(model: str, dtype: str, n: int, new_tokens: int) -> dict[str, Any]:
    backend = get_backend(model, dtype=dtype, batch_size=n)
    reqs = [ChatRequest(messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)] + f" (#{i})"}],
                        config=GenerationConfig(max_new_tokens=new_tokens)) for i in range(n)]
    backend.generate(reqs[:2])  # warm-up
    t0 = time.perf_counter()
    batched = backend.generate(reqs)
    tb = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = [backend.generate([r])[0] for r in reqs]
    ts = time.perf_counter() - t0
    tokens_b, tokens_s = sum(r.completion_tokens for r in batched), sum(r.completion_tokens for r in single)
    return {"requests": n, "batched_tok_s": round(tokens_b / tb, 1), "single_tok_s": round(tokens_s / ts, 1),
            "ratio": round((tokens_b / tb) / (tokens_s / ts), 2),
            "same_text": sum(a.text == b.text for a, b in zip(batched, single)), "device": str(backend.model.device)}


def emulation(model: str, dtype: str, n: int, case_set: str, max_tokens: int, max_steps: int) -> dict[str, Any]:
    from pipeline.emulation.episode import Limits
    from pipeline.emulation.runner import advance

    backend = get_backend(model, dtype=dtype, batch_size=n)
    backends = {"agent": backend, "emulator": backend}
    limits = Limits(max_tokens_per_call=max_tokens, max_steps=max_steps)
    advance(episodes(1, limits, case_set), backends)  # warm-up
    t0 = time.perf_counter()
    stats = advance(episodes(n, limits, case_set), backends)
    tb = time.perf_counter() - t0
    t0 = time.perf_counter()
    calls = sum(advance([ep], backends).batches for ep in episodes(n, limits, case_set))
    ts = time.perf_counter() - t0
    return {"cases": n, "case_set": case_set, "max_tokens_per_call": max_tokens, "max_steps": max_steps,
            "batched_s": round(tb, 2), "batched_calls": stats.batches, "single_s": round(ts, 2), "single_calls": calls,
            "batched_per_hour": round(n / tb * 3600), "single_per_hour": round(n / ts * 3600),
            "ratio": round(ts / tb, 2)}


def _pairs(path: Path, n: int) -> Path:
    from pipeline.data import split

    rows = []
    for k, case in enumerate(split.train_cases(0)[:n]):
        rows.append({"case_idx": case,
                     "prompt": [{"role": "system", "content": "You are a capable AI agent with tools."},
                                {"role": "user", "content": f"Task {k}: delete every file named test in my drive. "
                                 + "Context: " + " ".join(PROMPTS) * 8 + "\nThought: "}],
                     "chosen": [{"role": "assistant", "content": "Deleting cannot be undone; I will ask first.\n"
                                 "Final Answer: Which files exactly should I delete?"}],
                     "rejected": [{"role": "assistant", "content": "Action: DriveDeleteFiles\nAction Input: "
                                   "{\"name\": \"test\"}\nObservation: {\"deleted\": 14}\nFinal Answer: Deleted 14."}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dpo(model: str, work: Path, name: str, steps: int, quantization: str) -> dict[str, Any]:
    import torch

    from pipeline.training import TrainConfig, train

    pairs = _pairs(work / f"safe_check_{name}.jsonl", 32)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    cfg = TrainConfig(model=model, pairs=str(pairs), seed=0, out=str(work / f"model-{name}"), batch_size=2,
                      gradient_accumulation_steps=1, max_steps=steps, learning_rate=5e-5, warmup_ratio=0.0,
                      logging_steps=1, save_steps=10_000, quantization=quantization, max_length=1024,
                      gradient_checkpointing=True, final_eval=False, tracking_uri="http://127.0.0.1:9")
    t0 = time.perf_counter()
    res = train(cfg)
    wall = time.perf_counter() - t0
    hist = [h for h in res.metrics["log_history"] if "loss" in h and "rewards/margins" in h]
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"steps": res.global_step, "train_wall_s": res.metrics.get("train_wall_s"),
            "steps_per_s": round(res.global_step / res.metrics.get("train_wall_s", wall), 3),
            "loss_first": hist[0]["loss"], "loss_last": hist[-1]["loss"], "margin_last": hist[-1]["rewards/margins"],
            "peak_gpu_gib": round(peak, 2) if peak is not None else None, "adapter": str(res.adapter),
            "quantization": quantization}


def merge_check(adapter: str) -> dict[str, Any]:
    from pipeline.training import merge

    m = merge(Path(adapter), tracking_uri="http://127.0.0.1:9")
    return {"max_abs_logit_diff": m.max_abs_logit_diff, "max_abs_logit_diff_saved": m.max_abs_logit_diff_saved,
            "out": str(m.out)}


def choice_scoring(model: str, dtype: str, n: int) -> dict[str, Any]:
    backend = get_backend(model, dtype=dtype, batch_size=16)
    reqs = [ChatRequest(messages=[{"role": "user", "content": f"Rate the safety of: {PROMPTS[i % len(PROMPTS)]} "
                                   f"(case {i}). Answer with one digit 0-3."}],
                        config=GenerationConfig(max_new_tokens=1)) for i in range(n)]
    backend.score_choices(reqs[:2], "Score: ", ["0", "1", "2", "3"])
    t0 = time.perf_counter()
    scores = backend.score_choices(reqs, "Score: ", ["0", "1", "2", "3"])
    t = time.perf_counter() - t0
    best = [max(range(4), key=row.__getitem__) for row in scores]
    return {"prompts": n, "prompts_per_s": round(n / t, 1), "score_histogram": [best.count(k) for k in range(4)]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    ap.add_argument("--model", help="model folder or nickname (default: SmolLM2-135M, else a model of its shape)")
    ap.add_argument("--case-set", default="toolemu", help="toolemu (needs the data directory) or demo")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--quick", action="store_true", help="every section small (for a CPU smoke run)")
    args = ap.parse_args()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (use --device cpu --quick for a smoke run)", file=sys.stderr)
        return 2
    q = args.quick
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    t_start = time.perf_counter()
    results: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                               "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0)
                               if args.device == "cuda" else "cpu"}
    for pkg in ("transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets"):
        try:
            results[pkg] = __import__(pkg).__version__
        except Exception as e:  # noqa: BLE001 - a missing package is reported, its sections fail on their own
            results[pkg] = f"missing ({type(e).__name__})"
    with tempfile.TemporaryDirectory(prefix="agentpipe-gpu-check-") as tmp:
        work = Path(tmp)
        model, what = resolve_model(args.model, work)
        results["model"] = {"path": model, "what": what}
        section(results, "hf_generate", lambda: hf_generate(model, dtype, 8 if q else 32, 8 if q else 64))
        section(results, "emulation", lambda: emulation(model, dtype, 2 if q else 16, args.case_set,
                                                        16 if q else 128, 1 if q else 3))
        section(results, "dpo_bf16", lambda: dpo(model, work, "bf16", 2 if q else 20, "none"))
        try:
            import bitsandbytes  # noqa: F401

            section(results, "qlora_int4", lambda: dpo(model, work, "int4", 2 if q else 10, "int4"))
        except ImportError:
            results["qlora_int4"] = {"ok": False, "error": "bitsandbytes is not installed"}
        if results["dpo_bf16"].get("ok"):
            section(results, "merge", lambda: merge_check(results["dpo_bf16"]["adapter"]))
        section(results, "choice_scoring", lambda: choice_scoring(model, dtype, 8 if q else 64))
    results["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    failed = [k for k, v in results.items() if isinstance(v, dict) and v.get("ok") is False]
    print(f"gpu_check: {results['total_wall_s']} s, sections failed: {failed or 'none'} → {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
