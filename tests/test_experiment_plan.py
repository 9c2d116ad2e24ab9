"""The dpo_experiment plan: test-split emulation of first-stage adapters grouped by base model and seed (one
run serves them all), backend options reaching emulate and evaluate, and the DAG params' schema for them.
Cross evaluation: tests/test_experiment_cross.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.experiment import Arm, ExperimentConfig, plan_experiment


def test_first_stage_adapters_of_one_base_and_seed_are_emulated_together(tmp_path):
    cfg = ExperimentConfig(name="x", source_models=["Qwen2.5-7B", "Llama3.1-8B"],
                           arms=[Arm("q32", "pool", "Qwen3-32B"), Arm("gpt5m", "pool", "openai:gpt-5-mini")],
                           seeds=[0, 1], betas=[0.1, 0.05], configurations=["safe", "help", "both", "safe->help"],
                           case_set="demo", backend={"max_model_len": 16384, "dtype": "bfloat16"})
    plan = plan_experiment(cfg, tmp_path)
    groups = [e for e in plan.emulate if isinstance(e["agent"], list)]
    singles = [e for e in plan.emulate if not isinstance(e["agent"], list)]
    # per base model and seed: 2 arms x 2 betas x 3 one-stage configurations (safe, help, both) = 12 adapters
    assert len(groups) == 2 * 2
    assert all(len(g["agent"]) == 12 and g["test_only"] and len(set(g["agent"])) == 12 for g in groups)
    for g in groups:
        base = g["agent"][0].split("+")[0]
        assert all(a.split("+")[0] == base for a in g["agent"])
    # the source models (all cases) and each second stage (its own merged base) run alone
    assert sum("test_only" not in e for e in singles) == 2
    assert sum(e.get("test_only", False) for e in singles) == 2 * 2 * 2 * 2  # models x arms x seeds x betas
    # every planned agent is emulated exactly once and every evaluation reads a file that emulation writes
    agents = [a for e in plan.emulate for a in (e["agent"] if isinstance(e["agent"], list) else [e["agent"]])]
    assert len(agents) == len(set(agents)) == 2 + 2 * 2 * 2 * 2 * 4
    assert len(plan.evaluate) == 2 * 2 + 2 * 2 * 2 * 2 * 4
    # the backend options go to both stages, with the CLI's names
    assert all(e["max_model_len"] == 16384 and e["dtype"] == "bfloat16" for e in [*plan.emulate, *plan.evaluate])


def test_emulation_writes_the_files_the_evaluations_read(tmp_path):
    from pipeline.emulation.runner import EmulationConfig, plan as plan_emulation
    from pipeline.data.cases import load_named_case_set

    # arms the analysis cannot tell apart (not named after their judges): no cross evaluation
    cfg = ExperimentConfig(name="x", source_models=["SmolLM2-135M"], arms=[Arm("demo", "pool", "SmolLM2-135M"),
                                                                           Arm("b", "pool", "scripted:judge")],
                           seeds=[0], configurations=["safe", "help"], case_set="demo", cross_evaluation=False)
    plan = plan_experiment(cfg, tmp_path)
    cs = load_named_case_set("demo")
    written = set()
    for e in plan.emulate:
        ec = EmulationConfig.model_validate(e)  # each planned spec is a valid emulate configuration as it is
        for agent in ec.agent:
            written.add(str(plan_emulation(ec, agent, cs)[2]))
    assert {e["trajectories"] for e in plan.evaluate} <= written


def test_backend_param_refuses_unknown_and_badly_typed_options():
    from airflow.sdk.definitions.param import ParamValidationError

    from plugins.dag_common import backend_param

    param = backend_param()
    assert param.resolve({"max_model_len": 4096, "dtype": "bfloat16", "enforce_eager": True}) == {
        "max_model_len": 4096, "dtype": "bfloat16", "enforce_eager": True}
    for bad in ({"max_model_lenn": 4096}, {"max_model_len": "long"}, {"gpu_memory_utilization": 1.5},
                {"dtype": "bf17"}):
        with pytest.raises(ParamValidationError):
            backend_param().resolve(bad)
