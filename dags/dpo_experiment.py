"""dpo_experiment: the paper's experiment. For source models × evaluator arms × seeds × betas × configurations
(safe, help, both, safe->help, help->safe): pairs, then one chain per first-stage model — train → test-split
emulation → evaluation, and train → merge → second-stage train → emulation → evaluation where a two-stage
configuration builds on it — then reports → analysis (trade-off fit, Pareto frontier, persistence) → MLflow,
all nested under this DAG run's parent run.

The plan (``pipeline.experiment``) computes every stage's options and output path up front (names are
deterministic), so reruns resume where they stopped. Each chain is one instance of a mapped task group
(named by its model in the UI): a model is evaluated as soon as it has trained, while others still train.
Chains whose judge is an API model take their evaluation slots from the ``judge_api`` pool, the others
from ``gpu``. With two arms every finetuned model is also judged by the other arm's judge (``cross_evaluation``,
on by default then): the chain's ``cross_evaluate_<kind>`` / ``cross_evaluate2_<kind>`` step of that judge's
kind runs after the model's own evaluation and takes its slot from that judge's pool (an API judge's from
``judge_api``, a local one's from ``gpu``); the other kind's step is skipped. The analysis then runs per
setting: ``analyze`` (match) into ``analysis/<name>/match`` and ``analyze_cross`` into ``analysis/<name>/cross``;
without cross evaluation ``analyze`` alone into ``analysis/<name>`` and ``analyze_cross`` is skipped. Before anything runs, ``approve_cost`` shows the plan's size (jobs, GPU-hours, judge calls,
USD) and waits for a person's approval when ``require_approval`` is true (the cluster preset in
``dags/README.md``); a rejection, or no answer within ``approval_timeout_hours`` (24 by default), runs nothing
downstream.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.standard.exceptions import HITLRejectException, HITLTimeoutError
from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import Param, dag, task, task_group
from airflow.sdk.exceptions import AirflowFailException

from pipeline.analysis.run import AnalyzeConfig
from pipeline.emulation.runner import EmulationConfig
from pipeline.evaluation.runner import EvaluationConfig
from pipeline.preference.stage import PairsConfig
from pipeline.training.config import TrainConfig
from plugins.dag_common import (ANALYSIS, CHAIN_PRIORITY, DEFAULT_ARGS, EVALUATIONS, GPU_POOL, JUDGE_POOLS,
                                PARENT_RUN, REHEARSAL_SIZING, backend_param, common_params, finish_tracking, home,
                                options_param, rehearsal_param, stage_param, start_tracking)
from plugins.stage_operator import StageOperator

#: options the experiment's plan sets itself (pipeline.experiment)
_PLANNED_EMULATE = ("agent", "emulator", "evaluator", "case_set", "cases", "out", "test_only", "seed", "no_progress")
_PLANNED_EVALUATE = ("trajectories", "evaluator", "no_progress")

#: how long ``approve_cost`` waits for an answer unless the run sets ``approval_timeout_hours``
APPROVAL_TIMEOUT_HOURS = 24


def _approval_timeout(context) -> timedelta:
    """The run's ``approval_timeout_hours`` (the resumed task is a fresh operator: read it from the params)."""
    return timedelta(hours=float(context["params"].get("approval_timeout_hours", APPROVAL_TIMEOUT_HOURS)))


class CostApproval(ApprovalOperator):
    """The plan's size for a person to approve; passes straight through when ``require_approval`` is false.

    "Reject", or no answer within ``approval_timeout_hours`` (default 24; the timeout answers "Reject"), fails
    this task without a retry, so nothing downstream runs: every stage, ``report`` and ``analyze`` end
    ``upstream_failed`` (merely skipping its direct successors would let ``report`` and ``analyze``, whose
    trigger rule is ``none_failed``, run on whatever the folders hold), and ``finish_tracking`` closes the parent
    MLflow run as FAILED."""

    def __init__(self, **kwargs) -> None:
        super().__init__(defaults=self.REJECT, fail_on_reject=True, **kwargs)

    def execute(self, context):
        params = context["params"]
        if not params.get("require_approval"):
            self.log.info("require_approval is false: not waiting.\n%s", self.body)
            return {"chosen_options": [self.APPROVE], "params_input": {}, "approved": "not required"}
        self.response_timeout = _approval_timeout(context)
        return super().execute(context)

    def execute_complete(self, context, event):
        try:
            return super().execute_complete(context, event)
        except (HITLRejectException, HITLTimeoutError):
            timed_out = bool(event.get("timedout")) or event.get("error_type") == "timeout"
            who = (event.get("responded_by_user") or {}).get("name", "a user")
            why = (f"no answer within {_approval_timeout(context)} (a timed-out approval is a rejection)"
                   if timed_out else f"rejected by {who}")
            raise AirflowFailException(f"cost approval {why}: nothing downstream of approve_cost runs") from None


_ARM = {"type": "object", "required": ["name", "pool", "evaluator"],
        "properties": {"name": {"type": "string", "pattern": "^[A-Za-z0-9.-]+$"},
                       "pool": {"type": "string", "minLength": 1}, "evaluator": {"type": "string", "minLength": 1}}}


def _stage(task_id: str, name: str, **kwargs) -> dict:
    """StageOperator arguments every stage task of this DAG shares."""
    return {"task_id": task_id, "stage": name, "compute": "{{ params.compute }}", "mlflow_parent_run_id": PARENT_RUN,
            **REHEARSAL_SIZING, **kwargs}


def _model_chain(judge: str, judge_pool: str):
    """The mapped task group of one judge kind's chains: one instance per first-stage model."""

    @task_group(group_id=f"models_{judge}_judge")
    def model_chain(chain: dict):
        def step(key: str, name: str, pool: str = GPU_POOL, priority: str | None = None, **kwargs) -> StageOperator:
            return StageOperator(**_stage(key, name, **kwargs), spec=chain, spec_key=key, pool=pool,
                                 priority_weight=CHAIN_PRIORITY[priority or key], weight_rule="absolute",
                                 map_index_template="{{ task.spec.name }}")

        def evaluations(emulate: StageOperator, stage: str) -> None:
            """The model's evaluation by its arm's judge, then by the other arm's (one step per judge kind,
            each from its kind's pool; a step the chain does not have is skipped). A cross evaluation needs
            only the trajectories: it runs when the own evaluation failed too, not when the emulation did."""
            own = step(f"evaluate{stage}", "evaluate", judge_pool, outlets=[EVALUATIONS])
            emulate >> own
            for kind, pool in JUDGE_POOLS.items():
                [emulate, own] >> step(f"cross_evaluate{stage}_{kind}", "evaluate", pool, f"cross_evaluate{stage}",
                                       trigger_rule="all_done_min_one_success", outlets=[EVALUATIONS])

        train = step("train", "train")
        evaluations(train >> step("emulate", "emulate"), "")
        evaluations(train >> step("merge", "merge") >> step("train2", "train") >> step("emulate2", "emulate"), "2")

    return model_chain


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
        "pairs": options_param(PairsConfig, ("data_dir", "evaluator", "judge", "cases", "seed", "split", "out",
                                             "metric", "metric2"),
                               '{"min_score_difference": 1}'),
        "n_bootstrap": stage_param(AnalyzeConfig, "n_bootstrap"),
        "rehearsal": rehearsal_param(),
        "cross_evaluation": Param(None, type=["boolean", "null"], description="judge every finetuned model by the "
                                  "other arm's judge too and analyse both settings (match, cross); empty (null): "
                                  "on with two arms, which must then be named after their judges (q32, gpt5m)"),
        "require_approval": Param(False, type="boolean", description="wait for a person to approve the plan's "
                                  "size (jobs, GPU-hours, judge calls, USD) before anything runs"),
        "approval_timeout_hours": Param(APPROVAL_TIMEOUT_HOURS, type="number", exclusiveMinimum=0,
                                        description="with require_approval: hours to wait for an answer; no "
                                        "answer by then is a rejection (nothing runs)"),
        **common_params(),
    },
)
def dpo_experiment():
    parent = start_tracking("training")

    @task
    def plan(**context) -> dict:
        from pipeline.data.jsonl import atomic_write_json
        from pipeline.experiment import experiment_from_params, plan_experiment

        p = context["params"]
        root = home()
        cfg = experiment_from_params(p, root)
        result = plan_experiment(cfg, root).as_dict()
        if p.get("rehearsal"):  # the same plan, every model a stand-in (pipeline.rehearsal)
            from pipeline.rehearsal import recordings, rehearse_plan

            result = rehearse_plan(result, cfg.source_models, root, recordings("experiment"))
        atomic_write_json(root / "experiments" / p["name"] / "plan.json", result)  # beside, not inside, the analysis
        return result

    @task
    def specs(plan: dict, key: str, judge: str | None = None) -> list[dict]:
        """One part of the plan (mapping needs a task's plain return value); ``judge`` keeps the chains or
        evaluations of that judge kind."""
        items = plan[key]
        return items if judge is None else [{k: v for k, v in i.items() if k != "judge" or key == "chains"}
                                            for i in items if i["judge"] == judge]

    @task
    def plan_size(plan: dict) -> str:
        from plugins.plan_size import describe, plan_size as size

        text = describe(size(plan.get("planned", plan)))  # a rehearsal shows the real plan's size
        print(text)
        return text

    planned = plan()
    approve = CostApproval(task_id="approve_cost", subject="Run this experiment?",
                           body="{{ ti.xcom_pull(task_ids='plan_size') }}")
    parent >> planned
    plan_size(planned) >> approve

    pairs = StageOperator.partial(**_stage("pairs", "pairs")).expand(
        spec=specs.override(task_id="pairs_specs")(planned, "pairs"))
    source_emulate = StageOperator.partial(**_stage("emulate_source", "emulate"), pool=GPU_POOL,
                                           map_index_template="{{ task.spec.agent }}").expand(
        spec=specs.override(task_id="source_emulate_specs")(planned, "source_emulate"))
    approve >> [pairs, source_emulate]
    chains = []
    for judge, pool in JUDGE_POOLS.items():
        source_evaluate = StageOperator.partial(
            **_stage(f"evaluate_source_{judge}_judge", "evaluate"), pool=pool, outlets=[EVALUATIONS],
            map_index_template="{{ task.spec.trajectories.split('/')[-2] }}").expand(
            spec=specs.override(task_id=f"source_evaluate_{judge}_specs")(planned, "source_evaluate", judge))
        source_emulate >> source_evaluate

        group = _model_chain(judge, pool).expand(
            chain=specs.override(task_id=f"chains_{judge}_judge")(planned, "chains", judge))
        pairs >> group
        chains += [group, source_evaluate]
    runs = str(home() / "trajectories") + "/{{ params.name }}"
    report = StageOperator(task_id="report", stage="report", compute="{{ params.compute }}",
                           mlflow_parent_run_id=PARENT_RUN, trigger_rule="none_failed",
                           spec={"runs": runs, "out": str(home() / "reports") + "/{{ params.name }}"})
    # the plan's analyses: the match setting (or the only one) and, with cross evaluation, the cross setting
    analyses = [StageOperator(task_id=key, stage="analyze all", compute="{{ params.compute }}",
                              mlflow_parent_run_id=PARENT_RUN, trigger_rule="none_failed", outlets=[ANALYSIS],
                              spec=planned, spec_key=key) for key in ("analyze", "analyze_cross")]
    chains >> report
    report >> analyses >> finish_tracking(parent, "training")


dpo_experiment()
