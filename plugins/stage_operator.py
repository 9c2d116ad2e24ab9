"""``StageOperator``: run one pipeline stage, ``agentpipe --result R.json <stage…> --spec S.json``, locally (a
subprocess) or as a Slurm job (deferring to :class:`plugins.slurm.trigger.SlurmJobTrigger`).

    from plugins.stage_operator import StageOperator

    emulate = StageOperator(
        task_id="emulate", stage="emulate",
        spec={"agent": "{{ params.agent }}", "emulator": "gpt-5-mini", "case_set": "toolemu", "cases": "0-16"},
    )                                      # XCom return value: the stage's --result JSON (paths and counts)

``compute`` ("local" | "slurm", templated) defaults to the Airflow Variable ``agentpipe_compute``, else the
environment variable ``AGENTPIPE_COMPUTE``, else "local". The spec is written to
``$AGENTPIPE_HOME/specs/<dag_id>/<run_id>/<task_id>[_<map_index>].json``. Airflow retries simply run the stage again:
every stage resumes its own partial output.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from plugins.slurm.core import (
    RETRY_WITH_MORE,
    TERMINAL_STATES,
    UNKNOWN_STATE,
    doubled,
    failure_message,
    job_outcome,
    job_state,
    live_job_names,
    read_from,
    retry_decision,
    sanitize_job_name,
    tail_file,
)
from plugins.slurm.resources import Resources, models_from_spec, resources_for

COMPUTE_VARIABLE = "agentpipe_compute"
COMPUTE_ENV = "AGENTPIPE_COMPUTE"
COMPUTES = ("local", "slurm")
#: Environment variable the tracking layer nests MLflow runs under (pipeline.tracking.journal.PARENT_ENV).
PARENT_RUN_ENV = "AGENTPIPE_MLFLOW_PARENT_RUN_ID"
_UNSAFE_PATH = re.compile(r"[^A-Za-z0-9._=-]+")


def safe_path_part(text: object) -> str:
    """A run id (``manual__2026-01-01T00:00:00+00:00``) as one folder name."""
    return _UNSAFE_PATH.sub("_", str(text)).strip("._") or "_"


def stage_words(stage: str | Sequence[str]) -> list[str]:
    words = stage.split() if isinstance(stage, str) else [str(w) for w in stage]
    if not words or any(w.startswith("-") for w in words):
        raise ValueError(f"stage {stage!r}: expected sub-command words such as 'emulate' or 'evaluate repair'")
    return words


#: The exit code of a stage refused for bad configuration or input (``pipeline.errors.PipelineError``)
CONFIG_ERROR_EXIT = 2
#: a stage waiting for a service (``pipeline.stage.WAITING_EXIT``: its result names what it waits for)
WAITING_EXIT = 75


def _failure(rc: int, result_path: Path) -> str:
    """Why a stage exited non-zero: ``incomplete`` (exit 1, its result says what failed; a retry resumes and
    retries exactly that) or a plain failure."""
    try:
        result = json.loads(Path(result_path).read_text())
    except (OSError, ValueError):
        result = {}
    if result.get("status") == "incomplete":
        return f"is incomplete (exit code {rc}; counts {result.get('counts')}); a retry redoes only what failed"
    return f"failed with exit code {rc}"


def stage_argv(executable: str, stage: str | Sequence[str], spec_path: str | Path,
               result_path: str | Path) -> list[str]:
    """``agentpipe --result R <stage…> --spec S``."""
    return [executable, "--result", str(result_path), *stage_words(stage), "--spec", str(spec_path)]


def resolve_compute(value: str | None) -> str:
    """The compute backend: the argument, else the Variable ``agentpipe_compute``, else $AGENTPIPE_COMPUTE, else
    local. A Variable lookup that fails (API server unreachable, …) raises: running a cluster's stage on the
    worker instead would be a silent fallback."""
    choice = (value or "").strip().lower()
    if not choice:
        from airflow.sdk import Variable

        try:
            choice = str(Variable.get(COMPUTE_VARIABLE, default="") or "").strip().lower()
        except Exception as e:  # noqa: BLE001 - any failure: say why instead of guessing "local"
            raise AirflowException(f"cannot read the Airflow Variable {COMPUTE_VARIABLE} ({type(e).__name__}: "
                                   f"{e}); set the task's compute explicitly or fix the lookup") from None
    choice = choice or os.environ.get(COMPUTE_ENV, "").strip().lower() or "local"
    if choice not in COMPUTES:
        raise AirflowException(f"compute '{choice}': expected one of {', '.join(COMPUTES)}")
    return choice


def read_result(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise AirflowException(f"the stage ended without writing its result file {path}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise AirflowException(f"cannot read the stage's result file {path}: {e}") from None
    if not isinstance(data, dict):
        raise AirflowException(f"result file {path}: expected a JSON object")
    return data


class StageOperator(BaseOperator):
    """Run one ``agentpipe`` stage locally or on Slurm; the XCom return value is the stage's result JSON.

    :param stage: the sub-command words, e.g. ``"emulate"``, ``"evaluate repair"``, ``"analyze all"``.
    :param spec: the stage's options (templated); keys are option names, see ``agentpipe <stage> --help``.
    :param spec_key: take the options from ``spec[spec_key]`` (a per-model chain's step, e.g. ``"merge"``); when
        that is None the chain has no such step and the task is skipped.
    :param compute: ``"local"`` or ``"slurm"`` (templated); default: Variable ``agentpipe_compute``, else
        $AGENTPIPE_COMPUTE, else local.
    :param resources: Slurm resource overrides on top of the rule (``gpus``, ``gpu_constraint``, ``mem``,
        ``time``, ``partition``, ``cpus``, ``constraint``, ``extra_args``). Also accepted as ``stage_resources``.
    :param models: the model specs the rule sizes (default: the spec's agent/emulator/evaluator/model keys).
    :param quantization: for the rule (default: the spec's ``quantization``).
    :param env: extra (non-secret) environment variables for the stage.
    :param home: the run root (default $AGENTPIPE_HOME / settings).
    :param mlflow_parent_run_id: MLflow run the stage's runs nest under (default: ``params.mlflow_parent_run_id``
        when the DAG has that param); passed as $AGENTPIPE_MLFLOW_PARENT_RUN_ID.
    :param mlflow_tracking_uri: passed as $MLFLOW_TRACKING_URI (default: the worker's).
    :param slurm_conn_id: the connection with the cluster settings.
    :param poll_interval, initial_delay, job_timeout: trigger settings (default: connection extras, else 10 s,
        10 s, none).
    :param tail_lines: log lines in a failure message.
    :param kill_grace: seconds between SIGTERM and SIGKILL when a local stage is killed.
    :param batch_poll_interval: seconds between polls of a Batch API batch the stage waits for, unless the stage
        says (``evaluate`` with ``batch``: the task defers on ``OpenAIBatchTrigger``, holding no worker slot, and
        runs the stage again to collect when the batch ends).
    :param batch_timeout: give up waiting for a batch after this many seconds (None: as long as it runs).
    """

    template_fields: Sequence[str] = ("stage", "spec", "compute", "stage_resources", "models", "quantization", "env",
                                      "home", "mlflow_parent_run_id", "mlflow_tracking_uri")
    template_fields_renderers = {"spec": "json", "stage_resources": "json", "env": "json"}
    ui_color = "#e8f0fe"

    def __init__(self, *, stage: str | Sequence[str], spec: Mapping[str, Any] | None = None,
                 spec_key: str | None = None, compute: str | None = None, resources: Mapping[str, Any] | None = None,
                 stage_resources: Mapping[str, Any] | None = None, models: Sequence[str] | None = None,
                 quantization: str | None = None, env: Mapping[str, str] | None = None, home: str | None = None,
                 mlflow_parent_run_id: str | None = None, mlflow_tracking_uri: str | None = None,
                 slurm_conn_id: str = "slurm_default", poll_interval: float | None = None,
                 initial_delay: float | None = None, job_timeout: float | None = None, tail_lines: int = 40,
                 kill_grace: float = 10.0, batch_poll_interval: float = 60.0, batch_timeout: float | None = None,
                 **kwargs: Any) -> None:
        # `resources` is a BaseOperator argument too (executor resources); ours are Slurm's, kept apart.
        super().__init__(**kwargs)
        self.stage = stage
        self.spec = spec if spec is not None else {}  # a mapping, a JSON string or an XComArg (rendered later)
        self.spec_key = spec_key
        self._stage_spec: Mapping[str, Any] | None = None  # the options this run uses (spec, or spec[spec_key])
        self.compute = compute
        self.stage_resources = resources if resources is not None else stage_resources
        self.models = models
        self.quantization = quantization
        self.env = env
        self.home = home
        self.mlflow_parent_run_id = mlflow_parent_run_id
        self.mlflow_tracking_uri = mlflow_tracking_uri
        self.slurm_conn_id = slurm_conn_id
        self.poll_interval = poll_interval
        self.initial_delay = initial_delay
        self.job_timeout = job_timeout
        self.tail_lines = tail_lines
        self.kill_grace = kill_grace
        self.batch_poll_interval = batch_poll_interval
        self.batch_timeout = batch_timeout
        self._proc: subprocess.Popen | None = None
        self._killed = False
        self._job_id: str | None = None
        self._hook = None

    # --------------------------------------------------------------------------------------------- helpers
    def _home(self) -> Path:
        if self.home:
            return Path(self.home).expanduser().resolve()
        from pipeline.settings import Settings

        return Settings().home

    def _paths(self, context: Mapping[str, Any], home: Path) -> tuple[Path, Path]:
        ti = context["ti"]
        map_index = getattr(ti, "map_index", -1)
        name = self.task_id + (f"_{map_index}" if map_index is not None and map_index >= 0 else "")
        folder = home / "specs" / safe_path_part(ti.dag_id) / safe_path_part(context["run_id"])
        return folder / f"{name}.json", folder / f"{name}.result.json"

    def _write_spec(self, path: Path) -> None:
        if self._stage_spec is None:
            self._select_spec()
        spec = self._stage_spec
        if not isinstance(spec, Mapping):
            raise AirflowException(f"spec: expected a mapping of option names to values, got {type(spec).__name__}")
        spec = dict(spec)
        if stage_words(self.stage) == ["evaluate"] and spec.get("batch"):
            spec["batch_wait"] = False  # never block a worker on a batch: the task defers while it runs
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(spec, indent=2, default=str) + "\n")
        os.replace(tmp, path)

    def _stage_env(self, context: Mapping[str, Any], home: Path) -> dict[str, str]:
        """Variables the stage gets on top of the inherited (local) / allow-listed (Slurm) environment."""
        ti = context["ti"]
        env = {"AGENTPIPE_HOME": str(home), "PYTHONUNBUFFERED": "1",
               "AIRFLOW_CTX_DAG_ID": str(ti.dag_id), "AIRFLOW_CTX_DAG_RUN_ID": str(context["run_id"]),
               "AIRFLOW_CTX_TASK_ID": str(ti.task_id), "AIRFLOW_CTX_TRY_NUMBER": str(getattr(ti, "try_number", "")),
               "AIRFLOW_CTX_MAP_INDEX": str(getattr(ti, "map_index", -1))}
        uri = self.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            env["MLFLOW_TRACKING_URI"] = str(uri)
        params = context.get("params") or {}
        parent = self.mlflow_parent_run_id or (params.get("mlflow_parent_run_id") if hasattr(params, "get") else None)
        if parent:
            env[PARENT_RUN_ENV] = str(parent)
        env.update({str(k): str(v) for k, v in (self.env or {}).items() if v is not None})
        return env

    @staticmethod
    def _job_name(context: Mapping[str, Any]) -> str:
        """``<dag_id>.<task_id>.<run_id>[.<map_index>]``, sanitised (Slurm job name and log file name)."""
        ti = context["ti"]
        map_index = getattr(ti, "map_index", -1)
        return sanitize_job_name(ti.dag_id, ti.task_id, context["run_id"],
                                 map_index if map_index is not None and map_index >= 0 else None)

    def job_resources(self, bumps: Mapping[str, Any] | None = None) -> Resources:
        """The resource rule for this task's spec, with the task's overrides, then what an earlier attempt that ran
        out of time or memory asked for (``bumps``)."""
        spec = self._stage_spec if self._stage_spec is not None else self.spec
        spec = spec if isinstance(spec, Mapping) else {}
        models = list(self.models) if self.models else models_from_spec(spec)
        quant = self.quantization or spec.get("quantization")
        settings = self._slurm_hook().settings
        res = resources_for(models, quant, stage_words(self.stage), default_time=settings.default_time,
                            default_mem=settings.default_mem)
        return res.override(self.stage_resources).override(dict(bumps or {}))

    @staticmethod
    def _bumps_path(spec_path: Path) -> Path:
        """Resources an attempt asked the next one for (beside the spec: the same for every try of a task)."""
        return spec_path.with_name(spec_path.stem + ".bumps.json")

    def _slurm_hook(self):
        if self._hook is None:
            from plugins.slurm.hook import SlurmHook

            self._hook = SlurmHook(self.slurm_conn_id)
        return self._hook

    # --------------------------------------------------------------------------------------------- execute
    def _select_spec(self) -> None:
        """The options of this run: ``spec``, or ``spec[spec_key]`` (``self.spec`` stays whole, for the
        map-index template)."""
        spec = self.spec
        if isinstance(spec, str):  # a templated JSON string (e.g. "{{ params.spec | tojson }}")
            spec = json.loads(spec)
        if self.spec_key is not None:
            if not isinstance(spec, Mapping) or self.spec_key not in spec:
                raise AirflowFailException(f"spec: expected a mapping with the key '{self.spec_key}'")
            spec = spec[self.spec_key]
            if spec is None:
                raise AirflowSkipException(f"no '{self.spec_key}' step here")
        self._stage_spec = spec

    def execute(self, context: Mapping[str, Any], event: Mapping[str, Any] | None = None) -> Any:
        """Run the stage (``event``: set when resumed after waiting for a free Slurm job slot, or for a batch: the
        stage then collects its answers)."""
        if event and event.get("batch_id"):
            self.log.info("batch %s ended %s after %ss", event["batch_id"], event.get("status"), event.get("elapsed_s"))
            if event.get("status") == "WAIT_TIMEOUT":
                limit = f"{self.batch_timeout:g} s" if self.batch_timeout else "25 h"
                raise AirflowException(f"batch {event['batch_id']}: still running after the wait's limit ({limit}); "
                                       "a retry of the task waits for it again")
            if event.get("status") == "ERROR":
                raise AirflowException(f"batch {event['batch_id']}: {event.get('error')}; check the triggerer's "
                                       "OPENAI_API_KEY and base URL (a retry of the task asks again)")
        self._select_spec()
        compute = resolve_compute(self.compute)
        home = self._home()
        spec_path, result_path = self._paths(context, home)
        self._write_spec(spec_path)
        result_path.unlink(missing_ok=True)  # a retry must not return an earlier attempt's result
        env = self._stage_env(context, home)
        self.log.info("stage %s on %s; spec %s", " ".join(stage_words(self.stage)), compute, spec_path)
        if compute == "local":
            return self._execute_local(context, spec_path, result_path, env, home)
        return self._execute_slurm(context, spec_path, result_path, env, home)

    def _announce(self, context: Mapping[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        """Attach what the stage made to its outlets' Asset events (the DAGs scheduled on them read it)."""
        extra = {"stage": " ".join(stage_words(self.stage)), "spec": dict(self._stage_spec or {}),
                 "outputs": result.get("outputs", {}), "counts": result.get("counts", {})}
        events = context.get("outlet_events")
        for outlet in self.outlets or []:
            if events is not None:
                events[outlet].extra = json.loads(json.dumps(extra, default=str))
        return result

    def _execute_local(self, context: Mapping[str, Any], spec_path: Path, result_path: Path, env: dict[str, str],
                       home: Path) -> Any:
        exe = Path(sys.executable).with_name("agentpipe")
        argv = stage_argv(str(exe) if exe.exists() else "agentpipe", self.stage, spec_path, result_path)
        self.log.info("running: %s", " ".join(argv))
        home.mkdir(parents=True, exist_ok=True)
        tail: deque[str] = deque(maxlen=self.tail_lines)
        self._killed = False
        self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      text=True, errors="replace", bufsize=1, cwd=home,
                                      env={**os.environ, **env}, start_new_session=True)
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            self.log.info("%s", line)
        rc = self._proc.wait()
        self._proc = None
        if rc == WAITING_EXIT and not self._killed:
            return self._wait_for_batch(read_result(result_path))
        if rc != 0:
            why = "was killed" if self._killed else _failure(rc, result_path)
            message = f"stage {' '.join(stage_words(self.stage))} {why}; last lines:\n" + "\n".join(tail)
            # bad configuration or input: a retry would fail the same way, so the task fails at once
            raise (AirflowFailException if rc == CONFIG_ERROR_EXIT and not self._killed else AirflowException)(message)
        return self._announce(context, read_result(result_path))

    def _execute_slurm(self, context: Mapping[str, Any], spec_path: Path, result_path: Path, env: dict[str, str],
                       home: Path) -> None:
        from plugins.slurm.trigger import SlurmJobTrigger

        hook = self._slurm_hook()
        s = hook.settings
        job_name = self._job_name(context)
        log_dir = Path(s.log_dir) if s.log_dir else home / "logs" / "slurm"
        output = str(log_dir / f"{job_name}-%j.out")
        bumps_path = self._bumps_path(spec_path)
        bumps = json.loads(bumps_path.read_text()) if bumps_path.is_file() else {}
        resources = self.job_resources(bumps)
        self.log.info("resources (%s, %.3g B local weights): %s", resources.tier, resources.size_b,
                      {k: v for k, v in resources.as_dict().items() if v not in (None, (), []) and k != "size_b"})
        argv = stage_argv(s.agentpipe_executable(), self.stage, spec_path, result_path)
        job_path = spec_path.with_name(spec_path.stem + ".job.json")
        earlier = json.loads(job_path.read_text()) if job_path.is_file() else None
        alive = earlier is not None and job_state(s, str(earlier["job_id"])).state not in TERMINAL_STATES | {
            UNKNOWN_STATE}
        if alive:  # a retry while the previous attempt's job still runs: follow that job, never a second one
            job_id, log_path = str(earlier["job_id"]), earlier["log_path"]
            self.log.info("Slurm job %s of an earlier attempt is still alive: reattaching to it", job_id)
        else:
            from pipeline.data.jsonl import atomic_write_text
            from pipeline.data.locks import file_lock

            cap = _job_cap(context)
            # count and submit under one lock, so the DAG run's tasks cannot all see a free slot at once
            with file_lock(spec_path.parent / ".slurm-submit.lock"):
                if cap:
                    dag_id = context["ti"].dag_id
                    live = [n for n in live_job_names(s) if n.startswith(sanitize_job_name(dag_id) + ".")
                            and f".{sanitize_job_name(context['run_id'])}" in n]
                    if len(live) >= cap:
                        from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger
                        from datetime import timedelta

                        self.log.info("%d Slurm jobs of this DAG run (%s) are pending or running, the most "
                                      "max_slurm_jobs allows: waiting for one to end", len(live), dag_id)
                        self.defer(trigger=TimeDeltaTrigger(timedelta(seconds=max(s.poll_interval, 5.0))),
                                   method_name="execute")
                job_id = hook.submit(argv, job_name=job_name, output=output, resources=resources, env=env,
                                     workdir=s.workdir or str(home))
                log_path = output.replace("%j", job_id)
                atomic_write_text(job_path, json.dumps({"job_id": job_id, "log_path": log_path}))
        self._job_id = job_id
        ti = context["ti"]
        ti.xcom_push(key="slurm_job_id", value=job_id)
        ti.xcom_push(key="slurm_log", value=log_path)
        trigger = SlurmJobTrigger(
            job_id=job_id, log_path=log_path,
            poll_interval=self.poll_interval if self.poll_interval is not None else s.poll_interval,
            initial_delay=self.initial_delay if self.initial_delay is not None else s.initial_delay,
            timeout=self.job_timeout if self.job_timeout is not None else s.job_timeout,
            tail_lines=self.tail_lines, bin_dir=s.bin_dir)
        self.defer(trigger=trigger, method_name="execute_complete",
                   kwargs={"job_name": job_name, "result_path": str(result_path)})

    def execute_complete(self, context: Mapping[str, Any], event: Mapping[str, Any], job_name: str | None = None,
                         result_path: str | None = None) -> Any:
        """Resumed after the trigger fired: ship the rest of the job log, map the state, return the result."""
        # dag.test() passes only the event (not the defer kwargs): recompute what is missing; it is deterministic.
        job_name = job_name or self._job_name(context)
        result_path = result_path or str(self._paths(context, self._home())[1])
        job_id, state = str(event.get("job_id")), str(event.get("state"))
        log_path = event.get("log_path")
        offset = int(event.get("log_offset") or 0)
        text, _ = read_from(log_path, offset, final=True, max_bytes=4 * 1024 * 1024)
        if text:
            self.log.info("---- Slurm job %s log %s%s ----", job_id, log_path,
                          f" (from byte {offset})" if offset else "")
            for line in text.splitlines():
                self.log.info("%s", line)
            self.log.info("---- end of job log ----")
        ok, described = job_outcome(state, str(event.get("exit_code") or ""))
        self.log.info("Slurm job %s ended %s after %ss", job_id, described, event.get("elapsed_s"))
        if not ok and str(event.get("exit_code") or "").split(":")[0] == str(WAITING_EXIT):
            self._select_spec()
            return self._wait_for_batch(read_result(Path(result_path)))
        if not ok:
            tail = event.get("log_tail") or tail_file(log_path, self.tail_lines)
            exit_code = str(event.get("exit_code") or "")
            message = failure_message(job_id, job_name, state, exit_code, str(event.get("reason") or ""), log_path,
                                      tail)
            spec_path = Path(result_path).with_name(Path(result_path).name.removesuffix(".result.json") + ".json")
            bumps_path = self._bumps_path(spec_path)
            bumps = json.loads(bumps_path.read_text()) if bumps_path.is_file() else {}
            retry, more = retry_decision(state, exit_code, bumps)
            if not retry:
                raise AirflowFailException(message + ("" if state not in RETRY_WITH_MORE else
                                                      f"\n(already retried with {bumps}; not retried again)"))
            if more:
                current = getattr(self.job_resources(bumps), more)
                bumps[more] = doubled(more, str(current))
                from pipeline.data.jsonl import atomic_write_text

                atomic_write_text(bumps_path, json.dumps(bumps))
                message += f"\n(the retry gets {more} {bumps[more]})"
            raise AirflowException(message)
        self._select_spec()
        return self._announce(context, read_result(Path(result_path)))

    def _wait_for_batch(self, result: Mapping[str, Any]) -> None:
        """The stage handed its work to a batch: defer until it ends (no worker slot), then run it again."""
        from plugins.openai_batch_trigger import OpenAIBatchTrigger

        batch = result.get("batch") if isinstance(result.get("batch"), Mapping) else {}
        if result.get("status") != "waiting" or not batch.get("batch_id"):
            raise AirflowException(f"stage exited {WAITING_EXIT} (waiting) but its result names no batch: {result}")
        self.log.info("waiting for batch %s (%s, %s requests) without a worker slot", batch["batch_id"],
                      batch.get("status"), batch.get("requests"))
        poll = float(batch.get("poll_s") or self.batch_poll_interval)  # the stage's own setting, when it has one
        self.defer(trigger=OpenAIBatchTrigger(batch_id=str(batch["batch_id"]), base_url=batch.get("base_url"),
                                              poll_interval=poll, timeout=self.batch_timeout),
                   method_name="execute")

    # ------------------------------------------------------------------------------------------------ kill
    def on_kill(self) -> None:
        """Local: SIGTERM the stage's process group, SIGKILL after ``kill_grace`` s. Slurm: scancel the job (a
        deferred task is cancelled by the trigger's on_kill instead)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            self._killed = True
            self.log.info("killing the stage's process group %s", proc.pid)
            _kill_group(proc, self.kill_grace)
        if self._job_id is not None:
            self._slurm_hook().cancel(self._job_id)


def _job_cap(context: Mapping[str, Any]) -> int:
    """The DAG run's ``max_slurm_jobs`` Param (0 or absent: no cap)."""
    params = context.get("params") or {}
    try:
        return max(0, int(params.get("max_slurm_jobs") or 0)) if hasattr(params, "get") else 0
    except (TypeError, ValueError):
        raise AirflowFailException(f"max_slurm_jobs: expected a whole number, got {params.get('max_slurm_jobs')!r}")


def _kill_group(proc: subprocess.Popen, grace: float) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # the group may still have members after the leader exited (children that ignore SIGTERM)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


__all__ = ["StageOperator", "read_result", "resolve_compute", "safe_path_part", "stage_argv", "stage_words"]
