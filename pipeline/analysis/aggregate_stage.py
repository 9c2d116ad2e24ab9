"""The ``analyze aggregate`` stage: unified reports of a folder of runs (all cases, or a seed's train or test
cases), and what ``analyze all`` shares with it (the runs' digest, the partial-data and seed checks, stale
reports removed, warnings)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.data.locks import writer_lock
from pipeline.data.manifest import read_manifest
from pipeline.errors import DataError
from pipeline.stage import StageConfig, StageResult, begin_output, check_out_not_inputs, content_digest, prior_output


def warn_line(msg: str) -> None:
    print(f"agentpipe: warning: {msg}", file=sys.stderr)


@dataclass
class AggregateResult:
    out: Path
    reports: list[Path]
    skipped_files: list[dict[str, str]]
    skipped_configs: list[dict[str, str]]
    files_processed: int
    seeds: list[int]
    #: configurations lacking expected cases (``pipeline.data.coverage.Gap``; empty unless --allow-partial)
    partial: list = field(default_factory=list)


def remove_stale_reports(folder: Path, current: list[Path]) -> None:
    """Reports of configurations no longer in the runs (this same analysis, refreshed) are removed, so the folder
    holds exactly what the summary describes."""
    from pipeline.analysis.rows import REPORT_SUFFIX

    keep = {p.resolve() for p in current}
    for f in folder.rglob(f"*{REPORT_SUFFIX}") if folder.is_dir() else []:
        if f.resolve() not in keep:
            f.unlink()


class AggregateConfig(StageConfig):
    """``analyze aggregate``: unified reports of a folder of runs, optionally a seed's train or test cases."""

    stage: ClassVar[str] = "analyze aggregate"
    not_in_fingerprint: ClassVar[frozenset[str]] = frozenset({"out", "strict", "force", "allow_partial"})

    runs: Path = Field(description="folder of model folders", json_schema_extra={"metavar": "DIR"})
    out: Path = Field(description="report folder", json_schema_extra={"metavar": "DIR"})
    split: Literal["all", "train", "test"] | None = Field(default=None, description="cases to keep (default: all; "
                                                          "test when --seed is given)")
    seed: list[int] | None = Field(default=None, description="split seed(s) to report (repeatable)")
    strict: bool = Field(default=False, description="fail on the first invalid or incomplete file (without "
                         "--allow-partial every one is refused anyway, all named in one line)")
    allow_partial: bool = Field(default=False, description="report what is there when configurations lack "
                                "expected cases or files are invalid (skipped, and named in aggregate_summary.json); "
                                "default: refuse partial data")
    force: bool = Field(default=False, description="a report folder of another configuration is moved aside as "
                        "<name>.replaced-<time> (default: refuse)")

    _runs = field_validator("runs", mode="after")(lambda v: Path(v).resolve())
    _seeds = field_validator("seed", mode="after")(lambda v: check_seeds(v))

    @model_validator(mode="after")
    def _split(self) -> AggregateConfig:
        if self.split is None:
            self.split = "test" if self.seed else "all"
        if self.split == "all" and self.seed:
            raise ValueError("--seed selects a seed's train or test cases; expected --split train or --split test")
        return self


def runs_digest(runs: Path) -> str:
    if not runs.is_dir():
        raise DataError(f"--runs {runs}: not a folder")
    return content_digest([runs])


def refuse_partial_prior(manifest: dict[str, Any], summary: Path, allow_partial: bool) -> None:
    """An output made from partial data (with --allow-partial) is not "up to date" for a run that did not allow
    it: the same partial data is refused as it would be on a fresh run."""
    n = (manifest.get("counts") or {}).get("partial_configurations") or 0
    if n and not allow_partial:
        raise DataError(f"{summary.parent}: made from partial data with --allow-partial ({n} configuration(s) "
                        f"lacking cases, see {summary.name}) and the runs are unchanged; pass --allow-partial to "
                        "keep it, or complete the runs")


def check_seeds(v: list[int] | None) -> list[int] | None:
    if v is not None and any(s < 0 for s in v):
        raise ValueError("expected non-negative seeds")
    return v


def aggregate_stage(cfg: AggregateConfig) -> StageResult:
    """The ``analyze aggregate`` stage: skipped when the same configuration already reported unchanged runs."""
    check_out_not_inputs(cfg.out, [cfg.runs], cfg.stage)
    inputs = runs_digest(cfg.runs)
    if prior_output(cfg.out, cfg.fingerprint(), cfg.stage, force=cfg.force, inputs=inputs, derived=True):
        m = read_manifest(cfg.out) or {}
        refuse_partial_prior(m, cfg.out / "aggregate_summary.json", cfg.allow_partial)
        return StageResult(stage=cfg.stage, status="skipped", outputs={"out": str(cfg.out)}, counts=m.get("counts", {}))
    with writer_lock(cfg.out, what="report folder"):
        begin_output(cfg.out, cfg.stage, cfg.fingerprint())
        res = aggregate(cfg.runs, cfg.out, split=cfg.split or "all", seeds=cfg.seed, strict=cfg.strict,
                        allow_partial=cfg.allow_partial, fingerprint=cfg.fingerprint(), inputs_digest=inputs)
    return StageResult(stage=cfg.stage, outputs={"out": str(res.out), "reports": [str(p) for p in res.reports]},
                       counts={"reports": len(res.reports), "files_processed": res.files_processed,
                               "skipped_files": len(res.skipped_files), "skipped_configs": len(res.skipped_configs),
                               "partial_configurations": len(res.partial)},
                       seeds=res.seeds, skipped_files=res.skipped_files, skipped_configs=res.skipped_configs,
                       partial=[g.to_json() for g in res.partial])


def aggregate(runs: str | Path, out: str | Path, *, split: str = "all", seeds: list[int] | None = None,
              strict: bool = False, allow_partial: bool = False, warn: Callable[[str], None] = warn_line,
              fingerprint: dict[str, Any] | None = None, inputs_digest: str | None = None) -> AggregateResult:
    """Unified reports of every configuration under ``runs`` restricted to ``split`` → ``<out>/<evaluator>/``."""
    from pipeline.analysis.partition import partition
    from pipeline.data.reports import collect_config_scores, write_reports
    from pipeline.data.coverage import gap_summary, require_complete
    from pipeline.data.jsonl import atomic_write_json
    from pipeline.data.manifest import write_manifest

    collected = collect_config_scores(runs, strict=strict, warn=allow_partial)
    gaps = require_complete(collected, allow_partial=allow_partial, where=f"--runs {runs}")
    if not collected.configs:
        raise DataError(f"{runs}: no complete run files found; expected model folders with trajectory and eval files")
    part = partition(collected.configs, split, seeds)
    out = Path(out)
    paths = write_reports(part.reports, out)
    remove_stale_reports(out, paths)
    for folder, evaluator, why in part.skipped:
        warn(f"{folder} (evaluator {evaluator}) left out: {why}")
    result = AggregateResult(out=out, reports=paths,
                             skipped_files=[{"path": p.path, "reason": p.reason} for p in collected.problems],
                             skipped_configs=[{"model_dir": f, "evaluator": e, "reason": w}
                                              for f, e, w in part.skipped],
                             files_processed=collected.files_processed, seeds=part.seeds, partial=gaps)
    for g in gaps:
        warn(f"partial data: {g.describe()}")
    atomic_write_json(out / "aggregate_summary.json", {
        "runs": str(runs), "split": split, "seeds": part.seeds, "num_reports": len(paths),
        "reports": [str(p.relative_to(out)) for p in paths], "files_processed": collected.files_processed,
        "skipped_files": result.skipped_files, "skipped_configs": result.skipped_configs, **gap_summary(gaps)})
    write_manifest(out, stage="analyze aggregate", inputs_digest=inputs_digest,
                   config=fingerprint or {"runs": str(Path(runs).resolve()), "split": split, "seeds": seeds},
                   counts={"reports": len(paths), "files_processed": collected.files_processed,
                           "skipped_files": len(collected.problems), "partial_configurations": len(gaps)})
    return result
