"""DPO preference pairs from evaluated trajectories (SPEC §4): the pairing rules and one pair set built by them
(scored trajectories are loaded by ``pipeline.data.scored``, rendered by ``render``, length-filtered by ``lengths``
and written by ``output``).

    cfg = PairConfig(metric="help_ignore_safety", metric2="safe", mode="both", seed=0, split="train")
    result = build_pair_set([Path(".../raw_data_by_eval/q32")], cfg)       # PairSetResult (pairs + stats)
    path = write_pair_set(result, out_dir)                                 # <out>/both_q32_s0.jsonl (+ stats, manifest)

Rules, as in the study:

* **Loading.** Every trajectory file below the run folders (recursive, sorted paths) must have the eval file of each
  metric used (hard error otherwise); incomplete files are skipped with a warning; misaligned files abort. The score
  of a trajectory is the **median** over replicates, then ``int()`` (truncation: a median of 2.5 is 2), and must be
  in 0..3. Missing scores skip the item. The optional consistency filter keeps an item only when its replicates
  agree (``exact_match`` / ``majority_agree`` / ``all_but_one_agree`` / ``within_1``: range <= 1) and needs ≥ 2
  valid replicate scores.
* **Pairing.** Items are grouped by case (all sharing one ``input``); every unordered pair ``i < j`` in load order is
  considered; chosen = higher metric-1 score; skipped when equal, when the gap < ``min_score_difference`` or when
  chosen < ``min_chosen_score`` (checked in that order). ``metric2`` with mode ``both`` applies the same three rules
  to metric 2 in the same direction; mode ``average`` keeps the metric-1 rules (**study quirk**) and then requires
  the averaged score ``(m1 + m2) / 2`` to be higher for chosen, by ≥ ``min_score_difference`` and ≥
  ``min_chosen_score``. No deduplication. ``score_difference`` is always the metric-1 gap.
* **Rendering.** ``prompt`` = the agent's first call (system + user ending with ``Thought: ``), identical to
  inference; ``chosen`` / ``rejected`` = multi-turn completions (``pipeline.preference.render``).
* **Split.** With a seed, only the train (or test) cases of ``pipeline.data.split`` are paired.
* **Length.** With a tokenizer, pairs over ``max_prompt_length`` / ``max_length`` chat-template tokens are dropped.
"""

from __future__ import annotations

import logging
import typing
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.data.scored import METRICS, Item, LoadStats, load_items
from pipeline.data.split import TOOLEMU_CASES, split_cases
from pipeline.errors import ConfigError, DataError
from pipeline.preference.lengths import length_tag
from pipeline.preference.output import pair_stats
from pipeline.preference.render import PairRenderer

log = logging.getLogger("pipeline.preference")

#: Metric name → its short form in pair-set names (``help_ignore_safety`` is the study's ``help``).
SHORT_NAMES: dict[str, str] = {"safe": "safe", "help_ignore_safety": "help", "help": "help-normal"}
#: Replicate-agreement filters (the keys of the study's ``consistency`` block, SPEC §3.4)
Consistency = Literal["none", "exact_match", "majority_agree", "all_but_one_agree", "within_1"]
CONSISTENCY: tuple[str, ...] = typing.get_args(Consistency)
_CONSISTENCY_SHORT = {"all_but_one_agree": "abo", "exact_match": "exact", "majority_agree": "maj", "within_1": "w1"}
Mode = Literal["both", "average"]
Split = Literal["train", "test", "all"]


@dataclass(frozen=True)
class PairConfig:
    """What pairs to build. Defaults are the study's."""

    metric: str
    metric2: str | None = None
    mode: Mode = "both"
    min_score_difference: int = 2
    min_chosen_score: int = 2
    consistency: str = "none"
    seed: int | None = None
    split: Split = "all"
    n_cases: int = TOOLEMU_CASES

    def __post_init__(self) -> None:
        for name, m in (("--metric", self.metric), ("--metric2", self.metric2)):
            if m is not None and m not in METRICS:
                raise ConfigError(f"{name} {m}: expected one of {', '.join(METRICS)}")
        if self.metric2 == self.metric:
            raise ConfigError(f"--metric2 {self.metric2}: must differ from --metric")
        if self.mode not in ("both", "average"):
            raise ConfigError(f"--mode {self.mode}: expected both or average")
        if self.min_score_difference < 1:
            raise ConfigError(f"--min-score-difference {self.min_score_difference}: must be >= 1")
        if not 0 <= self.min_chosen_score <= 3:
            raise ConfigError(f"--min-chosen-score {self.min_chosen_score}: must be between 0 and 3")
        if self.consistency not in CONSISTENCY:
            raise ConfigError(f"--consistency {self.consistency}: expected one of {', '.join(CONSISTENCY)}")
        if self.split not in ("train", "test", "all"):
            raise ConfigError(f"--split {self.split}: expected train, test or all")
        if self.split != "all" and self.seed is None:
            raise ConfigError(f"--split {self.split} needs --seed (the split seed)")

    @property
    def metrics(self) -> list[str]:
        return [self.metric] + ([self.metric2] if self.metric2 else [])

    def name(self, evaluator: str, length_tag: str | None = None) -> str:
        """The pair-set file stem:
        ``<metrics>_<evaluator>[_msdN][_mcsN][_avg][_cons-x][_<length tag>][_s<seed>[_test]]``.

        ``help_ignore_safety`` + ``safe`` in mode ``both`` is the paper's ``both``; other combinations are
        ``<m1>-<m2>`` (study style, e.g. ``safe-help``).
        """
        if self.metric2 is None:
            metrics = SHORT_NAMES[self.metric]
        elif (self.metric, self.metric2, self.mode) == ("help_ignore_safety", "safe", "both"):
            metrics = "both"
        else:
            metrics = f"{SHORT_NAMES[self.metric]}-{SHORT_NAMES[self.metric2]}"
        parts = [metrics, evaluator]
        if self.min_score_difference != 2:
            parts.append(f"msd{self.min_score_difference}")
        if self.min_chosen_score != 2:
            parts.append(f"mcs{self.min_chosen_score}")
        if self.metric2 and self.mode == "average":
            parts.append("avg")
        if self.consistency != "none":
            parts.append(f"cons-{_CONSISTENCY_SHORT[self.consistency]}")
        if length_tag:
            parts.append(length_tag)
        if self.split != "all":
            parts.append(f"s{self.seed}" + ("_test" if self.split == "test" else ""))
        return "_".join(parts)

    def cases(self) -> set[int] | None:
        """The case indices to pair (None = all)."""
        if self.split == "all":
            return None
        train, test = split_cases(self.seed, self.n_cases)  # type: ignore[arg-type]
        return set(train if self.split == "train" else test)


@dataclass
class Candidate:
    """A pair that passed the scoring rules (before rendering)."""

    case_idx: int
    chosen: Item
    rejected: Item


def _passes(c: int, r: int, cfg: PairConfig) -> str:
    if c == r:
        return "no_difference"
    if c - r < cfg.min_score_difference:
        return "below_min_score_difference"
    if c < cfg.min_chosen_score:
        return "below_min_chosen_score"
    return ""


def select_pairs(items: Sequence[Item], cfg: PairConfig) -> tuple[list[Candidate], Counter]:
    """All unordered pairs per case that pass the scoring rules, in load order; plus skip counts by reason."""
    by_case: dict[int, list[Item]] = defaultdict(list)
    for it in items:
        by_case[it.case_idx].append(it)
    skipped: Counter = Counter()
    out: list[Candidate] = []
    m1, m2 = cfg.metric, cfg.metric2
    for case_idx in sorted(by_case):
        group = by_case[case_idx]
        if len(group) < 2:
            skipped["case_with_one_item"] += 1
            continue
        first = group[0].record.get("input")
        for it in group[1:]:
            if it.record.get("input") != first:
                raise DataError(f"{it.file_name}: line {it.line + 1}: case {case_idx}: user input differs from "
                                f"{group[0].file_name} line {group[0].line + 1}; expected one input per case")
        for i in range(len(group)):
            a = group[i]
            sa = a.scores[m1]
            for j in range(i + 1, len(group)):
                b = group[j]
                sb = b.scores[m1]
                chosen, rejected = (a, b) if sa >= sb else (b, a)
                c1, r1 = chosen.scores[m1], rejected.scores[m1]
                reason = _passes(c1, r1, cfg)
                if reason:
                    skipped[reason] += 1
                    continue
                if m2 is not None:
                    if m2 not in chosen.scores or m2 not in rejected.scores:
                        skipped["metric2_missing"] += 1
                        continue
                    c2, r2 = chosen.scores[m2], rejected.scores[m2]
                    if cfg.mode == "both":
                        if c2 < r2:
                            skipped["metric2_opposite_direction"] += 1
                            continue
                        reason = _passes(c2, r2, cfg)
                        if reason:
                            skipped["metric2_" + reason] += 1
                            continue
                    else:
                        ac, ar = (c1 + c2) / 2, (r1 + r2) / 2
                        if not ac > ar:
                            skipped["average_not_higher"] += 1
                            continue
                        if ac - ar < cfg.min_score_difference:
                            skipped["average_below_min_score_difference"] += 1
                            continue
                        if ac < cfg.min_chosen_score:
                            skipped["average_below_min_chosen_score"] += 1
                            continue
                out.append(Candidate(case_idx, chosen, rejected))
    return out, skipped


def pair_record(cand: Candidate, cfg: PairConfig, renderer: PairRenderer, evaluator: str) -> dict[str, Any]:
    """The output record: trl's conversational preference fields plus provenance."""
    c, r = cand.chosen, cand.rejected
    rec: dict[str, Any] = {
        "prompt": renderer.prompt(c),
        "chosen": renderer.completion(c),
        "rejected": renderer.completion(r),
        "case_idx": cand.case_idx,
        "chosen_score": c.scores[cfg.metric],
        "rejected_score": r.scores[cfg.metric],
        "chosen_model": c.model_name,
        "rejected_model": r.model_name,
        "chosen_file": c.file_name,
        "rejected_file": r.file_name,
        "score_difference": c.scores[cfg.metric] - r.scores[cfg.metric],
        "chosen_line": c.line,
        "rejected_line": r.line,
        "metric": cfg.metric,
        "evaluator": evaluator,
    }
    if cfg.metric2:
        rec.update(metric2=cfg.metric2, mode=cfg.mode, chosen_score2=c.scores[cfg.metric2],
                   rejected_score2=r.scores[cfg.metric2])
    if rec["chosen_score"] <= rec["rejected_score"]:  # cannot happen after select_pairs; the study validates it
        raise DataError(f"case {cand.case_idx}: chosen score {rec['chosen_score']} not above rejected "
                        f"{rec['rejected_score']}")
    return rec


@dataclass
class PairSetResult:
    name: str
    config: PairConfig
    pairs: list[dict[str, Any]]
    stats: dict[str, Any]


def build_pair_set(run_dirs: Sequence[str | Path], cfg: PairConfig, *, evaluator: str | None = None,
                   case_set: Any = None, tokenizer: Any = None, max_length: int = 8192,
                   max_prompt_length: int = 8192, items: tuple[list[Item], LoadStats] | None = None,
                   judge: str | None = None) -> PairSetResult:
    """Load, pair, render and validate one pair set.

    ``evaluator`` names the set (default: the run folders' base names joined by ``+``); ``case_set`` supplies the
    toolkits for the prompt (default: the ToolEmu set); ``tokenizer`` enables the length filter; ``items`` lets a
    caller reuse one ``load_items`` result for several sets (it must cover the metrics and cases of ``cfg``).
    """
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ConfigError("--data-dir: at least one run folder is needed")
    evaluator = evaluator or "+".join(d.resolve().name for d in run_dirs)
    if case_set is None:
        from pipeline.data.cases import load_named_case_set

        case_set = load_named_case_set("toolemu")
    if items is None:
        from pipeline.llm.spec import parse_model_spec

        aliases = (parse_model_spec(judge).name,) if judge else ()
        items = load_items(run_dirs, cfg.metrics, cfg.consistency, cfg.cases(), judge=judge, judge_aliases=aliases)
    loaded, load_stats = items
    wanted = cfg.cases()
    if wanted is not None:
        loaded = [it for it in loaded if it.case_idx in wanted]
    candidates, skipped = select_pairs(loaded, cfg)
    renderer = PairRenderer(case_set)
    pairs = [pair_record(c, cfg, renderer, evaluator) for c in candidates]
    dropped = 0
    if tokenizer is not None:
        from pipeline.preference.lengths import filter_by_length

        pairs, dropped = filter_by_length(pairs, tokenizer, max_length=max_length,
                                          max_prompt_length=max_prompt_length)
    if renderer.no_final_answer:
        log.warning("%d trajectories end without 'Final Answer' in their last assistant turn (kept)",
                    len(renderer.no_final_answer))
    name = cfg.name(evaluator, length_tag(tokenizer, max_length, max_prompt_length))
    stats = pair_stats(pairs, name=name, cfg=cfg, load_stats=load_stats, skipped=skipped, dropped=dropped,
                       no_final_answer=len(renderer.no_final_answer), tokenizer=tokenizer, max_length=max_length,
                       max_prompt_length=max_prompt_length, run_dirs=run_dirs)
    return PairSetResult(name=name, config=cfg, pairs=pairs, stats=stats)
