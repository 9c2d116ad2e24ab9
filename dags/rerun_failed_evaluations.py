"""rerun_failed_evaluations: daily (and on demand), find evaluations under the run root that are still failed
or missing a score, repair what the judges' reasoning allows, re-judge only the rest, then refresh reports."""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag

from pipeline.evaluation.repair import RerunFailedConfig
from plugins.dag_common import DEFAULT_ARGS, common_params, home, stage_param
from plugins.stage_operator import StageOperator


@dag(
    dag_id="rerun_failed_evaluations",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    default_args=DEFAULT_ARGS,
    tags=["agentpipe", "evaluation", "maintenance"],
    doc_md=__doc__,
    params={
        "runs": Param("", type="string", description="folder to scan (default $AGENTPIPE_HOME/trajectories)"),
        "evaluator": Param("", type="string", description="judge spec (default: the one each judgement names)"),
        "temperature": stage_param(RerunFailedConfig, "temperature"),
        "max_retries": stage_param(RerunFailedConfig, "max_retries", maximum=100),
        "eval_types": stage_param(RerunFailedConfig, "eval_types"),
        **common_params(),
    },
)
def rerun_failed_evaluations():
    runs = "{{ params.runs or '" + str(home() / "trajectories") + "' }}"
    repair = StageOperator(task_id="repair", stage="evaluate repair", compute="{{ params.compute }}",
                           spec={"data_dir": runs, "eval_types": "{{ params.eval_types }}"})
    rerun = StageOperator(task_id="rerun_failed", stage="evaluate rerun-failed", compute="{{ params.compute }}",
                          spec={"data_dir": runs, "evaluator": "{{ params.evaluator or None }}",
                                "temperature": "{{ params.temperature }}", "max_retries": "{{ params.max_retries }}",
                                "eval_types": "{{ params.eval_types }}"})
    repair >> rerun


rerun_failed_evaluations()
