"""The vLLM backend on a real engine (the CPU build; `make test` runs these tests in a process of their own).

Engines start once per process and are shared (about 20 s each on 2 cores), so every test here uses a few
engines of the tiny model and SmolLM2 with a small memory share.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from pipeline.errors import ConfigError
from pipeline.llm import ChatRequest, GenerationConfig, get_backend, get_backends
from pipeline.llm.vllm_backend import shutdown_engines

pytestmark = pytest.mark.vllm

#: each engine reserves this fraction of the NUMA node's RAM on CPU (weights, activations and KV cache; about
#: 0.7 GiB of it is the worker's own); small, since a test process holds several engines
MEMORY = 0.12
ENGINE = {"dtype": "float32", "max_model_len": 1024, "gpu_memory_utilization": MEMORY, "enforce_eager": True,
          "max_lora_rank": 8}
PROMPTS = ["Delete all my old files.", "Send $500 to Bob", "What is the weather?", "hi",
           "Please turn the heating off while I am away for two weeks in January.", "Share my medical record",
           "Book a flight to Paris and pay with my card", "List the files"]
CHOICES = ["0", "1", "2", "3"]


def _req(text: str, **cfg) -> ChatRequest:
    return ChatRequest(messages=[{"role": "system", "content": "You are an agent."},
                                 {"role": "user", "content": text}],
                       config=GenerationConfig(**{"max_new_tokens": 24, **cfg}))


def _text(r) -> str:
    return r.text.rstrip("\ufffd")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.fixture(scope="module")
def vtiny(tiny_model):
    return get_backend(f"vllm:{tiny_model}", **ENGINE)


@pytest.fixture(scope="module")
def htiny(tiny_model):
    return get_backend(str(tiny_model), dtype="float32")


def test_the_vllm_package_is_the_real_engine():
    import vllm

    assert hasattr(vllm, "LLM") and vllm.__version__  # fail, never skip: CI must exercise a real engine


def test_greedy_outputs_equal_the_hf_backend(vtiny, htiny):
    reqs = [_req(p) for p in PROMPTS]
    v, h = vtiny.generate(reqs), htiny.generate(reqs)
    assert all(r.ok for r in v), [r.error for r in v]
    # vLLM's incremental detokenizer holds back a trailing incomplete UTF-8 sequence that HF decodes as U+FFFD
    assert [_text(r) for r in v] == [_text(r) for r in h]
    assert [(r.prompt_tokens, r.completion_tokens) for r in v] == [(r.prompt_tokens, r.completion_tokens) for r in h]


def test_two_adapters_and_the_base_in_one_batch_equal_the_hf_backend(vtiny, htiny, tiny_model, tiny_adapters):
    """Both adapters live in folders named `adapter`: the LoRA ids must still differ (they did not before)."""
    a, b = (str(x) for x in tiny_adapters)
    reqs = [dataclasses.replace(_req(p, max_new_tokens=12), adapter=ad) for p in PROMPTS[:4] for ad in (None, a, b)]
    mixed = vtiny.generate(reqs)
    assert all(r.ok for r in mixed), [r.error for r in mixed]
    hf = {None: htiny, a: get_backend(f"{tiny_model}+{a}", dtype="float32"),
          b: get_backend(f"{tiny_model}+{b}", dtype="float32")}
    expected = [hf[r.adapter].generate([dataclasses.replace(r, adapter=None)])[0].text for r in reqs]
    assert [_text(r) for r in mixed] == [e.rstrip("\ufffd") for e in expected]
    for k in range(4):
        assert len({_text(r) for r in mixed[3 * k:3 * k + 3]}) == 3
    # an adapter in the spec (vllm:base+adapter) shares the engine and answers as the request-level adapter
    spec_a = get_backend(f"vllm:{tiny_model}+{a}", **ENGINE)
    assert spec_a.llm is vtiny.llm
    assert spec_a.generate([_req(PROMPTS[0], max_new_tokens=12)])[0].text == mixed[1].text


def test_an_over_long_prompt_fails_alone(vtiny):
    long = " ".join(["files"] * 3000)
    out = vtiny.generate([_req(PROMPTS[0]), _req(long), _req(PROMPTS[1])])
    assert out[0].ok and out[2].ok and out[0].completion_tokens > 0
    assert not out[1].ok and "longer than the maximum model length 1024" in out[1].error
    assert out[0].text == vtiny.generate([_req(PROMPTS[0])])[0].text


def test_an_engine_rejection_fails_only_its_request(vtiny, monkeypatch):
    """When vLLM rejects a request the backend did not foresee, the batch is retried request by request."""
    from vllm import SamplingParams

    real = vtiny.llm.generate
    poisoned = {"n": 0}

    def generate(prompts, params, **kw):
        if any(isinstance(p, SamplingParams) and p.max_tokens == 7 for p in params):
            poisoned["n"] += 1
            raise ValueError("rejected by the engine")
        return real(prompts, params, **kw)

    monkeypatch.setattr(vtiny.llm, "generate", generate)
    out = vtiny.generate([_req(PROMPTS[0]), _req(PROMPTS[1], max_new_tokens=7), _req(PROMPTS[2])])
    assert [r.ok for r in out] == [True, False, True]
    assert "rejected by the engine" in out[1].error and poisoned["n"] == 2  # the batch, then the request alone


def test_an_aborted_generation_is_a_failed_request_not_an_answer(vtiny, monkeypatch):
    """vLLM ends a dropped request with finish reason ``abort`` (and its text so far): a failed request, which the
    emulation retries and then fails and the evaluation records as an error, never a finished answer."""
    real = vtiny.llm.generate

    def generate(prompts, params, **kw):
        outs = real(prompts, params, **kw)
        for o, p in zip(outs, params):
            if p.max_tokens == 7:
                o.outputs[0].finish_reason = "abort"
        return outs

    monkeypatch.setattr(vtiny.llm, "generate", generate)
    out = vtiny.generate([_req(PROMPTS[0]), _req(PROMPTS[1], max_new_tokens=7), _req(PROMPTS[2])])
    assert [r.ok for r in out] == [True, False, True]
    assert out[1].finish_reason == "error" and out[1].text == ""
    assert "finish reason 'abort'" in out[1].error
    assert {out[0].finish_reason, out[2].finish_reason} <= {"stop", "length"}


def test_each_request_samples_with_its_own_seed(vtiny):
    """Sampled answers depend on the request's seed alone, not on the batch it runs in."""
    reqs = [_req(p, temperature=1.0, seed=1000 + i) for i, p in enumerate(PROMPTS)]
    alone = [_text(vtiny.generate([r])[0]) for r in reqs]
    assert [_text(r) for r in vtiny.generate(reqs)] == alone
    assert [_text(r) for r in vtiny.generate(reqs[::-1])] == alone[::-1]


def test_same_model_shares_one_engine_and_different_models_split_the_budget(tiny_model, tmp_path):
    import shutil

    copy = tmp_path / "tiny-copy"
    shutil.copytree(tiny_model, copy)
    opts = {**ENGINE, "max_model_len": 768, "gpu_memory_utilization": 2 * MEMORY}  # engines no other test made
    same = get_backends({"agent": (f"vllm:{tiny_model}", opts), "emulator": (f"vllm:{tiny_model}", opts)})
    assert same["agent"].llm is same["emulator"].llm
    assert same["agent"].llm.llm_engine.vllm_config.cache_config.gpu_memory_utilization == pytest.approx(2 * MEMORY)
    split = get_backends({"agent": (f"vllm:{copy}", {**opts, "max_model_len": 640}),
                          "emulator": (f"vllm:{tiny_model}", {**opts, "max_model_len": 640})})
    assert split["agent"].llm is not split["emulator"].llm
    for b in split.values():
        assert b.llm.llm_engine.vllm_config.cache_config.gpu_memory_utilization == pytest.approx(MEMORY)
    assert shutdown_engines([*same.values(), *split.values()]) == 3  # free the memory for the other tests


def test_choice_scoring_agrees_with_the_hf_backend(vtiny, htiny, tiny_adapters):
    a = str(tiny_adapters[0])
    reqs = [_req(p) for p in PROMPTS[:4]] + [dataclasses.replace(_req(PROMPTS[0]), adapter=a)]
    v = vtiny.score_choices(reqs, "Score: ", CHOICES)
    h = htiny.score_choices(reqs, "Score: ", CHOICES)
    # log-probabilities of the same tokens: equal within float32 kernels' differences
    for vr, hr in zip(v, h):
        assert vr == pytest.approx(hr, abs=2e-3)
    assert v[0] != pytest.approx(v[4], abs=1e-3)  # the adapter row was scored with the adapter
    multi = vtiny.score_choices(reqs[:2], "Score: ", ["safe", "risky action"])  # multi-token choices
    assert multi == [pytest.approx(x, abs=2e-3) for x in htiny.score_choices(reqs[:2], "Score: ",
                                                                              ["safe", "risky action"])]


def test_int4_is_refused_with_the_alternatives(tiny_model):
    with pytest.raises(ConfigError, match="vLLM has no bitsandbytes quantization: use --quantization fp8"):
        get_backend(f"vllm:{tiny_model}", quantization="int4", **ENGINE)
    with pytest.raises(ConfigError, match="--dtype bf17: expected one of auto, bfloat16"):
        get_backend(f"vllm:{tiny_model}", **{**ENGINE, "dtype": "bf17"})


def test_smollm2_greedy_outputs_equal_the_hf_backend(smollm2_model):
    v = get_backend(f"vllm:{smollm2_model}", **{**ENGINE, "max_model_len": 2048, "gpu_memory_utilization": 0.25})
    h = get_backend(str(smollm2_model), dtype="float32")
    reqs = [_req("What is the capital of France? Answer in one sentence.", max_new_tokens=32)] + [
        _req(p, max_new_tokens=32) for p in PROMPTS[:5]]
    vo, ho = v.generate(reqs), h.generate(reqs)
    assert "Paris" in vo[0].text and vo[0].finish_reason == "stop"
    # float32 on both sides: the same greedy path, token for token
    assert [(_text(r), r.completion_tokens, r.finish_reason) for r in vo] == [
        (_text(r), r.completion_tokens, r.finish_reason) for r in ho]


def test_emulate_and_evaluate_two_demo_cases_end_to_end(tmp_path, smollm2_model):
    from pipeline.data.jsonl import read_jsonl
    from tests.conftest import run_agentpipe

    env = {"AGENTPIPE_HOME": str(tmp_path / "home")}
    spec = "vllm:SmolLM2-135M"  # the nickname resolves to the converted folder (smollm2_model)
    p = run_agentpipe("--result", str(tmp_path / "emu.json"), "emulate", "--agent", spec, "--emulator", spec,
                      "--case-set", "demo", "--cases", "0-2", "--max-steps", "2", "--max-tokens-per-call", "96",
                      "--compat", "study", "--max-model-len", "4096", "--gpu-memory-utilization", "0.25",
                      "--dtype", "bfloat16", "--no-progress", env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    traj = json.loads((tmp_path / "emu.json").read_text())["outputs"]["trajectories"]
    records = read_jsonl(traj).records
    assert [r["case_idx"] for r in records] == [0, 1]
    assert all("error" not in r and r["intermediate_steps"] for r in records)
    assert all(r["usage"]["agent"]["completion_tokens"] > 0 for r in records)
    e = run_agentpipe("--result", str(tmp_path / "eval.json"), "evaluate", "--trajectories", traj, "--evaluator", spec, "--scoring", "choice",
                      "--max-model-len", "4096", "--gpu-memory-utilization", "0.25", "--no-progress", env=env)
    assert e.returncode == 0, e.stderr[-3000:]
    eval_files = json.loads((tmp_path / "eval.json").read_text())["outputs"]["eval_files"]
    assert sorted(eval_files) == ["agent_help_ignore_safety", "agent_safe"]
    for path in eval_files.values():
        evals = read_jsonl(path).records
        assert len(evals) == 2
        assert all(r["status"] == "ok" and r["scoring"] == "choice" for r in evals), evals
        assert all([type(v) for v in r["eval_scores"].values()] == [int] for r in evals), evals


def test_structured_answers_of_the_smollm2_judge_always_parse(tmp_path, smollm2_model):
    """``evaluate --structured``: SmolLM2-135M cannot follow the answer format in free text; constrained to it
    while decoding (vLLM structured outputs, the prompt unchanged), every answer parses, with a rubric label."""
    from pipeline.data.jsonl import read_jsonl
    from pipeline.emulation.runner import EmulationConfig, run_emulation
    from pipeline.evaluation.judges import ANSWER_LABELS
    from tests.conftest import run_agentpipe

    traj = run_emulation(EmulationConfig(agent="scripted:agent", emulator="scripted:emulator", case_set="demo",
                                         cases="0-4", out=tmp_path / "pool", no_progress=True)).path
    e = run_agentpipe("--result", str(tmp_path / "eval.json"), "evaluate", "--trajectories", str(traj), "--evaluator",
                      "vllm:SmolLM2-135M", "--structured", "--max-new-tokens", "256", "--max-model-len", "4096",
                      "--gpu-memory-utilization", "0.25", "--no-progress", env={"AGENTPIPE_HOME": str(tmp_path)})
    assert e.returncode == 0, e.stderr[-3000:]
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["counts"]["requests"] == 8 and res["counts"]["parse_failed"] == 0 and res["counts"]["scored"] == 8
    for t, path in res["outputs"]["eval_files"].items():
        labels = ANSWER_LABELS["agent_safe" if t == "agent_safe" else "help"]
        for r in read_jsonl(path).records:
            assert r["status"] == "ok" and r["Overall Qualitative Label"] in labels, r
            assert r["Overall Quantitative Score"] in ("0", "1", "2", "3") and r["finish_reason"] == "stop", r
    # a backend that cannot constrain decoding is refused in one line, never answered unconstrained
    p = run_agentpipe("evaluate", "--trajectories", str(traj), "--evaluator", "SmolLM2-135M", "--structured",
                      env={"AGENTPIPE_HOME": str(tmp_path)})
    assert p.returncode == 2 and "constrained answers need the vLLM engine" in p.stderr
