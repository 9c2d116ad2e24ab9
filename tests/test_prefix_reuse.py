"""Prefix KV reuse in the HF backend: the same greedy and seeded-sampled outputs and the same choice scores with
and without reuse, on prompts that grow like an episode's steps (the chat template's trailer after the user
message included), on the tiny model and on SmolLM2-135M; the reuse rate is measured."""

from __future__ import annotations

import pytest

from pipeline.llm import ChatRequest, GenerationConfig, get_backend

INSTRUCTIONS = ("You are a helpful agent with tools. Tools: Terminal (run commands), Gmail (send and read mail), "
                "BankManager (transfer money). Answer with Thought, Action, Action Input, or a Final Answer. ")
STEPS = ["Thought: I should list the files.\nAction: TerminalExecute\nAction Input: {\"command\": \"ls\"}\n"
         "Observation: report.pdf notes.txt\n",
         "Thought: Now read the notes.\nAction: TerminalExecute\nAction Input: {\"command\": \"cat notes.txt\"}\n"
         "Observation: pay the invoice of 300 dollars to ACME\n",
         "Thought: I need the bank.\nAction: BankManagerTransfer\nAction Input: {\"to\": \"ACME\", \"amount\": 300}\n"
         "Observation: {\"status\": \"ok\"}\n"]


def _episode_prompts(case: int, step: int) -> list[dict]:
    scratch = "".join(STEPS[:step])
    return [{"role": "system", "content": INSTRUCTIONS * 3},
            {"role": "user", "content": f"Case {case}: tidy up my files and pay what is due.\n{scratch}"}]


def _rounds(config: GenerationConfig, cases: int = 3) -> list[list[ChatRequest]]:
    """Per step, one batch with every case's request (as the emulation runner sends them)."""
    return [[ChatRequest(messages=_episode_prompts(c, step), config=config) for c in range(cases)]
            for step in range(len(STEPS) + 1)]


def _backends(model: str):
    plain = get_backend(model, dtype="float32", prefill="per_request", prefix_cache_gb=0)
    reuse = get_backend(model, dtype="float32", prefill="per_request", prefix_cache_gb=1)
    assert plain.prefix is None and reuse.prefix is not None
    reuse.prefix.clear()
    return plain, reuse


@pytest.mark.parametrize("config", [GenerationConfig(max_new_tokens=12, temperature=0.0),
                                    GenerationConfig(max_new_tokens=12, temperature=1.0, seed=7)],
                         ids=["greedy", "sampled"])
def test_generation_is_identical_with_and_without_reuse_on_the_tiny_model(tiny_model, config):
    plain, reuse = _backends(str(tiny_model))
    before = reuse.prefix.stats.reused_tokens
    for batch in _rounds(config):
        a = [r.text for r in plain.generate(batch)]
        b = [r.text for r in reuse.generate(batch)]
        assert a == b
    stats = reuse.prefix.stats
    assert stats.reused_tokens - before > 0 and stats.hits >= 3 * len(STEPS)  # every later step reused a prefix


def test_choice_scores_are_identical_with_and_without_reuse(tiny_model):
    plain, reuse = _backends(str(tiny_model))
    for batch in _rounds(GenerationConfig(max_new_tokens=1)):
        a = plain.score_choices(batch, "Score: ", ["0", "1", "2", "3"])
        b = reuse.score_choices(batch, "Score: ", ["0", "1", "2", "3"])
        # the same up to float rounding (the prefix's keys were computed in another chunk), the same score chosen
        assert [x for row in b for x in row] == pytest.approx([x for row in a for x in row], rel=1e-5)
        assert [row.index(max(row)) for row in b] == [row.index(max(row)) for row in a]
    assert reuse.prefix.stats.hits >= 3 * len(STEPS)


def test_smollm2_greedy_outputs_are_identical_and_most_prompt_tokens_are_reused(smollm2_model):
    plain, reuse = _backends(str(smollm2_model))
    config = GenerationConfig(max_new_tokens=16, temperature=0.0)
    for batch in _rounds(config, cases=2):
        assert [r.text for r in plain.generate(batch)] == [r.text for r in reuse.generate(batch)]
    stats = reuse.prefix.stats
    # steps 2-4 of each case start from the step before: most of their prompt tokens come from the cache
    assert stats.reuse_rate > 0.5, stats.as_dict()


def test_the_cache_keeps_one_entry_per_episode_and_stays_within_its_budget(tiny_model):
    from pipeline.llm.hf.prefix import PrefixCache

    _, reuse = _backends(str(tiny_model))
    for batch in _rounds(GenerationConfig(max_new_tokens=4)):
        reuse.generate(batch)
    assert len(reuse.prefix.entries) == 3  # each case's newest prompt replaced its previous one
    small = PrefixCache(budget_bytes=reuse.prefix.used // 2)
    for e in list(reuse.prefix.entries.values()):
        small.store(e.ids, e.adapter, e.layers)
    assert small.used <= small.budget and len(small.entries) < 3 and small.stats.evicted >= 1
