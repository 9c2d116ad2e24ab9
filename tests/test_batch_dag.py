"""toolemu_evaluation with an API judge in batch mode, through the real Airflow services (scheduler, local executor,
triggerer): while the fake Batch API holds the batch, the evaluate task waits deferred, holding no worker and no
pool slot; when the batch ends the trigger fires and the task collects the answers into complete eval files."""

from __future__ import annotations

import time

import pytest

from pipeline.data.manifest import read_manifest
from tests.fake_openai_batch import FakeBatchServer

CONF = {"agents": ["scripted:agent"], "emulator": "scripted:emulator", "evaluator": "openai:gpt-4o-mini",
        "case_set": "demo", "cases": "0-2", "max_steps": 2, "max_tokens_per_call": 24, "metrics": "safe",
        "batch": True, "batch_poll_s": 2, "run_name": "batchpool", "compute": "local"}


@pytest.fixture
def fake_api(live_services, tmp_path):
    """The fake Batch API, and the live home's settings file pointing the stages at it (removed afterwards)."""
    _, _, home = live_services
    settings = home / "agentpipe.yaml"  # the local stages run with the home as their working folder
    with FakeBatchServer(tmp_path / "fake") as server:
        settings.write_text(f"openai_base_url: {server.url}\n")
        try:
            yield server
        finally:
            settings.unlink(missing_ok=True)


def test_the_evaluate_task_waits_deferred_without_a_slot_while_the_batch_runs(live_services, fake_api):
    demo, urls, home = live_services
    af = demo.Airflow(urls["airflow"], urls["user"], urls["password"])
    assert af.call("GET", "/pools/judge_batch")["include_deferred"] is False
    fake_api.control(hold=True)
    af.wait_for_dag("toolemu_evaluation")
    run_id = af.trigger("toolemu_evaluation", CONF)
    deadline = time.monotonic() + 900
    state = None
    while time.monotonic() < deadline:
        tis = {(t["task_id"], t["map_index"]): t["state"] for t in af.task_instances("toolemu_evaluation", run_id)}
        state = tis.get(("evaluate_batch_judge", 0))
        if state in ("deferred", "success", "failed", "upstream_failed"):
            break
        time.sleep(2)
    assert state == "deferred", tis
    time.sleep(8)  # the batch is held: the task stays deferred (and Airflow's early-fire race is avoided)
    pool = af.call("GET", "/pools/judge_batch")
    assert (pool["running_slots"], pool["deferred_slots"]) == (0, 1), pool
    assert {t["task_id"]: t["state"] for t in af.task_instances("toolemu_evaluation", run_id)}[
        "evaluate_batch_judge"] == "deferred"
    assert fake_api.stats()["batch_retrieves"] >= 2  # the trigger polls the batch from the triggerer
    fake_api.control(hold=False)
    assert af.follow("toolemu_evaluation", run_id, timeout=900) == "success"
    stats = fake_api.stats()
    assert stats["batches_created"] == 1 and stats["chat_completions"] == 0
    [eval_file] = (home / "trajectories" / "batchpool").rglob("*_eval_agent_safe.jsonl")
    manifest = read_manifest(eval_file)
    assert manifest["status"] == "complete" and manifest["counts"]["records"] == 2
