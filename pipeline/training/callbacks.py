"""Trainer callbacks used by ``pipeline.training.dpo`` (imports transformers: load only inside training)."""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import threading
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

log = logging.getLogger("pipeline.training")


class TrackingCallback(TrainerCallback):
    """Sends every Trainer log (loss, rewards/chosen|rejected|accuracies|margins, logps, eval_*) to the tracker,
    at the optimizer step it belongs to."""

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs and state.is_world_process_zero:
            self.tracker.log_metrics(logs, step=state.global_step)


class EpochAdapterCallback(TrainerCallback):
    """Saves the adapter at the end of every whole epoch to ``<checkpoints>/epoch-<n>`` (never pruned)."""

    def __init__(self, folder: Path, tokenizer: Any) -> None:
        self.folder, self.tokenizer = Path(folder), tokenizer

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None or not state.is_world_process_zero or state.epoch is None:
            return
        epoch = round(state.epoch)
        if abs(state.epoch - epoch) > 1e-6:
            return
        target = self.folder / f"epoch-{epoch}"
        model.save_pretrained(target)
        self.tokenizer.save_pretrained(target)


class EvalScheduleCallback(TrainerCallback):
    """Asks for an evaluation every ``eval_steps`` optimizer steps (the trainer samples the validation set)."""

    def __init__(self, eval_steps: int) -> None:
        self.eval_steps = eval_steps

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step > 0 and state.global_step % self.eval_steps == 0:
            control.should_evaluate = True


class ReleaseMemoryCallback(TrainerCallback):
    """On CPU, the allocator's free memory goes back to the system before the first step (loading and set-up
    are done) and after every optimizer step (``pipeline.training.cpu_memory``): each step's peak starts from
    what is in use."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from pipeline.training.cpu_memory import release_freed_memory

        release_freed_memory()

    on_train_begin = on_step_end


class PreemptionCallback(TrainerCallback):
    """On SIGTERM (Slurm pre-emption, ``scancel``), save a checkpoint at the end of the current step and stop."""

    def __init__(self) -> None:
        self.requested = False
        self.step: int | None = None
        self._previous: Any = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("SIGTERM: saving a checkpoint after this step, then stopping")
        self.requested = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
            self.step = state.global_step


def sampled_indices(n: int, k: int, global_step: int) -> list[int]:
    """The validation sample of one evaluation: ``k`` of ``n`` indices from ``Random(42 + global_step)``, sorted."""
    if n <= k:
        return list(range(n))
    return sorted(random.Random(42 + global_step).sample(range(n), k))


def score_completions_only_on_cpu() -> bool:
    """Make trl's fused LM head score only the completion tokens on CPU, as it does on CUDA; True when applied.

    Without Triton, trl 1.x runs the LM head and its log-softmax over every position (prompt tokens included, then
    masked out) so that the tile shapes stay fixed for compilers such as Neuron's. On CPU nothing is compiled, and the
    prompt is most of a pair: a demo step took 17.6 s and 5.3 GB with every position scored, 10.6 s and 3.2 GB with
    the completions only, with the same per-token log-probabilities (each row is computed on its own). trl chooses
    with its module-level ``_use_triton``, so that name is wrapped; a trl without it is left as it is.
    """
    import trl
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if original is None:
        log.info("trl %s has no _use_triton: the LM head's scoring on CPU is left as trl does it",
                 trl.__version__)
        return False
    if getattr(original, "agentpipe_compact_cpu", False):
        return True

    def compact_on_cpu(device: Any) -> bool:
        return getattr(device, "type", None) == "cpu" or original(device)

    compact_on_cpu.agentpipe_compact_cpu = True  # type: ignore[attr-defined]
    trl_utils._use_triton = compact_on_cpu
    return True


def _causal_lm(model: Any) -> Any:
    """The causal LM inside a PEFT wrapper (the model trl patches), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def make_trainer_class() -> type:
    """A DPOTrainer whose ``evaluate()`` without a dataset uses a fresh random sample of the validation set, that
    takes pairs tokenised by ``token_cache`` as they are, and whose precomputed reference log-probs come from
    ``ref_cache`` (a ``RefLogpCache``) where stored; on CPU its LM head scores only the completion tokens
    (``score_completions_only_on_cpu``)."""
    from trl import DPOTrainer

    from pipeline.training import shared_prompt

    score_completions_only_on_cpu()

    class SampledEvalDPOTrainer(DPOTrainer):
        def __init__(self, *args: Any, validation: Any = None, eval_sample_size: int = 320, ref_cache: Any = None,
                     share_prompt: bool = True, **kwargs: Any) -> None:
            self.ref_cache = ref_cache  # before trl's __init__, which precomputes the reference log-probs
            # one pass per pair (pipeline.training.shared_prompt), on the model trl gave its fused LM head
            self.share_prompt = share_prompt and shared_prompt.install(_causal_lm(kwargs.get("model")))
            super().__init__(*args, **kwargs)
            self.validation = validation
            self.eval_sample_size = eval_sample_size

        def _compute_loss(self, model: Any, inputs: Any, return_outputs: bool) -> Any:
            with shared_prompt.active() if self.share_prompt else contextlib.nullcontext():
                return super()._compute_loss(model, inputs, return_outputs)

        def compute_ref_log_probs(self, model: Any, inputs: Any) -> Any:
            with shared_prompt.active() if self.share_prompt else contextlib.nullcontext():
                return super().compute_ref_log_probs(model, inputs)

        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            # pairs tokenised (and length-filtered) by pipeline.training.token_cache, the way trl would: used as they
            # are, not tokenised a second time
            if "prompt_ids" in getattr(dataset, "column_names", ()):
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
            # stored per pair set and base (pipeline.training.ref_cache): computed only for pairs not scored before
            if self.ref_cache is None:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            from pipeline.training.ref_cache import with_ref_logps

            return with_ref_logps(dataset, self.ref_cache,
                                  lambda part: super(SampledEvalDPOTrainer, self)._precompute_ref_logps(
                                      part, name, batch_size))

        def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval") -> Any:
            if eval_dataset is None:
                if self.validation is None or len(self.validation) == 0:
                    return {}
                idx = sampled_indices(len(self.validation), self.eval_sample_size, self.state.global_step)
                eval_dataset = self.validation.select(idx)
            return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys,
                                    metric_key_prefix=metric_key_prefix)

    return SampledEvalDPOTrainer
