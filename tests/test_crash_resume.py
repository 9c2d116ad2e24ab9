"""A crash at any instant, a full disk, and what a killed writer leaves (issue 23), tried through ``agentpipe``.

Each stage runs in a subprocess with ``tests/crash_hook`` first on its path: the hook counts the operations that
make the stage's writes durable or visible (fsync, replace, rename, unlink, rmdir below the stage's folder) and
kills the process (``os._exit``, no cleanup) just before the N-th one, for every N. The same command, rerun
without ``--force``, must then complete and leave exactly what an uninterrupted run leaves (byte for byte, except
the times a manifest or report records).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.data.jsonl import read_jsonl
from tests.conftest import run_agentpipe
from tests.test_pairs import write_run
from tests.test_train import DOWN, toy_pair, write_pairs

HOOK = Path(__file__).parent / "crash_hook"
EMULATE = ["emulate", "--agent", "scripted:agent", "--emulator", "scripted:emulator", "--evaluator", "scripted:judge",
           "--case-set", "demo", "--cases", "0-2", "--no-progress"]
#: what differs between two runs of one configuration: when (and how long) they ran
VOLATILE = {"written_at", "at", "wall_s", "latency_s", "timestamp", "merge_timestamp", "generated_at", "created_at"}


# ------------------------------------------------------------------------------------------------- helpers
def hooked(root: Path, cmd: list[str], **hook: object) -> tuple[subprocess.CompletedProcess, dict, int]:
    """Run ``agentpipe cmd`` with the crash hook watching ``root``; (process, --result JSON or {}, operations)."""
    result, count = root.with_name(root.name + ".result.json"), root.with_name(root.name + ".count")
    result.unlink(missing_ok=True)
    count.unlink(missing_ok=True)
    env = {"PYTHONPATH": os.pathsep.join([str(HOOK), os.environ.get("PYTHONPATH", "")]),
           "AGENTPIPE_TEST_WRITES_ROOT": str(root), "AGENTPIPE_TEST_WRITES_COUNT": str(count),
           **{f"AGENTPIPE_TEST_{k.upper()}": str(v) for k, v in hook.items()}}
    p = run_agentpipe("--result", str(result), *cmd, env=env)
    return (p, json.loads(result.read_text()) if result.exists() else {},
            int(count.read_text()) if count.exists() else -1)


def normalized(value: object) -> object:
    if isinstance(value, dict):
        return {k: normalized(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [normalized(v) for v in value]
    return value


def snapshot(root: Path) -> dict[str, str]:
    """Every file below ``root`` (writer locks left out: they say who wrote, not what): JSON documents and JSONL
    records without their times (a record's ``wall_s``, a manifest's ``written_at``), other files by sha256."""
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.suffix == ".lock":
            continue
        key = str(p.relative_to(root))
        if p.suffix == ".json":
            out[key] = json.dumps(normalized(json.loads(p.read_text())), sort_keys=True)
        elif p.suffix == ".jsonl":  # records, in order, without the time each took
            out[key] = "\n".join(json.dumps(normalized(r), sort_keys=True) for r in read_jsonl(p).records)
        else:
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def fresh(root: Path, template: Path | None) -> None:
    """``root`` as the stage's inputs were before it ran (always the same path: outputs record paths)."""
    shutil.rmtree(root, ignore_errors=True)
    if template is None:
        root.mkdir(parents=True)
    else:
        shutil.copytree(template, root)


def crash_everywhere(tmp_path: Path, template: Path | None, command: Callable[[Path], list[str]]) -> int:
    """Run the stage uninterrupted, then once for each of its N writes killed before write N and rerun: every
    rerun completes with what the uninterrupted run made. Returns the number of writes."""
    root = tmp_path / "w"
    fresh(root, template)
    p, res, writes = hooked(root, command(root))
    assert p.returncode == 0 and res["status"] == "complete", p.stdout + p.stderr
    assert writes > 0
    reference = snapshot(root)
    for n in range(1, writes + 1):
        fresh(root, template)
        p, _, _ = hooked(root, command(root), crash_at=n)
        assert p.returncode == 137, f"write {n}: the hook did not kill the run: {p.stderr[-2000:]}"
        again, res, _ = hooked(root, command(root))
        assert again.returncode == 0, f"crash before write {n}/{writes}: the rerun failed: {again.stderr[-2000:]}"
        assert res["status"] in ("complete", "skipped"), res
        after = snapshot(root)
        assert after == reference, (f"crash before write {n}/{writes}: the rerun left other outputs: " + "; ".join(
            f"{k}: {str(after.get(k))[:300]} != {str(reference.get(k))[:300]}"
            for k in sorted(set(after) | set(reference)) if after.get(k) != reference.get(k)))
        assert not [q for q in root.rglob("*") if ".tmp-" in q.name], f"write {n}: temporary files left"
    return writes


# ------------------------------------------------------------------------------------------------ the inputs
@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> Path:
    """A runs folder: one trajectory file (two cases) with its eval files; in the safety file one judgement's
    score is recoverable from its label (repair) and one only by asking again (rerun-failed)."""
    root = tmp_path_factory.mktemp("evaluated") / "runs"
    p = run_agentpipe(*EMULATE, "--out", str(root))
    assert p.returncode == 0, p.stderr
    [traj] = root.rglob("*_r0-2.jsonl")
    p = run_agentpipe("evaluate", "--trajectories", str(traj), "--evaluator", "scripted:judge", "--no-progress")
    assert p.returncode == 0, p.stderr
    return root


def broken(evaluated: Path, tmp_path: Path) -> Path:
    template = tmp_path / "template"
    shutil.copytree(evaluated, template)
    [safe] = template.rglob("*_eval_agent_safe.jsonl")
    records = read_jsonl(safe).records
    records[0] = {"eval_id": 0, "Evaluator Thought": "I am unable to evaluate this.", "eval_scores": {},
                  "status": "parse_failed", "raw": "I am unable to evaluate this.", "evaluator_model": "scripted:judge"}
    records[1] = {"eval_id": 1, "Evaluator Thought": "Overall Qualitative Label: Certain No Risk (3)",
                  "eval_scores": {}, "status": "parse_failed", "evaluator_model": "scripted:judge",
                  "raw": "Overall Qualitative Label: Certain No Risk (3)"}
    safe.write_text("".join(json.dumps(r) + "\n" for r in records))
    return template


# ------------------------------------------------------------------------------------------------ the stages
def test_emulate_resumes_after_a_crash_at_any_write(tmp_path):
    crash_everywhere(tmp_path, None, lambda root: [*EMULATE, "--out", str(root)])


def test_evaluate_resumes_after_a_crash_at_any_write(tmp_path, evaluated):
    template = tmp_path / "template"
    shutil.copytree(evaluated, template)
    for f in template.rglob("*_eval_*"):
        f.unlink()

    def command(root: Path) -> list[str]:
        [traj] = root.rglob("*_r0-2.jsonl")
        return ["evaluate", "--trajectories", str(traj), "--evaluator", "scripted:judge", "--no-progress"]

    crash_everywhere(tmp_path, template, command)


def test_evaluate_repair_resumes_after_a_crash_at_any_write(tmp_path, evaluated):
    crash_everywhere(tmp_path, broken(evaluated, tmp_path), lambda root: ["evaluate", "repair", "--data-dir", str(root)])


def test_evaluate_rerun_failed_resumes_after_a_crash_at_any_write(tmp_path, evaluated):
    crash_everywhere(tmp_path, broken(evaluated, tmp_path),
                     lambda root: ["evaluate", "rerun-failed", "--data-dir", str(root)])


def test_report_resumes_after_a_crash_at_any_write(tmp_path, evaluated):
    template = tmp_path / "template"
    shutil.copytree(evaluated, template / "runs")
    crash_everywhere(tmp_path, template, lambda root: ["report", "--runs", str(root / "runs"), "--out",
                                                       str(root / "reports"), "--no-track"])


def test_analyze_resumes_after_a_crash_at_any_write(tmp_path, evaluated):
    template = tmp_path / "template"
    shutil.copytree(evaluated, template / "runs")
    crash_everywhere(tmp_path, template, lambda root: ["analyze", "aggregate", "--runs", str(root / "runs"),
                                                       "--out", str(root / "aggregate")])


def toy_runs(root: Path) -> Path:
    for model, s, h in zip("abcde", [3, 3, 1, 0, 2], [0, 3, 3, 3, 1]):
        write_run(root / "runs", f"m_{model}", [2], {"safe": [s], "help_ignore_safety": [h]})
    return root


def test_pairs_resumes_after_a_crash_at_any_write(tmp_path):
    template = toy_runs(tmp_path / "template")
    crash_everywhere(tmp_path, template, lambda root: ["pairs", "--data-dir", str(root / "runs"), "--metric", "safe",
                                                       "--cases", "demo", "--evaluator", "toy",
                                                       "--out", str(root / "pair_sets")])
