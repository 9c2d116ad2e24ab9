"""DPO + LoRA training, adapter merging and sequential finetuning (SPEC §6).

Public API (nothing heavy is imported until a function runs):

* :class:`TrainConfig` (``pipeline.training.config``): the study's hyper-parameters as defaults.
* :func:`train` (``pipeline.training.dpo``) → :class:`TrainResult`: train, resume or skip one model.
* :func:`merge` (``pipeline.training.merging``) → :class:`MergeResult`: merge an adapter into a standalone model.
* :func:`model_name`, :func:`dataset_name` (``pipeline.training.naming``): SPEC §6.4 names.
* CLI: ``agentpipe train`` and ``agentpipe merge`` (``pipeline.training.cli``).
"""

from __future__ import annotations

from typing import Any

from pipeline.training.config import TrainConfig
from pipeline.training.naming import dataset_name, model_name

__all__ = ["MergeResult", "Preempted", "TrainConfig", "TrainResult", "dataset_name", "merge", "model_name", "train"]


_LAZY = {"train": "dpo", "TrainResult": "dpo", "Preempted": "dpo", "merge": "merging", "MergeResult": "merging"}


def __getattr__(name: str) -> Any:  # lazy: these modules pull in torch/transformers only when used
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"pipeline.training.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'pipeline.training' has no attribute '{name}'")
