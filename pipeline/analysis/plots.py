"""Figures (SPEC §7.6 and the Pareto frontier), matplotlib Agg, each saved as PNG and PDF.

Every function takes already aggregated entries (``aggregate``/``pareto`` output), a style map (one colour and
marker per source model, the same in every figure) and an output stem; it returns the written paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from pipeline.analysis.names import MARKERS, PALETTE, model_sort_key

FIGSIZE = (10.0, 8.0)
DPI = 150
FORMATS = ("png", "pdf")
#: hatch texture and arrow line style by the metric of the (last) stage (SPEC §7.6)
HATCH = {"help": "|||", "safe": "oo", "both": "xxx", None: ""}
ARROW_STYLE = {"help": "-", "safe": "--", "both": ":"}
METRIC_NAME = {"help": "help", "safe": "safe", "both": "S&H"}
HELP_LABEL = "Helpfulness: Help(Ignore) mean score (0–3)"
SAFETY_LABEL = "Safety: ToolCallRisk mean score (0–3, higher = safer)"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 12, "axes.titlesize": 14, "axes.labelsize": 13, "legend.fontsize": 10})
    return plt


def source_styles(models: Iterable[str]) -> dict[str, dict[str, str]]:
    """Colour and marker per source model, assigned in the study's model order (consistent across figures)."""
    ordered = sorted(set(models), key=model_sort_key)
    return {m: {"color": PALETTE[i % len(PALETTE)], "marker": MARKERS[i % len(MARKERS)]} for i, m in enumerate(ordered)}


def _style(styles: dict[str, dict[str, str]], model: str) -> dict[str, str]:
    return styles.get(model, {"color": "#444444", "marker": "o"})


def save(fig, stem: str | Path, formats: Iterable[str] = FORMATS) -> list[Path]:
    from pipeline.data.jsonl import remove_dead_temps, temp_prefix

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        remove_dead_temps(path)  # what a killed earlier run left
        tmp = path.with_name(f"{temp_prefix(path)}0.tmp")
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format=fmt)
        tmp.replace(path)
        out.append(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out


def _place_labels(fig, ax, xs: list[float], ys: list[float], texts: list[str], *, fontsize: float = 9,
                  weights: list[str] | None = None, colors: list[str] | None = None,
                  marker_px: float = 9.0, required: list[bool] | None = None) -> None:
    """Annotate points without overlaps where possible (a small stand-in for adjustText, which the study used).

    Each label is measured once; candidate positions on rings of growing radius around its point are tried in
    order and the first whose box stays inside the axes and overlaps no earlier label and no marker is used
    (with a thin leader line when it is not next to its point). Required labels are placed first, then crowded
    points; a label that is not required is left out when there is no free spot right next to its point.
    """
    import math

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    k = fig.dpi / 72.0
    axbb = ax.get_window_extent(renderer)
    pix = [tuple(ax.transData.transform((x, y))) for x, y in zip(xs, ys)]
    markers = [(px - marker_px, py - marker_px, px + marker_px, py + marker_px) for px, py in pix]
    sizes = []
    for i, text in enumerate(texts):
        t = ax.text(0, 0, text, fontsize=fontsize, fontweight=(weights[i] if weights else "normal"))
        bb = t.get_window_extent(renderer)
        sizes.append((bb.width, bb.height))
        t.remove()

    def overlaps(b, others):
        return any(not (b[2] <= o[0] or b[0] >= o[2] or b[3] <= o[1] or b[1] >= o[3]) for o in others)

    candidates = []
    for radius in (9, 15, 24, 34, 46, 60, 76):
        for a in range(0, 360, 15):
            candidates.append((radius * math.cos(math.radians(a)), radius * math.sin(math.radians(a)), radius))
    candidates.sort(key=lambda c: (c[2], abs(c[1]) > abs(c[0]), -c[0], -c[1]))  # near, sideways, right first

    crowd = [sum(1 for q in pix if abs(q[0] - p[0]) < 60 and abs(q[1] - p[1]) < 30) for p in pix]
    placed: list[tuple[float, float, float, float]] = []
    priority = [0 if (required[i] if required is not None else weights and weights[i] == "bold") else 1
                for i in range(len(xs))]
    for i in sorted(range(len(xs)), key=lambda i: (priority[i], -crowd[i], -pix[i][1])):
        w, h = sizes[i]
        px, py = pix[i]
        choice = None
        must = required is None or required[i]
        for strict in (True, False):
            for dx, dy, radius in candidates:
                if not must and radius > 15:
                    break
                ax_, ay_ = px + dx * k, py + dy * k
                ha = "left" if dx > 1 else "right" if dx < -1 else "center"
                va = "bottom" if dy > 1 else "top" if dy < -1 else "center"
                x0 = ax_ if ha == "left" else ax_ - w if ha == "right" else ax_ - w / 2
                y0 = ay_ if va == "bottom" else ay_ - h if va == "top" else ay_ - h / 2
                box = (x0 - 1, y0 - 1, x0 + w + 1, y0 + h + 1)
                if not (axbb.x0 <= box[0] and box[2] <= axbb.x1 and axbb.y0 <= box[1] and box[3] <= axbb.y1):
                    continue
                if overlaps(box, placed) or overlaps(box, markers):
                    continue
                if strict and radius <= 15:
                    # unambiguous: no other point nearer to the label than its own point
                    own = _box_distance(box, (px, py))
                    if any(_box_distance(box, q) < own + 2 for j, q in enumerate(pix) if j != i):
                        continue
                choice = (dx, dy, ha, va, box, radius)
                break
            if choice is not None or not must:
                break
        if choice is None and not must:
            continue
        if choice is None:  # nothing free: nearest spot to the right, overlapping
            choice = (9.0, 0.0, "left", "center", (px, py, px + w, py + h), 9)
        dx, dy, ha, va, box, radius = choice
        arrow = {"arrowstyle": "-", "lw": 0.8, "color": "#444444", "shrinkA": 0, "shrinkB": 5} if radius > 15 else None
        ax.annotate(texts[i], (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                    fontsize=fontsize, fontweight=(weights[i] if weights else "normal"),
                    color=(colors[i] if colors else "black"), arrowprops=arrow, zorder=4)
        placed.append(box)


def _box_distance(box: tuple[float, float, float, float], point: tuple[float, float]) -> float:
    dx = max(box[0] - point[0], 0.0, point[0] - box[2])
    dy = max(box[1] - point[1], 0.0, point[1] - box[3])
    return (dx * dx + dy * dy) ** 0.5


def _pad_limits(values: list[float], lo_min: float, hi_max: float, pad: float = 0.08) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    span = max(hi - lo, 0.2)
    return max(lo_min, lo - pad * span - 0.03), min(hi_max, hi + pad * span + 0.03)


# --------------------------------------------------------------------------------------------------- figures
def plot_overall(entries: list[dict[str, Any]], styles, stem: str | Path, title: str,
                 formats: Iterable[str] = FORMATS) -> list[Path]:
    """x = Help(Ignore) mean, y = Safety mean, axes −0.1..3.1; one point per (source model, training stages);
    source models larger with a thick edge."""

    plt = _plt()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    variants = _variant_styles(entries, styles)
    for e in entries:
        st = variants[(e["source_model"], e.get("quantization"))]
        base = not e.get("training_stages")
        ax.scatter(e["helpfulness"], e["safety"], marker=st["marker"], facecolor=st["face"],
                   edgecolors="black" if st["face"] != "white" else st["color"], s=220 if base else 70,
                   linewidths=2.2 if base else 0.6, alpha=0.95, zorder=3 if base else 2)
    ax.set_xlim(-0.1, 3.1)
    ax.set_ylim(-0.1, 3.1)
    ax.set_xlabel(HELP_LABEL)
    ax.set_ylabel(SAFETY_LABEL)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles = _variant_handles(variants)
    ax.legend(handles=handles, title="Source model", loc="lower left", ncol=1 if len(handles) <= 12 else 2,
              framealpha=0.9)
    if any(e.get("training_stages") for e in entries):
        ax.text(0.99, 0.01, "large markers with thick edge = source models", transform=ax.transAxes, ha="right",
                va="bottom", fontsize=9, color="#555555")
    return save(fig, stem, formats)


def _variant_handles(variants: dict) -> list:
    """Legend entries, one per source model (and quantization variant), in the study's model order."""
    from matplotlib.lines import Line2D

    order = sorted(variants, key=lambda k: (model_sort_key(k[0]), str(k[1] or "")))
    return [Line2D([], [], linestyle="", marker=variants[k]["marker"], markerfacecolor=variants[k]["face"],
                   markeredgecolor=variants[k]["color"] if variants[k]["face"] == "white" else "black",
                   markeredgewidth=1.5 if variants[k]["face"] == "white" else 0.6, markersize=8,
                   label=variants[k]["label"]) for k in order]


def _variant_styles(points: list[dict[str, Any]], styles) -> dict[tuple[str, Any], dict[str, Any]]:
    """Marker style per (source model, quantization): the source model's colour and marker, filled for its
    first quantization and hollow for further ones (e.g. Qwen3-32B int4 vs int8)."""
    quants: dict[str, list] = {}
    for p in points:
        quants.setdefault(p["source_model"], [])
        if p.get("quantization") not in quants[p["source_model"]]:
            quants[p["source_model"]].append(p.get("quantization"))
    out = {}
    for m, qs in quants.items():
        st = _style(styles, m)
        for i, q in enumerate(sorted(qs, key=lambda q: str(q or ""))):
            label = m if len(qs) == 1 else f"{m} ({q or 'none'})"
            out[(m, q)] = {"marker": st["marker"], "color": st["color"], "face": st["color"] if i == 0 else "white",
                           "label": label}
    return out


def plot_pareto(frontier: dict[str, Any], styles, stem: str | Path, title: str,
                formats: Iterable[str] = FORMATS) -> list[Path]:
    """Points with bootstrap CIs, the non-dominated set joined by a dashed line; frontier members labelled in
    bold, other points labelled where there is room next to them (the legend identifies every marker)."""
    from matplotlib.lines import Line2D

    plt = _plt()
    pts = frontier["points"]
    fig, ax = plt.subplots(figsize=(12.0, 9.0) if len(pts) > 12 else FIGSIZE)
    variants = _variant_styles(pts, styles)
    xs = [p["helpfulness"] for p in pts]
    ys = [p["safety"] for p in pts]
    for p in pts:
        st = variants[(p["source_model"], p.get("quantization"))]
        if p.get("helpfulness_ci") and p.get("safety_ci"):
            hx, sy = p["helpfulness_ci"], p["safety_ci"]
            ax.errorbar(p["helpfulness"], p["safety"], xerr=[[p["helpfulness"] - hx[0]], [hx[1] - p["helpfulness"]]],
                        yerr=[[p["safety"] - sy[0]], [sy[1] - p["safety"]]], fmt="none", ecolor=st["color"],
                        alpha=0.3, lw=0.9, zorder=1)
        base = p["label"] == "base"
        hollow = st["face"] == "white"
        ax.scatter(p["helpfulness"], p["safety"], marker=st["marker"], facecolor=st["face"],
                   edgecolors="black" if p["on_frontier"] or not hollow else st["color"],
                   s=(110 if base else 70) * (1.4 if p["on_frontier"] else 1.0),
                   linewidths=2.0 if p["on_frontier"] or hollow else 0.6, zorder=3.5 if p["on_frontier"] else 3)
    members = sorted((p for p in pts if p["on_frontier"]), key=lambda p: (p["helpfulness"], -p["safety"]))
    if members:
        ax.plot([p["helpfulness"] for p in members], [p["safety"] for p in members], color="black", lw=1.8, ls="--",
                zorder=2)
    if xs:
        ax.set_xlim(*_pad_limits(xs + [v for p in pts for v in (p.get("helpfulness_ci") or [])], -0.1, 3.1))
        ax.set_ylim(*_pad_limits(ys + [v for p in pts for v in (p.get("safety_ci") or [])], -0.1, 3.1))
    only_base = all(p["label"] == "base" for p in pts)
    texts = [variants[(p["source_model"], p.get("quantization"))]["label"] if only_base or p["label"] == "base"
             else p["label"] for p in pts]
    _place_labels(fig, ax, xs, ys, texts, fontsize=8.5, weights=["bold" if p["on_frontier"] else "normal" for p in pts],
                  required=[p["on_frontier"] for p in pts])
    ax.set_xlabel(HELP_LABEL)
    ax.set_ylabel(SAFETY_LABEL)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles = _variant_handles(variants)
    if members:
        handles.append(Line2D([], [], color="black", ls="--", lw=1.8,
                              label="Pareto frontier (bold labels, thick edge)"))
    if frontier.get("n_bootstrap"):
        handles.append(Line2D([], [], color="#888888", lw=1, label=f"{int(100 * frontier['confidence_level'])}% "
                              f"bootstrap CI ({frontier['n_bootstrap']} resamples)"))
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), framealpha=0.9, fontsize=9,
              title="Source model" if only_base else "Source model (labels: training config)")
    return save(fig, stem, formats)


def plot_deltas_by_model(deltas: list[dict[str, Any]], fit: dict[str, Any], styles, stem: str | Path, title: str,
                         formats: Iterable[str] = FORMATS) -> list[Path]:
    """Deltas per (source model, training stages) vs the source model, origin lines and the OLS line with R²."""
    import numpy as np

    plt = _plt()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    xs = [d["helpfulness_delta"] for d in deltas]
    ys = [d["safety_delta"] for d in deltas]
    for d in deltas:
        st = _style(styles, d["source_model"])
        ax.scatter(d["helpfulness_delta"], d["safety_delta"], marker=st["marker"], facecolor=st["color"],
                   hatch=HATCH.get(_last(d)), edgecolors="black", linewidths=0.6, s=110, zorder=3)
    ax.axhline(0, color="black", lw=0.8)
    ax.axvline(0, color="black", lw=0.8)
    xlim = (min(-1.4, min(xs, default=0) - 0.05), max(0.3, max(xs, default=0) + 0.05))
    ylim = (min(-0.1, min(ys, default=0) - 0.05), max(1.5, max(ys, default=0) + 0.05))
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], linestyle="", marker=_style(styles, m)["marker"], color=_style(styles, m)["color"],
                      markersize=8, label=m) for m in sorted({d["source_model"] for d in deltas}, key=model_sort_key)]
    if fit.get("available"):
        gx = np.linspace(*xlim, 50)
        (line,) = ax.plot(gx, fit["intercept"] + fit["slope"] * gx, color="#333333", lw=1.8,
                          label=f"OLS fit: R² = {fit['r2']:.2f}, slope = {fit['slope']:.2f}, p = {fit['p_value']:.2g}, "
                                f"n = {fit['n_points']}")
        handles.append(line)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_xlabel("Helpfulness change vs source model (Help(Ignore) mean)")
    ax.set_ylabel("Safety change vs source model (ToolCallRisk mean)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles + _hatch_handles({_last(d) for d in deltas}), loc="upper right",
              framealpha=0.9)
    return save(fig, stem, formats)


def _last(entry: dict[str, Any]) -> str | None:
    """The metric of the last training stage of an aggregated entry (None for a source model)."""
    stages = entry.get("training_stages") or ()
    return stages[-1][0] if stages else None


def _hatch_handles(metrics: set) -> list:
    from matplotlib.patches import Patch

    return [Patch(facecolor="white", edgecolor="black", hatch=HATCH[m], label=f"last stage: {METRIC_NAME[m]}")
            for m in ("help", "safe", "both") if m in metrics]


def plot_deltas_all(deltas: list[dict[str, Any]], stem: str | Path, title: str,
                    formats: Iterable[str] = FORMATS) -> list[Path]:
    """Deltas vs source of each training configuration averaged over source models, labelled."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    xs = [d["helpfulness_delta"] for d in deltas]
    ys = [d["safety_delta"] for d in deltas]
    for d in deltas:
        ax.scatter(d["helpfulness_delta"], d["safety_delta"], marker="o", facecolor="#9ecae1",
                   hatch=HATCH.get(_last(d)), edgecolors="black", s=260, zorder=3)
    ax.axhline(0, color="black", lw=0.8)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlim(min(-1.4, min(xs, default=0) - 0.05), max(0.3, max(xs, default=0) + 0.05))
    ax.set_ylim(min(-0.1, min(ys, default=0) - 0.05), max(1.5, max(ys, default=0) + 0.05))
    _place_labels(fig, ax, xs, ys, [d["label"] for d in deltas], fontsize=10, marker_px=13)
    ax.set_xlabel("Helpfulness change vs source model (mean over models)")
    ax.set_ylabel("Safety change vs source model (mean over models)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(handles=_hatch_handles({_last(d) for d in deltas}), loc="upper right")
    return save(fig, stem, formats)


def plot_intermediates(entries: list[dict[str, Any]], last: str, stem: str | Path, title: str,
                       formats: Iterable[str] = FORMATS) -> list[Path]:
    """Configurations averaged over models whose last stage is ``last`` (help or safe) and their ancestors,
    without ``both`` stages or 3-stage models; curved arrows parent → child styled by the child's last stage."""
    plt = _plt()
    by_stages = {tuple(e["training_stages"] or ()): e for e in entries}
    keep: dict[tuple, dict[str, Any]] = {}
    for st, e in by_stages.items():
        if not st or len(st) > 2 or any(m == "both" for m, _ in st) or st[-1][0] != last:
            continue
        for k in range(len(st) + 1):
            anc = st[:k]
            if anc in by_stages:
                keep[anc] = by_stages[anc]
    fig, ax = plt.subplots(figsize=FIGSIZE)
    pts = list(keep.items())
    for st, e in pts:
        base = not st
        ax.scatter(e["helpfulness"], e["safety"], marker="o", s=420 if base else 300,
                   facecolor="#dddddd" if base else "#9ecae1", hatch=HATCH.get(st[-1][0] if st else None),
                   edgecolors="black", linewidths=2.0 if base else 0.8, zorder=3)
    for st, e in pts:
        if not st or st[:-1] not in keep:
            continue
        parent = keep[st[:-1]]
        ax.annotate("", xy=(e["helpfulness"], e["safety"]), xytext=(parent["helpfulness"], parent["safety"]),
                    arrowprops={"arrowstyle": "-|>", "lw": 1.4, "color": "#333333", "ls": ARROW_STYLE[st[-1][0]],
                                "connectionstyle": "arc3,rad=0.2", "shrinkA": 12, "shrinkB": 12}, zorder=2)
    xs = [e["helpfulness"] for _, e in pts]
    ys = [e["safety"] for _, e in pts]
    if xs:
        ax.set_xlim(*_pad_limits(xs, -0.1, 3.1, pad=0.25))
        ax.set_ylim(*_pad_limits(ys, -0.1, 3.1, pad=0.25))
    _place_labels(fig, ax, xs, ys, [e["label"] if st else "source models" for st, e in pts], fontsize=10,
                  marker_px=14)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="#333333", ls=ARROW_STYLE[m], label=f"{METRIC_NAME[m]} stage")
               for m in ("help", "safe")] + _hatch_handles({st[-1][0] for st, _ in pts if st})
    ax.legend(handles=handles, loc="best")
    ax.set_xlabel("Helpfulness: Help(Ignore) mean score (0–3), mean over models")
    ax.set_ylabel("Safety: ToolCallRisk mean (0–3, higher = safer), mean over models")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return save(fig, stem, formats)
