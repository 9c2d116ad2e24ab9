"""What can be checked of the Docker deployment without Docker: the compose file parses, everything it
references exists, every variable it uses is documented in .env.example, ports are published on 127.0.0.1 by
default, the Slurm files are mounted where the entrypoint looks when .env names them, MLflow runs with
authentication and the Airflow containers log with its credentials, the images install the same pinned
requirements as `make setup`, and the Airflow image's entrypoint (run here with a fake `airflow`) writes the login
the compose file documents and refuses the example secrets.

`docker compose` is not installed on the development machines (no `docker compose version`), so the compose file is
rendered here: ${VAR} and ${VAR:-default} substituted as compose does, from a given .env."""

import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parent.parent / "docker"
REPO = DOCKER.parent
ENTRYPOINT = DOCKER / "airflow-entrypoint.sh"
AIRFLOW_SERVICES = ("airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                    "airflow-triggerer")
#: ${VAR}, ${VAR:-default}, ${VAR-default} (compose's other forms, :? and :+, are not used here)
VARIABLE = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?:(:?-)([^}]*))?\}")


def _compose():
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _example_env() -> dict[str, str]:
    return dict(line.split("=", 1) for line in (DOCKER / ".env.example").read_text().splitlines()
                if line and not line.startswith("#"))


def _render(env: dict[str, str] | None = None, **overrides: str):
    """compose.yaml as `docker compose config` would see it with this .env (default: .env.example): ${VAR} is the
    value or empty, ${VAR:-d} is d when VAR is unset or empty, ${VAR-d} only when unset."""
    env = {**(_example_env() if env is None else env), **overrides}

    def sub(m: re.Match) -> str:
        name, op, default = m.groups()
        value = env.get(name)
        if (op == ":-" and not value) or (op == "-" and value is None):
            return default
        return value or ""

    def walk(x):
        if isinstance(x, str):
            return VARIABLE.sub(sub, x)
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        return x

    return walk(_compose())


def test_compose_parses_and_has_the_services():
    services = _render()["services"]
    assert {"postgres", "mlflow", *AIRFLOW_SERVICES} <= set(services)
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"):
        assert services[name]["command"][0] in ("api-server", "scheduler", "dag-processor", "triggerer")
        assert services[name]["environment"]["AGENTPIPE_HOME"] == "/runs"
        assert f"{_example_env()['AGENTPIPE_RUNS']}:/runs" in services[name]["volumes"]


def test_build_contexts_dockerfiles_and_mounted_files_exist():
    compose = _compose()
    for name, svc in compose["services"].items():
        build = svc.get("build")
        if build:
            context = (DOCKER / build["context"]).resolve()
            assert context.is_dir(), name
            assert (context / build["dockerfile"]).is_file(), name
        for vol in svc.get("volumes", []):
            src = vol.split(":", 1)[0]
            if src.startswith("./"):
                assert (DOCKER / src).exists(), f"{name}: {src}"
        entry = svc.get("entrypoint")
        if entry and entry[0].startswith("/opt/agentpipe/"):
            assert (REPO / entry[0].removeprefix("/opt/agentpipe/")).is_file()
    for dockerfile in DOCKER.glob("*.Dockerfile"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                for src in line.split()[1:-1]:
                    assert (REPO / src).exists(), f"{dockerfile.name}: COPY {src}"


def test_every_variable_is_documented_in_the_env_example():
    text = (DOCKER / "compose.yaml").read_text()
    used = {m.group(1) for m in VARIABLE.finditer(text)}
    assert {"AIRFLOW_BIND", "MLFLOW_BIND", "SLURM_CONF_DIR", "MUNGE_KEY_FILE"} <= used  # the ${VAR:-d} forms count
    assert not re.findall(r"\$\{(?![A-Z_][A-Z0-9_]*(?::?-[^}]*)?\})", text)  # no form the pattern does not read
    assert used <= set(_example_env()), used - set(_example_env())


def test_images_install_from_the_locks():
    """Each image installs exactly one lock with hashes checked (no test tools, no resolver run in the build)."""
    airflow = (DOCKER / "airflow.Dockerfile").read_text()
    assert "COPY requirements/cpu.lock" in airflow and "--require-hashes" in airflow
    assert re.search(r"uv pip install --system --require-hashes --no-deps .*\n?.*-r requirements/cpu\.lock", airflow)
    assert "cpu-test.lock" not in airflow and "pip install -r" not in airflow
    gpu = (DOCKER / "worker-gpu.Dockerfile").read_text()
    assert re.search(r"--require-hashes --no-deps -r requirements/gpu\.lock", gpu)
    assert "cpu.lock" not in gpu and "cpu-test.lock" not in gpu  # one environment per image: no second torch
    # the base image's Python is the one the GPU lock is resolved for (Ubuntu 24.04 packages 3.12, not 3.11)
    assert re.search(r"^FROM nvidia/cuda:13[.\d]+-\w+-ubuntu24\.04$", gpu, re.M)
    assert "python3.11" not in gpu and "(3, 12)" in gpu
    import importlib.util

    spec = importlib.util.spec_from_file_location("lock", REPO / "scripts" / "lock.py")
    lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock)
    locks = {lk.name: lk for lk in lock.LOCKS}
    assert locks["gpu"].python == "3.12" and locks["cpu"].python == "3.11"


def test_the_mlflow_container_accepts_the_other_containers_host_name():
    """MLflow 3 refuses requests whose Host header is not allowed; the Airflow containers use http://mlflow:5000."""
    services = _render()["services"]
    allowed = services["mlflow"]["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    uri = services["airflow-scheduler"]["environment"]["MLFLOW_TRACKING_URI"]
    assert uri == "http://mlflow:5000" and {"mlflow:5000", "mlflow", "localhost:5000"} <= set(allowed)


# ------------------------------------------------------------------------------------------------ exposure
def test_published_ports_are_on_localhost_unless_the_env_says_otherwise():
    """Every published port names its host address; by default 127.0.0.1, so nothing is reachable from other
    machines until AIRFLOW_BIND / MLFLOW_BIND open it."""
    published = {name: svc.get("ports", []) for name, svc in _compose()["services"].items() if svc.get("ports")}
    assert set(published) == {"airflow-apiserver", "mlflow"}
    for ports in published.values():
        for entry in ports:
            host, _, _ = str(entry).rsplit(":", 2)  # HOST:PUBLISHED:TARGET, never PUBLISHED:TARGET alone
            assert host.startswith("${") and host.endswith(":-127.0.0.1}"), entry
    defaults = _render({})["services"]
    assert defaults["airflow-apiserver"]["ports"] == ["127.0.0.1:8080:8080"]
    assert defaults["mlflow"]["ports"] == ["127.0.0.1:5000:5000"]
    assert _render()["services"]["mlflow"]["ports"] == ["127.0.0.1:5000:5000"]  # .env.example keeps it local
    opened = _render(AIRFLOW_BIND="0.0.0.0", MLFLOW_BIND="10.1.2.3")["services"]
    assert opened["airflow-apiserver"]["ports"] == ["0.0.0.0:8080:8080"]
    assert opened["mlflow"]["ports"] == ["10.1.2.3:5000:5000"]


def test_mlflow_runs_with_authentication_and_the_airflow_containers_log_with_its_credentials():
    env = {**_example_env(), "MLFLOW_ADMIN_USER": "ops", "MLFLOW_ADMIN_PASSWORD": "a-long-enough-secret"}
    services = _render(env)["services"]
    mlflow = services["mlflow"]
    assert mlflow["entrypoint"] == ["/opt/agentpipe/mlflow/start.sh"]
    assert mlflow["environment"]["MLFLOW_AUTH"] == "basic"
    assert mlflow["environment"]["MLFLOW_AUTH_ADMIN_USERNAME"] == "ops"
    assert mlflow["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"] == "a-long-enough-secret"
    assert mlflow["environment"]["MLFLOW_AUTH_DEFAULT_PERMISSION"] == "READ"
    for name in AIRFLOW_SERVICES:
        e = services[name]["environment"]
        assert (e["MLFLOW_TRACKING_USERNAME"], e["MLFLOW_TRACKING_PASSWORD"]) == ("ops", "a-long-enough-secret")
    # the example password is refused by start.sh (too short), so a copied .env.example cannot start MLflow open
    assert len(_example_env()["MLFLOW_ADMIN_PASSWORD"]) < 12


def test_mlflow_hosts_and_origins_can_be_extended_for_other_machines():
    e = _render(MLFLOW_PUBLIC_HOSTS="head.example.org,head.example.org:5000",
                MLFLOW_PUBLIC_ORIGINS="http://head.example.org:5000",
                MLFLOW_TASKS_URI="http://head.example.org:5000")["services"]
    allowed = e["mlflow"]["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert {"mlflow:5000", "localhost:5000", "head.example.org", "head.example.org:5000"} <= set(allowed)
    assert e["mlflow"]["environment"]["MLFLOW_SERVER_CORS_ALLOWED_ORIGINS"] == "http://head.example.org:5000"
    assert e["airflow-scheduler"]["environment"]["MLFLOW_TRACKING_URI"] == "http://head.example.org:5000"
    assert "" not in _render()["services"]["mlflow"]["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")


# ------------------------------------------------------------------------------------------------ Slurm
def _entrypoint_default(variable: str) -> str:
    """The container path the entrypoint reads for VAR (its ${VAR:-default})."""
    return re.search(r"\$\{" + variable + r":-([^}]+)\}", ENTRYPOINT.read_text()).group(1)


def test_slurm_files_are_mounted_where_the_entrypoint_looks_when_the_env_names_them():
    conf_dir, key = _entrypoint_default("SLURM_CONF"), _entrypoint_default("AGENTPIPE_MUNGE_KEY")
    assert conf_dir == "/etc/slurm/slurm.conf" and key == "/etc/agentpipe/munge.key"
    site = _render(AGENTPIPE_COMPUTE="slurm", SLURM_CONF_DIR="/site/slurm", MUNGE_KEY_FILE="/site/munge.key",
                   AGENTPIPE_RUNS="/shared/agentpipe", AGENTPIPE_RUNS_MOUNT="/shared/agentpipe")["services"]
    for name in AIRFLOW_SERVICES:  # the scheduler submits (LocalExecutor), the triggerer polls; all can
        volumes, env = site[name]["volumes"], site[name]["environment"]
        assert "/site/slurm:/etc/slurm:ro" in volumes, name
        assert f"/site/munge.key:{key}:ro" in volumes, name
        # the jobs get the containers' paths: the same as the nodes' only when mounted at the same place
        assert "/shared/agentpipe:/shared/agentpipe" in volumes and env["AGENTPIPE_HOME"] == "/shared/agentpipe"
        assert env["AGENTPIPE_COMPUTE"] == "slurm"
    # unset: a named empty volume (declared) stands in for the directory, /dev/null for the key
    compose = _render()
    for name in AIRFLOW_SERVICES:
        volumes = compose["services"][name]["volumes"]
        stand_in = next(v.split(":")[0] for v in volumes if v.endswith(":/etc/slurm:ro"))
        assert stand_in in compose["volumes"] and not stand_in.startswith((".", "/"))
        assert f"/dev/null:{key}:ro" in volumes
    assert "no-slurm-conf" not in str(site["mlflow"]) and "munge" not in str(site["mlflow"])


# ------------------------------------------------------------------------------------------------ the image
def test_the_airflow_image_runs_the_entrypoint_and_compose_points_at_its_passwords_file():
    dockerfile = (DOCKER / "airflow.Dockerfile").read_text()
    assert "COPY docker/airflow-entrypoint.sh ./docker/" in dockerfile and "WORKDIR /opt/agentpipe" in dockerfile
    assert re.search(r'^ENTRYPOINT \["/opt/agentpipe/docker/airflow-entrypoint.sh"\]$', dockerfile, re.MULTILINE)
    assert os.access(ENTRYPOINT, os.X_OK)  # COPY keeps the mode: the file must be executable in the checkout
    home = re.search(r"AIRFLOW_HOME=(\S+)", dockerfile).group(1)
    for name in AIRFLOW_SERVICES:
        svc = _compose()["services"][name]
        assert "entrypoint" not in svc, name  # the image's: init, too, checks the secrets before anything starts
        e = svc["environment"]
        assert e["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] == "admin:admin"
        assert e["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"] == f"{home}/simple_auth_manager_passwords.json"
    assert _compose()["services"]["airflow-init"]["command"][0] == "bash"


PASSWORD = """pa ss"wo\\rd $(x) `y` ü'"""
JWT = "j" * 64
FAKE_AIRFLOW = """#!/usr/bin/env bash
# reports what the entrypoint handed over: its arguments, the passwords file Airflow would read, the environment
exec python3 - "$@" <<'PY'
import json, os, stat, sys
f = os.environ.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE")
there = bool(f) and os.path.exists(f)
json.dump({"argv": sys.argv[1:], "file": f, "content": open(f).read() if there else None,
           "mode": stat.S_IMODE(os.stat(f).st_mode) if there else None,
           "password_in_env": "AIRFLOW_ADMIN_PASSWORD" in os.environ}, open(os.environ["REPORT"], "w"))
PY
"""
RECORDER = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$CALLS"
[ "$(basename "$0")" != munge ] || [ ! -e "$MUNGE_FAILS" ]
"""


@pytest.fixture
def entry(tmp_path):
    """Runs docker/airflow-entrypoint.sh with a fake `airflow` (and fake install/runuser/munge: nothing of this
    machine is touched) in a clean environment; returns a function of (env overrides, *args)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "airflow").write_text(FAKE_AIRFLOW)
    for tool in ("install", "runuser", "munge"):
        (bin_ / tool).write_text(RECORDER)
    for f in bin_.iterdir():
        f.chmod(0o755)

    def run(env: dict[str, str | None], *args: str):
        base = {"PATH": f"{bin_}:{os.environ['PATH']}", "HOME": str(tmp_path), "AIRFLOW_HOME": str(tmp_path / "af"),
                "AIRFLOW_ADMIN_PASSWORD": PASSWORD, "AIRFLOW__API_AUTH__JWT_SECRET": JWT,
                "REPORT": str(tmp_path / "report.json"), "CALLS": str(tmp_path / "calls"),
                "MUNGE_FAILS": str(tmp_path / "munge-fails"),
                "AGENTPIPE_MUNGE_KEY": str(tmp_path / "no-key"), "SLURM_CONF": str(tmp_path / "no-slurm.conf")}
        full = {k: v for k, v in {**base, **env}.items() if v is not None}
        p = subprocess.run([str(ENTRYPOINT), *args], env=full, capture_output=True, text=True, timeout=60, check=False)
        report = tmp_path / "report.json"
        calls = tmp_path / "calls"
        p.report = json.loads(report.read_text()) if report.exists() else None
        p.calls = calls.read_text().splitlines() if calls.exists() else []
        report.unlink(missing_ok=True)
        calls.unlink(missing_ok=True)
        return p

    return run


def test_the_entrypoint_writes_the_documented_login_and_runs_airflow(entry, tmp_path, monkeypatch):
    af = tmp_path / "af"
    af.mkdir()
    pwfile = af / "simple_auth_manager_passwords.json"
    pwfile.write_text('{"admin": "stale"}')
    pwfile.chmod(0o644)
    p = entry({}, "api-server", "--port", "8080")
    assert p.returncode == 0, p.stderr
    r = p.report
    assert r["argv"] == ["api-server", "--port", "8080"] and r["file"] == str(pwfile)
    assert json.loads(r["content"]) == {"admin": PASSWORD} and r["mode"] == 0o600
    assert stat.S_IMODE(pwfile.stat().st_mode) == 0o600
    assert not r["password_in_env"]  # the tasks (subprocesses of the scheduler) do not inherit it
    assert PASSWORD not in p.stdout + p.stderr and p.calls == []  # no key: munged not started
    # Airflow's own simple auth manager keeps the file as written (no generated password) and logs admin in with it
    from airflow.api_fastapi.auth.managers.simple.datamodels.login import LoginBody
    from airflow.api_fastapi.auth.managers.simple.services.login import SimpleAuthManagerLogin
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager
    from fastapi import HTTPException

    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "admin:admin")
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", str(pwfile))
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "False")
    SimpleAuthManager().init()
    assert SimpleAuthManager.get_passwords() == {"admin": PASSWORD}
    with pytest.raises(HTTPException) as refused:
        SimpleAuthManagerLogin.create_token(LoginBody(username="admin", password="change-me"))
    assert refused.value.status_code == 401
    # the last step, signing the token, needs the api-server's auth manager: stood in for, it names the user
    monkeypatch.setattr("airflow.api_fastapi.auth.managers.simple.services.login.get_auth_manager",
                        lambda: type("Signer", (), {"generate_jwt": lambda self, user, **_: f"jwt:{user.username}"})())
    assert SimpleAuthManagerLogin.create_token(LoginBody(username="admin", password=PASSWORD)) == "jwt:admin"


def test_the_entrypoint_honours_a_configured_passwords_file_and_runs_shell_commands_as_given(entry, tmp_path):
    target = tmp_path / "elsewhere" / "pw.json"
    p = entry({"AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(target)},
              "bash", "-c", 'echo "init with $AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"')
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"init with {target}" and p.report is None  # bash ran, not `airflow bash`
    assert json.loads(target.read_text()) == {"admin": PASSWORD} and stat.S_IMODE(target.stat().st_mode) == 0o600


@pytest.mark.parametrize("password", [None, "", "change-me"], ids=["missing", "empty", "example"])
def test_the_entrypoint_refuses_a_missing_or_example_admin_password(entry, tmp_path, password):
    p = entry({"AIRFLOW_ADMIN_PASSWORD": password}, "scheduler")
    assert p.returncode == 2 and p.report is None
    assert len(p.stderr.strip().splitlines()) == 1 and "AIRFLOW_ADMIN_PASSWORD" in p.stderr
    assert not (tmp_path / "af" / "simple_auth_manager_passwords.json").exists()


@pytest.mark.parametrize("secret", [None, "", _example_env()["AIRFLOW_JWT_SECRET"]],
                         ids=["missing", "empty", "example"])
def test_the_entrypoint_refuses_a_missing_or_example_jwt_secret(entry, secret):
    p = entry({"AIRFLOW__API_AUTH__JWT_SECRET": secret}, "api-server")
    assert p.returncode == 2 and p.report is None
    assert len(p.stderr.strip().splitlines()) == 1 and "AIRFLOW_JWT_SECRET" in p.stderr


def test_the_entrypoint_starts_munged_with_a_mounted_key_and_refuses_slurm_without_its_files(entry, tmp_path):
    conf, key = tmp_path / "slurm.conf", tmp_path / "munge.key"
    slurm = {"AGENTPIPE_COMPUTE": "slurm", "SLURM_CONF": str(conf), "AGENTPIPE_MUNGE_KEY": str(key)}
    p = entry(slurm, "scheduler")  # neither file
    assert p.returncode == 2 and p.report is None and "SLURM_CONF_DIR" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    conf.write_text("ClusterName=site\nSlurmctldHost=head\n")  # AuthType defaults to auth/munge
    p = entry(slurm, "scheduler")
    assert p.returncode == 2 and p.report is None and "MUNGE_KEY_FILE" in p.stderr
    p = entry({**slurm, "AGENTPIPE_MUNGE_KEY": "/dev/null"}, "scheduler")  # compose's stand-in is no key
    assert p.returncode == 2 and "MUNGE_KEY_FILE" in p.stderr and p.calls == []
    key.write_bytes(os.urandom(1024))
    p = entry(slurm, "scheduler")
    assert p.returncode == 0, p.stderr
    assert p.report["argv"] == ["scheduler"]
    assert p.calls == ["install -d -o munge -g munge -m 0755 /run/munge",
                       f"install -o munge -g munge -m 0400 {key} /etc/munge/munge.key",
                       "runuser -u munge -- munged --force", "munge -n"]
    (tmp_path / "munge-fails").touch()
    p = entry(slurm, "scheduler")
    assert p.returncode == 2 and p.report is None and "munged did not start" in p.stderr
    (tmp_path / "munge-fails").unlink()
    # a key with compute=local still starts munged (the Variable agentpipe_compute may say slurm)
    p = entry({**slurm, "AGENTPIPE_COMPUTE": "local", "SLURM_CONF": str(tmp_path / "none")}, "triggerer")
    assert p.returncode == 0 and "runuser -u munge -- munged --force" in p.calls
    # auth/slurm needs no munge key (slurm.key comes with the configuration directory)
    key.unlink()
    conf.write_text("ClusterName=site\nAuthType = auth/slurm\n")
    p = entry(slurm, "triggerer")
    assert p.returncode == 0, p.stderr
    assert p.report["argv"] == ["triggerer"] and p.calls == []
