"""The tracking journal: durable first, MLflow when reachable, idempotent replay (`agentpipe track sync`)."""

from __future__ import annotations

import json
import time

import pytest

from pipeline.errors import ConfigError
from pipeline.tracking import Tracker, find_journals, sync
from pipeline.tracking.journal import JOURNAL, STATE, read_journal
from tests.conftest import run_agentpipe

DOWN = "http://127.0.0.1:9"  # discard port: nothing listens, connections are refused at once


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _log_some(t: Tracker, artifact) -> None:
    t.log_params({"learning_rate": 5e-5, "lora_r": 16, "targets": ["q_proj", "v_proj"], "openai_api_key": "sk-x",
                  "hf_token": "hf_abc"})
    for step in (1, 2, 3):
        t.log_metrics({"loss": 1.0 / step, "rewards/accuracies": step / 3, "note": "ignored"}, step=step)
    t.set_tags({"dataset": "safe_q32"})
    t.log_artifact(artifact, "adapter")
    t.register_model("toy-model", "adapter", tags={"base_model": "tiny", "seed": 0, "beta": 0.1})


@pytest.fixture
def artifact(tmp_path):
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"r": 16}')
    return d


def test_journal_only_without_a_tracking_server(tmp_path, artifact, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("AGENTPIPE_MLFLOW_TRACKING_URI", raising=False)

    with Tracker.open(tmp_path / "j", experiment="training", run_name="toy") as t:
        _log_some(t, artifact)
    assert t.tracking_uri is None and t.run_id is None
    ops = read_journal(tmp_path / "j")
    assert [op["op"] for op in ops] == ["start", "params", "metrics", "metrics", "metrics", "tags", "artifact",
                                        "register_model", "end"]
    assert [op["seq"] for op in ops] == list(range(9))
    params = ops[1]["params"]
    assert params == {"learning_rate": "5e-05", "lora_r": "16", "targets": '["q_proj", "v_proj"]'}  # no secrets
    assert ops[2]["metrics"] == {"loss": 1.0, "rewards/accuracies": pytest.approx(1 / 3)} and ops[2]["step"] == 1
    assert ops[-1]["status"] == "FINISHED" and not (tmp_path / "j" / STATE).exists()
    assert ops[0]["tags"]["agentpipe.code_version"]


def test_failed_block_ends_the_run_failed_and_bad_experiment_is_refused(tmp_path):
    with pytest.raises(RuntimeError):
        with Tracker.open(tmp_path / "j", experiment="evaluation", tracking_uri=DOWN):
            raise RuntimeError("boom")
    last = read_journal(tmp_path / "j")[-1]
    assert last["op"] == "end" and last["status"] == "FAILED"
    with pytest.raises(ConfigError, match="expected one of training, evaluation, analysis"):
        Tracker.open(tmp_path / "k", experiment="misc")
    with pytest.raises(ConfigError, match="belongs to experiment 'evaluation'"):
        Tracker.open(tmp_path / "j", experiment="training")


def test_sends_everything_to_a_real_server(mlflow_server, tmp_path, artifact):
    parent = Tracker.open(tmp_path / "parent", experiment="training", run_name="parent", tracking_uri=mlflow_server)
    parent.finish()
    with Tracker.open(tmp_path / "child", experiment="training", run_name="toy", parent=tmp_path / "parent",
                      tracking_uri=mlflow_server) as t:
        _log_some(t, artifact)
        t.log_metrics({"pooled.point.Phi-4 S,H-0.1.safety": 1.5, "pooled.point.Phi-4 S&H-0.1.safety": 2.5})
    assert t.pending == 0
    c = _client(mlflow_server)
    run = c.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "toy"
    # names MLflow would refuse arrive under metric_key's spelling, distinct from each other
    assert run.data.metrics["pooled.point.Phi-4 S:H-0.1.safety"] == 1.5
    assert run.data.metrics["pooled.point.Phi-4 S and H-0.1.safety"] == 2.5
    assert run.data.params == {"learning_rate": "5e-05", "lora_r": "16", "targets": '["q_proj", "v_proj"]'}
    assert run.data.tags["dataset"] == "safe_q32" and run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert [(m.step, m.value) for m in c.get_metric_history(t.run_id, "loss")] == [(1, 1.0), (2, 0.5),
                                                                                   (3, pytest.approx(1 / 3))]
    assert [f.path for f in c.list_artifacts(t.run_id, "adapter")] == ["adapter/adapter_config.json"]
    versions = [v for v in c.search_model_versions("name = 'toy-model'") if v.run_id == t.run_id]
    assert len(versions) == 1 and versions[0].tags["seed"] == "0" and versions[0].source.endswith("/adapter")
    assert c.get_experiment(run.info.experiment_id).name == "training"


def test_a_child_in_another_experiment_nests_under_a_mirror_of_its_parent(mlflow_server, tmp_path):
    """The MLflow UI nests runs only within one experiment: a DAG run's evaluation and analysis runs hang under a
    mirror of the (training) parent in their own experiment, one mirror per experiment, ended with the parent."""
    parent = Tracker.open(tmp_path / "parent", experiment="training", run_name="dag run", tracking_uri=mlflow_server,
                          tags={"airflow.dag_id": "dpo_experiment"})
    parent.flush()
    children = []
    for name, exp in (("eval-a", "evaluation"), ("eval-b", "evaluation"), ("analysis", "analysis"),
                      ("train", "training")):
        with Tracker.open(tmp_path / name, experiment=exp, run_name=name, parent=tmp_path / "parent",
                          tracking_uri=mlflow_server) as t:
            t.log_metrics({"x": 1.0})
        children.append(t)
    parent.finish("FAILED")
    c = _client(mlflow_server)
    runs = {t.folder.name: c.get_run(t.run_id) for t in children}
    mirrors = {runs[n].data.tags["mlflow.parentRunId"] for n in ("eval-a", "eval-b", "analysis")}
    assert len(mirrors) == 2 and parent.run_id not in mirrors  # one mirror in evaluation, one in analysis
    assert runs["train"].data.tags["mlflow.parentRunId"] == parent.run_id  # same experiment: the parent itself
    for mirror_id in mirrors:
        mirror = c.get_run(mirror_id)
        assert mirror.data.tags["agentpipe.mirror_of"] == parent.run_id
        assert mirror.info.run_name == "dag run" and mirror.data.tags["airflow.dag_id"] == "dpo_experiment"
        assert mirror.info.status == "FAILED"  # ended with the parent
    for n in ("eval-a", "analysis"):
        parent_run = c.get_run(runs[n].data.tags["mlflow.parentRunId"])
        assert parent_run.info.experiment_id == runs[n].info.experiment_id


def test_unreachable_server_loses_nothing_and_sync_replays_idempotently(mlflow_server, tmp_path, artifact):
    t0 = time.monotonic()
    with Tracker.open(tmp_path / "run" / "tracking", experiment="training", run_name="offline",
                      tracking_uri=DOWN) as t:
        _log_some(t, artifact)
    assert time.monotonic() - t0 < 10  # a down server costs at most a refused connection per retry window
    assert t.pending == 9 and t.run_id is None
    r = run_agentpipe("track", "sync", str(tmp_path / "run"), "--tracking-uri", DOWN)
    assert r.returncode == 1 and "unreachable" in r.stdout
    r = run_agentpipe("track", "sync", str(tmp_path / "run"), "--tracking-uri", mlflow_server)
    assert r.returncode == 0, r.stderr
    assert "ok: 9 sent now, 0 pending of 9" in r.stdout
    state = json.loads((tmp_path / "run" / "tracking" / STATE).read_text())
    run_id = state["targets"][mlflow_server]["run_id"]
    c = _client(mlflow_server)
    assert c.get_run(run_id).info.status == "FINISHED"
    assert len(c.get_metric_history(run_id, "loss")) == 3
    # Syncing again sends nothing; even with the sync state lost, the run is found again and nothing doubles.
    assert sync(tmp_path / "run" / "tracking", mlflow_server).sent == 0
    (tmp_path / "run" / "tracking" / STATE).unlink()
    report = sync(tmp_path / "run" / "tracking", mlflow_server)
    assert report.run_id == run_id and report.pending == 0 and not report.rejected
    assert len(c.get_metric_history(run_id, "loss")) == 3
    assert len([v for v in c.search_model_versions("name = 'toy-model'") if v.run_id == run_id]) == 1
    runs = c.search_runs([c.get_run(run_id).info.experiment_id], filter_string="attributes.run_name = 'offline'")
    assert len(runs) == 1
    r = run_agentpipe("track", "status", str(tmp_path / "run"), "--tracking-uri", mlflow_server)
    assert r.returncode == 0 and f"run {run_id}, 0 pending, 0 rejected" in r.stdout


def test_resume_continues_the_same_run_and_a_rejected_op_does_not_block(mlflow_server, tmp_path):
    folder = tmp_path / "j"
    t = Tracker.open(folder, experiment="training", run_name="resumable", tracking_uri=mlflow_server)
    t.log_params({"lr": 1})
    t.log_metrics({"loss": 0.9}, step=1)
    first_id = t.run_id
    t._journal.close()  # the process dies here: no end operation
    t2 = Tracker.open(folder, experiment="training", run_name="resumable", tracking_uri=mlflow_server)
    assert t2.resumed and t2.run_id == first_id
    assert _client(mlflow_server).get_run(first_id).info.status == "RUNNING"
    t2.log_params({"lr": 2})  # MLflow refuses to change a logged parameter: rejected, remembered, skipped
    t2.log_metrics({"loss": 0.5}, step=2)
    t2.finish()
    c = _client(mlflow_server)
    run = c.get_run(first_id)
    assert run.info.status == "FINISHED" and run.data.params["lr"] == "1"
    assert [m.step for m in c.get_metric_history(first_id, "loss")] == [1, 2]
    state = json.loads((folder / STATE).read_text())["targets"][mlflow_server]
    assert [r["op"] for r in state["rejected"]] == ["params"] and state["synced_seq"] == read_journal(folder)[-1]["seq"]


def test_a_journal_cut_by_a_crash_is_repaired(tmp_path):
    t = Tracker.open(tmp_path / "j", experiment="analysis", tracking_uri=DOWN)
    t.log_metrics({"r2": 0.5})
    t._journal.close()
    with open(tmp_path / "j" / JOURNAL, "a") as f:
        f.write('{"seq": 2, "op": "metr')  # a write cut by a crash
    t = Tracker.open(tmp_path / "j", experiment="analysis", tracking_uri=DOWN)
    t.finish()
    assert [op["op"] for op in read_journal(tmp_path / "j")] == ["start", "metrics", "resume", "end"]
    assert find_journals(tmp_path) == [tmp_path / "j"]


@pytest.mark.parametrize("name", ["max_new_tokens", "max_tokens_per_call", "tokenizer", "prompt_tokens",
                                  "sort_key", "key_order", "monkey", "authors"])
def test_ordinary_parameters_whose_names_contain_token_or_key_are_logged(name):
    from pipeline.tracking.secrets import clean_params

    assert clean_params({name: 5}) == {name: "5"}


@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "api_key", "apiKey", "api-key", "hf_token", "HF_TOKEN", "token",
                                  "access_token", "password", "db_passwd", "client_secret", "Authorization",
                                  "aws_access_key", "credentials"])
def test_secret_parameter_names_are_dropped(name):
    from pipeline.tracking.secrets import clean_params

    assert clean_params({name: "x"}) == {}


@pytest.fixture
def refusing_server():
    """A test double of a tracking server behind authentication: every request is answered 401."""
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def _no(self):
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = do_PATCH = do_PUT = _no

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_server_that_refuses_the_credentials_is_an_error_not_pending(refusing_server, tmp_path, artifact):
    with Tracker.open(tmp_path / "run" / "tracking", experiment="training", run_name="auth",
                      tracking_uri=refusing_server) as t:
        _log_some(t, artifact)  # the stage goes on: tracking never fails it
    assert t.refused and "HTTP 401" in t.refused and "MLFLOW_TRACKING_USERNAME" in t.refused
    assert [op["op"] for op in read_journal(tmp_path / "run" / "tracking")][-1] == "end"  # nothing lost
    r = run_agentpipe("track", "sync", str(tmp_path / "run"), "--tracking-uri", refusing_server)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"agentpipe: error: tracking server {refusing_server} refused the request (HTTP 401): set "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN; the journal keeps "
        "everything for `agentpipe track sync`"]
    assert "refused" in r.stdout and "pending" not in r.stdout


def test_a_pair_set_is_the_runs_dataset_input(mlflow_server, tmp_path):
    pairs = tmp_path / "safe_q32_s0.jsonl"
    pairs.write_text('{"prompt": [], "chosen": [], "rejected": []}\n')
    digest = "ab" * 32
    with Tracker.open(tmp_path / "t", experiment="training", run_name="with-data", tracking_uri=mlflow_server) as t:
        t.log_input("safe_q32_s0", pairs, digest, profile={"train_pairs": 1})
    run = _client(mlflow_server).get_run(t.run_id)
    [inp] = run.inputs.dataset_inputs
    assert (inp.dataset.name, inp.dataset.digest) == ("safe_q32_s0", digest[:36])
    assert json.loads(inp.dataset.source) == {"uri": str(pairs.resolve())}
    assert json.loads(inp.dataset.profile) == {"train_pairs": 1}
    assert {tag.key: tag.value for tag in inp.tags}["mlflow.data.context"] == "training"
