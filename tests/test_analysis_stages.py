"""Training stages from model names (SPEC §7.3, §7.4 labels), evaluator short names, model sort order."""

import pytest

from pipeline.analysis.names import evaluator_origin, evaluator_short, model_sort_key
from pipeline.analysis.stages import parse_training_config, stage_label
from pipeline.errors import NamingError


@pytest.mark.parametrize("name, stages, origin, seed, label", [
    ("dpo_Llama3.1-8B_help_q32_beta-0.05_s0_safe_q32_beta-0.05_s0", (("help", "0.05"), ("safe", "0.05")), "q32", 0,
     "H,S-0.05"),
    ("dpo_Qwen2.5-7B_safe_q32_s0", (("safe", "0.1"),), "q32", 0, "S-0.1"),
    ("dpo_Qwen2.5-7B_safe_q32_s0_help_q32_s0", (("safe", "0.1"), ("help", "0.1")), "q32", 0, "S,H-0.1"),
    ("dpo_Llama3.1-8B_both_gpt5m_beta-0.05_s2", (("both", "0.05"),), "gpt5m", 2, "S&H-0.05"),
    ("dpo_Phi-4_help_gpt5m_s1_safe_gpt5m_s1", (("help", "0.1"), ("safe", "0.1")), "gpt5m", 1, "H,S-0.1"),
    ("dpo_Phi-4_safe_gpt5m_beta-0.05_s1_help_gpt5m_s1", (("safe", "0.05"), ("help", "0.1")), "gpt5m", 1,
     "S-0.05,H-0.1"),
    ("dpo_Llama-8B_int4_safe_s0", (("safe", "0.1"),), None, 0, "S-0.1"),  # old naming: no origin token
    ("dpo_Qwen2.5-7B_help_diff2_b-2_ml-4096_beta-0.2_s3", (("help", "0.2"),), "diff2", 3, "H-0.2"),
    ("dpo_SmolLM2-135M_safe_Qwen_Qwen3-32B_s0", (("safe", "0.1"),), "q32", 0, "S-0.1"),
])
def test_training_config_parsed_from_the_name_alone(name, stages, origin, seed, label):
    cfg = parse_training_config(name)
    assert cfg.finetuned
    assert cfg.training_stages == stages
    assert cfg.origin == origin
    assert cfg.seed == seed
    assert cfg.label == label


def test_stage_details_dataset_quant_source_and_dataset_type():
    cfg = parse_training_config("dpo_Llama-8B_int4_safe_q32_s0_help_q32_s0")
    assert cfg.source_model == "Llama3.1-8B"
    assert cfg.quantization == "int4"
    assert [s.dataset for s in cfg.stages] == ["safe_q32", "help_q32"]
    assert [s.seed for s in cfg.stages] == [0, 0]
    assert cfg.metric_sequence == ("safe", "help") and cfg.num_stages == 2 and cfg.last_finetune_type == "help"
    assert cfg.dataset_type == "safe_q32_help_q32_s0"
    params = parse_training_config("dpo_Qwen2.5-7B_help_diff2_b-2_ml-4096_beta-0.2_s3").stages[0]
    assert params.dataset == "help_diff2" and dict(params.params) == {"b": "2", "ml": "4096", "beta": "0.2"}


def test_source_models_have_no_stages_and_keep_their_seed():
    cfg = parse_training_config("Qwen_Qwen2.5-7B-Instruct_s2")
    assert not cfg.finetuned and cfg.stages == () and cfg.seed == 2 and cfg.label == "base"
    assert cfg.source_model == "Qwen2.5-7B"
    assert parse_training_config("gpt-5-mini").source_model == "gpt-5-mini"


def test_bad_finetuned_names_raise():
    with pytest.raises(NamingError, match="no training stage"):
        parse_training_config("dpo_Qwen2.5-7B_s0")
    with pytest.raises(NamingError, match="ambiguous seed"):
        parse_training_config("dpo_Qwen2.5-7B_safe_q32_s0_help_q32_s1")


def test_match_and_cross_relation():
    cfg = parse_training_config("dpo_Phi-4_help_q32_s0")
    assert cfg.relation("Qwen_Qwen3-32B") == "match"
    assert cfg.relation("gpt-5-mini") == "cross"
    assert parse_training_config("dpo_Phi-4_help_s0").relation("gpt-5-mini") is None
    assert parse_training_config("dpo_Phi-4_help_diff2_s0").relation("gpt-5-mini") is None
    smol = parse_training_config("dpo_SmolLM2-135M_help_SmolLM2-135M_s0")
    assert smol.relation("SmolLM2-135M") == "match" and smol.relation("gpt-5-mini") is None


def test_labels():
    assert stage_label([("help", "0.1")]) == "H-0.1"
    assert stage_label([("safe", "0.05")]) == "S-0.05"
    assert stage_label([("safe", "0.1"), ("help", "0.1")]) == "S,H-0.1"
    assert stage_label([("safe", "0.05"), ("help", "0.1")]) == "S-0.05,H-0.1"
    with pytest.raises(ValueError):
        stage_label([])


def test_evaluator_short_names():
    assert evaluator_short("gpt-5-mini") == "eval-gpt5m"
    assert evaluator_short("Qwen_Qwen3-32B") == "eval-q32"
    assert evaluator_short("SmolLM2-135M") == "eval-SmolLM2-135M"
    assert evaluator_origin("Qwen_Qwen3-32B") == "q32"


def test_model_sort_order():
    names = ["gpt-5", "Qwen3-8Bnt", "gpt-4o-mini", "Phi-4", "gpt-5-nano", "Llama3.3-70B", "Qwen2.5-7B", "Mixtral-8x7B",
             "Llama3.1-8B", "Qwen3-8B", "gpt-5.1", "Yi-34B", "gpt-4.1-mini", "Llama3.1-70B", "Qwen3-32B", "gpt-5-mini"]
    assert sorted(names, key=model_sort_key) == [
        "Llama3.1-8B", "Llama3.1-70B", "Llama3.3-70B", "Mixtral-8x7B", "Phi-4", "Qwen2.5-7B", "Qwen3-8B",
        "Qwen3-8Bnt", "Qwen3-32B", "Yi-34B", "gpt-4o-mini", "gpt-4.1-mini", "gpt-5-nano", "gpt-5-mini", "gpt-5",
        "gpt-5.1"]


def test_partitioned_api_source_names():
    cfg = parse_training_config("gpt-5_s0")
    assert (cfg.source_model, cfg.seed, cfg.finetuned) == ("gpt-5", 0, False)
    assert parse_training_config("gpt-4.1-mini_s2").source_model == "gpt-4.1-mini"


def test_the_analysis_metrics_carry_every_point_and_the_judge_agreement(tmp_path):
    from pipeline.analysis.run import AnalysisResult

    arm = {"r2": 0.5, "n_points": 2, "persistence": {}, "frontier": {
        "members": ["a"], "points": [{"name": "a", "safety": 2.0, "helpfulness": 1.5}]}}
    pair = {"a": "eval-q32", "b": "eval-gpt5m", "metrics": {"safe": {
        "n": 432, "kappa": 0.26, "kappa_quadratic": 0.49, "exact_agreement": 0.46}}}
    for agreement in ([], [pair]):
        res = AnalysisResult(out=tmp_path, summary={"arms": {"eval-q32": arm}, "judge_agreement": agreement},
                             summary_path=tmp_path / "summary.json")
        m = res.metrics()
        assert (m["eval-q32.point.a.safety"], m["eval-q32.point.a.helpfulness"]) == (2.0, 1.5)
        assert m.get("agreement.eval-q32-eval-gpt5m.safe.kappa") == (0.26 if agreement else None)
