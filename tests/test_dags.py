"""The DAGs: hygiene (fast imports, no heavy modules) and end-to-end runs through Airflow itself (dag.test())
with the tiny model as the agent that is finetuned, the scripted doubles as emulator and judge, compute local,
against a real MLflow server."""

import json
import threading
import os
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DAG_FILES = sorted(p for p in (REPO / "dags").glob("*.py"))
HEAVY = ("torch", "transformers", "vllm", "trl", "peft", "mlflow", "matplotlib", "pandas")


def test_dag_files_import_fast_and_light():
    script = f"""
import importlib.util, json, sys, time
import airflow.sdk, plugins.stage_operator  # the shared baseline every DAG file needs
out = {{}}
for path in {[str(p) for p in DAG_FILES]!r}:
    t = time.perf_counter()
    spec = importlib.util.spec_from_file_location(path.rsplit('/', 1)[1][:-3], path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    out[path] = time.perf_counter() - t
print(json.dumps({{"times": out, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(got["times"]) == 4
    assert all(t < 1.0 for t in got["times"].values()), got["times"]
    assert got["heavy"] == [], f"heavy modules imported at DAG parse time: {got['heavy']}"


def test_dagbag_has_the_three_dags_without_errors(airflow_home):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    assert set(bag.dags) == {"toolemu_evaluation", "dpo_experiment", "rerun_failed_evaluations", "refresh_analysis"}
    # what the dag processor stores, the scheduler reads back (a mapped operator's partial arguments included)
    from airflow.serialization.serialized_objects import DagSerialization

    for dag in bag.dags.values():
        assert DagSerialization.from_dict(DagSerialization.to_dict(dag)).dag_id == dag.dag_id
    schedule = bag.dags["rerun_failed_evaluations"].schedule  # daily, and when evaluations land
    assert schedule.timetable.expression == "0 3 * * *"
    assert [a.name for a in schedule.asset_condition.objects] == ["agentpipe://evaluations"]
    assert [a.name for a in bag.dags["refresh_analysis"].schedule] == ["agentpipe://reports"]
    # Params are validated: a bad value is refused when a run is created (each Param resolves a value)
    from airflow.sdk.exceptions import ParamValidationError

    params = bag.dags["dpo_experiment"].params
    param = params.get_param
    assert param("configurations").resolve(["safe", "help"]) == ["safe", "help"]
    with pytest.raises(ParamValidationError):
        param("configurations").resolve(["sideways"])
    # the stage options come from the stages' config models: a misspelt option is refused, a known one kept
    assert param("train").resolve({"lora_r": 4, "max_steps": 10}) == {"lora_r": 4, "max_steps": 10}
    with pytest.raises(ParamValidationError):
        param("train").resolve({"lora_rnk": 4})
    with pytest.raises(ParamValidationError):
        param("evaluation").resolve({"replicates": 0})
    with pytest.raises(ParamValidationError):
        param("n_bootstrap").resolve(-1)
    with pytest.raises(ParamValidationError):
        param("max_slurm_jobs").resolve(-1)
    # the cluster preset documented in dags/README.md is a valid configuration of the DAG, key by key
    import re

    preset = json.loads(re.search(r"```json\n(.*?)```", (REPO / "dags" / "README.md").read_text(), re.S).group(1))
    assert preset["require_approval"] is True
    for key, value in preset.items():
        assert param(key).resolve(value) == value, key


def test_dpo_experiment_cross_evaluation_steps_pools_and_analyses(airflow_home):
    """Each chain judges its models by the other arm's judge too: a step per stage and judge kind, after the own
    evaluation (also when that failed: all_done_min_one_success over emulation and own evaluation), from that
    judge's pool; the analyses per setting come from the plan; the Param is a boolean or null (auto)."""
    from airflow.dag_processing.dagbag import DagBag

    from pipeline.experiment import CROSS_STEPS, JUDGE_KINDS
    from plugins.dag_common import ANALYSIS, CHAIN_PRIORITY, EVALUATIONS, JUDGE_POOLS

    dag = DagBag(dag_folder=str(REPO / "dags")).dags["dpo_experiment"]
    tasks = dag.task_dict
    for judge in JUDGE_KINDS:
        group = f"models_{judge}_judge"
        assert tasks[f"{group}.evaluate"].pool == JUDGE_POOLS[judge]
        for stage in ("", "2"):
            for kind in JUDGE_KINDS:
                key = f"cross_evaluate{stage}_{kind}"
                assert key in CROSS_STEPS
                t = tasks[f"{group}.{key}"]
                assert (t.stage, t.spec_key, t.pool) == ("evaluate", key, JUDGE_POOLS[kind])
                assert t.trigger_rule == "all_done_min_one_success"
                assert t.upstream_task_ids - {f"chains_{judge}_judge"} == {f"{group}.emulate{stage}",
                                                                          f"{group}.evaluate{stage}"}
                assert t.downstream_task_ids == {"report"}
                assert t.priority_weight == CHAIN_PRIORITY[f"cross_evaluate{stage}"] == CHAIN_PRIORITY[
                    f"evaluate{stage}"] and t.weight_rule == "absolute"
                assert [o.name for o in t.outlets] == [EVALUATIONS.name]
    for key in ("analyze", "analyze_cross"):
        t = tasks[key]
        assert (t.stage, t.spec_key, t.trigger_rule) == ("analyze all", key, "none_failed")
        assert [o.name for o in t.outlets] == [ANALYSIS.name]
        assert t.upstream_task_ids == {"report", "plan"} and t.downstream_task_ids == {"finish_tracking"}
    param = dag.params.get_param("cross_evaluation")
    assert [param.resolve(v) for v in (None, True, False)] == [None, True, False]
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError):
        param.resolve("yes")


def test_a_dag_run_whose_task_states_cannot_be_read_is_not_marked_successful(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from airflow.sdk.exceptions import AirflowFailException

    from pipeline.tracking.journal import read_journal
    from plugins.dag_common import finish_tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder = tmp_path / "parent"

    def broken(**_):
        raise ConnectionError("execution API unreachable")

    ti = SimpleNamespace(dag_id="d", get_task_states=broken)
    with pytest.raises(AirflowFailException, match="cannot read the task states.*marked failed"):
        finish_tracking.function(str(folder), "training", ti=ti, run_id="r")
    ends = [op for op in read_journal(folder) if op["op"] == "end"]
    assert ends and ends[-1]["status"] == "FAILED"


def _mlflow(uri, endpoint, **query):
    with urllib.request.urlopen(f"{uri}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}", timeout=30) as r:
        return json.load(r)


def _runs(uri, experiment):
    exp = _mlflow(uri, "experiments/get-by-name", experiment_name=experiment)["experiment"]
    req = urllib.request.Request(f"{uri}/api/2.0/mlflow/runs/search", method="POST",
                                 data=json.dumps({"experiment_ids": [exp["experiment_id"]], "max_results": 500}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r).get("runs", [])


def _artifacts(uri, run_id, path=""):
    return [f["path"] for f in _mlflow(uri, "artifacts/list", run_id=run_id, path=path).get("files", [])]


def _task_instances(dag_id, run_id):
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(TaskInstance).filter(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id).all()
        session.expunge_all()
    return rows


def _dag(dag_id):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags")).dags[dag_id]


@pytest.fixture(scope="module")
def dag_env(tmp_path_factory, mlflow_server):
    home = tmp_path_factory.mktemp("dag-home")
    saved = {k: os.environ.get(k) for k in ("AGENTPIPE_HOME", "MLFLOW_TRACKING_URI", "OMP_NUM_THREADS")}
    os.environ.update(AGENTPIPE_HOME=str(home), MLFLOW_TRACKING_URI=mlflow_server, OMP_NUM_THREADS="1")
    yield home, mlflow_server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


POOL_CONF = {"agents": ["scripted:agent", "tiny-llama"], "samples": 3, "agent_temperature": 1.0, "emulator": "scripted:emulator",
             "evaluator": "scripted:judge", "case_set": "demo", "cases": "0-4", "max_steps": 2,
             "max_tokens_per_call": 24, "run_name": "pool", "compute": "local"}


@pytest.fixture(scope="module")
def pool_run(dag_env, run_dag):
    dag_run, xcoms = run_dag(_dag("toolemu_evaluation"), run_conf=POOL_CONF)
    return dag_run, xcoms


def test_toolemu_evaluation_dag_end_to_end(pool_run, dag_env):
    home, uri = dag_env
    dag_run, xcoms = pool_run
    assert dag_run.state == "success"
    emulated = [v for (task, _, key), v in xcoms.items() if task == "emulate" and key == "return_value"]
    assert len(emulated) == 6 and all(Path(r["outputs"]["trajectories"]).is_file() and r["counts"]["cases"] == 4 for r in emulated)
    folders = sorted(p.name for p in (home / "trajectories" / "pool").iterdir())
    assert folders == [f"agent-sample{k}" for k in (1, 2, 3)] + [f"agentpipe_tiny-llama-sample{k}" for k in (1, 2, 3)]
    reports = sorted((home / "reports" / "pool").rglob("*_unified_report.json"))
    assert len(reports) == 6
    # one MLflow evaluation run per model, nested under the DAG run's parent run, with the metrics
    runs = _runs(uri, "evaluation")
    parents = [r for r in runs if r["data"].get("tags") and any(t["key"] == "airflow.dag_id" for t in r["data"]["tags"])
               and not any(t["key"] == "mlflow.parentRunId" for t in r["data"]["tags"])]
    assert parents
    children = [r for r in runs if any(t["key"] == "mlflow.parentRunId" for t in r["data"].get("tags", []))]
    names = {r["info"]["run_name"] for r in children}
    assert {f"agentpipe_tiny-llama-sample{k}" for k in (1, 2, 3)} <= names
    child = next(r for r in children if r["info"]["run_name"] == "agentpipe_tiny-llama-sample1")
    metrics = {m["key"] for m in child["data"]["metrics"]}
    assert {"mean_safety", "mean_helpfulness_ignore_safety", "parse_failure_rate_safety"} <= metrics
    assert "report" in _artifacts(uri, child["info"]["run_id"])


def test_dpo_experiment_dag_end_to_end(pool_run, dag_env, run_dag):
    home, uri = dag_env
    conf = {"name": "e2e", "source_models": ["tiny-llama"],
            "arms": [{"name": "demo", "pool": "pool", "evaluator": "scripted:judge"}], "seeds": [2], "betas": [0.1],
            "configurations": ["safe", "help", "safe->help"], "emulator": "scripted:emulator", "case_set": "demo",
            "cases": "0-4", "emulation": {"max_steps": 2, "max_tokens_per_call": 24},
            "train": {"max_steps": 2, "gradient_accumulation_steps": 1, "save_steps": 1, "logging_steps": 1,
                      "max_length": 4096, "max_prompt_length": 4096},
            "pairs": {"min_score_difference": 1, "min_chosen_score": 1}, "n_bootstrap": 20, "compute": "local"}
    dag_run, xcoms = run_dag(_dag("dpo_experiment"), run_conf=conf)
    assert dag_run.state == "success"
    plan = json.loads((home / "experiments" / "e2e" / "plan.json").read_text())
    # one chain per first-stage model, named by it in the UI; the help model's chain has no second stage
    tis = _task_instances("dpo_experiment", dag_run.run_id)
    chain_names = {c["name"] for c in plan["chains"]}
    assert len(chain_names) == 2
    trains = {ti.rendered_map_index: ti.state for ti in tis if ti.task_id == "models_local_judge.train"}
    assert trains == dict.fromkeys(chain_names, "success")
    merges = {ti.rendered_map_index: ti.state for ti in tis if ti.task_id == "models_local_judge.merge"}
    [safe] = [c["name"] for c in plan["chains"] if c["merge"]]
    assert merges == {safe: "success", next(iter(chain_names - {safe})): "skipped"}
    assert {ti.state for ti in tis if ti.task_id == "models_local_judge.evaluate"} == {"success"}
    assert {ti.state for ti in tis if ti.task_id.startswith("models_api_judge.")} <= {"skipped"}
    assert {ti.task_id: ti.state for ti in tis}["approve_cost"] == "success"  # not required: passed through
    names = sorted(plan["models"])
    assert len(names) == 3  # safe, help, and safe->help's second stage (its first stage is the safe model)
    for name in names:
        assert (Path(plan["models"][name]) / "adapter" / "adapter_config.json").is_file(), name
    [first] = [m["adapter"] for m in plan["merge"]]
    assert (Path(first).parent / "merged" / "config.json").is_file()
    finetuned = sorted(p.name for p in (home / "trajectories" / "e2e").iterdir())
    assert finetuned == sorted(["agentpipe_tiny-llama"] + [f"dpo_{n}" for n in names])
    summary = json.loads((home / "analysis" / "e2e" / "summary.json").read_text())
    assert summary["arms"]
    # MLflow: training runs with per-step DPO metrics and the adapter, an analysis run with the frontier plot
    train_runs = [r for r in _runs(uri, "training") if r["info"]["run_name"] in names]
    assert len(train_runs) >= 3
    run = train_runs[0]
    assert "rewards/accuracies" in {m["key"] for m in run["data"]["metrics"]}
    # lineage: each training run lists the pair set it read as its dataset input
    for r in train_runs:
        [inp] = r["inputs"]["dataset_inputs"]
        assert json.loads(inp["dataset"]["source"])["uri"].startswith(str(home / "pairs"))
        assert len(inp["dataset"]["digest"]) == 36
    assert any(a.startswith("adapter") for a in _artifacts(uri, run["info"]["run_id"]))
    analysis = [r for r in _runs(uri, "analysis") if r["info"]["run_name"] == "e2e"]
    assert analysis and "plots/pareto.png" in _artifacts(uri, analysis[0]["info"]["run_id"], "plots")
    # the analysis run carries each configuration's point, equal to the summary file's
    logged = {m["key"]: m["value"] for m in analysis[0]["data"]["metrics"]}
    points = [(arm, p) for arm, a in summary["arms"].items() for p in a["frontier"]["points"]]
    assert len(points) >= 4  # source + safe, help, safe->help
    for arm, p in points:
        key = f"{arm}.point.{p['name'].replace(',', ':')}"
        assert logged[f"{key}.safety"] == pytest.approx(p["safety"])
        assert logged[f"{key}.helpfulness"] == pytest.approx(p["helpfulness"])
    # Rerunning the experiment reuses every finished stage (no retraining, no re-merge) and succeeds.
    merged = Path(first).parent / "merged" / "config.json"
    stamps = {p: p.stat().st_mtime_ns for p in [merged, *(Path(plan["models"][n]) / "adapter" / "adapter_config.json"
                                                          for n in names)]}
    again, _ = run_dag(_dag("dpo_experiment"), run_conf=conf)
    assert again.state == "success"
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((home / "analysis" / "e2e" / "summary.json").read_text())["arms"] == summary["arms"]


def test_a_failed_stage_fails_the_dag_run_and_its_parent_mlflow_run(dag_env, run_dag):
    """finish_tracking runs whatever happened upstream; it must not turn a failed DAG run into a success."""
    home, _ = dag_env
    dag = _dag("toolemu_evaluation")
    for t in dag.tasks:
        t.retries = 0
    conf = {**POOL_CONF, "agents": ["scripted:agent"], "case_set": str(home / "no-such-cases.json"),
            "run_name": "broken"}
    dag_run, xcoms = run_dag(dag, run_conf=conf)
    assert dag_run.state == "failed"
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        states = {ti.task_id: ti.state for ti in session.query(TaskInstance).filter(
            TaskInstance.dag_id == dag.dag_id, TaskInstance.run_id == dag_run.run_id)}
    assert states["finish_tracking"] == "failed" and "failed" in {states[t] for t in states if t != "finish_tracking"}
    journal = Path(xcoms[("start_tracking", -1, "return_value")]) / "journal.jsonl"
    ends = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [op["status"] for op in ends if op["op"] == "end"][-1] == "FAILED"


def test_rerun_failed_evaluations_dag_fixes_a_planted_failure(dag_env, run_dag, tmp_path):
    from pipeline.data.jsonl import atomic_write_jsonl, read_jsonl
    from pipeline.emulation.runner import EmulationConfig, run_emulation
    from pipeline.evaluation.runner import EvaluationConfig, run_evaluation

    runs = tmp_path / "runs"
    traj = run_emulation(EmulationConfig(agent="scripted:agent", emulator="scripted:emulator", case_set="demo",
                                         evaluator="scripted:judge", out=runs)).path
    res = run_evaluation(EvaluationConfig(trajectories=traj, evaluator="scripted:judge", metrics="safe"))
    path = res.eval_files["agent_safe"]
    records = read_jsonl(path).records
    planted = next(i for i, r in enumerate(records) if r["status"] == "ok")
    records[planted] = {**records[planted], "eval_scores": {}, "status": "error", "error": "HTTP 503 planted",
                        "Evaluator Thought": None, "Overall Qualitative Label": None, "Overall Quantitative Score": None}
    for r in records:  # start from a file whose only failure is the planted one
        if r["status"] != "ok" and r is not records[planted]:
            r.update(eval_scores={"ToolCallRisk": 2}, status="ok")
    atomic_write_jsonl(path, records)
    dag_run, _ = run_dag(_dag("rerun_failed_evaluations"),
                         run_conf={"runs": str(runs), "eval_types": "safe", "compute": "local"})
    assert dag_run.state == "success"
    fixed = read_jsonl(path).records[planted]
    assert fixed["status"] == "rerun" and fixed["eval_scores"]["ToolCallRisk"] in (0, 1, 2, 3)
    assert fixed["eval_id"] == planted


def test_rerun_failed_evaluations_daily_run_on_a_new_home_has_nothing_to_do(dag_env, run_dag, tmp_path, monkeypatch):
    """The daily run on an installation with no trajectories yet (the demo's first start) succeeds with nothing to
    repair; a folder named by hand that does not exist is still refused."""
    monkeypatch.setenv("AGENTPIPE_HOME", str(tmp_path / "new-home"))
    dag_run, xcoms = run_dag(_dag("rerun_failed_evaluations"), run_conf={"eval_types": "safe", "compute": "local"})
    assert dag_run.state == "success" and xcoms[("targets", -1, "return_value")] == []
    dag_run, _ = run_dag(_dag("rerun_failed_evaluations"),
                         run_conf={"runs": str(tmp_path / "missing"), "eval_types": "safe", "compute": "local"})
    assert dag_run.state == "failed"


def _answer_approval(dag_id: str, answer: str | None, outcome: list) -> None:
    """Stand in for the person (or the scheduler's timeout sweep) while ``dag.test()`` waits at ``approve_cost``:
    once the task is parked awaiting input, record ``answer`` the way the HITL REST API does (``None``: run the
    scheduler's timeout sweep instead, as a real scheduler does once the deadline passed). ``outcome`` gets
    "answered", or the error that stopped this; then the task is failed so that ``dag.test()`` ends."""
    import logging
    import time
    import types

    from sqlalchemy.orm import joinedload

    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.trigger import handle_event_submit
    from airflow.triggers.base import TriggerEvent
    from airflow.sdk import timezone
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState

    def parked(session):
        return (session.query(TaskInstance).options(joinedload(TaskInstance.hitl_detail))
                .filter(TaskInstance.dag_id == dag_id, TaskInstance.task_id == "approve_cost",
                        TaskInstance.state == TaskInstanceState.AWAITING_INPUT).first())

    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            with create_session() as session:
                ti = parked(session)
                if ti is not None and answer is not None:
                    detail = ti.hitl_detail
                    detail.chosen_options, detail.params_input = [answer], {}
                    detail.responded_by, detail.responded_at = {"id": "1", "name": "reviewer"}, timezone.utcnow()
                    session.add(detail)
                    handle_event_submit(TriggerEvent(detail.as_resume_event_payload()), task_instance=ti,
                                        session=session)
                    outcome.append("answered")
                    return
                if ti is not None and ti.trigger_timeout is not None and ti.trigger_timeout < timezone.utcnow():
                    SchedulerJobRunner.check_awaiting_input_timeouts(
                        types.SimpleNamespace(log=logging.getLogger("sweep")), session=session)
                    outcome.append("answered")
                    return
            time.sleep(0.5)
        outcome.append(TimeoutError("approve_cost was neither answered nor timed out within 300 s"))
    except Exception as e:  # noqa: BLE001 - reported by the test; the run must still end
        outcome.append(e)
    with create_session() as session:
        ti = parked(session)
        if ti is not None:
            ti.state = TaskInstanceState.FAILED


@pytest.mark.parametrize("answer", ["Reject", None], ids=["rejected", "timed-out"])
def test_a_rejected_or_timed_out_cost_approval_runs_nothing_downstream(dag_env, run_dag, answer):
    """Rejecting approve_cost (or leaving it unanswered past approval_timeout_hours) runs no stage: report and
    analyze, whose trigger rule is none_failed, used to run on whatever the folders held and log to MLflow."""
    home, _ = dag_env
    name = f"approval-{'rejected' if answer else 'timeout'}"
    conf = {"name": name, "source_models": ["tiny-llama"],
            "arms": [{"name": "demo", "pool": "pool", "evaluator": "scripted:judge"}], "seeds": [2],
            "configurations": ["safe"], "emulator": "scripted:emulator", "case_set": "demo", "cases": "0-4",
            "compute": "local", "require_approval": True,
            **({} if answer else {"approval_timeout_hours": 2 / 3600})}
    outcome: list = []
    responder = threading.Thread(target=_answer_approval, args=("dpo_experiment", answer, outcome), daemon=True)
    responder.start()
    dag_run, _ = run_dag(_dag("dpo_experiment"), run_conf=conf)
    responder.join(timeout=5)
    assert outcome == ["answered"]  # the approval was really asked for and answered (or timed out)
    states = {(ti.task_id, ti.map_index): ti.state for ti in _task_instances("dpo_experiment", dag_run.run_id)}
    print(f"\n{name}: " + ", ".join(f"{t}{'' if i < 0 else f'[{i}]'}={s}" for (t, i), s in sorted(states.items())))
    assert states[("approve_cost", -1)] == "failed"
    assert states[("report", -1)] == "upstream_failed" and states[("analyze", -1)] == "upstream_failed"
    assert {s for (t, _), s in states.items() if t in ("pairs", "emulate_source")} == {"upstream_failed"}
    assert dag_run.state == "failed"
    assert not (home / "reports" / name).exists() and not (home / "analysis" / name).exists()
    assert not (home / "trajectories" / name).exists() and not (home / "pairs" / name).exists()
