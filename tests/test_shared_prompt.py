"""One backbone pass per preference pair (issue 27): the packed [prompt | chosen | rejected] sequence gives each row
the hidden states, log-probabilities and gradients of trl's two-row layout."""

from __future__ import annotations

import pytest

from pipeline.training import shared_prompt


def _batch(vocab: int):
    """trl's layout for 3 pairs, right-padded: rows [c0, c1, c2, r0, r1, r2]. Pair 0 has a 9-token prompt; in pair 1
    the rejected completion is a prefix of the chosen one and the completions share their first token; pair 2 has
    no prompt and its rows differ from the first token on."""
    import torch

    g = torch.Generator().manual_seed(0)
    tok = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    p0, p1, shared = tok(9), tok(5), tok(1)
    c0, r0 = p0 + tok(4), p0 + tok(6)
    c1 = p1 + shared + tok(5)
    r1 = c1[:8]
    c2, r2 = tok(6), tok(4)
    r2[0] = 3 + (c2[0] - 3 + 1) % (vocab - 3)
    rows = [c0, c1, c2, r0, r1, r2]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = ids.masked_fill(mask == 0, -100)
    labels[[0, 3], :9] = -100
    labels[[1, 4], :5] = -100
    return ids, mask, labels


def test_packed_pairs_give_each_row_its_own_hidden_states_log_probs_and_gradients(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    ids, mask, labels = _batch(model.config.vocab_size)
    real = mask.bool()

    def run(shared: bool):
        model.zero_grad()
        if shared:
            with shared_prompt.active():
                out = model(input_ids=ids, attention_mask=mask)
        else:
            out = model(input_ids=ids, attention_mask=mask)
        logps = torch.log_softmax(out.logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        logps = (logps * (labels[:, 1:] != -100)).sum(1)
        logps.sum().backward()
        return out.logits.detach(), logps.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    plain_logits, plain_logps, plain_grad = run(False)
    assert shared_prompt.install(model)
    packed = shared_prompt.pack_pairs(ids, mask)
    # pair 0: 9 + 4 + 6 tokens; pair 1: 11 tokens (r1 is inside c1); pair 2: 6 + 4 tokens, nothing shared
    assert packed.input_ids.shape == (3, 19)
    logits, logps, grad = run(True)
    assert shared_prompt.counts(model) == {"packed": 1, "two_rows": 0}  # the model's own forward was packed
    torch.testing.assert_close(logits[real], plain_logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logps, plain_logps, rtol=1e-5, atol=1e-4)
    # the same gradient up to float32 rounding (the summation order differs: ~7e-6 of its norm)
    assert ((grad - plain_grad).norm() / plain_grad.norm()).item() < 1e-4
    # outside active(), or for a batch not in trl's layout, the model runs as it is
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, plain_logits)
    assert shared_prompt.pack_pairs(ids[:3], mask[:3]) is None
    assert shared_prompt.pack_pairs(ids, mask.flip(1)) is None  # left padding


def test_not_installed_where_attention_takes_no_boolean_mask_or_slides(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32, attn_implementation="eager")
    assert not shared_prompt.install(eager)
    ids, mask, _ = _batch(eager.config.vocab_size)
    with shared_prompt.active():
        out = eager(input_ids=ids, attention_mask=mask)
    assert out.logits.shape[:2] == ids.shape
    # a sliding window would be replaced by the packed mask: such models keep trl's layout
    sdpa = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    assert shared_prompt.supported(sdpa)
    sdpa.config.sliding_window = 8
    assert not shared_prompt.supported(sdpa) and not shared_prompt.install(sdpa)


@pytest.mark.parametrize("padded", [False, True])
def test_pack_maps_back_every_real_position(padded):
    import torch

    ids, mask, _ = _batch(100)
    if padded:
        ids = torch.nn.functional.pad(ids, (0, 3))
        mask = torch.nn.functional.pad(mask, (0, 3))
    packed = shared_prompt.pack_pairs(ids, mask)
    # unpacking the packed ids gives back every row's real tokens
    back = packed.unpack(packed.input_ids[..., None].float())[..., 0].long()
    assert torch.equal(back[mask.bool()], ids[mask.bool()])
    # positions restart after the shared prefix for the rejected tokens: they match each row's own positions
    pos_back = packed.unpack(packed.positions[..., None].float())[..., 0].long()
    assert torch.equal(pos_back[mask.bool()], torch.arange(ids.shape[1]).expand_as(ids)[mask.bool()])


def test_training_with_one_pass_per_pair_follows_trls_two_rows(tiny_model, tmp_path, monkeypatch):
    """The same DPO run with and without the shared prompt: the same losses, rewards and gradient norms (batches of
    2 pairs, so padding and pairs of different lengths are in play), and the metrics say which pass ran."""
    from pipeline.data import split
    from pipeline.stage import FingerprintMismatch
    from pipeline.training import train
    from tests.test_train import tiny_cfg, toy_pair, write_pairs

    monkeypatch.setenv("AGENTPIPE_HOME", str(tmp_path / "home"))
    pairs = write_pairs(tmp_path / "safe_toy.jsonl", [toy_pair(c, i) for c in split.train_cases(0)[:4]
                                                      for i in range(2)])
    runs = {}
    for share in (False, True):
        res = train(tiny_cfg(tiny_model, pairs, tmp_path / f"m-{share}", batch_size=2, max_steps=3, final_eval=False,
                             register_model=False, share_prompt=share, precompute_ref_log_probs=False))
        batches = res.metrics["shared_prompt_batches"]
        # policy and reference passes of 3 steps, all packed; none when off
        assert batches == ({"packed": 6, "two_rows": 0} if share else {}), batches
        runs[share] = [h for h in res.metrics["log_history"] if "loss" in h]
    assert len(runs[True]) == len(runs[False]) == 3
    for a, b in zip(runs[False], runs[True]):
        for key in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    assert runs[True][-1]["rewards/margins"] != 0  # the steps moved the policy: the comparison is not of zeros
    # the layout rounds differently: a model trained with it is not taken for one trained without it
    with pytest.raises(FingerprintMismatch, match="share"):
        train(tiny_cfg(tiny_model, pairs, tmp_path / "m-True", batch_size=2, max_steps=3, final_eval=False,
                       register_model=False, share_prompt=False, precompute_ref_log_probs=False))
