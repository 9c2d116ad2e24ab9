"""rerun_failed_evaluations: daily, whenever new evaluations land (the evaluations Asset) and on demand, find
evaluations under the run root that are still failed or missing a score, repair what the judges' reasoning
allows, re-judge only the rest."""

from __future__ import annotations

import pendulum
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task

from pipeline.evaluation.repair import RerunFailedConfig
from plugins.dag_common import DEFAULT_ARGS, EVALUATIONS, common_params, home, stage_param
from plugins.stage_operator import StageOperator


@dag(
    dag_id="rerun_failed_evaluations",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 3 * * *", timezone="UTC"), assets=[EVALUATIONS]),
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
    @task
    def targets(**context) -> list[str]:
        """What to look at: run daily or by hand, the whole folder; run because evaluations landed, only the
        trajectory files whose judgements need it (a failed or unparsed one) and folders a repair announced."""
        p = context["params"]
        events = [e for evs in (context.get("triggering_asset_events") or {}).values() for e in evs]
        if not events:
            if p["runs"]:  # a folder named by hand: a missing one is the stage's one-line error
                return [p["runs"]]
            # a new installation has no trajectories yet: the daily look has nothing to repair (it ran on the
            # demo's first start and failed on the missing folder)
            default = home() / "trajectories"
            return [str(default)] if default.is_dir() else []
        found: list[str] = []
        for event in events:
            extra = event.extra or {}
            outputs, counts = extra.get("outputs") or {}, extra.get("counts") or {}
            if extra.get("stage") == "evaluate" and (counts.get("parse_failed") or counts.get("errors")):
                found.append(outputs["trajectories"])
            elif extra.get("stage") == "evaluate repair" and (extra.get("spec") or {}).get("data_dir"):
                found.append(extra["spec"]["data_dir"])
        return sorted(set(found))

    @task
    def specs(folders: list[str], rerun: bool, **context) -> list[dict]:
        p = context["params"]
        common = {"eval_types": p["eval_types"]}
        if rerun:
            common.update(evaluator=p["evaluator"] or None, temperature=p["temperature"],
                          max_retries=p["max_retries"])
        return [{"data_dir": folder, **common} for folder in folders]

    folders = targets()
    repair = StageOperator.partial(task_id="repair", stage="evaluate repair", compute="{{ params.compute }}",
                                   map_index_template="{{ task.spec.data_dir }}"
                                   ).expand(spec=specs.override(task_id="repair_specs")(folders, False))
    rerun = StageOperator.partial(task_id="rerun_failed", stage="evaluate rerun-failed",
                                  compute="{{ params.compute }}", map_index_template="{{ task.spec.data_dir }}"
                                  ).expand(spec=specs.override(task_id="rerun_specs")(folders, True))
    repair >> rerun


rerun_failed_evaluations()
