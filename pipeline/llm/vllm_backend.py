"""vLLM offline backend: one engine per process, every request submitted together (continuous batching),
prefix caching on, LoRA adapters served per request through ``LoRARequest`` so one engine runs a base model
and many adapters in one batch. vllm is imported lazily; it is a GPU-only extra (requirements-gpu.txt).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.llm.base import ChatBackend, Progress
from pipeline.llm.hf import DEFAULT_MAX_NEW_TOKENS, folder_revision
from pipeline.llm.spec import ModelSpec
from pipeline.llm.types import ChatRequest, ChatResponse

_ENGINES: dict[tuple, Any] = {}


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise ConfigError("vllm backend: the vllm package is not installed "
                          "(GPU workers: pip install -r requirements-gpu.txt)") from None
    return vllm


class VLLMBackend(ChatBackend):
    """``vllm:<model>[+adapter]``. Options: ``max_model_len``, ``gpu_memory_utilization``, ``quantization``
    (int4 → bitsandbytes, fp16 → half weights), ``max_lora_rank``, ``dtype``."""

    def __init__(self, spec: ModelSpec, *, max_model_len: int | None = None, gpu_memory_utilization: float = 0.85,
                 quantization: str | None = None, max_lora_rank: int = 64, dtype: str = "auto",
                 max_loras: int = 4) -> None:
        vllm = _import_vllm()
        from pipeline.llm.local_models import resolve_local_model

        self.spec = spec
        self.model_path = resolve_local_model(spec.load_id)
        key = (self.model_path, quantization, dtype, max_model_len)
        if key not in _ENGINES:
            kwargs: dict[str, Any] = {"model": self.model_path, "enable_prefix_caching": True, "enable_lora": True,
                                      "max_lora_rank": max_lora_rank, "max_loras": max_loras,
                                      "gpu_memory_utilization": gpu_memory_utilization, "dtype": dtype}
            if max_model_len:
                kwargs["max_model_len"] = max_model_len
            if quantization == "int4":
                kwargs["quantization"] = "bitsandbytes"
            elif quantization == "fp16":
                kwargs["dtype"] = "float16"
            elif quantization not in (None, "none", "bf16"):
                raise ConfigError(f"vllm backend: --quantization {quantization} is not supported (int4, fp16, bf16)")
            _ENGINES[key] = vllm.LLM(**kwargs)
        self.llm = _ENGINES[key]
        self.lora = None
        if spec.adapter:
            if not (Path(spec.adapter) / "adapter_config.json").is_file():
                raise ConfigError(f"adapter '{spec.adapter}': not found (expected a folder with adapter_config.json)")
            from vllm.lora.request import LoRARequest

            # a stable small int id per adapter path, so several backends can share the engine
            lora_id = 1 + int.from_bytes(str(Path(spec.adapter).resolve()).encode()[-6:], "big") % 1_000_000
            self.lora = LoRARequest(Path(spec.adapter).name, lora_id, str(spec.adapter))
        rev = folder_revision(self.model_path) if Path(self.model_path).is_dir() else self.model_path
        self.revision = rev + ("+" + folder_revision(spec.adapter) if spec.adapter else "") + f":{quantization}"

    def generate(self, requests: Sequence[ChatRequest], progress: Progress | None = None) -> list[ChatResponse]:
        from vllm import SamplingParams

        params = [SamplingParams(temperature=r.config.temperature, top_p=r.config.top_p, seed=r.config.seed,
                                 max_tokens=r.config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
                                 stop=list(r.config.stop) or None) for r in requests]
        chat_kwargs: dict[str, Any] = {}
        if self.spec.enable_thinking is False:
            chat_kwargs["chat_template_kwargs"] = {"enable_thinking": False}
        t0 = time.perf_counter()
        try:
            outs = self.llm.chat([r.messages for r in requests], params, lora_request=self.lora, use_tqdm=False,
                                 **chat_kwargs)
        except Exception as e:  # engine-level failure: report it on every request rather than crash the stage
            return [ChatResponse.failure(f"vllm: {type(e).__name__}: {e}")] * len(requests)
        latency = (time.perf_counter() - t0) / max(1, len(requests))
        results = []
        for o in outs:
            c = o.outputs[0]
            results.append(ChatResponse(text=c.text, finish_reason=c.finish_reason or "stop",
                                        prompt_tokens=len(o.prompt_token_ids or []),
                                        completion_tokens=len(c.token_ids), latency_s=latency))
        if progress:
            progress(len(requests), len(requests))
        return results
