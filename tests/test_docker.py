"""What can be checked of the Docker deployment without Docker: the compose file parses, everything it
references exists, every variable it uses is documented in .env.example, and the images install the same
pinned requirements as `make setup`."""

import re
from pathlib import Path

import yaml

DOCKER = Path(__file__).resolve().parent.parent / "docker"
REPO = DOCKER.parent


def _compose():
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_parses_and_has_the_services():
    services = _compose()["services"]
    assert {"postgres", "airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
            "airflow-triggerer", "mlflow"} <= set(services)
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"):
        assert services[name]["command"][0] in ("api-server", "scheduler", "dag-processor", "triggerer")
        assert services[name]["environment"]["AGENTPIPE_HOME"] == "/runs"


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
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)\}", (DOCKER / "compose.yaml").read_text()))
    documented = {line.split("=", 1)[0] for line in (DOCKER / ".env.example").read_text().splitlines()
                  if line and not line.startswith("#")}
    assert used and used <= documented, used - documented


def test_images_install_the_pinned_requirements():
    pins = [line for line in (REPO / "requirements.txt").read_text().splitlines() if "==" in line]
    torch_pin = next(p for p in pins if p.startswith("torch=="))
    airflow = (DOCKER / "airflow.Dockerfile").read_text()
    assert "COPY requirements.txt" in airflow and "pip install -r requirements.txt" in airflow
    assert torch_pin in airflow  # the same CPU torch as make setup
    gpu = (DOCKER / "worker-gpu.Dockerfile").read_text()
    assert "pip install -r requirements-gpu.txt" in gpu
    assert "-r requirements.txt" not in gpu  # the GPU lock is the whole environment: no second torch/transformers
    # the base image's Python is the one the lock is resolved for (Ubuntu 24.04 packages 3.12, not 3.11)
    assert re.search(r"^FROM nvidia/cuda:13[.\d]+-\w+-ubuntu24\.04$", gpu, re.M)
    assert "python3.11" not in gpu and "(3, 12)" in gpu
    for line in (REPO / "requirements-gpu.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            assert "==" in line, f"unpinned GPU requirement: {line}"


def test_the_gpu_lock_resolves_for_python_312_with_vllm():
    """requirements-gpu.txt is one consistent environment: pip's resolver (metadata only, nothing installed)
    finds every pin compatible with vllm's own for CPython 3.12 on manylinux x86-64."""
    import subprocess
    import sys

    platforms = [a for n in range(5, 41) for a in ("--platform", f"manylinux_2_{n}_x86_64")]
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--python-version", "3.12", *platforms, "--platform", "manylinux2014_x86_64",
                        "--only-binary=:all:", "--target", "/tmp/agentpipe-gpu-lock-check",
                        "--report", "-", "-r", str(REPO / "requirements-gpu.txt")],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    import json

    report = json.loads(p.stdout[p.stdout.index("{"):])
    got = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in report["install"]}
    pins = dict(line.lower().split("==") for line in (REPO / "requirements-gpu.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert {k: got.get(k) for k in pins} == pins  # nothing pinned was replaced by the resolver
    assert got["vllm"] == "0.33.0" and got["transformers"].startswith("5.20")


def test_the_mlflow_container_accepts_the_other_containers_host_name():
    """MLflow 3 refuses requests whose Host header is not allowed; the Airflow containers use http://mlflow:5000."""
    services = _compose()["services"]
    allowed = services["mlflow"]["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    uri = services["airflow-scheduler"]["environment"]["MLFLOW_TRACKING_URI"]
    assert uri == "http://mlflow:5000" and {"mlflow:5000", "mlflow", "localhost:5000"} <= set(allowed)
