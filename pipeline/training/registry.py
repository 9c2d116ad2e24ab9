"""Where trained models go in the MLflow registry, and their model cards (issue 17, item 3).

One registered model per source model and configuration family: the model name without its seed and beta
(``Qwen2.5-7B_safe_q32_s0`` and ``…_beta-0.05_s1`` are versions of ``Qwen2.5-7B_safe_q32``; the second stage
``Qwen2.5-7B_safe_q32_s0_help_q32_s0`` of ``Qwen2.5-7B_safe_q32_help_q32``). Adapters and merged models are
versions of it, told apart by the ``kind`` tag, each tagged with its lineage (base, parent, dataset, seed, beta,
stage, model name). Aliases: ``latest-adapter`` / ``latest-merged`` (the newest of each kind; MLflow reserves the
bare ``latest``, and ``models:/<family>/latest`` already resolves to the newest version of either kind) and
``paper-config`` / ``paper-config-merged`` for a model trained with the study's hyper-parameters (every training
option at its default). A merged version's source is its weights where they are (``file://<model>/merged``, tag
``agentpipe.weights=in place``): no second copy. An MLflow *server* accepts a local source only inside the run's
own artifact folder, so through one the folder is uploaded once as the run's ``model`` artifact instead (tag
``agentpipe.weights=uploaded …``, with a warning); a direct database tracking URI registers in place.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any


_SEED_OR_BETA = re.compile(r"_(?:s\d+|beta-[0-9.e-]+)(?=_|$)")
#: options that name what is trained on, not how: a model is "paper-config" whatever these are
_NOT_HYPERPARAMETERS = frozenset({"model", "pairs", "seed"})


def registry_family(model_name: str) -> str:
    """The registered model a trained model belongs to: its name without seeds and betas."""
    return _SEED_OR_BETA.sub("", model_name)


def is_paper_config(config: dict[str, Any]) -> bool:
    """True when every result-changing training option (besides model, pairs and split seed) has the study's
    default (``config``: a ``TrainConfig`` dump, as in ``training_config.json``)."""
    from pipeline.training.config import TrainConfig

    defaults = TrainConfig.model_construct()  # the field defaults, without validating model/pairs
    for name, field in TrainConfig.model_fields.items():
        if name in TrainConfig.not_in_fingerprint or name in _NOT_HYPERPARAMETERS or field.is_required():
            continue
        if name in config and config[name] != json.loads(json.dumps(getattr(defaults, name), default=str)):
            return False
    return True


def aliases(kind: str, paper: bool) -> list[str]:
    """The aliases a new version of ``kind`` (adapter or merged) takes."""
    suffix = "" if kind == "adapter" else "-merged"
    return [f"latest-{kind}"] + ([f"paper-config{suffix}"] if paper else [])


def write_model_card(model_dir: Path, folder: Path, *, kind: str, test_scores: dict[str, Any] | None = None) -> Path:
    """Write ``folder/README.md``: a Hugging Face model card of a trained adapter or merged model (base model,
    data, hyper-parameters, final DPO metrics and, once evaluated, the test-split scores per judge)."""
    from huggingface_hub import ModelCard, ModelCardData

    cfg = _read(model_dir / "training_config.json")
    metrics = _read(model_dir / "training_metrics.json")
    scores = test_scores if test_scores is not None else _read(model_dir / "test_scores.json")
    lineage = cfg.get("lineage", {})
    options = cfg.get("config", {})
    data = ModelCardData(base_model=lineage.get("base_model") or cfg.get("model"), library_name="peft" if kind ==
                         "adapter" else "transformers", tags=["dpo", "lora", "agent-safety", "agentpipe"])
    hyper = "\n".join(f"| {k} | {v} |" for k, v in sorted(options.items())
                      if k not in ("out", "tracking_uri", "force", "wait", "model", "pairs"))
    final = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                      for k, v in sorted(metrics.items()) if isinstance(v, (int, float)) and not isinstance(v, bool))
    score_rows = "\n".join(f"| {judge} | {k} | {v} |" for judge, by in sorted((scores or {}).items())
                           for k, v in sorted(by.items()) if k != "report")
    stats = cfg.get("data_stats", {})
    text = f"""---
{data.to_yaml()}
---

# {cfg.get('name', model_dir.name)} ({'LoRA adapter' if kind == 'adapter' else 'merged model'})

DPO-finetuned with LoRA by agentpipe (stage {lineage.get('stage', '1')}) from `{cfg.get('model')}`
(root base model `{lineage.get('base_model', cfg.get('model'))}`).

## Data
Pair set `{cfg.get('dataset')}` (`{cfg.get('data_path')}`, sha256 `{str(cfg.get('pairs_sha256', ''))[:16]}…`),
split seed {cfg.get('train_test_split_seed')}: {stats.get('train_pairs', '?')} training pairs from
{len(cfg.get('train_case_indices') or [])} cases; test cases {cfg.get('test_case_indices')}.

## Hyper-parameters
| option | value |
|---|---|
{hyper}
| effective_epochs | {cfg.get('effective_epochs')} |

## Final DPO metrics
| metric | value |
|---|---|
{final or '| (none recorded) | |'}

## Test-split scores
{('| judge | metric | value |' + chr(10) + '|---|---|---|' + chr(10) + score_rows) if score_rows else
 'Not evaluated yet: `agentpipe report` fills this in once the test split is judged.'}
"""
    path = folder / "README.md"
    ModelCard(text).save(path)
    return path


def record_test_scores(model_dir: Path, judge: str, scores: dict[str, Any]) -> None:
    """Store a trained model's test-split scores by one judge (from its unified report; each judge keeps its own)
    and refresh its model cards."""
    from pipeline.data.jsonl import atomic_write_json

    by_judge = {**_read(model_dir / "test_scores.json"), judge: scores}
    atomic_write_json(model_dir / "test_scores.json", by_judge)
    for kind, sub in (("adapter", "adapter"), ("merged", "merged")):
        if (model_dir / sub).is_dir():
            write_model_card(model_dir, model_dir / sub, kind=kind, test_scores=by_judge)



def cards_from_reports(report_paths: list[Path], models: Path | None = None) -> int:
    """Fill in the test scores of the model cards of the models trained under ``models`` (default
    ``<home>/models``) from the unified reports just written (``agentpipe report`` calls this: the report stage
    writes reports, the model cards are this side's files). A report counts when it is of a model trained here
    (its runs are filed as ``dpo_<model name>``, SPEC §6.4) on held-out cases only. Returns the cards updated."""
    import logging

    from pipeline.data.jsonl import read_json_object
    from pipeline.data.records import SCORE_KEYS
    from pipeline.data.reports import METRIC_NAMES
    from pipeline.settings import get_settings

    log = logging.getLogger("pipeline.training")
    models = models if models is not None else get_settings().home / "models"
    updated = 0
    for path in report_paths:
        content = read_json_object(Path(path))
        meta = content["meta"]
        model_dir = models / meta["agent"].removeprefix("dpo_")
        try:
            test = set(json.loads((model_dir / "training_config.json").read_text())["test_case_indices"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a model trained here
        if not content["per_case"]["case_idx"] or not set(content["per_case"]["case_idx"]) <= test:
            continue  # only scores on held-out cases describe the model
        scores: dict[str, Any] = {"report": str(path), "emulator": meta["emulator"], "cases": meta["n_cases"]}
        for eval_type, name in METRIC_NAMES:
            stats = (content.get(eval_type) or {}).get(SCORE_KEYS[eval_type])
            if stats and stats.get("mean") is not None:
                scores[f"mean_{name}"] = round(stats["mean"], 4)
        try:
            record_test_scores(model_dir, meta["evaluator"], scores)
            updated += 1
        except OSError as e:  # the card is a convenience: the report stands without it
            log.warning("model card of %s not updated: %s", model_dir, e)
    return updated


def _read(path: Path) -> dict[str, Any]:
    """A model folder's JSON file; ``{}`` only when it is not written yet (no metrics or test scores so far).
    A file that exists but cannot be read is an error: a card or a merged score table built without it would
    silently drop what it held."""
    from pipeline.data.jsonl import read_json_object

    if not path.exists():
        return {}
    return read_json_object(path)
