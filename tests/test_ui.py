"""The UIs in a real browser: after a demo-sized DAG run through the real scheduler, headless Chromium logs in
to the Airflow UI and sees the run succeeded, opens the MLflow experiment that lists the runs, and opens one
trajectory's trace, where it finds the judge's assessments and rationale.

Needs Debian's chromium + chromium-driver: installed here when running as root (as in CI); elsewhere the test
skips unless AGENTPIPE_REQUIRE_BROWSER=1 (CI sets it).
"""

import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import load_script

REPO = Path(__file__).resolve().parent.parent


def _ensure_chromium():
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return
    why = "chromium/chromedriver not installed"
    if os.geteuid() == 0:
        cmd = "apt-get install -y -q chromium chromium-driver || (apt-get update -q && apt-get install -y -q chromium chromium-driver)"
        p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=900,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if p.returncode == 0 and shutil.which("chromium"):
            return
        why = f"apt-get install chromium failed: {p.stderr[-500:]}"
    if os.environ.get("AGENTPIPE_REQUIRE_BROWSER") == "1":
        pytest.fail(why)
    pytest.skip(why)


def test_airflow_and_mlflow_uis_show_a_demo_sized_run(live_services, tmp_path):
    _ensure_chromium()
    demo, urls, home = live_services
    ui = load_script("ui_check")
    af = demo.Airflow(urls["airflow"], urls["user"], urls["password"])
    af.wait_for_dag("toolemu_evaluation")
    conf = {"agents": ["scripted:agent"], "emulator": "scripted:emulator", "evaluator": "scripted:judge",
            "case_set": "demo", "cases": "0-2", "run_name": "ui", "compute": "local"}
    run_id = af.trigger("toolemu_evaluation", conf)
    assert af.follow("toolemu_evaluation", run_id, timeout=600) == "success"

    # the run's trajectories are traces in the evaluation experiment, with the judge's assessments
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=urls["mlflow"])
    exp_id = client.get_experiment_by_name("evaluation").experiment_id
    traces = client.search_traces([exp_id], filter_string="tags.`agentpipe.run_file` = "
                                  "'agent_emu-emulator_eval-judge_r0-2.jsonl'", max_results=10)
    assert sorted(int(t.info.tags["case_idx"]) for t in traces) == [0, 1]
    trace = traces[0]
    judged = [a for a in trace.info.assessments if a.source.source_type == "LLM_JUDGE" and a.rationale]
    assert {a.name for a in judged} == {"ToolCallRisk", "Helpfulness"}
    rationale = judged[0].rationale

    shots = REPO / "tests" / "artifacts" if os.environ.get("CI") else tmp_path
    driver = ui.browser()
    try:
        airflow_text = ui.check_airflow(driver, urls["airflow"], urls["password"], "toolemu_evaluation", shots)
        mlflow_text = ui.check_mlflow(driver, urls["mlflow"], "evaluation", shots)
        trace_text = ui.check_mlflow_trace(driver, urls["mlflow"], exp_id, trace.info.trace_id, rationale[:40], shots)
    finally:
        driver.quit()
    assert "ToolCallRisk" in trace_text and "Helpfulness" in trace_text and rationale[:40] in trace_text
    assert (shots / "mlflow-trace.png").stat().st_size > 10_000
    assert "success" in airflow_text.lower()
    assert run_id.split("T")[0] in airflow_text.replace("\n", " ")  # our run is the one listed
    assert "toolemu_evaluation" in mlflow_text  # the DAG run's parent MLflow run
    for name in ("airflow-toolemu_evaluation.png", "mlflow-evaluation.png"):
        assert (shots / name).stat().st_size > 10_000
    # the runs listed in the UI have their metrics (the evaluation run of the agent, nested under the parent)
    with urllib.request.urlopen(f"{urls['mlflow']}/api/2.0/mlflow/experiments/get-by-name?experiment_name=evaluation") as r:
        exp_id = json.load(r)["experiment"]["experiment_id"]
    req = urllib.request.Request(f"{urls['mlflow']}/api/2.0/mlflow/runs/search", method="POST",
                                 data=json.dumps({"experiment_ids": [exp_id]}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        runs = json.load(r)["runs"]
    agent_run = next(r for r in runs if r["info"]["run_name"] == "agent")
    assert {"mean_safety", "mean_helpfulness_ignore_safety"} <= {m["key"] for m in agent_run["data"]["metrics"]}
