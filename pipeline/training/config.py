"""Training configuration: the study's hyper-parameters as defaults (SPEC §6.3), overridable by a YAML/JSON file and
by command-line flags (flags win over the file, the file over the defaults)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator

from pipeline.stage import StageConfig

Quantization = Literal["none", "int4", "int8", "fp16", "bf16"]


class TrainConfig(StageConfig):
    """Everything ``agentpipe train`` needs (the study's hyper-parameters as defaults, SPEC §6.3). The model
    folder is bound to the fingerprint: every field but those in ``not_in_fingerprint``, with the pairs file's
    sha256 and the effective epochs (``dpo.train``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    stage: ClassVar[str] = "train"
    #: how the run is tracked, checked and stored, not what is trained
    not_in_fingerprint: ClassVar[frozenset[str]] = frozenset({
        # share_prompt: bound by dpo.fingerprint where it runs (CPU), so GPU models are not told apart by it
        "out", "val_pairs", "tracking_uri", "register_model", "final_eval", "gradient_checkpointing", "share_prompt",
        "precompute_ref_log_probs", "save_total_limit", "logging_steps", "eval_steps", "eval_sample_size", "force",
        "wait"})

    # what to train
    model: str = Field(description="base model: nickname, Hub id, local folder, or a trained model folder "
                             "(or its merged/)")
    pairs: str = Field(description="pairs JSONL (from `agentpipe pairs`)",
                       json_schema_extra={"flags": ["--data-path", "-d"]})
    seed: int = Field(ge=0, description="train/test split seed (SPEC §5); pairs of the seed's test cases validate",
                      json_schema_extra={"flags": ["-s", "--train-test-split-seed"]})
    val_pairs: str | None = Field(default=None, description="extra validation pairs file (default: <pairs "
                                  "stem>_test.jsonl if present)")
    out: str | None = Field(default=None, description="output folder (default <home>/models/<name>)")
    # precision
    quantization: Quantization = Field(default="none", description="int4 or int8 (QLoRA: bitsandbytes base "
                                       "weights, GPU or CPU), fp16, bf16")
    # optimisation (SPEC §6.3)
    batch_size: int = Field(default=1, ge=1, description="per-device batch size")
    gradient_accumulation_steps: int = Field(default=8, ge=1)
    learning_rate: float = Field(default=5e-5, gt=0)
    num_epochs: float = Field(default=1, gt=0, description="epochs (3 for 'both' datasets unless set)")
    max_steps: int = Field(default=-1, description="stop after this many optimizer steps (-1: epochs decide)")
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1, description="warmup fraction of the steps")
    lr_scheduler: str = "cosine"
    optimizer: str = "adamw_torch"
    max_grad_norm: float = Field(default=1.0, ge=0, description="gradient clipping (0: none)")
    gradient_checkpointing: bool | None = Field(default=None, description="activation checkpointing (default: on, "
                                                "as in the study; on CPU too: half the memory at the same speed, "
                                                "same losses)")
    share_prompt: bool = Field(default=True, description="one pass per pair: the prompt once, then both completions "
                               "(CPU, SDPA attention; same log-probs up to rounding, about half the work on long "
                               "prompts)",
                               json_schema_extra={"negatable": True})
    train_seed: int = Field(default=42, ge=0, description="reproducibility seed of the trainer (not the split seed)")
    # DPO
    beta: float = Field(default=0.1, gt=0, description="DPO beta (the paper also uses 0.05)",
                        json_schema_extra={"flags": ["--dpo-beta"]})
    max_length: int = Field(default=8192, ge=16, description="drop pairs with prompt+completion above this many "
                            "tokens (a limit, not a size: batches are padded to their longest pair; kept pairs "
                            "longer than the model's context are refused, lower this to drop them)")
    max_prompt_length: int = Field(default=8192, ge=8, description="drop pairs with prompts above this many tokens")
    precompute_ref_log_probs: bool | None = Field(
        default=None, description="precompute the reference log-probs once over the training pairs (default auto: "
        "yes when the run sees every training pair, i.e. no max_steps or max_steps x batch x grad acc >= the "
        "training pairs; else computed on the fly for the pairs drawn). What was used is in training_config.json")
    # LoRA
    lora_r: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    lora_target_modules: str | list[str] = Field(default="all-linear", description="all-linear or a comma-separated "
                                                 "module list", json_schema_extra={"cli_type": "text"})
    # checkpoints, logging, evaluation
    save_steps: int = Field(default=100, ge=1, description="checkpoint every N optimizer steps")
    save_total_limit: int = Field(default=2, ge=1, description="checkpoints kept")
    logging_steps: int = Field(default=40, ge=1, description="log metrics every N steps")
    eval_steps: int = Field(default=999999, ge=1, description="validate every N steps (default: never during "
                            "training; --final-eval validates once at the end)")
    eval_sample_size: int | None = Field(default=None, ge=1, description="validation pairs per evaluation (default "
                                         "logging_steps × grad acc × batch)")
    final_eval: bool = Field(default=False, description="evaluate on a validation sample when training ends (off "
                             "unless asked: not the optimizer's work; the study's eval_steps 999999 never came)",
                             json_schema_extra={"negatable": True})  # on until issue 27: --no-final-eval still works
    # tracking
    tracking_uri: str | None = Field(default=None, description="MLflow tracking URI (default MLFLOW_TRACKING_URI; "
                                     "none: journal only)")
    register_model: bool = Field(default=True, description="register the adapter as an MLflow model version")
    # how to run
    force: bool = Field(default=False, description="a model folder trained with another configuration (or on other "
                        "pairs) is moved aside as <name>.replaced-<time> and training starts over (default: refuse)")
    wait: bool = Field(default=False, description="when another process trains into the same folder, wait for it "
                       "(default: refuse at once)")

    @field_validator("max_steps")
    @classmethod
    def _max_steps(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError("must be >= 1 (or -1: the epochs decide)")
        return v

    @field_validator("lora_target_modules")
    @classmethod
    def _targets(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, str) and v != "all-linear":
            return [m.strip() for m in v.split(",") if m.strip()]
        return v

    @property
    def effective_eval_sample_size(self) -> int:
        return self.eval_sample_size or self.logging_steps * self.gradient_accumulation_steps * self.batch_size
