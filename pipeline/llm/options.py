"""Backend options, one set of names for the CLI (``--max-model-len``), a ``--spec`` file (``max_model_len``) and
the DAG params (``backend: {"max_model_len": …}``).

Local backends take ``dtype`` and ``batch_size``; vLLM also takes the engine options below. Options a backend
does not use are ignored by it (``batch_size`` means nothing to vLLM's continuous batching), so one option set
can serve an agent on vLLM and an emulator on HF.
"""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.errors import ConfigError

#: dtype names (vLLM's) and the short aliases the CLI accepted before
DTYPES = ("auto", "bfloat16", "float16", "float32")
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16", "float": "float32"}

#: ``--quantization``: how the weights are stored. HF: int4/int8 (bitsandbytes), fp16, bf16. vLLM: fp8 (on the
#: fly) or a pre-quantized checkpoint (awq, gptq, …); vLLM has no bitsandbytes int4 (see VLLM_INT4_HELP).
QUANTIZATIONS = ("none", "int4", "int8", "fp16", "bf16", "fp8", "awq", "gptq", "awq_marlin", "gptq_marlin",
                 "compressed-tensors")
HF_QUANTIZATIONS = ("none", "int4", "int8", "fp16", "bf16")

#: vLLM engine options: name → (type, help). ``None`` defaults leave vLLM's own default.
ENGINE_OPTIONS: dict[str, tuple[type, str]] = {
    "max_model_len": (int, "vLLM: context length of the engine (default: the model's)"),
    "gpu_memory_utilization": (float, "vLLM: fraction of GPU memory for all engines of this process together "
                               "(default 0.85; split between engines of different models)"),
    "tensor_parallel_size": (int, "vLLM: GPUs per engine (default 1)"),
    "enforce_eager": (bool, "vLLM: no CUDA graphs (faster start, slower decoding)"),
    "max_loras": (int, "vLLM: adapters resident in one batch (default 4)"),
    "max_lora_rank": (int, "vLLM: largest LoRA rank served (default 64)"),
}


def normalize_dtype(value: str | None) -> str:
    """A dtype in vLLM's names; ``bf16``/``fp32``/``fp16`` are accepted as aliases."""
    if value is None:
        return "auto"
    v = DTYPE_ALIASES.get(value, value)
    if v not in DTYPES:
        raise ConfigError(f"--dtype {value}: expected one of {', '.join(DTYPES)} (or bf16, fp16, fp32)")
    return v


def _dtype_arg(text: str) -> str:
    try:
        return normalize_dtype(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--dtype {text}: ")) from None


def add_backend_arguments(p: argparse.ArgumentParser, *, quantization_help: str = "weights") -> None:
    """The local-backend flags shared by every stage that loads a model (emulate, evaluate, llm chat)."""
    g = p.add_argument_group("model backend", "local backends (HF transformers, vLLM); ignored by API models")
    g.add_argument("--quantization", choices=QUANTIZATIONS,
                   help=f"{quantization_help}: int4/int8 (HF, bitsandbytes), fp16, bf16; vLLM: fp8 or a "
                   "pre-quantized checkpoint (awq, gptq, …)")
    g.add_argument("--dtype", type=_dtype_arg, metavar="{" + ",".join(DTYPES) + "}",
                   help="weights/compute dtype (aliases bf16, fp16, fp32)")
    g.add_argument("--batch-size", type=int, help="HF: requests per forward batch (vLLM schedules itself)")
    for name, (typ, text) in ENGINE_OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        if typ is bool:
            g.add_argument(flag, action="store_true", default=None, help=text)
        else:
            g.add_argument(flag, type=typ, help=text)


def backend_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line (or in a --spec), as ``get_backend`` keyword arguments."""
    names = ("batch_size", "dtype", *ENGINE_OPTIONS)
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


def json_schema() -> dict[str, Any]:
    """The JSON schema of a backend-options object (the DAG params' ``backend``), from the same names and types
    as the CLI flags, so a misspelt option is refused by the form instead of ignored."""
    types = {int: "integer", float: "number", bool: "boolean"}
    props: dict[str, Any] = {"dtype": {"type": "string", "enum": [*DTYPES, *DTYPE_ALIASES]},
                             "batch_size": {"type": "integer", "minimum": 1}}
    for name, (typ, text) in ENGINE_OPTIONS.items():
        props[name] = {"type": types[typ], "description": text}
    props["gpu_memory_utilization"].update(exclusiveMinimum=0, maximum=1)
    return {"type": "object", "properties": props, "additionalProperties": False}
