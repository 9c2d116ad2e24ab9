"""Names of trained models (SPEC §6.4) and where their files live (DESIGN §4).

``<nickname>[_<quant>]_<dataset>[_b-<batch>][_ml-<max_length>][_beta-<beta>]_s<seed>`` under ``<home>/models/``, e.g.
``Qwen2.5-7B_safe_q32_s0`` or ``Llama3.1-8B_help_gpt5m_beta-0.05_s1``. A second stage trained on a merged model
appends to the parent's name: ``Qwen2.5-7B_safe_q32_s0_help_q32_s0`` (same split seed), so stages and betas can be
read back from names.

Model folder layout: ``adapter/`` (final LoRA adapter + tokenizer), ``merged/`` (standalone merged model),
``checkpoints/`` (trainer checkpoints ``checkpoint-<step>`` and per-epoch adapters ``epoch-<n>``),
``training_config.json``, ``training_metrics.json``, ``manifest.json``, ``tracking/{train,merge}/``.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.data.naming import NICKNAME_TO_ID, expand_model_name, extract_seed, nickname
from pipeline.errors import ConfigError

TRAINING_CONFIG = "training_config.json"
TRAINING_METRICS = "training_metrics.json"
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
TRACKING_TRAIN = Path("tracking") / "train"
_SEED_SUFFIX = re.compile(r"_s(\d+)$")
_PROJECT_MERGED = re.compile(r"(?:^|/)models/([^/]+)/merged$")
_STUDY_MERGED = re.compile(r"(?:^|/)(?:dpo_merged|dpo_trained|sft_merged)/([^/]+)$")


def dataset_name(pairs_path: str | Path, seed: int) -> str:
    """The dataset part of a model name: the pairs file stem without its ``_s<seed>`` suffix.

    A pairs file built for another seed (``safe_q32_s1`` when training seed 0), or a test-split file, is an error.
    """
    stem = Path(pairs_path).name
    stem = stem[: -len(".jsonl")] if stem.endswith(".jsonl") else Path(stem).stem
    if stem.endswith("_test"):
        raise ConfigError(f"--pairs {pairs_path}: a test-split pair set; train on the train (or all-case) set and pass "
                          "this one as --val-pairs")
    found = extract_seed(stem)
    if found is not None and found != seed:
        raise ConfigError(f"--pairs {pairs_path}: built for split seed {found}, but --seed is {seed}")
    return _SEED_SUFFIX.sub("", stem)


def is_both_dataset(name: str) -> bool:
    """The study's rule for the combined dataset: the name contains ``both``, or both ``safe`` and ``help``."""
    return "both" in name or ("safe" in name and "help" in name)


def parent_model_dir(model: str) -> Path | None:
    """The trained-model folder a base spec points into (``…/models/<name>/merged`` or the folder itself).

    Told from a base model by what is on disk, not by whether its ``training_config.json`` can be read: a
    ``merged/`` folder beside an ``adapter/`` (or holding the merge's ``merge_config.json``) belongs to a trained
    model, whose lineage :func:`read_training_config` then requires."""
    p = Path(model).expanduser()
    if p.name == "merged" and p.is_dir() and _is_trained_model_dir(p.parent, merged=p):
        return p.parent
    if p.is_dir() and (p / "merged").is_dir() and _is_trained_model_dir(p, merged=p / "merged"):
        return p
    return None


def _is_trained_model_dir(folder: Path, *, merged: Path) -> bool:
    """A ``train`` output folder: its config, its adapter, or a merge of its adapter is there."""
    return ((folder / TRAINING_CONFIG).exists() or (folder / "adapter").is_dir()
            or (merged / "merge_config.json").is_file())


def read_training_config(model_dir: Path) -> dict:
    """A trained model folder's ``training_config.json``; missing or unreadable is an error naming the file
    (a lineage guessed without it would call a second stage the first)."""
    from pipeline.data.jsonl import read_json_object

    path = model_dir / TRAINING_CONFIG
    try:
        return read_json_object(path, "training config")
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing; {model_dir} is a trained model folder (it has merged/ or adapter/), "
                          f"so its training config is needed for the lineage") from None


def base_nickname(model: str) -> str:
    """The first part of a model name: a trained parent's name, a nickname, or the folder/id base name."""
    text = model.rstrip("/")
    parent = parent_model_dir(text)
    if parent is not None:
        name = read_training_config(parent).get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{parent / TRAINING_CONFIG}: field 'name' missing or not a string")
        return name
    for rx in (_PROJECT_MERGED, _STUDY_MERGED):
        m = rx.search(text)
        if m:
            return m.group(1)
    if text in NICKNAME_TO_ID:
        return text
    expanded = expand_model_name(text)
    nick = nickname(expanded)
    if nick != expanded:
        return nick
    return Path(text).name


def model_name(model: str, dataset: str, seed: int, *, beta: float = 0.1, quantization: str = "none",
               batch_size: int = 1, max_length: int = 8192) -> str:
    """The trained model's name (SPEC §6.4). A parent whose name carries another seed is an error."""
    parts = [base_nickname(model)]
    if quantization != "none":
        parts.append(quantization)
    parts.append(dataset)
    if batch_size != 1:
        parts.append(f"b-{batch_size}")
    if max_length != 8192:
        parts.append(f"ml-{max_length}")
    if beta != 0.1:
        parts.append(f"beta-{beta:g}")
    parts.append(f"s{seed}")
    name = "_".join(parts)
    found = extract_seed(name)  # raises on ambiguous seeds (a parent trained with another split seed)
    if found != seed:
        raise ConfigError(f"model name {name}: split seed {found} differs from --seed {seed}")
    return name


def default_model_dir(name: str, home: Path | None = None) -> Path:
    from pipeline.settings import get_settings

    return (home or get_settings().home) / "models" / name
