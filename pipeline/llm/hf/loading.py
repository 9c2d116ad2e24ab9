"""Loading HF transformers models for the HF backend, once per process: weights by id or folder, dtype and
quantization, LoRA adapters attached (the model's own, or a request's, loaded on first use under its own peft
name)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.llm.hf.attention import use_on_cpu
from pipeline.llm.local_common import folder_revision
from pipeline.llm.options import HF_QUANTIZATIONS, normalize_dtype
from pipeline.llm.spec import ModelSpec

log = logging.getLogger("pipeline.llm.hf")

#: peft's name for "no adapter" in a mixed-adapter batch
BASE_ADAPTER = "__base__"

LOADED: dict[tuple, tuple[Any, Any]] = {}
#: model key → adapters (``adapter_id``) loaded into that model for requests
LOADED_ADAPTERS: dict[tuple, set[tuple[str, str]]] = {}
#: adapter (resolved path, folder revision) → its peft adapter name in this process
ADAPTER_NAMES: dict[tuple[str, str], str] = {}


def adapter_id(adapter: str) -> tuple[str, str]:
    return str(Path(adapter).resolve()), folder_revision(adapter)


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "base_model")


def model_key(spec: ModelSpec, dtype: str, quantization: str | None, device: str | None) -> tuple:
    import torch

    quantization = None if quantization in (None, "none") else quantization
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return (spec.load_id, spec.adapter, dtype, quantization, device)


def resolve_model_id(model_id: str) -> str:
    from pipeline.llm.local_models import resolve_local_model

    return resolve_local_model(model_id)


def load_model(spec: ModelSpec, *, dtype: str = "auto", quantization: str | None = None,
               device: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) for a spec, loaded once per process. Raises ``ConfigError`` with a clear message."""
    import torch

    quantization = None if quantization in (None, "none") else quantization
    if quantization is not None and quantization not in HF_QUANTIZATIONS:
        raise ConfigError(f"--quantization {quantization}: the HF backend takes one of {', '.join(HF_QUANTIZATIONS)} "
                          f"(fp8, awq and gptq are served by vLLM: a vllm: spec)")
    dtype = normalize_dtype(dtype)
    key = model_key(spec, dtype, quantization, device)
    device = key[-1]
    if key in LOADED:
        return LOADED[key]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_id(spec.load_id)
    from pipeline.llm.local_models import check_hub_model

    check_hub_model(path)
    kwargs: dict[str, Any] = {}
    if quantization in ("int4", "int8"):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError(f"--quantization {quantization} needs bitsandbytes (pip install bitsandbytes)") from None
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if device == "cuda" else torch.float32
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
            if quantization == "int4" else BitsAndBytesConfig(load_in_8bit=True))
        kwargs["device_map"] = device
    elif quantization == "fp16" or dtype == "float16":
        kwargs["dtype"] = torch.float16
    elif quantization == "bf16" or (dtype == "auto" and device == "cuda") or dtype == "bfloat16":
        kwargs["dtype"] = torch.bfloat16
    else:
        kwargs["dtype"] = torch.float32
    try:
        tok = AutoTokenizer.from_pretrained(path, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ConfigError(f"model '{spec.raw}': cannot load '{path}' ({str(e).splitlines()[0]})") from None
    if "device_map" not in kwargs:
        model.to(device)
    use_on_cpu(model)  # decoding attention without a copy of the cache per token (pipeline.llm.hf.attention)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        raise ConfigError(f"model '{spec.raw}': the tokenizer has no chat template")
    if spec.adapter:
        model = attach_adapter(model, spec)
    model.eval()
    LOADED[key] = (model, tok)
    return model, tok


def attach_adapter(model: Any, spec: ModelSpec, adapter_path: str | None = None, name: str = "default") -> Any:
    """``model`` with the adapter loaded under ``name`` (wrapped in a PeftModel the first time)."""
    from peft import PeftModel

    adapter = Path(adapter_path or spec.adapter)  # type: ignore[arg-type]
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"adapter '{adapter}': not found (expected a folder with adapter_config.json)")
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(adapter), adapter_name=name)
            return model
        return PeftModel.from_pretrained(model, str(adapter), adapter_name=name)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ConfigError(f"adapter '{adapter}' does not fit base model '{spec.model}': "
                          f"{str(e).splitlines()[0][:200]}") from None
