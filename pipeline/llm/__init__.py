"""One batched chat interface over HF transformers, vLLM, OpenAI-compatible APIs and the scripted test double.

    backend = get_backend("SmolLM2-135M")                       # HF transformers, local
    responses = backend.generate([ChatRequest(messages=[...], config=GenerationConfig(max_new_tokens=64))])
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.llm.base import ChatBackend
from pipeline.llm.spec import ModelSpec, parse_model_spec
from pipeline.llm.types import ChatRequest, ChatResponse, GenerationConfig, Message

__all__ = ["ChatBackend", "ChatRequest", "ChatResponse", "GenerationConfig", "Message", "ModelSpec",
           "get_backend", "get_backends", "parse_model_spec", "register_backend"]

#: Options only local backends understand; dropped for API models and test doubles, so one option set can
#: serve every role of a stage.
LOCAL_ONLY = ("batch_size", "dtype", "quantization", "prefill", "max_model_len", "gpu_memory_utilization",
              "tensor_parallel_size", "enforce_eager", "max_loras", "max_lora_rank", "prefix_cache_gb")


def settings_not_sent(spec: str, config: GenerationConfig) -> list[str]:
    """The settings of ``config`` that the model of ``spec`` is not sent (only OpenAI models leave any out; see
    ``openai_backend.settings_not_sent``), for a stage's fingerprint. Raises ``ConfigError`` for a setting the
    model cannot take that is not its default."""
    ms = parse_model_spec(spec)
    if ms.backend != "openai":
        return []
    from pipeline.llm.openai_backend import OpenAIBackend, settings_not_sent as family_rules

    return family_rules(ms.model, config, send_sampling=OpenAIBackend.send_sampling_to_reasoning,
                        send_stop=OpenAIBackend.send_stop_to_gpt)


#: backend kind → the factory of a backend that lives above this layer (``replay:`` lives with the stages it
#: replays; ``register_backend`` is called where it is defined)
_REGISTERED: dict[str, Callable[[ModelSpec], ChatBackend]] = {}


def register_backend(kind: str, factory: Callable[[ModelSpec], ChatBackend]) -> None:
    """Make ``get_backend`` build specs of ``kind`` (e.g. ``replay``) with ``factory``."""
    _REGISTERED[kind] = factory


def get_backend(spec: str | ModelSpec, *, cache: str | Path | None = None, **options: Any) -> ChatBackend:
    """The backend for a model spec string. ``cache`` = path of a SQLite response cache (opt-in).

    Options go to the backend: HF and vLLM the names in ``pipeline.llm.options`` (``dtype``, ``quantization``,
    ``batch_size``, vLLM engine options); OpenAI ``concurrency``/``timeout_s``/``base_url``. Local-only options
    are dropped for API models and test doubles; other unknown options raise TypeError.
    """
    ms = parse_model_spec(spec) if isinstance(spec, str) else spec
    if ms.backend in ("openai", "scripted", "replay"):
        options = {k: v for k, v in options.items() if k not in LOCAL_ONLY}
    backend: ChatBackend
    if ms.backend == "hf":
        from pipeline.llm.hf import HFBackend

        backend = HFBackend(ms, **options)
    elif ms.backend == "vllm":
        from pipeline.llm.vllm_backend import VLLMBackend

        backend = VLLMBackend(ms, **options)
    elif ms.backend == "openai":
        from pipeline.llm.openai_backend import OpenAIBackend

        backend = OpenAIBackend(ms, **options)
    elif ms.backend in _REGISTERED:
        backend = _REGISTERED[ms.backend](ms)
    elif ms.backend == "replay":
        raise ConfigError(f"{ms.raw}: the replay backend is registered by pipeline.emulation.replay (emulate's agent "
                          "and emulator; a judge replays through pipeline.evaluation.replay.ReplayJudge): import it "
                          "first")
    else:
        from pipeline.llm.scripted import ScriptedBackend

        backend = ScriptedBackend(ms, **options)
    if cache is not None:
        from pipeline.llm.cache import CachedBackend, ResponseCache

        backend = CachedBackend(backend, ResponseCache(cache))
    return backend


def get_backends(roles: dict[str, tuple[str, dict[str, Any]]], *,
                 caches: dict[str, str | Path | None] | None = None) -> dict[str, ChatBackend]:
    """Backends for several roles of one process (role → (spec, options)), e.g. an agent and an emulator.

    Roles that name the same weights share them (one vLLM engine, one loaded HF model). vLLM engines of
    different models split the memory budget: each gets ``gpu_memory_utilization`` (the roles' value, else the
    default) divided by the number of distinct engines, so two models never ask for 0.85 each.
    """
    parsed = {role: parse_model_spec(spec) for role, (spec, _) in roles.items()}
    engines: set[tuple] = set()
    budget: float | None = None
    for role, (_, opts) in roles.items():
        if parsed[role].backend == "vllm":
            from pipeline.llm.vllm_backend import engine_args, engine_key

            args = {k: v for k, v in opts.items() if k not in ("gpu_memory_utilization", "batch_size", "prefill",
                                                               "prefix_cache_gb")}
            engines.add(engine_key(engine_args(parsed[role], **args)))
            budget = opts.get("gpu_memory_utilization", budget)
    out: dict[str, ChatBackend] = {}
    for role, (_, opts) in roles.items():
        opts = dict(opts)
        if parsed[role].backend == "vllm" and len(engines) > 1:
            from pipeline.llm.vllm_backend import default_memory_budget

            opts["gpu_memory_utilization"] = (budget if budget is not None else default_memory_budget()) / len(engines)
        out[role] = get_backend(parsed[role], cache=(caches or {}).get(role), **opts)
    return out
