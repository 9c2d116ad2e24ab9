"""The main job on one machine: start MLflow and Airflow on 127.0.0.1, run the study end to end, summarise.

    python scripts/demo.py run      # (make demo) the paper's figures from its released results, then the live run:
                                    # set up, start, trigger and follow the DAGs, print the summary
    python scripts/demo.py paper    # only the paper's figures from the released results (seconds)
    python scripts/demo.py up       # only start the services (and print the URLs and login)
    python scripts/demo.py stop     # (make stop) stop what was started, by PID
    python scripts/demo.py clean    # (make clean) stop, then remove the demo state

State lives under $AGENTPIPE_HOME (default ./runs): airflow/ (SQLite metadata DB, logs, login), mlflow/,
pids/, and the pipeline's own folders. Re-running reuses finished work: every stage resumes its outputs.
Ports: AGENTPIPE_AIRFLOW_PORT (8080) and AGENTPIPE_MLFLOW_PORT (5000).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the pipeline package, also when run outside the venv's editable install
VENV_BIN = Path(sys.executable).parent


def home() -> Path:
    return Path(os.environ.get("AGENTPIPE_HOME", REPO / "runs")).expanduser().resolve()


def ports() -> tuple[int, int]:
    return int(os.environ.get("AGENTPIPE_AIRFLOW_PORT", 8080)), int(os.environ.get("AGENTPIPE_MLFLOW_PORT", 5000))


# ------------------------------------------------------------------------------------------------ services
def _secret(path: Path, make) -> str:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(make())
        path.chmod(0o600)
    return path.read_text().strip()


def airflow_env(root: Path | None = None) -> dict[str, str]:
    """Environment of the Airflow components (and so of the stages they run)."""
    root = root or home()
    af = root / "airflow"
    af_port, ml_port = ports()
    password = _secret(af / "admin-password", lambda: secrets.token_urlsafe(12))
    pw_file = af / "passwords.json"
    pw_file.write_text(json.dumps({"admin": password}))
    return {
        **os.environ,
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",  # standalone components spawn `airflow` by name
        "AGENTPIPE_HOME": str(root),
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ml_port}",
        "AIRFLOW_HOME": str(af),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": os.environ.get("AIRFLOW__CORE__PARALLELISM", "2"),
        # the stages are CPU-bound on a 2-core machine: one task at a time is as fast and keeps memory low (the
        # rehearsal, whose stages mostly wait on files and processes, runs two)
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": os.environ.get("AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG", "1"),
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(af_port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{af_port}/execution/",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        # the DAG files do not change during a demo: re-parsing each of them every 30 s (the default) took ~12 CPU-s
        # a minute of an idle 2-core machine, taken from the tasks
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": os.environ.get(
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL", "600"),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(pw_file),
        "AIRFLOW__API_AUTH__JWT_SECRET": _secret(af / "jwt-secret", lambda: secrets.token_hex(32)),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
    }


def _pidfile(name: str) -> Path:
    return home() / "pids" / f"{name}.pid"


def _alive(name: str) -> bool:
    try:
        os.kill(int(_pidfile(name).read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


def _start(name: str, argv: list[str], env: dict[str, str]) -> None:
    if _alive(name):
        return
    log = home() / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    _pidfile(name).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=REPO)
    _pidfile(name).write_text(str(proc.pid))


def _wait(url: str, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise SystemExit(f"demo: {what} not healthy after {timeout:.0f} s ({url}); logs in {home() / 'logs'}")


COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


def up() -> dict[str, str]:
    """Start MLflow and the Airflow components (idempotent) and wait until they are healthy."""
    af_port, ml_port = ports()
    env = airflow_env()
    ml_env = {**env, "MLFLOW_PORT": str(ml_port), "MLFLOW_HOST": "127.0.0.1", "MLFLOW_STATE": str(home() / "mlflow"),
              "MLFLOW_BIN": str(VENV_BIN / "mlflow"), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    _start("mlflow", [str(REPO / "mlflow" / "start.sh")], ml_env)
    if not (home() / "airflow" / "airflow.db").exists():
        subprocess.run([str(VENV_BIN / "airflow"), "db", "migrate"], env=env, check=True, capture_output=True)
    from plugins.dag_common import create_pools

    create_pools(str(VENV_BIN / "airflow"), env)  # gpu (this machine's GPUs, else 1) and judge_api
    for c in COMPONENTS:
        _start(f"airflow-{c}", [str(VENV_BIN / "airflow"), c], env)
    _wait(f"http://127.0.0.1:{ml_port}/health", "MLflow")
    _wait(f"http://127.0.0.1:{af_port}/api/v2/monitor/health", "Airflow")
    return {"airflow": f"http://127.0.0.1:{af_port}", "mlflow": f"http://127.0.0.1:{ml_port}",
            "user": "admin", "password": (home() / "airflow" / "admin-password").read_text().strip()}


def stop() -> list[str]:
    """Stop every process the demo started (its whole process group), by PID file."""
    stopped = []
    folder = home() / "pids"
    for pidfile in sorted(folder.glob("*.pid")) if folder.is_dir() else []:
        try:
            pid = int(pidfile.read_text())
            os.killpg(pid, signal.SIGTERM)
            stopped.append(pidfile.stem)
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + 30
    for pidfile in sorted(folder.glob("*.pid")) if folder.is_dir() else []:
        pid = int(pidfile.read_text() or 0)
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except OSError:
                break
            time.sleep(0.3)
        else:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        pidfile.unlink(missing_ok=True)
    return stopped


# ------------------------------------------------------------------------------------------------ REST API
class Airflow:
    """A minimal client of the Airflow 3 REST API (JWT from the simple auth manager)."""

    def __init__(self, base: str, user: str, password: str) -> None:
        self.base = base
        body = json.dumps({"username": user, "password": password}).encode()
        req = urllib.request.Request(f"{base}/auth/token", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            self.token = json.load(r)["access_token"]

    def call(self, method: str, path: str, body: Any = None, attempts: int = 6) -> Any:
        """One API call; 5xx answers (SQLite busy while tasks write) and connection errors are retried."""
        for attempt in range(attempts):
            req = urllib.request.Request(f"{self.base}/api/v2{path}", method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {self.token}",
                                                  "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return json.load(r)
            except urllib.error.HTTPError as e:
                if e.code < 500 or attempt == attempts - 1:
                    raise
            except urllib.error.URLError:
                if attempt == attempts - 1:
                    raise
            time.sleep(2 * (attempt + 1))

    def wait_for_dag(self, dag_id: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.call("GET", f"/dags/{dag_id}")
                return
            except urllib.error.HTTPError:
                time.sleep(2)
        raise SystemExit(f"demo: DAG {dag_id} not loaded after {timeout:.0f} s (see `airflow dags list-import-errors`)")

    def trigger(self, dag_id: str, conf: dict[str, Any]) -> str:
        self.call("PATCH", f"/dags/{dag_id}", {"is_paused": False})
        return self.call("POST", f"/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})["dag_run_id"]

    def task_instances(self, dag_id: str, run_id: str, page_size: int = 100) -> list[dict[str, Any]]:
        """Every task instance of one run (the API returns at most 100 per page: a run of the study has 1,229)."""
        quoted = urllib.request.quote(run_id, safe="")
        tis: list[dict[str, Any]] = []
        while True:
            page = self.call("GET", f"/dags/{dag_id}/dagRuns/{quoted}/taskInstances?limit={page_size}"
                                    f"&offset={len(tis)}")
            tis += page["task_instances"]
            if not page["task_instances"] or len(tis) >= page["total_entries"]:
                return tis

    def follow(self, dag_id: str, run_id: str, timeout: float = 3600) -> str:
        """Poll until the run ends, with a live status line; returns the final state."""
        t0 = time.monotonic()
        quoted = urllib.request.quote(run_id, safe="")
        while True:
            run = self.call("GET", f"/dags/{dag_id}/dagRuns/{quoted}")
            tis = self.task_instances(dag_id, run_id)
            done = sum(ti["state"] in ("success", "skipped") for ti in tis)
            running = sorted({ti["task_id"] for ti in tis if ti["state"] in ("running", "queued", "deferred")})
            line = (f"\r{dag_id}: {run['state']:8s} {done}/{len(tis)} tasks done"
                    f"{' — ' + ', '.join(running) if running else ''}  [{time.monotonic() - t0:5.0f} s]")
            print(line[:150].ljust(150), end="", flush=True)
            if run["state"] in ("success", "failed"):
                print()
                return run["state"]
            if time.monotonic() - t0 > timeout:
                print()
                raise SystemExit(f"demo: {dag_id} still running after {timeout:.0f} s")
            time.sleep(5)


# ------------------------------------------------------------------------------------------------ the demo
#: The trajectory pool: three sampled runs of SmolLM2-135M on the 8 demo cases, judged by SmolLM2-135M.
#: A 135M model cannot follow the ReAct or the judge format, so the demo runs in the study's compat mode (the
#: judge sees the agent's whole last output, as the study's judges did) and scores by log-probability. Its most
#: likely score is nearly always 2, which gives no preference pairs; the pool's judgements therefore sample from
#: its score distribution (judge_temperature 1), seeded per line, while the test-split evaluation takes the argmax.
POOL = {"agents": ["SmolLM2-135M"], "samples": 3, "agent_temperature": 0.8, "emulator": "SmolLM2-135M",
        "evaluator": "SmolLM2-135M", "case_set": "demo", "max_steps": 2, "max_tokens_per_call": 96,
        "max_continuations": 1, "scoring": "choice", "judge_temperature": 1.0, "compat": "study",
        "backend": {"dtype": "bf16"}, "run_name": "pool"}
#: One source model, one seed: safe, help and safe->help, evaluated on the seed's test cases. Trained in bf16, the
#: study's training precision (GPUs train in bf16): on this CPU (AMX) a demo training took 21.6 s instead of 28.8 s
#: in float32, with the same losses.
EXPERIMENT = {"name": "demo", "source_models": ["SmolLM2-135M"],
              "arms": [{"name": "demo", "pool": "pool", "evaluator": "SmolLM2-135M"}], "seeds": [0], "betas": [0.1],
              "configurations": ["safe", "help", "safe->help"], "emulator": "SmolLM2-135M", "case_set": "demo",
              "emulation": {"max_steps": 2, "max_tokens_per_call": 96, "max_continuations": 1, "dtype": "bf16",
                            "compat": "study"},
              "evaluation": {"scoring": "choice", "dtype": "bf16", "compat": "study"},
              "train": {"max_steps": 2, "gradient_accumulation_steps": 1, "save_steps": 1, "logging_steps": 1,
                        "max_length": 4096, "max_prompt_length": 4096, "quantization": "bf16"},
              "pairs": {"min_score_difference": 1, "min_chosen_score": 1}, "n_bootstrap": 200}


def summary(urls: dict[str, str]) -> str:
    """The demo's results, read from the files the pipeline wrote (the same numbers are in MLflow)."""
    root = home()
    analysis = root / "analysis" / EXPERIMENT["name"]
    s = json.loads((analysis / "summary.json").read_text())
    pooled = s["arms"]["pooled"]
    lines = ["", "=" * 78, f"Part 2 — LIVE results of the 135M demo models ({s['split']} split, seeds {s['seeds']}); "
             "the machinery at work, not the paper's figures (those are Part 1)", "",
             f"{'configuration':28s} {'Help(Ignore)':>12s} {'Safety':>8s}  frontier"]
    for p in sorted(pooled["frontier"]["points"], key=lambda p: len(p["training_stages"])):
        label = p["label"] if p["label"] != "base" else f"{p['source_model']} (source)"
        lines.append(f"{label:28s} {p['helpfulness']:12.3f} {p['safety']:8.3f}  {'yes' if p['on_frontier'] else ''}")
    fit = pooled["fit"]
    lines.append("")
    lines.append(f"trade-off fit (safety delta ~ helpfulness delta): R² = {pooled['r2']:.3f}, slope "
                 f"{pooled['slope']:.3f}, n = {pooled['n_points']}" if fit["available"]
                 else f"trade-off fit: not available ({fit['reason']})")
    plot = analysis / "plots" / "pareto.png"
    lines += [f"Pareto frontier plot: {plot}", f"summary: {analysis / 'summary.json'}", "",
              f"Airflow UI: {urls['airflow']}  (login {urls['user']} / {urls['password']})",
              f"MLflow UI:  {urls['mlflow']}", "stop everything: make stop", "=" * 78]
    return "\n".join(lines)


def _mlflow_post(base: str, path: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def check_against_mlflow(mlflow: str) -> str:
    """Compare every configuration's point in ``summary.json`` with the metrics of the MLflow analysis run.

    Returns a one-line verdict; raises SystemExit when a figure differs or is missing (the two must agree).
    """
    from pipeline.analysis.run import AnalysisResult

    summary_path = home() / "analysis" / EXPERIMENT["name"] / "summary.json"
    with urllib.request.urlopen(f"{mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name=analysis",
                                timeout=30) as r:
        exp_id = json.load(r)["experiment"]["experiment_id"]
    runs = _mlflow_post(mlflow, "runs/search", {
        "experiment_ids": [exp_id], "filter": f"attributes.run_name = '{EXPERIMENT['name']}'",
        "order_by": ["attributes.start_time DESC"], "max_results": 1}).get("runs", [])
    if not runs:
        raise SystemExit(f"demo: no MLflow analysis run named {EXPERIMENT['name']} at {mlflow}")
    logged = {m["key"]: m["value"] for m in runs[0]["data"].get("metrics", [])}
    # the figures the summary prints (fit R² and every configuration's point), keyed as the analysis logs them
    metrics = AnalysisResult(out=summary_path.parent, summary=json.loads(summary_path.read_text()),
                             summary_path=summary_path).metrics()
    expected = {k: v for k, v in metrics.items() if k.endswith(".r2") or ".point." in k}
    bad = [f"{k}: summary {v!r}, MLflow {logged.get(k)!r}" for k, v in expected.items()
           if logged.get(k) is None or abs(logged[k] - v) > 1e-9]
    if bad:
        raise SystemExit("demo: the summary and the MLflow analysis run differ: " + "; ".join(bad))
    return f"checked: the {len(expected)} figures above equal MLflow analysis run {runs[0]['info']['run_id']}"


def check_traces(mlflow: str, root: Path | None = None) -> str:
    """Every judged trajectory of the demo is a trace in MLflow with the judge's safety and Help(Ignore)
    assessments; returns a one-line verdict, raises SystemExit when one is missing."""
    from mlflow import MlflowClient

    from pipeline.tracking.traces import PATH_TAG, judged_files

    client = MlflowClient(tracking_uri=mlflow)
    exp = client.get_experiment_by_name("evaluation")
    files = judged_files((root or home()) / "trajectories")
    total = 0
    for f in files:
        cases = {json.loads(line)["case_idx"] for line in f.read_text().splitlines()}
        traces = client.search_traces([exp.experiment_id], max_results=500, include_spans=False,
                                      filter_string=f"tags.`{PATH_TAG}` = '{f.resolve()}'")
        judged = {int(t.info.tags["case_idx"]) for t in traces
                  if {a.name for a in t.info.assessments} >= {"ToolCallRisk", "Helpfulness"}}
        if judged != cases:
            raise SystemExit(f"demo: {f.name}: cases {sorted(cases - judged)} have no trace with both judgements")
        total += len(cases)
    return (f"checked: {total} trajectories of {len(files)} run files are MLflow traces with their safety and "
            f"Help(Ignore) judgements (MLflow → evaluation → Traces)")


#: What the paper reports for the figures the demo recomputes from the released results (its abstract: R² = 0.77
#: for the gpt-5-mini arm); the other arms' figures have no value in the abstract to compare with.
PAPER_R2 = {"eval-gpt5m": 0.77}


def paper_figures() -> str:
    """Part 1 of the demo: the paper's headline figures recomputed from the study's released results (fetched
    and verified from ../shared/data/paper/results.tar.xz when present, else from the pinned repository)."""
    from pipeline.analysis.run import AnalyzeConfig, analyze
    from pipeline.data.results import fetch_results, writable_data_dir
    from pipeline.settings import get_settings

    t0 = time.monotonic()
    data_dir = get_settings().resolved_data_dir
    archive = data_dir / "paper" / "results.tar.xz"
    results = fetch_results(writable_data_dir(data_dir), archive if archive.is_file() else None)
    out = home() / "analysis" / "paper-match"
    cfg = AnalyzeConfig(runs=results.path / "match_eval_results", out=out, n_bootstrap=200, no_track=True,
                        formats=["png"])
    analyze(cfg)
    s = json.loads((out / "summary.json").read_text())
    lines = ["", "=" * 78, "Part 1 — the PAPER'S DATA: the study's 180 finetuned models (3 source models × 2 evaluator "
             "arms × 3 seeds × 2 betas × 5 configurations), each judged by the evaluator that built its pairs "
             f"({results.files} released files, verified), analysed by this pipeline:", "",
             f"{'arm':12s} {'R² (deltas)':>11s} {'paper':>6s}  {'Persist(S) / Persist(H), β=0.05 | β=0.1':<40s}"]
    for arm, a in s["arms"].items():
        by_beta = a["persistence"].get("by_beta", {}) if a["persistence"]["available"] else {}
        pers = " | ".join(f"{(lv.get('average') or {}).get('persist_s', float('nan')):.2f} / "
                          f"{(lv.get('average') or {}).get('persist_h', float('nan')):.2f}" for lv in by_beta.values())
        paper = f"{PAPER_R2[arm]:.2f}" if arm in PAPER_R2 else "–"
        lines.append(f"{arm:12s} {a['r2']:11.3f} {paper:>6s}  {pers}")
    lines += ["", f"Pareto frontier (gpt-5-mini arm): {', '.join(s['arms']['eval-gpt5m']['frontier']['members'])}",
              f"Pareto plot: {out / 'plots' / 'pareto_eval-gpt5m.png'}   summary: {out / 'summary.json'}",
              f"({time.monotonic() - t0:.0f} s)", "=" * 78, ""]
    return "\n".join(lines)


def prepare_models() -> None:
    from pipeline.llm.local_models import smollm2

    print(f"SmolLM2-135M ready in {smollm2()}")


def run() -> int:
    t0 = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        services = pool.submit(up)  # the services start while part 1 is computed
        print(paper_figures())
        print("Part 2 — LIVE, on this machine: the whole pipeline (emulate → evaluate → pairs → DPO → merge → "
              "evaluate → analyse) through Airflow and MLflow, with SmolLM2-135M as every model on the 8 demo "
              "cases. A 135M model exercises the machinery; its figures are not the paper's.")
        prepare_models()
        urls = services.result()
    print(f"services up: Airflow {urls['airflow']}, MLflow {urls['mlflow']} ({time.monotonic() - t0:.0f} s)")
    af = Airflow(urls["airflow"], urls["user"], urls["password"])
    for dag_id, conf in (("toolemu_evaluation", POOL), ("dpo_experiment", EXPERIMENT)):
        af.wait_for_dag(dag_id)
        run_id = af.trigger(dag_id, conf)
        state = af.follow(dag_id, run_id)
        if state != "success":
            print(f"demo: {dag_id} run {run_id} ended {state}; see the Airflow UI {urls['airflow']} "
                  f"(login {urls['user']} / {urls['password']}) or {home() / 'airflow' / 'logs'}", file=sys.stderr)
            return 1
    print(summary(urls))
    print(check_against_mlflow(urls["mlflow"]))
    print(check_traces(urls["mlflow"]))
    print(f"demo finished in {(time.monotonic() - t0) / 60:.1f} min")
    return 0


def main(argv: list[str]) -> int:
    cmd = argv[1] if len(argv) > 1 else "run"
    if cmd == "run":
        return run()
    if cmd == "paper":
        print(paper_figures())
        return 0
    if cmd == "up":
        urls = up()
        print(f"Airflow {urls['airflow']} (login {urls['user']} / {urls['password']}), MLflow {urls['mlflow']}")
        return 0
    if cmd == "stop":
        stopped = stop()
        print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
        return 0
    if cmd == "clean":
        stop()
        for name in ("airflow", "mlflow", "pids", "logs", "trajectories", "pairs", "models", "reports", "analysis",
                     "specs", "tracking", "cache", "experiments"):
            shutil.rmtree(home() / name, ignore_errors=True)
        print(f"removed the demo state under {home()}")
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
