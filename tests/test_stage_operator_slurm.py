"""StageOperator with compute "slurm", through Airflow itself (dag.test(), the trigger runs inline) against the
real single-node Slurm cluster: a stage completes as a Slurm job, an invalid spec fails the task with FAILED and
the log tail, a job cancelled while running is reported as CANCELLED. Skips without Slurm unless
AGENTPIPE_REQUIRE_SLURM=1. initial_delay 0 is safe under dag.test() (no scheduler, so no deferral race)."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pendulum
import pytest

from plugins.stage_operator import StageOperator, safe_path_part

pytestmark = pytest.mark.slurm

DAG_ID = "agentpipe_test_stage_slurm"
DEMO = {"agent": "scripted:agent", "emulator": "scripted:emulator", "case_set": "demo", "cases": "0-2",
        "no_progress": True}


def _slow(seconds: float) -> dict[str, str]:
    """The demo's test doubles, each batched call of either waiting ``seconds`` first."""
    return {"agent": f"scripted:agent?delay={seconds}", "emulator": f"scripted:emulator?delay={seconds}"}


def _cancel_when_running(name_part: str, stop: threading.Event, seen: dict) -> None:
    """scancel the job whose name contains name_part once it has run for a moment."""
    while not stop.is_set():
        p = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%j|%T"], capture_output=True, text=True)
        for line in p.stdout.splitlines():
            job, name, state = line.split("|")
            if name_part in name and state == "RUNNING":
                time.sleep(1.0)
                subprocess.run(["scancel", job], check=False)
                seen["job"] = job
                return
        time.sleep(0.2)


def _requeue_when_started(name_part: str, home: Path, stop: threading.Event, seen: dict) -> None:
    """Pre-empt the job whose name contains name_part once it has finished a case: ``scontrol requeue`` (what a
    pre-emption with requeue does), then let it start again at once (Slurm holds a requeued job ~2 min)."""
    while not stop.is_set():
        p = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%j|%T"], capture_output=True, text=True)
        for line in p.stdout.splitlines():
            job, name, state = line.split("|")
            journals = list((home / "trajectories").rglob("*.part")) if (home / "trajectories").is_dir() else []
            if name_part in name and state == "RUNNING" and any(j.read_text().count("\n") >= 1 for j in journals):
                subprocess.run(["scontrol", "requeue", job], check=True)
                time.sleep(1.0)
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
                seen["job"] = job
                return
        time.sleep(0.2)


@pytest.fixture(scope="module")
def slurm_dag_run(slurm_cluster, run_dag, tmp_path_factory):
    from airflow.sdk import DAG

    home = tmp_path_factory.mktemp("slurm-home")
    errors: dict[str, str] = {}

    def on_failure(context):
        errors[context["ti"].task_id] = str(context.get("exception"))

    common = {"compute": "slurm", "home": str(home), "initial_delay": 0, "poll_interval": 0.5}
    with DAG(DAG_ID, schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), catchup=False,
             default_args={"on_failure_callback": on_failure}) as dag:
        StageOperator(task_id="emulate", stage="emulate", spec=DEMO, **common)
        StageOperator(task_id="invalid", stage="emulate", spec={**DEMO, "case_set": "no-such-set"}, **common)
        StageOperator(task_id="cancelled", stage="emulate", spec={**DEMO, **_slow(3), "cases": "2-4"},
                      **common)  # keeps the job running long enough
        StageOperator(task_id="preempted", stage="emulate", spec={**DEMO, **_slow(1.5), "cases": "4-8"},
                      **common)  # cases end in rounds 2, 2, 3, 4
    stop, seen, requeued = threading.Event(), {}, {}
    canceller = threading.Thread(target=_cancel_when_running, args=(f"{DAG_ID}.cancelled.", stop, seen),
                                 daemon=True)
    requeuer = threading.Thread(target=_requeue_when_started, args=(f"{DAG_ID}.preempted.", home, stop, requeued),
                                daemon=True)
    canceller.start()
    requeuer.start()
    try:
        dr, xcoms = run_dag(dag)
    finally:
        stop.set()
        canceller.join(10)
        requeuer.join(10)
    states = {ti.task_id: ti.state for ti in dr.get_task_instances()}
    return {"dr": dr, "xcoms": xcoms, "errors": errors, "states": states, "home": home,
            "cancelled_job": seen.get("job"), "requeued_job": requeued.get("job")}


def test_stage_completes_as_a_slurm_job(slurm_dag_run):
    r = slurm_dag_run
    assert r["states"]["emulate"] == "success", r["errors"].get("emulate")
    result = r["xcoms"][("emulate", -1, "return_value")]
    trajectories = Path(result["outputs"]["trajectories"])
    assert trajectories.is_file() and trajectories.is_relative_to(r["home"])
    assert result["counts"]["cases"] == 2 and result["counts"]["failed"] == 0
    job_id = r["xcoms"][("emulate", -1, "slurm_job_id")]
    log = Path(r["xcoms"][("emulate", -1, "slurm_log")])
    assert job_id.isdigit() and log.is_file() and log.name.endswith(f"-{job_id}.out")
    assert log.name.startswith(f"{DAG_ID}.emulate.{safe_path_part(r['dr'].run_id)}")  # job name: dag.task.run
    assert "emulate: 2 cases" in log.read_text()
    info = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    assert f"JobName={DAG_ID}.emulate." in info and "JobState=COMPLETED" in info


def test_failing_job_fails_the_task_with_state_and_log_tail(slurm_dag_run):
    r = slurm_dag_run
    assert r["states"]["invalid"] == "failed"
    error = r["errors"]["invalid"]
    assert "FAILED" in error and "exit code 2" in error
    assert "agentpipe: error: case set 'no-such-set'" in error  # the one-line error from the job log's tail


def test_cancelled_job_is_reported_as_cancelled(slurm_dag_run):
    r = slurm_dag_run
    assert r["cancelled_job"] is not None, "the job never reached RUNNING"
    assert r["states"]["cancelled"] == "failed"
    error = r["errors"]["cancelled"]
    assert f"Slurm job {r['cancelled_job']}" in error and "ended CANCELLED" in error


def test_a_preempted_and_requeued_job_resumes_its_stage_without_redoing_or_losing_cases(slurm_dag_run):
    r = slurm_dag_run
    assert r["requeued_job"] is not None, "the job never finished a case while running"
    assert r["states"]["preempted"] == "success", r["errors"].get("preempted")
    result = r["xcoms"][("preempted", -1, "return_value")]
    from pipeline.data.jsonl import read_jsonl

    records = read_jsonl(Path(result["outputs"]["trajectories"])).records
    assert sorted(rec["case_idx"] for rec in records) == [4, 5, 6, 7]  # every case once
    assert 0 < result["counts"]["new"] < 4  # the second run did only what the first had not finished
    info = subprocess.run(["scontrol", "show", "job", "-o", r["requeued_job"]], capture_output=True, text=True).stdout
    assert "Restarts=1" in info and "JobState=COMPLETED" in info
    log = Path(r["xcoms"][("preempted", -1, "slurm_log")]).read_text()
    assert "DUE TO JOB REQUEUE" in log  # both runs in one log (--open-mode=append)


def test_max_slurm_jobs_makes_a_task_wait_for_a_free_slot(slurm_cluster, tmp_path):
    """The DAG run's Param max_slurm_jobs: with that many of the run's jobs pending or running (real squeue), a
    task waits deferred instead of submitting; once one ends, it submits."""
    from types import SimpleNamespace

    from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger
    from airflow.sdk.exceptions import TaskDeferred

    from plugins.slurm.core import sanitize_job_name
    from plugins.slurm.trigger import SlurmJobTrigger

    run_id = "manual__2026-01-01T00:00:00+00:00"
    other = subprocess.run(["sbatch", "--parsable", f"--job-name={sanitize_job_name('capdag', 'other', run_id)}",
                            "--output=/dev/null", "--wrap", "sleep 120"], capture_output=True, text=True,
                           check=True).stdout.strip()
    unrelated = subprocess.run(["sbatch", "--parsable", "--job-name=capdag.other.another_run", "--output=/dev/null",
                                "--wrap", "sleep 120"], capture_output=True, text=True, check=True).stdout.strip()
    op = StageOperator(task_id="emulate", stage="emulate", spec=DEMO, compute="slurm", home=str(tmp_path),
                       initial_delay=0)
    ti = SimpleNamespace(dag_id="capdag", task_id="emulate", map_index=-1, try_number=1, xcom_push=lambda **kw: None)
    try:
        for cap, waits in ((1, True), (2, False)):
            context = {"ti": ti, "run_id": run_id, "params": {"max_slurm_jobs": cap}}
            with pytest.raises(TaskDeferred) as deferred:
                op.execute(context)
            assert isinstance(deferred.value.trigger, TimeDeltaTrigger if waits else SlurmJobTrigger), cap
            assert deferred.value.method_name == ("execute" if waits else "execute_complete")
    finally:
        subprocess.run(["scancel", other, unrelated], check=False)
        jobs = list((tmp_path / "specs").rglob("*.job.json"))
        for j in jobs:
            import json

            subprocess.run(["scancel", json.loads(j.read_text())["job_id"]], check=False)
    assert len(jobs) == 1  # submitted once, when the cap allowed it
