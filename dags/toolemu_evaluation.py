"""toolemu_evaluation: agent models × case shards → emulate → evaluate (× replicates) → repair → report.

Every stage runs through ``StageOperator`` (local subprocess or Slurm job); tasks pass file paths through XCom.
The reports step logs one MLflow evaluation run per model, nested under this DAG run's parent run.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task

from pipeline.emulation.runner import EmulationConfig
from pipeline.evaluation.runner import EvaluationConfig
from plugins.dag_common import (DEFAULT_ARGS, EVALUATIONS, GPU_POOL, JUDGE_POOLS, PARENT_RUN, REPORTS, TRAJECTORIES,
                                backend_param, common_params, finish_tracking, home, quantization_param,
                                rehearsal_param, stage_param, start_tracking)
from plugins.stage_operator import StageOperator



#: the UI's name for an emulate task: its agent (label) and shard
EMULATION_NAME = "{{ task.spec.get('agent_label') or task.spec.agent }}{{ ' shard ' ~ task.spec.shard if task.spec.get('shard') else '' }}"


@dag(
    dag_id="toolemu_evaluation",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    default_args=DEFAULT_ARGS,
    render_template_as_native_obj=True,
    tags=["agentpipe", "evaluation"],
    doc_md=__doc__,
    params={
        "agents": Param(["SmolLM2-135M"], type="array", items={"type": "string"}, minItems=1,
                        description="agent model specs (nickname, Hub id, path, vllm:, openai:, base+adapter)"),
        "samples": Param(1, type="integer", minimum=1, maximum=32,
                         description="sampled runs per agent (>1: agent temperature > 0, folders <agent>-sample<k>)"),
        "agent_temperature": stage_param(EmulationConfig, "agent_temperature"),
        "emulator": Param("SmolLM2-135M", type="string", minLength=1),
        "evaluator": Param("SmolLM2-135M", type="string", minLength=1),
        "emulator_mode": stage_param(EmulationConfig, "emulator_mode"),
        "case_set": Param("demo", type="string", minLength=1, description="toolemu, demo or a cases .json path"),
        "cases": Param("", type="string", pattern="^([0-9]+-[0-9]+)?$", description="START-END (default: all)"),
        "shards": Param(1, type="integer", minimum=1, maximum=144, description="case shards per agent"),
        "replicates": stage_param(EvaluationConfig, "replicates", maximum=16),
        "judge_temperature": stage_param(EvaluationConfig, "temperature"),
        "scoring": stage_param(EvaluationConfig, "scoring"),
        "batch": stage_param(EvaluationConfig, "batch"),
        "batch_poll_s": stage_param(EvaluationConfig, "batch_poll_s"),
        "metrics": stage_param(EvaluationConfig, "metrics"),
        "compat": stage_param(EmulationConfig, "compat"),
        "quantization": quantization_param("agent and judge weights"),
        "max_steps": stage_param(EmulationConfig, "max_steps"),
        "max_tokens_per_call": stage_param(EmulationConfig, "max_tokens_per_call"),
        "max_continuations": stage_param(EmulationConfig, "max_continuations"),
        "backend": backend_param(),
        "run_name": Param("pool", type="string", pattern="^[A-Za-z0-9._-]+$",
                          description="trajectories go to $AGENTPIPE_HOME/trajectories/<run_name>/<agent>/"),
        "rehearsal": rehearsal_param(),
        **common_params(),
    },
)
def toolemu_evaluation():
    parent = start_tracking("evaluation")

    @task
    def plan_emulation(**context) -> list[dict]:
        from pipeline.data.cases import load_named_case_set
        from pipeline.llm.spec import parse_model_spec

        p = context["params"]
        n = len(load_named_case_set(p["case_set"]))
        cases = p["cases"] or f"0-{n}"
        out = str(home() / "trajectories" / p["run_name"])
        specs = []
        for agent in p["agents"]:
            for k in range(p["samples"]):
                label = f"{parse_model_spec(agent).name}-sample{k + 1}" if p["samples"] > 1 else None
                for i in range(p["shards"]):
                    spec = {"agent": agent, "emulator": p["emulator"], "evaluator": p["evaluator"],
                            "emulator_mode": p["emulator_mode"], "case_set": p["case_set"], "cases": cases,
                            "compat": p["compat"], "quantization": p["quantization"], "max_steps": p["max_steps"],
                            "max_tokens_per_call": p["max_tokens_per_call"],
                            "max_continuations": p["max_continuations"], "out": out, "no_progress": True,
                            **p["backend"]}
                    if p["shards"] > 1:
                        spec["shard"] = f"{i}/{p['shards']}"
                    if label:
                        spec.update(agent_label=label, agent_temperature=p["agent_temperature"] or 0.7,
                                    agent_seed=k + 1)
                    specs.append(spec)
        if p["rehearsal"]:  # the study's recorded outputs stand in for every model (pipeline.rehearsal)
            from pipeline.rehearsal import recordings, rehearse_emulation

            pool = recordings("pool")
            specs = [rehearse_emulation(s, pool) for s in specs]
        return specs

    @task
    def plan_evaluation(results: list[dict], kind: str, **context) -> list[dict]:
        """The evaluations when the judge is of this kind (``local`` or ``api``: the pool their tasks take slots
        from), else none."""
        from pipeline.experiment import judge_kind

        p = context["params"]
        if judge_kind(p["evaluator"], p["batch"]) != kind:
            return []
        batch = {"batch": True, "batch_poll_s": p["batch_poll_s"]} if kind == "batch" else {}
        specs = [{"trajectories": r["outputs"]["trajectories"], "evaluator": p["evaluator"], "metrics": p["metrics"],
                  "replicates": p["replicates"], "temperature": p["judge_temperature"], "compat": p["compat"],
                  "quantization": p["quantization"], "scoring": p["scoring"], "no_progress": True,
                  **p["backend"], **batch} for r in results]
        if p["rehearsal"]:
            from pipeline.rehearsal import recordings, rehearse_evaluation

            pool = recordings("pool")
            specs = [rehearse_evaluation(s, pool) for s in specs]
        return specs

    emulate = StageOperator.partial(task_id="emulate", stage="emulate", compute="{{ params.compute }}",
                                    mlflow_parent_run_id=PARENT_RUN, outlets=[TRAJECTORIES], pool=GPU_POOL,
                                    map_index_template=EMULATION_NAME).expand(spec=plan_emulation())
    # one mapped task per judge kind (a task's pool is fixed): the other one has no instances and is skipped
    evaluate = [StageOperator.partial(task_id="evaluate" if kind == "local" else f"evaluate_{kind}_judge",
                                      stage="evaluate", compute="{{ params.compute }}", pool=pool,
                                      mlflow_parent_run_id=PARENT_RUN,
                                      map_index_template="{{ task.spec.trajectories.split('/')[-2] }}"
                                      ).expand(spec=plan_evaluation.override(task_id=f"plan_evaluation_{kind}")(
                                          emulate.output, kind)) for kind, pool in JUDGE_POOLS.items()]
    runs = str(home() / "trajectories") + "/{{ params.run_name }}"
    repair = StageOperator(task_id="repair", stage="evaluate repair", compute="{{ params.compute }}",
                           spec={"data_dir": runs}, trigger_rule="none_failed_min_one_success",
                           outlets=[EVALUATIONS])  # rerun_failed_evaluations takes it from here
    report = StageOperator(task_id="report", stage="report", compute="{{ params.compute }}",
                           mlflow_parent_run_id=PARENT_RUN, outlets=[REPORTS],
                           spec={"runs": runs, "out": str(home() / "reports") + "/{{ params.run_name }}"})
    parent >> emulate
    evaluate >> repair >> report >> finish_tracking(parent, "evaluation")


toolemu_evaluation()
