"""``analyze all`` as a library call (``analyze aggregate`` is ``pipeline.analysis.aggregate_stage``).

``run_all(runs, out)`` reads a folder of model folders once, writes unified reports for all cases
(``reports/all/``) and for each seed's test split (``reports/test/``), then — reading those reports only —
computes per evaluator arm and pooled: the trade-off fit, the Pareto frontier (bootstrap CIs), persistence,
and writes every plot (``plots/``), every table (``tables/``), ``persistence_stats.json`` and ``summary.json``.
It returns an ``AnalysisResult`` (the summary dict and the written files) so that tracking needs a few lines.

Evaluator arms: ``eval-q32``, ``eval-gpt5m`` (one per evaluator in the data) and ``pooled`` = points averaged
over the evaluators (the study's headline setting, SPEC §7.6 suffix "" and §12.13, §12.15).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

from pydantic import Field, field_validator

from pipeline.analysis.aggregate_stage import (check_seeds, refuse_partial_prior, remove_stale_reports, runs_digest,
                                               warn_line)
from pipeline.data.locks import writer_lock
from pipeline.data.manifest import read_manifest
from pipeline.errors import DataError
from pipeline.stage import StageConfig, StageResult, begin_output, check_out_not_inputs, prior_output

log = logging.getLogger(__name__)

POOLED = "pooled"


# ------------------------------------------------------------------------------------------------- analyze all
@dataclass
class AnalysisResult:
    """What ``analyze all`` wrote; ``summary`` is also in ``summary_path``."""

    out: Path
    summary: dict[str, Any]
    summary_path: Path
    plots: list[Path] = field(default_factory=list)
    tables: list[Path] = field(default_factory=list)
    reports: list[Path] = field(default_factory=list)
    persistence_path: Path | None = None

    def metrics(self) -> dict[str, float]:
        """Flat numeric figures for a tracking backend, keys valid as MLflow metric names: ``<arm>.r2``,
        ``<arm>.persist_s.beta-0.1``, and each configuration's point ``<arm>.point.<name>.safety`` / ``.helpfulness``.
        """
        from pipeline.tracking import metric_key

        out: dict[str, float] = {}
        for arm, a in self.summary["arms"].items():
            for k in ("r2", "r", "slope", "intercept", "p_value"):
                if a.get(k) is not None:
                    out[f"{arm}.{k}"] = float(a[k])
            out[f"{arm}.n_points"] = float(a.get("n_points") or 0)
            for beta, lvl in (a["persistence"].get("by_beta") or {}).items():
                avg = lvl.get("average") or {}
                for which in ("persist_s", "persist_h"):
                    if avg.get(which) is not None:
                        out[f"{arm}.{which}.beta-{beta}"] = float(avg[which])
            out[f"{arm}.frontier_size"] = float(len(a["frontier"]["members"]))
            for p in a["frontier"].get("points") or []:
                for which in ("helpfulness", "safety"):
                    if p.get(which) is not None:
                        out[f"{arm}.point.{p['name']}.{which}"] = float(p[which])
        partial = self.summary.get("partial_configurations") or []
        out["partial_models"] = float(len(self.summary.get("partial_models") or []))
        for g in partial:
            quant = f".{g['quantization']}" if g["quantization"] else ""
            out[f"missing_cases.{g['model_dir']}.{g['evaluator']}{quant}"] = float(g["missing_cases"])
        for pair in self.summary.get("judge_agreement") or []:
            for metric, m in (pair.get("metrics") or {}).items():
                for k in ("kappa", "kappa_quadratic", "exact_agreement", "n"):
                    out[f"agreement.{pair['a']}-{pair['b']}.{metric}.{k}"] = float(m[k])
        return {metric_key(k): v for k, v in out.items()}


def _counterpart_sources(rows: list) -> list:
    """Keep finetuned rows, and source rows whose (source, emulator, evaluator, seed) has a finetuned row."""
    used = {(r.source_model, r.emulator, r.evaluator, r.seed) for r in rows if r.finetuned}
    return [r for r in rows if r.finetuned or (r.source_model, r.emulator, r.evaluator, r.seed) in used]


def _select_setting(rows: list, setting: str | None, warn) -> tuple[list, str]:
    ft = [r for r in rows if r.finetuned]
    if not ft:
        return rows, "sources-only"
    relations = {r.relation for r in ft}
    known = relations - {None}
    if setting is None:
        if len(known) > 1:
            raise DataError("the finetuned models are evaluated both by the evaluator that labelled their training "
                            "pairs (match) and by the other one (cross); expected one setting: pass --setting match "
                            "or --setting cross (SPEC §7.2: mixing them would merge the two arms)")
        return rows, (known.pop() if known else "unknown")
    kept = [r for r in rows if not r.finetuned or r.relation == setting]
    dropped = len(rows) - len(kept)
    if dropped:
        warn(f"--setting {setting}: left out {dropped} finetuned report(s) of another setting")
    if not any(r.finetuned for r in kept):
        raise DataError(f"--setting {setting}: no finetuned reports of that setting")
    return kept, setting


#: the evaluation settings of finetuned models (SPEC §7.2): judged by the evaluator that labelled their training
#: pairs, or by another one
SETTINGS = ("match", "cross")


def finetuned_settings(runs: str | Path) -> list[str]:
    """The settings (``match``, ``cross``, in that order) of the evaluated finetuned models below ``runs``, from
    the file names alone (no scores read); a relation the names do not tell (an unknown dataset origin) is none."""
    from pipeline.analysis.stages import parse_training_config
    from pipeline.data.naming import is_finetuned
    from pipeline.data.runfiles import find_run_files

    found = {parse_training_config(rf.model_dir).relation(rf.name.evaluator)
             for rf in find_run_files(runs) if rf.eval_files and is_finetuned(rf.model_dir)}
    return [s for s in SETTINGS if s in found]


def setting_outputs(out: str | Path, settings: list[str]) -> list[tuple[str | None, Path]]:
    """Where ``analyze all`` writes for these settings: one analysis per setting, ``<out>/match`` and
    ``<out>/cross``, when there are both (a folder mixing them must be analysed per setting); else one analysis
    into ``<out>`` without ``--setting`` (the setting, if any, is the folder's only one)."""
    out = Path(out)
    if len(settings) > 1:
        return [(s, out / s) for s in settings]
    return [(None, out)]


def analysis_specs(runs: str | Path, out: str | Path, settings: list[str] | None = None,
                   **options: Any) -> list[dict[str, Any]]:
    """The ``analyze all`` option dicts for ``runs`` (``setting_outputs`` of ``settings``; default: the settings
    found below ``runs``), each with ``options`` (n_bootstrap, …)."""
    found = finetuned_settings(runs) if settings is None else settings
    return [{"runs": str(runs), "out": str(where), **options, **({"setting": setting} if setting else {})}
            for setting, where in setting_outputs(out, found)]


def _persistence_for(stats: dict[str, Any] | None, reason: str | None, evaluator: str | None) -> dict[str, Any]:
    if stats is None:
        return {"available": False, "reason": reason, "by_beta": {}}
    by_beta = {}
    for beta, lvl in stats["persistence"]["by_beta"].items():
        if evaluator is None:
            by_beta[beta] = {"average": lvl["average"], "by_model": lvl["by_model"],
                             "by_evaluator": lvl["by_evaluator"]}
        else:
            keys = {k.split("|", 1)[1]: v for k, v in lvl["by_model_and_evaluator"].items()
                    if k.split("|", 1)[0] == evaluator}
            if keys:
                by_beta[beta] = {"average": lvl["by_evaluator"].get(evaluator), "by_model": keys}
    if not by_beta:
        return {"available": False, "reason": f"no persistence units for evaluator {evaluator}", "by_beta": {}}
    return {"available": True, "reason": None, "by_beta": by_beta}


class AnalyzeConfig(StageConfig):
    """``analyze all``: everything from one folder of runs. Its output folder is bound to this configuration."""

    stage: ClassVar[str] = "analyze all"
    not_in_fingerprint: ClassVar[frozenset[str]] = frozenset({"out", "formats", "no_track", "strict", "force",
                                                              "allow_partial"})

    runs: Path = Field(description="folder of model folders", json_schema_extra={"metavar": "DIR"})
    out: Path = Field(description="analysis folder", json_schema_extra={"metavar": "DIR"})
    split: Literal["auto", "test", "all"] = Field(default="auto", description="cases analysed: test splits (auto "
                                                  "when finetuned models exist) or all cases (auto for source models "
                                                  "only)")
    seed: list[int] | None = Field(default=None, description="split seed(s) (default: the finetuned models' seeds; "
                                   "without finetuned models required for --split test; for the source models' "
                                   "test columns of an all-cases analysis the study's 0 1 2, said so in summary.json)")
    n_bootstrap: int = Field(default=1000, ge=0, description="bootstrap resamples for CIs (0 = none)")
    setting: Literal["match", "cross"] | None = Field(default=None, description="analyse only finetuned models "
                                                      "evaluated by their own (match) or the other (cross) evaluator")
    formats: list[Literal["png", "pdf", "svg"]] = Field(default=["png", "pdf"], description="plot formats",
                                                        json_schema_extra={"nargs": "+"})
    no_track: bool = Field(default=False, description="do not log to MLflow")
    strict: bool = Field(default=False, description="fail on the first invalid or incomplete file")
    allow_partial: bool = Field(default=False, description="analyse what is there when configurations lack expected "
                                "cases or files are invalid, and report them in summary.json and the MLflow run "
                                "(default: refuse partial data, naming the missing cases per model)")
    force: bool = Field(default=False, description="an analysis folder of another configuration is moved aside as "
                        "<name>.replaced-<time> (default: refuse)")

    _runs = field_validator("runs", mode="after")(lambda v: Path(v).resolve())
    _seeds = field_validator("seed", mode="after")(lambda v: check_seeds(v))


def analyze(cfg: AnalyzeConfig) -> tuple[StageResult, AnalysisResult | None]:
    """The ``analyze all`` stage: skipped when the same configuration already analysed unchanged runs; else
    everything is rebuilt from ``cfg.runs`` alone."""
    check_out_not_inputs(cfg.out, [cfg.runs], cfg.stage)
    inputs = runs_digest(cfg.runs)
    if prior_output(cfg.out, cfg.fingerprint(), cfg.stage, force=cfg.force, inputs=inputs, derived=True):
        m = read_manifest(cfg.out) or {}
        refuse_partial_prior(m, cfg.out / "summary.json", cfg.allow_partial)
        return StageResult(stage=cfg.stage, status="skipped", outputs={"out": str(cfg.out), "summary": str(
            cfg.out / "summary.json")}, counts=m.get("counts", {})), None
    with writer_lock(cfg.out, what="analysis folder"):
        begin_output(cfg.out, cfg.stage, cfg.fingerprint())
        res = run_all(cfg.runs, cfg.out, split=cfg.split, seeds=cfg.seed, n_bootstrap=cfg.n_bootstrap,
                      setting=cfg.setting, formats=tuple(cfg.formats), strict=cfg.strict,
                      allow_partial=cfg.allow_partial, fingerprint=cfg.fingerprint(), inputs_digest=inputs)
    return StageResult(stage=cfg.stage, outputs={"out": str(res.out), "summary": str(res.summary_path),
                                                 "plots": [str(p) for p in res.plots],
                                                 "tables": [str(p) for p in res.tables]},
                       counts=res.summary["counts"], metrics=res.metrics()), res


def run_all(runs: str | Path, out: str | Path, *, split: str = "auto", seeds: list[int] | None = None,
            n_bootstrap: int = 1000, setting: str | None = None, formats: tuple[str, ...] = ("png", "pdf"),
            strict: bool = False, allow_partial: bool = False, warn: Callable[[str], None] = warn_line,
            fingerprint: dict[str, Any] | None = None, inputs_digest: str | None = None) -> AnalysisResult:
    """Reports, persistence, per-arm fits, frontiers and plots, tables and the summary of the runs under ``runs``."""
    from pipeline.analysis import plots
    from pipeline.analysis.partition import partition
    from pipeline.analysis.rows import load_reports, usable
    from pipeline.data.coverage import gap_summary, require_complete
    from pipeline.data.naming import is_finetuned
    from pipeline.data.reports import collect_config_scores, write_reports

    if split not in ("auto", "test", "all"):
        raise DataError(f"split '{split}': expected auto, test or all")
    t0 = time.perf_counter()
    out = Path(out)
    collected = collect_config_scores(runs, strict=strict, warn=allow_partial)
    gaps = require_complete(collected, allow_partial=allow_partial, where=f"--runs {runs}")
    for g in gaps:
        warn(f"partial data: {g.describe()}")
    configs = collected.configs
    if not configs:
        raise DataError(f"{runs}: no complete run files found; expected model folders with trajectory and eval files")
    has_ft = any(is_finetuned(c.model_dir) for c in configs)
    used_split = ("test" if has_ft else "all") if split == "auto" else split
    seeds, seeds_from = _analysis_seeds(configs, seeds, used_split)
    if seeds_from == STUDY_SEEDS_NOTE:
        warn(f"split seeds {', '.join(map(str, seeds))}: {seeds_from}")

    # 1. reports (the only input of everything below)
    all_paths = write_reports(partition(configs, "all").reports, out / "reports" / "all")
    test_part = partition(configs, "test", seeds)
    test_paths = write_reports(test_part.reports, out / "reports" / "test")
    report_paths = all_paths + test_paths
    remove_stale_reports(out / "reports", report_paths)
    # only the reports just built from ``runs`` are read: never what an earlier run left in ``out``
    rows_all = usable(load_reports(all_paths))
    rows_test = usable(load_reports(test_paths)) if test_paths else []

    rows = rows_all if used_split == "all" else (_counterpart_sources(rows_test) if has_ft else rows_test)
    rows, setting_used = _select_setting(rows, setting, warn)
    if not rows:
        raise DataError(f"{runs}: no reports with both safety and Help(Ignore) scores to analyse")
    any_ft = any(r.finetuned for r in rows)
    styles = plots.source_styles(r.source_model for r in rows_all + rows_test)

    # 2. persistence (all arms at once; summarised per arm below)
    stats, p_reason, persistence_path = _persistence(rows, any_ft, n_bootstrap, warn, out)
    # 3. per arm: fit, frontier, plots
    arms, frontiers, plot_files, skipped_plots = _arms(rows, stats, p_reason, styles, used_split, n_bootstrap,
                                                       out / "plots", formats)
    # 4. tables
    table_files = _tables(rows, rows_all, rows_test, seeds, any_ft, arms, frontiers, stats, out / "tables")

    # 5. summary
    summary = {
        "runs": str(runs), "split": used_split, "seeds": seeds, "seeds_from": seeds_from, "setting": setting_used,
        "n_bootstrap": n_bootstrap,
        "counts": {"files_processed": collected.files_processed, "configurations": len(configs),
                   "reports_all": len(rows_all), "reports_test": len(rows_test), "rows_analysed": len(rows),
                   "finetuned_rows": sum(r.finetuned for r in rows), "skipped_files": len(collected.problems),
                   "partial_configurations": len(gaps)},
        "skipped_files": [{"path": p.path, "reason": p.reason} for p in collected.problems],
        **gap_summary(gaps),
        "arms": arms,
        "persistence": {"available": stats is not None, "reason": p_reason,
                        "file": str(persistence_path) if persistence_path else None},
        "source_models": _source_summary(rows_all, rows_test, seeds),
        "judge_agreement": _agreement(runs),
        "skipped_plots": skipped_plots,
        "files": {"plots": [str(p) for p in plot_files], "tables": [str(p) for p in table_files],
                  "reports": [str(out / "reports" / "all"), str(out / "reports" / "test")]},
        "elapsed_s": round(time.perf_counter() - t0, 2),
    }
    return _write_summary(out, summary, runs, split, seeds, n_bootstrap, setting, fingerprint, inputs_digest,
                          plot_files, table_files, report_paths, len(gaps), persistence_path)


def _persistence(rows: list, any_ft: bool, n_bootstrap: int, warn: Callable[[str], None],
                 out: Path) -> tuple[dict[str, Any] | None, str | None, Path | None]:
    """(persistence statistics of all arms, or None and why; the file they were written to)."""
    from pipeline.analysis.persistence import PersistenceError, compute_persistence
    from pipeline.data.jsonl import atomic_write_json

    stats, p_reason = None, None
    if not any_ft:
        p_reason = "no finetuned models in the input (source models only)"
    else:
        try:
            stats = compute_persistence(rows, n_bootstrap=n_bootstrap, warn=warn)
            if not stats["persistence"]["by_beta"]:
                p_reason = ("no complete persistence unit (safe-only, help-only, safe→help and help→safe at one "
                            "beta and seed)")
                stats = None
        except PersistenceError as e:
            p_reason = str(e)
    persistence_path = None
    if stats is not None:
        persistence_path = out / "persistence_stats.json"
        atomic_write_json(persistence_path, stats)
    return stats, p_reason, persistence_path


def _arms(rows: list, stats: dict[str, Any] | None, p_reason: str | None, styles: Any, used_split: str,
          n_bootstrap: int, plot_dir: Path, formats: tuple[str, ...]
          ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], list[Path], dict[str, str]]:
    """Per evaluator arm and pooled: the fit, the frontier and the plots (arms, frontiers, plot files, skipped)."""
    from pipeline.analysis.names import evaluator_nickname, evaluator_short

    evaluators = sorted({r.evaluator for r in rows}, key=lambda e: evaluator_short(e))
    arm_rows: dict[str, tuple[str | None, list]] = {evaluator_short(e): (e, [r for r in rows if r.evaluator == e])
                                                    for e in evaluators}
    arm_rows[POOLED] = (None, rows)
    arms: dict[str, dict[str, Any]] = {}
    frontiers: dict[str, dict[str, Any]] = {}
    plot_files: list[Path] = []
    skipped_plots: dict[str, str] = {}
    for arm, (evaluator, sub) in arm_rows.items():
        suffix = "" if arm == POOLED else f"_{arm}"
        where = "averaged over evaluators" if arm == POOLED else f"evaluated by {evaluator_nickname(evaluator)}"
        scope = f"({used_split} split, {where})" if used_split == "test" else f"(all cases, {where})"
        arms[arm], frontiers[arm], files, skipped = _arm(sub, evaluator, stats, p_reason, styles, n_bootstrap,
                                                         plot_dir, suffix, scope, formats)
        plot_files += files
        skipped_plots.update(skipped)
    return arms, frontiers, plot_files, skipped_plots


def _arm(sub: list, evaluator: str | None, stats: dict[str, Any] | None, p_reason: str | None, styles: Any,
         n_bootstrap: int, plot_dir: Path, suffix: str, scope: str, formats: tuple[str, ...]
         ) -> tuple[dict[str, Any], dict[str, Any], list[Path], dict[str, str]]:
    """One arm's summary entry, frontier, plot files and skipped plots."""
    from pipeline.analysis import plots
    from pipeline.analysis.aggregate import aggregate_scores, compute_deltas
    from pipeline.analysis.fit import fit_deltas, not_available
    from pipeline.analysis.pareto import frontier_points

    agg = aggregate_scores(sub, ("source_model", "training_stages"))
    deltas = compute_deltas(agg, ("source_model", "training_stages"), "base")
    if any(r.finetuned for r in sub):
        fit = fit_deltas(deltas)
    else:
        fit = not_available("no finetuned models in the input (source models only)")
    frontier = frontier_points(sub, n_bootstrap=n_bootstrap)
    entry = {"evaluator": evaluator, "n_rows": len(sub), "n_points": fit["n_points"],
             **{k: fit[k] for k in ("r2", "r", "slope", "intercept", "p_value", "stderr")},
             "fit": fit, "persistence": _persistence_for(stats, p_reason, evaluator),
             "frontier": {"members": frontier["members"], "both_configs": frontier["both_configs"],
                          "n_points": frontier["n_points"], "n_bootstrap": frontier["n_bootstrap"],
                          "points": frontier["points"]}}
    plot_files: list[Path] = []
    skipped: dict[str, str] = {}
    overall = aggregate_scores(sub, ("source_model", "quantization", "training_stages"))
    plot_files += plots.plot_overall(overall, styles, plot_dir / f"overall{suffix}",
                                     f"Safety vs helpfulness {scope}", formats)
    kind = "source models" if not any(r.finetuned for r in sub) else "all configurations"
    plot_files += plots.plot_pareto(frontier, styles, plot_dir / f"pareto{suffix}",
                                    f"Pareto frontier of {kind} {scope}", formats)
    if deltas:
        plot_files += plots.plot_deltas_by_model(deltas, fit, styles, plot_dir / f"delta_by_model{suffix}",
                                                 f"Change vs source model, per model {scope}", formats)
        by_stages = aggregate_scores(sub, ("training_stages",))
        plot_files += plots.plot_deltas_all(compute_deltas(by_stages, ("training_stages",), "base"),
                                            plot_dir / f"delta_all{suffix}",
                                            f"Change vs source model, mean over models {scope}", formats)
        for last in ("help", "safe"):
            plot_files += plots.plot_intermediates(by_stages, last, plot_dir / f"{last}_with_intermediates{suffix}",
                                                   f"{'Helpfulness' if last == 'help' else 'Safety'} training "
                                                   f"with intermediate stages {scope}", formats)
    else:
        for name in ("delta_by_model", "delta_all", "help_with_intermediates", "safe_with_intermediates"):
            skipped[f"{name}{suffix}"] = "no finetuned models with a source-model counterpart"
    return entry, frontier, plot_files, skipped


def _tables(rows: list, rows_all: list, rows_test: list, seeds: list[int], any_ft: bool,
            arms: dict[str, dict[str, Any]], frontiers: dict[str, dict[str, Any]], stats: dict[str, Any] | None,
            table_dir: Path) -> list[Path]:
    from pipeline.analysis import tables
    from pipeline.analysis.names import evaluator_nickname

    table_list = [tables.hyperparams_table(), *tables.results_tables(rows),
                  *tables.source_model_tables(rows_all, rows_test, seeds)]
    if any_ft:
        table_list += tables.aggregated_tables(rows)
        table_list.append(tables.fit_table(arms))
    if stats is not None:
        table_list += tables.persistence_tables(stats)
    for arm, fr in frontiers.items():
        where = ("averaged over evaluators" if arm == POOLED
                 else f"evaluated by {evaluator_nickname(arms[arm]['evaluator'])}")
        table_list.append(tables.pareto_table(f"pareto_{arm}", fr, f"Pareto frontier ({where}); 95% bootstrap CI "
                                              "in parentheses; P(frontier) = share of bootstrap resamples in which the "
                                              "point is on the frontier."))
    return tables.write_tables(table_list, table_dir)


def _write_summary(out: Path, summary: dict[str, Any], runs: str | Path, split: str, seeds: list[int],
                   n_bootstrap: int, setting: str | None, fingerprint: dict[str, Any] | None,
                   inputs_digest: str | None, plot_files: list[Path], table_files: list[Path],
                   report_paths: list[Path], n_gaps: int, persistence_path: Path | None) -> AnalysisResult:
    from pipeline.data.jsonl import atomic_write_json
    from pipeline.data.manifest import write_manifest

    summary_path = out / "summary.json"
    atomic_write_json(summary_path, _clean(summary))
    write_manifest(out, stage="analyze", inputs_digest=inputs_digest,
                   config=fingerprint or {"runs": str(Path(runs).resolve()), "split": split, "seeds": seeds,
                                          "n_bootstrap": n_bootstrap, "setting": setting},
                   counts={"plots": len(plot_files), "tables": len(table_files), "reports": len(report_paths),
                           "partial_configurations": n_gaps})
    return AnalysisResult(out=out, summary=summary, summary_path=summary_path, plots=plot_files, tables=table_files,
                          reports=report_paths, persistence_path=persistence_path)


STUDY_SEEDS = [0, 1, 2]
STUDY_SEEDS_NOTE = ("the study's seeds (SPEC §11.1), for the source models' per-seed test-split columns only: no "
                    "finetuned folder names a seed and no --seed was given; the analysed figures use all cases")


def _analysis_seeds(configs: list, seeds: list[int] | None, used_split: str) -> tuple[list[int], str]:
    """The split seeds and where they come from: ``--seed``, else the finetuned folders' ``_s<seed>``. With
    neither, a test-split analysis has nothing to split by (``DataError``); an all-cases analysis of source models
    shows the study's seeds' test columns beside it, said so in the summary and on stderr."""
    from pipeline.data.naming import extract_seed, is_finetuned

    if seeds is not None:
        return seeds, "--seed"
    ft_seeds = sorted({s for c in configs if is_finetuned(c.model_dir) and (s := extract_seed(c.model_dir)) is not None})
    if ft_seeds:
        return ft_seeds, "finetuned folders"
    if used_split == "test":
        raise DataError("--split test: no finetuned folder names a split seed (_s<N>) to take the test cases of; "
                        "expected --seed N (repeatable)")
    return list(STUDY_SEEDS), STUDY_SEEDS_NOTE


def _agreement(runs: str | Path) -> list[dict[str, Any]]:
    """The judges' agreement on the trajectories several of them judged (``pipeline.analysis.agreement``); a
    folder whose evaluations cannot be compared is noted, not fatal: the rest of the analysis stands."""
    from pipeline.analysis.agreement import agreement_within
    from pipeline.errors import PipelineError

    try:
        return agreement_within(runs)
    except PipelineError as e:
        log.warning("judge agreement not computed: %s", e)
        return [{"error": str(e)}]


def _source_summary(rows_all: list, rows_test: list, seeds: list[int]) -> list[dict[str, Any]]:
    from pipeline.analysis.names import evaluator_short, model_sort_key

    out = []
    test = {(r.source_model, r.quantization, r.evaluator, r.seed): r for r in rows_test if not r.finetuned}
    for r in sorted((r for r in rows_all if not r.finetuned),
                    key=lambda r: (evaluator_short(r.evaluator), model_sort_key(r.source_model), str(r.quantization))):
        entry = {"model": r.source_model, "quantization": r.quantization, "evaluator": r.evaluator,
                 "arm": evaluator_short(r.evaluator),
                 "all": {"safety": r.safety, "helpfulness": r.helpfulness, "n_cases": r.n_cases}, "test": {}}
        for s in seeds:
            t = test.get((r.source_model, r.quantization, r.evaluator, s))
            if t is not None:
                entry["test"][str(s)] = {"safety": t.safety, "helpfulness": t.helpfulness, "n_cases": t.n_cases}
        out.append(entry)
    return out


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN → None, tuples → lists."""
    import math

    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj
