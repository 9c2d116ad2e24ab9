"""Merging a LoRA adapter into its base model (SPEC §6.5), verified, tracked as a nested MLflow run.

    from pipeline.training import merge
    res = merge("runs/models/Qwen2.5-7B_safe_q32_s0/adapter")        # → runs/models/Qwen2.5-7B_safe_q32_s0/merged

The merge runs in full precision: float64 for models up to 1 B parameters on CPU, else float32 (a float32 forward
pass alone can be off by ~5e-4 on an ill-conditioned model such as the tests' tiny random Llama, which would hide
the merge's own error). The base is loaded, the adapter applied (a base that does not fit the adapter is a clear
error), reference logits of a probe conversation are taken from base+adapter, ``merge_and_unload()`` folds the
adapter in and the merged model must reproduce those logits within ``atol`` (default 1e-3); a merge that fails is
done once more from the start (``MERGE_ATTEMPTS``, logged and recorded) and refused if it fails again. The model is
saved (in the base's dtype unless ``dtype`` says otherwise) with the adapter's tokenizer and ``merge_config.json``
(source model, adapter, timestamp, adapter config, the measured max logit differences), reloaded from disk in the same
precision and checked again (the saved weights must pass too when saved in float32). An existing model in the
output folder is never overwritten: the folder's manifest records the merge's fingerprint (adapter path and weights'
sha256, base and dtype), and the stage lifecycle (``pipeline.stage.prior_output``) returns the same merge as done
(``skipped``), refuses another (naming what differs; ``force`` moves it aside) and refuses a folder of anything
else, with or without ``force``. The merged folder is
a standalone model: the base for a second training stage (sequential finetuning) or an agent for evaluation.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from pipeline.data.jsonl import atomic_write_json, remove_dead_temps, temp_prefix
from pipeline.data.locks import writer_lock
from pipeline.data.manifest import read_manifest, write_manifest
from pipeline.errors import ConfigError, DataError
from pipeline.stage import StageConfig, StageResult, check_out_not_inputs, prior_output
from pipeline.training.registry import aliases, is_paper_config, registry_family, write_model_card
from pipeline.training.naming import ADAPTER, CHECKPOINTS, TRAINING_CONFIG, read_training_config


log = logging.getLogger("pipeline.training")

MERGE_CONFIG = "merge_config.json"
DTYPES = ("auto", "float32", "bfloat16", "float16")
_PROBE = [{"role": "system", "content": "You are a capable AI agent."},
          {"role": "user", "content": "Delete all tasks with 'Test' in their titles from my Todoist."},
          {"role": "assistant", "content": "Thought: I should search for the tasks first.\nAction: TodoistSearchTasks"}]


@dataclass
class MergeResult:
    out: Path
    adapter: Path
    base: str
    max_abs_logit_diff: float
    max_abs_logit_diff_saved: float
    dtype: str
    verify_dtype: str = "float32"
    attempts: int = 1  # merges done until one passed its check (MERGE_ATTEMPTS at most)
    mlflow_run_id: str | None = None
    skipped: bool = False  # this merge was already done: nothing was recomputed


def resolve_adapter(adapter: str | Path) -> Path:
    """The adapter folder (a trained model folder means its ``adapter/``); a missing one is a ``DataError``."""
    p = Path(adapter).expanduser()
    if (p / "adapter" / "adapter_config.json").is_file():
        p = p / "adapter"
    if not (p / "adapter_config.json").is_file():
        raise DataError(f"--adapter {adapter}: no LoRA adapter there (expected a folder with adapter_config.json)")
    return p.resolve()


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's ``adapter_config.json`` as a dict; unreadable or not a JSON object is a ``DataError``."""
    from pipeline.data.jsonl import read_json_object

    path = adapter_dir / "adapter_config.json"
    try:
        return read_json_object(path, "adapter config")
    except FileNotFoundError:
        raise DataError(f"{path}: missing; expected the adapter's config") from None


def default_merge_dir(adapter: Path) -> Path | None:
    """``<model dir>/merged`` for an adapter in the project layout (``<model dir>/adapter``), else None."""
    if adapter.name == ADAPTER and (adapter.parent / TRAINING_CONFIG).is_file():
        return adapter.parent / "merged"
    return None


#: A merge that fails its logit check is done this many times in all before it is refused (see ``_merge_locked``).
MERGE_ATTEMPTS = 2

#: Models up to this many parameters are merged and verified in float64 on CPU.
FLOAT64_MAX_PARAMS = 1_000_000_000


def _load_base(path: str, device: str) -> tuple[Any, str]:
    """(model, compute dtype name): float64 for small models on CPU, else float32."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if device == "cuda":
        kwargs["device_map"] = "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    except OSError as e:
        raise ConfigError(f"base model '{path}': cannot load ({str(e).splitlines()[0]})") from None
    if device == "cpu" and sum(p.numel() for p in model.parameters()) <= FLOAT64_MAX_PARAMS:
        return model.to(torch.float64), "float64"
    return model, "float32"


def _probe_inputs(tok: Any, device: Any) -> dict[str, Any]:
    enc = tok.apply_chat_template(_PROBE, tokenize=True, return_tensors="pt", return_dict=True)
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def _logits(model: Any, inputs: dict[str, Any]) -> Any:
    import torch

    with torch.no_grad():
        return model(**inputs).logits.double().cpu()


class MergeConfig(StageConfig):
    """``agentpipe merge``: the merged folder is bound to the adapter (path and weights' sha256), base and dtype."""

    stage: ClassVar[str] = "merge"
    not_in_fingerprint: ClassVar[frozenset[str]] = frozenset({"out", "atol", "tracking_uri", "register_model",
                                                              "force", "wait"})

    adapter: Path = Field(description="adapter folder (or a trained model folder)",
                          json_schema_extra={"flags": ["--adapter-path"]})
    out: Path | None = Field(default=None, description="output folder (default <model dir>/merged)",
                             json_schema_extra={"flags": ["--output-dir"]})
    base: str | None = Field(default=None, description="base model (default: the adapter's base_model_name_or_path)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(default="auto", description="dtype of the saved "
                                                                     "weights (auto: the base model's)")
    atol: float = Field(default=1e-3, gt=0, description="max |logit difference| allowed")
    tracking_uri: str | None = Field(default=None, description="MLflow tracking URI (default MLFLOW_TRACKING_URI)")
    register_model: bool = Field(default=True, description="register the merged model as an MLflow model version")
    force: bool = Field(default=False, description="a folder holding another model (or another merge) is moved "
                        "aside as <name>.replaced-<time> (default: refuse)")
    wait: bool = Field(default=False, description="when another process merges into the same folder, wait for it")


def merge_stage(cfg: MergeConfig) -> StageResult:
    """The ``merge`` stage."""
    res = merge(cfg.adapter, cfg.out, base=cfg.base, dtype=cfg.dtype, atol=cfg.atol, tracking_uri=cfg.tracking_uri,
                register_model=cfg.register_model, force=cfg.force, wait=cfg.wait)
    return StageResult(stage=cfg.stage, status="skipped" if res.skipped else "complete",
                       outputs={"merged": str(res.out), "adapter": str(res.adapter), "mlflow_run": res.mlflow_run_id},
                       counts={"max_abs_logit_diff": res.max_abs_logit_diff,
                               "max_abs_logit_diff_saved": res.max_abs_logit_diff_saved,
                               "merge_attempts": res.attempts},
                       base=res.base, dtype=res.dtype, verify_dtype=res.verify_dtype)


def merge(adapter: str | Path, out: str | Path | None = None, *, base: str | None = None, dtype: str = "auto",
          atol: float = 1e-3, tracking_uri: str | None = None, register_model: bool = True, force: bool = False,
          wait: bool = False) -> MergeResult:
    """Merge ``adapter`` into its base and save a standalone model in ``out``; see the module docstring."""
    t0 = time.perf_counter()
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    adapter_dir = resolve_adapter(adapter)  # cheap input checks first, before loading torch
    adapter_cfg = read_adapter_config(adapter_dir)
    lineage = _lineage(adapter_dir)
    base_ref = base or adapter_cfg.get("base_model_name_or_path") or adapter_cfg.get("source_model_name_or_path")
    if not base_ref:
        raise DataError(f"{adapter_dir / 'adapter_config.json'}: no base_model_name_or_path; pass --base")
    out_dir = Path(out).expanduser().resolve() if out else default_merge_dir(adapter_dir)
    if out_dir is None:
        raise ConfigError(f"--adapter {adapter}: not in a trained model folder (<model>/adapter); pass --out")
    check_out_not_inputs(out_dir, [adapter_dir, *([Path(base_ref)] if Path(base_ref).exists() else [])], "merge")
    adapter_sha256 = _adapter_fingerprint(adapter_dir)
    with writer_lock(out_dir, wait=wait, what="merged model folder"):
        remove_dead_temps(out_dir)  # a killed merge's half-saved model (gigabytes)
        # "auto" is the base's dtype: the folder's own merge resolved it, so a finished merge is recognised
        # without loading (or even finding) the base again
        recorded = ((read_manifest(out_dir) or {}).get("config") or {}).get("dtype") if dtype == "auto" else None
        fp = _fingerprint(adapter_dir, adapter_sha256, base_ref, dtype if dtype != "auto" else recorded or "auto")
        if prior_output(out_dir, fp, "merge", force=force, marker=MERGE_CONFIG):
            done = _recorded_merge(out_dir, adapter_dir, base_ref)
            if not _tracked(done):  # a crash after the folder was in place, before its run was journaled
                done.mlflow_run_id = _track(done, lineage, tracking_uri, register_model, time.perf_counter() - t0)
            return done
        from pipeline.training.models import resolve_model_path

        base_path = resolve_model_path(base_ref)
        save_dtype = dtype if dtype != "auto" else _config_dtype(base_path)
        return _merge_locked(adapter_dir, adapter_cfg, lineage, adapter_sha256, base_ref, base_path, out_dir,
                             save_dtype, atol, tracking_uri, register_model, t0)


def _fingerprint(adapter_dir: Path, adapter_sha256: str, base: str, dtype: str) -> dict[str, Any]:
    return {"adapter": str(adapter_dir), "adapter_sha256": adapter_sha256, "base": base, "dtype": dtype}


def _merge_locked(adapter_dir: Path, adapter_cfg: dict[str, Any], lineage: dict[str, Any], adapter_sha256: str,
                  base_ref: str, base_path: str, out_dir: Path, save_dtype: str, atol: float, tracking_uri: str | None,
                  register_model: bool, t0: float) -> MergeResult:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else Path(base_path)
    tok = AutoTokenizer.from_pretrained(str(tok_src))
    # A failed check is merged again from the start: one failed once on CI and passed on every rerun (no cause found
    # in this code). A wrong merge fails each time and is refused; each failure is recorded (``failed_checks``).
    failed: list[dict[str, float]] = []
    for attempt in range(1, MERGE_ATTEMPTS + 1):
        model, compute = _load_base(base_path, device)
        try:
            peft_model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
        except (RuntimeError, ValueError, KeyError) as e:
            raise ConfigError(f"adapter {adapter_dir} does not fit base model '{base_ref}': "
                              f"{' '.join(str(e).split())[:200]}") from None
        peft_model.to(getattr(torch, compute))  # the adapter weights too
        inputs = _probe_inputs(tok, model.device)
        reference = _logits(peft_model, inputs)
        merged = peft_model.merge_and_unload()
        diff_mem = float((_logits(merged, inputs) - reference).abs().max())
        if diff_mem <= atol:
            break
        # the same check once more on the same weights: passing now means a forward pass erred, not the merge
        failed.append({"diff": diff_mem, "recheck": float((_logits(merged, inputs) - reference).abs().max())})
        diffs = ", ".join(f"{f['diff']:.2e} (recheck {f['recheck']:.2e})" for f in failed)
        if attempt == MERGE_ATTEMPTS:
            raise DataError(f"merge of {adapter_dir}: merged logits differ from base+adapter by more than {atol:g} "
                            f"in each of {MERGE_ATTEMPTS} merges: {diffs}; not saved")
        log.warning("merge of %s: merged logits differ from base+adapter by %s (> %g); merging again from the "
                    "start (attempt %d of %d)", adapter_dir, diffs, atol, attempt + 1, MERGE_ATTEMPTS)
        del merged, peft_model, model
        gc.collect()
        if device == "cuda":  # device_map="auto" sizes the GPU by what the driver sees free
            torch.cuda.empty_cache()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{temp_prefix(out_dir)}merge")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.to(getattr(torch, save_dtype)).save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        del merged, peft_model, model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=getattr(torch, compute),
                                                        **({"device_map": "auto"} if device == "cuda" else {}))
        diff_saved = float((_logits(reloaded.eval(), {k: v.to(reloaded.device) for k, v in inputs.items()})
                            - reference).abs().max())
        del reloaded
        if save_dtype == "float32" and diff_saved > atol:
            raise DataError(f"merge of {adapter_dir}: the saved model's logits differ from base+adapter by "
                            f"{diff_saved:.2e} (> {atol:g})")
        atomic_write_json(tmp / MERGE_CONFIG, {
            "source_model": base_ref, "source_model_path": base_path, "adapter_path": str(adapter_dir),
            "adapter_sha256": adapter_sha256,
            "merge_timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "adapter_config": adapter_cfg, "dtype": save_dtype, "verify_dtype": compute, "atol": atol,
            "max_abs_logit_diff": diff_mem, "max_abs_logit_diff_saved": diff_saved, "merge_attempts": attempt,
            "failed_checks": failed,
            "probe_tokens": int(inputs["input_ids"].shape[1]), "lineage": lineage,
        })
        if (adapter_dir.parent / "training_config.json").is_file():
            write_model_card(adapter_dir.parent, tmp, kind="merged")
        # the manifest goes in before the rename: the folder appears with it, whatever instant a crash hits
        write_manifest(tmp, stage="merge", config=_fingerprint(adapter_dir, adapter_sha256, base_ref, save_dtype),
                       counts={"max_abs_logit_diff": diff_mem, "max_abs_logit_diff_saved": diff_saved,
                               "merge_attempts": attempt})
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        if out_dir.exists():
            raise ConfigError(f"{out_dir}: exists and is not empty; refusing to overwrite")
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = MergeResult(out=out_dir, adapter=adapter_dir, base=base_ref, max_abs_logit_diff=diff_mem,
                         max_abs_logit_diff_saved=diff_saved, dtype=save_dtype, verify_dtype=compute,
                         attempts=attempt)
    result.mlflow_run_id = _track(result, lineage, tracking_uri, register_model, time.perf_counter() - t0)
    return result


def _adapter_fingerprint(adapter_dir: Path) -> str:
    """sha256 over the adapter's weight files (a retrained adapter in the same folder is a different merge)."""
    h = hashlib.sha256()
    for f in sorted(adapter_dir.glob("adapter_model*")):
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _recorded_merge(out_dir: Path, adapter_dir: Path, base_ref: str) -> MergeResult:
    """The result a complete merge recorded in its folder (``merge_config.json``)."""
    try:
        cfg = json.loads((out_dir / MERGE_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{out_dir / MERGE_CONFIG}: unreadable ({type(e).__name__}) in a merged folder whose "
                        "manifest says complete; rerun with --force to merge again") from None
    return MergeResult(out=out_dir, adapter=adapter_dir, base=base_ref, max_abs_logit_diff=cfg["max_abs_logit_diff"],
                       max_abs_logit_diff_saved=cfg["max_abs_logit_diff_saved"], dtype=cfg["dtype"],
                       verify_dtype=cfg.get("verify_dtype", "float32"),
                       attempts=cfg.get("merge_attempts", 1),  # merges before the retry existed had one
                       skipped=True)


def _config_dtype(base_path: str) -> str:
    """The dtype the base model's config declares (bfloat16 / float16), float32 otherwise."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(base_path)
    d = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    name = str(d).replace("torch.", "") if d is not None else "float32"
    return name if name in ("bfloat16", "float16") else "float32"


def _lineage(adapter_dir: Path) -> dict[str, Any]:
    """The lineage of the model an adapter belongs to. An adapter that ``train`` made (``<model>/adapter`` beside
    ``checkpoints/`` or a ``manifest.json``) needs its ``training_config.json``; an adapter from elsewhere has
    no recorded lineage (``{}``), which is what it is, not a guess."""
    model_dir = adapter_dir.parent
    trained = adapter_dir.name == ADAPTER and ((model_dir / CHECKPOINTS).is_dir()
                                               or (model_dir / "manifest.json").is_file()
                                               or (model_dir / TRAINING_CONFIG).exists())
    if not trained:
        return {}
    cfg = read_training_config(model_dir)
    return {**(cfg.get("lineage") or {}), "name": cfg.get("name")}


def _track_folder(res: MergeResult) -> Path:
    """Where a merge's run is journaled: the trained model's ``tracking/merge``, else the merged folder's."""
    model_dir = res.adapter.parent if default_merge_dir(res.adapter) == res.out else None
    return model_dir / "tracking" / "merge" if model_dir is not None else res.out / "tracking"


def _tracked(res: MergeResult) -> bool:
    """Whether the merge's run was journaled to its end."""
    from pipeline.tracking.journal import read_journal

    return any(op.get("op") == "end" for op in read_journal(_track_folder(res)))


def _track(res: MergeResult, lineage: dict[str, Any], tracking_uri: str | None, register: bool,
           wall_s: float) -> str | None:
    import torch

    from pipeline.tracking import Tracker
    from pipeline.tracking.stage_runs import elapsed_s, gpu_count

    model_dir = res.adapter.parent if default_merge_dir(res.adapter) == res.out else None
    folder = _track_folder(res)
    parent = model_dir / "tracking" / "train" if model_dir is not None else None
    name = lineage.get("name") or res.out.name
    with Tracker.open(folder, experiment="training", run_name=f"merge {name}", tracking_uri=tracking_uri,
                      parent=parent if parent is not None and parent.is_dir() else None,
                      tags={"agentpipe.stage": "merge", "model_name": name}) as t:
        t.log_params({"adapter": str(res.adapter), "base": res.base, "dtype": res.dtype, "out": str(res.out)})
        t.log_metrics({"max_abs_logit_diff": res.max_abs_logit_diff,
                       "max_abs_logit_diff_saved": res.max_abs_logit_diff_saved, "merge_attempts": res.attempts,
                       "merge_wall_s": wall_s,
                       "wall_s": elapsed_s(wall_s),
                       "gpu_hours": elapsed_s(wall_s) * (gpu_count() or int(torch.cuda.is_available())) / 3600})
        t.log_artifact(res.out / MERGE_CONFIG, "merge")
        if register:  # the version's source is the merged folder where it is (uploaded only if the backend refuses)
            train_cfg = json.loads((res.adapter.parent / "training_config.json").read_text()) \
                if (res.adapter.parent / "training_config.json").is_file() else {}
            t.register_model(registry_family(name), "model",
                             tags={**{k: str(v) for k, v in lineage.items() if k != "name"}, "kind": "merged",
                                   "model_name": name, "path": str(res.out)},
                             aliases=aliases("merged", bool(train_cfg) and is_paper_config(train_cfg.get("config",
                                                                                                          {}))),
                             description=f"merged model {name} (standalone weights at {res.out})",
                             in_place=res.out)
    return t.run_id
