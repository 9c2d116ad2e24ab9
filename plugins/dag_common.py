"""Shared pieces of the DAG files (dags/): default args, the MLflow parent run of a DAG run, common Params.

Kept light: the Airflow SDK, ``plugins`` and the stages' config models (pydantic, no ML libraries) at module
level; everything else of ``pipeline`` loads inside tasks.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from airflow.sdk import Param, task

DEFAULT_ARGS = {"retries": 1, "retry_delay": timedelta(seconds=30)}
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


def common_params() -> dict[str, Param]:
    return {
        "compute": Param("", type="string", enum=["", "local", "slurm"],
                         description="Where stages run: local subprocess or Slurm job (empty: the "
                                     "agentpipe_compute Variable, else $AGENTPIPE_COMPUTE, else local)"),
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
    Tracker.open(folder, experiment=experiment).finish("FAILED" if failed else "FINISHED")
    run_id = sync(folder).run_id if resolve_tracking_uri() else None  # no MLflow configured: journal only
    if failed:
        raise AirflowFailException(f"tasks of this DAG run failed: {', '.join(failed)}")
    return run_id


def _safe(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("._") or "_"
