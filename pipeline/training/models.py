"""What training loads: the base model's path (a folder, a trained model's ``merged/``, an offline model, a Hub id),
its tokenizer (with a chat template) and its weights for DPO with LoRA (QLoRA: int4/int8 base weights), and the
context length it declares."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.training.config import TrainConfig
from pipeline.training.naming import ADAPTER


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists()


def resolve_model_path(model: str) -> str:
    """What ``from_pretrained`` loads for a base spec: a local folder (a trained model folder means its
    ``merged/``), an offline model built on demand, or a Hub id."""
    from pipeline.data.naming import expand_model_name
    from pipeline.llm.local_models import check_hub_model, resolve_local_model

    if _looks_like_path(model):
        p = Path(model).expanduser()
        if (p / "config.json").is_file():
            return str(p.resolve())
        if (p / "merged" / "config.json").is_file():
            return str((p / "merged").resolve())
        raise ConfigError(f"--model {model}: not a model folder (no config.json"
                          f"{'; merge the adapter first with `agentpipe merge`' if (p / ADAPTER).is_dir() else ''})")
    path = resolve_local_model(expand_model_name(model))
    check_hub_model(path)
    return path


def model_context(model_path: str) -> int | None:
    """The model's context length (``max_position_embeddings`` or its older names), None when it declares none."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(text, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_model(path: str, cfg: TrainConfig, cuda: bool) -> Any:
    """The base model's weights for training: quantized (QLoRA) as ``cfg.quantization`` says, bf16 on a GPU."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if cfg.quantization in ("int4", "int8"):
        try:
            from transformers import BitsAndBytesConfig

            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError(f"--quantization {cfg.quantization} needs bitsandbytes (pip install bitsandbytes)") from None
        # QLoRA as the study trains: NF4 (double-quantized) or 8-bit base weights, bf16 compute on a GPU; bitsandbytes
        # also runs on CPU, where compute stays float32
        compute = torch.bfloat16 if cuda else torch.float32
        skip = ["embed_tokens", "lm_head"]
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute,
                               llm_int8_skip_modules=skip)
            if cfg.quantization == "int4" else BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip))
        kwargs["dtype"] = compute
        if not cuda:
            kwargs["device_map"] = {"": "cpu"}
    elif cfg.quantization == "fp16":
        kwargs["dtype"] = torch.float16
    elif cuda or cfg.quantization == "bf16":
        kwargs["dtype"] = torch.bfloat16
    else:
        kwargs["dtype"] = torch.float32
    if cuda:
        kwargs["device_map"] = "auto"
        try:
            import flash_attn  # noqa: F401

            kwargs["attn_implementation"] = "flash_attention_2"
        except ImportError:
            kwargs["attn_implementation"] = "sdpa"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ConfigError(f"--model: cannot load '{path}' ({str(e).splitlines()[0]})") from None
    model.config.use_cache = False
    if cfg.quantization in ("int4", "int8"):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(cfg.gradient_checkpointing))
    return model


def load_tokenizer(path: str) -> Any:
    """The model's tokenizer, padding with EOS when it has no pad token; one without a chat template is refused."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ConfigError(f"--model: cannot load the tokenizer of '{path}' ({str(e).splitlines()[0]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        raise ConfigError(f"--model {path}: the tokenizer has no chat template; DPO on conversations needs one")
    return tok
