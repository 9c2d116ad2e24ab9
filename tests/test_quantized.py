"""bitsandbytes int4/int8 on CPU: quantized inference through the HF backend and QLoRA training as the study
trains (NF4 base weights, LoRA on top), the adapter loading on the quantized base and merging into the
full-precision one."""

from __future__ import annotations

import json

import pytest

from pipeline.llm import ChatRequest, GenerationConfig, get_backend
from tests.test_train import DOWN, tiny_cfg, toy_pair

pytestmark = pytest.mark.quantized


#: the bitsandbytes layer class each quantization setting must produce
QUANTIZED_LAYER = {"int4": "Linear4bit", "int8": "Linear8bitLt"}


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    """Each test its own run home: nothing (e.g. the token cache) is shared with another test or session."""
    monkeypatch.setenv("AGENTPIPE_HOME", str(tmp_path / "home"))


def _quantized_kinds(model) -> set[str]:
    """The bitsandbytes layer classes in ``model`` (either setting's)."""
    return {type(m).__name__ for m in model.modules()} & set(QUANTIZED_LAYER.values())


class _BaseLayers:
    """A ``TrainerCallback`` that records which quantized layer classes the model being trained holds."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        seen = self.seen = set()

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                seen.update(_quantized_kinds(model))

        self.callback = Callback()


def _req(text: str, n: int = 16) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": text}], config=GenerationConfig(max_new_tokens=n))


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_quantized_inference_on_cpu(tiny_model, quantization):
    import torch
    from transformers import AutoModelForCausalLM

    # the full-precision reference is loaded here, not through the backend: a backend's model may be shared
    # with other tests' backends (and carry their request adapters)
    full = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    q = get_backend(str(tiny_model), quantization=quantization)
    # the setting's own layer type, and only it: int4 is NF4 (Linear4bit), int8 is LLM.int8 (Linear8bitLt)
    assert _quantized_kinds(q.model) == {QUANTIZED_LAYER[quantization]}
    assert q.model.get_memory_footprint() < full.get_memory_footprint()
    out = q.generate([_req("Delete my files"), _req("hi")])
    assert all(r.ok and r.completion_tokens > 0 for r in out)
    assert [r.text for r in out] == [r.text for r in q.generate([_req("Delete my files"), _req("hi")])]
    # the quantized weights approximate the full ones: logits point the same way (4 bits of a random tiny model
    # lose more than 8 bits: measured mean cosine 0.82 and 0.9997)
    x = q.tok("Delete my files", return_tensors="pt")
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(full(**x).logits[0].float(), q.model(**x).logits[0].float(),
                                                    dim=-1)
    assert float(cos.mean()) > {"int4": 0.75, "int8": 0.99}[quantization]
    assert q.revision.endswith(f":{quantization}:auto")
    assert q.revision != get_backend(str(tiny_model), dtype="float32").revision


@pytest.mark.slow
def test_smollm2_in_4_bits_still_answers(smollm2_model):
    [r] = get_backend(str(smollm2_model), quantization="int4").generate(
        [_req("What is the capital of France? Answer in one sentence.", 24)])
    assert r.ok and "Paris" in r.text


def test_qlora_int4_trains_on_cpu_loads_quantized_and_merges_into_full_precision(tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.data import split
    from pipeline.training import merge, train
    from tests.test_train import write_pairs

    pairs = write_pairs(tmp_path / "safe_toy.jsonl", [toy_pair(c) for c in split.train_cases(0)[:8]])
    base_layers = _BaseLayers()
    res = train(tiny_cfg(tiny_model, pairs, tmp_path / "m", quantization="int4", max_steps=10, learning_rate=2e-3,
                         final_eval=False), callbacks=[base_layers.callback])
    assert res.global_step == 10 and "_int4" in res.name
    assert base_layers.seen == {"Linear4bit"}  # QLoRA: the base under the adapter was really NF4
    hist = [h for h in res.metrics["log_history"] if "loss" in h and "rewards/margins" in h]
    assert hist[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.05 and hist[-1]["rewards/margins"] > 0
    print(f"\nQLoRA int4 tiny: loss {hist[0]['loss']:.4f} -> {hist[-1]['loss']:.4f}, margin "
          f"{hist[-1]['rewards/margins']:.3f}, {res.metrics['train_wall_s']} s for 10 steps")
    cfg = json.loads((res.out / "training_config.json").read_text())
    assert cfg["config"]["quantization"] == "int4" and res.metrics["device"] == "cpu"
    adapter = res.adapter
    assert (adapter / "adapter_config.json").is_file()

    # the adapter on the quantized base (as it was trained) through the LLM backend
    quantized = get_backend(f"{tiny_model}+{adapter}", quantization="int4")
    [r] = quantized.generate([ChatRequest(messages=toy_pair(3)["prompt"], config=GenerationConfig(max_new_tokens=8))])
    assert r.ok and r.completion_tokens > 0

    # merged into the full-precision base: the merge's own logit check, then against base+adapter reloaded
    m = merge(adapter, tracking_uri=DOWN)
    assert m.max_abs_logit_diff <= 1e-3
    print(f"merge into full precision: max |logit diff| {m.max_abs_logit_diff:.2e}")
    tok = AutoTokenizer.from_pretrained(adapter)
    x = tok.apply_chat_template(toy_pair(3)["prompt"], tokenize=True, return_tensors="pt", return_dict=True)
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64).eval()
    merged = AutoModelForCausalLM.from_pretrained(m.out, dtype=torch.float64).eval()
    with torch.no_grad():
        base_logits = base(**x).logits
        peft_logits = PeftModel.from_pretrained(base, adapter).to(torch.float64).eval()(**x).logits
        merged_logits = merged(**x).logits
    assert float((merged_logits - peft_logits).abs().max()) <= 1e-3
    assert float((peft_logits - base_logits).abs().max()) > 1e-3  # the trained adapter changed the model


def test_qlora_int8_trains_on_cpu(tiny_model, tmp_path):
    from pipeline.data import split
    from pipeline.training import train
    from tests.test_train import write_pairs

    pairs = write_pairs(tmp_path / "help_toy.jsonl", [toy_pair(c) for c in split.train_cases(0)[:4]])
    base_layers = _BaseLayers()
    res = train(tiny_cfg(tiny_model, pairs, tmp_path / "m8", quantization="int8", max_steps=4, final_eval=False),
                callbacks=[base_layers.callback])
    assert base_layers.seen == {"Linear8bitLt"}  # the base under the adapter was really int8
    hist = [h for h in res.metrics["log_history"] if "rewards/margins" in h]
    assert res.global_step == 4 and len(hist) == 4 and (res.adapter / "adapter_model.safetensors").is_file()
    assert hist[-1]["loss"] < hist[0]["loss"]
