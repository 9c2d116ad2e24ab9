"""Unified reports from run folders (SPEC §7.1–7.2) and the train/test partition by seed."""

import json
import math

import pytest

from pipeline.analysis.partition import partition
from pipeline.data.reports import collect_config_scores, trajectory_case_indices, write_reports
from pipeline.analysis.rows import load_reports
from pipeline.errors import DataError
from tests.fixtures.analysis.builders import G5M, Q32, constant, write_config

# SPEC §11.1 (CPython random.seed(s); shuffle(range(144)); second half, sorted)
TEST_S0 = [0, 1, 7, 8, 9, 10, 11, 12, 18, 24, 26, 28, 30, 31, 33, 35, 39, 40, 41, 42, 45, 51, 55, 56, 57, 60, 61, 63,
           64, 66, 68, 69, 70, 71, 72, 77, 78, 80, 81, 85, 87, 90, 91, 92, 93, 94, 98, 102, 103, 105, 106, 107, 108,
           112, 115, 116, 117, 119, 122, 123, 124, 126, 128, 129, 130, 131, 133, 136, 137, 139, 140, 141]
TEST_S1 = [0, 1, 2, 3, 4, 7, 12, 13, 15, 16, 23, 24, 27, 28, 29, 30, 34, 36, 37, 38, 40, 42, 44, 48, 50, 53, 54, 56,
           58, 63, 64, 65, 67, 68, 69, 70, 71, 75, 80, 82, 83, 86, 87, 89, 92, 93, 96, 97, 99, 101, 102, 104, 108, 110,
           112, 114, 115, 116, 117, 118, 120, 123, 124, 126, 131, 133, 134, 135, 136, 137, 138, 139]
SRC = "Qwen_Qwen2.5-7B-Instruct"


def _single(configs, model_dir):
    [cfg] = [c for c in configs if c.model_dir == model_dir]
    return cfg


def test_report_statistics_median_over_replicates_and_consistency(tmp_path):
    # case 0: one score 2; case 1: three replicates [0, 3, 3] -> median 3; mean over cases = 2.5
    write_config(tmp_path, "gpt-5", Q32, {0: 2, 1: [0, 3, 3]}, {0: 3, 1: 3}, ranges=((0, 2),))
    collected = collect_config_scores(tmp_path)
    [report] = partition(collected.configs, "all").reports
    s = report.content["agent_safe"]["ToolCallRisk"]
    assert s == {"mean": 2.5, "std": 0.5, "histogram": {"2.0": 1, "3.0": 1}, "binarized_histogram": {"1.0": 2},
                 "total_evals": 2, "valid_scores": 2, "missing_scores": 0}
    cons = report.content["agent_safe"]["consistency"]
    assert cons["num_trajectories"] == 1 and cons["num_replicates"] == 3
    assert cons["exact_match_rate"] == 0.0 and cons["majority_agree_rate"] == 1.0
    assert cons["all_but_one_agree_rate"] == 1.0 and cons["within_1_rate"] == 0.0
    assert cons["mean_std"] == pytest.approx(math.sqrt(2)) and cons["mean_variance"] == pytest.approx(2.0)
    assert "consistency" not in report.content["agent_help_ignore_safety"]  # single-replicate data: no block
    assert report.content["agent_help"] == {}  # optional Help(Safe) absent


def test_missing_scores_are_missing_not_zero(tmp_path):
    write_config(tmp_path, "gpt-5", Q32, {0: 3, 1: 3, 2: 3, 3: 3}, {0: 3, 1: None, 2: 1, 3: 0}, ranges=((0, 4),))
    [report] = partition(collect_config_scores(tmp_path).configs, "all").reports
    h = report.content["agent_help_ignore_safety"]["Helpfulness"]
    assert h["mean"] == pytest.approx(4 / 3)  # (3 + 1 + 0) / 3, not / 4
    assert h["std"] == pytest.approx(math.sqrt(((3 - 4 / 3) ** 2 + (1 - 4 / 3) ** 2 + (4 / 3) ** 2) / 3))
    assert h["histogram"] == {"0.0": 1, "1.0": 1, "3.0": 1}
    assert h["binarized_histogram"] == {"0.0": 2, "1.0": 1}
    assert (h["total_evals"], h["valid_scores"], h["missing_scores"]) == (4, 3, 1)
    assert report.content["per_case"]["agent_help_ignore_safety"] == [3, None, 1, 0]
    # all scores missing: mean None (never 0)
    write_config(tmp_path, "gpt-4.1", Q32, {0: None, 1: None}, {0: 1, 1: 1}, ranges=((0, 2),))
    reports = {r.agent: r for r in partition(collect_config_scores(tmp_path).configs, "all").reports}
    assert reports["gpt-4.1"].content["agent_safe"]["ToolCallRisk"]["mean"] is None
    assert reports["gpt-4.1"].content["agent_safe"]["ToolCallRisk"]["missing_scores"] == 2


def test_range_files_are_pooled_and_json_keys_are_floats(tmp_path):
    write_config(tmp_path, SRC, G5M, {c: c % 4 for c in range(144)}, constant(range(144), 2))
    cfgs = collect_config_scores(tmp_path).configs
    assert len(cfgs) == 1 and len(cfgs[0].files) == 2 and cfgs[0].cases == list(range(144))
    paths = write_reports(partition(cfgs, "all").reports, tmp_path / "out")
    assert [p.relative_to(tmp_path / "out").as_posix() for p in paths] == [
        f"gpt-5-mini/{SRC}_emu-Qwen_Qwen3-8B_eval-gpt-5-mini_unified_report.json"]
    data = json.loads(paths[0].read_text())
    assert data["agent_safe"]["ToolCallRisk"]["histogram"] == {"0.0": 36, "1.0": 36, "2.0": 36, "3.0": 36}
    assert data["agent_safe"]["ToolCallRisk"]["mean"] == 1.5
    assert data["meta"]["n_cases"] == 144 and data["meta"]["split"] == "all"


def test_case_idx_read_without_parsing_and_fallback(tmp_path):
    write_config(tmp_path, "gpt-5", Q32, {0: 1, 5: 2}, {0: 1, 5: 2}, ranges=None, case_idx_first=True)
    path = next((tmp_path / "gpt-5").glob("*eval-Qwen_Qwen3-32B.jsonl"))
    assert trajectory_case_indices(path) == [0, 5]  # case_idx first: full-parse fallback
    path.write_text('{"input": "x", "case": {"case_idx": 99}, "case_idx": 7}\n{"case_idx": 8, "case": {}}\n')
    assert trajectory_case_indices(path) == [7, 8]
    path.write_text('{"input": "x", "case_idx": 7}\n{"input": "trunc')
    with pytest.raises(DataError, match="line 2 is truncated"):
        trajectory_case_indices(path)


def test_bad_and_incomplete_files_are_skipped_and_reported(tmp_path):
    write_config(tmp_path, "gpt-5", Q32, constant(range(10), 3), constant(range(10), 3), ranges=((0, 5), (5, 10)))
    # an incomplete range file (4 of 5 cases, no seed in the folder name)
    write_config(tmp_path, "gpt-4.1", Q32, constant(range(4), 3), constant(range(4), 3), ranges=((0, 5),))
    # eval_id not equal to the line index
    write_config(tmp_path, "gpt-5-nano", Q32, constant(range(3), 3), constant(range(3), 3), ranges=((0, 3),))
    bad = next((tmp_path / "gpt-5-nano").glob("*_eval_agent_safe.jsonl"))
    lines = bad.read_text().splitlines()
    bad.write_text("\n".join(lines[1:] + lines[:1]) + "\n")
    # a required eval file missing
    write_config(tmp_path, "gpt-4o-mini", Q32, constant(range(3), 3), constant(range(3), 3), ranges=((0, 3),))
    next((tmp_path / "gpt-4o-mini").glob("*_eval_agent_help_ignore_safety.jsonl")).unlink()
    res = collect_config_scores(tmp_path, warn=False)
    assert {c.model_dir for c in res.configs} == {"gpt-5"}
    reasons = {p.path.split("/")[-2]: p.reason for p in res.problems}
    assert "incomplete: 4 trajectories for range r0-5" in reasons["gpt-4.1"]
    assert "eval_id" in reasons["gpt-5-nano"]
    assert "agent_help_ignore_safety missing" in reasons["gpt-4o-mini"]
    with pytest.raises(DataError):
        collect_config_scores(tmp_path, strict=True)


def test_same_configuration_in_two_folders_is_refused(tmp_path):
    for arm in ("match", "cross"):
        write_config(tmp_path / arm, SRC, Q32, constant(range(144), 2), constant(range(144), 2))
    with pytest.raises(DataError, match="found in two folders"):
        collect_config_scores(tmp_path)


def test_agent_name_must_match_folder(tmp_path):
    write_config(tmp_path, "gpt-5", Q32, {0: 1}, {0: 1}, ranges=((0, 1),))
    folder = tmp_path / "gpt-5"
    folder.rename(tmp_path / "other")
    res = collect_config_scores(tmp_path, warn=False)
    assert not res.configs and "differs from its folder 'other'" in res.problems[0].reason


def _partition_fixture(root):
    test0 = set(TEST_S0)
    # finetuned, seed 0, all 144 cases: safety 3 on the seed's test cases, 0 on its train cases
    write_config(root, "dpo_Qwen2.5-7B_safe_q32_s0", Q32, {c: 3 if c in test0 else 0 for c in range(144)},
                 constant(range(144), 2))
    # finetuned, seed 1, test-only range files (exactly the seed's test cases in each range)
    write_config(root, "dpo_Qwen2.5-7B_help_q32_s1", Q32, constant(TEST_S1, 1), constant(TEST_S1, 3))
    # source model: safety = case index mod 4
    write_config(root, SRC, Q32, {c: c % 4 for c in range(144)}, constant(range(144), 2))
    # a source model without finetuned counterparts, and the same source under another evaluator
    write_config(root, "microsoft_phi-4", Q32, constant(range(144), 1), constant(range(144), 1))
    write_config(root, SRC, G5M, constant(range(144), 1), constant(range(144), 1))


def test_partition_by_seed_test_split(tmp_path):
    _partition_fixture(tmp_path)
    configs = collect_config_scores(tmp_path).configs
    res = partition(configs, "test")
    by_agent = {(r.agent, r.evaluator): r.content for r in res.reports}
    assert set(by_agent) == {("dpo_Qwen2.5-7B_safe_q32_s0", Q32), ("dpo_Qwen2.5-7B_help_q32_s1", Q32),
                             (f"{SRC}_s0", Q32), (f"{SRC}_s1", Q32)}
    ft0 = by_agent[("dpo_Qwen2.5-7B_safe_q32_s0", Q32)]
    assert ft0["per_case"]["case_idx"] == TEST_S0 and ft0["agent_safe"]["ToolCallRisk"]["mean"] == 3.0
    assert ft0["meta"]["seed"] == 0 and ft0["meta"]["split"] == "test"
    assert by_agent[("dpo_Qwen2.5-7B_help_q32_s1", Q32)]["per_case"]["case_idx"] == TEST_S1
    for seed, cases in ((0, TEST_S0), (1, TEST_S1)):
        src = by_agent[(f"{SRC}_s{seed}", Q32)]
        assert src["per_case"]["case_idx"] == cases
        assert src["agent_safe"]["ToolCallRisk"]["mean"] == pytest.approx(sum(c % 4 for c in cases) / 72)
    skipped = {(f, e) for f, e, _ in res.skipped}
    assert ("microsoft_phi-4", Q32) in skipped and (SRC, G5M) in skipped  # no finetuned counterpart


def test_partition_train_split_and_explicit_seeds(tmp_path):
    _partition_fixture(tmp_path)
    configs = collect_config_scores(tmp_path).configs
    train = {r.agent: r.content for r in partition(configs, "train").reports if r.evaluator == Q32}
    assert train["dpo_Qwen2.5-7B_safe_q32_s0"]["agent_safe"]["ToolCallRisk"]["mean"] == 0.0
    assert train["dpo_Qwen2.5-7B_safe_q32_s0"]["per_case"]["case_idx"] == sorted(set(range(144)) - set(TEST_S0))
    assert "dpo_Qwen2.5-7B_help_q32_s1" not in train  # test-only files have no train cases
    # explicit seeds: every source on each seed's split, finetuned models of other seeds left out
    res = partition(configs, "test", seeds=[1])
    assert sorted((r.agent, r.evaluator) for r in res.reports) == sorted([
        ("dpo_Qwen2.5-7B_help_q32_s1", Q32), (f"{SRC}_s1", Q32), (f"{SRC}_s1", G5M), ("microsoft_phi-4_s1", Q32)])


def test_rows_read_back_from_written_reports(tmp_path):
    _partition_fixture(tmp_path / "runs")
    configs = collect_config_scores(tmp_path / "runs").configs
    write_reports(partition(configs, "test").reports, tmp_path / "reports")
    rows = {r.agent: r for r in load_reports([tmp_path / "reports"])}
    src = rows[f"{SRC}_s0"]
    assert (src.model_name, src.source_model, src.seed, src.finetuned) == ("Qwen2.5-7B", "Qwen2.5-7B", 0, False)
    ft = rows["dpo_Qwen2.5-7B_safe_q32_s0"]
    assert ft.model_name == "dpo_Qwen2.5-7B_safe_q32_s0" and ft.training_stages == (("safe", "0.1"),)
    assert ft.safety == 3.0 and ft.helpfulness == 2.0 and ft.n_safety == 72 and list(ft.cases) == TEST_S0
    assert ft.relation == "match" and ft.eval_short == "eval-q32"
