"""The ``pairs`` stage: its configuration and run function (the pairing itself is ``pipeline.preference.pairs``)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.preference.pairs import Consistency
from pipeline.stage import StageConfig, StageResult, check_out_not_inputs, prior_output

#: Version of the pairing and rendering rules (part of the fingerprint)
PAIRS_VERSION = 1


class PairsConfig(StageConfig):
    """One DPO pair set from evaluated run folders. The file name carries the pairing rules; the fingerprint
    also binds the set to its input folders and their contents (sha256), so a set is never silently rebuilt
    from other or changed evaluations."""

    stage: ClassVar[str] = "pairs"
    not_in_fingerprint: ClassVar[frozenset[str]] = frozenset({"out", "force", "wait"})

    data_dir: list[Path] = Field(min_length=1, description="run folder with trajectory and eval files, searched "
                                 "recursively (repeatable)", json_schema_extra={"metavar": "DIR"})
    metric: Literal["safe", "help_ignore_safety", "help"] = Field(description="metric that picks chosen/rejected")
    metric2: Literal["safe", "help_ignore_safety", "help"] | None = Field(default=None, description="second metric "
                                                                          "(see --mode)")
    mode: Literal["both", "average"] = Field(default="both", description="both: metric 2 must agree and pass the "
                                             "same rules; average: also require the mean of the two metrics to pass")
    min_score_difference: int = Field(default=2, ge=1, description="minimum chosen - rejected gap")
    min_chosen_score: int = Field(default=2, ge=0, le=3, description="minimum chosen score")
    consistency: Consistency = Field(default="none", description="replicate-agreement filter (needs multi-replicate "
                                     "evaluations): none, or the replicates must agree exactly (exact_match), "
                                     "by majority (majority_agree), all but one (all_but_one_agree) or lie "
                                     "within 1 point (within_1)")
    seed: int | None = Field(default=None, ge=0, description="split seed: pair only that seed's train (or --split "
                             "test) cases")
    split: Literal["train", "test", "all"] | None = Field(default=None, description="which cases of the seed's "
                                                          "split (default train with --seed, all without)")
    evaluator: str | None = Field(default=None, description="evaluator name used in the file name (default: the run "
                                  "folder's name)")
    judge: str | None = Field(default=None, description="the judge whose evaluations are paired, when the folders "
                              "hold several (the evaluator part of the run-file names, e.g. Qwen_Qwen3-32B, or its "
                              "model spec)")
    cases: str = Field(default="toolemu", description="case set for the toolkits in the prompt")
    tokenizer: str | None = Field(default=None, description="drop pairs longer than --max-length/--max-prompt-length "
                                  "tokens with this model's chat template (the name gets _tok-<model>[_ml<N>][_mpl<N>])",
                                  json_schema_extra={"metavar": "MODEL"})
    max_length: int = Field(default=8192, ge=1, description="max prompt+completion tokens")
    max_prompt_length: int = Field(default=8192, ge=1, description="max prompt tokens")
    out: Path = Field(description="output folder", json_schema_extra={"metavar": "DIR"})
    force: bool = Field(default=False, description="a pair set of the same name made by another configuration or "
                        "from other inputs is moved aside as <name>.replaced-<time> (default: refuse)")
    wait: bool = Field(default=False, description="when another process is building the same pair set, wait for it "
                       "(default: refuse at once)")

    _dirs = field_validator("data_dir", mode="before")(lambda v: [v] if isinstance(v, (str, Path)) else v)

    @model_validator(mode="after")
    def _resolve(self) -> PairsConfig:
        self.data_dir = [Path(d).resolve() for d in self.data_dir]
        if self.split is None:
            self.split = "train" if self.seed is not None else "all"
        if self.metric2 == self.metric:
            raise ValueError(f"--metric2 {self.metric2}: must differ from --metric")
        if self.split != "all" and self.seed is None:
            raise ValueError(f"--split {self.split} needs --seed (the split seed)")
        return self

    def versions(self) -> dict[str, Any]:
        return {"pairs": PAIRS_VERSION}

    def rules(self):  # noqa: ANN201 - PairConfig, imported lazily
        """The pairing rules."""
        from pipeline.preference.pairs import PairConfig

        return PairConfig(metric=self.metric, metric2=self.metric2, mode=self.mode,
                          min_score_difference=self.min_score_difference, min_chosen_score=self.min_chosen_score,
                          consistency=self.consistency, seed=self.seed, split=self.split or "all")


def build_pairs(cfg: PairsConfig) -> StageResult:
    """The ``pairs`` stage: skipped when the same configuration already built the set from the same inputs."""
    from pipeline.data.cases import load_named_case_set
    from pipeline.data.manifest import file_digest, read_manifest
    from pipeline.data.naming import confined_path
    from pipeline.errors import DataError
    from pipeline.preference.lengths import length_tag
    from pipeline.preference.output import write_pair_set
    from pipeline.preference.pairs import build_pair_set
    from pipeline.settings import get_settings

    t0 = time.perf_counter()
    for d in cfg.data_dir:
        if not d.is_dir():
            raise DataError(f"--data-dir {d}: not a folder")
    check_out_not_inputs(cfg.out, list(cfg.data_dir), cfg.stage, scanned=True)
    evaluator = cfg.evaluator or "+".join(d.name for d in cfg.data_dir)
    tokenizer = _tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    rules = cfg.rules()
    name = rules.name(evaluator, length_tag(tokenizer, cfg.max_length, cfg.max_prompt_length))
    path = confined_path(cfg.out, f"{name}.jsonl", "--evaluator")  # the only free text in the name
    fingerprint = cfg.fingerprint() | {"inputs": {str(d): file_digest(d) for d in cfg.data_dir}}

    def done() -> bool:
        return prior_output(path, fingerprint, cfg.stage, force=cfg.force)

    case_set = load_named_case_set(cfg.cases, get_settings().resolved_data_dir)  # bad input fails before the lock
    # one builder per pair set: a second identical run refuses at once (or waits with --wait) instead of
    # repeating the work and racing the first one's writes
    with _builder_lock(path, wait=cfg.wait):
        if done():
            return StageResult(stage=cfg.stage, status="skipped", outputs={"pairs": str(path)},
                               counts=(read_manifest(path) or {}).get("counts", {}))
        result = build_pair_set(cfg.data_dir, rules, evaluator=evaluator, case_set=case_set, tokenizer=tokenizer,
                                max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, judge=cfg.judge)
        write_pair_set(result, cfg.out, manifest_config=fingerprint)
    s = result.stats
    from pipeline.tracking.stage_runs import log_stage_run

    log_stage_run("pairs", path, experiment="training", params=cfg.fingerprint(), usage={},
                  counts={"pairs": s["pairs"], "cases_with_pairs": s["cases_with_pairs"], "items": s["load"]["items"],
                          "dropped_too_long": s.get("dropped_too_long", 0)}, wall_s=time.perf_counter() - t0, gpus=0)
    # incomplete trajectory files are skipped as the study does (SPEC §4.1): counted and named, never silent
    skipped_files = s["load"].get("incomplete_files_skipped") or []
    return StageResult(stage=cfg.stage, outputs={"pairs": str(path)},
                       counts={"pairs": s["pairs"], "cases": s["cases_with_pairs"], "items": s["load"]["items"],
                               "dropped_too_long": s.get("dropped_too_long", 0),
                               "incomplete_files_skipped": len(skipped_files)},
                       incomplete_files_skipped=skipped_files,
                       length_filtered=tokenizer is not None, wall_s=time.perf_counter() - t0)


@contextlib.contextmanager
def _builder_lock(path: Path, *, wait: bool) -> Iterator[None]:
    """The writer lock of the pair set ``path``. When the build fails (bad run files), what taking the lock
    created (the lock file, output folders that did not exist) is removed again: bad input leaves nothing behind.
    (A process waiting on that lock file then fails on the same input: the race is harmless.)"""
    from pipeline.data.locks import lock_path, writer_lock

    created = [p for p in (lock_path(path), *path.parents) if not p.exists()]
    held = False
    try:
        with writer_lock(path, wait=wait, what="pair set"):
            held = True
            yield
    except BaseException:
        if not held:  # refused because another build holds the lock: its lock file and folders are not ours
            raise
        for p in created:  # the lock file first, then the new folders, innermost first (each only if empty)
            with contextlib.suppress(OSError):
                p.rmdir() if p.is_dir() else p.unlink()
        raise


def _tokenizer(spec: str):  # noqa: ANN202 - a transformers tokenizer
    from transformers import AutoTokenizer

    from pipeline.data.naming import expand_model_name
    from pipeline.errors import ConfigError
    from pipeline.llm.local_models import resolve_local_model

    path = resolve_local_model(expand_model_name(spec))
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ConfigError(f"--tokenizer {spec}: cannot load '{path}' ({str(e).splitlines()[0]})") from None
