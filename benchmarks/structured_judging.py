"""Structured judge answers: parse failures and judging time of a small local judge writing its judgement in free
text, and with its answer constrained to the answer format (``evaluate --structured``), same trajectories.

    .venv/bin/python benchmarks/structured_judging.py [--judge vllm:SmolLM2-135M] [--cases 0-8]

The trajectories are the demo's cases emulated by the scripted doubles (``--trajectories`` takes a run file
instead). The judge runs on the vLLM engine (the CPU build here). Printed: per mode, the judgements, how many
parsed, the parse failures, and the wall time; the last line compares the two.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def _pool(cases: str, out: Path) -> Path:
    from pipeline.emulation.runner import EmulationConfig, run_emulation

    return run_emulation(EmulationConfig(agent="scripted:agent", emulator="scripted:emulator", case_set="demo",
                                         cases=cases, out=out, no_progress=True)).path


def _judge(src: Path, judge: str, structured: bool, max_new_tokens: int) -> dict:
    from pipeline.data.jsonl import read_jsonl
    from pipeline.evaluation.runner import EvaluationConfig, run_evaluation

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / src.name
        shutil.copy(src, copy)
        t0 = time.perf_counter()
        res = run_evaluation(EvaluationConfig(trajectories=copy, evaluator=judge, structured=structured,
                                              max_new_tokens=max_new_tokens, no_progress=True))
        seconds = time.perf_counter() - t0
        tokens = sum(((r.get("usage") or {}).get("completion_tokens") or 0)
                     for path in res.eval_files.values() for r in read_jsonl(path).records)
    return {"requests": res.requests, "scored": res.scored, "parse_failed": res.parse_failed,
            "errors": res.errors, "seconds": seconds, "tokens": tokens}


def _warm_up(judge: str) -> None:
    from pipeline.llm import ChatRequest, GenerationConfig, get_backend

    get_backend(judge).generate([ChatRequest(messages=[{"role": "user", "content": "hi"}],
                                             config=GenerationConfig(max_new_tokens=4))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judge", default="vllm:SmolLM2-135M")
    parser.add_argument("--cases", default="0-8", help="demo cases to emulate (START-END)")
    parser.add_argument("--trajectories", type=Path, help="a trajectory file to judge instead")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = args.trajectories or _pool(args.cases, Path(tmp) / "pool")
        _warm_up(args.judge)  # the engine starts once, before either mode is timed
        rows = {}
        for structured in (False, True):
            label = "structured" if structured else "free text"
            r = rows[label] = _judge(src, args.judge, structured, args.max_new_tokens)
            print(f"{label:10s}: {r['requests']} judgements, {r['scored']} parsed, {r['parse_failed']} parse failures,"
                  f" {r['errors']} errors, {r['tokens']} answer tokens, {r['seconds']:.1f} s", flush=True)
    free, constrained = rows["free text"], rows["structured"]
    ratio = constrained["seconds"] / free["seconds"] if free["seconds"] else float("nan")
    print(f"structured judging: parse failures {free['parse_failed']} → {constrained['parse_failed']} of "
          f"{free['requests']}; time {ratio:.2f}× free text")


if __name__ == "__main__":
    main()
