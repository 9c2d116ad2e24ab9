"""Every output is bound to the configuration that made it (issue 13), tried through ``agentpipe`` as a user would.

The generic test walks every registered stage (``pipeline.stage.STAGES``): run it on tiny inputs, rerun it
unchanged (skipped), rerun it with one result-changing option changed (refused in one line naming the option's
old and new value, exit 2, not one byte of any output changed). A stage added later without an entry here fails
``test_every_stage_is_walked``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.data.jsonl import read_jsonl
from pipeline.data.manifest import read_manifest
from pipeline.data.split import test_cases as split_test_cases
from pipeline.data.split import train_cases as split_train_cases
from tests.conftest import run_agentpipe
from tests.test_pairs import write_run
from tests.test_train import DOWN, toy_pair, write_pairs

EMULATE = ["emulate", "--agent", "scripted:agent", "--emulator", "scripted:emulator", "--evaluator", "scripted:judge",
           "--case-set", "demo", "--cases", "0-3", "--no-progress"]


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root`` (writer locks say who wrote, not what: left out)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix != ".lock"}


def agentpipe(tmp: Path, *args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    """Run a command with ``--result`` (written beside ``tmp``, not in it); (process, result JSON or {})."""
    result = tmp.with_name(tmp.name + ".result.json")
    result.unlink(missing_ok=True)
    p = run_agentpipe("--result", str(result), *args, env=env)
    return p, json.loads(result.read_text()) if result.exists() else {}


def refused(p: subprocess.CompletedProcess, stage: str, change: str) -> None:
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert f"made by a different {stage} configuration" in lines[0] and change in lines[0], lines[0]


# ------------------------------------------------------------------------------------------------ the stages
@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model):
    """Tiny inputs for every stage; each entry: (command, changed option, the change in the refusal)."""
    root = tmp_path_factory.mktemp("fp")
    runs = root / "runs"
    p, res = agentpipe(root, *EMULATE, "--out", str(runs))
    assert p.returncode == 0, p.stderr
    traj = Path(res["outputs"]["trajectories"])
    p, res = agentpipe(root, "evaluate", "--trajectories", str(traj), "--evaluator", "scripted:judge")
    assert p.returncode == 0, p.stderr
    # exactly one judgement neither score nor label can be recovered from (only rerun-failed's re-asking mends
    # it); every other one scored, whatever the scripted judge answered, so evaluate repair has nothing to mend
    for eval_type, path in res["outputs"]["eval_files"].items():
        path = Path(path)
        key = "ToolCallRisk" if eval_type == "agent_safe" else "Helpfulness"
        records = [r if (r.get("eval_scores") or {}).get(key) is not None else
                   {**r, "Overall Quantitative Score": "2", "eval_scores": {key: 2}, "status": "ok"}
                   for r in read_jsonl(path).records]
        if eval_type == "agent_safe":
            records[0] = {"eval_id": 0, "Evaluator Thought": "I am unable to evaluate this.", "eval_scores": {},
                          "status": "parse_failed", "raw": "I am unable to evaluate this.",
                          "evaluator_model": "scripted:judge"}
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    other_runs = root / "other_runs"
    pair_runs, pair_runs2 = root / "pair_runs", root / "pair_runs2"
    for model, s, h in zip("abcde", [3, 3, 1, 0, 2], [0, 3, 3, 3, 1]):
        write_run(pair_runs, f"m_{model}", [2], {"safe": [s], "help_ignore_safety": [h]})
        write_run(pair_runs2, f"m_{model}", [2], {"safe": [s], "help_ignore_safety": [h]})
    pairs = write_pairs(root / "pairs" / "safe_toy.jsonl", [toy_pair(c) for c in split_train_cases(0)[:4]]
                        + [toy_pair(c) for c in split_test_cases(0)[:2]])
    model_dir = root / "models" / "m"
    train = ["train", "--model", str(tiny_model), "--pairs", str(pairs), "--seed", "0", "--out", str(model_dir),
             "--max-steps", "1", "--gradient-accumulation-steps", "1", "--save-steps", "1000", "--no-final-eval",
             "--tracking-uri", DOWN, "--no-register-model"]
    stages = {
        "emulate": (EMULATE + ["--out", str(runs)], ["--agent-seed", "5"], "agent_seed null → 5"),
        "evaluate": (["evaluate", "--trajectories", str(traj), "--evaluator", "scripted:judge", "--no-progress"],
                     ["--seed", "7"], "seed 42 → 7"),
        "evaluate repair": (["evaluate", "repair", "--data-dir", str(runs)], None, None),
        "evaluate rerun-failed": (["evaluate", "rerun-failed", "--data-dir", str(runs)], ["--temperature", "0.5"],
                                  "temperature 0.3 → 0.5"),
        "report": (["report", "--runs", str(runs), "--out", str(root / "reports"), "--no-track"],
                   ["--runs", str(other_runs)], f'runs "{runs}" → "{other_runs}"'),
        "pairs": (["pairs", "--data-dir", str(pair_runs), "--metric", "safe", "--cases", "demo", "--evaluator", "toy",
                   "--out", str(root / "pair_sets")], ["--data-dir", str(pair_runs2)], "data_dir"),
        "train": (train, ["--lora-r", "4"], "lora_r 16 → 4"),
        "merge": (["merge", "--adapter", str(model_dir / "adapter"), "--tracking-uri", DOWN, "--no-register-model"],
                  ["--dtype", "bfloat16"], 'dtype "float32" → "bfloat16"'),
        "analyze aggregate": (["analyze", "aggregate", "--runs", str(runs), "--out", str(root / "aggregate")],
                              ["--split", "test", "--seed", "0"], 'split "all" → "test"'),
        "analyze all": (["analyze", "all", "--runs", str(runs), "--out", str(root / "analysis"), "--n-bootstrap",
                         "0", "--no-track"], ["--n-bootstrap", "10"], "n_bootstrap 0 → 10"),
    }
    return root, stages, runs, other_runs


def test_every_stage_is_walked():
    from pipeline.cli import build_parser
    from pipeline.stage import STAGES

    build_parser()  # imports every stage module
    assert set(STAGES) == {"emulate", "evaluate", "evaluate repair", "evaluate rerun-failed", "report", "pairs",
                           "train", "merge", "analyze aggregate", "analyze all"}


#: what a stage's first run in the world says, where that is not "complete"
FIRST_RUN_STATUS = {"emulate": "skipped", "evaluate": "skipped", "evaluate repair": "skipped"}


@pytest.mark.parametrize("stage", ["emulate", "evaluate", "evaluate repair", "evaluate rerun-failed", "report",
                                   "pairs", "train", "merge", "analyze aggregate", "analyze all"])
def test_a_stage_skips_an_unchanged_rerun_and_refuses_a_changed_one(world, stage):
    from pipeline.cli import build_parser
    from pipeline.stage import STAGES

    build_parser()  # registers every stage (whether or not another test did so first)

    root, stages, runs, other_runs = world
    command, change, shown = stages[stage]
    if stage == "report":
        shutil.copytree(runs, other_runs, dirs_exist_ok=True)
    first, res = agentpipe(root, *command)
    assert first.returncode == 0, first.stdout + first.stderr
    # the world fixture already ran emulate and evaluate with these options, and left evaluate repair nothing it
    # can mend (its one missing judgement is unfixable: only rerun-failed's re-asking helps); every other stage
    # does its work here for the first time
    assert res["stage"] == stage and res["status"] == FIRST_RUN_STATUS.get(stage, "complete")
    if stage == "evaluate repair":
        assert res["counts"]["repaired"] == 0 and res["counts"]["unfixable"] >= 1, res["counts"]
    again, res = agentpipe(root, *command)
    assert again.returncode == 0 and res["status"] == "skipped", again.stdout + again.stderr
    if change is None:  # no option changes what this stage produces: only versions are in its fingerprint
        assert set(STAGES[stage].model_construct().fingerprint()) == {"versions"}
        return
    before = snapshot(root)
    p, _ = agentpipe(root, *command, *change)
    refused(p, stage, shown)
    assert snapshot(root) == before


# ----------------------------------------------------------------------------------------------- one by one
@pytest.fixture
def trajectory(tmp_path):
    p, res = agentpipe(tmp_path, *EMULATE, "--out", str(tmp_path / "runs"))
    assert p.returncode == 0, p.stderr
    return Path(res["outputs"]["trajectories"])


def test_a_finished_three_replicate_evaluation_is_never_replaced_by_a_default_rerun(tmp_path, trajectory):
    args = ["evaluate", "--trajectories", str(trajectory), "--evaluator", "scripted:judge", "--no-progress"]
    p, res = agentpipe(tmp_path, *args, "--replicates", "3", "--temperature", "0.7")
    assert p.returncode == 0 and res["status"] == "complete", p.stderr
    folder = trajectory.parent
    before = snapshot(folder)
    p, _ = agentpipe(tmp_path, *args)  # default options: one replicate at temperature 0
    refused(p, "evaluate", "replicates 3 → 1")
    assert snapshot(folder) == before
    p, res = agentpipe(tmp_path, *args, "--force")
    assert p.returncode == 0 and res["status"] == "complete", p.stderr
    for eval_file in res["outputs"]["eval_files"].values():
        [old] = folder.glob(Path(eval_file).name + ".replaced-*")  # the 3-replicate file, kept aside as it was
        assert hashlib.sha256(old.read_bytes()).hexdigest() == before[Path(eval_file).name]
        assert all("replicates" not in r for r in read_jsonl(Path(eval_file)).records)  # the new one: flat
        assert read_manifest(eval_file)["config"]["replicates"] == 1


def test_a_killed_evaluation_rerun_with_another_seed_is_refused(tmp_path):
    p, res = agentpipe(tmp_path, *EMULATE[:-3], "--cases", "0-8", "--no-progress", "--out", str(tmp_path / "runs"))
    assert p.returncode == 0, p.stderr
    traj = Path(res["outputs"]["trajectories"])
    args = [str(Path(sys.executable).with_name("agentpipe")), "evaluate", "--trajectories", str(traj), "--evaluator",
            "scripted:judge?delay=0.3", "--replicates", "2", "--temperature", "0.5", "--seed", "42", "--chunk-size",
            "2", "--no-progress"]  # slowed down, so that the kill lands part-way
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    parts = []
    while time.monotonic() < deadline and not parts:
        parts = [p for p in traj.parent.glob("*.part") if p.read_bytes().count(b"\n") >= 1]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert parts, "the kill must land after the first judgements were saved"
    before = snapshot(traj.parent)
    p, _ = agentpipe(tmp_path, *[("7" if a == "42" else a) for a in args[1:]])
    refused(p, "evaluate", "seed 42 → 7")
    assert snapshot(traj.parent) == before
    p, res = agentpipe(tmp_path, *args[1:])  # the same command resumes and completes
    assert p.returncode == 0 and res["status"] == "complete", p.stderr


def test_emulate_rerun_with_another_compat_or_agent_seed_is_refused(tmp_path, trajectory):
    folder = trajectory.parent.parent
    before = snapshot(folder)
    for change, shown in [(["--compat", "study"], 'compat "correct" → "study"'),
                          (["--agent-seed", "3"], "agent_seed null → 3")]:
        p, _ = agentpipe(tmp_path, *EMULATE, "--out", str(folder), *change)
        refused(p, "emulate", shown)
        assert snapshot(folder) == before
    p, res = agentpipe(tmp_path, *EMULATE, "--out", str(folder), "--compat", "study", "--force")
    assert p.returncode == 0 and res["status"] == "complete", p.stderr
    assert read_manifest(trajectory)["config"]["compat"] == "study"
    assert len(list(trajectory.parent.glob(trajectory.name + ".replaced-*"))) == 1


def test_an_evaluation_whose_every_request_failed_is_incomplete_and_the_rerun_retries_it(tmp_path, trajectory):
    outage = tmp_path / "outage"
    outage.touch()  # every request of the test double fails while it exists
    args = ["evaluate", "--trajectories", str(trajectory), "--evaluator", f"scripted:judge?fail_while={outage}",
            "--metrics", "safe", "--no-progress"]
    p, res = agentpipe(tmp_path, *args)
    assert p.returncode == 1, p.stdout + p.stderr
    assert res["status"] == "incomplete" and res["counts"]["errors"] == 3 and res["counts"]["scored"] == 0
    assert "evaluate: incomplete: agent_safe with failed requests" in p.stderr and "Traceback" not in p.stderr
    [eval_file] = res["outputs"]["eval_files"].values()
    assert read_manifest(eval_file)["status"] == "incomplete"
    outage.unlink()
    p, res = agentpipe(tmp_path, *args)  # the outage is over: the same command retries exactly the 3 failed
    assert p.returncode == 0 and res["status"] == "complete", p.stderr
    assert res["counts"]["requests"] == 3 and res["counts"]["errors"] == 0
    assert read_manifest(eval_file)["status"] == "complete"
    assert all(r.get("status") != "error" for r in read_jsonl(Path(eval_file)).records)
    p, res = agentpipe(tmp_path, *args)
    assert p.returncode == 0 and res["status"] == "skipped"


def test_analysis_reads_only_what_it_builds_from_the_current_runs(tmp_path):
    runs = tmp_path / "runs"
    for model in ("m_a", "m_b", "m_c"):
        p, _ = agentpipe(tmp_path, *EMULATE[:-1], "--agent-label", model, "--out", str(runs), "--no-progress")
        assert p.returncode == 0, p.stderr
        traj = next((runs / model).glob("*.jsonl"))
        p, _ = agentpipe(tmp_path, "evaluate", "--trajectories", str(traj), "--evaluator", "scripted:judge",
                         "--no-progress")
        assert p.returncode == 0, p.stderr
    out = tmp_path / "analysis"
    args = ["analyze", "all", "--runs", str(runs), "--out", str(out), "--n-bootstrap", "0", "--no-track"]
    p, res = agentpipe(tmp_path, *args)
    assert p.returncode == 0, p.stderr
    assert res["counts"]["rows_analysed"] == 3
    stale = next((out / "reports" / "all").rglob("*m_c*_unified_report.json"))
    shutil.copy(stale, stale.with_name(stale.name.replace("m_c", "m_zombie")))  # a report no run backs
    shutil.rmtree(runs / "m_c")  # a model removed from --runs
    p, res = agentpipe(tmp_path, *args)
    assert p.returncode == 0 and res["status"] == "complete", p.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["rows_analysed"] == 2 == res["counts"]["rows_analysed"]
    assert not list(out.rglob("*m_zombie*")) and not list(out.rglob("*m_c_*_unified_report.json"))
