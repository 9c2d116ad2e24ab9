"""Decoding on CPU without copying the key/value cache per token (issue 27): grouped-query attention with a mask
(``pipeline.llm.hf.attention``) and a cache written in place (``pipeline.llm.hf.growing_cache``), both giving
transformers' own values exactly."""

import pytest
import torch

from pipeline.llm import ChatRequest, GenerationConfig, get_backend

PROMPTS = ["Delete all my old files.", "Send $500 to Bob", "What is the weather like in Paris today?", "hi"]


@pytest.fixture(scope="module")
def gqa_model(tiny_model, tmp_path_factory):
    """The tiny model's tokenizer with a grouped-query model (2 query heads per key/value head), random weights."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(tiny_model)
    cfg.num_attention_heads, cfg.num_key_value_heads = 2, 1
    cfg.initializer_range = 0.2  # logits far enough apart that greedy choices are not ties
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("gqa")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


def _padded(tok, texts):
    tok.padding_side = "left"
    return tok(texts, return_tensors="pt", padding=True)


def _decode(model, enc, steps):
    """Greedy decoding by hand: per step, the logits of every row (padded batch: the mask is in play)."""
    from transformers import DynamicCache

    ids, mask = enc["input_ids"], enc["attention_mask"]
    cache, out_logits = DynamicCache(config=model.config), []
    out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    for _ in range(steps):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        out_logits.append(out.logits[:, -1])
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        out = model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
    return torch.stack(out_logits)


def test_grouped_decode_attention_gives_sdpa_values_bit_for_bit_without_repeating_the_cache(gqa_model, monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.llm.hf.attention import NAME, use_on_cpu

    tok = AutoTokenizer.from_pretrained(gqa_model)
    model = AutoModelForCausalLM.from_pretrained(gqa_model, dtype=torch.float32).eval()
    assert model.config._attn_implementation == "sdpa"
    enc = _padded(tok, PROMPTS)
    assert not bool(enc["attention_mask"].all()), "a padded batch: the masked path is what is tested"
    repeats = []
    real_repeat = sdpa.repeat_kv
    monkeypatch.setattr(sdpa, "repeat_kv", lambda x, n: repeats.append(x.shape) or real_repeat(x, n))
    with torch.inference_mode():
        plain = _decode(model, enc, 6)
        plain_repeats = len(repeats)
        use_on_cpu(model)
        assert model.config._attn_implementation == NAME
        repeats.clear()
        grouped = _decode(model, enc, 6)
    assert plain_repeats > 0, "transformers' SDPA repeats the cache when masked: this test must see it"
    # only the prefill (many query positions, transformers' own path) repeats; no decoded token does
    assert len(repeats) == 2 * model.config.num_hidden_layers
    assert torch.equal(grouped, plain)
    assert len({tuple(r) for r in grouped.argmax(-1).tolist()}) > 1


def test_growing_layer_writes_in_place_and_holds_what_a_dynamic_layer_holds():
    from transformers.cache_utils import DynamicLayer

    from pipeline.llm.hf.growing_cache import GrowingLayer

    torch.manual_seed(0)
    ref, grow = DynamicLayer(), GrowingLayer(room=4)
    prefix = (torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8))
    kept = [t.clone() for t in prefix]
    ref.update(*prefix)
    grow.update(*prefix)
    buffers = set()
    for step in range(10):  # past the room of 4: the buffer doubles once, and values stay right
        kv = (torch.randn(3, 2, 1, 8), torch.randn(3, 2, 1, 8))
        rk, rv = ref.update(*kv)
        gk, gv = grow.update(*kv)
        assert torch.equal(gk, rk) and torch.equal(gv, rv)
        buffers.add(gk.data_ptr())
    assert len(buffers) == 2, "written in place: one new buffer when the room ran out, not one per token"
    assert all(torch.equal(a, b) for a, b in zip(prefix, kept)), "the caller's tensors are never written to"
    ref.crop(-3)
    grow.crop(-3)
    kv = (torch.randn(3, 2, 2, 8), torch.randn(3, 2, 2, 8))
    assert all(torch.equal(a, b) for a, b in zip(grow.update(*kv), ref.update(*kv)))
    idx = torch.tensor([2, 0])
    ref.batch_select_indices(idx)
    grow.batch_select_indices(idx)
    kv = (torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8))
    assert all(torch.equal(a, b) for a, b in zip(grow.update(*kv), ref.update(*kv)))


def _req(text):
    return ChatRequest(messages=[{"role": "user", "content": text}], config=GenerationConfig(max_new_tokens=12))


def _plain_generate(model_dir, backend, prompts, n=12):
    """Each prompt alone through plain ``generate`` (transformers' SDPA and cache), decoded as the backend does."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok, out = backend.tok, []
    for p in prompts:
        ids = tok(backend.render(_req(p).messages), return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            seq = plain.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        new = [t for t in seq[0, ids["input_ids"].shape[1]:].tolist() if t not in backend._eos_ids()]
        out.append(tok.decode(new, skip_special_tokens=True))
    return out


@pytest.mark.parametrize("prefill", ["per_request", "batched"])
def test_the_backend_decodes_a_grouped_query_model_as_transformers_generate_does(gqa_model, prefill, monkeypatch):
    """Batched, grouped attention, growing cache (after a per-request or a padded batched prefill): each row's
    tokens are those of plain ``generate`` on that prompt alone."""
    from pipeline.llm.hf import growing_cache as gc
    from pipeline.llm.hf.attention import NAME

    made = []
    real = gc.growing_cache
    monkeypatch.setattr(gc, "growing_cache", lambda *a: made.append(real(*a)) or made[-1])
    backend = get_backend(str(gqa_model), batch_size=4, dtype="float32", prefix_cache_gb=0, prefill=prefill)
    assert backend.model.config._attn_implementation == NAME
    batched = backend.generate([_req(p) for p in PROMPTS])
    expected = _plain_generate(gqa_model, backend, PROMPTS)
    assert [r.text for r in batched] == expected
    assert len(set(expected)) > 1
    assert len(made) == 1 and isinstance(made[0].layers[0], gc.GrowingLayer)
    assert made[0].get_seq_length() > 12, "the growing cache is the one generate decoded into"


def test_a_model_whose_generation_config_names_a_cache_keeps_transformers_cache(gqa_model):
    """transformers refuses a caller's cache next to ``generation_config.cache_implementation``: such a model
    gets none from the backend, and answers as before."""
    backend = get_backend(str(gqa_model), batch_size=4, dtype="float32", prefix_cache_gb=0)
    expected = [r.text for r in backend.generate([_req(p) for p in PROMPTS])]
    backend.model.generation_config.cache_implementation = "dynamic"
    try:
        for prefill in (True, False):
            backend.prefill_per_request = prefill
            answers = backend.generate([_req(p) for p in PROMPTS])
            assert all(r.ok for r in answers), answers[0].error
            assert [r.text for r in answers] == expected
    finally:
        backend.model.generation_config.cache_implementation = None
        backend.prefill_per_request = True


def test_a_reset_growing_layer_starts_a_new_buffer():
    from pipeline.llm.hf.growing_cache import GrowingLayer

    layer = GrowingLayer(room=4)
    layer.update(torch.zeros(4, 2, 3, 8), torch.zeros(4, 2, 3, 8))
    layer.reset()
    k, v = layer.update(torch.ones(1, 2, 3, 8, dtype=torch.bfloat16), torch.ones(1, 2, 3, 8, dtype=torch.bfloat16))
    assert k.shape == (1, 2, 3, 8) and k.dtype == torch.bfloat16 and bool((k == 1).all())


def test_left_padded_cache_holds_each_row_right_aligned_over_zeros(gqa_model):
    from transformers import AutoConfig

    from pipeline.llm.hf.growing_cache import GrowingLayer, left_padded_cache

    cfg = AutoConfig.from_pretrained(gqa_model)
    torch.manual_seed(0)
    lengths = [3, 7, 5]
    rows = [[(torch.randn(1, 1, n, 64), torch.randn(1, 1, n, 64)) for _ in range(cfg.num_hidden_layers)]
            for n in lengths]
    kept = [[(k.clone(), v.clone()) for k, v in row] for row in rows]
    model = type("CpuModel", (), {"config": cfg, "device": torch.device("cpu"),
                                  "generation_config": type("G", (), {"cache_implementation": None})()})()
    cache = left_padded_cache(model, rows, width=7, room=4)
    for i, layer in enumerate(cache.layers):
        assert isinstance(layer, GrowingLayer) and layer.get_seq_length() == 7
        for j, kv in enumerate((layer.keys, layer.values)):
            expected = torch.cat([torch.nn.functional.pad(row[i][j], (0, 0, 7 - n, 0))
                                  for row, n in zip(rows, lengths)])
            assert torch.equal(kv, expected)
    ptr = cache.layers[0].keys.data_ptr()
    cache.update(torch.ones(3, 1, 1, 64), torch.ones(3, 1, 1, 64), 0)
    assert cache.layers[0].keys.data_ptr() == ptr and cache.get_seq_length() == 8
    assert all(torch.equal(a, b) for row, old in zip(rows, kept) for (a, c), (b, d) in zip(row, old)
               for a, b in ((a, b), (c, d)))
