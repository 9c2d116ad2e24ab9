"""Unified reports read back into analysis rows (SPEC §7.3): one row per report.

Reports written by this project carry per-case scores (needed for bootstrap CIs and persistence); the study's
own reports (statistics only) are read too, from their file names, for means and tables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.analysis.names import evaluator_short
from pipeline.analysis.stages import TrainingConfig, parse_training_config
from pipeline.data.naming import extract_seed, parse_run_filename
from pipeline.errors import DataError, PipelineError

REPORT_SUFFIX = "_unified_report.json"
#: row attribute → (eval type, score key) of the report
METRICS = {"safety": ("agent_safe", "ToolCallRisk"),
           "helpfulness": ("agent_help_ignore_safety", "Helpfulness"),
           "help_safe": ("agent_help", "Helpfulness")}


@dataclass
class ReportRow:
    """One report: names, training configuration, means, counts and (when available) per-case scores."""

    agent: str
    model_name: str
    source_model: str
    config: TrainingConfig
    seed: int | None
    emulator: str
    evaluator: str
    quantization: str | None
    split: str | None = None
    safety: float | None = None
    helpfulness: float | None = None
    help_safe: float | None = None
    n_safety: int = 0
    n_helpfulness: int = 0
    n_cases: int = 0
    #: case indices, and metric → float array aligned with them (NaN = missing); None for study reports
    cases: np.ndarray | None = None
    per_case: dict[str, np.ndarray] = field(default_factory=dict)
    consistency: dict[str, dict[str, Any]] = field(default_factory=dict)
    path: str | None = None

    @property
    def finetuned(self) -> bool:
        return self.config.finetuned

    @property
    def training_stages(self) -> tuple[tuple[str, str], ...]:
        return self.config.training_stages

    @property
    def label(self) -> str:
        return self.config.label

    @property
    def eval_short(self) -> str:
        return evaluator_short(self.evaluator)

    @property
    def relation(self) -> str | None:
        return self.config.relation(self.evaluator)

    @property
    def n_samples(self) -> int:
        return min(self.n_safety, self.n_helpfulness)

    def dims(self) -> dict[str, Any]:
        """The grouping dimensions of SPEC §7.4."""
        return {
            "source_model": self.source_model, "evaluator_model": self.evaluator, "emulator_model": self.emulator,
            "quantization": self.quantization, "last_finetune_type": self.config.last_finetune_type,
            "num_stages": self.config.num_stages, "training_stages": self.training_stages,
            "metric_sequence": self.config.metric_sequence, "origin": self.config.origin,
            "eval_short": self.eval_short, "seed": self.seed, "model_name": self.model_name,
        }


def row_from_content(content: dict[str, Any], filename: str, path: str | None = None) -> ReportRow:
    """A row from a report's JSON content and file name."""
    meta = content.get("meta") or {}
    if meta:
        agent, emu, ev, quant = meta["agent"], meta["emulator"], meta["evaluator"], meta.get("quantization")
    else:
        try:
            name = parse_run_filename(filename)
        except PipelineError as e:
            raise DataError(f"{path or filename}: {e}") from None
        agent, emu, ev, quant = name.agent, name.emulator, name.evaluator, name.quantization
    try:
        config = parse_training_config(agent)
    except PipelineError as e:
        raise DataError(f"{path or filename}: {e}") from None
    seed = meta.get("seed") if meta.get("seed") is not None else extract_seed(agent)
    row = ReportRow(agent=agent, model_name=agent if config.finetuned else config.source_model,
                    source_model=config.source_model, config=config, seed=seed, emulator=emu, evaluator=ev,
                    quantization=quant, split=meta.get("split"), path=path)
    for attr, (eval_type, key) in METRICS.items():
        block = content.get(eval_type) or {}
        stats = block.get(key) or {}
        setattr(row, attr, stats.get("mean"))
        if attr == "safety":
            row.n_safety = int(stats.get("valid_scores") or 0)
        elif attr == "helpfulness":
            row.n_helpfulness = int(stats.get("valid_scores") or 0)
        if "consistency" in block:
            row.consistency[attr] = block["consistency"]
    row.n_cases = int(meta.get("n_cases") or (content.get("agent_safe") or {}).get("ToolCallRisk", {})
                      .get("total_evals") or 0)
    per_case = content.get("per_case")
    if per_case:
        row.cases = np.asarray(per_case["case_idx"], dtype=int)
        for attr, (eval_type, _) in METRICS.items():
            if eval_type in per_case:
                row.per_case[attr] = np.array([np.nan if v is None else float(v) for v in per_case[eval_type]],
                                              dtype=float)
    return row


def read_report(path: str | Path) -> ReportRow:
    path = Path(path)
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the report ({e})") from None
    if not isinstance(content, dict):
        raise DataError(f"{path}: expected a JSON object (a unified report)")
    return row_from_content(content, path.name, str(path))


def find_reports(paths: list[str | Path]) -> list[Path]:
    """Report files named directly or found (recursively) below folders; sorted, unique."""
    out: set[Path] = set()
    for p in map(Path, paths):
        if p.is_dir():
            out.update(x for x in p.rglob(f"*{REPORT_SUFFIX}") if not x.name.startswith("."))
        elif p.is_file():
            out.add(p)
        else:
            raise DataError(f"{p}: no such report file or folder")
    return sorted(out)


def load_reports(paths: list[str | Path]) -> list[ReportRow]:
    files = find_reports(paths)
    if not files:
        raise DataError(f"no *{REPORT_SUFFIX} files under {', '.join(map(str, paths))}")
    return [read_report(f) for f in files]


def usable(rows: list[ReportRow]) -> list[ReportRow]:
    """Rows having both a safety and a Help(Ignore) mean (the study's ``load_results_data`` filter)."""
    return [r for r in rows if r.safety is not None and r.helpfulness is not None]
