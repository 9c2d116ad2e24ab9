"""Shared pieces of the DAG files (dags/): default args, the MLflow parent run of a DAG run, common Params.

Kept light: the Airflow SDK, ``plugins`` and the stages' config models (pydantic, no ML libraries) at module
level; everything else of ``pipeline`` loads inside tasks.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from airflow.sdk import Asset, Param, task

DEFAULT_ARGS = {"retries": 1, "retry_delay": timedelta(seconds=30)}

#: What the DAGs produce, as Airflow Assets (a stage task's event carries its spec and outputs as ``extra``):
#: ``rerun_failed_evaluations`` runs when evaluations land, ``refresh_analysis`` when reports land.
TRAJECTORIES = Asset("agentpipe://trajectories")
EVALUATIONS = Asset("agentpipe://evaluations")
REPORTS = Asset("agentpipe://reports")
ANALYSIS = Asset("agentpipe://analysis")

#: Airflow pools (created by ``make setup`` / the demo / the compose init, see ``plugins/README.md``):
#: ``gpu`` bounds the model stages running at once on local workers (slots = the machine's GPUs; a Slurm task
#: waits deferred and so holds no slot); ``judge_api`` bounds the judge stages sending requests to the API
#: endpoint at once (deferred ones count too: their jobs still send requests), so that N tasks do not each
#: multiply the backend's own concurrency against one rate limit.
GPU_POOL = "gpu"
API_POOL = "judge_api"
#: ``judge_batch`` bounds the judge stages submitting or collecting a Batch API batch at once; while the batch
#: runs the task waits deferred and holds no slot (the batch sends no requests from here)
BATCH_POOL = "judge_batch"
#: judge kind (``pipeline.experiment.judge_kind``) → the pool its evaluation tasks take a slot from
JUDGE_POOLS = {"local": GPU_POOL, "api": API_POOL, "batch": BATCH_POOL}
POOL_DESCRIPTIONS = {
    GPU_POOL: ("model stages (emulate, local judges, train, merge) running on this machine's GPUs at once", False),
    API_POOL: ("judge stages sending requests to the API endpoint at once (deferred Slurm jobs count)", True),
    BATCH_POOL: ("judge stages submitting or collecting a Batch API batch at once (a task waiting for its batch "
                 "holds no slot)", False),
}
#: Task priorities inside a model's chain (weight_rule "absolute"): what is further along goes first, so a
#: model that has trained is emulated and judged before another model's training takes the slot. A cross
#: evaluation (the other arm's judge) ranks with its stage's own evaluation.
CHAIN_PRIORITY = {"train": 1, "merge": 2, "train2": 3, "emulate": 4, "evaluate": 5, "cross_evaluate": 5,
                  "emulate2": 6, "evaluate2": 7, "cross_evaluate2": 7}


def gpu_slots() -> int:
    """GPUs on this machine (``nvidia-smi -L``), at least 1 (a CPU-only laptop runs one model stage at a time);
    $AGENTPIPE_GPU_SLOTS overrides."""
    import shutil
    import subprocess

    if os.environ.get("AGENTPIPE_GPU_SLOTS", "").strip():
        return max(1, int(os.environ["AGENTPIPE_GPU_SLOTS"]))
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
            return max(1, sum(1 for line in out.splitlines() if line.startswith("GPU ")))
        except (OSError, subprocess.SubprocessError):
            pass
    return 1


def pools(api_slots: int | None = None) -> dict[str, dict]:
    """The project's pools in ``airflow pools import`` form ($AGENTPIPE_API_SLOTS: the judge endpoint's share,
    default 4)."""
    api = api_slots if api_slots is not None else int(os.environ.get("AGENTPIPE_API_SLOTS", "4") or 4)
    slots = {GPU_POOL: gpu_slots(), API_POOL: api, BATCH_POOL: api}
    return {name: {"slots": slots[name], "description": text, "include_deferred": deferred}
            for name, (text, deferred) in POOL_DESCRIPTIONS.items()}


def create_pools(airflow: str = "airflow", env: dict[str, str] | None = None) -> dict[str, dict]:
    """Create or update the pools through ``airflow pools import`` (one call; idempotent)."""
    import json
    import subprocess
    import tempfile

    wanted = pools()
    with tempfile.NamedTemporaryFile("w", suffix=".json") as fh:
        json.dump(wanted, fh)
        fh.flush()
        subprocess.run([airflow, "pools", "import", fh.name], env=env, check=True, capture_output=True)
    return wanted


#: Template for the parent-run journal folder returned by ``start_tracking`` (stages nest their runs under it).
PARENT_RUN = "{{ ti.xcom_pull(task_ids='start_tracking') }}"


def home() -> Path:
    """The run root shared by Airflow workers and Slurm nodes ($AGENTPIPE_HOME, default ./runs)."""
    return Path(os.environ.get("AGENTPIPE_HOME", "runs")).expanduser().resolve()


def backend_param() -> Param:
    """Model backend options for the emulate and evaluate stages, with the CLI's names (``max_model_len`` is
    ``--max-model-len``); unknown keys are refused."""
    from pipeline.llm.options import json_schema

    schema = json_schema()
    return Param({}, type="object", properties=schema["properties"], additionalProperties=False,
                 description="model backend options, e.g. {\"dtype\": \"bfloat16\", \"max_model_len\": 16384, "
                 "\"gpu_memory_utilization\": 0.85, \"tensor_parallel_size\": 2, \"enforce_eager\": false}")


def _field_schema(model: type, field: str) -> dict:
    schema = dict(model.model_json_schema()["properties"][field])
    for key in ("title", "flags", "metavar", "nargs", "cli_type"):  # names, and hints for the command line
        schema.pop(key, None)
    return schema


def stage_param(model: type, field: str, **overrides) -> Param:
    """A Param for one stage option: type, bounds, choices, default and description come from the stage's config
    model (``pipeline.stage``), the one place the CLI's ``--help`` reads them from too; ``overrides`` narrow it
    (e.g. a different default or a maximum for the form)."""
    schema = _field_schema(model, field) | overrides
    return Param(schema.pop("default", None), **schema)


def options_param(model: type, exclude: tuple[str, ...], example: str) -> Param:
    """An object of extra options for one stage (the DPO experiment's ``train``, ``pairs``, …): keys and types
    from the stage's config model, so a misspelt option is refused by the form; ``exclude`` the ones the plan
    sets itself."""
    props = {name: _field_schema(model, name) for name in model.model_fields if name not in exclude}
    return Param({}, type="object", properties=props, additionalProperties=False,
                 description=f"extra {model.stage} options, e.g. {example}")


def quantization_param(what: str) -> Param:
    from pipeline.llm.options import QUANTIZATIONS

    return Param("none", type="string", enum=list(QUANTIZATIONS), description=f"{what}: int4/int8 (HF, "
                 "bitsandbytes), fp16, bf16; vLLM: fp8 or a pre-quantized checkpoint's method (awq, gptq, …)")


#: A rehearsal's stage jobs are sized as what they load — the tiny stand-in base, on one core — not as the models
#: they stand in for (a stand-in base named "Qwen2.5-7B" would otherwise be sized as a 7B model and wait for a GPU);
#: StageOperator arguments ``models`` and ``stage_resources`` (``resources`` is BaseOperator's too in a mapped task's partial arguments), rendered per run.
REHEARSAL_SIZING = {"models": "{{ ['agentpipe/tiny-llama'] if params.rehearsal else None }}",
                    "stage_resources": "{{ {'cpus': 1} if params.rehearsal else None }}"}


def rehearsal_param() -> Param:
    """The ``rehearsal`` switch both study DAGs share (``pipeline.rehearsal``)."""
    return Param(False, type="boolean", description="rehearse the plan: the same names, folders, splits and "
                 "approval, but every model is a stand-in (the study's recorded outputs replayed where it recorded "
                 "that model, scripted doubles elsewhere; trainings on a tiny stand-in base for a few steps)")


def common_params() -> dict[str, Param]:
    return {
        "compute": Param("", type="string", enum=["", "local", "slurm"],
                         description="Where stages run: local subprocess or Slurm job (empty: the "
                                     "agentpipe_compute Variable, else $AGENTPIPE_COMPUTE, else local)"),
        "max_slurm_jobs": Param(0, type="integer", minimum=0,
                                description="at most this many Slurm jobs of this DAG run pending or running at "
                                            "once (0: no limit; a task waits deferred for a free one)"),
    }


@task
def start_tracking(experiment: str, **context) -> str:
    """Open this DAG run's parent MLflow run; returns its journal folder, which stages nest under (the
    folder works even while MLflow is unreachable: nesting is resolved when the journal is synced)."""
    from pipeline.tracking import Tracker

    dag_run = context["dag_run"]
    folder = home() / "tracking" / dag_run.dag_id / _safe(dag_run.run_id)
    with Tracker.open(folder, experiment=experiment, run_name=f"{dag_run.dag_id} {dag_run.run_id}",
                      tags={"airflow.dag_id": dag_run.dag_id, "airflow.run_id": dag_run.run_id}) as t:
        t.log_params({k: v for k, v in (context.get("params") or {}).items()})
        t.flush()
    return str(folder)


@task(trigger_rule="all_done")
def finish_tracking(folder: str, experiment: str, **context) -> str | None:
    """Close the parent run (FAILED when a task of this DAG run failed) and sync its journal. This task runs
    whatever happened upstream and is the DAG's last task, so it fails too when a task failed: otherwise its
    success would make Airflow mark the whole DAG run successful."""
    from airflow.sdk.exceptions import AirflowFailException

    from pipeline.tracking import Tracker, resolve_tracking_uri, sync

    ti = context["ti"]
    try:
        states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[context["run_id"]])
    except Exception as e:  # noqa: BLE001 - whatever went wrong, a run whose outcome is unknown is not a success
        Tracker.open(folder, experiment=experiment).finish("FAILED")
        raise AirflowFailException(f"cannot read the task states of this DAG run ({type(e).__name__}: {e}); "
                                   "it is marked failed rather than successful") from None
    failed = sorted({str(task) for run in states.values() for task, state in run.items()
                     if state in ("failed", "upstream_failed")})
    parent = Tracker.open(folder, experiment=experiment)
    parent.log_metrics(_stage_totals(folder))
    parent.finish("FAILED" if failed else "FINISHED")
    run_id = sync(folder).run_id if resolve_tracking_uri() else None  # no MLflow configured: journal only
    if failed:
        raise AirflowFailException(f"tasks of this DAG run failed: {', '.join(failed)}")
    return run_id


def _stage_totals(folder: str) -> dict[str, float]:
    """``total_<metric>``: tokens, USD, wall time and GPU-hours summed over this DAG run's stage runs (empty when
    MLflow is not configured or unreachable: the stage runs keep their own figures)."""
    import logging

    from pipeline.tracking import resolve_tracking_uri, sync
    from pipeline.tracking.stage_runs import child_sums

    uri = resolve_tracking_uri()
    if uri is None:
        return {}
    try:
        run_id = sync(folder).run_id
        return {f"total_{k}": v for k, v in child_sums(run_id, uri).items()} if run_id else {}
    except Exception as e:  # noqa: BLE001 - the totals are a convenience; the run's outcome matters more
        logging.getLogger(__name__).warning("stage totals not computed: %s", " ".join(str(e).split())[:300])
        return {}


def _safe(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("._") or "_"


if __name__ == "__main__":  # python -m plugins.dag_common: create the pools (compose's airflow-init, make setup)
    for name, pool in create_pools().items():
        print(f"pool {name}: {pool['slots']} slots ({pool['description']})")
