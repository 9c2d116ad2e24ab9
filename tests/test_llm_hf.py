"""The HF transformers backend on the tiny offline model (and SmolLM2-135M, marked slow)."""

import dataclasses
import re
import sys

import pytest

from pipeline.errors import ConfigError
from pipeline.llm import ChatRequest, GenerationConfig, get_backend
from pipeline.llm.cache import CachedBackend, ResponseCache
from pipeline.llm.scripted import ScriptedBackend, register_script
from pipeline.llm.spec import parse_model_spec

PROMPTS = ["Delete all my old files.", "Send $500 to Bob", "What is the weather?", "hi",
           "Please turn the heating off while I am away for two weeks in January.", "Share my medical record",
           "Book a flight to Paris and pay with my card", "List the files"]


def _req(text, **cfg):
    return ChatRequest(messages=[{"role": "system", "content": "You are an agent."},
                                 {"role": "user", "content": text}],
                       config=GenerationConfig(**{"max_new_tokens": 24, **cfg}))


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return get_backend(str(tiny_model), batch_size=8)


def test_batched_equals_one_at_a_time_at_temperature_0(tiny):
    batched = tiny.generate([_req(p) for p in PROMPTS])
    single = [tiny.generate([_req(p)])[0] for p in PROMPTS]
    assert [r.text for r in batched] == [r.text for r in single]
    assert ([(r.finish_reason, r.completion_tokens) for r in batched]
            == [(r.finish_reason, r.completion_tokens) for r in single])
    assert [r.completion_tokens for r in batched] == [r.completion_tokens for r in single]
    assert len({r.text for r in batched}) > 1, "outputs must depend on the prompt for this test to mean anything"
    assert all(r.ok and r.prompt_tokens > 0 for r in batched)


def test_per_request_prefill_equals_the_padded_batched_prefill(tiny_model, tiny):
    """On CPU the default computes each prompt's cache alone and batches only decoding; same tokens as one padded
    batched pass (greedy) and as the same seed when sampling."""
    assert tiny.prefill_per_request  # auto on CPU
    padded = get_backend(str(tiny_model), batch_size=8, prefill="batched")
    assert not padded.prefill_per_request
    reqs = [_req(p, max_new_tokens=c) for p, c in zip(PROMPTS, [3, 17, 5, 24, 1, 9, 12, 2])]
    a, b = tiny.generate(reqs), padded.generate(reqs)
    assert [(r.text, r.completion_tokens, r.finish_reason) for r in a] == \
        [(r.text, r.completion_tokens, r.finish_reason) for r in b]
    # identical prompts (replicates) share one prefill but sample apart with their own seeds; a request's own
    # seed alone decides its draw, so the same prompt and seed in one batch give the same answer
    sampled = ([_req(p, temperature=1.0, seed=7) for p in PROMPTS] + [_req(p, temperature=1.0, seed=8)
                                                                      for p in PROMPTS[:3]]
               + [_req(p, temperature=1.0, seed=7) for p in PROMPTS[:3]])
    texts = [r.text for r in tiny.generate(sampled)]
    assert texts == [r.text for r in padded.generate(sampled)]
    assert any(texts[i] != texts[len(PROMPTS) + i] for i in range(3))
    assert texts[len(PROMPTS) + 3:] == texts[:3]
    greedy_twice = tiny.generate(reqs + reqs[:3])
    assert [r.text for r in greedy_twice] == [r.text for r in a] + [r.text for r in a[:3]]
    # scoring: one unpadded pass per request vs padded batches, single-token and multi-token choices
    for choices in (["0", "1", "2", "3"], ["safe", "risky action"]):
        x = tiny.score_choices(reqs[:5], "Score: ", choices)
        y = padded.score_choices(reqs[:5], "Score: ", choices)
        for row_x, row_y in zip(x, y):
            assert row_x == pytest.approx(row_y, abs=1e-3)
    with pytest.raises(ConfigError, match="prefill 'fast'"):
        get_backend(str(tiny_model), prefill="fast")


def test_responses_come_back_in_request_order_with_mixed_lengths(tiny):
    caps = [3, 17, 5, 24, 1, 9, 12, 2]
    res = tiny.generate([_req(p, max_new_tokens=c) for p, c in zip(PROMPTS, caps)])
    for r, p, c in zip(res, PROMPTS, caps):
        assert r.text == tiny.generate([_req(p, max_new_tokens=c)])[0].text
        assert r.completion_tokens <= c
        if r.finish_reason == "length":
            assert r.completion_tokens == c


def test_stop_sequences_trim_the_output(tiny):
    [full] = tiny.generate([_req(PROMPTS[0], max_new_tokens=40)])
    assert len(full.text) > 6
    stop = full.text[3:6]  # a piece of text we know the model produces
    [cut] = tiny.generate([_req(PROMPTS[0], max_new_tokens=40, stop=(stop,))])
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert cut.completion_tokens < full.completion_tokens  # generation actually stopped early
    # a mixed batch: only the row with the stop sequence is cut
    mixed = tiny.generate([_req(PROMPTS[0], max_new_tokens=40, stop=(stop,)), _req(PROMPTS[0], max_new_tokens=40)])
    assert [m.text for m in mixed] == [cut.text, full.text]


def test_adapter_changes_the_output(tiny_model, tiny_adapter, tiny):
    with_adapter = get_backend(f"{tiny_model}+{tiny_adapter}")
    a = [r.text for r in with_adapter.generate([_req(p) for p in PROMPTS])]
    b = [r.text for r in tiny.generate([_req(p) for p in PROMPTS])]
    assert a != b
    assert with_adapter.revision != tiny.revision


def test_two_adapters_and_the_base_in_one_batch_equal_each_alone(tiny_model, tiny_adapters, tiny):
    """peft mixed-adapter batches: one HF backend on the base serves requests for two adapters and the base
    together; each answer equals that adapter's own backend (and the three differ, so the test can fail)."""
    a, b = (str(x) for x in tiny_adapters)
    prompts = PROMPTS[:4]
    reqs = [dataclasses.replace(_req(p, max_new_tokens=12), adapter=ad) for p in prompts for ad in (None, a, b)]
    mixed = [r.text for r in tiny.generate(reqs)]
    alone = {None: tiny, a: get_backend(f"{tiny_model}+{a}"), b: get_backend(f"{tiny_model}+{b}")}
    expected = [alone[r.adapter].generate([dataclasses.replace(r, adapter=None)])[0].text for r in reqs]
    assert mixed == expected
    for k in range(len(prompts)):
        assert len(set(mixed[3 * k:3 * k + 3])) == 3, mixed[3 * k:3 * k + 3]
    # choice scoring routes rows to their adapters too
    scored = tiny.score_choices(reqs[:3], "Score: ", ["0", "1", "2", "3"])
    for r, s in zip(reqs[:3], scored):
        assert s == pytest.approx(alone[r.adapter].score_choices([dataclasses.replace(r, adapter=None)], "Score: ",
                                                                 ["0", "1", "2", "3"])[0], abs=1e-4)
    assert scored[0] != pytest.approx(scored[1], abs=1e-3)


def test_bad_adapter_and_quantization_errors(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="adapter .* not found"):
        get_backend(f"{tiny_model}+{tmp_path / 'nope'}")
    with pytest.raises(ConfigError, match="no-model-here': no such local folder, and not a Hub id"):
        get_backend(str(tmp_path / "no-model-here"))


def test_unknown_quantization_and_dtype_are_one_line_errors(tiny_model):
    with pytest.raises(ConfigError, match="--quantization int3: the HF backend takes one of none, int4"):
        get_backend(str(tiny_model), quantization="int3")
    with pytest.raises(ConfigError, match="--quantization fp8: .*served by vLLM"):
        get_backend(str(tiny_model), quantization="fp8")
    with pytest.raises(ConfigError, match="--dtype fp64: expected one of auto, bfloat16, float16, float32"):
        get_backend(str(tiny_model), dtype="fp64")


def test_sampling_with_a_seed_is_reproducible(tiny):
    reqs = [_req(p, temperature=1.0, seed=7) for p in PROMPTS[:3]]
    assert [r.text for r in tiny.generate(reqs)] == [r.text for r in tiny.generate(reqs)]


def test_a_sampled_answer_does_not_depend_on_its_batch(tiny_model):
    """Each row samples from its own seeded stream: the same request gives the same tokens alone, in any batch
    size, in another order and after an out-of-memory halving."""
    reqs = [_req(p, temperature=1.0, top_p=0.9, seed=7) for p in PROMPTS]
    alone = [get_backend(str(tiny_model), batch_size=1).generate([r])[0].text for r in reqs]
    assert len(set(alone)) > 1
    for size in (3, 8):
        assert [r.text for r in get_backend(str(tiny_model), batch_size=size).generate(reqs)] == alone
    assert [r.text for r in get_backend(str(tiny_model), batch_size=8).generate(reqs[::-1])] == alone[::-1]
    backend = get_backend(str(tiny_model), batch_size=8)
    real, calls = backend._generate_batch, []

    def oom_once(prompts, batch_reqs, sampling):
        calls.append(len(prompts))
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(prompts, batch_reqs, sampling)

    backend._generate_batch = oom_once
    assert [r.text for r in backend.generate(reqs)] == alone
    assert calls[:2] == [8, 4] and backend.batch_size == 4


def test_sampling_refuses_a_generation_config_warper_it_does_not_apply(tiny_model):
    """The row sampler applies temperature, top_k and top_p; a model whose generation config also sets e.g. min_p
    would sample from another distribution than ``generate``'s without a word: refused before anything runs."""
    from pipeline.errors import ConfigError

    backend = get_backend(str(tiny_model), batch_size=2)
    backend.model.generation_config.min_p = 0.05  # the loaded model is shared by the process: reset below
    try:
        with pytest.raises(ConfigError, match="min_p=0.05"):
            backend.generate([_req(PROMPTS[0], temperature=1.0, seed=1)])
        assert backend.generate([_req(PROMPTS[0])])[0].ok  # greedy decoding does not sample: unaffected
    finally:
        backend.model.generation_config.min_p = None


def test_the_scripted_double_is_slowed_down_or_taken_down_by_its_spec_options(tmp_path):
    import time

    outage = tmp_path / "outage"
    spec = parse_model_spec(f"scripted:echo?delay=0.3&fail_while={outage}#Echo_1")
    assert (spec.model, spec.name, spec.options) == ("echo", "Echo_1", (("delay", "0.3"), ("fail_while", str(outage))))
    double = get_backend(spec)
    t0 = time.monotonic()
    [ok] = double.generate([_req("hello there")])
    assert ok.text == "hello there" and time.monotonic() - t0 >= 0.3
    outage.touch()  # the outage begins: every request fails, as a real backend's would
    [down] = double.generate([_req("hello there")])
    assert down.error and "scripted outage" in down.error
    outage.unlink()
    assert double.generate([_req("again")])[0].text == "again"
    for bad, said in [("scripted:echo?delay=soon", "delay=soon: expected seconds"),
                      ("scripted:echo?delay=-1", "delay=-1: expected seconds"),
                      ("scripted:echo?delay=inf", "delay=inf: expected seconds"),
                      ("scripted:echo?delay=1&delay=2", "each test-double option once"),
                      ("scripted:echo?slow=1", "unknown or empty test-double option 'slow'"),
                      ("scripted:echo?delay", "expected ?<option>=<value>")]:
        with pytest.raises(ConfigError, match=re.escape(said)):
            get_backend(bad)


def test_cache_second_identical_run_makes_zero_backend_calls(tmp_path):
    register_script("count-words", lambda r: f"{len(r.messages[-1]['content'].split())} words")
    inner = ScriptedBackend(parse_model_spec("scripted:count-words"))
    cached = CachedBackend(inner, ResponseCache(tmp_path / "cache.sqlite"))
    reqs = [_req(p) for p in PROMPTS]
    first = cached.generate(reqs)
    assert inner.calls == len(PROMPTS) and not any(r.cached for r in first)
    second = CachedBackend(inner, ResponseCache(tmp_path / "cache.sqlite")).generate(reqs)  # a new process would
    assert inner.calls == len(PROMPTS), "a cache hit must not call the backend"
    assert [r.text for r in second] == [r.text for r in first] and all(r.cached for r in second)


def test_cache_keeps_replicates_distinct_only_when_sampling(tmp_path):
    inner = ScriptedBackend(parse_model_spec("scripted:echo"))
    cached = CachedBackend(inner, ResponseCache(tmp_path / "c.sqlite"))
    greedy = [ChatRequest(messages=[{"role": "user", "content": "x"}], replicate=k) for k in range(3)]
    cached.generate(greedy)
    cached.generate(greedy)
    assert inner.calls == 3  # first run: 3 requests (one batch); replicates of a greedy call share one entry
    assert len(cached.cache) == 1
    sampled = [ChatRequest(messages=[{"role": "user", "content": "x"}],
                           config=GenerationConfig(temperature=0.7), replicate=k) for k in range(3)]
    cached.generate(sampled)
    assert len(cached.cache) == 4


def test_failed_requests_are_not_cached_and_do_not_fail_the_batch(tmp_path):
    def flaky(r):
        if "boom" in r.messages[-1]["content"]:
            raise RuntimeError("scripted failure")
        return "fine"

    inner = ScriptedBackend(parse_model_spec("scripted:x"), responder=flaky)
    cached = CachedBackend(inner, ResponseCache(tmp_path / "c.sqlite"))
    res = cached.generate([_req("a"), _req("boom"), _req("b")])
    assert [r.ok for r in res] == [True, False, True] and "scripted failure" in res[1].error
    assert len(cached.cache) == 2


def test_the_cache_works_with_a_real_backend(tiny, tmp_path):
    cached = CachedBackend(tiny, ResponseCache(tmp_path / "c.sqlite"))
    a = cached.generate([_req(p) for p in PROMPTS[:3]])
    b = cached.generate([_req(p) for p in PROMPTS[:3]])
    assert [r.text for r in a] == [r.text for r in b] and all(r.cached for r in b)


@pytest.mark.slow
def test_smollm2_answers_a_factual_question(smollm2_model):
    backend = get_backend("SmolLM2-135M")
    r, long = backend.generate([ChatRequest(
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        config=GenerationConfig(max_new_tokens=40)), _req("Write a long story about a dragon.", max_new_tokens=40)])
    assert r.ok and "Paris" in r.text
    # the short answer ended on EOS while its batch-mate went on to the cap: it stopped, it was not cut
    assert (r.finish_reason, long.finish_reason) == ("stop", "length")
    assert r.completion_tokens < 20 and long.completion_tokens == 40


def test_vllm_backend_says_what_is_missing(monkeypatch):
    """Runs in every environment: where vllm is installed, its absence is simulated (``import vllm`` fails as
    it does on a worker without it), instead of skipping."""
    monkeypatch.setitem(sys.modules, "vllm", None)  # None in sys.modules: `import vllm` raises ImportError
    with pytest.raises(ConfigError, match="the vllm package is not installed"):
        get_backend("vllm:tiny-llama")


def test_model_specs():
    s = parse_model_spec("Qwen3-8Bnt+runs/models/Qwen3-8B_safe_q32_s0/adapter")
    assert (s.backend, s.model, s.load_id, s.enable_thinking) == ("hf", "Qwen/Qwen3-8Bnt", "Qwen/Qwen3-8B", False)
    assert s.adapter == "runs/models/Qwen3-8B_safe_q32_s0/adapter" and s.name == "dpo_Qwen3-8B_safe_q32_s0"
    assert parse_model_spec("SmolLM2-135M").model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert parse_model_spec("vllm:Qwen3-8B").backend == "vllm"
    assert parse_model_spec("gpt-5-mini").backend == "openai" == parse_model_spec("openai:my-served-model").backend
    for bad in ("", "x+", "+a", "openai:gpt-5+adapter"):
        with pytest.raises(ConfigError):
            parse_model_spec(bad)


def test_llm_chat_command(tiny_model):
    from tests.conftest import run_agentpipe

    r = run_agentpipe("llm", "chat", "--model", str(tiny_model), "--max-new-tokens", "6", "Delete all my old files.")
    assert r.returncode == 0, r.stderr
    expected = get_backend(str(tiny_model)).generate([ChatRequest(
        messages=[{"role": "user", "content": "Delete all my old files."}],
        config=GenerationConfig(max_new_tokens=6))])[0].text
    assert r.stdout == expected + "\n"
    assert "prompt +" in r.stderr and "completion tokens" in r.stderr
