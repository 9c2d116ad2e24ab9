"""``evaluate --batch``: an API judge through the OpenAI Batch API, against a local fake of the Files and Batches
endpoints (``tests/fake_openai_batch.py``, its own process): the same records as a synchronous run, one batch per
job whatever is killed or restarted, per-request errors and expiry retried exactly, and a rerun that spends
nothing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.data.jsonl import read_jsonl
from pipeline.data.manifest import read_manifest
from pipeline.emulation.runner import EmulationConfig, run_emulation
from tests.conftest import run_agentpipe
from tests.fake_openai_batch import FakeBatchServer

#: a priced, non-reasoning model: the fake judge sees the temperature and seed, and costs are known
JUDGE = "openai:gpt-4o-mini"
ARGS = ["--evaluator", JUDGE, "--replicates", "2", "--temperature", "0.5", "--no-progress"]


@pytest.fixture(scope="module")
def trajectory_file(tmp_path_factory) -> Path:
    """8 demo cases emulated by the scripted doubles."""
    out = tmp_path_factory.mktemp("traj")
    return run_emulation(EmulationConfig(agent="scripted:agent", emulator="scripted:emulator", case_set="demo",
                                         cases="0-8", out=out)).path


@pytest.fixture
def server(tmp_path):
    with FakeBatchServer(tmp_path / "fake-state") as s:
        yield s


def _env(server: FakeBatchServer) -> dict[str, str]:
    return {"AGENTPIPE_OPENAI_BASE_URL": server.url, "OPENAI_API_KEY": "sk-test-key-not-real"}


def _copy(path: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / path.name
    target.write_bytes(path.read_bytes())
    return target


def _evaluate(tmp: Path, traj: Path, server: FakeBatchServer, *extra: str) -> tuple[subprocess.CompletedProcess,
                                                                                         dict]:
    result = tmp / f"result-{time.monotonic_ns()}.json"
    p = run_agentpipe("--result", str(result), "evaluate", "--trajectories", str(traj), *ARGS, *extra,
                      env=_env(server))
    return p, json.loads(result.read_text()) if result.exists() else {}


def _records(res: dict) -> dict[str, list[dict]]:
    """The eval records without what differs by transport (latency, cost, the batch flag)."""
    out = {}
    for t, path in res["outputs"]["eval_files"].items():
        out[t] = [{**r, "replicates": [{k: v for k, v in x.items() if k != "usage"} for x in r["replicates"]]}
                  for r in read_jsonl(Path(path)).records]
    return out


def _usages(res: dict) -> list[dict]:
    return [x["usage"] for path in res["outputs"]["eval_files"].values() for r in read_jsonl(Path(path)).records
            for x in r["replicates"]]


def test_a_batch_gives_the_records_of_a_synchronous_run_at_half_the_price(trajectory_file, tmp_path, server):
    p, sync = _evaluate(tmp_path, _copy(trajectory_file, tmp_path / "sync"), server)
    assert p.returncode == 0 and sync["status"] == "complete", p.stderr
    p, batch = _evaluate(tmp_path, _copy(trajectory_file, tmp_path / "batch"), server, "--batch",
                         "--batch-poll-s", "0.05")
    assert p.returncode == 0 and batch["status"] == "complete", p.stderr
    assert _records(batch) == _records(sync)
    stats = server.stats()
    assert stats["batches_created"] == 1 and stats["chat_completions"] == 8 * 2 * 2  # the sync run's requests
    assert [b["total"] for b in stats["batches"].values()] == [32]
    sync_usage, batch_usage = _usages(sync), _usages(batch)
    assert all(u.get("batch") is True for u in batch_usage) and not any("batch" in u for u in sync_usage)
    for s, b in zip(sync_usage, batch_usage):  # same tokens (cached ones too), half the price
        assert (b["prompt_tokens"], b["completion_tokens"]) == (s["prompt_tokens"], s["completion_tokens"])
        assert b.get("cached_prompt_tokens") == s.get("cached_prompt_tokens")
        assert b["cost_usd"] == pytest.approx(s["cost_usd"] / 2)
    assert any(u.get("cached_prompt_tokens") for u in sync_usage)  # the fake reports cached prompt tokens
    # the batch flag is not in the fingerprint: both runs' eval files record the same configuration
    for t in sync["outputs"]["eval_files"]:
        assert read_manifest(Path(batch["outputs"]["eval_files"][t]))["config"] == \
            read_manifest(Path(sync["outputs"]["eval_files"][t]))["config"]
    journal = json.loads(Path(batch["outputs"]["trajectories"] + ".batch.json").read_text())
    assert journal["batch_id"] is None and journal["collected"] == [batch["batch"]["batch_id"]]  # collected
    p, again = _evaluate(tmp_path, Path(batch["outputs"]["trajectories"]), server, "--batch")
    assert again["status"] == "skipped" and server.stats()["batches_created"] == 1  # nothing submitted again


def test_a_killed_run_and_a_restarted_server_reattach_to_the_one_batch(trajectory_file, tmp_path, server):
    traj = _copy(trajectory_file, tmp_path / "killed")
    server.control(hold=True)
    result = tmp_path / "killed.result.json"
    argv = [str(Path(sys.executable).with_name("agentpipe")), "--result", str(result), "evaluate", "--trajectories",
            str(traj), *ARGS, "--batch", "--batch-poll-s", "0.05"]
    proc = subprocess.Popen(argv, env={**os.environ, **_env(server)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    linked = traj.with_name(traj.name.replace("_eval-none_", "_eval-gpt-4o-mini_"))
    journal = linked.with_name(linked.name + ".batch.json")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (journal.exists() and json.loads(journal.read_text()).get("batch_id")):
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    batch_id = json.loads(journal.read_text())["batch_id"]
    server.restart()  # the service goes down and comes back mid-batch
    server.control(hold=False)
    p, res = _evaluate(tmp_path, traj, server, "--batch", "--batch-poll-s", "0.05")
    assert p.returncode == 0 and res["status"] == "complete", p.stderr
    assert res["batch"]["batch_id"] == batch_id
    assert server.stats()["batches_created"] == 1 and server.stats()["files_created"] == 1


def test_a_batch_created_but_not_journaled_is_found_by_its_job(trajectory_file, tmp_path, server, monkeypatch):
    """Killed between creating the batch and journaling its id: the next run finds the batch by the job's key in
    its metadata instead of creating a second one."""
    from pipeline.llm import ChatRequest, GenerationConfig, get_backend
    from pipeline.llm.openai_batch import BatchJob

    monkeypatch.setenv("AGENTPIPE_OPENAI_BASE_URL", server.url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-key-not-real")
    backend = get_backend(JUDGE)
    requests = [(f"r{i}", ChatRequest(messages=[{"role": "user", "content": f"question {i}"}],
                                      config=GenerationConfig(max_new_tokens=16))) for i in range(3)]
    journal = tmp_path / "job.batch.json"
    saves = []

    def save_then_die(self):  # the journal write after batches.create never happens
        saves.append(dict(vars(self.state)))
        if self.state.batch_id:
            raise KeyboardInterrupt("killed")
        type(self)._real_save(self)

    monkeypatch.setattr(BatchJob, "_real_save", BatchJob._save, raising=False)
    monkeypatch.setattr(BatchJob, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        BatchJob(backend, journal, requests).submit()
    monkeypatch.setattr(BatchJob, "_save", BatchJob._real_save)
    assert server.stats()["batches_created"] == 1 and not json.loads(journal.read_text()).get("batch_id")
    job = BatchJob(backend, journal, requests)
    state = job.submit()
    assert state.batch_id == saves[-1]["batch_id"] and server.stats()["batches_created"] == 1
    assert job.wait(poll_s=0.01) == "completed"
    assert all(r.ok and r.text for r in job.results().values())


def test_per_request_errors_and_expiry_leave_exactly_those_to_retry(trajectory_file, tmp_path, server):
    p, sync = _evaluate(tmp_path, _copy(trajectory_file, tmp_path / "sync"), server)
    traj = _copy(trajectory_file, tmp_path / "batch")
    server.control(fail_custom_ids=["agent_safe:0:0", "agent_help_ignore_safety:3:1"])
    p, res = _evaluate(tmp_path, traj, server, "--batch", "--batch-poll-s", "0.05")
    assert p.returncode == 1 and res["status"] == "incomplete", p.stderr
    assert res["counts"]["errors"] == 2 and "rerun the same command to retry them" in p.stderr
    server.control(fail_custom_ids=[], expire=1)  # the next batch runs out of time half-way
    p, res = _evaluate(tmp_path, traj, server, "--batch", "--batch-poll-s", "0.05")
    assert p.returncode == 1 and res["status"] == "incomplete" and res["counts"]["requests"] == 2
    assert res["counts"]["errors"] == 1  # the half it did not run
    p, res = _evaluate(tmp_path, traj, server, "--batch", "--batch-poll-s", "0.05")
    assert p.returncode == 0 and res["status"] == "complete", p.stderr
    totals = [b["total"] for b in server.stats()["batches"].values()]
    assert sorted(totals) == [1, 2, 32]  # every retry asked for exactly what was left
    assert _records(res) == _records(sync)


def test_without_waiting_the_stage_returns_the_batch_and_the_same_command_collects(trajectory_file, tmp_path,
                                                                                    server):
    traj = _copy(trajectory_file, tmp_path / "later")
    server.control(hold=True)
    p, res = _evaluate(tmp_path, traj, server, "--batch", "--no-batch-wait")
    assert p.returncode == 75 and res["status"] == "waiting", p.stderr
    assert res["batch"]["status"] in ("validating", "in_progress") and res["batch"]["requests"] == 32
    assert "waiting for batch" in p.stderr
    assert not any(Path(f).exists() for f in res["outputs"]["eval_files"].values())  # nothing assembled yet
    p, res2 = _evaluate(tmp_path, traj, server, "--batch", "--no-batch-wait")
    assert p.returncode == 75 and res2["batch"]["batch_id"] == res["batch"]["batch_id"]
    server.control(hold=False)
    for _ in range(10):  # each look moves the fake batch one step
        p, res3 = _evaluate(tmp_path, traj, server, "--batch", "--no-batch-wait")
        if res3["status"] != "waiting":
            break
    assert p.returncode == 0 and res3["status"] == "complete", p.stderr
    assert server.stats()["batches_created"] == 1


def test_batch_mode_needs_an_api_judge_in_one_line(trajectory_file, tmp_path):
    for judge, extra, said in [("scripted:judge", [], "is not an OpenAI-compatible API judge"),
                               (JUDGE, ["--cache"], "drop --cache")]:
        p = run_agentpipe("evaluate", "--trajectories", str(trajectory_file), "--evaluator", judge, "--batch", *extra)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and said in lines[0], p.stderr


def test_the_plan_and_the_stage_runs_show_what_either_mode_costs(tmp_path):
    """The study's preset (dags/README.md), as planned (synchronous) and with the evaluation option batch: the
    plan's size gives the USD both ways, and a stage run's MLflow figures price its calls in both modes."""
    from pipeline.tracking.stage_runs import add_usage, usage_metrics

    p = subprocess.run([sys.executable, "-m", "plugins.plan_size"], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0, p.stderr
    sync, batch = (float(x.replace(",", "")) for x in re.search(
        r"all synchronous: \$([\d,]+\.\d\d), all through the Batch API \(evaluation option batch\): \$([\d,]+\.\d\d)",
        p.stdout).groups())
    assert "Planned synchronously" in p.stdout and f"about **${sync:,.2f}**" in p.stdout
    assert batch == pytest.approx(sync / 2, abs=0.01) and batch > 0
    preset = tmp_path / "preset.json"
    readme = (Path(__file__).resolve().parents[1] / "dags" / "README.md").read_text()
    params = json.loads(re.search(r"```json\n(.*?)```", readme, re.S).group(1))
    preset.write_text(json.dumps({**params, "evaluation": {"batch": True}}))
    p = subprocess.run([sys.executable, "-m", "plugins.plan_size", str(preset)], capture_output=True, text=True,
                       timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0 and "Planned through the Batch API" in p.stdout and f"about **${batch:,.2f}**" in p.stdout
    totals: dict = {}
    add_usage(totals, "judge", {"prompt_tokens": 10, "completion_tokens": 2, "cost_usd": 0.004})
    add_usage(totals, "judge", {"prompt_tokens": 10, "completion_tokens": 2, "cost_usd": 0.001, "batch": True})
    m = usage_metrics(totals)
    assert m["cost_usd_judge"] == pytest.approx(0.005)
    assert m["cost_usd_judge_if_sync"] == pytest.approx(0.006) and m["cost_usd_judge_if_batch"] == pytest.approx(0.003)
    local: dict = {}
    add_usage(local, "judge", {"prompt_tokens": 10, "completion_tokens": 2, "cost_usd": None})
    assert not any(k.endswith(("_if_sync", "_if_batch")) for k in usage_metrics(local))  # no price, no figure


def test_the_operator_defers_on_the_batch_and_collects_when_the_trigger_fires(trajectory_file, tmp_path, server,
                                                                              monkeypatch):
    """StageOperator with an evaluate spec in batch mode: the stage submits and returns (waiting), the task defers
    on OpenAIBatchTrigger (no process left running), the trigger fires once the batch ends, and the task's
    second run of the stage collects the answers."""
    import asyncio
    from types import SimpleNamespace

    from airflow.sdk.exceptions import TaskDeferred

    from plugins.openai_batch_trigger import OpenAIBatchTrigger
    from plugins.stage_operator import StageOperator

    for k, v in _env(server).items():
        monkeypatch.setenv(k, v)
    traj = _copy(trajectory_file, tmp_path / "dag")
    server.control(hold=True)
    spec = {"trajectories": str(traj), "evaluator": JUDGE, "metrics": "safe", "batch": True, "batch_poll_s": 0.05,
            "no_progress": True}
    op = StageOperator(task_id="evaluate_batch_judge", stage="evaluate", spec=spec, compute="local",
                       home=str(tmp_path / "home"))
    context = {"ti": SimpleNamespace(dag_id="d", task_id="evaluate_batch_judge", map_index=-1, try_number=1,
                                     xcom_push=lambda **kw: None), "run_id": "manual__1", "params": {}}
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context)
    trigger = deferred.value.trigger
    assert isinstance(trigger, OpenAIBatchTrigger) and deferred.value.method_name == "execute"
    assert trigger.base_url == server.url and trigger.poll_interval == 0.05
    assert op._proc is None  # the stage's process has ended: nothing runs while the batch does
    written = json.loads(next((tmp_path / "home" / "specs").rglob("evaluate_batch_judge.json")).read_text())
    assert written["batch_wait"] is False  # the operator never lets a stage block a worker on a batch

    async def first_event():
        async for event in trigger.run():
            return event.payload

    held = asyncio.run(asyncio.wait_for(_poll_while_held(trigger), timeout=30))
    assert held == "in_progress"
    server.control(hold=False)
    event = asyncio.run(asyncio.wait_for(first_event(), timeout=60))
    assert event["batch_id"] == trigger.batch_id and event["status"] == "completed"
    result = op.execute(context, event=event)
    assert result["status"] == "complete" and result["counts"]["scored"] + result["counts"]["parse_failed"] == 8
    assert server.stats()["batches_created"] == 1


async def _poll_while_held(trigger) -> str:
    """A few polls of a held batch: the trigger keeps waiting (no event); the batch's status."""
    import asyncio

    task = asyncio.ensure_future(_first(trigger))
    await asyncio.sleep(0.5)
    assert not task.done()
    task.cancel()
    async with trigger._client() as client:
        return (await client.batches.retrieve(trigger.batch_id)).status


async def _first(trigger):
    async for event in trigger.run():
        return event


def test_reasoning_effort_is_sent_to_reasoning_models_recorded_and_refused_elsewhere(tmp_path, monkeypatch):
    from pipeline.errors import ConfigError
    from pipeline.evaluation.runner import EvaluationConfig
    from pipeline.llm import ChatRequest, GenerationConfig, get_backend

    monkeypatch.setenv("AGENTPIPE_OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    reasoning = get_backend("openai:gpt-5-mini")
    req = ChatRequest(messages=[{"role": "user", "content": "x"}], config=GenerationConfig(reasoning_effort="low"))
    assert reasoning.request_kwargs(req)["reasoning_effort"] == "low"
    with pytest.raises(ConfigError, match="not a reasoning model: it takes no reasoning_effort"):
        get_backend(JUDGE).not_sent(req.config)
    cfg = EvaluationConfig(trajectories=tmp_path / "t.jsonl", evaluator="openai:gpt-5-mini", reasoning_effort="low")
    assert cfg.fingerprint()["reasoning_effort"] == "low"  # recorded: it changes the answers
    assert "reasoning_effort" not in EvaluationConfig(trajectories=tmp_path / "t.jsonl",
                                                      evaluator="openai:gpt-5-mini").fingerprint()
    for judge, said in [(JUDGE, "not a reasoning model"), ("vllm:SmolLM2-135M", "takes no reasoning_effort")]:
        p = run_agentpipe("evaluate", "--trajectories", str(tmp_path / "t.jsonl"), "--evaluator", judge,
                          "--reasoning-effort", "low")
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and said in lines[0], p.stderr


def test_a_batch_whose_every_request_failed_is_never_reattached(trajectory_file, tmp_path, server):
    """The retry of exactly the same requests is a new batch: a collected batch (here one whose every answer
    was an error) is never taken for the retry's."""
    traj = _copy(trajectory_file, tmp_path / "allfail")
    ids = [f"agent_safe:{i}:{k}" for i in range(8) for k in range(2)]
    server.control(fail_custom_ids=ids)
    p, res = _evaluate(tmp_path, traj, server, "--batch", "--batch-poll-s", "0.05", "--metrics", "safe")
    assert p.returncode == 1 and res["counts"]["errors"] == 16
    server.control(fail_custom_ids=[])
    p, res = _evaluate(tmp_path, traj, server, "--batch", "--batch-poll-s", "0.05", "--metrics", "safe")
    assert p.returncode == 0 and res["status"] == "complete" and res["counts"]["errors"] == 0, p.stderr
    assert server.stats()["batches_created"] == 2
    journal = json.loads(Path(res["outputs"]["trajectories"] + ".batch.json").read_text())
    assert journal["batch_id"] is None and len(journal["collected"]) == 2


def test_a_pending_batch_is_never_paid_for_twice_nor_overwritten(trajectory_file, tmp_path, server):
    traj = _copy(trajectory_file, tmp_path / "pending")
    server.control(hold=True)
    p, first = _evaluate(tmp_path, traj, server, "--batch", "--no-batch-wait")
    assert p.returncode == 75
    linked = Path(first["outputs"]["trajectories"])
    # a synchronous run over the judgements the batch holds: refused in one line, nothing judged
    p, _ = _evaluate(tmp_path, traj, server)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and f"batch {first['batch']['batch_id']} of this file's" in lines[0]
    assert server.stats()["chat_completions"] == 0
    # another configuration's batch job (other seeds: other requests) never overwrites the pending one's journal
    p, _ = _evaluate(tmp_path, traj, server, "--batch", "--no-batch-wait", "--seed", "7", "--force")
    assert p.returncode == 75  # with --force the old batch is left and its journal kept aside
    assert len(list(linked.parent.glob(linked.name + ".batch.json.replaced-*"))) == 1
    p, again = _evaluate(tmp_path, traj, server, "--batch", "--no-batch-wait", "--seed", "7")
    assert p.returncode == 75 and server.stats()["batches_created"] == 2  # the same command reattaches to its batch
    assert again["batch"]["batch_id"] != first["batch"]["batch_id"]


def test_a_journal_of_another_server_is_refused(trajectory_file, tmp_path, server):
    traj = _copy(trajectory_file, tmp_path / "moved")
    server.control(hold=True)
    p, first = _evaluate(tmp_path, traj, server, "--batch", "--no-batch-wait")
    assert p.returncode == 75
    with FakeBatchServer(tmp_path / "other-state") as other:
        p, _ = _evaluate(tmp_path, traj, other, "--batch", "--no-batch-wait")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and f"lives on {server.url}" in lines[-1], p.stderr


def test_the_trigger_gives_up_on_a_refusal_at_once_and_on_a_deadline(server, monkeypatch):
    import asyncio

    from plugins.openai_batch_trigger import OpenAIBatchTrigger

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-key-not-real")

    async def first(trigger):
        async for event in trigger.run():
            return event.payload

    missing = asyncio.run(asyncio.wait_for(first(OpenAIBatchTrigger("batch_nope", server.url, poll_interval=30)),
                                           timeout=20))
    assert missing["status"] == "ERROR" and "HTTP 404" in missing["error"]
    server.control(hold=True)
    client = server.client()
    f = client.files.create(file=("in.jsonl", b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", '
                                              b'"body": {"model": "m", "messages": [{"role": "user", "content": "x"}]}}'
                                              b"\n"), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    late = asyncio.run(asyncio.wait_for(first(OpenAIBatchTrigger(batch.id, server.url, poll_interval=0.05,
                                                                 timeout=0.3)), timeout=20))
    assert late["status"] == "WAIT_TIMEOUT"
    assert OpenAIBatchTrigger("b").deadline - time.time() > 24 * 3600  # unless told: the batch's window and more


def test_a_slurm_job_that_ended_waiting_defers_on_its_batch(tmp_path):
    """A batch evaluation on Slurm: the job exits 75 (waiting), and the task defers on the batch instead of
    failing the job."""
    from types import SimpleNamespace

    from airflow.sdk.exceptions import TaskDeferred

    from plugins.openai_batch_trigger import OpenAIBatchTrigger
    from plugins.stage_operator import StageOperator

    op = StageOperator(task_id="evaluate_batch_judge", stage="evaluate", spec={"batch": True}, compute="slurm",
                       home=str(tmp_path))
    result = tmp_path / "r.result.json"
    result.write_text(json.dumps({"status": "waiting", "batch": {"batch_id": "batch_7", "base_url": "http://x/v1",
                                                                  "status": "in_progress", "poll_s": 5}}))
    log = tmp_path / "job.out"
    log.write_text("evaluate: waiting for batch batch_7\n")
    context = {"ti": SimpleNamespace(dag_id="d", task_id="evaluate_batch_judge", map_index=-1, try_number=1),
               "run_id": "manual__1", "params": {}}
    event = {"job_id": "9", "state": "FAILED", "exit_code": "75:0", "log_path": str(log), "elapsed_s": 3}
    with pytest.raises(TaskDeferred) as deferred:
        op.execute_complete(context, event, result_path=str(result))
    trigger = deferred.value.trigger
    assert isinstance(trigger, OpenAIBatchTrigger) and (trigger.batch_id, trigger.poll_interval) == ("batch_7", 5.0)


def test_structured_answers_tie_the_label_to_its_score_and_need_room(tmp_path):
    from pipeline.evaluation.judges import answer_pattern

    answer = ("Evaluator Thought: the agent asked first.\nOverall Qualitative Label: Possible Mild Risk (2)\n"
              "Overall Quantitative Score: {}\nEvaluator Log Summary: careful.")
    assert re.fullmatch(answer_pattern("agent_safe", 512), answer.format(2))
    assert not re.fullmatch(answer_pattern("agent_safe", 512), answer.format(3))  # label and score disagree
    p = run_agentpipe("evaluate", "--trajectories", str(tmp_path / "t.jsonl"), "--evaluator", "vllm:SmolLM2-135M",
                      "--structured", "--max-new-tokens", "100")
    assert p.returncode == 2 and "needs at least 256" in p.stderr


def test_an_experiment_applies_judge_specific_evaluation_options_to_their_judges(tmp_path):
    from pipeline.experiment import Arm, ExperimentConfig, plan_experiment

    cfg = ExperimentConfig(name="study", source_models=["Qwen2.5-7B"], seeds=[0], betas=[0.1],
                           configurations=["safe"], case_set="toolemu",
                           arms=[Arm("q32", str(tmp_path / "pool"), "vllm:Qwen3-32B"),
                                 Arm("gpt5m", str(tmp_path / "pool"), "openai:gpt-5-mini")],
                           evaluation={"batch": True, "reasoning_effort": "low", "structured": True,
                                       "replicates": 3})
    plan = plan_experiment(cfg, tmp_path)
    by_judge = {s["evaluator"]: s for s in plan.source_evaluate}
    assert {k: by_judge["openai:gpt-5-mini"].get(k) for k in ("batch", "reasoning_effort", "structured",
                                                              "replicates")} == \
        {"batch": True, "reasoning_effort": "low", "structured": True, "replicates": 3}
    assert {k: by_judge["vllm:Qwen3-32B"].get(k) for k in ("batch", "reasoning_effort", "structured",
                                                           "replicates")} == \
        {"batch": None, "reasoning_effort": None, "structured": True, "replicates": 3}
    assert {s["judge"] for s in plan.source_evaluate} == {"batch", "local"}
    [chain] = [c for c in plan.chains if c["judge"] == "batch"]
    assert chain["cross_evaluate_local"]["evaluator"] == "vllm:Qwen3-32B"  # the other arm's judge, its own kind
    from pipeline.errors import ConfigError

    local_only = ExperimentConfig(name="study", source_models=["Qwen2.5-7B"], seeds=[0], betas=[0.1],
                                  configurations=["safe"], case_set="toolemu",
                                  arms=[Arm("q32", str(tmp_path / "pool"), "Qwen3-32B")],
                                  evaluation={"batch": True})
    with pytest.raises(ConfigError, match="evaluation option batch: concerns openai judges, and no arm's judge"):
        plan_experiment(local_only, tmp_path)


def test_a_journal_holding_another_jobs_running_batch_is_refused_not_overwritten(tmp_path, server, monkeypatch):
    from pipeline.llm import ChatRequest, GenerationConfig, get_backend
    from pipeline.llm.openai_batch import BatchError, BatchJob

    monkeypatch.setenv("AGENTPIPE_OPENAI_BASE_URL", server.url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-key-not-real")
    backend = get_backend(JUDGE)

    def job(word: str, **kw) -> BatchJob:
        return BatchJob(backend, tmp_path / "out.batch.json",
                        [("r0", ChatRequest(messages=[{"role": "user", "content": word}],
                                            config=GenerationConfig(max_new_tokens=8)))], **kw)

    server.control(hold=True)
    first = job("first").submit().batch_id
    with pytest.raises(BatchError, match=f"batch {first} .* holds other requests of this output"):
        job("second")
    assert json.loads((tmp_path / "out.batch.json").read_text())["batch_id"] == first
    assert job("second", force=True).submit().batch_id != first  # --force: the old journal kept aside
    assert len(list(tmp_path.glob("out.batch.json.replaced-*"))) == 1


def test_structured_answers_of_an_api_judge_are_json_of_the_answer_schema(trajectory_file, tmp_path, server):
    """``--structured`` on an API judge: a JSON-schema response format (sent in batch mode too), each answer read
    back into the four fields of the same eval records; the fake judge's free text fails to parse now and then,
    its structured answers never."""
    p, free = _evaluate(tmp_path, _copy(trajectory_file, tmp_path / "free"), server)
    assert free["counts"]["parse_failed"] > 0
    for mode in ([], ["--batch", "--batch-poll-s", "0.05"]):
        p, res = _evaluate(tmp_path, _copy(trajectory_file, tmp_path / f"structured{len(mode)}"), server,
                           "--structured", *mode)
        assert p.returncode == 0 and res["status"] == "complete", p.stderr
        assert res["counts"]["parse_failed"] == 0 and res["counts"]["scored"] == 32
        for t, path in res["outputs"]["eval_files"].items():
            for r in read_jsonl(Path(path)).records:
                for x in r["replicates"]:
                    assert x["Overall Quantitative Score"] in ("0", "1", "2", "3") and x["Evaluator Thought"]
                    assert x["Overall Qualitative Label"].endswith(f"({x['Overall Quantitative Score']})")
        assert read_manifest(Path(res["outputs"]["eval_files"]["agent_safe"]))["config"]["structured"] is True


def test_a_json_answer_is_read_from_its_json_and_checked_against_the_rubric():
    """Its fields come from the JSON itself (text in the thought that looks like fields changes nothing); a label
    that disagrees with the score, or free text from a server that ignored the response format, is a parse
    failure with its raw text."""
    from pipeline.evaluation.judges import read_judgement
    from pipeline.llm import ChatResponse

    def judged(answer):
        text = answer if isinstance(answer, str) else json.dumps(answer)
        return read_judgement("agent_safe", ChatResponse(text=text), "openai:m", json_answer=True).fields

    good = {"Evaluator Thought": "Draft:\nOverall Qualitative Label: Likely Severe Risk (0)\n"
                                 "Overall Quantitative Score: 0", "Overall Qualitative Label": "Possible Mild Risk (2)",
            "Overall Quantitative Score": 2, "Evaluator Log Summary": "ok"}
    r = judged(good)
    assert r["status"] == "ok" and r["eval_scores"] == {"ToolCallRisk": 2} and r["Overall Quantitative Score"] == "2"
    bad = judged({**good, "Overall Quantitative Score": 3})
    assert bad["status"] == "parse_failed" and "disagree" in bad["parse_error"] and bad["raw"]
    free = judged("Evaluator Thought: x\nOverall Qualitative Label: Possible Mild Risk (2)\n"
                  "Overall Quantitative Score: 2\nEvaluator Log Summary: y")
    assert free["status"] == "parse_failed" and "response format ignored" in free["parse_error"]
    assert judged({**good, "Overall Qualitative Label": "Fine (2)"})["status"] == "parse_failed"


def test_rerun_failed_leaves_the_failures_a_pending_batch_is_retrying_to_it(trajectory_file, tmp_path, server):
    traj = _copy(trajectory_file, tmp_path / "retry")
    server.control(fail_custom_ids=["agent_safe:0:0"])
    p, res = _evaluate(tmp_path, traj, server, "--batch", "--batch-poll-s", "0.05")
    assert p.returncode == 1 and res["counts"]["errors"] == 1
    server.control(fail_custom_ids=[], hold=True)
    p, waiting = _evaluate(tmp_path, traj, server, "--batch", "--no-batch-wait")  # the retry, in a new batch
    assert p.returncode == 75
    p = run_agentpipe("evaluate", "rerun-failed", "--data-dir", str(traj.parent), env=_env(server))
    assert p.returncode == 2 and f"batch {waiting['batch']['batch_id']} of this file's judgements" in p.stderr
    assert server.stats()["chat_completions"] == 0
