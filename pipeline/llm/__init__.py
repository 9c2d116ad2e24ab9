"""One batched chat interface over HF transformers, vLLM, OpenAI-compatible APIs and the scripted test double.

    backend = get_backend("SmolLM2-135M")                       # HF transformers, local
    responses = backend.generate([ChatRequest(messages=[...], config=GenerationConfig(max_new_tokens=64))])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.llm.base import ChatBackend
from pipeline.llm.spec import ModelSpec, parse_model_spec
from pipeline.llm.types import ChatRequest, ChatResponse, GenerationConfig, Message

__all__ = ["ChatBackend", "ChatRequest", "ChatResponse", "GenerationConfig", "Message", "ModelSpec",
           "get_backend", "parse_model_spec"]


def get_backend(spec: str | ModelSpec, *, cache: str | Path | None = None, **options: Any) -> ChatBackend:
    """The backend for a model spec string. ``cache`` = path of a SQLite response cache (opt-in).

    Options go to the backend: HF ``batch_size``/``dtype``/``quantization``; vLLM ``max_model_len``/
    ``quantization``; OpenAI ``concurrency``/``timeout_s``/``base_url``. Unknown options raise TypeError.
    """
    ms = parse_model_spec(spec) if isinstance(spec, str) else spec
    backend: ChatBackend
    if ms.backend == "hf":
        from pipeline.llm.hf import HFBackend

        backend = HFBackend(ms, **options)
    elif ms.backend == "vllm":
        from pipeline.llm.vllm_backend import VLLMBackend

        backend = VLLMBackend(ms, **options)
    elif ms.backend == "openai":
        from pipeline.llm.openai_backend import OpenAIBackend

        options.pop("quantization", None)  # meaningless for an API
        backend = OpenAIBackend(ms, **options)
    else:
        from pipeline.llm.scripted import ScriptedBackend

        backend = ScriptedBackend(ms, **options)
    if cache is not None:
        from pipeline.llm.cache import CachedBackend, ResponseCache

        backend = CachedBackend(backend, ResponseCache(cache))
    return backend
