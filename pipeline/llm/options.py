"""Backend options, one set of names for the CLI (``--max-model-len``), a ``--spec`` file (``max_model_len``) and
the DAG params (``backend: {"max_model_len": …}``).

Local backends take ``dtype`` and ``batch_size``; vLLM also takes the engine options below. Options a backend
does not use are ignored by it (``batch_size`` means nothing to vLLM's continuous batching), so one option set
can serve an agent on vLLM and an emulator on HF.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.errors import ConfigError

#: dtype names (vLLM's) and the short aliases the CLI accepted before
DTYPES = ("auto", "bfloat16", "float16", "float32")
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16", "float": "float32"}

#: ``--quantization``: how the weights are stored. HF: int4/int8 (bitsandbytes), fp16, bf16. vLLM: fp8 (on the
#: fly) or a pre-quantized checkpoint (awq, gptq, …); vLLM has no bitsandbytes int4 (see VLLM_INT4_HELP).
QUANTIZATIONS = ("none", "int4", "int8", "fp16", "bf16", "fp8", "awq", "gptq", "awq_marlin", "gptq_marlin",
                 "compressed-tensors")
HF_QUANTIZATIONS = ("none", "int4", "int8", "fp16", "bf16")


def normalize_dtype(value: str | None) -> str:
    """A dtype in vLLM's names; ``bf16``/``fp32``/``fp16`` are accepted as aliases."""
    if value is None:
        return "auto"
    v = DTYPE_ALIASES.get(value, value)
    if v not in DTYPES:
        raise ConfigError(f"--dtype {value}: expected one of {', '.join(DTYPES)} (or bf16, fp16, fp32)")
    return v


class EngineOptions(BaseModel):
    """How a local backend runs a model: the DAGs' ``backend`` param (a misspelt key is refused)."""

    model_config = ConfigDict(extra="forbid")

    dtype: str | None = Field(default=None, description="weights/compute dtype: auto, bfloat16, float16, float32 "
                              "(aliases bf16, fp16, fp32)", json_schema_extra={"metavar": "{" + ",".join(DTYPES) + "}"})
    batch_size: int | None = Field(default=None, ge=1, description="HF: requests per forward batch (vLLM schedules "
                                   "itself)")
    max_model_len: int | None = Field(default=None, ge=1, description="vLLM: context length of the engine (default: "
                                      "the model's)")
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1, description="vLLM: fraction of GPU memory "
                                                 "for all engines of this process together (default 0.85; split "
                                                 "between engines of different models)")
    tensor_parallel_size: int | None = Field(default=None, ge=1, description="vLLM: GPUs per engine (default 1)")
    enforce_eager: bool | None = Field(default=None, description="vLLM: no CUDA graphs (faster start, slower "
                                       "decoding)")
    max_loras: int | None = Field(default=None, ge=1, description="vLLM: adapters resident in one batch (default 4)")
    max_lora_rank: int | None = Field(default=None, ge=1, description="vLLM: largest LoRA rank served (default 64)")
    prefix_cache_gb: float | None = Field(default=None, ge=0, description="HF: memory for reusing the key/value "
                                          "cache of earlier prompts (default 4 GiB on CPU, a fifth of free GPU "
                                          "memory; 0: off). vLLM caches prefixes itself")

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            return normalize_dtype(v)
        except ConfigError as e:
            raise ValueError(str(e).removeprefix(f"--dtype {v}: ")) from None

    def backend_options(self) -> dict[str, Any]:
        """The options that were set, as ``get_backend`` keyword arguments."""
        return {k: getattr(self, k) for k in EngineOptions.model_fields if getattr(self, k) is not None}


#: Options only vLLM uses (the HF backend accepts and ignores them)
VLLM_ONLY = frozenset(EngineOptions.model_fields) - {"dtype", "batch_size", "prefix_cache_gb"}

#: Engine options that do not change what a model answers (where it runs, how it is scheduled); every other one
#: (dtype, max_model_len, quantization) is part of a stage's fingerprint.
NOT_IN_FINGERPRINT = frozenset({"batch_size", "gpu_memory_utilization", "tensor_parallel_size", "enforce_eager",
                                "max_loras", "max_lora_rank", "prefix_cache_gb"})

Quantization = Literal[QUANTIZATIONS]  # type: ignore[valid-type]


class BackendOptions(EngineOptions):
    """Engine options plus how the weights are stored (``quantization``)."""

    quantization: Quantization | None = Field(default=None, description="weights: int4/int8 (HF, bitsandbytes), "
                                              "fp16, bf16; vLLM: fp8 or a pre-quantized checkpoint (awq, gptq, …)")

    @field_validator("quantization")
    @classmethod
    def _none(cls, v: str | None) -> str | None:
        return None if v == "none" else v


def json_schema() -> dict[str, Any]:
    """The JSON schema of a backend-options object (the DAG params' ``backend``), from the same model as the CLI
    flags, so a misspelt option is refused by the form instead of ignored."""
    schema = EngineOptions.model_json_schema()
    schema.pop("title", None)
    schema["additionalProperties"] = False
    schema["properties"]["dtype"] = {"type": ["string", "null"], "enum": [*DTYPES, *DTYPE_ALIASES, None],
                                     "description": EngineOptions.model_fields["dtype"].description}
    return schema
