"""refresh_analysis: when reports land (the reports Asset: a ``toolemu_evaluation`` run's report step), redo the
analysis (trade-off fit, Pareto frontier, persistence) of each run folder they came from, into
$AGENTPIPE_HOME/analysis/<run name>. A run folder whose finetuned models are judged both by their own arm's judge
and by the other one (match and cross, SPEC §7.2) is analysed once per setting, into <run name>/match and
<run name>/cross (``pipeline.analysis.run.setting_outputs``, as ``dpo_experiment``). An analysis whose runs did
not change is skipped by the stage itself. (``dpo_experiment`` analyses its own reports as its last step.)"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, task

from pipeline.analysis.run import AnalyzeConfig
from plugins.dag_common import ANALYSIS, DEFAULT_ARGS, REPORTS, common_params, home, stage_param
from plugins.stage_operator import StageOperator


@dag(
    dag_id="refresh_analysis",
    schedule=[REPORTS],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    render_template_as_native_obj=True,
    tags=["agentpipe", "analysis"],
    doc_md=__doc__,
    params={"n_bootstrap": stage_param(AnalyzeConfig, "n_bootstrap"), **common_params()},
)
def refresh_analysis():
    @task
    def analyses(**context) -> list[dict]:
        """One ``analyze all`` per run folder named by the triggering report events, and per setting where the
        folder mixes match and cross judgements of its finetuned models."""
        from pathlib import Path

        from pipeline.analysis.run import analysis_specs

        runs = sorted({str((e.extra or {}).get("spec", {}).get("runs"))
                       for evs in (context.get("triggering_asset_events") or {}).values() for e in evs
                       if (e.extra or {}).get("spec", {}).get("runs")})
        return [spec for r in runs for spec in analysis_specs(r, home() / "analysis" / Path(r).name,
                                                              n_bootstrap=context["params"]["n_bootstrap"])]

    StageOperator.partial(task_id="analyze", stage="analyze all", compute="{{ params.compute }}", outlets=[ANALYSIS],
                          map_index_template="{{ task.spec.runs.split('/')[-1] }}"
                          "{{ (' ' ~ task.spec.setting) if task.spec.get('setting') else '' }}"
                          ).expand(spec=analyses())


refresh_analysis()
