"""Which expected cases a folder of runs lacks, per configuration (issue 23: no analysis of partial data unasked).

The cases a configuration is expected to hold (SPEC §7.1–7.2, §5):

* the folder's *case universe*: every case named by a run file's range (``_r<a>-<b>``) anywhere under ``--runs``
  (the emulation plan: all models of one experiment run the same ranges), plus the study's 144 cases when some
  trajectory file has no emulation manifest (the study's released data: its ranges span its whole case set);
* a source model: the whole universe; a finetuned model (``dpo_…_s<seed>``): the universe's cases in its seed's
  test split (it is evaluated on held-out cases only; more is fine).

A configuration whose files were all skipped as invalid is missing every expected case. ``require_complete``
refuses partial data in one line unless the caller allows it (``--allow-partial``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.data.naming import extract_seed, is_finetuned
from pipeline.data.split import test_cases
from pipeline.errors import DataError, NamingError


@dataclass
class Gap:
    """Expected cases one configuration lacks, and its files skipped as invalid."""

    model_dir: str
    emulator: str
    evaluator: str
    quantization: str | None
    expected: int
    missing: list[int]
    problems: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """``model X (evaluator E): 36 of 144 cases missing (36-71)``, plus the first skipped file's reason."""
        quant = f", {self.quantization}" if self.quantization else ""
        text = f"model {self.model_dir} (evaluator {self.evaluator}{quant}): "
        if self.missing:
            text += f"{len(self.missing)} of {self.expected} cases missing ({format_cases(self.missing)})"
        else:
            text += f"all {self.expected} expected cases present"
        if self.problems:
            more = f" and {len(self.problems) - 1} more" if len(self.problems) > 1 else ""
            text += f"; {len(self.problems)} file(s) skipped: {self.problems[0]}{more}"
        return text

    def to_json(self) -> dict[str, Any]:
        return {"model_dir": self.model_dir, "emulator": self.emulator, "evaluator": self.evaluator,
                "quantization": self.quantization, "expected_cases": self.expected,
                "missing_cases": len(self.missing), "missing_case_idx": self.missing,
                "skipped_files": self.problems}


def format_cases(cases: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` → ``0-2, 5, 7-8`` (inclusive runs)."""
    runs: list[list[int]] = []
    for c in sorted(cases):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def expected_cases(model_dir: str, universe: set[int]) -> set[int]:
    """The cases a configuration of ``model_dir`` should hold (see the module docstring)."""
    if not is_finetuned(model_dir):
        return set(universe)
    try:
        seed = extract_seed(model_dir)
    except NamingError:
        seed = None  # partition refuses the ambiguous name with its own message; here: expect every case
    if seed is None:
        return set(universe)
    return universe.intersection(test_cases(seed))


def find_gaps(collected: Any) -> list[Gap]:
    """Every configuration of a ``CollectResult`` that lacks expected cases or had files skipped."""
    universe = set(collected.universe)
    present = {c.key: set(c.cases) for c in collected.configs}
    problems: dict[tuple, list[str]] = {}
    for p in collected.problems:
        problems.setdefault(p.key, []).append(p.reason)
    gaps = []
    for key in sorted(set(present) | set(problems), key=lambda k: tuple("" if x is None else x for x in k)):
        expected = expected_cases(key[0], universe)
        missing = sorted(expected - present.get(key, set()))
        if missing or key in problems:
            gaps.append(Gap(*key, expected=len(expected), missing=missing, problems=problems.get(key, [])))
    return gaps


def require_complete(collected: Any, *, allow_partial: bool, where: str) -> list[Gap]:
    """The gaps of ``collected``; without ``allow_partial`` any gap raises one ``DataError`` line naming them."""
    gaps = find_gaps(collected)
    if gaps and not allow_partial:
        shown = "; ".join(g.describe() for g in gaps[:5]) + (f"; and {len(gaps) - 5} more" if len(gaps) > 5 else "")
        raise DataError(f"{where}: partial data: {shown}; expected every case of every configuration "
                        "(pass --allow-partial to analyse what is there and report what is missing)")
    return gaps


def gap_summary(gaps: list[Gap]) -> dict[str, Any]:
    """What a summary records of partial data (empty lists when complete)."""
    return {"partial_models": sorted({g.model_dir for g in gaps}), "partial_configurations": [g.to_json()
                                                                                             for g in gaps]}
