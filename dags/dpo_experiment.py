"""dpo_experiment: the paper's experiment. For source models × evaluator arms × seeds × betas × configurations
(safe, help, both, safe->help, help->safe): pairs → train → merge → second stage → test-split emulation and
evaluation of every finetuned model (and the source models) → reports → analysis (trade-off fit, Pareto
frontier, persistence) → MLflow, all nested under this DAG run's parent run.

The plan (``pipeline.experiment``) computes every stage's options and output path up front (names are
deterministic), so each phase is one mapped task and reruns resume where they stopped.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Asset, Param, dag, task

from pipeline.analysis.run import AnalyzeConfig
from pipeline.emulation.runner import EmulationConfig
from pipeline.evaluation.runner import EvaluationConfig
from pipeline.preference.stage import PairsConfig
from pipeline.training.config import TrainConfig
from plugins.dag_common import (PARENT_RUN, DEFAULT_ARGS, backend_param, common_params, finish_tracking, home,
                                options_param, stage_param, start_tracking)
from plugins.stage_operator import StageOperator

#: options the experiment's plan sets itself (pipeline.experiment)
_PLANNED_EMULATE = ("agent", "emulator", "evaluator", "case_set", "cases", "out", "test_only", "seed", "no_progress")
_PLANNED_EVALUATE = ("trajectories", "evaluator", "no_progress")

ANALYSIS = Asset("agentpipe://analysis")
_ARM = {"type": "object", "required": ["name", "pool", "evaluator"],
        "properties": {"name": {"type": "string", "pattern": "^[A-Za-z0-9.-]+$"},
                       "pool": {"type": "string", "minLength": 1}, "evaluator": {"type": "string", "minLength": 1}}}


@dag(
    dag_id="dpo_experiment",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    default_args=DEFAULT_ARGS,
    render_template_as_native_obj=True,
    tags=["agentpipe", "training", "analysis"],
    doc_md=__doc__,
    params={
        "name": Param("demo", type="string", pattern="^[A-Za-z0-9._-]+$", description="experiment name (folders)"),
        "source_models": Param(["SmolLM2-135M"], type="array", items={"type": "string"}, minItems=1),
        "arms": Param([{"name": "demo", "pool": "pool", "evaluator": "SmolLM2-135M"}], type="array", items=_ARM,
                      minItems=1, description="evaluator arms: short name, trajectory pool (a folder of model "
                      "folders; relative = under $AGENTPIPE_HOME/trajectories) and the judge"),
        "seeds": Param([0], type="array", items={"type": "integer", "minimum": 0}, minItems=1),
        "betas": Param([0.1], type="array", items={"type": "number", "exclusiveMinimum": 0}, minItems=1),
        "configurations": Param(["safe", "help", "safe->help"], type="array", minItems=1, uniqueItems=True,
                                items={"type": "string", "enum": ["safe", "help", "both", "safe->help", "help->safe"]}),
        "emulator": Param("SmolLM2-135M", type="string", minLength=1),
        "case_set": Param("demo", type="string", minLength=1),
        "cases": Param("", type="string", pattern="^([0-9]+-[0-9]+)?$", description="START-END (default: all)"),
        "emulation": options_param(EmulationConfig, _PLANNED_EMULATE, '{"max_steps": 3}'),
        "evaluation": options_param(EvaluationConfig, _PLANNED_EVALUATE, '{"replicates": 3}'),
        "backend": backend_param(),
        "train": options_param(TrainConfig, ("model", "pairs", "seed", "beta", "out"), '{"max_steps": 10}'),
        "pairs": options_param(PairsConfig, ("data_dir", "evaluator", "cases", "seed", "split", "out", "metric",
                                             "metric2"),
                               '{"min_score_difference": 1}'),
        "n_bootstrap": stage_param(AnalyzeConfig, "n_bootstrap"),
        **common_params(),
    },
)
def dpo_experiment():
    parent = start_tracking("training")

    @task
    def plan(**context) -> dict:
        from pathlib import Path

        from pipeline.data.jsonl import atomic_write_json
        from pipeline.experiment import Arm, ExperimentConfig, plan_experiment

        p = context["params"]
        root = home()
        arms = [Arm(a["name"], str(Path(a["pool"]) if Path(a["pool"]).is_absolute() else root / "trajectories" / a["pool"]),
                    a["evaluator"]) for a in p["arms"]]
        cfg = ExperimentConfig(name=p["name"], source_models=list(p["source_models"]), arms=arms,
                               seeds=list(p["seeds"]), betas=[float(b) for b in p["betas"]],
                               configurations=list(p["configurations"]), emulator=p["emulator"],
                               case_set=p["case_set"], case_range=p["cases"] or None, emulation=dict(p["emulation"]),
                               evaluation=dict(p["evaluation"]), backend=dict(p["backend"]),
                               train=dict(p["train"]), pairs=dict(p["pairs"]), n_bootstrap=p["n_bootstrap"])
        result = plan_experiment(cfg, root).as_dict()
        atomic_write_json(root / "experiments" / p["name"] / "plan.json", result)  # beside, not inside, the analysis
        return result

    @task
    def specs(plan: dict, key: str) -> list[dict]:
        """One phase's stage specs (mapping needs a task's plain return value)."""
        return plan[key]

    planned = plan()
    parent >> planned

    def phase(task_id: str, stage: str, key: str) -> StageOperator:
        return StageOperator.partial(task_id=task_id, stage=stage, compute="{{ params.compute }}",
                                     mlflow_parent_run_id=PARENT_RUN, trigger_rule="none_failed"
                                     ).expand(spec=specs.override(task_id=f"{task_id}_specs")(planned, key))

    pairs = phase("pairs", "pairs", "pairs")
    train1 = phase("train", "train", "train_stage1")
    merge = phase("merge", "merge", "merge")
    train2 = phase("train_second_stage", "train", "train_stage2")
    emulate = phase("emulate_test_split", "emulate", "emulate")
    evaluate = phase("evaluate", "evaluate", "evaluate")
    runs = str(home() / "trajectories") + "/{{ params.name }}"
    report = StageOperator(task_id="report", stage="report", compute="{{ params.compute }}",
                           mlflow_parent_run_id=PARENT_RUN, trigger_rule="none_failed",
                           spec={"runs": runs, "out": str(home() / "reports") + "/{{ params.name }}"})
    analyze = StageOperator(task_id="analyze", stage="analyze all", compute="{{ params.compute }}",
                            mlflow_parent_run_id=PARENT_RUN, trigger_rule="none_failed", outlets=[ANALYSIS],
                            spec={"runs": runs, "out": str(home() / "analysis") + "/{{ params.name }}",
                                  "n_bootstrap": "{{ params.n_bootstrap }}"})
    pairs >> train1 >> merge >> train2 >> emulate >> evaluate >> report >> analyze >> finish_tracking(parent, "training")


dpo_experiment()
