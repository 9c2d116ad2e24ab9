"""Training configuration: the study's hyper-parameters as defaults (SPEC §6.3), overridable by a YAML/JSON file and
by command-line flags (flags win over the file, the file over the defaults)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.errors import ConfigError

Quantization = Literal["none", "int4", "int8", "fp16", "bf16"]


class TrainConfig(BaseModel):
    """Everything ``agentpipe train`` needs. Field names are the flag names with ``_`` for ``-``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # what to train
    model: str = Field(description="base model: nickname, Hub id, local folder, or a trained model folder "
                             "(or its merged/)")
    pairs: str = Field(description="pairs JSONL (from `agentpipe pairs`)")
    seed: int = Field(ge=0, description="train/test split seed (SPEC §5); pairs of the seed's test cases validate")
    val_pairs: str | None = Field(default=None, description="extra validation pairs file (e.g. the _test pair set)")
    out: str | None = Field(default=None, description="output folder (default <home>/models/<name>)")
    # precision
    quantization: Quantization = "none"
    # optimisation (SPEC §6.3)
    batch_size: int = Field(default=1, ge=1)
    gradient_accumulation_steps: int = Field(default=8, ge=1)
    learning_rate: float = Field(default=5e-5, gt=0)
    num_epochs: float = Field(default=1, gt=0)
    max_steps: int = -1
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    lr_scheduler: str = "cosine"
    optimizer: str = "adamw_torch"
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool | None = Field(default=None, description="default: on with a GPU, off on CPU")
    train_seed: int = Field(default=42, description="reproducibility seed of the trainer (not the split seed)")
    # DPO
    beta: float = Field(default=0.1, gt=0)
    max_length: int = Field(default=8192, ge=16)
    max_prompt_length: int = Field(default=8192, ge=8)
    precompute_ref_log_probs: bool = True
    # LoRA
    lora_r: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    lora_target_modules: str | list[str] = "all-linear"
    # checkpoints, logging, evaluation
    save_steps: int = Field(default=100, ge=1)
    save_total_limit: int = Field(default=2, ge=1)
    logging_steps: int = Field(default=40, ge=1)
    eval_steps: int = Field(default=999999, ge=1)
    eval_sample_size: int | None = Field(default=None, ge=1, description="default logging_steps × grad acc × batch")
    final_eval: bool = Field(default=True, description="evaluate on a validation sample when training ends")
    # tracking
    tracking_uri: str | None = None
    register_model: bool = True

    @field_validator("lora_target_modules")
    @classmethod
    def _targets(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, str) and v != "all-linear":
            return [m.strip() for m in v.split(",") if m.strip()]
        return v

    @property
    def effective_eval_sample_size(self) -> int:
        return self.eval_sample_size or self.logging_steps * self.gradient_accumulation_steps * self.batch_size


#: Fields that must not change when a run is resumed (they define the model being trained).
RESUME_INVARIANTS = ("model", "seed", "quantization", "batch_size", "gradient_accumulation_steps", "learning_rate",
                     "num_epochs", "max_steps", "warmup_ratio", "lr_scheduler", "optimizer", "beta", "max_length",
                     "max_prompt_length", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                     "train_seed", "save_steps")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping of TrainConfig fields (``-`` in keys is accepted for ``_``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read ({e.strerror})") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # json/yaml parse errors
        raise ConfigError(f"--config {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} "
                          f"({' '.join(str(e).split())[:200]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_config(file_values: dict[str, Any], flag_values: dict[str, Any]) -> tuple[TrainConfig, set[str]]:
    """Defaults < config file < flags. Returns the config and the names set explicitly (file or flags)."""
    merged = {**file_values, **{k: v for k, v in flag_values.items() if v is not None}}
    try:
        cfg = TrainConfig(**merged)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        flag = "--" + loc.replace("_", "-")
        raise ConfigError(f"{flag}: {err['msg']}") from None
    return cfg, set(merged)
