"""dpo_experiment through the real Airflow scheduler (the demo's services: local executor, one task of a DAG at a
time, the project's pools): the cost approval blocks everything until a person approves through the REST API,
and each model moves along its own chain: a first-stage model is emulated and judged before the second stage
built on it starts training (task start/end times from Airflow's own records). In the phase-by-phase DAG of
before, every evaluation waited for the last second-stage training."""

from __future__ import annotations

import time
import urllib.parse
from datetime import datetime

import pytest

from pipeline.data.manifest import read_manifest
from tests.fake_openai_batch import FakeBatchServer

POOL = {"agents": ["scripted:agent", "tiny-llama"], "samples": 3, "agent_temperature": 1.0,
        "emulator": "scripted:emulator", "evaluator": "scripted:judge", "case_set": "demo", "cases": "0-4",
        "max_steps": 2, "max_tokens_per_call": 24, "run_name": "pool", "compute": "local"}
EXPERIMENT = {"name": "live", "source_models": ["tiny-llama"],
              "arms": [{"name": "demo", "pool": "pool", "evaluator": "scripted:judge"}], "seeds": [2],
              "betas": [0.1], "configurations": ["safe", "help", "safe->help"], "emulator": "scripted:emulator",
              "case_set": "demo", "cases": "0-4", "emulation": {"max_steps": 2, "max_tokens_per_call": 24},
              "train": {"max_steps": 1, "gradient_accumulation_steps": 1, "save_steps": 1, "logging_steps": 1,
                        "max_length": 4096, "max_prompt_length": 4096},
              "pairs": {"min_score_difference": 1, "min_chosen_score": 1}, "n_bootstrap": 20, "compute": "local",
              "require_approval": True}


def _tis(af, dag_id, run_id):
    return af.task_instances(dag_id, run_id)


def _when(text):
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _approve_when_asked(af, run_id) -> dict:
    """Wait until ``approve_cost`` awaits input, record what the approval step shows and what has started by
    then, approve through the REST API and follow the run to its end; returns those facts."""
    deadline = time.monotonic() + 300
    states: dict = {}
    while time.monotonic() < deadline:
        states = {t["task_id"]: t["state"] for t in _tis(af, "dpo_experiment", run_id)}
        if states.get("approve_cost") == "awaiting_input":
            break
        if states.get("approve_cost") in ("success", "failed", "skipped", "upstream_failed"):
            return {"never_waited": states}
        time.sleep(2)
    else:
        return {"never_waited": states}
    quoted = urllib.parse.quote(run_id, safe="")
    detail = af.call("GET", f"/dags/dpo_experiment/dagRuns/{quoted}/taskInstances/approve_cost/-1/hitlDetails")
    time.sleep(15)  # the scheduler has had many loops: still nothing after the approval may start
    started = {t["task_id"] for t in _tis(af, "dpo_experiment", run_id) if t["start_date"]}
    af.call("PATCH", f"/dags/dpo_experiment/dagRuns/{quoted}/taskInstances/approve_cost/-1/hitlDetails",
            {"chosen_options": ["Approve"]})
    return {"never_waited": None, "body": detail["body"], "started_before_approval": started,
            "final_state": af.follow("dpo_experiment", run_id, timeout=1800)}


@pytest.fixture(scope="module")
def experiment(live_services):
    """The pool evaluated, then one dpo_experiment run, approved when it asks and followed to its end: every
    test of this module gets a finished run whatever runs first (none depends on another test's steps)."""
    demo, urls, home = live_services
    af = demo.Airflow(urls["airflow"], urls["user"], urls["password"])
    pools = {p["name"]: p for p in af.call("GET", "/pools")["pools"]}
    assert pools["gpu"]["slots"] >= 1 and pools["gpu"]["include_deferred"] is False
    assert pools["judge_api"]["include_deferred"] is True
    af.wait_for_dag("toolemu_evaluation")
    assert af.follow("toolemu_evaluation", af.trigger("toolemu_evaluation", POOL), timeout=1200) == "success"
    af.wait_for_dag("dpo_experiment")
    run_id = af.trigger("dpo_experiment", EXPERIMENT)
    facts = _approve_when_asked(af, run_id)
    return af, run_id, home, facts


def test_the_approval_step_blocks_until_approved_through_the_rest_api(experiment):
    _, _, _, facts = experiment
    assert facts["never_waited"] is None, f"approve_cost never waited for input: {facts['never_waited']}"
    assert "GPU-hours" in facts["body"] and "judge calls" in facts["body"]  # the plan's size is shown
    started = facts["started_before_approval"]
    assert not started & {"pairs", "emulate_source", "models_local_judge.train", "report"}, started
    assert facts["final_state"] == "success"


def test_a_first_stage_model_is_judged_before_the_second_stage_built_on_it_trains(experiment):
    af, run_id, _, _ = experiment
    tis = _tis(af, "dpo_experiment", run_id)
    assert {t["task_id"]: t["state"] for t in tis}.get("analyze") == "success", "the DAG run did not finish"
    chain = {(t["task_id"].split(".")[-1], t["rendered_map_index"]): t for t in tis
             if t["task_id"].startswith("models_local_judge.")}
    [first] = [name for (step, name), t in chain.items() if step == "train2" and t["state"] == "success"]
    evaluated = _when(chain[("evaluate", first)]["end_date"])
    second_starts = _when(chain[("train2", first)]["start_date"])
    assert evaluated < second_starts
    # and the other first-stage model (no second stage) was trained too, each chain named by its model
    names = {name for (step, name) in chain if step == "train"}
    assert first in names and len(names) == 2
    assert {chain[("merge", n)]["state"] for n in names} == {"success", "skipped"}


def test_every_task_instance_of_a_run_is_read_page_by_page(experiment):
    """The API answers at most 100 task instances per call (the study's run has 1,229; the rehearsal's progress
    line read only the first 100): small pages over this run give every instance, once."""
    af, run_id, _, _ = experiment
    quoted = urllib.parse.quote(run_id, safe="")
    total = af.call("GET", f"/dags/dpo_experiment/dagRuns/{quoted}/taskInstances?limit=1")["total_entries"]
    paged = af.task_instances("dpo_experiment", run_id, page_size=7)
    assert total > 7 and len(paged) == total
    assert len({(t["task_id"], t["map_index"]) for t in paged}) == total


def test_the_asset_scheduled_dags_ran_when_the_pool_was_evaluated_and_reported(experiment):
    """toolemu_evaluation's repair announces evaluations and its report announces reports (Assets): the scheduler
    then ran rerun_failed_evaluations on that pool and refresh_analysis of it, without anyone triggering them."""
    af, _, home, _ = experiment
    deadline = time.monotonic() + 600
    while True:
        runs = {dag: af.call("GET", f"/dags/{dag}/dagRuns?limit=50")["dag_runs"]
                for dag in ("rerun_failed_evaluations", "refresh_analysis")}
        triggered = {dag: [r for r in rs if r["run_type"] == "asset_triggered"] for dag, rs in runs.items()}
        settled = all(any(r["state"] == "success" for r in rs) and not any(r["state"] in ("queued", "running")
                                                                           for r in rs) for rs in triggered.values())
        if settled or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert {dag: sorted({r["state"] for r in rs}) for dag, rs in triggered.items()} == {
        "rerun_failed_evaluations": ["success"], "refresh_analysis": ["success"]}
    # (another test's evaluation in the same services may have triggered a run of its own: find the pool's)
    analyses = [(t["task_id"], t["rendered_map_index"], t["state"]) for run in triggered["refresh_analysis"]
                for t in _tis(af, "refresh_analysis", run["dag_run_id"]) if t["task_id"] == "analyze"]
    assert ("analyze", "pool", "success") in analyses
    assert (home / "analysis" / "pool" / "summary.json").is_file()


def test_mlflow_shows_every_trajectory_as_a_trace_the_lineage_and_the_costs(experiment, live_services):
    """The demo-shaped run in MLflow (issue 17): a trace per judged trajectory with the judge's assessments, the
    training runs' pair sets as dataset inputs, registry versions with lineage tags and aliases, and the DAG
    run's parent summing its stages' tokens and time."""
    import json

    from mlflow import MlflowClient

    from pipeline.data.manifest import file_digest
    from pipeline.tracking.traces import judged_files
    from pipeline.training.registry import registry_family

    af, run_id, home, _ = experiment
    _, urls, _ = live_services
    assert {t["task_id"]: t["state"] for t in _tis(af, "dpo_experiment", run_id)}.get("analyze") == "success"
    c = MlflowClient(tracking_uri=urls["mlflow"], registry_uri=urls["mlflow"])
    # the demo's own check: every judged trajectory a trace with both judgements (raises otherwise)
    demo, _, _ = live_services
    files = judged_files(home / "trajectories")
    assert len(files) >= 4  # the pool's two agents, the source model and the trained models
    n = sum(len(f.read_text().splitlines()) for f in files)
    assert demo.check_traces(urls["mlflow"], home).startswith(f"checked: {n} trajectories of {len(files)} run files")
    models = [d for d in (home / "models").iterdir() if (d / "training_config.json").is_file()]
    assert len(models) == 3  # safe, help, safe->help
    training = c.get_experiment_by_name("training").experiment_id
    for d in models:
        cfg = json.loads((d / "training_config.json").read_text())
        [run] = c.search_runs([training], f"tags.model_name = '{d.name}' and tags.`agentpipe.stage` = 'train'")
        [inp] = run.inputs.dataset_inputs
        assert inp.dataset.digest == file_digest(cfg["data_path"])[:36] and inp.dataset.name == cfg["dataset"]
        [adapter] = [v for v in c.search_model_versions(f"name = '{registry_family(d.name)}'")
                     if v.tags.get("model_name") == d.name and v.tags["kind"] == "adapter"]
        assert adapter.tags["dataset"] == cfg["dataset"] and adapter.tags["seed"] == "2"
        assert adapter.tags["stage"] == ("2" if "_s2_" in d.name else "1")
        assert "latest-adapter" in c.get_registered_model(registry_family(d.name)).aliases
    merged = [v for d in models for v in c.search_model_versions(f"name = '{registry_family(d.name)}'")
              if v.tags["kind"] == "merged"]
    assert len(merged) == 1 and merged[0].source == f"runs:/{merged[0].run_id}/model"
    # the DAG run's parent (its stage runs carry the same airflow tags)
    [parent] = c.search_runs([training], f"attributes.run_name = 'dpo_experiment {run_id}'")
    m = parent.data.metrics
    assert m["total_tokens_agent"] > 0 and m["total_tokens_judge"] > 0 and m["total_wall_s"] > 0


# --------------------------------------------------------------------------------------- the Batch API judge
# Last in this module: its pool ("batchpool", judged by an API judge on one metric) is announced like any other, so
# the asset-scheduled DAGs then run on it too (and the MLflow check above counts every judged file of the home):
# the tests above must not see it. The evaluate task waits deferred, holding no worker and no pool slot, while the
# fake Batch API holds the batch; when the batch ends the trigger fires and the task collects the answers.
BATCH_CONF = {"agents": ["scripted:agent"], "emulator": "scripted:emulator", "evaluator": "openai:gpt-4o-mini",
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
    run_id = af.trigger("toolemu_evaluation", BATCH_CONF)
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
