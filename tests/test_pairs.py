"""DPO pair building (SPEC §4): every rule on small synthetic run folders, the CLI, and the released data's counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.data.cases import load_named_case_set
from pipeline.data.jsonl import dumps
from pipeline.data import split
from pipeline.errors import ConfigError, DataError
from pipeline.preference import PairConfig, build_pair_set, filter_by_length, load_pairs, write_pair_set
from pipeline.preference.output import serialize_pairs
from pipeline.preference.render import completion_messages, strip_think
from tests.conftest import run_agentpipe

DEMO = load_named_case_set("demo")
KEYS = {"safe": "ToolCallRisk", "help_ignore_safety": "Helpfulness"}


# --------------------------------------------------------------------------------------------- synthetic runs
def action(tool: str, log: str, observation: str) -> list:
    return [[tool, "{}", log], [observation, "summary", "emulator raw log"]]


def finish(log: str) -> list:
    return [{"return_values": {"output": log.split("Final Answer:")[-1]}, "log": log, "type": "AgentFinish"}, ""]


def trajectory(case_idx: int, steps: list | None = None, **extra) -> dict:
    case = DEMO.cases[case_idx]
    steps = steps if steps is not None else [finish(f"I can do this directly.\nFinal Answer: done {case_idx}")]
    return {"input": case.instruction, "underspecifications": "", "risky_outcome": "", "risky_actions": "",
            "output": ": done", "intermediate_steps": steps, "case": case.to_json(), "case_idx": case_idx, **extra}


def eval_record(eval_id: int, key: str, score) -> dict:
    if isinstance(score, list):  # replicates
        return {"eval_id": eval_id, "replicates": [{"eval_scores": {key: s}} for s in score]}
    return {"eval_id": eval_id, "Overall Quantitative Score": str(score), "eval_scores": {key: score}}


def write_run(root: Path, model: str, cases: list[int], scores: dict[str, list], trajectories: list[dict] | None = None,
              start: int | None = None, end: int | None = None) -> Path:
    """One ranged trajectory file (range = the cases given) with an eval file per metric in ``scores``."""
    folder = root / model
    folder.mkdir(parents=True, exist_ok=True)
    start = cases[0] if start is None else start
    end = cases[-1] + 1 if end is None else end
    stem = f"{model}_emu-Qwen_Qwen3-8B_eval-judge_r{start}-{end}"
    trajs = trajectories or [trajectory(c) for c in cases]
    (folder / f"{stem}.jsonl").write_text("".join(dumps(t) + "\n" for t in trajs))
    for metric, values in scores.items():
        eval_type = "agent_safe" if metric == "safe" else f"agent_{metric}"
        lines = [eval_record(i, KEYS[metric], v) for i, v in enumerate(values)]
        (folder / f"{stem}_eval_{eval_type}.jsonl").write_text("".join(dumps(r) + "\n" for r in lines))
    return folder


def pairs_of(root: Path, **cfg) -> list[dict]:
    return build_pair_set([root], PairConfig(**cfg), case_set=DEMO).pairs


def models(pairs: list[dict]) -> list[tuple[str, str]]:
    return [(p["chosen_model"], p["rejected_model"]) for p in pairs]


@pytest.fixture
def five_models(tmp_path) -> Path:
    """Case 2 answered by five models with safety 3, 3, 1, 0, 2 and helpfulness 0, 3, 3, 3, 1 (load order a..e)."""
    root = tmp_path / "runs"
    for model, s, h in zip("abcde", [3, 3, 1, 0, 2], [0, 3, 3, 3, 1]):
        write_run(root, f"m_{model}", [2], {"safe": [s], "help_ignore_safety": [h]})
    return root


# ------------------------------------------------------------------------------------------------ pairing rules
def test_unordered_pairs_ties_gaps_and_min_chosen(five_models):
    pairs = pairs_of(five_models, metric="safe")
    # a-b tie; a-e, b-e, c-d, c-e gap 1: skipped. d-e: e (2) chosen over d (0).
    assert models(pairs) == [("m_a", "m_c"), ("m_a", "m_d"), ("m_b", "m_c"), ("m_b", "m_d"), ("m_e", "m_d")]
    assert [p["score_difference"] for p in pairs] == [2, 3, 2, 3, 2]
    assert all(p["chosen_score"] - p["rejected_score"] == p["score_difference"] for p in pairs)
    assert ("m_e", "m_d") not in models(pairs_of(five_models, metric="safe", min_chosen_score=3))
    loose = models(pairs_of(five_models, metric="safe", min_score_difference=1))
    assert ("m_a", "m_e") in loose and ("m_e", "m_c") in loose
    assert ("m_c", "m_d") not in loose  # chosen score 1 < min chosen 2
    assert len(pairs_of(five_models, metric="safe", min_score_difference=3)) == 2  # only the 3-0 gaps


def test_metric2_both_requires_same_direction_on_both_metrics(five_models):
    # help as metric 1: chosen must also be safer by >= 2 with safety >= 2.
    pairs = pairs_of(five_models, metric="help_ignore_safety", metric2="safe", mode="both")
    # help pairs (gap>=2, chosen>=2): b>a, c>a, d>a, b>e, c>e, d>e. Safety in the same direction by >= 2:
    # b(3)>a(3)? tie; c(1)>a(3)? no; d(0)? no; b(3)>e(2)? gap 1; c, d < e. -> none.
    assert pairs == []
    pairs = pairs_of(five_models, metric="safe", metric2="help_ignore_safety", mode="both")
    # safe pairs: a>c, a>d, b>c, b>d, e>d; help in the same direction by >=2 with chosen >= 2: none
    # (a has help 0; b ties c, d; e (1) < d (3)).
    assert pairs == []


def test_metric2_both_keeps_agreeing_pairs_and_records_both_scores(tmp_path):
    root = tmp_path / "runs"
    for model, s, h in [("m_a", 3, 3), ("m_b", 0, 0), ("m_c", 1, 3)]:
        write_run(root, model, [3], {"safe": [s], "help_ignore_safety": [h]})
    pairs = pairs_of(root, metric="help_ignore_safety", metric2="safe", mode="both")
    assert models(pairs) == [("m_a", "m_b")]
    p = pairs[0]
    assert (p["chosen_score"], p["rejected_score"], p["chosen_score2"], p["rejected_score2"]) == (3, 0, 3, 0)
    assert p["metric"] == "help_ignore_safety" and p["metric2"] == "safe" and p["mode"] == "both"


def test_metric2_average_applies_metric1_rules_first_study_quirk(tmp_path):
    root = tmp_path / "runs"
    # (safe, help) per model, one case. Pairs with safe as metric 1 and help as metric 2:
    rows = {"m_a": (3, 0), "m_b": (2, 3), "m_c": (0, 1), "m_d": (3, 2), "m_e": (1, 0)}
    for model, (s, h) in rows.items():
        write_run(root, model, [4], {"safe": [s], "help_ignore_safety": [h]})
    avg = models(pairs_of(root, metric="safe", metric2="help_ignore_safety", mode="average"))
    both = models(pairs_of(root, metric="safe", metric2="help_ignore_safety", mode="both"))
    # d>c: safe 3-0, averages 2.5 vs 0.5 -> gap 2, chosen 2.5: kept in average mode; help gap 1 fails 'both'.
    assert ("m_d", "m_c") in avg and ("m_d", "m_c") not in both
    # b vs c / b vs e: safe gap 2 and 1. b>c averages 2.5 vs 0.5: kept. b>e: safe gap 1 fails metric 1 first even
    # though the averages (2.5 vs 0.5) differ by 2 -- the quirk: not a pure average mode.
    assert ("m_b", "m_c") in avg and ("m_b", "m_e") not in avg
    # a>c: safe 3-0 but averages 1.5 vs 0.5 (gap 1): dropped.
    assert ("m_a", "m_c") not in avg
    assert set(avg) == {("m_d", "m_c"), ("m_b", "m_c"), ("m_d", "m_e")}
    assert set(both) == {("m_b", "m_c"), ("m_d", "m_e")}


def test_median_over_replicates_then_int_truncation(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "m_a", [2], {"safe": [[2, 3]]})  # median 2.5 -> 2
    write_run(root, "m_b", [2], {"safe": [[0, 0, 3]]})  # median 0
    write_run(root, "m_c", [2], {"safe": [[1, 1, 3]]})  # median 1
    pairs = pairs_of(root, metric="safe")
    assert models(pairs) == [("m_a", "m_b")]  # a-c: 2 vs 1, gap 1 after truncation (1.5 without it)
    assert pairs[0]["chosen_score"] == 2 and isinstance(pairs[0]["chosen_score"], int)


def test_consistency_filters_on_multi_replicate_records(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "m_a", [2], {"safe": [[3, 3, 3]]})  # all agree
    write_run(root, "m_b", [2], {"safe": [[0, 0, 1]]})  # majority / all-but-one agree
    write_run(root, "m_c", [2], {"safe": [[0, 1, 3]]})  # no agreement (median 1)
    write_run(root, "m_d", [2], {"safe": [[1, 0, 0, 1]]})  # 2 of 4: neither majority nor all-but-one
    assert models(pairs_of(root, metric="safe")) == [("m_a", "m_b"), ("m_a", "m_c"), ("m_a", "m_d")]
    assert models(pairs_of(root, metric="safe", consistency="exact_match")) == []  # only m_a survives
    assert models(pairs_of(root, metric="safe", consistency="majority_agree")) == [("m_a", "m_b")]
    assert models(pairs_of(root, metric="safe", consistency="all_but_one_agree")) == [("m_a", "m_b")]


def test_consistency_filter_needs_multi_replicate_data(five_models):
    with pytest.raises(DataError, match="needs multi-replicate"):
        pairs_of(five_models, metric="safe", consistency="majority_agree")


def test_missing_scores_skip_items_and_bad_scores_fail(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "m_a", [2], {"safe": [3]})
    write_run(root, "m_b", [2], {"safe": [0]})
    write_run(root, "m_c", [2], {"safe": [0]})
    path = next((root / "m_c").glob("*_eval_agent_safe.jsonl"))
    path.write_text(dumps({"eval_id": 0, "eval_scores": {}}) + "\n")  # a parse failure: no score
    result = build_pair_set([root], PairConfig(metric="safe"), case_set=DEMO)
    assert models(result.pairs) == [("m_a", "m_b")]
    assert result.stats["load"]["skipped_items"] == {"safe_missing_score": 1}
    path.write_text(dumps({"eval_id": 0, "eval_scores": {"ToolCallRisk": 5}}) + "\n")
    with pytest.raises(DataError, match="outside 0..3"):
        pairs_of(root, metric="safe")


def test_missing_eval_file_is_an_error_and_incomplete_files_are_skipped(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "m_a", [2, 3], {"safe": [3, 3]})
    write_run(root, "m_b", [2, 3], {"safe": [0, 0]})
    write_run(root, "m_c", [2], {"safe": [0]}, start=2, end=4)  # range r2-4 with one case: incomplete
    result = build_pair_set([root], PairConfig(metric="safe"), case_set=DEMO)
    assert len(result.pairs) == 2 and len(result.stats["load"]["incomplete_files_skipped"]) == 1
    with pytest.raises(DataError, match="missing eval file for agent_help_ignore_safety"):
        pairs_of(root, metric="help_ignore_safety")


def test_the_command_says_which_incomplete_files_it_skipped(tmp_path):
    """Skipping an incomplete trajectory file is the study's rule (SPEC §4.1), never silent: the command names it
    and counts it in its result."""
    root = tmp_path / "runs"
    write_run(root, "m_a", [2, 3], {"safe": [3, 3]})
    write_run(root, "m_b", [2, 3], {"safe": [0, 0]})
    write_run(root, "m_c", [2], {"safe": [0]}, start=2, end=4)
    result = tmp_path / "result.json"
    r = run_agentpipe("--result", str(result), "pairs", "--data-dir", str(root), "--metric", "safe", "--cases",
                      "demo", "--evaluator", "toy", "--out", str(tmp_path / "pairs"))
    assert r.returncode == 0, r.stderr
    assert "pairs: 1 incomplete trajectory file(s) skipped" in r.stderr and "m_c" in r.stderr
    data = json.loads(result.read_text())
    assert data["counts"]["incomplete_files_skipped"] == 1 and "m_c" in data["incomplete_files_skipped"][0]


def test_one_user_input_per_case(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "m_a", [2], {"safe": [3]})
    write_run(root, "m_b", [2], {"safe": [0]}, trajectories=[trajectory(2, input="something else")])
    with pytest.raises(DataError, match="user input differs"):
        pairs_of(root, metric="safe")


def test_seed_split_restricts_cases(tmp_path):
    root = tmp_path / "runs"
    cases = list(range(8))
    write_run(root, "m_a", cases, {"safe": [3] * 8})
    write_run(root, "m_b", cases, {"safe": [0] * 8})
    train = {p["case_idx"] for p in pairs_of(root, metric="safe", seed=0, split="train")}
    test = {p["case_idx"] for p in pairs_of(root, metric="safe", seed=0, split="test")}
    assert train == set(cases) & set(split.train_cases(0)) and test == set(cases) & set(split.test_cases(0))
    assert train and test and not train & test
    assert PairConfig(metric="safe", seed=0, split="train").name("q32") == "safe_q32_s0"
    assert PairConfig(metric="safe", seed=1, split="test").name("q32") == "safe_q32_s1_test"
    with pytest.raises(ConfigError, match="needs --seed"):
        PairConfig(metric="safe", split="train")


def test_pair_set_names():
    assert PairConfig(metric="help_ignore_safety").name("gpt5m") == "help_gpt5m"
    assert PairConfig(metric="help_ignore_safety", metric2="safe").name("q32") == "both_q32"
    assert PairConfig(metric="safe", metric2="help_ignore_safety").name("q32") == "safe-help_q32"
    assert PairConfig(metric="help_ignore_safety", metric2="safe", mode="average").name("q32") == "help-safe_q32_avg"
    assert PairConfig(metric="safe", min_score_difference=1, min_chosen_score=3,
                      consistency="exact_match").name("q32") == "safe_q32_msd1_mcs3_cons-exact"
    for bad in ({"metric": "nope"}, {"metric": "safe", "min_score_difference": 0},
                {"metric": "safe", "min_chosen_score": 4}, {"metric": "safe", "metric2": "safe"}):
        with pytest.raises(ConfigError):
            PairConfig(**bad)


# ---------------------------------------------------------------------------------------------------- rendering
def test_rendering_strips_thoughts_and_think_blocks_and_adds_observation_turns():
    steps = [
        action("Search", "<think>\nplan secretly\n</think>\nThought: I should search first.\nAction: Search",
               "<think>emulator musing</think>{\"hits\": 2}"),
        action("Delete", "Action: Delete\nAction Input: {}", "{\"ok\": true}"),
        finish("</think>  Thought: Both deleted.\nFinal Answer: done"),
    ]
    msgs, has_final = completion_messages(trajectory(2, steps))
    assert [m["role"] for m in msgs] == ["assistant", "user", "assistant", "user", "assistant"]
    assert msgs[0]["content"] == "I should search first.\nAction: Search"  # step 0: leading Thought: removed
    assert msgs[1]["content"] == 'Observation: {"hits": 2}'
    assert msgs[2]["content"] == "Thought: Action: Delete\nAction Input: {}"  # later steps start with Thought:
    assert msgs[3]["content"] == 'Observation: {"ok": true}'
    assert msgs[4]["content"] == "Thought: Both deleted.\nFinal Answer: done"
    assert has_final
    assert strip_think("a<THINK>x\ny</Think>b</think>") == "ab"


def test_rendering_end_rules():
    ends_with_observation = trajectory(2, [action("Search", "Action: Search", "{}")])
    with pytest.raises(DataError, match="ends with an observation"):
        completion_messages(ends_with_observation)
    stopped = {**ends_with_observation, "output": "Agent stopped: token limit exceeded"}
    msgs, has_final = completion_messages(stopped)
    assert msgs[-1]["role"] == "user" and not has_final
    _, has_final = completion_messages(trajectory(2, [finish("I give up.")]))
    assert not has_final  # kept, only counted
    with pytest.raises(DataError, match="no intermediate steps"):
        completion_messages(trajectory(2, []))


def test_pair_records_prompt_provenance_and_trl_format(five_models):
    pairs = pairs_of(five_models, metric="safe")
    p = pairs[0]
    assert [m["role"] for m in p["prompt"]] == ["system", "user"]
    assert p["prompt"][1]["content"].endswith("Thought: ")  # identical to the first agent call
    assert DEMO.cases[2].instruction in p["prompt"][1]["content"]
    assert p["chosen"][-1]["role"] == "assistant" and p["chosen"][0]["content"] == "I can do this directly.\n" \
        "Final Answer: done 2"
    assert {"case_idx", "chosen_model", "rejected_model", "chosen_file", "rejected_file", "chosen_line",
            "rejected_line", "chosen_score", "rejected_score", "score_difference", "metric", "evaluator"} <= set(p)
    assert p["chosen_file"].startswith("m_a_emu-") and p["chosen_line"] == 0 and p["evaluator"] == "runs"


def test_leakage_in_agent_text_is_rejected(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "m_a", [2], {"safe": [3]})
    leaky = trajectory(2, [finish("My Overall Quantitative Score is 3.\nFinal Answer: ok")])
    write_run(root, "m_b", [2], {"safe": [0]}, trajectories=[leaky])
    with pytest.raises(DataError, match="evaluation leakage"):
        pairs_of(root, metric="safe")


def test_length_filter_drops_long_pairs(five_models, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    pairs = pairs_of(five_models, metric="safe")
    n_prompt = len(tok.apply_chat_template(pairs[0]["prompt"], tokenize=True, add_generation_prompt=True)["input_ids"])
    kept, dropped = filter_by_length(pairs, tok, max_length=100_000, max_prompt_length=n_prompt)
    assert (len(kept), dropped) == (5, 0)
    kept, dropped = filter_by_length(pairs, tok, max_length=100_000, max_prompt_length=n_prompt - 1)
    assert (len(kept), dropped) == (0, 5)
    kept, dropped = filter_by_length(pairs, tok, max_length=n_prompt + 5, max_prompt_length=n_prompt)
    assert (len(kept), dropped) == (0, 5)  # completions push prompt+completion over max_length: dropped, not cut
    result = build_pair_set([five_models], PairConfig(metric="safe"), case_set=DEMO, tokenizer=tok,
                            max_prompt_length=n_prompt - 1)
    assert result.pairs == [] and result.stats["dropped_too_long"] == 5
    assert result.name == f"safe_runs_tok-tiny-llama_mpl{n_prompt - 1}"


def test_written_file_stats_and_readback(five_models, tmp_path):
    result = build_pair_set([five_models], PairConfig(metric="safe"), case_set=DEMO)
    path = write_pair_set(result, tmp_path / "out")
    assert path.name == "safe_runs.jsonl"
    assert path.read_text() == "".join(dumps(p) + "\n" for p in result.pairs) == serialize_pairs(result.pairs)
    assert load_pairs(path) == json.loads(json.dumps(result.pairs))
    stats = json.loads((tmp_path / "out" / "safe_runs.stats.json").read_text())
    assert stats["pairs"] == 5 and stats["pairs_per_case"] == {"2": 5}
    assert stats["score_gap_histogram"] == {"2": 3, "3": 2}
    assert stats["by_source_model"]["m_d"] == {"chosen": 0, "rejected": 3}
    assert stats["skipped_pairs"] == {"below_min_score_difference": 4, "no_difference": 1}
    assert json.loads((tmp_path / "out" / "safe_runs.jsonl.manifest.json").read_text())["status"] == "complete"


# ---------------------------------------------------------------------------------------------------------- CLI
def test_cli_pairs_writes_once_and_reports_bad_input(five_models, tmp_path, tiny_model):
    out = tmp_path / "pairs"
    args = ["pairs", "--data-dir", str(five_models), "--metric", "safe", "--cases", "demo", "--evaluator", "toy",
            "--out", str(out)]
    r = run_agentpipe(*args)
    assert r.returncode == 0, r.stderr
    assert "5 pairs over 1 cases" in r.stdout and (out / "safe_toy.jsonl").is_file()
    r = run_agentpipe(*args)
    assert r.returncode == 0 and "up to date" in r.stdout
    r = run_agentpipe(*args[:-2], "--seed", "0", "--out", str(out))  # case 2 is a train case of seed 0
    assert r.returncode == 0 and len(load_pairs(out / "safe_toy_s0.jsonl")) == 5
    r = run_agentpipe(*args, "--tokenizer", str(tiny_model), "--max-length", "100000")
    assert r.returncode == 0 and "0 dropped as too long" in r.stdout, r.stderr
    assert len(load_pairs(out / "safe_toy_tok-tiny-llama_ml100000.jsonl")) == 5
    for bad, fragment in [(["--metric", "help"], "missing eval file for agent_help"),
                          (["--metric", "safe", "--consistency", "exact_match"], "needs multi-replicate"),
                          (["--metric", "safe", "--split", "test"], "needs --seed")]:
        r = run_agentpipe("pairs", "--data-dir", str(five_models), *bad, "--cases", "demo", "--out", str(out))
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert lines[-1].startswith("agentpipe: error: ") and fragment in lines[-1], r.stderr
        assert "Traceback" not in r.stderr
    r = run_agentpipe("pairs", "--data-dir", str(tmp_path / "nope"), "--metric", "safe", "--out", str(out))
    assert r.returncode == 2 and r.stderr == f"agentpipe: error: --data-dir {tmp_path / 'nope'}: not a folder\n"


# ------------------------------------------------------------------------------------------- the released data
#: Pair counts on the study's released data (SPEC §10.1), all cases and each seed's train split:
#: {arm: {set: (all cases, seed 0 train, seed 1 train, seed 2 train)}}.
RELEASED_COUNTS = {
    "q32": {"safe": (11073, 6147, 5746, 5681), "help": (10151, 5461, 5118, 4840), "both": (1826, 1091, 969, 821)},
    "gpt5m": {"safe": (13380, 7132, 6734, 6762), "help": (12889, 6827, 6618, 6054),
              "both": (2735, 1514, 1480, 1335)},
}
RELEASED_SETS = {"safe": ("safe", None), "help": ("help_ignore_safety", None), "both": ("help_ignore_safety", "safe")}


@pytest.mark.parametrize("arm", ["q32", "gpt5m"])
def test_released_data_pair_counts(released_runs, data_dir, arm):
    from pipeline.preference import load_items

    case_set = load_named_case_set("toolemu", data_dir)
    items = load_items([released_runs / arm], ["help_ignore_safety", "safe"])
    assert items[1].items == 3888
    for label, (m1, m2) in RELEASED_SETS.items():
        got = []
        for seed in (None, 0, 1, 2):
            cfg = PairConfig(metric=m1, metric2=m2, seed=seed, split="all" if seed is None else "train")
            result = build_pair_set([released_runs / arm], cfg, case_set=case_set, items=items)
            assert result.name == f"{label}_{arm}" + ("" if seed is None else f"_s{seed}")
            if seed is not None:
                assert {p["case_idx"] for p in result.pairs} <= set(split.train_cases(seed))
            got.append(len(result.pairs))
        assert tuple(got) == RELEASED_COUNTS[arm][label], (label, got)


def test_released_data_cli_both_seed0(released_runs, tmp_path):
    r = run_agentpipe("pairs", "--data-dir", str(released_runs / "q32"), "--metric", "help_ignore_safety",
                      "--metric2", "safe", "--mode", "both", "--seed", "0", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    pairs = load_pairs(tmp_path / "both_q32_s0.jsonl")
    assert len(pairs) == RELEASED_COUNTS["q32"]["both"][1]
    assert all(p["chosen_score"] - p["rejected_score"] >= 2 and p["chosen_score2"] - p["rejected_score2"] >= 2
               and min(p["chosen_score"], p["chosen_score2"]) >= 2 for p in pairs)
    stats = json.loads((tmp_path / "both_q32_s0.stats.json").read_text())
    assert sum(stats["pairs_per_case"].values()) == len(pairs) and stats["load"]["items"] == 3888 - 72 * 27


def test_a_folder_judged_by_two_judges_is_refused_unless_one_is_chosen(five_models, tmp_path):
    """A trajectory evaluated by a second judge is stored again under that judge's name: pairing both would pair
    a trajectory with itself. `pairs` refuses and names the judges; --judge picks one."""
    import shutil

    one_judge = models(pairs_of(five_models, metric="safe"))
    for f in sorted(five_models.rglob("*eval-judge*.jsonl")):  # the same trajectories judged by "judge-b"
        shutil.copyfile(f, f.with_name(f.name.replace("eval-judge", "eval-judge-b")))
    out = tmp_path / "pairs"
    args = ["pairs", "--data-dir", str(five_models), "--metric", "safe", "--cases", "demo", "--evaluator", "toy",
            "--out", str(out)]
    r = run_agentpipe(*args)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"agentpipe: error: --data-dir {five_models}: evaluations by 2 judges (judge, judge-b); pairs take one "
        "judge's scores: choose one with --judge"]
    assert not out.exists()
    r = run_agentpipe(*args, "--judge", "judge-b")
    assert r.returncode == 0, r.stderr
    pairs = load_pairs(out / "safe_toy.jsonl")
    assert models(pairs) == one_judge and len(pairs) == 5  # as with one judge alone: no trajectory twice
    r = run_agentpipe(*args, "--judge", "judge-c", "--force")
    assert r.returncode == 2 and "--judge judge-c: no evaluations by that judge" in r.stderr
