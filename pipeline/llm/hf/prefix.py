"""Reuse of the key/value cache of earlier prompts (the HF backend's prefix reuse).

An agent's prompt at step k+1 is its prompt at step k plus a few hundred tokens (the scratchpad grows; only the
chat template's trailer after the user message differs at the end). For a causal model the keys and values of a
prompt's first n tokens depend on those n tokens only, so the cache of an earlier prompt that shares the first n
tokens can be cropped to n and only the rest prefilled.

``PrefixCache`` keeps the per-layer (keys, values) of recent prompts, per loaded model and adapter, within a
byte budget; a lookup returns the entry with the longest common token prefix. An entry a new prompt extends
(the same episode one step later: the common prefix covers most of it) is replaced by the new one, so an
episode holds one entry however long it runs and a round of N episodes fits in N entries; otherwise the least
recently used entries go first.

``forward_reusing`` runs one unpadded prompt from its longest cached prefix (and caches its own keys and values in
turn); ``prefill_alone`` builds a batch's cache from such passes, one prompt at a time. ``PREFIX_CACHES`` holds one
``PrefixCache`` per loaded model, shared by every backend on those weights (an agent and its emulator).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

#: A hit shorter than this many tokens is not worth a cache copy (the chat template's header alone).
MIN_REUSE_TOKENS = 32
#: A new prompt that shares at least this fraction of an entry's tokens continues it: the entry is replaced.
CONTINUES = 0.8


@dataclass
class _Entry:
    ids: Any  # 1-D int64 tensor of the prompt's token ids (CPU)
    adapter: str | None
    layers: list[tuple[Any, Any]]  # per layer (keys, values), shape (1, heads, tokens, dim)
    nbytes: int


@dataclass
class PrefixStats:
    """Prompt tokens looked up, tokens served from the cache, lookups and hits."""

    lookups: int = 0
    hits: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    evicted: int = 0

    @property
    def reuse_rate(self) -> float:
        """Share of prompt tokens whose keys and values came from the cache."""
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"lookups": self.lookups, "hits": self.hits, "prompt_tokens": self.prompt_tokens,
                "reused_tokens": self.reused_tokens, "evicted": self.evicted,
                "reuse_rate": round(self.reuse_rate, 4)}


class PrefixCache:
    """Key/value caches of recent prompts within ``budget_bytes`` (see the module docstring)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = int(budget_bytes)
        self.entries: OrderedDict[int, _Entry] = OrderedDict()
        self.used = 0
        self.stats = PrefixStats()
        self._next = 0

    def lookup(self, ids: Any, adapter: str | None) -> tuple[int, int | None, list[tuple[Any, Any]]]:
        """(n, entry key, layers cropped to n) for the longest common prefix with a cached prompt of the same
        adapter; n = 0 (and no layers) when none shares ``MIN_REUSE_TOKENS``. ``ids``: 1-D CPU tensor."""
        import torch

        self.stats.lookups += 1
        self.stats.prompt_tokens += int(ids.numel())
        best, best_key = 0, None
        for key, e in self.entries.items():
            if e.adapter != adapter:
                continue
            m = min(int(e.ids.numel()), int(ids.numel()))
            if m <= best:
                continue
            same = torch.eq(e.ids[:m], ids[:m])
            n = m if bool(same.all()) else int(torch.argmin(same.to(torch.int8)))
            if n > best:
                best, best_key = n, key
        if best < MIN_REUSE_TOKENS or best_key is None:
            return 0, None, []
        entry = self.entries[best_key]
        self.entries.move_to_end(best_key)
        self.stats.hits += 1
        self.stats.reused_tokens += best
        return best, best_key, [(k[:, :, :best], v[:, :, :best]) for k, v in entry.layers]

    def store(self, ids: Any, adapter: str | None, layers: list[tuple[Any, Any]],
              continues: tuple[int, int | None] = (0, None)) -> None:
        """Keep a prompt's cache (``layers`` are not modified later by the caller); ``continues`` = (n, key) of
        the lookup that served it: that entry is dropped when the new prompt covers most of it."""
        n, key = continues
        if key is not None and key in self.entries and n >= CONTINUES * int(self.entries[key].ids.numel()):
            self._drop(key)
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if nbytes > self.budget:
            return
        while self.entries and self.used + nbytes > self.budget:
            self._drop(next(iter(self.entries)))
            self.stats.evicted += 1
        self._next += 1
        self.entries[self._next] = _Entry(ids.clone(), adapter, list(layers), nbytes)
        self.used += nbytes

    def _drop(self, key: int) -> None:
        self.used -= self.entries.pop(key).nbytes

    def clear(self) -> None:
        """Forget every entry and the counts."""
        self.entries.clear()
        self.used = 0
        self.stats = PrefixStats()


def default_budget_bytes(device_type: str) -> int:
    """4 GiB on CPU (at most a quarter of the machine's memory); on a GPU a fifth of its free memory."""
    if device_type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free * 0.2)
    try:
        import os

        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 * 2**30
    return int(min(4 * 2**30, total // 4))


#: loaded model key → its prompt-prefix KV cache (shared by every backend on those weights: agent and emulator)
PREFIX_CACHES: dict[tuple, PrefixCache] = {}


def forward_reusing(model: Any, prefix: PrefixCache | None, ids: Any, name: str | None, adapter: dict[str, Any],
                    keep: int = 1) -> tuple[Any, Any]:
    """One unpadded prompt's forward pass (logits of its last ``keep`` tokens) and its plain DynamicCache, starting
    from the longest cached prefix when ``prefix`` has one; the result is cached in turn. The cache is None for
    models whose cache is not a plain DynamicCache (nothing is reused or kept: the caller stops reusing)."""
    from transformers import DynamicCache

    row = ids[0].cpu()
    n, key, layers = prefix.lookup(row, name) if prefix is not None else (0, None, [])
    n = min(n, int(row.numel()) - keep)  # the last ``keep`` tokens run: their logits are wanted
    if n > 0:
        past = DynamicCache(ddp_cache_data=[(k[:, :, :n], v[:, :, :n]) for k, v in layers], config=model.config)
        out = model(input_ids=ids[:, n:], use_cache=True, logits_to_keep=keep, **{cache_keyword(): past}, **adapter)
    else:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=keep, **adapter)
    _, cache = output_cache(out)
    if cache is None or type(cache) is not DynamicCache or any(
            type(layer).__name__ != "DynamicLayer" for layer in cache.layers):
        return out, None  # this model's cache cannot be cropped and padded
    if prefix is not None:
        prefix.store(row, name, [(layer.keys, layer.values) for layer in cache.layers], (n, key))
    return out, cache


def prefill_alone(forward: Any, model: Any, enc: Any, names: list[str] | None = None,
                  room: int = 0) -> tuple[str, Any] | None:
    """The batch's KV cache over all but each prompt's last token, computed one unpadded prompt at a time
    (identical prompts, e.g. an evaluation's replicates, once; ``forward(ids, name, adapter)`` is the backend's
    ``forward_reusing``) and left-padded into one cache (``left_padded_cache``: on CPU with ``room`` positions for
    the tokens to be decoded), with the keyword ``generate`` takes it by; None (use the batched prefill) when the
    model's cache is not a plain one or ``generate`` takes none from the caller."""
    from pipeline.llm.hf.growing_cache import left_padded_cache, takes_a_cache

    if not takes_a_cache(model):
        return None
    ids, mask = enc["input_ids"], enc["attention_mask"]
    width = ids.shape[1] - 1
    rows, done = [], {}
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        if n < 2:
            return None
        head = ids[row:row + 1, ids.shape[1] - n:-1]
        name = names[row] if names is not None else None
        key = (tuple(head[0].tolist()), name)
        if key not in done:
            _, cache = forward(head, name, {"adapter_names": [name]} if names is not None else {})
            if cache is None:
                return None  # sliding-window or hybrid caches: not padded here
            done[key] = cache
        rows.append(done[key])
    return cache_keyword(), left_padded_cache(model, [[(layer.keys, layer.values) for layer in c.layers]
                                                      for c in rows], width, room)


def output_cache(out: Any) -> tuple[str, Any]:
    """(keyword, cache) of a forward pass's KV cache: transformers 5.2x calls it ``cache``, earlier 5.x lines
    (the one vLLM pins) ``past_key_values``; ``generate`` takes it by the same name."""
    fields = getattr(out, "__dataclass_fields__", {})
    name = "cache" if "cache" in fields else "past_key_values"
    return name, getattr(out, name, None)


def cache_keyword() -> str:
    """The keyword a forward pass takes its KV cache by (the name of the output field, see ``output_cache``)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
