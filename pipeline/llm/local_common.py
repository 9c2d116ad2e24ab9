"""What the two local backends (HF transformers, vLLM) share, so that neither imports the other: the default token
cap, a model folder's revision, the prompt a model sees and the single-token choices of choice scoring."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.llm.spec import ModelSpec

#: The study caps every HF call at 2048 new tokens (SPEC §2.4); used when a request sets no cap.
DEFAULT_MAX_NEW_TOKENS = 2048


def folder_revision(path: str | Path) -> str:
    """A short digest identifying a local model/adapter folder (config + weight file names, sizes, mtimes)."""
    p = Path(path)
    h = hashlib.sha256()
    for f in sorted(p.iterdir()) if p.is_dir() else []:
        if f.is_file() and (f.suffix in (".json", ".safetensors", ".bin", ".jinja", ".model")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def single_token_choices(encode: Any, head: str, choices: Sequence[str]) -> list[int] | None:
    """The token id of each choice when every choice is exactly one distinct token after ``head`` (``encode``:
    text → token ids), else None. Shared by the HF and vLLM backends' choice scoring."""
    head_ids = encode(head)
    ids = []
    for choice in choices:
        full = encode(head + choice)
        if len(full) != len(head_ids) + 1 or full[:-1] != head_ids:
            return None
        ids.append(full[-1])
    return ids if len(set(ids)) == len(ids) else None


def render_prompt(tok: Any, spec: ModelSpec, messages: list[dict[str, str]]) -> str:
    """The prompt text a model sees: its chat template with the generation prompt (Qwen3 ``…Bnt`` ids with
    thinking disabled). Shared by the HF and vLLM backends, so both feed the model the same tokens."""
    kwargs = {"enable_thinking": False} if spec.enable_thinking is False else {}
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
