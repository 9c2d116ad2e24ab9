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


#: what the fake API answers: the agent ends each case at once, the judge gives a valid score; fixed usage
AGENT_REPLY = "Thought: nothing to do.\nFinal Answer: done."
JUDGE_REPLY = ("Evaluator Thought: fine.\nOverall Qualitative Label: Good (2)\nOverall Quantitative Score: 2\n"
               "Evaluator Log Summary: fine.")
USAGE = {"costly-agent": (1000, 50), "costly-judge": (700, 30)}  # (prompt, completion) tokens per call
PRICES = {"costly-agent": (2.0, 8.0), "costly-judge": (0.5, 4.0)}  # USD per million (input, output)


@pytest.fixture
def fake_api():
    """An OpenAI-compatible server that counts the calls per model and answers with fixed usage."""
    import threading
    from collections import Counter
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    calls: Counter = Counter()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            model = payload["model"]
            calls[model] += 1
            prompt, completion = USAGE[model]
            body = json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": model, "choices": [
                {"index": 0, "finish_reason": "stop", "message": {
                    "role": "assistant", "content": AGENT_REPLY if model == "costly-agent" else JUDGE_REPLY}}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}/v1", calls
    httpd.shutdown()
    httpd.server_close()


def test_stage_runs_log_tokens_time_and_gpu_hours_and_the_parent_sums_them(mlflow_server, tmp_path, fake_api):
    """Tokens and USD in MLflow equal the figures computed here from the calls the API server counted, its
    fixed usage and the test's own prices (not from what the stages wrote)."""
    from pipeline.tracking import Tracker
    from pipeline.tracking.stage_runs import child_sums

    url, calls = fake_api
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"models": {m: {"input": i, "output": o} for m, (i, o) in PRICES.items()}}))
    home = tmp_path / "home"
    parent = Tracker.open(tmp_path / "parent", experiment="evaluation", run_name="dag run",
                          tracking_uri=mlflow_server)
    parent.flush(force=True)
    env = {"AGENTPIPE_HOME": str(home), "MLFLOW_TRACKING_URI": mlflow_server,
           "AGENTPIPE_MLFLOW_PARENT_RUN_ID": parent.run_id, "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "2",
           "SLURM_JOB_START_TIME": str(int(time.time()) - 360), "AGENTPIPE_OPENAI_BASE_URL": url,
           "OPENAI_API_KEY": "sk-test", "AGENTPIPE_PRICES": str(prices)}
    r = run_agentpipe("emulate", "--agent", "openai:costly-agent", "--agent-label", "costed", "--emulator",
                      "scripted:emulator", "--case-set", "demo", "--cases", "0-3", env=env)
    assert r.returncode == 0, r.stderr
    raw = next((home / "trajectories" / "costed").glob("*.jsonl"))
    r = run_agentpipe("evaluate", "--trajectories", str(raw), "--evaluator", "openai:costly-judge", env=env)
    assert r.returncode == 0, r.stderr

    def expected(model: str) -> tuple[int, float]:
        (p, c), (pi, po) = USAGE[model], PRICES[model]
        return calls[model] * (p + c), calls[model] * (p * pi + c * po) / 1e6

    assert calls["costly-agent"] == 3  # each of the 3 cases ends with the agent's first answer
    emu = _stage_run(mlflow_server, "evaluation", "emulate")
    m = emu.data.metrics
    tokens, usd = expected("costly-agent")
    assert m["tokens_agent"] == tokens == 3150 and m["cost_usd_agent"] == pytest.approx(usd) == 0.0072
    assert m.get("tokens_emulator", 0) == 0  # no tool was called: the emulator was never asked
    assert m["cases"] == 3 and m["failed"] == 0
    # inside the Slurm job: the job's elapsed time (≥ 6 min) on its 2 GPUs
    assert 360 <= m["wall_s"] < 420 and m["gpu_hours"] == pytest.approx(2 * m["wall_s"] / 3600, rel=1e-3)
    assert emu.data.tags["mlflow.parentRunId"] == parent.run_id

    ev = _stage_run(mlflow_server, "evaluation", "evaluate").data.metrics
    tokens, usd = expected("costly-judge")
    assert calls["costly-judge"] == 6  # 3 cases x 2 metrics, each answered validly at once
    assert ev["tokens_judge"] == tokens and ev["cost_usd_judge"] == pytest.approx(usd) and ev["judgements"] == 6

    sums = child_sums(parent.run_id, mlflow_server)
    assert sums["tokens_agent"] == 3150 and sums["tokens_judge"] == tokens
    assert sums["cost_usd_agent"] == pytest.approx(0.0072) and sums["cost_usd_judge"] == pytest.approx(usd)
    assert sums["gpu_hours"] == pytest.approx(m["gpu_hours"] + ev["gpu_hours"], abs=1e-5)


def test_usage_totals_per_role_add_tokens_and_usd():
    from pipeline.tracking.stage_runs import add_usage, usage_metrics

    totals: dict = {}
    for u in ({"prompt_tokens": 1000, "completion_tokens": 50, "cost_usd": 0.0125},
              {"prompt_tokens": 2000, "completion_tokens": 150, "cost_usd": 0.025}, None):
        add_usage(totals, "judge", u)
    assert usage_metrics(totals) == {"tokens_judge": 3200.0, "prompt_tokens_judge": 3000.0,
                                     "cost_usd_judge": 0.0375, "cost_usd_judge_if_sync": 0.0375,
                                     "cost_usd_judge_if_batch": 0.01875}  # both modes: synchronous calls here


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
