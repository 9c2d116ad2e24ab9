"""Training without its fixed cost (issue 24): tokenised pair sets cached and shared, reference log-probs only for
the pairs a run sees, lengths against the model's context, merged models registered without a second copy."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import threading
from typing import Any
from pathlib import Path

import pytest

from pipeline.data import split
from pipeline.errors import ConfigError
from pipeline.training import TrainConfig, merge, train
from pipeline.training import token_cache
from pipeline.training.data import prepare_data, ref_log_probs_plan
from pipeline.training.models import load_tokenizer
from tests.test_train import DOWN, tiny_cfg, toy_pair, write_pairs


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTPIPE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def pairs(tmp_path) -> Path:
    return write_pairs(tmp_path / "safe_toy.jsonl", [toy_pair(c, i) for c in split.train_cases(0)[:4]
                                                     for i in range(2)] + [toy_pair(c) for c in split.test_cases(0)[:2]])


def _entries(tmp_path: Path) -> list[Path]:
    root = tmp_path / "home" / "cache" / "tokenized"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def test_tokenised_pairs_match_trl_and_are_cached_shared_and_verified(tiny_model, pairs, tmp_path):
    from types import SimpleNamespace

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok = load_tokenizer(str(tiny_model))
    cfg = tiny_cfg(tiny_model, pairs)
    before = token_cache.builds
    data = prepare_data(cfg, tok)
    assert token_cache.builds == before + 1 and data.stats["train_pairs"] == 8 and data.stats["val_pairs"] == 2
    # the same ids trl's own preparation makes
    raw = [json.loads(line) for line in pairs.read_text().splitlines()]
    trl_ds = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tok), Dataset.from_list(
        [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in raw[:8]]), tok,
        DPOConfig(output_dir=str(tmp_path / "x"), max_length=8192, use_cpu=True, report_to="none"), "train")
    for ours, theirs in zip(data.train, trl_ds):
        assert [ours[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")] == \
               [theirs[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")]
    expected = data.train.to_dict()["chosen_ids"]  # read now: the truncation below damages the mapped file itself
    [entry] = _entries(tmp_path)
    stamp = (entry / token_cache.MANIFEST).stat().st_mtime_ns

    # reused: another training on the same pairs and tokenizer (other limits too) does not tokenise again
    again = prepare_data(tiny_cfg(tiny_model, pairs, max_length=10_000), tok)
    assert token_cache.builds == before + 1 and (entry / token_cache.MANIFEST).stat().st_mtime_ns == stamp
    assert again.train.to_dict()["chosen_ids"] == expected

    # a changed pairs file misses the cache
    other = write_pairs(tmp_path / "other" / "safe_toy.jsonl", [toy_pair(c, 7) for c in split.train_cases(0)[:3]])
    prepare_data(tiny_cfg(tiny_model, other), tok)
    assert token_cache.builds == before + 2 and len(_entries(tmp_path)) == 2

    # a changed tokenizer (same folder name, edited chat template) misses the cache
    tiny2 = shutil.copytree(tiny_model, tmp_path / "m2" / Path(tiny_model).name)
    tc = json.loads((tiny2 / "tokenizer_config.json").read_text())
    template_file = tiny2 / "chat_template.jinja"
    if template_file.is_file():
        template_file.write_text(template_file.read_text() + " ")
    else:
        tc["chat_template"] += " "
        (tiny2 / "tokenizer_config.json").write_text(json.dumps(tc))
    prepare_data(tiny_cfg(tiny2, pairs), load_tokenizer(str(tiny2)))
    assert token_cache.builds == before + 3 and len(_entries(tmp_path)) == 3

    # a truncated data file is detected and rebuilt, never used
    [arrow] = list((entry / "data").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:100])
    rebuilt = prepare_data(cfg, tok)
    assert token_cache.builds == before + 4 and rebuilt.train.to_dict()["chosen_ids"] == expected
    # an entry without its manifest (an interrupted copy) too
    (entry / token_cache.MANIFEST).unlink()
    prepare_data(cfg, tok)
    assert token_cache.builds == before + 5


def test_two_trainings_building_the_same_cache_at_once_build_it_once(tiny_model, pairs):
    tok = load_tokenizer(str(tiny_model))
    raw = [json.loads(line) for line in pairs.read_text().splitlines()]
    sha = hashlib.sha256(pairs.read_bytes()).hexdigest()
    before, results, errors = token_cache.builds, [], []

    def build() -> None:
        try:
            results.append(token_cache.tokenized_pairs(raw, sha, tok, str(tiny_model)))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and token_cache.builds == before + 1 and all(len(r) == len(raw) for r in results)


def test_auto_reference_log_probs_rule():
    cfg = TrainConfig(model="m", pairs="p.jsonl", seed=0, max_steps=2)  # the rehearsal: 2 x 1 x 8 = 16 pairs
    assert ref_log_probs_plan(cfg, 5687, 1)[0] is False
    assert ref_log_probs_plan(cfg, 16, 1)[0] is True
    assert ref_log_probs_plan(TrainConfig(model="m", pairs="p.jsonl", seed=0), 5687, 1)[0] is True
    assert ref_log_probs_plan(cfg.model_copy(update={"precompute_ref_log_probs": True}), 5687, 1) == \
        (True, "set explicitly")


def test_short_run_scores_only_the_pairs_it_draws_with_the_same_losses(tiny_model, pairs, tmp_path, monkeypatch):
    from trl import DPOTrainer

    scored: list[int] = []
    original = DPOTrainer._precompute_ref_logps

    def counting(self, dataset, name, batch_size):
        scored.append(len(dataset))
        return original(self, dataset, name, batch_size)

    monkeypatch.setattr(DPOTrainer, "_precompute_ref_logps", counting)
    kw = dict(max_steps=3, final_eval=False, register_model=False, learning_rate=5e-3)
    auto = train(tiny_cfg(tiny_model, pairs, tmp_path / "auto", **kw))
    assert scored == []  # 3 steps x 1 pair < 8 training pairs: on the fly, for the 3 pairs drawn only
    doc = json.loads((tmp_path / "auto" / "training_config.json").read_text())
    assert doc["precompute_ref_log_probs_used"] is False and "3 of 8" in doc["precompute_ref_log_probs_rule"]
    full = train(tiny_cfg(tiny_model, pairs, tmp_path / "full", precompute_ref_log_probs=True, **kw))
    assert scored == [8]  # the full precompute scores every training pair
    keys = ("loss", "logps/chosen", "logps/rejected", "rewards/margins")
    a = [h[k] for h in auto.metrics["log_history"] if "loss" in h for k in keys]
    b = [h[k] for h in full.metrics["log_history"] if "loss" in h for k in keys]
    print(f"\nauto (on the fly): {a}\nfull precompute:   {b}")
    assert len(a) == 12 and a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert a[-4] < 0.1 < a[0]  # the steps really trained


def test_precomputed_reference_log_probs_are_stored_and_reused_with_the_same_losses(tiny_model, pairs, tmp_path):
    """A second model on the same pairs and base (another beta) scores no pair with the reference model again, and
    trains exactly as it does with an empty cache; another base model is another entry."""
    from pipeline.training import ref_cache

    kw = dict(max_steps=3, precompute_ref_log_probs=True, register_model=False, learning_rate=5e-3)
    start = ref_cache.computed
    train(tiny_cfg(tiny_model, pairs, tmp_path / "cold", **kw))
    assert ref_cache.computed == start + 8  # every training pair, once
    warm = train(tiny_cfg(tiny_model, pairs, tmp_path / "warm", beta=0.05, **kw))
    assert ref_cache.computed == start + 8  # all 8 from the cache
    fresh = train(tiny_cfg(tiny_model, pairs, tmp_path / "fresh", beta=0.05, **kw), home=tmp_path / "empty-home")
    assert ref_cache.computed == start + 16
    keys = ("loss", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/margins", "grad_norm")
    a = [h[k] for h in warm.metrics["log_history"] if "loss" in h for k in keys]
    b = [h[k] for h in fresh.metrics["log_history"] if "loss" in h for k in keys]
    assert len(a) == 18 and a == b and a[-6] < a[0]  # the same numbers, and the steps trained
    [entry] = list((tmp_path / "home" / "cache" / "ref_logps").glob("*.jsonl"))
    assert len(entry.read_text().splitlines()) == 8
    other = shutil.copytree(tiny_model, tmp_path / "other-base" / "tiny")
    weights = next(other.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))  # one bit of one weight
    train(tiny_cfg(other, pairs, tmp_path / "other", **kw))
    assert ref_cache.computed == start + 24 and len(list(entry.parent.glob("*.jsonl"))) == 2


def test_pairs_longer_than_the_model_context_are_refused_in_one_line(tiny_model, pairs, tmp_path):
    short = shutil.copytree(tiny_model, tmp_path / "short" / "tiny-short")
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    with pytest.raises(ConfigError, match=r"--max-length 8192: kept pairs are up to \d+ tokens but .* has a "
                       r"64-token context .*rerun with --max-length 64"):
        train(tiny_cfg(short, pairs, tmp_path / "m", max_steps=1, final_eval=False, register_model=False))


def test_merged_version_is_registered_in_place_without_a_second_copy(tiny_adapter, tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from pipeline.data.manifest import file_digest

    monkeypatch.chdir(tmp_path)  # the SQLite store's default artifact root is ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    m = merge(tiny_adapter, tmp_path / "merged", tracking_uri=uri)
    c = MlflowClient(uri)
    [version] = c.search_model_versions(f"run_id = '{m.mlflow_run_id}'")
    assert version.source == (tmp_path / "merged").resolve().as_uri() and version.tags["kind"] == "merged"
    assert version.tags["agentpipe.weights"] == "in place" and version.tags["path"] == str(m.out)
    # nothing of the weights was uploaded: the run holds only the merge config
    assert [f.path for f in c.list_artifacts(m.mlflow_run_id)] == ["merge"]
    assert c.get_model_version_download_uri(version.name, version.version) == version.source
    mlflow.set_tracking_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{version.name}/{version.version}",
                                                     dst_path=str(tmp_path / "dl")))
    assert file_digest(local / "model.safetensors") == file_digest(m.out / "model.safetensors")
    assert c.get_model_version_by_alias(version.name, "latest-merged").version == version.version


def test_merged_version_through_a_server_that_refuses_local_sources_is_uploaded_once(tiny_adapter, tmp_path,
                                                                                     mlflow_server):
    from mlflow import MlflowClient

    m = merge(tiny_adapter, tmp_path / "merged", tracking_uri=mlflow_server)
    c = MlflowClient(mlflow_server)
    [version] = c.search_model_versions(f"run_id = '{m.mlflow_run_id}'")
    assert version.source == f"runs:/{m.mlflow_run_id}/model"
    assert version.tags["agentpipe.weights"].startswith("uploaded")
    assert {"model/model.safetensors"} <= {f.path for f in c.list_artifacts(m.mlflow_run_id, "model")}


def test_cpu_lm_head_scores_only_completion_tokens_with_the_same_log_probs(tiny_model):
    """trl scores every position on devices without Triton; on CPU only the completion tokens are scored, and each
    one gets the log-probability the full logits give."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.kernels import chunked_logprob
    from trl.trainer.utils import add_fused_lm_head

    from pipeline.training.callbacks import score_completions_only_on_cpu

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :17] = -100  # a long prompt, a short completion
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
    expected = full.gather(-1, ids[:, 1:, None]).squeeze(-1) * (labels[:, 1:] != -100)
    add_fused_lm_head(model)
    rows: list[int] = []
    real = chunked_logprob.ChunkedLogProbFunction.apply

    def spy(hidden: Any, *args: Any) -> Any:
        rows.append(hidden.shape[0])
        return real(hidden, *args)

    assert score_completions_only_on_cpu()
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(chunked_logprob.ChunkedLogProbFunction, "apply", spy)
        got = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
    assert rows == [2 * 7]  # 2 rows x 7 completion tokens, not 2 x 23 positions
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _rss_anon_mb() -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("RssAnon:"))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only (CI runs Linux)")
def test_freed_heap_memory_goes_back_to_the_system():
    import ctypes

    from pipeline.training.cpu_memory import release_freed_memory

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(96 * 1024) for _ in range(2000)]  # ~190 MB of heap blocks (below any mmap threshold)
    for b in blocks:
        ctypes.memset(b, 1, 96 * 1024)
    for b in blocks[:-1]:  # the last one pins the heap's top: only a trim of the middle can give memory back
        libc.free(b)
    before = _rss_anon_mb()
    assert release_freed_memory()
    after = _rss_anon_mb()
    libc.free(blocks[-1])
    assert before - after > 150, (before, after)


def test_cpu_training_maps_large_blocks_and_hands_memory_back_after_every_step(tiny_model, pairs, tmp_path,
                                                                               monkeypatch):
    from pipeline.training import cpu_memory

    calls: list[str] = []
    monkeypatch.setattr(cpu_memory, "map_large_blocks", lambda: calls.append("map") or True)
    monkeypatch.setattr(cpu_memory, "release_freed_memory", lambda: calls.append("release") or True)
    train(tiny_cfg(tiny_model, pairs, tmp_path / "out", max_steps=3, final_eval=False, register_model=False))
    assert calls == ["map", "release", "release", "release", "release"]  # before loading; at the start, per step
    calls.clear()
    monkeypatch.setenv("AGENTPIPE_LEAN_CPU_TRAINING_MEMORY", "0")
    train(tiny_cfg(tiny_model, pairs, tmp_path / "off", max_steps=2, final_eval=False, register_model=False))
    assert calls == []
