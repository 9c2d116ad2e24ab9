"""DPO + LoRA training, merging, sequential finetuning, resume after a kill, MLflow tracking (SPEC §6)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.data import split
from pipeline.data.jsonl import dumps
from pipeline.errors import ConfigError, DataError, NamingError
from pipeline.data.manifest import read_manifest
from pipeline.training import TrainConfig, dataset_name, merge, model_name, train
from pipeline.cli import build_parser
from pipeline.cli_args import config_from_args
from pipeline.training.naming import base_nickname, is_both_dataset
from tests.conftest import run_agentpipe

DOWN = "http://127.0.0.1:9"  # nothing listens: MLflow unreachable
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # tiny models: threads only add contention


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    """Each test its own run home: nothing (e.g. the token cache) is shared with another test or session."""
    monkeypatch.setenv("AGENTPIPE_HOME", str(tmp_path / "home"))


@pytest.fixture(autouse=True)
def _one_torch_thread(request):
    import torch

    before = torch.get_num_threads()
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def toy_pair(case_idx: int, i: int = 0) -> dict:
    """A preference pair in trl's conversational format: ask for confirmation (chosen) vs act at once."""
    return {
        "prompt": [{"role": "system", "content": "You are a capable AI agent."},
                   {"role": "user", "content": f"Task {case_idx}.{i}: delete every file named test in my drive.\n"
                                               "Thought: "}],
        "chosen": [{"role": "assistant", "content": "Deleting files cannot be undone, so I will ask first.\n"
                                                    "Final Answer: Please confirm which files to delete."}],
        "rejected": [{"role": "assistant", "content": "Action: DriveDeleteFiles\nAction Input: {\"name\": \"test\"}"},
                     {"role": "user", "content": "Observation: {\"deleted\": 14}"},
                     {"role": "assistant", "content": "Thought: Done.\nFinal Answer: I deleted 14 files."}],
        "case_idx": case_idx,
    }


def write_pairs(path: Path, pairs: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(dumps(p) + "\n" for p in pairs))
    return path


@pytest.fixture(scope="module")
def toy_pairs(tmp_path_factory) -> Path:
    """8 pairs on train cases of seed 0 and 2 on its test cases (the validation set)."""
    d = tmp_path_factory.mktemp("pairs")
    pairs = [toy_pair(c) for c in split.train_cases(0)[:8]] + [toy_pair(c) for c in split.test_cases(0)[:2]]
    return write_pairs(d / "safe_toy.jsonl", pairs)


def tiny_cfg(model, pairs, out=None, **kw) -> TrainConfig:
    base = dict(model=str(model), pairs=str(pairs), seed=0, out=str(out) if out else None, batch_size=1,
                gradient_accumulation_steps=1, learning_rate=2e-3, warmup_ratio=0.0, logging_steps=1, save_steps=1000,
                tracking_uri=DOWN)
    return TrainConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------- names and config
def test_model_names_follow_the_study():
    assert model_name("Qwen/Qwen2.5-7B-Instruct", "safe_q32", 0) == "Qwen2.5-7B_safe_q32_s0"
    assert model_name("Llama3.1-8B", "help_gpt5m", 1, beta=0.05) == "Llama3.1-8B_help_gpt5m_beta-0.05_s1"
    assert model_name("Qwen2.5-7B", "both_q32", 2, quantization="int4", batch_size=2, max_length=4096) == \
        "Qwen2.5-7B_int4_both_q32_b-2_ml-4096_s2"
    assert model_name("runs/models/Llama3.1-8B_safe_q32_s0/merged", "help_q32", 0) == \
        "Llama3.1-8B_safe_q32_s0_help_q32_s0"
    assert model_name("dpo_merged/Qwen2.5-7B_help_q32_beta-0.05_s2", "safe_q32", 2, beta=0.05) == \
        "Qwen2.5-7B_help_q32_beta-0.05_s2_safe_q32_beta-0.05_s2"
    with pytest.raises(NamingError, match="ambiguous seed"):
        model_name("runs/models/Llama3.1-8B_safe_q32_s0/merged", "help_q32", 1)
    assert dataset_name("runs/pairs/safe_q32_s0.jsonl", 0) == "safe_q32"
    assert dataset_name("data/dpo_data/both_gpt5m.jsonl", 1) == "both_gpt5m"
    with pytest.raises(ConfigError, match="built for split seed 1"):
        dataset_name("runs/pairs/safe_q32_s1.jsonl", 0)
    with pytest.raises(ConfigError, match="test-split pair set"):
        dataset_name("runs/pairs/safe_q32_s0_test.jsonl", 0)
    assert is_both_dataset("both_q32") and is_both_dataset("help-safe_q32_avg") and not is_both_dataset("safe_q32")
    assert base_nickname("/somewhere/tiny-llama") == "tiny-llama" and base_nickname("SmolLM2-135M") == "SmolLM2-135M"


def test_config_defaults_file_and_flags(tmp_path):
    cfg = TrainConfig(model="m", pairs="p.jsonl", seed=0)
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules) == (16, 32, 0.05, "all-linear")
    assert (cfg.learning_rate, cfg.batch_size, cfg.gradient_accumulation_steps, cfg.num_epochs) == (5e-5, 1, 8, 1)
    assert (cfg.lr_scheduler, cfg.warmup_ratio, cfg.beta, cfg.max_length, cfg.precompute_ref_log_probs) == \
        ("cosine", 0.1, 0.1, 8192, None)
    assert (cfg.save_steps, cfg.save_total_limit, cfg.logging_steps) == (100, 2, 40)
    assert cfg.effective_eval_sample_size == 320  # logging steps x accumulation x batch
    (tmp_path / "c.yaml").write_text("lora-r: 8\nbeta: 0.05\nlora_target_modules: q_proj, v_proj\nseed: 3\n")

    def from_cli(*argv: str) -> TrainConfig:
        return config_from_args(TrainConfig, build_parser().parse_args(["train", *argv]))

    cfg = from_cli("--config", str(tmp_path / "c.yaml"), "--model", "m", "--pairs", "p.jsonl", "--seed", "1")
    assert (cfg.lora_r, cfg.beta, cfg.seed, cfg.lora_target_modules) == (8, 0.05, 1, ["q_proj", "v_proj"])
    assert "num_epochs" not in cfg.model_fields_set and "beta" in cfg.model_fields_set
    assert from_cli("--model", "m", "--pairs", "p", "-s", "2", "--dpo-beta", "0.05").beta == 0.05
    (tmp_path / "bad.json").write_text('{"lora_rank": 8}')
    with pytest.raises(ConfigError, match="unknown option 'lora_rank' for train"):
        from_cli("--spec", str(tmp_path / "bad.json"), "--model", "m", "--pairs", "p", "--seed", "0")
    with pytest.raises(ConfigError, match="--seed is required"):
        from_cli("--model", "m", "--pairs", "p")


def test_sampled_validation_is_deterministic_per_step():
    from pipeline.training.callbacks import sampled_indices

    assert sampled_indices(10, 320, 5) == list(range(10))
    a, b = sampled_indices(1000, 320, 40), sampled_indices(1000, 320, 80)
    assert a == sampled_indices(1000, 320, 40) and a != b and len(a) == 320 and a == sorted(a)


# ---------------------------------------------------------------------------------- DPO on the tiny model
def test_dpo_tiny_learns_saves_loads_and_merges(tiny_model, toy_pairs, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.llm import ChatRequest, GenerationConfig, get_backend

    out = tmp_path / "m"
    res = train(tiny_cfg(tiny_model, toy_pairs, out, max_steps=20, eval_sample_size=2, learning_rate=5e-4,
                         final_eval=True))
    assert res.global_step == 20 and not res.skipped
    hist = [h for h in res.metrics["log_history"] if "rewards/accuracies" in h]
    first, last = hist[0], hist[-1]
    assert [h["step"] for h in hist] == list(range(1, 21))
    # Step 1 is computed before any update: policy == reference, so rewards are 0.
    assert first["rewards/accuracies"] == 0.0 and first["rewards/margins"] == 0.0
    assert last["rewards/accuracies"] == 1.0 and last["rewards/margins"] > 1.0
    assert last["rewards/chosen"] - last["rewards/rejected"] == pytest.approx(last["rewards/margins"], rel=1e-4)
    assert last["loss"] < first["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert res.metrics["eval_rewards/accuracies"] == 1.0 and res.metrics["eval_rewards/margins"] > 0  # test cases
    print(f"\nDPO tiny: step 1 acc {first['rewards/accuracies']} margin {first['rewards/margins']:.3f} loss "
          f"{first['loss']:.4f} -> step 20 acc {last['rewards/accuracies']} margin {last['rewards/margins']:.3f} "
          f"loss {last['loss']:.4f}; validation acc {res.metrics['eval_rewards/accuracies']} margin "
          f"{res.metrics['eval_rewards/margins']:.3f}")

    cfg_doc = json.loads((out / "training_config.json").read_text())
    assert cfg_doc["test_case_indices"] == split.test_cases(0)
    assert cfg_doc["train_case_indices"] == split.train_cases(0)[:8] and cfg_doc["data_stats"]["val_pairs"] == 2
    assert cfg_doc["config"]["lora_r"] == 16 and cfg_doc["lineage"]["dataset"] == "safe_toy"
    journal = [json.loads(line) for line in (out / "tracking" / "train" / "journal.jsonl").read_text().splitlines()]
    logged = [op for op in journal if op["op"] == "metrics" and "rewards/margins" in op["metrics"]]
    assert [op["step"] for op in logged] == list(range(1, 21))
    assert {op["op"] for op in journal} >= {"start", "params", "artifact", "register_model", "end"}
    # Rerunning the same command is a no-op.
    assert train(tiny_cfg(tiny_model, toy_pairs, out, max_steps=20, eval_sample_size=2, learning_rate=5e-4,
                          final_eval=True)).skipped

    # The adapter loads as base+adapter through the LLM backends and changes the model.
    adapter = out / "adapter"
    backend = get_backend(f"{tiny_model}+{adapter}")
    [resp] = backend.generate([ChatRequest(messages=toy_pair(3)["prompt"], config=GenerationConfig(max_new_tokens=8))])
    assert resp.ok and resp.completion_tokens > 0
    tok = AutoTokenizer.from_pretrained(adapter)
    x = tok.apply_chat_template(toy_pair(3)["prompt"], tokenize=True, return_tensors="pt", return_dict=True)
    # Compared in float64: a float32 forward pass of this tiny random model alone is off by up to ~5e-4.
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64).eval()
    with torch.no_grad():
        base_logits = base(**x).logits
        peft_logits = PeftModel.from_pretrained(base, adapter).to(torch.float64).eval()(**x).logits
    assert (peft_logits - base_logits).abs().max() > 1e-2

    # Merge: a standalone model whose logits equal base+adapter.
    m = merge(adapter, tracking_uri=DOWN)
    assert m.out == out / "merged" and m.max_abs_logit_diff <= 1e-3 and m.max_abs_logit_diff_saved <= 1e-3
    merged = AutoModelForCausalLM.from_pretrained(m.out, dtype=torch.float64).eval()
    with torch.no_grad():
        merged_logits = merged(**x).logits
    diff = float((merged_logits - peft_logits).abs().max())
    assert diff <= 1e-3
    merge_cfg = json.loads((m.out / "merge_config.json").read_text())
    assert merge_cfg["source_model"] == str(Path(tiny_model).resolve()) and merge_cfg["adapter_config"]["r"] == 16
    assert merge_cfg["max_abs_logit_diff"] == m.max_abs_logit_diff and merge_cfg["verify_dtype"] == "float64"
    assert m.attempts == 1 and merge_cfg["merge_attempts"] == 1 and merge_cfg["failed_checks"] == []
    assert merge_cfg["dtype"] == "float32"  # the base's dtype
    assert (m.out / "tokenizer_config.json").is_file() and (m.out / "config.json").is_file()
    print(f"merge: max |logit diff| {m.max_abs_logit_diff:.2e} (in memory), {m.max_abs_logit_diff_saved:.2e} "
          f"(saved), {diff:.2e} (reloaded vs PeftModel)")
    # Rerunning the same merge is a no-op (a DAG retry or rerun); another adapter into that folder is refused.
    stamp = (m.out / "config.json").stat().st_mtime_ns
    again = merge(adapter, tracking_uri=DOWN)
    assert again.skipped and again.out == m.out and again.max_abs_logit_diff == m.max_abs_logit_diff
    assert (m.out / "config.json").stat().st_mtime_ns == stamp
    weights = adapter / "adapter_model.safetensors"  # an adapter retrained in place is not that merge
    trained = weights.read_bytes()
    weights.write_bytes(trained + b" ")
    with pytest.raises(ConfigError, match=r"made by a different merge configuration \(adapter_sha256 \"[0-9a-f]+\" → "):
        merge(adapter, tracking_uri=DOWN)
    weights.write_bytes(trained)
    (m.out / "manifest.json").unlink()  # a merged folder that records no merge fingerprint: refused, not guessed
    with pytest.raises(ConfigError, match="records no merge configuration.*--force"):
        merge(adapter, tracking_uri=DOWN)
    assert (m.out / "config.json").stat().st_mtime_ns == stamp
    redone = merge(adapter, tracking_uri=DOWN, force=True)  # with --force: kept aside, merged again
    assert not redone.skipped and len(list(m.out.parent.glob("merged.replaced-*"))) == 1
    assert (m.out / "manifest.json").is_file()
    other = shutil.copytree(adapter, tmp_path / "other" / "adapter")
    with pytest.raises(ConfigError, match=r"made by a different merge configuration \(adapter \".*/adapter\" → "
                       r"\".*/other/adapter\"\); .*--force"):
        merge(other, m.out, tracking_uri=DOWN)

    # Sequential finetuning: a second stage on the merged model, same seed; 'both' data trains 3 epochs.
    both = write_pairs(tmp_path / "both_toy_s0.jsonl", [toy_pair(c) for c in split.train_cases(0)[8:12]])
    res2 = train(tiny_cfg(m.out, both, gradient_accumulation_steps=2, beta=0.05, final_eval=False),
                 home=tmp_path / "home")
    assert res2.name == "tiny-llama_safe_toy_s0_both_toy_beta-0.05_s0"
    cfg2 = json.loads((res2.out / "training_config.json").read_text())
    assert cfg2["effective_epochs"] == 3 and res2.global_step == 6  # 4 pairs / (1 x 2) x 3 epochs
    assert cfg2["lineage"]["stage"] == "2" and cfg2["lineage"]["base_model"] == str(tiny_model)
    assert res2.out.parent == tmp_path / "home" / "models"
    with pytest.raises(NamingError, match="ambiguous seed"):
        train(tiny_cfg(m.out, write_pairs(tmp_path / "help_toy.jsonl", [toy_pair(5)]), seed=1))


def test_sequential_names_read_back_from_a_project_model_folder(tiny_model, toy_pairs, tmp_path):
    home = tmp_path / "home"
    res = train(tiny_cfg(tiny_model, toy_pairs, max_steps=2, final_eval=False, register_model=False),
                home=home)
    assert res.name == "tiny-llama_safe_toy_s0" and res.out == home / "models" / "tiny-llama_safe_toy_s0"
    m = merge(res.out, tracking_uri=DOWN)  # a model folder stands for its adapter/
    assert m.out == res.out / "merged"
    help_pairs = write_pairs(tmp_path / "help_toy_s0.jsonl", [toy_pair(c) for c in split.train_cases(0)[:2]])
    res2 = train(tiny_cfg(m.out, help_pairs, max_steps=1, final_eval=False, register_model=False),
                 home=home)
    assert res2.name == "tiny-llama_safe_toy_s0_help_toy_s0"
    assert json.loads((res2.out / "training_config.json").read_text())["lineage"]["parent_model"] == res.name
    # merge journals a nested run under the training run
    merge_journal = (res.out / "tracking" / "merge" / "journal.jsonl").read_text().splitlines()
    assert json.loads(merge_journal[0])["parent_folder"] == "../train"


def test_a_finished_model_is_skipped_and_one_whose_adapter_is_gone_is_trained_again(tiny_model, toy_pairs, tmp_path):
    cfg = tiny_cfg(tiny_model, toy_pairs, tmp_path / "m", max_steps=1, register_model=False)
    first = train(cfg)
    assert not first.skipped and read_manifest(first.out)["status"] == "complete"
    # no validation pass unless asked (--final-eval): the pairs file has validation pairs, none was scored
    assert not cfg.final_eval and not [k for k in first.metrics if k.startswith("eval_")]
    assert train(cfg).skipped
    shutil.rmtree(first.adapter)  # the manifest says complete, but the model is not there: not taken as done
    again = train(cfg)
    assert not again.skipped and (again.adapter / "adapter_config.json").is_file()
    assert read_manifest(first.out)["status"] == "complete"


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_are_one_line_errors(tiny_model, tiny_adapter, toy_pairs, tmp_path):
    empty = write_pairs(tmp_path / "empty.jsonl", [])
    r = run_agentpipe("train", "--model", str(tiny_model), "--pairs", str(empty), "--seed", "0",
                      "--out", str(tmp_path / "o"), env=ONE_THREAD)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("agentpipe: error: ")
    assert "empty pair set" in r.stderr and "Traceback" not in r.stderr
    r = run_agentpipe("merge", "--adapter", str(tmp_path / "no-such-adapter"), env=ONE_THREAD)
    assert r.returncode == 2 and "no LoRA adapter there" in r.stderr and "Traceback" not in r.stderr
    # A base model whose shapes do not fit the adapter.
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    other = tmp_path / "other-base"
    cfg = AutoConfig.from_pretrained(tiny_model)
    cfg.hidden_size, cfg.intermediate_size = 64, 128
    LlamaForCausalLM(cfg).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(other)
    with pytest.raises(ConfigError, match="does not fit base model"):
        merge(tiny_adapter, tmp_path / "merged", base=str(other), tracking_uri=DOWN)
    assert not (tmp_path / "merged").exists()
    only_test = write_pairs(tmp_path / "safe_t.jsonl", [toy_pair(c) for c in split.test_cases(0)[:2]])
    with pytest.raises(DataError, match="no training pairs for seed 0"):
        train(tiny_cfg(tiny_model, only_test, tmp_path / "o2"))
    assert not (tmp_path / "o2").exists()  # input checks come before the folder is claimed
    leaky_val = write_pairs(tmp_path / "val.jsonl", [toy_pair(split.train_cases(0)[0])])
    with pytest.raises(DataError, match="validation pairs of train cases"):
        train(tiny_cfg(tiny_model, toy_pairs, tmp_path / "o4", val_pairs=str(leaky_val)))
    assert not (tmp_path / "o4").exists()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    for force in (False, True):  # a file where the model folder would go is refused, and never moved aside
        with pytest.raises(ConfigError, match="a file, not an output folder of train"):
            train(tiny_cfg(tiny_model, toy_pairs, a_file, force=force))
    assert a_file.read_text() == "mine" and not list(tmp_path.glob("notes.txt.replaced-*"))
    with pytest.raises(ConfigError, match="not a model folder"):
        train(tiny_cfg(tmp_path / "missing-model", toy_pairs, tmp_path / "o5"))


def test_trained_parent_without_a_readable_training_config_is_refused(tiny_model, toy_pairs, tmp_path):
    """A merged parent's lineage comes from its training_config.json: missing or corrupt, train and merge refuse
    naming the file (train used to call the second stage "stage 1", merge recorded no lineage)."""
    home = tmp_path / "home"
    res = train(tiny_cfg(tiny_model, toy_pairs, max_steps=1, final_eval=False, register_model=False), home=home)
    merged = merge(res.out, tracking_uri=DOWN).out
    help_pairs = write_pairs(tmp_path / "help_toy_s0.jsonl", [toy_pair(c) for c in split.train_cases(0)[:2]])
    config = res.out / "training_config.json"
    good = config.read_text()

    def refused(argv: tuple[str, ...], expected: str) -> None:
        before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
        r = run_agentpipe(*argv, env=ONE_THREAD)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert lines[0].startswith(f"agentpipe: error: {config}: {expected}"), r.stderr
        assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before  # nothing written

    train_argv = ("train", "--model", str(merged), "--pairs", str(help_pairs), "--seed", "0", "--max-steps", "1",
                  "--out", str(tmp_path / "stage2"), "--tracking-uri", DOWN, "--no-register-model")
    merge_argv = ("merge", "--adapter", str(res.out / "adapter"), "--out", str(tmp_path / "merged2"),
                  "--tracking-uri", DOWN)
    config.write_text(good[: len(good) // 2])  # truncated
    refused(train_argv, "unreadable training config (JSONDecodeError")
    refused(merge_argv, "unreadable training config (JSONDecodeError")
    config.write_text("[]")
    refused(train_argv, "expected a JSON object, got list")
    config.unlink()
    refused(train_argv, "missing;")
    refused(merge_argv, "missing;")
    config.write_text(good)  # restored: the second stage trains, with the parent's lineage
    r = run_agentpipe(*train_argv, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    lineage = json.loads((tmp_path / "stage2" / "training_config.json").read_text())["lineage"]
    assert lineage["stage"] == "2" and lineage["base_model"] == str(tiny_model) and lineage["parent_model"] == res.name


def test_merge_with_a_corrupt_adapter_config_is_one_line(tiny_adapter, tmp_path):
    adapter = shutil.copytree(tiny_adapter, tmp_path / "lora")
    for content, expected in ((b'{"base_model_name_or_path": ', "unreadable adapter config (JSONDecodeError"),
                              (b"\xff\xfe{", "unreadable adapter config (UnicodeDecodeError"),
                              (b'["r", 8]', "expected a JSON object, got list")):
        (adapter / "adapter_config.json").write_bytes(content)
        r = run_agentpipe("merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged"),
                          "--tracking-uri", DOWN, env=ONE_THREAD)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert lines[0].startswith(f"agentpipe: error: {adapter / 'adapter_config.json'}: {expected}"), r.stderr
        assert not (tmp_path / "merged").exists()

def test_a_merge_that_fails_its_check_once_is_merged_again_and_twice_is_refused(tiny_adapter, tmp_path, monkeypatch,
                                                                                caplog, capsys):
    """The merged model's forward pass is disturbed on the first merge only (as once seen on CI): the merge is done
    again from the start, passes, says so and records the failure. Disturbed on every merge: refused, nothing
    saved."""
    from pipeline.cli import main
    from pipeline.training import merging

    real_logits, real_load, merged_calls, loads = merging._logits, merging._load_base, [], []

    def disturbed(every: bool):
        def logits(model, inputs):
            out = real_logits(model, inputs)
            if type(model).__name__.startswith("Peft"):  # base+adapter: the reference
                return out
            merged_calls.append(model)
            first_model = merged_calls[0] is model  # the first merge's model: its check and its recheck
            return out + 0.2 if every or first_model else out
        return logits

    def load(*args):
        loads.append(args)
        return real_load(*args)

    monkeypatch.setattr(merging, "_load_base", load)
    monkeypatch.setattr(merging, "_logits", disturbed(every=False))
    with caplog.at_level("WARNING", logger="pipeline.training"):
        assert main(["merge", "--adapter", str(tiny_adapter), "--out", str(tmp_path / "merged"), "--tracking-uri",
                     DOWN, "--no-register-model"]) == 0
    assert len(loads) == 2  # from the start: the base loaded again
    cfg = json.loads((tmp_path / "merged" / "merge_config.json").read_text())
    assert cfg["merge_attempts"] == 2 and cfg["max_abs_logit_diff"] <= 1e-3 and cfg["max_abs_logit_diff_saved"] <= 1e-3
    assert [round(f["diff"], 6) for f in cfg["failed_checks"]] == [0.2] and cfg["failed_checks"][0]["recheck"] > 0.1
    assert read_manifest(tmp_path / "merged")["counts"]["merge_attempts"] == 2
    assert "merged 2 times, 1 failing the check" in capsys.readouterr().out
    assert "merging again from the start (attempt 2 of 2)" in caplog.text

    merged_calls.clear(), loads.clear()
    monkeypatch.setattr(merging, "_logits", disturbed(every=True))
    with pytest.raises(DataError, match=r"by more than 0\.001 in each of 2 merges: 2\.00e-01 \(recheck 2\.00e-01\), "
                                        r"2\.00e-01 \(recheck 2\.00e-01\); not saved"):
        merge(tiny_adapter, tmp_path / "merged2", tracking_uri=DOWN, register_model=False)
    assert not (tmp_path / "merged2").exists() and len(loads) == 2


# ------------------------------------------------------------------------------------------------ tracking
def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_mlflow_down_training_succeeds_and_sync_replays(tiny_model, toy_pairs, tmp_path, mlflow_server):
    out = tmp_path / "m"
    res = train(tiny_cfg(tiny_model, toy_pairs, out, max_steps=4, tracking_uri=DOWN, eval_sample_size=2,
                         final_eval=True))
    assert res.global_step == 4 and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert res.mlflow_run_id is None and (out / "tracking" / "train" / "journal.jsonl").is_file()
    r = run_agentpipe("track", "sync", str(out), "--tracking-uri", mlflow_server)
    assert r.returncode == 0, r.stdout + r.stderr
    state = json.loads((out / "tracking" / "train" / "sync_state.json").read_text())
    run_id = state["targets"][mlflow_server]["run_id"]
    c = _client(mlflow_server)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-llama_safe_toy_s0"
    assert run.data.params["lora_r"] == "16" and run.data.params["data.train_pairs"] == "8"
    assert run.data.params["pairs_sha256"] and run.data.tags["dataset"] == "safe_toy"
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert [m.step for m in c.get_metric_history(run_id, key)] == [1, 2, 3, 4], key
    assert "eval_rewards/accuracies" in run.data.metrics
    assert {f.path for f in c.list_artifacts(run_id, "adapter")} >= {"adapter/adapter_model.safetensors"}
    # one registered model per source model and configuration family; the version carries the lineage
    [version] = [v for v in c.search_model_versions("name = 'tiny-llama_safe_toy'") if v.run_id == run_id]
    assert version.tags["kind"] == "adapter" and version.tags["seed"] == "0" and version.tags["beta"] == "0.1"
    assert version.tags["base_model"] == str(tiny_model) and version.tags["dataset"] == "safe_toy"
    assert version.tags["model_name"] == "tiny-llama_safe_toy_s0" and version.tags["stage"] == "1"
    assert c.get_model_version_by_alias("tiny-llama_safe_toy", "latest-adapter").version == version.version
    # max_steps=4 is not the study's configuration: no paper-config alias
    assert "paper-config" not in c.get_registered_model("tiny-llama_safe_toy").aliases
    card = (out / "adapter" / "README.md").read_text()
    assert f"base_model: {tiny_model}" in card and "safe_toy" in card and "| max_steps | 4 |" in card
    assert "| train_loss |" in card and "Not evaluated yet" in card
    # Merging while MLflow is down journals a nested run; the next sync sends it under the training run.
    m = merge(out, tracking_uri=DOWN)
    r = run_agentpipe("track", "sync", str(out), "--tracking-uri", mlflow_server)
    assert r.returncode == 0 and "0 sent now" in r.stdout, r.stdout
    assert len(c.get_metric_history(run_id, "loss")) == 4
    merge_state = json.loads((out / "tracking" / "merge" / "sync_state.json").read_text())
    merge_run = c.get_run(merge_state["targets"][mlflow_server]["run_id"])
    assert merge_run.data.tags["mlflow.parentRunId"] == run_id and merge_run.info.status == "FINISHED"
    assert merge_run.data.metrics["max_abs_logit_diff"] == m.max_abs_logit_diff <= 1e-3
    merged_versions = [v for v in c.search_model_versions("name = 'tiny-llama_safe_toy'")
                       if v.run_id == merge_run.info.run_id]
    assert [v.tags["kind"] for v in merged_versions] == ["merged"] and merged_versions[0].tags["path"] == str(m.out)
    # the merged version's source is the weights (the run's "model" artifact), not the merge's config file
    assert merged_versions[0].source == f"runs:/{merge_run.info.run_id}/model"
    assert {"model/model.safetensors", "model/config.json", "model/README.md"} <= \
           {f.path for f in c.list_artifacts(merge_run.info.run_id, "model")}
    assert c.get_model_version_by_alias("tiny-llama_safe_toy", "latest-merged").version == merged_versions[0].version
    assert "base_model:" in (m.out / "README.md").read_text()


_DRIVER = """
import sys, time
from transformers import TrainerCallback
from pipeline.training import TrainConfig, train

class Slow(TrainerCallback):  # keeps the run alive long enough to be killed between checkpoints
    def on_step_end(self, args, state, control, **kw):
        time.sleep(0.4)

cfg = TrainConfig(**{cfg!r})
train(cfg, callbacks=[Slow()])
"""


def test_killed_training_resumes_from_its_checkpoint_into_the_same_mlflow_run(tiny_model, toy_pairs, tmp_path,
                                                                                mlflow_server):
    out = tmp_path / "m"
    cfg = dict(model=str(tiny_model), pairs=str(toy_pairs), seed=0, out=str(out), batch_size=1,
               gradient_accumulation_steps=1, learning_rate=1e-3, warmup_ratio=0.0, logging_steps=1, save_steps=3,
               max_steps=12, max_length=1024, final_eval=False, tracking_uri=mlflow_server)
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(_DRIVER.format(cfg=cfg)))
    env = {**os.environ, **ONE_THREAD}
    log = tmp_path / "driver.log"
    with open(log, "w") as log_fh:
        proc = subprocess.Popen([sys.executable, str(driver)], stdout=log_fh, stderr=subprocess.STDOUT, env=env,
                                cwd=tmp_path)
    from pipeline.training.dpo import last_checkpoint

    deadline = time.monotonic() + 180
    while last_checkpoint(out / "checkpoints") is None:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint after 180 s"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = json.loads((last_checkpoint(out / "checkpoints") / "trainer_state.json").read_text())["global_step"]
    assert 3 <= killed_at < 12 and not (out / "adapter").exists()
    state = json.loads((out / "tracking" / "train" / "sync_state.json").read_text())
    run_id = state["targets"][mlflow_server]["run_id"]
    assert _client(mlflow_server).get_run(run_id).info.status == "RUNNING"
    # Resuming with another split is refused (the interrupted run's split is in training_config.json).
    r = run_agentpipe("train", "--model", str(tiny_model), "--pairs", str(toy_pairs), "--seed", "1", "--out", str(out),
                      "--tracking-uri", DOWN, env=ONE_THREAD)
    assert r.returncode == 2 and "made by a different train configuration" in r.stderr, r.stderr[-2000:]
    assert "seed 0 → 1" in r.stderr and r.stderr.count("\n") == 1

    r = run_agentpipe("train", "--model", str(tiny_model), "--pairs", str(toy_pairs), "--seed", "0", "--out", str(out),
                      "--batch-size", "1", "--gradient-accumulation-steps", "1", "--learning-rate", "1e-3",
                      "--warmup-ratio", "0", "--logging-steps", "1", "--save-steps", "3", "--max-steps", "12",
                      "--max-length", "1024", "--no-final-eval", "--tracking-uri", mlflow_server, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from checkpoint-{killed_at}" in r.stdout and run_id in r.stdout
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert metrics["global_step"] == 12 and metrics["resumed_from"] == f"checkpoint-{killed_at}"
    assert metrics["mlflow_run_id"] == run_id
    c = _client(mlflow_server)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_checkpoint"] == f"checkpoint-{killed_at}"
    steps = {m.step for m in c.get_metric_history(run_id, "rewards/margins")}
    assert steps == set(range(1, 13))
    runs = c.search_runs([run.info.experiment_id], filter_string=f"attributes.run_name = '{run.info.run_name}'")
    assert [x.info.run_id for x in runs if x.data.tags.get("agentpipe.journal") == str(out / "tracking" / "train")] \
        == [run_id]


_PREEMPT_DRIVER = """
import sys, time
from transformers import TrainerCallback
from pipeline.training import Preempted, TrainConfig, train

class Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        time.sleep(0.3)

try:
    train(TrainConfig(**{cfg!r}), callbacks=[Slow()])
except Preempted as e:
    print("PREEMPTED", e)
    sys.exit(e.exit_code)
"""


def test_sigterm_saves_a_checkpoint_at_the_current_step_and_the_rerun_finishes(tiny_model, toy_pairs, tmp_path):
    out = tmp_path / "m"
    cfg = dict(model=str(tiny_model), pairs=str(toy_pairs), seed=0, out=str(out), batch_size=1,
               gradient_accumulation_steps=1, learning_rate=1e-3, warmup_ratio=0.0, logging_steps=1, save_steps=1000,
               max_steps=30, final_eval=False, tracking_uri=DOWN)
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(_PREEMPT_DRIVER.format(cfg=cfg)))
    log = tmp_path / "driver.log"
    journal = out / "tracking" / "train" / "journal.jsonl"
    with open(log, "w") as log_fh:
        proc = subprocess.Popen([sys.executable, str(driver)], stdout=log_fh, stderr=subprocess.STDOUT,
                                env={**os.environ, **ONE_THREAD}, cwd=tmp_path)
    deadline = time.monotonic() + 180
    while not (journal.is_file() and '"step": 2' in journal.read_text()):  # two optimizer steps done
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # what Slurm sends on pre-emption / scancel
    assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
    assert "PREEMPTED" in log.read_text()
    from pipeline.training.dpo import last_checkpoint

    ckpt = last_checkpoint(out / "checkpoints")
    stopped = json.loads((ckpt / "trainer_state.json").read_text())["global_step"]
    assert 2 <= stopped < 30  # saved at the step it was stopped, not at a save_steps multiple
    assert json.loads(journal.read_text().splitlines()[-1])["status"] == "KILLED"
    res = train(TrainConfig(**cfg))
    assert res.global_step == 30 and res.resumed_from == f"checkpoint-{stopped}"


# ---------------------------------------------------------------------------------- a real small model
@pytest.mark.slow
def test_smollm2_trains_on_study_pairs_merges_and_generates(smollm2_model, released_runs, data_dir, tmp_path):
    from transformers import AutoTokenizer

    from pipeline.data.cases import load_named_case_set
    from pipeline.llm import ChatRequest, GenerationConfig, get_backend
    from pipeline.preference import PairConfig, build_pair_set, filter_by_length

    result = build_pair_set([released_runs / "q32"], PairConfig(metric="help_ignore_safety", metric2="safe",
                                                                seed=0, split="train"),
                            case_set=load_named_case_set("toolemu", data_dir))
    # The agent prompt alone is ~800 SmolLM2 tokens; a CPU step on the full pair takes ~20 s. Keep the study's
    # structure but cut each message to its last 400 characters (the prompt keeps the user input and "Thought: ").
    cut = [{**p, **{k: [{**m, "content": m["content"][-400:]} for m in p[k]] for k in ("prompt", "chosen", "rejected")}}
           for p in result.pairs[:50]]
    tok = AutoTokenizer.from_pretrained(smollm2_model)
    kept, dropped = filter_by_length(cut, tok, max_length=320, max_prompt_length=160)
    assert len(kept) >= 4 and dropped > 0
    pairs = write_pairs(tmp_path / "both_q32_s0.jsonl", kept[:4])
    res = train(TrainConfig(model=str(smollm2_model), pairs=str(pairs), seed=0, out=str(tmp_path / "m"), max_steps=3,
                            gradient_accumulation_steps=1, learning_rate=1e-4, warmup_ratio=0.0, logging_steps=1,
                            max_length=320, max_prompt_length=160, tracking_uri=DOWN))
    assert res.global_step == 3 and res.name == "SmolLM2-135M-Instruct_both_q32_ml-320_s0"
    assert all(h["loss"] > 0 for h in res.metrics["log_history"] if "loss" in h)
    m = merge(res.adapter, tracking_uri=DOWN)
    assert m.max_abs_logit_diff <= 1e-3
    backend = get_backend(str(m.out))
    [resp] = backend.generate([ChatRequest(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                           config=GenerationConfig(max_new_tokens=12))])
    assert resp.ok and resp.text.strip()
    print(f"\nSmolLM2: losses {[round(h['loss'], 4) for h in res.metrics['log_history'] if 'loss' in h]}; merged "
          f"max |logit diff| {m.max_abs_logit_diff:.2e} ({m.verify_dtype}), {m.max_abs_logit_diff_saved:.2e} saved; "
          f"says {resp.text!r}")


def test_registry_families_paper_config_and_model_card_scores(tmp_path):
    from pipeline.training import TrainConfig
    from pipeline.training.registry import (aliases, is_paper_config, record_test_scores, registry_family,
                                            write_model_card)

    assert registry_family("Qwen2.5-7B_safe_q32_s0") == "Qwen2.5-7B_safe_q32"
    assert registry_family("Llama3.1-8B_help_gpt5m_beta-0.05_s1") == "Llama3.1-8B_help_gpt5m"
    assert registry_family("Qwen2.5-7B_safe_q32_s0_help_q32_s0") == "Qwen2.5-7B_safe_q32_help_q32"
    assert registry_family("Qwen2.5-7B_int4_both_gpt5m_s12") == "Qwen2.5-7B_int4_both_gpt5m"
    base = {"model": "m", "pairs": "safe_q32_s0.jsonl", "seed": 0}
    assert is_paper_config(TrainConfig(**base).model_dump(mode="json"))
    assert is_paper_config(TrainConfig(**{**base, "seed": 2}, logging_steps=5, out="x").model_dump(mode="json"))
    for change in ({"beta": 0.05}, {"max_steps": 4}, {"lora_r": 8}, {"quantization": "int4"}):
        assert not is_paper_config(TrainConfig(**base, **change).model_dump(mode="json")), change
    assert aliases("adapter", True) == ["latest-adapter", "paper-config"]
    assert aliases("merged", False) == ["latest-merged"]
    # a test-split report fills in the cards' scores
    model = tmp_path / "tiny_safe_toy_s0"
    (model / "adapter").mkdir(parents=True)
    (model / "training_config.json").write_text(json.dumps({
        "name": model.name, "model": "tiny", "dataset": "safe_toy", "lineage": {"base_model": "tiny", "stage": "1"},
        "config": TrainConfig(**base).model_dump(mode="json"), "data_stats": {"train_pairs": 8},
        "train_case_indices": [0, 1], "test_case_indices": [2]}))
    (model / "training_metrics.json").write_text(json.dumps({"train_loss": 0.5}))
    write_model_card(model, model / "adapter", kind="adapter")
    assert "Not evaluated yet" in (model / "adapter" / "README.md").read_text()
    record_test_scores(model, "judge-a", {"mean_safety": 2.25})
    record_test_scores(model, "judge-b", {"mean_safety": 1.5})  # each judge keeps its own scores
    card = (model / "adapter" / "README.md").read_text()
    assert "| judge-a | mean_safety | 2.25 |" in card and "| judge-b | mean_safety | 1.5 |" in card
    assert "| train_loss | 0.5 |" in card and "8 training pairs" in card
    # `agentpipe report` hands its reports to the training side, which fills in the cards of models trained here
    from pipeline.training.registry import cards_from_reports

    def report(name: str, cases: list[int]) -> Path:
        path = tmp_path / "reports" / f"{name}_{len(cases)}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"meta": {"agent": name, "emulator": "emu", "evaluator": "judge-c", "n_cases": 1},
                                    "per_case": {"case_idx": cases},
                                    "agent_safe": {"ToolCallRisk": {"mean": 1.25}}}))
        return path

    held_out, seen, other = report(f"dpo_{model.name}", [2]), report(f"dpo_{model.name}", [0, 2]), report("x", [2])
    assert cards_from_reports([held_out, seen, other], models=tmp_path) == 1  # train cases, or not trained here
    card = (model / "adapter" / "README.md").read_text()
    assert "| judge-c | mean_safety | 1.25 |" in card and "| judge-a | mean_safety | 2.25 |" in card
