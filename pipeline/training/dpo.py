"""DPO + LoRA training (SPEC §6): trl ``DPOTrainer`` with a peft adapter, checkpoints and resume, MLflow tracking.
The pairs a run uses are prepared in ``pipeline.training.data``, the base model and tokenizer loaded in
``pipeline.training.models``; this module is the stage: its lifecycle, the trainer run and what it records.

    from pipeline.training import TrainConfig, train
    result = train(TrainConfig(model="Qwen2.5-7B", pairs="runs/pairs/safe_q32_s0.jsonl", seed=0))

* **Data.** Pairs of the seed's train cases train; pairs of its test cases (from the pairs file itself, from
  ``val_pairs``, or from a sibling ``<stem>_test.jsonl``) validate: every ``eval_steps`` steps and, when asked
  (``final_eval``, off by default: a validation pass is not the optimizer's work; the study's eval_steps never
  came), once at the end, on a random sample of ``eval_sample_size`` pairs (``Random(42 + step)``). Pairs longer than
  ``max_length`` / ``max_prompt_length`` chat-template tokens are dropped, never truncated. An empty training set
  is an error. Pairs are tokenised once per pairs file and tokenizer and cached (``token_cache``); the limits are
  limits, not sizes (batches are padded to their longest pair); kept pairs longer than the model's context are
  refused with one line (lower ``max_length`` to drop them).
* **Reference log-probs.** ``precompute_ref_log_probs`` auto: precomputed once when the run sees every training
  pair, else computed on the fly for the pairs drawn (``ref_log_probs_plan``; recorded in training_config.json).
  Precomputed ones are stored per pair and base model (``ref_cache``) and reused by later trainings.
* **One pass per pair.** ``share_prompt`` (on): the prompt goes through the model once for both completions
  (``shared_prompt``; on CPU with SDPA attention, else trl's two rows); ``shared_prompt_batches`` in
  training_metrics.json counts the backbone passes each way. On CPU the LM head scores only the completion tokens.
* **Epochs.** A ``both`` dataset trains 3 epochs when ``num_epochs`` was not set explicitly (study quirk).
* **Output** ``<home>/models/<name>/`` (``pipeline.training.naming``): ``adapter/``, ``checkpoints/``,
  ``training_config.json`` (with the split), ``training_metrics.json`` (incl. the log history), ``manifest.json``,
  ``tracking/train/`` (journal of the MLflow run).
* **Resume.** Rerunning the same command continues from the last complete checkpoint in ``checkpoints/`` (after a
  crash, ``kill -9`` or a pre-emption; SIGTERM saves a checkpoint first) with the same split (checked) and the same
  MLflow run; a finished model (complete manifest, same config) is not retrained.
* **Tracking.** All hyper-parameters, dataset stats and the pairs file's sha256 as params; every Trainer log
  (loss, rewards/chosen|rejected|accuracies|margins, logps, eval_*) as step metrics; the adapter as an artifact and
  a registered model version tagged with its lineage (base model, parent model, dataset, seed, beta).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.data.jsonl import atomic_write_json, remove_dead_temps, temp_prefix
from pipeline.data.locks import writer_lock
from pipeline.data.manifest import file_digest, read_manifest, write_manifest
from pipeline.errors import ConfigError, PipelineError
from pipeline.stage import StageResult, begin_output, check_out_not_inputs, prior_output
from pipeline.training.config import TrainConfig
from pipeline.training.data import TrainingData, check_context, load_training_pairs, prepare_data, ref_log_probs_plan
from pipeline.training.models import load_model, load_tokenizer, resolve_model_path
from pipeline.training.naming import (ADAPTER, CHECKPOINTS, TRACKING_TRAIN, TRAINING_CONFIG, TRAINING_METRICS,
                                      base_nickname, dataset_name, default_model_dir, is_both_dataset, model_name,
                                      parent_model_dir, read_training_config)
from pipeline.training.registry import aliases, is_paper_config, registry_family, write_model_card

log = logging.getLogger("pipeline.training")


class Preempted(PipelineError):
    """Training stopped on SIGTERM after saving a checkpoint; rerunning the command resumes it."""

    exit_code = 143


@dataclass
class TrainResult:
    name: str
    out: Path
    adapter: Path
    global_step: int
    metrics: dict[str, Any] = field(default_factory=dict)
    resumed_from: str | None = None
    skipped: bool = False
    mlflow_run_id: str | None = None


def lineage(model: str, dataset: str, seed: int, beta: float) -> dict[str, str]:
    """Lineage tags: the root base model, the direct parent, dataset, seed, beta and the stage number."""
    parent_dir = parent_model_dir(model)
    root, stage = model, 1
    if parent_dir is not None:
        parent_cfg = read_training_config(parent_dir)
        parent_lineage = parent_cfg.get("lineage") or {}
        root = parent_lineage.get("base_model") or parent_cfg.get("model")
        try:
            stage = int(parent_lineage["stage"]) + 1
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{parent_dir / TRAINING_CONFIG}: lineage.stage missing or not an integer") from None
        if not root:
            raise ConfigError(f"{parent_dir / TRAINING_CONFIG}: neither lineage.base_model nor model is set")
    return {"base_model": root, "parent_model": base_nickname(model) if parent_dir is not None else model,
            "dataset": dataset, "seed": str(seed), "beta": f"{beta:g}", "stage": str(stage)}


def last_checkpoint(folder: Path) -> Path | None:
    """The highest ``checkpoint-<step>`` whose ``trainer_state.json`` is complete (written last by the Trainer)."""
    best: tuple[int, Path] | None = None
    for p in folder.glob("checkpoint-*") if folder.is_dir() else []:
        try:
            step = int(p.name.split("-", 1)[1])
            state = json.loads((p / "trainer_state.json").read_text())
        except (ValueError, OSError):
            continue
        if state.get("global_step") == step and (best is None or step > best[0]):
            best = (step, p)
    return best[1] if best else None


# ----------------------------------------------------------------------------------------------------- train
def fingerprint(cfg: TrainConfig, epochs: float, pairs_sha: str, cuda: bool) -> dict[str, Any]:
    """What the trained model depends on: the config's fingerprint, the pairs' content, the epochs run, and on CPU
    (where it runs) the one-pass-per-pair layout, whose rounding differs from trl's (bf16: grad norms by ~1 %)."""
    packed = {"shared_prompt": True} if cfg.share_prompt and not cuda else {}
    return cfg.fingerprint() | {"effective_epochs": epochs, "pairs_sha256": pairs_sha} | packed


def _replace_dir(src: Path, dst: Path) -> None:
    """Move a finished folder into place, replacing an older one."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def train_stage(cfg: TrainConfig) -> StageResult:
    """The ``train`` stage."""
    res = train(cfg)
    return StageResult(stage=cfg.stage, status="skipped" if res.skipped else "complete",
                       outputs={"out": str(res.out), "adapter": str(res.adapter), "mlflow_run": res.mlflow_run_id},
                       counts={"global_step": res.global_step}, name=res.name, metrics=res.metrics,
                       resumed_from=res.resumed_from)


def train(cfg: TrainConfig, *, explicit: set[str] | None = None, callbacks: Sequence[Any] = (),
          home: Path | None = None) -> TrainResult:
    """Train (or resume, or skip when already done) one DPO+LoRA model; see the module docstring.

    ``explicit``: names of the settings given explicitly (config file or flags), for the ``both`` epochs rule;
    None means every setting that differs from its default. ``callbacks``: extra ``TrainerCallback`` objects.
    """
    explicit = set(cfg.model_fields_set) if explicit is None else explicit
    dataset = dataset_name(cfg.pairs, cfg.seed)  # cheap input checks first, before loading torch
    pairs = load_training_pairs(cfg.pairs)
    if cfg.val_pairs:  # read now: a bad file fails before torch and the model load
        load_training_pairs(cfg.val_pairs, "--val-pairs")

    import torch

    cuda = torch.cuda.is_available()
    # on by default, CPU included: a demo pair set on SmolLM2-135M trained at the same speed with half the memory
    # (11.8 GB instead of 23.5 GB resident) and the same losses and gradient norms
    gc = True if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing
    cfg = cfg.model_copy(update={"gradient_checkpointing": gc})
    epochs = cfg.num_epochs
    if is_both_dataset(dataset) and cfg.num_epochs == 1 and "num_epochs" not in explicit:
        epochs = 3
        log.info("dataset '%s' is a 'both' dataset: training 3 epochs (set num_epochs to override)", dataset)
    name = model_name(cfg.model, dataset, cfg.seed, beta=cfg.beta, quantization=cfg.quantization,
                      batch_size=cfg.batch_size, max_length=cfg.max_length)
    out = Path(cfg.out).expanduser().resolve() if cfg.out else default_model_dir(name, home)
    base_path = resolve_model_path(cfg.model)
    check_out_not_inputs(out, [Path(cfg.pairs), *([Path(base_path)] if Path(base_path).exists() else [])], "train")
    pairs_sha = file_digest(cfg.pairs)
    fp = fingerprint(cfg, epochs, pairs_sha, cuda)
    with writer_lock(out, wait=cfg.wait, what="model folder"):
        return _train_locked(cfg, name, out, base_path, dataset, pairs, epochs, pairs_sha, fp, cuda, callbacks, home)


def _train_locked(cfg: TrainConfig, name: str, out: Path, base_path: str, dataset: str, pairs: list[dict[str, Any]],
                  epochs: float, pairs_sha: str, fp: dict[str, Any], cuda: bool,
                  callbacks: Sequence[Any], home: Path | None = None) -> TrainResult:
    t0 = time.monotonic()
    prev, done = _prior_model(cfg, name, out, fp)
    if done is not None:
        return done
    tok = load_tokenizer(base_path)
    data = prepare_data(cfg, tok, pairs, model_path=base_path, pairs_sha=pairs_sha, home=home)
    context = check_context(cfg, data, base_path)
    precompute, why = ref_log_probs_plan(cfg, len(data.train), epochs)
    log.info("reference log-probs: %s (%s)", "precomputed" if precompute else "on the fly", why)
    lin = lineage(cfg.model, dataset, cfg.seed, cfg.beta)

    # Resume: same fingerprint (checked above) and the same split as the interrupted run.
    resume_from: Path | None = None
    if prev is not None:
        if prev.get("test_case_indices") != data.test_cases or prev.get("train_case_indices") != data.train_cases:
            raise ConfigError(f"{out}: cannot resume: the train/test split differs from the interrupted run's "
                              f"({TRAINING_CONFIG}); use the same pairs and --seed, or --force to start over")
        resume_from = last_checkpoint(out / CHECKPOINTS)
    # the inputs are checked: the folder is claimed for this configuration before anything is written into it
    begin_output(out, "train", json.loads(json.dumps(fp, default=str)))
    existing = out / TRAINING_CONFIG
    if not existing.is_file():
        atomic_write_json(existing, {
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "name": name, "model": cfg.model, "model_path": base_path, "data_path": str(Path(cfg.pairs).resolve()),
            "dataset": dataset, "output_dir": str(out), "effective_epochs": epochs,
            "train_test_split_seed": cfg.seed, "seed": cfg.train_seed,
            "train_case_indices": data.train_cases, "test_case_indices": data.test_cases,
            "pairs_sha256": pairs_sha, "data_stats": data.stats, "lineage": lin, "model_context": context,
            "precompute_ref_log_probs_used": precompute, "precompute_ref_log_probs_rule": why,
            "tracking_journal": str(TRACKING_TRAIN), "config": cfg.model_dump(mode="json"),
        })

    from pipeline.tracking import Tracker

    tracker = Tracker.open(out / TRACKING_TRAIN, experiment="training", run_name=name, tracking_uri=cfg.tracking_uri,
                           tags={"agentpipe.stage": "train", "model_name": name, **lin})
    try:
        if not tracker.resumed:  # a fresh run: log its parameters once
            _log_inputs(tracker, cfg, dataset, epochs, base_path, pairs_sha, data, cuda)
        if resume_from is not None:
            tracker.set_tags({"resumed_from_checkpoint": resume_from.name})
            log.info("resuming from %s", resume_from)
        result = _run_training(cfg, name, out, base_path, tok, data, epochs, cuda, tracker, resume_from,
                               list(callbacks), precompute, home)
        _record_model(tracker, cfg, name, out, dataset, lin, fp, data, result, cuda, time.monotonic() - t0)
    except Preempted:
        tracker.finish("KILLED")
        raise
    except BaseException as e:
        tracker.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    tracker.finish("FINISHED")
    result.mlflow_run_id = tracker.run_id
    return result


def _prior_model(cfg: TrainConfig, name: str, out: Path,
                 fp: dict[str, Any]) -> tuple[dict[str, Any] | None, TrainResult | None]:
    """What the model folder holds, by the stage lifecycle (``prior_output``): (None, the finished result) when
    this configuration trained it already; else (the interrupted run's training config to resume, or None).
    Another configuration's model is refused (or, with ``force``, moved aside); a folder of other things, or a
    file, is never moved."""
    for written in (out / TRAINING_CONFIG, out / ADAPTER):  # a killed writer's leftovers are nobody's
        remove_dead_temps(written)
    done = prior_output(out, fp, "train", force=cfg.force, marker=TRAINING_CONFIG)
    if done and (out / ADAPTER / "adapter_config.json").is_file():
        m = read_manifest(out) or {}
        log.info("%s: already trained (manifest complete)", out)
        return None, TrainResult(name=name, out=out, adapter=out / ADAPTER, global_step=m.get("counts", {}).get(
            "global_step", 0), metrics=m.get("counts", {}), skipped=True)
    if done:  # complete, but its adapter is gone: trained again (from its last checkpoint, if any)
        log.warning("%s: the manifest says complete but %s/ is missing: training again", out, ADAPTER)
    existing = out / TRAINING_CONFIG
    return (json.loads(existing.read_text()) if existing.is_file() else None), None


def _log_inputs(tracker: Any, cfg: TrainConfig, dataset: str, epochs: float, base_path: str, pairs_sha: str,
                data: TrainingData, cuda: bool) -> None:
    """A fresh run's parameters, the pair set's statistics and the pair set as its dataset input (lineage)."""
    params = {**cfg.model_dump(exclude={"tracking_uri"}), "effective_epochs": epochs, "dataset": dataset,
              "model_path": base_path, "pairs_sha256": pairs_sha, "device": "cuda" if cuda else "cpu",
              **{f"data.{k}": v for k, v in data.stats.items()}}
    tracker.log_params(params)
    stats_file = Path(cfg.pairs).with_name(Path(cfg.pairs).stem + ".stats.json")
    if stats_file.is_file():
        tracker.log_artifact(stats_file, "dataset")
    # the pair set's digest is the file's sha256
    tracker.log_input(dataset, cfg.pairs, pairs_sha, profile={k: v for k, v in data.stats.items()
                                                              if isinstance(v, (int, float))})


def _record_model(tracker: Any, cfg: TrainConfig, name: str, out: Path, dataset: str, lin: dict[str, Any],
                  fp: dict[str, Any], data: TrainingData, result: TrainResult, cuda: bool, elapsed: float) -> None:
    """A trained model's time and GPU-hours, metrics file, model card, artifacts, registry version, manifest."""
    from pipeline.tracking.stage_runs import elapsed_s, gpu_count

    adapter = out / ADAPTER
    # time and GPU-hours, summed over the invocations that trained this model (a resumed run adds to them)
    wall = elapsed_s(elapsed)
    gpus = gpu_count() or (1 if cuda else 0)
    tracker.log_metrics({"wall_s": (tracker.logged("wall_s") or [0.0])[-1] + wall,
                         "gpu_hours": (tracker.logged("gpu_hours") or [0.0])[-1] + wall * gpus / 3600})
    metrics_doc = {**result.metrics, "mlflow_run_id": tracker.run_id, "resumed_from": result.resumed_from}
    atomic_write_json(out / TRAINING_METRICS, metrics_doc)
    write_model_card(out, adapter, kind="adapter")
    tracker.log_artifact(adapter, "adapter")
    tracker.log_artifact(out / TRAINING_CONFIG, "config")
    if cfg.register_model:
        tracker.register_model(registry_family(name), "adapter",
                               tags={**lin, "kind": "adapter", "model_name": name, "path": str(adapter)},
                               aliases=aliases("adapter", is_paper_config(cfg.model_dump(mode="json"))),
                               description=f"LoRA adapter {name} (DPO on {dataset}, split seed {cfg.seed})")
    write_manifest(out, stage="train", config=fp, inputs={"pairs": cfg.pairs},
                   counts={"global_step": result.global_step, **data.stats,
                           "train_loss": result.metrics.get("train_loss")})


def _run_training(cfg: TrainConfig, name: str, out: Path, base_path: str, tok: Any, data: TrainingData, epochs: float,
                  cuda: bool, tracker: Any, resume_from: Path | None, extra_callbacks: list[Any],
                  precompute: bool, home: Path | None = None) -> TrainResult:
    import torch
    from peft import LoraConfig
    from trl import DPOConfig

    from pipeline.settings import get_settings
    from pipeline.training.callbacks import (EpochAdapterCallback, EvalScheduleCallback, PreemptionCallback,
                                             ReleaseMemoryCallback, TrackingCallback, make_trainer_class)
    from pipeline.training.cpu_memory import LARGE_BLOCK, map_large_blocks

    t0 = time.perf_counter()
    # host memory is the training's memory: kept near what is in use (pipeline.training.cpu_memory)
    lean = not cuda and get_settings().lean_cpu_training_memory
    if lean and map_large_blocks():
        log.info(f"CPU training: blocks from {LARGE_BLOCK // 2**20} MiB mapped on their own, freed memory handed "
                 "back after each step (AGENTPIPE_LEAN_CPU_TRAINING_MEMORY=0 turns this off)")
    model = load_model(base_path, cfg, cuda)
    bf16 = cuda and cfg.quantization in ("none", "bf16", "int4", "int8")
    args = DPOConfig(
        output_dir=str(out / CHECKPOINTS), per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate, num_train_epochs=epochs, max_steps=cfg.max_steps,
        warmup_steps=cfg.warmup_ratio, lr_scheduler_type=cfg.lr_scheduler, optim=cfg.optimizer,
        max_grad_norm=cfg.max_grad_norm, bf16=bf16, fp16=cuda and cfg.quantization == "fp16",
        gradient_checkpointing=bool(cfg.gradient_checkpointing), beta=cfg.beta, max_length=cfg.max_length,
        precompute_ref_log_probs=precompute, remove_unused_columns=False, seed=cfg.train_seed,
        logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, eval_strategy="no", load_best_model_at_end=False,
        report_to="none", use_cpu=not cuda, disable_tqdm=not os.isatty(2),
    )
    peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                             task_type="CAUSAL_LM", target_modules=cfg.lora_target_modules)
    preempt = PreemptionCallback()
    callbacks = [TrackingCallback(tracker), EpochAdapterCallback(out / CHECKPOINTS, tok), preempt, *extra_callbacks]
    if data.val is not None:
        callbacks.append(EvalScheduleCallback(cfg.eval_steps))
    if lean:
        callbacks.append(ReleaseMemoryCallback())
    from pipeline.training import shared_prompt

    share = cfg.share_prompt and shared_prompt.supported(model)
    ref_cache = None
    if precompute:
        from pipeline.training.ref_cache import RefLogpCache, key_inputs

        ref_cache = RefLogpCache((home or get_settings().home) / "cache" / "ref_logps", key_inputs(
            base_path, cfg.quantization, str(next(model.parameters()).dtype), "cuda" if cuda else "cpu",
            cfg.batch_size, share))
    trainer_cls = make_trainer_class()
    trainer = trainer_cls(model=model, args=args, train_dataset=data.train, processing_class=tok,
                          peft_config=peft_config, callbacks=callbacks, validation=data.val,
                          eval_sample_size=cfg.effective_eval_sample_size, ref_cache=ref_cache,
                          share_prompt=share)
    preempt.install()
    try:
        train_out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        preempt.uninstall()
    if preempt.requested:
        raise Preempted(f"training of {name} stopped by SIGTERM at step {trainer.state.global_step}; checkpoint "
                        f"saved in {out / CHECKPOINTS}: rerun the same command to resume")
    metrics: dict[str, Any] = dict(train_out.metrics)
    if data.val is not None and cfg.final_eval:
        metrics.update(trainer.evaluate())
    remove_dead_temps(out / ADAPTER)  # a killed run's half-saved adapter
    tmp = out / f"{temp_prefix(out / ADAPTER)}adapter"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))
    tok.save_pretrained(str(tmp))
    _replace_dir(tmp, out / ADAPTER)
    metrics.update(global_step=trainer.state.global_step, train_wall_s=round(time.perf_counter() - t0, 2),
                   log_history=trainer.state.log_history, device="cuda" if cuda else "cpu",
                   shared_prompt_batches=shared_prompt.counts(model),
                   torch_version=torch.__version__)
    return TrainResult(name=name, out=out, adapter=out / ADAPTER, global_step=trainer.state.global_step,
                       metrics=metrics, resumed_from=resume_from.name if resume_from else None)
