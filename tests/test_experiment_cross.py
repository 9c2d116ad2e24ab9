"""Cross evaluation in the dpo_experiment plan (issue 24): with two arms every finetuned model is judged by its own
arm's judge (match) and by the other arm's (cross), each cross step by the other judge and from that judge's pool;
the analysis runs per setting; plan_size counts the cross judgements; one arm, or cross_evaluation false, plans
what it did before."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.experiment import CROSS_STEPS, JUDGE_KINDS, Arm, ExperimentConfig, judge_kind, plan_experiment

Q32, GPT5M = Arm("q32", "pool", "Qwen3-32B"), Arm("gpt5m", "pool", "openai:gpt-5-mini")
JUDGE = {"q32": Q32.evaluator, "gpt5m": GPT5M.evaluator}
OTHER = {"q32": GPT5M.evaluator, "gpt5m": Q32.evaluator}


def _study(**kw) -> ExperimentConfig:
    """The preset of dags/README.md: 3 source models, arms q32/gpt5m, 3 seeds, 2 betas, 5 configurations."""
    return ExperimentConfig(**{"name": "study", "source_models": ["Llama3.1-8B", "Phi-4", "Qwen2.5-7B"],
                               "arms": [Q32, GPT5M], "seeds": [0, 1, 2], "betas": [0.1, 0.05],
                               "configurations": ["safe", "help", "both", "safe->help", "help->safe"],
                               "case_set": "toolemu", **kw})


def _arm_of(chain: dict) -> str:
    [arm] = [a for a in ("q32", "gpt5m") if f"_{a}_" in chain["name"]]
    return arm


def _judgements(plan) -> Counter:
    """(trajectory file, judge) → how often the chains judge it; and the step each came from."""
    return Counter((spec["trajectories"], spec["evaluator"]) for chain in plan.chains
                   for key in ("evaluate", "evaluate2", *CROSS_STEPS) if (spec := chain[key]) is not None)


def test_the_study_preset_judges_every_finetuned_model_once_by_each_judge(tmp_path):
    plan = plan_experiment(_study(), tmp_path)
    assert len(plan.models) == 180
    judged = _judgements(plan)
    files = {t for t, _ in judged}
    assert len(files) == 180  # one test-split trajectory file per finetuned model
    assert judged == Counter({(t, j): 1 for t in files for j in (Q32.evaluator, GPT5M.evaluator)})
    # the phase view: 6 source evaluations + 180 match evaluations, and the 180 cross ones apart
    assert len(plan.evaluate) == 6 + 180 and len(plan.cross_evaluate) == 180
    assert {(e["trajectories"], e["evaluator"]) for e in plan.cross_evaluate} == {
        (c[k]["trajectories"], c[k]["evaluator"]) for c in plan.chains for k in CROSS_STEPS if c[k]}
    # each chain's own steps use its arm's judge, its cross steps the other arm's, in that judge's kind's slot
    for chain in plan.chains:
        arm = _arm_of(chain)
        assert chain["judge"] == judge_kind(JUDGE[arm])
        for own in ("evaluate", "evaluate2"):
            assert chain[own] is None or chain[own]["evaluator"] == JUDGE[arm]
        kind = judge_kind(OTHER[arm])
        assert kind != chain["judge"]  # the study: a local judge's models are cross-judged by the API one
        for stage in ("", "2"):
            own = chain[f"evaluate{stage}"]
            cross = chain[f"cross_evaluate{stage}_{kind}"]
            assert (cross is None) == (own is None)
            if cross is not None:
                assert cross["evaluator"] == OTHER[arm] and cross["trajectories"] == own["trajectories"]
                assert {k: v for k, v in cross.items() if k != "evaluator"} == {
                    k: v for k, v in own.items() if k != "evaluator"}
            assert chain[f"cross_evaluate{stage}_{chain['judge']}"] is None
    per_step = Counter(k for c in plan.chains for k in CROSS_STEPS if c[k])
    # 90 models per arm: 54 first-stage (3 models x 3 seeds x 2 betas x safe, help, both) and 36 second-stage
    assert per_step == {"cross_evaluate_api": 54, "cross_evaluate_local": 54, "cross_evaluate2_api": 36,
                        "cross_evaluate2_local": 36}
    # two analyses: match and cross, side by side under analysis/study
    assert plan.analyze == {"runs": str(tmp_path / "trajectories" / "study"), "n_bootstrap": 1000,
                            "out": str(tmp_path / "analysis" / "study" / "match"), "setting": "match"}
    assert plan.analyze_cross == {**plan.analyze, "out": str(tmp_path / "analysis" / "study" / "cross"),
                                  "setting": "cross"}
    assert plan.as_dict()["analyze_cross"] == plan.analyze_cross and plan.as_dict()["cross_evaluate"]


def test_cross_evaluation_false_and_one_arm_plan_as_before(tmp_path):
    on = plan_experiment(_study(), tmp_path)
    off = plan_experiment(_study(cross_evaluation=False), tmp_path)
    one = plan_experiment(_study(arms=[Q32]), tmp_path)
    for plan in (off, one):
        assert plan.cross_evaluate == [] and plan.analyze_cross is None
        assert all(c[k] is None for c in plan.chains for k in CROSS_STEPS)
        assert plan.analyze == {"runs": str(tmp_path / "trajectories" / "study"),
                                "out": str(tmp_path / "analysis" / "study"), "n_bootstrap": 1000}
        assert all(count == 1 for count in _judgements(plan).values())
    # without cross evaluation the rest of the plan is the cross-evaluated one's
    assert off.evaluate == on.evaluate and off.emulate == on.emulate and off.models == on.models
    assert [{k: v for k, v in c.items() if k not in CROSS_STEPS} for c in off.chains] == [
        {k: v for k, v in c.items() if k not in CROSS_STEPS} for c in on.chains]
    assert len(one.models) == 90 and len(one.evaluate) == 3 + 90


def test_cross_evaluation_needs_two_arms_the_analysis_tells_apart(tmp_path):
    with pytest.raises(ConfigError, match="cross_evaluation: expected two arms"):
        plan_experiment(_study(arms=[Q32], cross_evaluation=True), tmp_path)
    # arms not named after their judges: the analysis could not tell a match from a cross judgement
    odd = [Arm("a", "pool", "Qwen3-32B"), GPT5M]
    with pytest.raises(ConfigError, match="experiment arm 'a' \\(judge Qwen3-32B\\): cross evaluation expected arms "
                       "named after their judges"):
        plan_experiment(_study(arms=odd), tmp_path)  # on by default with two arms
    with pytest.raises(ConfigError, match="arm 'demo'"):
        plan_experiment(_study(arms=[Arm("demo", "pool", "SmolLM2-135M"), GPT5M], cross_evaluation=True), tmp_path)
    assert plan_experiment(_study(arms=odd, cross_evaluation=False), tmp_path).cross_evaluate == []


def test_plan_size_counts_the_cross_evaluations(tmp_path):
    from pipeline.llm.pricing import cost_usd
    from plugins.plan_size import JUDGE_TOKENS, _CHAIN_STAGES, plan_size

    assert set(CROSS_STEPS) <= set(_CHAIN_STAGES)
    on, off = (plan_size(plan_experiment(_study(cross_evaluation=c), tmp_path).as_dict()) for c in (None, False))
    plan = plan_experiment(_study(cross_evaluation=False), tmp_path).as_dict()
    sources = plan_size({k: plan[k] for k in ("source_emulate", "source_evaluate")})
    finetuned_calls = off["judge_calls"] - sources["judge_calls"]
    assert finetuned_calls == 180 * 72 * 2  # 72 test cases of 144, two metrics, one replicate
    # every finetuned model judged a second time: half of them by the API judge (the q32 arm's models)
    assert on["jobs"]["evaluate"] == off["jobs"]["evaluate"] + 180
    assert on["judge_calls"] == off["judge_calls"] + finetuned_calls
    assert on["api_judge_calls"] == off["api_judge_calls"] + finetuned_calls // 2
    assert on["usd"] == pytest.approx(off["usd"] + finetuned_calls // 2 * cost_usd("gpt-5-mini", *JUDGE_TOKENS),
                                      abs=0.01)
    # the other half by the local 32B judge: one GPU job each, at its time limit
    assert on["gpu_jobs"] == off["gpu_jobs"] + 90
    one_local = plan_size({"source_evaluate": [{**plan["source_evaluate"][0], "evaluator": Q32.evaluator}]})
    assert on["gpu_hours"] == pytest.approx(off["gpu_hours"] + 90 * one_local["gpu_hours"], abs=0.2)


def test_judge_kinds_are_the_dags_pools():
    from plugins.dag_common import CHAIN_PRIORITY, JUDGE_POOLS

    assert set(JUDGE_KINDS) == set(JUDGE_POOLS)
    assert {"cross_evaluate", "cross_evaluate2"} <= set(CHAIN_PRIORITY)


def test_the_two_settings_analyses_are_two_mlflow_runs_told_apart_by_name():
    """analysis/<name>/match and analysis/<name>/cross log to their own runs (own journal folders), named
    <name>/match and <name>/cross (a bare "match" would not say which experiment); a plain folder keeps its name."""
    from pipeline.analysis.cli import _run_name

    assert _run_name(Path("/h/analysis/study/match")) == "study/match"
    assert _run_name(Path("/h/analysis/study/cross")) == "study/cross"
    assert _run_name(Path("/h/analysis/e2e")) == "e2e"
