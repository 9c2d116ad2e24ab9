"""SlurmHook and SlurmJobTrigger against a real single-node Slurm cluster (the `slurm_cluster` fixture starts one
as root; elsewhere these skip unless AGENTPIPE_REQUIRE_SLURM=1). The trigger's run() is driven with asyncio
directly, so initial_delay 0 is safe here (the Airflow deferral race needs a scheduler)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from plugins.slurm.core import UNKNOWN_STATE, WAIT_TIMEOUT_STATE, SlurmSettings

pytestmark = pytest.mark.slurm

SECRET = "sk-test-NEVER-in-a-file-0123456789"


@pytest.fixture
def hook(slurm_cluster, tmp_path):
    from plugins.slurm.hook import SlurmHook

    return SlurmHook(settings=SlurmSettings(log_dir=str(tmp_path)))


def _submit(hook, tmp_path, command, name="t", **kw):
    out = str(tmp_path / f"{name}-%j.out")
    job = hook.submit(command, job_name=f"agentpipe-test.{name}", output=out,
                      resources={"cpus": 1, "mem": "256M", "time": "00:05:00"}, **kw)
    return job, out.replace("%j", job)


def _wait(hook, job, state, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = hook.state(job)
        if info.state == state or info.terminal:
            return info
        time.sleep(0.2)
    return hook.state(job)


def _run_trigger(trigger, timeout=60.0):
    async def first_event():
        async for event in trigger.run():
            return event.payload
        return None

    return asyncio.run(asyncio.wait_for(first_event(), timeout))


def test_submit_exports_only_what_is_needed_and_never_writes_secrets(hook, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("SOME_UNRELATED_VAR", "leak")
    command = 'echo "key=${OPENAI_API_KEY:0:8} x=${AGENTPIPE_X} other=${SOME_UNRELATED_VAR:-unset}"'
    job, log = _submit(hook, tmp_path, ["bash", "-c", command], env={"AGENTPIPE_X": "1"}, name="env")
    assert job.isdigit()
    info = _wait(hook, job, "COMPLETED")
    assert info.state == "COMPLETED", info
    assert "key=sk-test- x=1 other=unset" in hook.tail(log)
    scripts = list(tmp_path.glob("*.sbatch"))
    assert scripts and all(SECRET not in p.read_text() for p in scripts)


def test_state_of_failed_and_cancelled_jobs_and_scancel(hook, tmp_path):
    failed, log = _submit(hook, tmp_path, "echo about to fail; exit 3", name="fail")
    running, _ = _submit(hook, tmp_path, "sleep 60", name="sleep")
    assert _wait(hook, running, "RUNNING").state == "RUNNING"
    assert hook.cancel(running)
    cancelled = _wait(hook, running, "CANCELLED")
    assert cancelled.state == "CANCELLED" and cancelled.source == "scontrol"
    info = _wait(hook, failed, "FAILED")
    assert (info.state, info.return_code, info.reason) == ("FAILED", 3, "NonZeroExitCode")
    assert "about to fail" in hook.tail(log)
    assert hook.state("99999999").state == UNKNOWN_STATE


def test_trigger_reports_completed_with_the_log_tail(hook, tmp_path):
    from plugins.slurm.trigger import SlurmJobTrigger

    job, log = _submit(hook, tmp_path, "for i in 1 2 3; do echo step $i; sleep 0.3; done", name="ok")
    event = _run_trigger(SlurmJobTrigger(job, log_path=log, initial_delay=0, poll_interval=0.3))
    assert event["state"] == "COMPLETED" and event["exit_code"] == "0:0" and event["job_id"] == job
    assert event["log_tail"].rstrip().endswith("step 3")
    assert event["log_offset"] == os.path.getsize(log)  # everything was streamed into the (trigger) log


def test_trigger_reports_failed_with_exit_code_and_tail(hook, tmp_path):
    from plugins.slurm.trigger import SlurmJobTrigger

    job, log = _submit(hook, tmp_path, "echo 'agentpipe: error: something is wrong' >&2; exit 2", name="bad")
    event = _run_trigger(SlurmJobTrigger(job, log_path=log, initial_delay=0, poll_interval=0.3, stream_log=False))
    assert (event["state"], event["exit_code"]) == ("FAILED", "2:0")
    assert "agentpipe: error: something is wrong" in event["log_tail"]
    assert event["log_offset"] == 0


def test_trigger_timeout_cancels_the_job_and_on_kill_cancels(hook, tmp_path):
    from plugins.slurm.trigger import SlurmJobTrigger

    slow, _ = _submit(hook, tmp_path, "sleep 120", name="slow")
    event = _run_trigger(SlurmJobTrigger(slow, initial_delay=0, poll_interval=0.3, timeout=1))
    assert event["state"] == WAIT_TIMEOUT_STATE
    assert _wait(hook, slow, "CANCELLED").state == "CANCELLED"

    killed, _ = _submit(hook, tmp_path, "sleep 120", name="killed")
    asyncio.run(SlurmJobTrigger(killed, initial_delay=0).on_kill())
    assert _wait(hook, killed, "CANCELLED").state == "CANCELLED"


def _collect(trigger):
    """The trigger's own log lines (what the task's trigger log shows)."""

    class Recorder:
        def __init__(self):
            self.lines = []

        def info(self, msg, *args):
            self.lines.append(msg % args)

        warning = debug = info

    trigger._log = Recorder()  # LoggingMixin keeps its logger there
    return trigger._log.lines


def test_a_rebuilt_trigger_resumes_the_log_where_it_stopped_and_keeps_the_deadline(hook, tmp_path):
    """A triggerer restart: the trigger is rebuilt from what it serialised when the task deferred."""
    from plugins.slurm.trigger import SlurmJobTrigger

    job, log = _submit(hook, tmp_path, "for i in $(seq 1 12); do echo step $i; sleep 0.5; done", name="restart")
    path, kwargs = SlurmJobTrigger(job, log_path=log, initial_delay=0, poll_interval=0.2, timeout=120).serialize()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "step 2" not in (open(log).read() if os.path.exists(log) else ""):
        time.sleep(0.1)  # the job is printing (a loaded machine may take a while to start it)
    first = SlurmJobTrigger(**kwargs)
    seen = _collect(first)
    with pytest.raises(TimeoutError):
        _run_trigger(first, timeout=1.5)  # the triggerer dies mid-job
    streamed = [line for line in seen if "] step " in line]
    assert streamed and len(streamed) < 12
    again = SlurmJobTrigger(**kwargs)  # rebuilt from the stored kwargs
    assert again.deadline == first.deadline
    seen2 = _collect(again)
    event = _run_trigger(again)
    assert event["state"] == "COMPLETED" and event["log_offset"] == os.path.getsize(log)
    rest = [line for line in seen2 if "] step " in line]
    # every line exactly once across the two triggers: nothing repeated, nothing lost
    assert [line.rsplit(" ", 1)[-1] for line in streamed + rest] == [str(i) for i in range(1, 13)]

    slow, _ = _submit(hook, tmp_path, "sleep 120", name="slow2")
    _, kwargs = SlurmJobTrigger(slow, initial_delay=0, poll_interval=0.2, timeout=3).serialize()
    with pytest.raises(TimeoutError):
        _run_trigger(SlurmJobTrigger(**kwargs), timeout=2)
    t0 = time.monotonic()
    event = _run_trigger(SlurmJobTrigger(**kwargs), timeout=30)
    assert event["state"] == WAIT_TIMEOUT_STATE and time.monotonic() - t0 < 2.5  # not another 3 s
    assert _wait(hook, slow, "CANCELLED").state == "CANCELLED"


def test_trigger_gives_up_on_an_unknown_job(slurm_cluster):
    from plugins.slurm.trigger import SlurmJobTrigger

    event = _run_trigger(SlurmJobTrigger("99999998", initial_delay=0, poll_interval=0.05, unknown_limit=2))
    assert event["state"] == UNKNOWN_STATE


def test_sacct_fallback_knows_finished_jobs(hook, tmp_path):
    """scontrol forgets jobs after MinJobAge; `sacct -c` (jobcomp/filetxt) still knows them."""
    import subprocess

    job, _ = _submit(hook, tmp_path, "exit 4", name="acct")
    assert _wait(hook, job, "FAILED").state == "FAILED"
    p = subprocess.run(["sacct", "-c", "-n", "-P", "-j", job, "-o", "JobID,State,ExitCode"], capture_output=True,
                       text=True, timeout=30)
    from plugins.slurm.core import job_info_from_sacct

    deadline = time.monotonic() + 10
    info = job_info_from_sacct(job, p.stdout, "sacct -c")
    while info is None and time.monotonic() < deadline:  # the jobcomp record is written just after the job ends
        time.sleep(0.2)
        p = subprocess.run(["sacct", "-c", "-n", "-P", "-j", job, "-o", "JobID,State,ExitCode"],
                           capture_output=True, text=True, timeout=30)
        info = job_info_from_sacct(job, p.stdout, "sacct -c")
    assert info is not None and info.state == "FAILED" and info.return_code == 4


def test_rejected_submission_raises_with_slurms_message(slurm_cluster, tmp_path):
    from plugins.slurm.hook import SlurmError, SlurmHook

    hook = SlurmHook(settings=SlurmSettings(partition="no-such-partition"))
    with pytest.raises(SlurmError, match="(?i)invalid partition"):
        hook.submit("true", job_name="agentpipe-test.rejected", output=str(tmp_path / "r-%j.out"))
