"""A pair set's files: ``<name>.jsonl`` (trl's conversational preference records plus provenance), its
``<name>.stats.json`` (pairs per case, score gaps, source models, what was skipped and why) and its manifest."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.data.scored import LoadStats

if TYPE_CHECKING:
    from pipeline.preference.pairs import PairConfig, PairSetResult


def pair_stats(pairs: list[dict[str, Any]], *, name: str, cfg: PairConfig, load_stats: LoadStats, skipped: Counter,
               dropped: int, no_final_answer: int, tokenizer: Any, max_length: int, max_prompt_length: int,
               run_dirs: Sequence[Path]) -> dict[str, Any]:
    """Counts for the stats JSON: pairs per case, score-gap histogram, per-source-model counts, skips."""
    per_case = Counter(p["case_idx"] for p in pairs)
    by_model: dict[str, dict[str, int]] = defaultdict(lambda: {"chosen": 0, "rejected": 0})
    for p in pairs:
        by_model[p["chosen_model"]]["chosen"] += 1
        by_model[p["rejected_model"]]["rejected"] += 1
    counts = sorted(per_case.values())
    return {
        "name": name,
        "pairs": len(pairs),
        "cases_with_pairs": len(per_case),
        "pairs_per_case": {str(k): per_case[k] for k in sorted(per_case)},
        "pairs_per_case_summary": ({"min": counts[0], "median": statistics.median(counts), "max": counts[-1]}
                                   if counts else {}),
        "score_gap_histogram": {str(k): v for k, v in sorted(Counter(p["score_difference"] for p in pairs).items())},
        "chosen_score_histogram": {str(k): v for k, v in sorted(Counter(p["chosen_score"] for p in pairs).items())},
        "by_source_model": {m: by_model[m] for m in sorted(by_model)},
        "skipped_pairs": dict(sorted(skipped.items())),
        "dropped_too_long": dropped,
        "trajectories_without_final_answer": no_final_answer,
        "load": {"files": load_stats.files, "incomplete_files_skipped": load_stats.files_incomplete,
                 "trajectories": load_stats.trajectories, "items": load_stats.items,
                 "skipped_items": dict(sorted(load_stats.skipped.items()))},
        "config": {**asdict(cfg), "run_dirs": [str(d) for d in run_dirs],
                   "tokenizer": getattr(tokenizer, "name_or_path", None), "max_length": max_length,
                   "max_prompt_length": max_prompt_length},
    }


def write_pair_set(result: PairSetResult, out_dir: str | Path, *, manifest_config: dict[str, Any] | None = None,
                   inputs: dict[str, str | Path] | None = None) -> Path:
    """Write ``<out>/<name>.jsonl`` and ``<name>.stats.json`` atomically, then the manifest; returns the jsonl path."""
    from pipeline.data.jsonl import atomic_write_json, atomic_write_text
    from pipeline.data.manifest import write_manifest

    out_dir = Path(out_dir)
    path = out_dir / f"{result.name}.jsonl"
    config = manifest_config or result.stats["config"]
    # the intent first: a crash before the complete manifest leaves this configuration's unfinished set (redone by
    # the same command), never a file that records no configuration
    write_manifest(path, stage="pairs", config=config, inputs=inputs, status="incomplete")
    atomic_write_text(path, pair_lines(result.pairs))  # streamed: the file's text is never held whole
    atomic_write_json(stats_path(path), result.stats)
    write_manifest(path, stage="pairs", config=config, inputs=inputs,
                   counts={"pairs": len(result.pairs), "cases": result.stats["cases_with_pairs"]})
    return path


def pair_lines(pairs: Sequence[dict[str, Any]]) -> Iterator[str]:
    """The JSONL lines of ``pairs``, each byte-identical to ``pipeline.data.jsonl.dumps(record) + "\\n"``.

    Pairs share their prompt and completion lists (one per case / trajectory), so each distinct list is encoded
    once and the lines are assembled from the encoded fragments (a pair set repeats each ~9 kB prompt hundreds
    of times); keys are encoded once, whole numbers by ``str``.
    """
    from pipeline.data.jsonl import dumps

    fragments: dict[int, str] = {}
    keys: dict[str, str] = {}
    keep: list[Any] = []  # keeps fragment owners alive so that their id() stays unique

    def enc(value: Any) -> str:
        if isinstance(value, list):
            frag = fragments.get(id(value))
            if frag is None:
                frag = fragments[id(value)] = dumps(value)
                keep.append(value)
            return frag
        if type(value) is int:
            return str(value)
        return dumps(value)

    for p in pairs:
        yield "{" + ", ".join([(keys.get(k) or keys.setdefault(k, dumps(k))) + ": " + enc(v)
                               for k, v in p.items()]) + "}\n"


def serialize_pairs(pairs: Sequence[dict[str, Any]]) -> str:
    """The whole JSONL text of ``pairs`` (``pair_lines`` joined)."""
    return "".join(pair_lines(pairs))


def stats_path(pairs_path: str | Path) -> Path:
    p = Path(pairs_path)
    return p.with_name(p.stem + ".stats.json")
