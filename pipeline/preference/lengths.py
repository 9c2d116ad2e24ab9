"""Dropping (never truncating) preference pairs that are too long for a model's chat template (SPEC §6.2).

A pair is dropped when ``len(template(prompt))`` (with the generation prompt) exceeds ``max_prompt_length`` or when
``len(template(prompt + chosen))`` or ``len(template(prompt + rejected))`` exceeds ``max_length``. Token counts are
cached per distinct message list, so a pair set with thousands of pairs over a few thousand trajectories is
tokenised once per trajectory.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class TokenCounter:
    """Chat-template token counts, cached by message content."""

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            from pipeline.errors import ConfigError

            raise ConfigError(f"tokenizer '{getattr(tokenizer, 'name_or_path', tokenizer)}' has no chat template")
        self.tok = tokenizer
        self._cache: dict[tuple[str, bool], int] = {}

    def count(self, messages: list[dict[str, str]], *, generation_prompt: bool = False) -> int:
        key = (hashlib.sha1(json.dumps(messages, ensure_ascii=False).encode()).hexdigest(), generation_prompt)
        n = self._cache.get(key)
        if n is None:
            ids = self.tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
            if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
                ids = ids["input_ids"]
            n = len(ids)
            self._cache[key] = n
        return n


def too_long(pair: dict[str, Any], counter: TokenCounter, max_length: int, max_prompt_length: int) -> bool:
    prompt = pair["prompt"]
    if counter.count(prompt, generation_prompt=True) > max_prompt_length:
        return True
    return any(counter.count(prompt + pair[k]) > max_length for k in ("chosen", "rejected"))


def filter_by_length(pairs: Iterable[dict[str, Any]], tokenizer: Any, *, max_length: int = 8192,
                     max_prompt_length: int = 8192) -> tuple[list[dict[str, Any]], int]:
    """(kept pairs, number dropped)."""
    counter = TokenCounter(tokenizer)
    kept, dropped = [], 0
    for p in pairs:
        if too_long(p, counter, max_length, max_prompt_length):
            dropped += 1
        else:
            kept.append(p)
    return kept, dropped


def length_tag(tokenizer: Any, max_length: int, max_prompt_length: int) -> str | None:
    """The name part of a length-filtered set: ``tok-<tokenizer folder>[_ml<N>][_mpl<N>]`` (None unfiltered)."""
    if tokenizer is None:
        return None
    tok_name = Path(str(getattr(tokenizer, "name_or_path", "") or "tokenizer").rstrip("/")).name
    tag = "tok-" + re.sub(r"[^A-Za-z0-9.-]+", "-", tok_name)
    if max_length != 8192:
        tag += f"_ml{max_length}"
    if max_prompt_length != 8192:
        tag += f"_mpl{max_prompt_length}"
    return tag
