"""``agentpipe train`` (DPO + LoRA) and ``agentpipe merge`` (adapter → standalone model)."""

from __future__ import annotations

import argparse
import logging


def _cmd_train(args: argparse.Namespace):  # noqa: ANN202 - returns a StageResult
    from pipeline.cli_args import config_from_args
    from pipeline.training.config import TrainConfig
    from pipeline.training.dpo import train_stage

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    res = train_stage(config_from_args(TrainConfig, args))
    if res.status == "skipped":
        print(f"train: {res.outputs['out']} is already trained with this configuration (nothing to do)")
    else:
        resumed = f", resumed from {res.resumed_from}" if res.resumed_from else ""
        run = f", MLflow run {res.outputs['mlflow_run']}" if res.outputs["mlflow_run"] else " (tracking journaled locally)"
        print(f"train: {res.name}: {res.counts['global_step']} optimizer steps{resumed}; adapter -> "
              f"{res.outputs['adapter']}{run}")
    return res


def _cmd_merge(args: argparse.Namespace):  # noqa: ANN202 - returns a StageResult
    from pipeline.cli_args import config_from_args
    from pipeline.training.merging import MergeConfig, merge_stage

    res = merge_stage(config_from_args(MergeConfig, args))
    done = "already merged (skipped): " if res.status == "skipped" else ""
    c = res.counts
    n = c["merge_attempts"]
    again = f"; merged {n} times, {n - 1} failing the check (merge_config.json: failed_checks)" if n > 1 else ""
    print(f"merge: {done}{res.outputs['adapter']} + {res.base} -> {res.outputs['merged']} ({res.dtype}; max |logit "
          f"diff| vs base+adapter {c['max_abs_logit_diff']:.2e} in {res.verify_dtype}, "
          f"{c['max_abs_logit_diff_saved']:.2e} after saving{again})")
    return res


def add_parser(sub: argparse._SubParsersAction) -> None:
    from pipeline.cli_args import add_config_arguments
    from pipeline.training.config import TrainConfig
    from pipeline.training.merging import MergeConfig

    t = sub.add_parser(
        "train", help="DPO + LoRA training on a pair set (resumable, tracked in MLflow)",
        description="Train a LoRA adapter with DPO on the seed's train-case pairs (--final-eval: then on a sample "
        "of its test-case pairs). Output <home>/models/<nickname>_<dataset>[_beta-b]_s<seed>/ (adapter/, "
        "checkpoints/, training_config.json). Rerunning resumes from the last checkpoint; a folder trained with "
        "other settings or pairs is refused (--force keeps it aside). Defaults are the study's hyper-parameters; "
        "a --spec (or --config) YAML/JSON file sets any option by its long name, flags override it.")
    add_config_arguments(t, TrainConfig, spec_flags=("--spec", "--config"))
    t.set_defaults(func=_cmd_train)

    m = sub.add_parser(
        "merge", help="merge a LoRA adapter into its base model (verified against base+adapter)",
        description="Fold a LoRA adapter into its base and save a standalone model (weights, tokenizer, "
        "merge_config.json). The merged logits must match base+adapter within --atol in float32. A rerun of the "
        "same merge is skipped; any other existing model is refused (--force keeps it aside). Default output: "
        "<model dir>/merged for <model dir>/adapter.")
    add_config_arguments(m, MergeConfig)
    m.set_defaults(func=_cmd_merge)
