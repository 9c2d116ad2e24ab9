import os

import pytest

from pipeline.data.naming import (
    EVAL_TYPES, RunFileName, expand_model_name, extract_seed, is_finetuned, nickname, parse_run_filename,
    sanitize_model_name, source_model,
)
from pipeline.errors import NamingError


def test_every_released_file_name_round_trips(released_runs):
    names = [f for _, _, files in os.walk(released_runs) for f in files]
    assert len(names) == 1620
    kinds = {"traj": 0, **{t: 0 for t in EVAL_TYPES}}
    for name in names:
        parsed = parse_run_filename(name)
        assert parsed.filename() == name
        assert parsed.timestamp is not None and parsed.case_range is not None
        kinds[parsed.eval_type or "traj"] += 1
    assert kinds == {"traj": 540, "agent_safe": 540, "agent_help_ignore_safety": 540, "agent_help": 0}


def test_parse_fields_of_a_study_name():
    n = parse_run_filename("Qwen_Qwen3-32B_emu-Qwen_Qwen3-8B_eval-gpt-5-mini_int4_r0-15_2601_161110"
                           "_eval_agent_help_ignore_safety.jsonl")
    assert (n.agent, n.emulator, n.evaluator, n.quantization) == ("Qwen_Qwen3-32B", "Qwen_Qwen3-8B", "gpt-5-mini", "int4")
    assert n.case_range == (0, 15) and n.timestamp == "2601_161110"
    assert n.eval_type == "agent_help_ignore_safety"
    assert n.trajectory().filename() == "Qwen_Qwen3-32B_emu-Qwen_Qwen3-8B_eval-gpt-5-mini_int4_r0-15_2601_161110.jsonl"


def test_project_names_are_deterministic():
    n = RunFileName("dpo_Qwen2.5-7B_safe_q32_s0", "Qwen_Qwen3-8B", "Qwen_Qwen3-32B", case_range=(0, 72))
    assert n.filename() == "dpo_Qwen2.5-7B_safe_q32_s0_emu-Qwen_Qwen3-8B_eval-Qwen_Qwen3-32B_r0-72.jsonl"
    assert n.eval_file("agent_safe").filename().endswith("_r0-72_eval_agent_safe.jsonl")
    assert n.report().filename() == "dpo_Qwen2.5-7B_safe_q32_s0_emu-Qwen_Qwen3-8B_eval-Qwen_Qwen3-32B_unified_report.json"
    assert parse_run_filename(n.filename()) == n


def test_temperature_eval_files_are_recognised_as_eval_files():
    n = RunFileName("a", "b", "c", case_range=(0, 5)).eval_file("agent_safe", temperature=0.3)
    assert n.filename() == "a_emu-b_eval-c_r0-5_eval_agent_safe_t0.3.jsonl"
    parsed = parse_run_filename(n.filename())
    assert parsed.eval_type == "agent_safe" and not parsed.is_trajectory_file


@pytest.mark.parametrize("bad", ["a_eval-b.jsonl", "a_emu-b.jsonl", "a_emu-b_eval-c_r12.jsonl",
                                 "a_emu-b_eval-c_r9-3.jsonl", "a_emu-b_eval-c.txt"])
def test_malformed_run_names_raise(bad):
    with pytest.raises(NamingError):
        parse_run_filename(bad)


@pytest.mark.parametrize("spec,expected", [
    ("Qwen/Qwen3-8B", "Qwen_Qwen3-8B"),
    ("gpt-5", "gpt-5"),
    ("dpo_merged/Llama3.1-8B_safe_q32_s0", "dpo_Llama3.1-8B_safe_q32_s0"),
    ("dpo_output/Qwen2.5-7B_help_gpt5m_s1/final", "dpo_Qwen2.5-7B_help_gpt5m_s1"),
    ("Qwen/Qwen2.5-7B-Instruct+dpo_output/Qwen2.5-7B_safe_q32_s0/final", "dpo_Qwen2.5-7B_safe_q32_s0"),
    ("Llama-8B+dpo_output/Llama3.1-8B_safe_q32_s0/recent_checkpoints/checkpoint-1600",
     "dpo_Llama3.1-8B_safe_q32_s0_1600"),
    ("Qwen3-8B+/tmp/my adapters/x", "_tmp_my_adapters_x"),
    ("runs/models/SmolLM2-135M_safe_demo_s0/merged", "dpo_SmolLM2-135M_safe_demo_s0"),
    ("SmolLM2-135M+/abs/runs/models/SmolLM2-135M_safe_demo_s0/adapter", "dpo_SmolLM2-135M_safe_demo_s0"),
])
def test_sanitize(spec, expected):
    assert sanitize_model_name(spec) == expected


def test_nicknames_and_sources():
    assert expand_model_name("Qwen3-8B") == "Qwen/Qwen3-8B"
    assert expand_model_name("Llama-8B+out/a") == "meta-llama/Llama-3.1-8B-Instruct+out/a"
    assert expand_model_name("some/unknown") == "some/unknown"
    assert nickname("meta-llama/Llama-3.1-8B-Instruct") == "Llama3.1-8B"  # the last nickname wins
    assert nickname("mistralai/Mixtral-8x7B-Instruct-v0.1") == "Mixtral-8x7B"
    assert nickname("Qwen/Qwen3-32B") == "Qwen3-32B"
    assert source_model("dpo_Llama-8B_int4_safe_s0") == "Llama3.1-8B"
    assert source_model("Qwen_Qwen2.5-7B-Instruct_s42") == "Qwen2.5-7B"
    assert source_model("dpo_Qwen2.5-7B_safe_q32_s0_help_q32_s0") == "Qwen2.5-7B"
    assert source_model("gpt-5-mini") == "gpt-5-mini"
    assert is_finetuned("dpo_x") and not is_finetuned("Qwen_Qwen3-8B")


def test_seed_extraction():
    assert extract_seed("dpo_Qwen2.5-7B_safe_q32_s0_help_q32_s0") == 0
    assert extract_seed("runs/models/x_s2/adapter") == 2
    assert extract_seed("Qwen_Qwen3-8B") is None
    with pytest.raises(NamingError, match="ambiguous seed .*_s0, _s1"):
        extract_seed("dpo_X_safe_q32_s0_help_q32_s1")
