"""StageOperator with local compute: through Airflow itself (a DAG built here, run with dag.test()), plus on_kill
and the pieces that need no Airflow runtime."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pendulum
import pytest

from plugins.stage_operator import StageOperator, resolve_compute, safe_path_part, stage_argv

DEMO = {"agent": "scripted:agent", "emulator": "scripted:emulator", "case_set": "demo", "no_progress": True}


def _context(dag_id="d", task_id="t", run_id="manual__2026-01-01T00:00:00+00:00", map_index=-1, params=None):
    ti = SimpleNamespace(dag_id=dag_id, task_id=task_id, map_index=map_index, try_number=1)
    return {"ti": ti, "run_id": run_id, "params": params or {}}


# ------------------------------------------------------------------------------------------------- no runtime


def test_stage_argv_and_paths(tmp_path):
    assert stage_argv("agentpipe", "evaluate repair", "s.json", "r.json") == \
        ["agentpipe", "--result", "r.json", "evaluate", "repair", "--spec", "s.json"]
    with pytest.raises(ValueError):
        stage_argv("agentpipe", "--spec x", "s", "r")
    op = StageOperator(task_id="emulate", stage="emulate", spec=DEMO, home=str(tmp_path))
    spec, result = op._paths(_context(dag_id="toolemu_evaluation", map_index=3), tmp_path)
    assert spec == tmp_path / "specs" / "toolemu_evaluation" / "manual__2026-01-01T00_00_00_00_00" / "emulate_3.json"
    assert result.name == "emulate_3.result.json"
    assert safe_path_part("scheduled__2026-01-01T00:00:00+00:00") == "scheduled__2026-01-01T00_00_00_00_00"
    op._write_spec(spec)
    assert json.loads(spec.read_text()) == DEMO


def test_compute_resolution(monkeypatch):
    monkeypatch.delenv("AGENTPIPE_COMPUTE", raising=False)
    assert resolve_compute(None) == "local"
    monkeypatch.setenv("AGENTPIPE_COMPUTE", "slurm")
    assert resolve_compute(None) == "slurm"
    assert resolve_compute("LOCAL") == "local"
    with pytest.raises(Exception, match="expected one of local, slurm"):
        resolve_compute("kubernetes")


def test_a_failed_variable_lookup_is_an_error_not_a_silent_local_run(monkeypatch):
    from airflow.sdk import Variable
    from airflow.sdk.exceptions import AirflowException

    def down(*args, **kwargs):
        raise ConnectionError("API server unreachable")

    monkeypatch.setenv("AGENTPIPE_COMPUTE", "local")
    monkeypatch.setattr(Variable, "get", staticmethod(down))
    with pytest.raises(AirflowException, match="cannot read the Airflow Variable agentpipe_compute.*unreachable"):
        resolve_compute(None)
    assert resolve_compute("slurm") == "slurm"  # an explicit choice needs no lookup


def test_environment_for_the_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    op = StageOperator(task_id="t", stage="emulate", spec=DEMO, env={"AGENTPIPE_PROGRESS_EVERY": "1"})
    env = op._stage_env(_context(params={"mlflow_parent_run_id": "parent123"}), tmp_path)
    assert env["AGENTPIPE_HOME"] == str(tmp_path) and env["AGENTPIPE_PROGRESS_EVERY"] == "1"
    assert env["AGENTPIPE_MLFLOW_PARENT_RUN_ID"] == "parent123"
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert env["AIRFLOW_CTX_DAG_ID"] == "d" and env["AIRFLOW_CTX_TASK_ID"] == "t"
    explicit = StageOperator(task_id="t", stage="emulate", mlflow_parent_run_id="p2", mlflow_tracking_uri="file:/x")
    env = explicit._stage_env(_context(params={"mlflow_parent_run_id": "parent123"}), tmp_path)
    assert (env["AGENTPIPE_MLFLOW_PARENT_RUN_ID"], env["MLFLOW_TRACKING_URI"]) == ("p2", "file:/x")


def test_resources_rule_and_override_without_clobbering_airflow_resources():
    op = StageOperator(task_id="t", stage="emulate", spec={"agent": "Llama3.3-70B", "emulator": "gpt-5-mini",
                                                           "quantization": "int4"})
    r = op.job_resources()
    assert (r.gpus, r.gpu_constraint, r.tier) == (1, "big", "big")
    over = StageOperator(task_id="t2", stage="emulate", spec={"agent": "Qwen3-8B"}, resources={"mem": "32G",
                                                                                             "time": "01:00:00"})
    assert over.resources is None  # BaseOperator's executor resources stay untouched
    assert (over.job_resources().mem, over.job_resources().time, over.job_resources().gpus) == ("32G", "01:00:00", 1)
    assert StageOperator(task_id="t3", stage="pairs", models=["Qwen3-8B"]).job_resources().gpus == 0
    assert "spec" in StageOperator.template_fields and "compute" in StageOperator.template_fields


def test_on_kill_local_kills_the_process_group(tmp_path, monkeypatch):
    slow = {"agent": "scripted:agent?delay=5", "emulator": "scripted:emulator?delay=5"}  # each batched call: 5 s
    op = StageOperator(task_id="k", stage="emulate", spec={**DEMO, **slow, "cases": "0-2"}, compute="local",
                       home=str(tmp_path), kill_grace=5)
    spec = tmp_path / "k.json"
    op._write_spec(spec)
    outcome: dict = {}

    def target():
        try:
            op._execute_local({}, spec, tmp_path / "k.result.json", {"AGENTPIPE_HOME": str(tmp_path)}, tmp_path)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while op._proc is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert op._proc is not None, "the stage did not start"
    pid = op._proc.pid
    time.sleep(1.0)  # let it get going (imports, first batched call)
    t0 = time.monotonic()
    op.on_kill()
    thread.join(20)
    assert not thread.is_alive()
    assert time.monotonic() - t0 < 5
    assert "was killed" in str(outcome.get("error"))
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # nothing of the process group is left
    assert not (tmp_path / "k.result.json").exists()


def test_a_stage_refused_for_its_configuration_fails_without_retry(tmp_path):
    """Exit code 2 (bad configuration or input) fails the task at once: a retry would fail the same way. Any
    other failure stays retryable, and an incomplete stage says so."""
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    op = StageOperator(task_id="bad", stage="emulate", spec={**DEMO, "cases": "0-2", "emulatr": "x"},
                       compute="local", home=str(tmp_path))
    spec = tmp_path / "bad.json"
    op._write_spec(spec)
    with pytest.raises(AirflowFailException, match="(?s)failed with exit code 2.*unknown option 'emulatr'"):
        op._execute_local({}, spec, tmp_path / "bad.result.json", {"AGENTPIPE_HOME": str(tmp_path)}, tmp_path)
    outage = tmp_path / "outage"
    outage.touch()  # every request of the test double fails while it exists
    down = StageOperator(task_id="down", stage="emulate", spec={**DEMO, "agent": f"scripted:agent?fail_while={outage}",
                                                                "cases": "0-2", "max_attempts": 1},
                         compute="local", home=str(tmp_path))
    spec = tmp_path / "down.json"
    down._write_spec(spec)
    with pytest.raises(AirflowException) as info:
        down._execute_local({}, spec, tmp_path / "down.result.json",
                            {"AGENTPIPE_HOME": str(tmp_path)}, tmp_path)
    assert not isinstance(info.value, AirflowFailException)  # an outage: retried
    assert "is incomplete (exit code 1; counts {'cases': 2, 'failed': 2" in str(info.value)


def test_a_slurm_job_out_of_time_is_retried_once_with_twice_the_time(tmp_path):
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    from plugins.slurm.core import SlurmSettings

    op = StageOperator(task_id="emulate", stage="emulate", spec=DEMO, compute="slurm", home=str(tmp_path))
    op._hook = SimpleNamespace(settings=SlurmSettings())
    context = _context(task_id="emulate")
    spec_path, result_path = op._paths(context, tmp_path)
    spec_path.parent.mkdir(parents=True)
    log = tmp_path / "job.out"
    log.write_text("working\n")
    event = {"job_id": "7", "state": "TIMEOUT", "exit_code": "0:15", "log_path": str(log), "elapsed_s": 10800}
    assert op.job_resources().time == "03:00:00"
    with pytest.raises(AirflowException, match="the retry gets time 06:00:00") as first:
        op.execute_complete(context, event, job_name="j", result_path=str(result_path))
    assert not isinstance(first.value, AirflowFailException)
    bumps = json.loads(op._bumps_path(spec_path).read_text())
    assert op.job_resources(bumps).time == "06:00:00"  # what the next attempt submits with
    with pytest.raises(AirflowFailException, match="(?s)ended TIMEOUT.*already retried"):
        op.execute_complete(context, event, job_name="j", result_path=str(result_path))
    with pytest.raises(AirflowFailException, match="ended FAILED"):  # exit code 2: no retry
        op.execute_complete(context, {**event, "state": "FAILED", "exit_code": "2:0"}, job_name="j",
                            result_path=str(result_path))
    for state in ("PREEMPTED", "NODE_FAIL", "BOOT_FAIL"):  # the cluster's doing: retried as it was
        with pytest.raises(AirflowException, match=f"ended {state}") as info:
            op.execute_complete(context, {**event, "state": state}, job_name="j", result_path=str(result_path))
        assert not isinstance(info.value, AirflowFailException) and "the retry gets" not in str(info.value)


def test_a_retry_reattaches_to_the_earlier_attempts_job_while_it_runs(tmp_path, monkeypatch):
    from airflow.sdk.exceptions import TaskDeferred

    import plugins.stage_operator as so
    from plugins.slurm.core import JobInfo, SlurmSettings

    submitted = []
    hook = SimpleNamespace(settings=SlurmSettings(), submit=lambda argv, **kw: submitted.append(argv) or str(
        100 + len(submitted)))
    states = {"101": "RUNNING"}
    monkeypatch.setattr(so, "job_state", lambda settings, job_id, **kw: JobInfo(job_id, states[job_id]))
    op = StageOperator(task_id="emulate", stage="emulate", spec=DEMO, compute="slurm", home=str(tmp_path))
    op._hook = hook
    ti = SimpleNamespace(dag_id="d", task_id="emulate", map_index=-1, try_number=1, xcom_push=lambda **kw: None)
    context = {"ti": ti, "run_id": "r", "params": {}}
    spec_path, result_path = op._paths(context, tmp_path)
    spec_path.parent.mkdir(parents=True)

    def attempt():
        with pytest.raises(TaskDeferred) as deferred:
            op._execute_slurm(context, spec_path, result_path, {}, tmp_path)
        return deferred.value.trigger.job_id

    assert attempt() == "101" and len(submitted) == 1
    assert attempt() == "101" and len(submitted) == 1  # the first job still runs: followed, not submitted again
    states["101"] = "PREEMPTED"
    states["102"] = "PENDING"
    assert attempt() == "102" and len(submitted) == 2  # it ended: a fresh job


# ------------------------------------------------------------------------------------------------ dag.test()


def test_local_stages_through_airflow(run_dag, tmp_path, monkeypatch):
    """One DAG run: a stage with the compute taken from $AGENTPIPE_COMPUTE, a mapped stage (spec per map index),
    and a failing stage whose error carries the one-line agentpipe error."""
    from airflow.sdk import DAG

    monkeypatch.setenv("AGENTPIPE_COMPUTE", "local")
    errors: dict[str, str] = {}

    def on_failure(context):
        errors[context["ti"].task_id] = str(context.get("exception"))

    with DAG("agentpipe_test_stage_local", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
             catchup=False, default_args={"on_failure_callback": on_failure}) as dag:
        StageOperator(task_id="emulate", stage="emulate", spec={**DEMO, "cases": "{{ params.cases }}"},
                      home=str(tmp_path), params={"cases": "0-2"})
        StageOperator.partial(task_id="shard", stage="emulate", compute="local", home=str(tmp_path),
                              resources={"mem": "1G"}).expand(spec=[{**DEMO, "cases": "0-1"}, {**DEMO, "cases": "1-2"}])
        StageOperator(task_id="bad", stage="emulate", compute="local", home=str(tmp_path),
                      spec={**DEMO, "case_set": "no-such-set"})
    dr, xcoms = run_dag(dag)

    states = {(ti.task_id, ti.map_index): ti.state for ti in dr.get_task_instances()}
    assert states == {("emulate", -1): "success", ("shard", 0): "success", ("shard", 1): "success",
                      ("bad", -1): "failed"}
    result = xcoms[("emulate", -1, "return_value")]
    assert result["counts"]["cases"] == 2 and result["counts"]["failed"] == 0 and result["exit_code"] == 0
    trajectories = Path(result["outputs"]["trajectories"])
    assert trajectories.is_file() and trajectories.is_relative_to(tmp_path)
    assert len(trajectories.read_text().splitlines()) == 2
    run_dir = tmp_path / "specs" / dag.dag_id / safe_path_part(dr.run_id)
    assert json.loads((run_dir / "emulate.json").read_text())["cases"] == "0-2"  # templated from params
    assert {json.loads((run_dir / f"shard_{i}.json").read_text())["cases"] for i in (0, 1)} == {"0-1", "1-2"}
    assert {xcoms[("shard", i, "return_value")]["counts"]["cases"] for i in (0, 1)} == {1}
    assert "failed with exit code 2" in errors["bad"]
    assert "agentpipe: error: case set 'no-such-set'" in errors["bad"]
