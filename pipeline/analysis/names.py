"""Short names, sort order and colours used across the analysis (SPEC §2.3, §7.4, §7.6)."""

from __future__ import annotations

import re

from pipeline.data.naming import source_model

#: Dataset origins of the study: which evaluator labelled the DPO pairs.
KNOWN_ORIGINS = ("q32", "gpt5m")

#: The study's palette first (SPEC §7.6), then enough distinct colours for the 25 released source models.
PALETTE = ["#c49f08", "#20a39e", "#ef5b5b", "#3a5dae", "#8e44ad", "#2e8b57", "#d35400", "#7f8c8d", "#c2185b",
           "#17becf", "#6d4c41", "#9acd32", "#1f77b4", "#ff7f0e", "#8c564b", "#e377c2", "#bcbd22", "#393b79",
           "#637939", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363"]
MARKERS = ["D", "s", "^", "o", "v", "P", "X", "h", "<", ">", "p", "*"]


def evaluator_short(evaluator: str) -> str:
    """``eval-gpt5m`` (gpt-5-mini), ``eval-q32`` (a Qwen …32… evaluator), else ``eval-<name>`` (SPEC §7.4)."""
    low = evaluator.lower()
    if "gpt-5-mini" in low:
        return "eval-gpt5m"
    if "qwen" in low and "32" in low:
        return "eval-q32"
    return f"eval-{evaluator}"


def evaluator_origin(evaluator: str) -> str:
    """The dataset-origin token of the pairs this evaluator labels (``q32``, ``gpt5m``, or its own name)."""
    return evaluator_short(evaluator)[len("eval-"):]


def evaluator_nickname(evaluator: str) -> str:
    """``Qwen_Qwen3-32B`` → ``Qwen3-32B``; ``gpt-5-mini`` unchanged (table file names, SPEC §7.7)."""
    return source_model(evaluator)


_GPT = re.compile(r"^gpt-(\d+(?:\.\d+)?)(o?)(?:-(nano|mini))?$", re.IGNORECASE)
_SERIES = {"llama": 0, "mixtral": 1, "phi": 2, "qwen": 3}
_VERSION_SIZE = re.compile(r"^(llama|mixtral|phi|qwen)-?(\d+(?:\.\d+)?)?(?:-(\d+)(?:x(\d+))?b)?(.*)$", re.IGNORECASE)


def model_sort_key(name: str) -> tuple:
    """Tables/plots order (SPEC §2.3): Llama < Mixtral < Phi < Qwen (by version, then size; Qwen thinking
    before ``nt``), then unknown models alphabetically, GPT models last (by version, then nano < mini < full).
    """
    g = _GPT.match(name)
    if g:
        variant = {"nano": 0, "mini": 1, None: 2}[g.group(3).lower() if g.group(3) else None]
        return (2, float(g.group(1)), g.group(2), variant, name)
    m = _VERSION_SIZE.match(name)
    if m:
        series = _SERIES[m.group(1).lower()]
        version = float(m.group(2)) if m.group(2) else 0.0
        size = float(m.group(3)) * (float(m.group(4)) if m.group(4) else 1.0) if m.group(3) else 0.0
        rest = m.group(5).lower()
        return (0, series, version, size, rest.startswith("nt"), rest, name)
    return (1, name.lower(), name)
