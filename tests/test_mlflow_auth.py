"""MLflow with authentication, started the way docker/compose.yaml starts it: mlflow/start.sh --daemon with
MLFLOW_AUTH=basic (a real server; SQLite store and auth database in a temporary MLFLOW_STATE). Anonymous and
wrong-password requests get 401 while /health, which start.sh waits on, stays open; the pipeline's own Tracker logs
a run with MLFLOW_TRACKING_USERNAME/PASSWORD, readable with them and by nobody else; no password lands on disk or in
a log; start.sh refuses bad settings in one line before starting anything."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline.tracking import Tracker
from pipeline.tracking.journal import read_journal

REPO = Path(__file__).resolve().parent.parent
START = REPO / "mlflow" / "start.sh"
MLFLOW_BIN = Path(sys.executable).with_name("mlflow")
ADMIN, PASSWORD = "admin", 'pipeline "pass" \\ word'  # over MLflow's 12-character minimum, with quoting hazards


def _env(state: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without any MLflow client or server setting, plus the server's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AGENTPIPE_MLFLOW"))}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {**env, "MLFLOW_STATE": str(state), "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port),
            "MLFLOW_BIN": str(MLFLOW_BIN), **extra}


def _call(url: str, auth: tuple[str, str] | None = None, body: dict | None = None) -> tuple[int, dict]:
    """One REST call (urllib: no MLflow client, no credentials from the environment): status and JSON body."""
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw, status = r.read(), r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw or b"{}")
    except ValueError:
        return status, {"text": raw.decode(errors="replace")}


def _stop(pidfile: Path) -> None:
    """Stop the server start.sh started: its process group (setsid), SIGKILL after 30 s."""
    if not pidfile.is_file():
        return
    pid = int(pidfile.read_text())
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.3)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """start.sh --daemon with MLFLOW_AUTH=basic and NO_PERMISSIONS (the compose default, READ, differs only in what
    a signed-in user without grants may read); yields (uri, state, start.sh's output, its CWD); stops the server."""
    state, cwd = tmp_path_factory.mktemp("mlflow-auth"), tmp_path_factory.mktemp("mlflow-auth-cwd")
    env = _env(state, MLFLOW_AUTH="basic", MLFLOW_AUTH_ADMIN_PASSWORD=PASSWORD,
               MLFLOW_AUTH_DEFAULT_PERMISSION="NO_PERMISSIONS")
    try:
        p = subprocess.run([str(START), "--daemon"], env=env, capture_output=True, text=True, timeout=300,
                           cwd=cwd, check=False)
        log = state / "mlflow.log"
        assert p.returncode == 0, p.stderr + (log.read_text()[-3000:] if log.exists() else "")
        yield f"http://127.0.0.1:{env['MLFLOW_PORT']}", state, p.stdout + p.stderr, cwd
    finally:
        _stop(state / "mlflow.pid")


@pytest.mark.slow
def test_anonymous_and_wrong_passwords_are_refused_and_health_stays_open(auth_server):
    uri, _, started, _ = auth_server
    assert "auth basic" in started  # start.sh's own line: it waited on /health with authentication on
    assert _call(f"{uri}/health")[0] == 200
    search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=10"
    assert _call(search)[0] == 401
    assert _call(search, (ADMIN, "wrong-password-123"))[0] == 401
    assert _call(search, ("nobody", PASSWORD))[0] == 401
    status, body = _call(search, (ADMIN, PASSWORD))
    assert status == 200 and [e["name"] for e in body["experiments"]] == ["Default"]
    # nobody anonymous deletes experiments, reads the UI or signs themself up
    assert _call(f"{uri}/api/2.0/mlflow/experiments/delete", body={"experiment_id": "0"})[0] == 401
    assert _call(f"{uri}/")[0] == 401
    assert _call(f"{uri}/api/2.0/mlflow/users/create", body={"username": "eve", "password": "x" * 16})[0] == 401
    status, body = _call(f"{uri}/api/2.0/mlflow/experiments/get?experiment_id=0", (ADMIN, PASSWORD))
    assert status == 200 and body["experiment"]["lifecycle_stage"] == "active"


@pytest.mark.slow
def test_the_pipeline_logs_with_the_tracking_credentials_and_only_they_read_it(auth_server, tmp_path, monkeypatch):
    uri, _, _, _ = auth_server
    monkeypatch.delenv("AGENTPIPE_MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    with Tracker.open(tmp_path / "run", experiment="training", run_name="auth-check", tracking_uri=uri) as t:
        t.log_params({"lora_r": 16})
        t.log_metrics({"loss": 0.5}, step=1)
    assert t.refused is None and t.run_id and t.pending == 0
    status, body = _call(f"{uri}/api/2.0/mlflow/runs/get?run_id={t.run_id}", (ADMIN, PASSWORD))
    assert status == 200, body
    run = body["run"]
    assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "auth-check"
    assert [(m["key"], m["value"]) for m in run["data"]["metrics"]] == [("loss", 0.5)]
    assert _call(f"{uri}/api/2.0/mlflow/runs/get?run_id={t.run_id}")[0] == 401
    # a signed-in user nobody granted anything sees nothing (MLFLOW_AUTH_DEFAULT_PERMISSION=NO_PERMISSIONS)
    viewer = ("viewer", "viewer-password-1")
    status, body = _call(f"{uri}/api/2.0/mlflow/users/create", (ADMIN, PASSWORD),
                         {"username": viewer[0], "password": viewer[1]})
    assert status == 200, body
    assert _call(f"{uri}/api/2.0/mlflow/runs/get?run_id={t.run_id}", viewer)[0] == 403
    assert _call(f"{uri}/api/2.0/mlflow/experiments/delete", viewer,
                 {"experiment_id": run["info"]["experiment_id"]})[0] == 403


@pytest.mark.slow
def test_without_credentials_the_tracker_is_refused_and_keeps_its_journal(auth_server, tmp_path, monkeypatch):
    uri, _, _, _ = auth_server
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with Tracker.open(tmp_path / "run", experiment="training", run_name="anonymous", tracking_uri=uri) as t:
        t.log_metrics({"loss": 0.25}, step=1)
    assert t.run_id is None and t.pending > 0
    assert "401" in t.refused and "MLFLOW_TRACKING_USERNAME" in t.refused
    assert [op["op"] for op in read_journal(tmp_path / "run")] == ["start", "metrics", "end"]


@pytest.mark.slow
def test_no_password_on_disk_or_in_a_log_and_the_auth_files_are_private(auth_server):
    _, state, started, cwd = auth_server
    conf = state / "basic_auth.ini"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    text = conf.read_text()
    assert "default_permission = NO_PERMISSIONS" in text and "admin_username = admin" in text
    assert f"database_uri = sqlite:///{state}/basic_auth.db" in text
    # the auth database is the one the generated configuration names, not MLflow's default (basic_auth.db in the CWD)
    assert (state / "basic_auth.db").is_file() and not (cwd / "basic_auth.db").exists()
    # it holds the password hashes: owner-only, like the files start.sh writes itself
    assert stat.S_IMODE((state / "basic_auth.db").stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "flask-secret-key").stat().st_mode) == 0o600
    for f in state.iterdir():
        if f.is_file() and f.suffix != ".db":
            assert PASSWORD not in f.read_text(errors="replace"), f.name
    assert PASSWORD not in started


def test_start_refuses_bad_auth_settings_in_one_line(tmp_path):
    """Refusals come before anything starts: no pid file, no configuration written."""
    cases = [({"MLFLOW_AUTH": "basic"}, "MLFLOW_AUTH_ADMIN_PASSWORD"),
             ({"MLFLOW_AUTH": "basic", "MLFLOW_AUTH_ADMIN_PASSWORD": ""}, "MLFLOW_AUTH_ADMIN_PASSWORD"),
             ({"MLFLOW_AUTH_ADMIN_PASSWORD": "change-me"}, "MLFLOW_AUTH_ADMIN_PASSWORD"),  # a password means basic
             ({"MLFLOW_AUTH_ADMIN_PASSWORD": "eleven-char"}, "MLFLOW_AUTH_ADMIN_PASSWORD"),
             ({"MLFLOW_AUTH": "ldap"}, "MLFLOW_AUTH "),
             ({"MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD, "MLFLOW_AUTH_DEFAULT_PERMISSION": "ALL"},
              "MLFLOW_AUTH_DEFAULT_PERMISSION"),
             ({"MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD, "MLFLOW_AUTH_ADMIN_USERNAME": "two words"},
              "MLFLOW_AUTH_ADMIN_USERNAME")]
    for i, (extra, variable) in enumerate(cases):
        state = tmp_path / str(i)
        p = subprocess.run([str(START), "--daemon"], env=_env(state, **extra), capture_output=True, text=True,
                           timeout=60, check=False)
        assert p.returncode == 2, (extra, p.stdout, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and variable in p.stderr, (extra, p.stderr)
        assert not (state / "mlflow.pid").exists() and not (state / "basic_auth.ini").exists()
        assert PASSWORD not in p.stderr
