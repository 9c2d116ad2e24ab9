"""``agentpipe train`` (DPO + LoRA) and ``agentpipe merge`` (adapter → standalone model)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

#: (flag, TrainConfig field, type, help). Flags default to None so that only given ones override the config file.
_TRAIN_FLAGS: list[tuple[str, str, type, str]] = [
    ("--quantization", "quantization", str, "none (default), int4 or int8 (QLoRA: bitsandbytes base weights, GPU or CPU), fp16, bf16"),
    ("--batch-size", "batch_size", int, "per-device batch size (default 1)"),
    ("--gradient-accumulation-steps", "gradient_accumulation_steps", int, "gradient accumulation (default 8)"),
    ("--learning-rate", "learning_rate", float, "learning rate (default 5e-5)"),
    ("--num-epochs", "num_epochs", float, "epochs (default 1; 3 for 'both' datasets unless set)"),
    ("--max-steps", "max_steps", int, "stop after this many optimizer steps (default -1: epochs decide)"),
    ("--warmup-ratio", "warmup_ratio", float, "warmup fraction of the steps (default 0.1)"),
    ("--lr-scheduler", "lr_scheduler", str, "scheduler (default cosine)"),
    ("--optimizer", "optimizer", str, "optimizer (default adamw_torch)"),
    ("--max-grad-norm", "max_grad_norm", float, "gradient clipping (default 1.0)"),
    ("--dpo-beta", "beta", float, "DPO beta (default 0.1; the paper also uses 0.05)"),
    ("--max-length", "max_length", int, "drop pairs with prompt+completion above this many tokens (default 8192)"),
    ("--max-prompt-length", "max_prompt_length", int, "drop pairs with prompts above this many tokens (default 8192)"),
    ("--lora-r", "lora_r", int, "LoRA rank (default 16)"),
    ("--lora-alpha", "lora_alpha", int, "LoRA alpha (default 32)"),
    ("--lora-dropout", "lora_dropout", float, "LoRA dropout (default 0.05)"),
    ("--lora-target-modules", "lora_target_modules", str, "all-linear (default) or a comma-separated module list"),
    ("--save-steps", "save_steps", int, "checkpoint every N optimizer steps (default 100)"),
    ("--save-total-limit", "save_total_limit", int, "checkpoints kept (default 2)"),
    ("--logging-steps", "logging_steps", int, "log metrics every N steps (default 40)"),
    ("--eval-steps", "eval_steps", int, "validate every N steps (default 999999: only at the end)"),
    ("--eval-sample-size", "eval_sample_size", int, "validation pairs per evaluation (default logging x acc x batch)"),
    ("--train-seed", "train_seed", int, "trainer reproducibility seed (default 42)"),
    ("--tracking-uri", "tracking_uri", str, "MLflow tracking URI (default MLFLOW_TRACKING_URI; none: journal only)"),
]


def _cmd_train(args: argparse.Namespace) -> int:
    from pipeline.training.config import build_config, read_config_file
    from pipeline.training.dpo import train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    file_values = read_config_file(args.config) if args.config else {}
    flags = {field: getattr(args, field) for _, field, _, _ in _TRAIN_FLAGS}
    flags.update(model=args.model, pairs=str(args.pairs) if args.pairs else None, seed=args.seed,
                 val_pairs=str(args.val_pairs) if args.val_pairs else None, out=str(args.out) if args.out else None,
                 precompute_ref_log_probs=args.precompute_ref_log_probs,
                 gradient_checkpointing=args.gradient_checkpointing, final_eval=args.final_eval,
                 register_model=args.register_model)
    cfg, explicit = build_config(file_values, flags)
    res = train(cfg, explicit=explicit)
    if res.skipped:
        print(f"train: {res.out} is already trained with this configuration (nothing to do)")
    else:
        resumed = f", resumed from {res.resumed_from}" if res.resumed_from else ""
        run = f", MLflow run {res.mlflow_run_id}" if res.mlflow_run_id else " (tracking journaled locally)"
        print(f"train: {res.name}: {res.global_step} optimizer steps{resumed}; adapter -> {res.adapter}{run}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from pipeline.training.merging import merge

    res = merge(args.adapter, args.out, base=args.base, dtype=args.dtype, atol=args.atol,
                tracking_uri=args.tracking_uri, register_model=args.register_model)
    done = "already merged (skipped): " if res.skipped else ""
    print(f"merge: {done}{res.adapter} + {res.base} -> {res.out} ({res.dtype}; max |logit diff| vs base+adapter "
          f"{res.max_abs_logit_diff:.2e} in float32, {res.max_abs_logit_diff_saved:.2e} after saving)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "train", help="DPO + LoRA training on a pair set (resumable, tracked in MLflow)",
        description="Train a LoRA adapter with DPO on the seed's train-case pairs, validating on its test-case pairs. "
        "Output <home>/models/<nickname>_<dataset>[_beta-b]_s<seed>/ (adapter/, checkpoints/, training_config.json). "
        "Rerunning resumes from the last checkpoint. Defaults are the study's; a --config YAML/JSON file sets any "
        "option by its long name, flags override it.")
    t.add_argument("--model", help="base model: nickname, Hub id, folder, or a trained model's merged/ (2nd stage)")
    t.add_argument("--pairs", "--data-path", "-d", dest="pairs", type=Path, help="pairs .jsonl from `agentpipe pairs`")
    t.add_argument("--seed", "-s", "--train-test-split-seed", dest="seed", type=int, help="split seed (required)")
    t.add_argument("--val-pairs", type=Path,
                   help="extra validation pairs (default: <pairs stem>_test.jsonl if present)")
    t.add_argument("--config", type=Path, help="YAML or JSON file of training options")
    t.add_argument("--out", type=Path, help="output folder (default <home>/models/<name>)")
    for flag, field, typ, help_text in _TRAIN_FLAGS:
        t.add_argument(flag, dest=field, type=typ, default=None, help=help_text)
    t.add_argument("--precompute-ref-log-probs", action=argparse.BooleanOptionalAction, default=None,
                   help="precompute the reference log-probs once (default on)")
    t.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="activation checkpointing (default on with a GPU, off on CPU)")
    t.add_argument("--final-eval", action=argparse.BooleanOptionalAction, default=None,
                   help="evaluate on a validation sample at the end (default on)")
    t.add_argument("--register-model", action=argparse.BooleanOptionalAction, default=None,
                   help="register the adapter as an MLflow model version (default on)")
    t.set_defaults(func=_cmd_train)

    m = sub.add_parser(
        "merge", help="merge a LoRA adapter into its base model (verified against base+adapter)",
        description="Fold a LoRA adapter into its base and save a standalone model (weights, tokenizer, "
        "merge_config.json). The merged logits must match base+adapter within --atol in float32. A rerun of the "
        "same merge is skipped; any other existing model is never overwritten. Default output: <model dir>/merged "
        "for <model dir>/adapter.")
    m.add_argument("--adapter", "--adapter-path", dest="adapter", required=True, type=Path,
                   help="adapter folder (or a trained model folder)")
    m.add_argument("--out", "--output-dir", dest="out", type=Path, help="output folder")
    m.add_argument("--base", help="base model (default: the adapter's base_model_name_or_path)")
    m.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the saved weights (default: the base model's)")
    m.add_argument("--atol", type=float, default=1e-3, help="max |logit difference| allowed (default 1e-3)")
    m.add_argument("--tracking-uri", help="MLflow tracking URI (default MLFLOW_TRACKING_URI)")
    m.add_argument("--register-model", action=argparse.BooleanOptionalAction, default=True,
                   help="register the merged model as an MLflow model version (default on)")
    m.set_defaults(func=_cmd_merge)
