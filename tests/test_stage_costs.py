"""Cost and time per stage (issue 17, item 4): emulate, evaluate and pairs runs in MLflow with their counts,
tokens and USD per role, wall time and GPU-hours, and the DAG parent's sums over them.

The stages run as a user runs them (the console script, scripted test-double models), inside a simulated Slurm
job environment (job id, 2 GPUs, started 6 minutes ago), nested under a parent run like a DAG run's.
"""

import json
import time

import pytest

from tests.conftest import run_agentpipe


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _stage_run(uri, experiment, stage):
    c = _client(uri)
    exp = c.get_experiment_by_name(experiment)
    [run] = c.search_runs([exp.experiment_id], f"tags.`agentpipe.stage` = '{stage}' and tags.`slurm.job_id` = '4242'")
    return run


def test_stage_runs_log_tokens_time_and_gpu_hours_and_the_parent_sums_them(mlflow_server, tmp_path):
    from pipeline.tracking import Tracker
    from pipeline.tracking.stage_runs import child_sums

    home = tmp_path / "home"
    parent = Tracker.open(tmp_path / "parent", experiment="evaluation", run_name="dag run",
                          tracking_uri=mlflow_server)
    parent.flush(force=True)
    env = {"AGENTPIPE_HOME": str(home), "MLFLOW_TRACKING_URI": mlflow_server,
           "AGENTPIPE_MLFLOW_PARENT_RUN_ID": parent.run_id, "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "2",
           "SLURM_JOB_START_TIME": str(int(time.time()) - 360)}
    r = run_agentpipe("emulate", "--agent", "scripted:agent", "--agent-label", "costed", "--emulator",
                      "scripted:emulator", "--case-set", "demo", "--cases", "0-3", env=env)
    assert r.returncode == 0, r.stderr
    raw = next((home / "trajectories" / "costed").glob("*.jsonl"))
    r = run_agentpipe("evaluate", "--trajectories", str(raw), "--evaluator", "scripted:judge", env=env)
    assert r.returncode == 0, r.stderr

    records = [json.loads(x) for x in raw.read_text().splitlines()]
    emu = _stage_run(mlflow_server, "evaluation", "emulate")
    m = emu.data.metrics
    for role in ("agent", "emulator"):
        want = sum(rec["usage"][role]["prompt_tokens"] + rec["usage"][role]["completion_tokens"] for rec in records)
        assert m[f"tokens_{role}"] == want > 0
        assert m[f"cost_usd_{role}"] == 0  # scripted models are free
    assert m["cases"] == 3 and m["failed"] == 0
    # inside the Slurm job: the job's elapsed time (≥ 6 min) on its 2 GPUs
    assert 360 <= m["wall_s"] < 420 and m["gpu_hours"] == pytest.approx(2 * m["wall_s"] / 3600, rel=1e-3)
    assert emu.data.tags["mlflow.parentRunId"] == parent.run_id

    judged = raw.with_name(raw.name.replace("_eval-none_", "_eval-judge_"))
    ev = _stage_run(mlflow_server, "evaluation", "evaluate").data.metrics
    judge_tokens = 0
    for f in judged.parent.glob(judged.name[:-6] + "_eval_*.jsonl"):
        for rec in map(json.loads, f.read_text().splitlines()):
            judge_tokens += rec["usage"]["prompt_tokens"] + rec["usage"]["completion_tokens"]
    assert ev["tokens_judge"] == judge_tokens > 0 and ev["judgements"] == 6  # 3 cases x 2 metrics

    sums = child_sums(parent.run_id, mlflow_server)
    assert sums["tokens_agent"] == m["tokens_agent"] and sums["tokens_judge"] == ev["tokens_judge"]
    assert sums["gpu_hours"] == pytest.approx(m["gpu_hours"] + ev["gpu_hours"], abs=1e-5)


def test_usage_totals_per_role_add_tokens_and_usd():
    from pipeline.tracking.stage_runs import add_usage, usage_metrics

    totals: dict = {}
    for u in ({"prompt_tokens": 1000, "completion_tokens": 50, "cost_usd": 0.0125},
              {"prompt_tokens": 2000, "completion_tokens": 150, "cost_usd": 0.025}, None):
        add_usage(totals, "judge", u)
    assert usage_metrics(totals) == {"tokens_judge": 3200.0, "prompt_tokens_judge": 3000.0,
                                     "cost_usd_judge": 0.0375}


@pytest.mark.parametrize("env,gpus", [({"SLURM_GPUS_ON_NODE": "4"}, 4), ({"SLURM_JOB_GPUS": "0,1,2"}, 3),
                                      ({"CUDA_VISIBLE_DEVICES": "0,1"}, 2), ({"CUDA_VISIBLE_DEVICES": ""}, 0),
                                      ({}, 0)])
def test_gpu_count_from_the_job_or_the_visible_devices(monkeypatch, env, gpus):
    from pipeline.tracking.stage_runs import gpu_count

    for var in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert gpu_count() == gpus


def test_api_models_use_no_gpu_time():
    from pipeline.emulation.runner import _uses_gpu

    assert not _uses_gpu(["openai:gpt-5-mini", "openai:gpt-4o"])
    assert _uses_gpu(["openai:gpt-5-mini", "Qwen3-8B"]) and _uses_gpu(["vllm:Qwen/Qwen3-8B"])
