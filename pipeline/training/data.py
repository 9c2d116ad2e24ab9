"""The pairs a training run uses: loaded, split by the seed's test cases (SPEC §5), tokenised once per pairs file
and tokenizer (``token_cache``), length-filtered (SPEC §6.2: pairs above the limits are dropped, never truncated),
checked against the model's context, and the plan for the reference log-probabilities."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.split import test_cases as split_test_cases
from pipeline.errors import ConfigError, DataError
from pipeline.training.config import TrainConfig
from pipeline.training.models import model_context, resolve_model_path


@dataclass
class TrainingData:
    """The training and validation pairs, tokenised (``datasets.Dataset`` rows of ``token_cache.COLUMNS``)."""

    train: Any
    val: Any
    stats: dict[str, Any]
    train_cases: list[int]
    test_cases: list[int]


def _default_val_file(pairs: Path, seed: int) -> Path | None:
    stem = pairs.name[: -len(".jsonl")] if pairs.name.endswith(".jsonl") else pairs.stem
    if stem.endswith(f"_s{seed}"):
        candidate = pairs.with_name(f"{stem}_test.jsonl")
        return candidate if candidate.is_file() else None
    return None


def load_training_pairs(path: str | Path, option: str = "--pairs") -> list[dict[str, Any]]:
    """The pairs file's records (``option`` names it in errors); an empty file is a ``DataError``."""
    from pipeline.data.pairs import load_pairs

    if not Path(path).is_file():
        raise DataError(f"{option} {path}: pairs file not found")
    pairs = load_pairs(path)
    if not pairs:
        raise DataError(f"{path}: empty pair set; expected at least one preference pair")
    return pairs


def _fits(tokens: Any, idx: list[int], cfg: TrainConfig) -> tuple[list[int], int]:
    """(indices of the pairs within ``max_length`` / ``max_prompt_length``, number dropped): SPEC §6.2, pairs
    above the limits are dropped, never truncated."""
    import pyarrow.compute as pc

    lengths = tokens.select_columns(["prompt_length", "chosen_length", "rejected_length"]).to_dict()
    # trl also drops a pair whose prompt part alone fills max_length (no completion token would be left)
    shared_prompt = pc.list_value_length(tokens.data.column("prompt_ids")).to_numpy()
    kept = [i for i in idx if lengths["prompt_length"][i] <= cfg.max_prompt_length
            and max(lengths["chosen_length"][i], lengths["rejected_length"][i]) <= cfg.max_length
            and shared_prompt[i] < cfg.max_length]
    return kept, len(idx) - len(kept)


def _longest(tokens: Any, idx: list[int]) -> int:
    """The longest prompt + completion (tokens) among the rows ``idx``."""
    if not idx:
        return 0
    lengths = tokens.select_columns(["chosen_length", "rejected_length"]).to_dict()
    return max(max(lengths["chosen_length"][i], lengths["rejected_length"][i]) for i in idx)


def prepare_data(cfg: TrainConfig, tokenizer: Any, pairs: list[dict[str, Any]] | None = None, *,
                 model_path: str | None = None, pairs_sha: str | None = None, home: Path | None = None) -> TrainingData:
    """Load (unless given), split (SPEC §5/§6.2), tokenise (cached: ``token_cache``) and length-filter the pairs.
    ``model_path``: where the tokenizer's files are (default ``cfg.model`` resolved)."""
    from datasets import concatenate_datasets

    from pipeline.data.hashcache import cached_file_digest
    from pipeline.training.token_cache import tokenized_pairs

    pairs_path = Path(cfg.pairs)
    if pairs is None:
        pairs = load_training_pairs(pairs_path)
    model_path = model_path or resolve_model_path(cfg.model)
    tokens = tokenized_pairs(pairs, pairs_sha or cached_file_digest(pairs_path), tokenizer, model_path, home=home)
    test = split_test_cases(cfg.seed)
    test_set = set(test)
    train_idx = [i for i, p in enumerate(pairs) if p["case_idx"] not in test_set]
    val_idx = [i for i, p in enumerate(pairs) if p["case_idx"] in test_set]
    n_train_raw = len(train_idx)
    train_idx, dropped_train = _fits(tokens, train_idx, cfg)
    val_parts = []
    n_val_raw = len(val_idx)
    val_idx, dropped_val = _fits(tokens, val_idx, cfg)
    val_cases = {pairs[i]["case_idx"] for i in val_idx}
    if val_idx:
        val_parts.append(tokens.select(val_idx))
    val_file = Path(cfg.val_pairs) if cfg.val_pairs else _default_val_file(pairs_path, cfg.seed)
    if val_file is not None:
        extra = load_training_pairs(val_file, "--val-pairs")
        leaked = sorted({p["case_idx"] for p in extra} - test_set)
        if leaked:
            raise DataError(f"{val_file}: validation pairs of train cases of seed {cfg.seed} (e.g. case "
                            f"{leaked[0]}); expected only the seed's test cases")
        extra_tokens = tokenized_pairs(extra, cached_file_digest(val_file), tokenizer, model_path, home=home)
        extra_idx, extra_dropped = _fits(extra_tokens, list(range(len(extra))), cfg)
        n_val_raw += len(extra)
        dropped_val += extra_dropped
        val_cases |= {extra[i]["case_idx"] for i in extra_idx}
        if extra_idx:
            val_parts.append(extra_tokens.select(extra_idx))
    if not train_idx:
        raise DataError(f"{pairs_path}: no training pairs for seed {cfg.seed} ({len(pairs)} pairs, "
                        f"{len(pairs) - n_train_raw} of them in test cases, {dropped_train} too long); expected a "
                        "non-empty training set")
    train_cases = sorted({pairs[i]["case_idx"] for i in train_idx})
    val = concatenate_datasets(val_parts) if len(val_parts) > 1 else (val_parts[0] if val_parts else None)
    n_val = len(val) if val is not None else 0
    stats = {"pairs_total": len(pairs), "train_pairs": len(train_idx), "val_pairs": n_val,
             "train_pairs_before_length_filter": n_train_raw, "val_pairs_before_length_filter": n_val_raw,
             "dropped_too_long_train": dropped_train, "dropped_too_long_val": dropped_val,
             "train_cases": len(train_cases), "val_cases": len(val_cases),
             "longest_train_pair_tokens": _longest(tokens, train_idx),
             "longest_val_pair_tokens": max((_longest(part, list(range(len(part)))) for part in val_parts),
                                            default=0),
             "val_source": str(val_file) if val_file else "pairs file (test cases)"}
    return TrainingData(tokens.select(train_idx), val, stats, train_cases, test)


def check_context(cfg: TrainConfig, data: TrainingData, model_path: str) -> int | None:
    """Refuse (one line) when kept pairs are longer than the model's context: they would be trained past the
    positions the model was built for. The limits keep their study meaning (pairs above them are dropped); a
    shorter model needs a lower ``--max-length``, chosen by the researcher, never silently."""
    context = model_context(model_path)
    longest = max(data.stats["longest_train_pair_tokens"], data.stats.get("longest_val_pair_tokens", 0))
    if context is not None and longest > context:
        raise ConfigError(f"--max-length {cfg.max_length}: kept pairs are up to {longest} tokens but {model_path} "
                          f"has a {context}-token context (max_position_embeddings); rerun with --max-length "
                          f"{context} (or lower) to drop the longer pairs, counted in data_stats")
    return context


def ref_log_probs_plan(cfg: TrainConfig, n_train: int, epochs: float) -> tuple[bool, str]:
    """(precompute the reference log-probs?, why). ``precompute_ref_log_probs`` None (auto): precompute once over
    the training set when the run sees all of it (no ``max_steps``, or ``max_steps`` × batch × gradient
    accumulation × processes ≥ the training pairs), else compute them on the fly for the pairs drawn (a short
    run would otherwise score every pair to use a few). Either way each step's loss uses the same reference."""
    if cfg.precompute_ref_log_probs is not None:
        return cfg.precompute_ref_log_probs, "set explicitly"
    if cfg.max_steps == -1:
        return True, f"auto: {epochs:g} epoch(s) see all {n_train} training pairs; precomputed once"
    seen = cfg.max_steps * cfg.batch_size * cfg.gradient_accumulation_steps * int(os.environ.get("WORLD_SIZE", "1"))
    if seen >= n_train:
        return True, f"auto: {cfg.max_steps} steps see {seen} pairs >= {n_train} training pairs; precomputed once"
    return False, (f"auto: {cfg.max_steps} steps see {seen} of {n_train} training pairs; computed on the fly for "
                   "those")
