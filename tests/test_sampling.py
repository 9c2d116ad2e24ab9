"""Sampled outputs are a function of (seed, case, request) only (issue 23): the same sampled emulation and the
same sampled evaluation through the command line, on the tiny model at temperature > 0, give byte-identical
records for batch sizes 1, 3 and 8 (and chunk sizes 1, 3 and 256), and after a SIGKILL and a resume. The only
fields dropped before comparing are timings: ``wall_s`` and ``usage.<role>.latency_s`` of trajectory records,
``usage.latency_s`` of judgements. (The OOM-halving path is covered in test_llm_hf.py, where it can be forced.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.conftest import run_agentpipe



def _emulate_args(tiny_model: Path, out: Path, batch_size: int, seed: int = 5) -> list[str]:
    # demo cases; a small per-call cap and agent-token budget so that cases end after one or two agent calls
    return ["emulate", "--agent", str(tiny_model), "--emulator", "scripted:emulator", "--case-set", "demo",
            "--cases", "0-4", "--max-steps", "3", "--max-continuations", "3", "--max-tokens-per-call", "12",
            "--max-agent-tokens", "16", "--agent-temperature", "1.0", "--agent-seed", str(seed),
            "--batch-size", str(batch_size), "--out", str(out), "--no-progress"]


def _evaluate_args(traj: Path, model: Path, batch_size: int, chunk_size: int) -> list[str]:
    return ["evaluate", "--trajectories", str(traj), "--evaluator", str(model),
            "--metrics", "safe", "--replicates", "2", "--temperature", "1.0", "--max-new-tokens", "8",
            "--batch-size", str(batch_size), "--chunk-size", str(chunk_size), "--no-progress"]


def _without_timings(value):
    """``value`` without its ``wall_s`` and ``latency_s`` fields, at any depth (usage, usage per role, usage of
    each replicate): the only fields of these records that measure the run rather than the answers."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in ("wall_s", "latency_s")}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _records(path: Path) -> list[dict]:
    return [_without_timings(json.loads(line)) for line in path.read_text().splitlines()]


def _run(args: list[str]) -> None:
    p = run_agentpipe(*args)
    assert p.returncode == 0, p.stderr


def _kill_part_way(args: list[str], part: Path, total: int) -> int:
    """Run the command and kill it (as SIGKILL does: ``os._exit``, no cleanup) right after its first append to
    the journal ``part`` was written, before anything else: the crash hook of tests/test_crash_resume.py, so the
    kill lands part-way whatever the machine's load. The number of records it left."""
    from tests.test_crash_resume import HOOK

    env = {"PYTHONPATH": os.pathsep.join([str(HOOK), os.environ.get("PYTHONPATH", "")]),
           "AGENTPIPE_TEST_WRITES_ROOT": str(part.parent), "AGENTPIPE_TEST_CRASH_AT": "1",
           "AGENTPIPE_TEST_CRASH_SUFFIX": part.name}
    p = run_agentpipe(*args, env=env)
    assert p.returncode == 137, p.stderr
    left = part.read_bytes().count(b"\n") if part.exists() else 0
    assert 0 < left < total, f"the kill must land part-way ({left} of {total} records)"
    return left


def test_sampled_emulation_and_evaluation_do_not_depend_on_batch_chunk_or_resume(tiny_model, tmp_path):
    (tmp_path / "tiny").symlink_to(tiny_model)
    model = tmp_path / "tiny"
    runs = {b: tmp_path / f"emu-b{b}" for b in (1, 3, 8)}
    for b, out in runs.items():
        _run(_emulate_args(model, out, b))
    files = {b: next(out.glob("*/*.jsonl")) for b, out in runs.items()}
    reference = _records(files[8])
    assert len(reference) == 4
    for b in (1, 3):
        assert _records(files[b]) == reference, f"batch size {b}"
    assert len({r["finish_reason"] for r in reference} | {r["usage"]["agent"]["calls"] for r in reference}) > 1
    # the seed matters: another seed samples other answers
    other = tmp_path / "emu-seed6"
    _run(_emulate_args(model, other, 8, seed=6))
    assert [r["intermediate_steps"] for r in _records(next(other.glob("*/*.jsonl")))] != \
        [r["intermediate_steps"] for r in reference]

    # killed part-way at batch size 1, resumed at batch size 3
    resumed = tmp_path / "emu-resumed"
    name = files[8].relative_to(runs[8])
    part = resumed / name.parent / (name.name + ".part")
    _kill_part_way(_emulate_args(model, resumed, 1), part, 4)
    _run(_emulate_args(model, resumed, 3))
    assert _records(resumed / name) == reference

    # the same sampled evaluation of one trajectory file, copied beside itself per run
    evals = {}
    for b, c in ((1, 1), (3, 3), (8, 256), ("resumed", 1)):
        folder = tmp_path / "judged" / f"run-{b}" / files[8].parent.name
        folder.mkdir(parents=True)
        traj = folder / files[8].name
        traj.write_bytes(files[8].read_bytes())
        manifest = files[8].with_name(files[8].name + ".manifest.json")
        if manifest.exists():
            (folder / manifest.name).write_bytes(manifest.read_bytes())
        args = _evaluate_args(traj, model, 1 if b == "resumed" else b, c)
        if b == "resumed":
            eval_name = next(p.name for p in evals[1].parent.iterdir() if p.name.endswith("_eval_agent_safe.jsonl"))
            _kill_part_way(args, folder / (eval_name + ".part"), 8)
            args = _evaluate_args(traj, model, 8, 3)
        _run(args)
        evals[b] = next(folder.glob("*_eval_agent_safe.jsonl"))
    judged = _records(evals[8])
    assert len(judged) == 4 and all(len(r["replicates"]) == 2 for r in judged)
    assert any(r["replicates"][0]["raw"] != r["replicates"][1]["raw"] for r in judged)  # replicates sample apart
    for b in (1, 3, "resumed"):
        assert _records(evals[b]) == judged, f"evaluation {b}"


def test_a_sampled_emulation_needs_a_seed(tmp_path):
    p = run_agentpipe("emulate", "--agent", "scripted:agent", "--emulator", "scripted:emulator", "--case-set", "demo",
                      "--agent-temperature", "0.7", "--out", str(tmp_path), "--no-progress")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "--agent-temperature > 0 needs --agent-seed" in p.stderr
    assert not any(tmp_path.iterdir())
