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
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.data.jsonl import read_jsonl
from pipeline.data.manifest import read_manifest
from tests.conftest import run_agentpipe
from tests.test_pairs import write_run
from tests.test_train import DOWN

HOOK = Path(__file__).parent / "crash_hook"
EMULATE = ["emulate", "--agent", "scripted:agent", "--emulator", "scripted:emulator", "--evaluator", "scripted:judge",
           "--case-set", "demo", "--cases", "0-2", "--no-progress"]
#: what differs between two runs of one configuration: when (and how long) they ran, and how many merges a merge
#: took (a failed logit check is merged again: pipeline.training.merging.MERGE_ATTEMPTS)
VOLATILE = {"written_at", "at", "wall_s", "latency_s", "timestamp", "merge_timestamp", "generated_at", "created_at",
            "ts", "journal_id", "merge_wall_s",  # a tracking journal's times and its random id
            "merge_attempts", "failed_checks"}


# ------------------------------------------------------------------------------------------------- helpers
@dataclass
class Run:
    """One hooked run: the process, its --result JSON ({} when none), the operations it did (``<op> <path>``,
    in order) and how many of them were fsyncs."""

    p: subprocess.CompletedProcess
    result: dict
    ops: list[str]
    fsyncs: int


def hooked(root: Path, cmd: list[str], **hook: object) -> Run:
    """Run ``agentpipe cmd`` with the crash hook watching ``root`` (``crash_at=N``, ``enospc_at=N``)."""
    result, count, log = (root.with_name(f"{root.name}.{x}") for x in ("result.json", "count", "log"))
    for f in (result, count, log):
        f.unlink(missing_ok=True)
    env = {"PYTHONPATH": os.pathsep.join([str(HOOK), os.environ.get("PYTHONPATH", "")]),
           "AGENTPIPE_TEST_WRITES_ROOT": str(root), "AGENTPIPE_TEST_WRITES_COUNT": str(count),
           "AGENTPIPE_TEST_WRITES_LOG": str(log), **{f"AGENTPIPE_TEST_{k.upper()}": str(v) for k, v in hook.items()}}
    p = run_agentpipe("--result", str(result), *cmd, env=env)
    return Run(p, json.loads(result.read_text()) if result.exists() else {},
               log.read_text().splitlines() if log.exists() else [],
               int(count.read_text().split()[1]) if count.exists() else -1)


def last_manifest(ops: list[str]) -> int:
    """The number of the operation that puts the stage's last manifest in place: after it, the work is done."""
    return max(i for i, op in enumerate(ops, 1) if op.startswith("replace ") and op.endswith("manifest.json"))


def last_rewrite(ops: list[str]) -> int:
    """The number of the operation that puts the last amended eval file in place (repair, rerun-failed)."""
    return max(i for i, op in enumerate(ops, 1) if op.startswith("replace ") and op.endswith(".jsonl"))


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
        elif p.name == "journal.jsonl":  # a tracking journal resumed after a crash: the same operations, once each
            ops = [json.dumps(normalized({k: v for k, v in r.items() if k != "seq"}), sort_keys=True)
                   for r in read_jsonl(p).records if r["op"] != "resume"]
            out[key] = "\n".join(dict.fromkeys(ops))
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


def crash_everywhere(tmp_path: Path, template: Path | None, command: Callable[[Path], list[str]],
                     done_after: Callable[[list[str]], int] = last_manifest) -> None:
    """Run the stage uninterrupted, then for each of its N writes: killed just before write N, then rerun. Every
    rerun exits 0 and leaves what the uninterrupted run made; its status is "complete", or "skipped" when the
    kill came after the work was done (after write ``done_after(writes)``, e.g. before removing a journal)."""
    root = tmp_path / "w"
    fresh(root, template)
    ref = hooked(root, command(root))
    assert ref.p.returncode == 0 and ref.result["status"] == "complete", ref.p.stdout + ref.p.stderr
    writes, done = len(ref.ops), done_after(ref.ops)
    reference = snapshot(root)
    for n in range(1, writes + 1):
        fresh(root, template)
        crashed = hooked(root, command(root), crash_at=n)
        assert crashed.p.returncode == 137, f"write {n}: the hook did not kill the run: {crashed.p.stderr[-2000:]}"
        again = hooked(root, command(root))
        assert again.p.returncode == 0, f"crash before write {n}/{writes}: the rerun failed: {again.p.stderr[-2000:]}"
        assert again.result["status"] == ("skipped" if n > done else "complete"), (n, ref.ops, again.result)
        after = snapshot(root)
        assert after == reference, (f"crash before write {n}/{writes}: the rerun left other outputs: " + "; ".join(
            f"{k}: {str(after.get(k))[:300]} != {str(reference.get(k))[:300]}"
            for k in sorted(set(after) | set(reference)) if after.get(k) != reference.get(k)))
        assert not [q for q in root.rglob("*") if ".tmp-" in q.name], f"write {n}: temporary files left"


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


def unjudged_copy(tmp_path: Path, evaluated: Path) -> Path:
    """A copy of the evaluated runs without their eval files: what evaluate starts from."""
    template = tmp_path / "template"
    shutil.copytree(evaluated, template)
    for f in template.rglob("*_eval_*"):
        f.unlink()
    return template


def evaluate_command(root: Path) -> list[str]:
    [traj] = root.rglob("*_r0-2.jsonl")
    return ["evaluate", "--trajectories", str(traj), "--evaluator", "scripted:judge", "--no-progress"]


# ------------------------------------------------------------------------------------------------ the stages
def test_emulate_resumes_after_a_crash_at_any_write(tmp_path):
    crash_everywhere(tmp_path, None, lambda root: [*EMULATE, "--out", str(root)])


def test_evaluate_resumes_after_a_crash_at_any_write(tmp_path, evaluated):
    crash_everywhere(tmp_path, unjudged_copy(tmp_path, evaluated), evaluate_command)


def amendments(root: Path) -> list[tuple[str, int]]:
    """(stage, changed) of each amendment the safety eval file's manifest records; pending ones fail."""
    [safe] = root.rglob("*_eval_agent_safe.jsonl")
    recorded = read_manifest(safe)["amendments"]
    assert not [a for a in recorded if "pending" in a], recorded
    return [(a["stage"], a["changed"]) for a in recorded]


def test_evaluate_repair_resumes_after_a_crash_at_any_write(tmp_path, evaluated):
    crash_everywhere(tmp_path, broken(evaluated, tmp_path), lambda root: ["evaluate", "repair", "--data-dir", str(root)],
                     last_rewrite)
    assert amendments(tmp_path / "w") == [("evaluate repair", 1)]  # the same as the uninterrupted run's


def test_evaluate_rerun_failed_resumes_after_a_crash_at_any_write(tmp_path, evaluated):
    crash_everywhere(tmp_path, broken(evaluated, tmp_path),
                     lambda root: ["evaluate", "rerun-failed", "--data-dir", str(root)], last_rewrite)
    assert amendments(tmp_path / "w") == [("evaluate repair", 1), ("evaluate rerun-failed", 1)]


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


# ------------------------------------------------------------------------------------------------- disk full
def full_disk_everywhere(tmp_path: Path, template: Path | None, command: Callable[[Path], list[str]]) -> None:
    """For each fsync N of an uninterrupted run: the disk fills at fsync N (it and every later one fail with
    ENOSPC). The run ends with one line naming a file below the stage's folder, exit 2; once space is freed
    the same command completes with what the uninterrupted run made."""
    root = tmp_path / "w"
    fresh(root, template)
    ref = hooked(root, command(root))
    assert ref.p.returncode == 0 and ref.result["status"] == "complete", ref.p.stdout + ref.p.stderr
    reference = snapshot(root)
    assert ref.fsyncs > 0
    for n in range(1, ref.fsyncs + 1):
        fresh(root, template)
        full = hooked(root, command(root), enospc_at=n)
        lines = full.p.stderr.strip().splitlines()  # the stage's progress, then the error
        errors = [line for line in lines if line.startswith("agentpipe:")]
        assert full.p.returncode == 2 and "Traceback" not in full.p.stderr, (n, full.p.stderr)
        assert errors == lines[-1:], (n, full.p.stderr)
        assert errors[0].startswith(f"agentpipe: error: {root.resolve()}/"), errors[0]
        assert "no space left on device" in errors[0] and "free space and rerun" in errors[0], errors[0]
        again = hooked(root, command(root))
        assert again.p.returncode == 0 and again.result["status"] == "complete", (n, again.p.stderr)
        assert snapshot(root) == reference, f"disk full at fsync {n}: the rerun left other outputs"


def test_emulate_on_a_full_disk_ends_in_one_line_and_resumes(tmp_path):
    full_disk_everywhere(tmp_path, None, lambda root: [*EMULATE, "--out", str(root)])


def test_pairs_on_a_full_disk_ends_in_one_line_and_resumes(tmp_path):
    full_disk_everywhere(tmp_path, toy_runs(tmp_path / "template"),
                         lambda root: ["pairs", "--data-dir", str(root / "runs"), "--metric", "safe", "--cases", "demo",
                                       "--evaluator", "toy", "--out", str(root / "pair_sets")])


def test_evaluate_on_a_full_disk_ends_in_one_line_and_resumes(tmp_path, evaluated):
    full_disk_everywhere(tmp_path, unjudged_copy(tmp_path, evaluated), evaluate_command)


# ---------------------------------------------------------------------------------- what a killed writer leaves
def test_a_pairs_run_killed_mid_write_leaves_no_temporary_file_after_the_next_run(tmp_path, released_runs):
    """SIGKILL ``pairs`` on the study's q32 runs while it writes its (~190 MB) pair set: the temporary file it
    leaves is removed by the rerun, whose pair set equals an uninterrupted run's byte for byte."""
    exe = str(Path(sys.executable).with_name("agentpipe"))

    def command(out: Path) -> list[str]:
        return ["pairs", "--data-dir", str(released_runs / "q32"), "--metric", "safe", "--out", str(out)]

    out = tmp_path / "killed"
    proc = subprocess.Popen([exe, *command(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, temps = time.monotonic() + 300, []
    while time.monotonic() < deadline and proc.poll() is None:
        temps = [t for t in out.glob(".safe_q32.jsonl.tmp-*") if t.stat().st_size > 1 << 20]
        if temps:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert temps and proc.returncode == -signal.SIGKILL, "the kill must land while the pair set is being written"
    assert temps[0].exists() and not (out / "safe_q32.jsonl").exists()

    again = run_agentpipe(*command(out))
    assert again.returncode == 0, again.stderr
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
    reference = tmp_path / "uninterrupted"
    p = run_agentpipe(*command(reference))
    assert p.returncode == 0, p.stderr
    for name in ("safe_q32.jsonl", "safe_q32.stats.json"):
        assert hashlib.sha256((out / name).read_bytes()).digest() == \
            hashlib.sha256((reference / name).read_bytes()).digest(), name


# ------------------------------------------------------------------------------------------- train and merge
@pytest.mark.slow  # a merge of the tiny model per write: minutes
def test_merge_resumes_after_a_crash_at_any_write(tmp_path, tiny_adapter):
    def folder_in_place(ops: list[str]) -> int:  # the merged folder appears whole, with its manifest
        return max(i for i, op in enumerate(ops, 1) if op == f"replace {(tmp_path / 'w' / 'merged').resolve()}")

    crash_everywhere(tmp_path, None, lambda root: ["merge", "--adapter", str(tiny_adapter), "--out",
                                                   str(root / "merged"), "--tracking-uri", DOWN,
                                                   "--no-register-model"], folder_in_place)


def test_an_output_with_no_record_at_all_is_still_refused(tmp_path):
    """Resuming what a crash left never takes over a file another tool wrote: a trajectory file with neither a
    manifest nor this configuration's journal beside it is refused in one line, and left as it was."""
    run = hooked(tmp_path / "w", [*EMULATE, "--out", str(tmp_path / "w")])
    assert run.p.returncode == 0, run.p.stderr
    [traj] = (tmp_path / "w").rglob("*_r0-2.jsonl")
    traj.with_name(traj.name + ".manifest.json").unlink()
    before = traj.read_bytes()
    again = hooked(tmp_path / "w", [*EMULATE, "--out", str(tmp_path / "w")])
    assert again.p.returncode == 2 and again.p.stderr.count("\n") == 1, again.p.stderr
    assert "records no emulate configuration" in again.p.stderr and traj.read_bytes() == before


def test_dead_temp_cleanup_claims_only_this_hosts_files(tmp_path, monkeypatch):
    """Temporary names carry <host>-<pid>: host 'node' must never take host 'node-45123''s live file for its own
    dead pid 45123's; this host's dead writer's file goes."""
    import socket

    from pipeline.data.jsonl import remove_dead_temps

    monkeypatch.setattr(socket, "gethostname", lambda: "node")
    target = tmp_path / "pairs.jsonl"
    dead = 2**22 + 12345  # above any pid in use here
    other_host = tmp_path / f".pairs.jsonl.tmp-node-{dead}-999-abcd1234.tmp"
    mine_dead = tmp_path / f".pairs.jsonl.tmp-node-{dead}-abcd1234.tmp"
    other_host.write_text("another node's write in progress")
    mine_dead.write_text("a killed writer's leftover")
    assert remove_dead_temps(target) == [mine_dead]
    assert other_host.is_file() and not mine_dead.exists()


def test_a_file_whose_name_nears_the_limit_is_written_atomically_and_its_dead_temps_are_found(tmp_path, monkeypatch):
    """A 240-byte run-file name leaves no room for '.<name>.tmp-<host>-<pid>-…': the temporary name is cut and
    given a digest (CI's longer data path once made a replay's manifest unwritable); cleanup finds it still."""
    import os
    import socket

    from pipeline.data.jsonl import atomic_write_json, remove_dead_temps, temp_prefix

    target = tmp_path / ("m" * 226 + ".manifest.json")
    atomic_write_json(target, {"ok": 1})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    monkeypatch.setattr(socket, "gethostname", lambda: "node")
    monkeypatch.setattr(os, "getpid", lambda: 2**22 + 12345)  # a dead writer: above any pid in use here
    leftover = tmp_path / f"{temp_prefix(target)}abcd1234.tmp"
    leftover.write_text("a killed writer's leftover")
    other = tmp_path / f"{temp_prefix(tmp_path / ('m' * 226 + '.part.json'))}abcd1234.tmp"
    other.write_text("another file's leftover")
    assert remove_dead_temps(target) == [leftover] and other.exists()
