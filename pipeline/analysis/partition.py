"""Train/test partition of configurations by split seed (SPEC §7.2, §5).

* ``split="all"``: every configuration with all its cases, names unchanged (the study's ``--aggregate-only``).
* ``split="train"|"test"``:
  * a finetuned folder (``dpo_…``) must name its seed (``_s<seed>``) and is restricted to that seed's cases
    (test-only files are fine); with ``seeds`` given, finetuned folders of other seeds are left out;
  * a source folder is reported once per seed, as ``<folder>_s<seed>``: for every seed used by a finetuned
    folder with the same (source model, emulator, evaluator) — sources without finetuned counterparts are
    left out, as the study does — or, when ``seeds`` is given, for every one of those seeds.
  Cases outside the seed's split (and outside ``0..n_cases-1``) are dropped.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from pipeline.data.reports import ConfigScores, UnifiedReport, build_report
from pipeline.data.naming import extract_seed, is_finetuned, source_model
from pipeline.data.split import TOOLEMU_CASES, split_cases
from pipeline.errors import DataError

SPLITS = ("all", "train", "test")


@dataclass
class PartitionResult:
    reports: list[UnifiedReport]
    #: (folder, evaluator, why) for configurations left out
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)


def split_case_set(seed: int, split: str, n_cases: int = TOOLEMU_CASES) -> list[int]:
    if split not in ("train", "test"):
        raise DataError(f"split '{split}': expected train or test")
    train, test = split_cases(seed, n_cases)
    return test if split == "test" else train


def finetuned_seeds(configs: list[ConfigScores]) -> dict[tuple[str, str, str], set[int]]:
    """(source model, emulator, evaluator) → the split seeds of its finetuned folders."""
    out: dict[tuple[str, str, str], set[int]] = defaultdict(set)
    for cfg in configs:
        if is_finetuned(cfg.model_dir):
            seed = extract_seed(cfg.model_dir)
            if seed is not None:
                out[(source_model(cfg.model_dir), cfg.emulator, cfg.evaluator)].add(seed)
    return out


def partition(configs: list[ConfigScores], split: str = "all", seeds: list[int] | None = None,
              n_cases: int = TOOLEMU_CASES) -> PartitionResult:
    """Unified reports of ``configs`` restricted to ``split`` (see the module docstring)."""
    if split not in SPLITS:
        raise DataError(f"split '{split}': expected one of {', '.join(SPLITS)}")
    if split == "all":
        reports = [build_report(c, split="all", seed=extract_seed(c.model_dir)) for c in configs]
        return PartitionResult(reports=reports)
    wanted = None if seeds is None else sorted(set(seeds))
    counterparts = finetuned_seeds(configs)
    reports, skipped, used = [], [], set()
    for cfg in configs:
        if is_finetuned(cfg.model_dir):
            seed = extract_seed(cfg.model_dir)
            if seed is None:
                raise DataError(f"finetuned folder '{cfg.model_dir}': no _s<seed> in its name; expected the split "
                                "seed (e.g. dpo_Qwen2.5-7B_safe_q32_s0)")
            if wanted is not None and seed not in wanted:
                skipped.append((cfg.model_dir, cfg.evaluator, f"seed {seed} not selected"))
                continue
            cases = set(split_case_set(seed, split, n_cases)).intersection(cfg.cases)
            if not cases:
                skipped.append((cfg.model_dir, cfg.evaluator, f"no cases of the seed-{seed} {split} split"))
                continue
            reports.append(build_report(cfg, sorted(cases), split=split, seed=seed))
            used.add(seed)
            continue
        own = extract_seed(cfg.model_dir)
        if own is not None:
            raise DataError(f"source folder '{cfg.model_dir}' already names a seed; expected an unpartitioned "
                            "source model folder")
        key = (source_model(cfg.model_dir), cfg.emulator, cfg.evaluator)
        seeds_for = wanted if wanted is not None else sorted(counterparts.get(key, ()))
        if not seeds_for:
            skipped.append((cfg.model_dir, cfg.evaluator, "no finetuned counterpart (no seed to partition by)"))
            continue
        for seed in seeds_for:
            cases = split_case_set(seed, split, n_cases)
            reports.append(build_report(cfg, cases, agent=f"{cfg.model_dir}_s{seed}", split=split, seed=seed))
            used.add(seed)
    return PartitionResult(reports=reports, skipped=skipped, seeds=sorted(used))
