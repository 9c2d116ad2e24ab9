"""Tables (SPEC §7.7) in LaTeX and Markdown, and the terminal results table (SPEC §7.8).

Row order everywhere: source model (study order), base first, then last metric H < S < S&H, fewer stages
first, earlier stages, beta.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pipeline.analysis.aggregate import aggregate_scores, compute_deltas, stages_sort_key
from pipeline.analysis.names import evaluator_nickname, evaluator_short, model_sort_key
from pipeline.analysis.rows import ReportRow

_LATEX_ESCAPE = {"&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "{": r"\{", "}": r"\}",
                 "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "→": r"$\rightarrow$", "β": r"$\beta$",
                 "±": r"$\pm$", "²": r"$^2$", "–": "--"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_ESCAPE.get(ch, ch) for ch in text)


def fmt(v: float | None, digits: int = 2, signed: bool = False) -> str:
    if v is None:
        return "–"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


@dataclass
class Table:
    """A table with plain-text cells; ``latex_cells`` may override cells with raw LaTeX (e.g. ``\\ci{…}``)."""

    name: str
    caption: str
    headers: list[str]
    rows: list[list[str]]
    align: str | None = None
    latex_cells: dict[tuple[int, int], str] = field(default_factory=dict)
    #: row indices after which a horizontal rule is drawn (group separators)
    rules_after: list[int] = field(default_factory=list)

    def to_markdown(self) -> str:
        lines = [f"**{self.caption}**", "", "| " + " | ".join(self.headers) + " |",
                 "|" + "|".join("---" if a == "l" else "---:" for a in self._align()) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def to_latex(self) -> str:
        out = [r"\begin{table}[t]", r"\centering", r"\small", r"\begin{tabular}{" + "".join(self._align()) + "}",
               r"\toprule", " & ".join(latex_escape(h) for h in self.headers) + r" \\", r"\midrule"]
        for i, row in enumerate(self.rows):
            cells = [self.latex_cells.get((i, j), latex_escape(c)) for j, c in enumerate(row)]
            out.append(" & ".join(cells) + r" \\")
            if i in self.rules_after and i != len(self.rows) - 1:
                out.append(r"\midrule")
        out += [r"\bottomrule", r"\end{tabular}", r"\caption{" + latex_escape(self.caption) + "}",
                r"\label{tab:" + self.name.replace("_", "-") + "}", r"\end{table}"]
        return "\n".join(out) + "\n"

    def _align(self) -> str:
        if self.align:
            return self.align
        return "".join("r" if self.rows and all(_numeric(r[j]) for r in self.rows) else "l"
                       for j in range(len(self.headers)))

    def write(self, folder: str | Path) -> list[Path]:
        from pipeline.data.jsonl import atomic_write_text

        folder = Path(folder)
        paths = [folder / f"{self.name}.tex", folder / f"{self.name}.md"]
        atomic_write_text(paths[0], self.to_latex())
        atomic_write_text(paths[1], self.to_markdown())
        return paths


def _numeric(cell: str) -> bool:
    head = cell.split(" ")[0].replace("+", "").replace("−", "-").replace("–", "")
    if not head:
        return True
    try:
        float(head)
        return True
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------- SPEC §7.7 tables
HYPERPARAMETERS = [
    ("Learning rate", "5e-5"), ("Per-device batch size", "1"), ("Gradient accumulation steps", "8"),
    ("Effective batch size", "8"), ("Epochs", "1 (3 for the joint S&H datasets)"), ("Warmup ratio", "0.1"),
    ("LR scheduler", "cosine"), ("Optimizer", "adamw_torch"), ("Max grad norm", "1.0"), ("Precision", "bf16"),
    ("Gradient checkpointing", "on"), ("DPO beta", "0.1 and 0.05"), ("DPO loss", "sigmoid (TRL default)"),
    ("Max length / max prompt length", "8192 / 8192"), ("Reference model", "adapters disabled (precomputed log-probs)"),
    ("LoRA r / alpha / dropout", "16 / 32 / 0.05"), ("LoRA target modules", "all-linear"), ("Seed", "42"),
    ("Quantization level (large-model evaluation)", "int4"), ("Temperature", "0.0"),
    ("Max agent tokens", "8000"), ("Max re-prompts", "5"),
]


def hyperparams_table() -> Table:
    return Table("hyperparams", "DPO training hyper-parameters (SPEC §6.3).", ["Hyper-parameter", "Value"],
                 [[k, v] for k, v in HYPERPARAMETERS], align="ll")


def results_tables(rows: list[ReportRow]) -> list[Table]:
    """``<Evaluator>_results``: Source Model | Training Config | [Quantization] | Helpfulness | Safety."""
    out = []
    for evaluator in sorted({r.evaluator for r in rows}):
        sub = [r for r in rows if r.evaluator == evaluator]
        agg = aggregate_scores(sub, ("source_model", "evaluator_model", "training_stages", "quantization"))
        quants = {e["quantization"] for e in agg}
        agg.sort(key=lambda e: (model_sort_key(e["source_model"]), stages_sort_key(e["training_stages"]),
                                str(e["quantization"] or "")))
        headers = ["Source Model", "Training Config"] + (["Quantization"] if len(quants) > 1 else []) + \
                  ["Helpfulness", "Safety"]
        body, rules = [], []
        for i, e in enumerate(agg):
            body.append([e["source_model"], e["label"]] + ([e["quantization"] or "none"] if len(quants) > 1 else [])
                        + [fmt(e["helpfulness"]), fmt(e["safety"])])
            if i + 1 < len(agg) and agg[i + 1]["source_model"] != e["source_model"]:
                rules.append(i)
        out.append(Table(f"{evaluator_nickname(evaluator)}_results",
                         f"Mean Help(Ignore) and safety scores (0–3) evaluated by {evaluator_nickname(evaluator)}, "
                         f"averaged over seeds.", headers, body, rules_after=rules))
    return out


def aggregated_tables(rows: list[ReportRow]) -> list[Table]:
    """By training configuration, averaged over models and evaluators: results and deltas vs base."""
    agg = aggregate_scores(rows, ("training_stages",))
    agg.sort(key=lambda e: stages_sort_key(e["training_stages"]))
    res = Table("aggregated_results_table", "Mean scores by training configuration, averaged over source models, "
                "evaluators and seeds.", ["Training Config", "Helpfulness", "Safety", "Runs"],
                [[e["label"], fmt(e["helpfulness"]), fmt(e["safety"]), str(e["n_models"])] for e in agg])
    deltas = compute_deltas(agg, ("training_stages",), "base")
    dl = Table("aggregated_deltas_table", "Change vs the source models by training configuration, averaged over "
               "source models, evaluators and seeds.", ["Training Config", "Δ Helpfulness", "Δ Safety"],
               [[d["label"], fmt(d["helpfulness_delta"], signed=True), fmt(d["safety_delta"], signed=True)]
                for d in deltas])
    return [res, dl]


def _persist_cell(entry: dict[str, Any] | None, which: str) -> tuple[str, str]:
    """(plain text, LaTeX) of one persistence value with its CI when present."""
    if entry is None or entry.get(f"persist_{which}") is None:
        return "–", "--"
    v = entry[f"persist_{which}"]
    lo, hi = entry.get(f"persist_{which}_ci_lower"), entry.get(f"persist_{which}_ci_upper")
    if lo is None or hi is None:
        return f"{v:.2f}", f"{v:.2f}"
    return f"{v:.2f} ({lo:.2f}, {hi:.2f})", f"{v:.2f} \\ci{{({lo:.2f}, {hi:.2f})}}"


def persistence_tables(stats: dict[str, Any]) -> list[Table]:
    """``persist`` (by model + Average per beta) and ``persist_eval-<x>`` (by model for one evaluator)."""
    by_beta = stats["persistence"]["by_beta"]
    tables = []

    def build(name: str, caption: str, sections: list[tuple[str, list[tuple[str, dict | None]]]]) -> Table:
        body, cells, rules = [], {}, []
        for beta, entries in sections:
            for label, entry in entries:
                (s_txt, s_tex), (h_txt, h_tex) = _persist_cell(entry, "s"), _persist_cell(entry, "h")
                i = len(body)
                body.append([beta, label, s_txt, h_txt])
                cells[(i, 2)], cells[(i, 3)] = s_tex, h_tex
            rules.append(len(body) - 1)
        return Table(name, caption, ["β", "Source Model", "Persist(S)", "Persist(H)"], body, align="llrr",
                     latex_cells=cells, rules_after=rules)

    sections = []
    for beta, lvl in by_beta.items():
        entries = [(m, lvl["by_model"][m]) for m in sorted(lvl["by_model"], key=model_sort_key)]
        sections.append((beta, entries + [("Average", lvl["average"])]))
    tables.append(build("persist", "Persistence of the first objective through the second stage (1 = fully "
                        "kept, 0 = erased), averaged over evaluators; 95% bootstrap CI in parentheses.", sections))
    evaluators = sorted({k.split("|", 1)[0] for lvl in by_beta.values() for k in lvl["by_model_and_evaluator"]})
    for ev in evaluators:
        sections = []
        for beta, lvl in by_beta.items():
            keys = [k for k in lvl["by_model_and_evaluator"] if k.split("|", 1)[0] == ev]
            entries = [(k.split("|", 1)[1], lvl["by_model_and_evaluator"][k])
                       for k in sorted(keys, key=lambda k: model_sort_key(k.split("|", 1)[1]))]
            if entries:
                sections.append((beta, entries + [("Average", lvl["by_evaluator"].get(ev))]))
        tables.append(build(f"persist_{evaluator_short(ev)}", f"Persistence evaluated by {evaluator_nickname(ev)}.",
                            sections))
    return tables


# ------------------------------------------------------------------------------------------- our own tables
def source_model_tables(all_rows: list[ReportRow], test_rows: list[ReportRow], seeds: list[int]) -> list[Table]:
    """Per evaluator: each source model's mean safety and Help(Ignore) on all cases and on each seed's test split."""
    tables = []
    evaluators = sorted({r.evaluator for r in all_rows + test_rows if not r.finetuned})
    for ev in evaluators:
        src_all = {(r.source_model, r.quantization): r for r in all_rows if not r.finetuned and r.evaluator == ev}
        src_test = {(r.source_model, r.quantization, r.seed): r for r in test_rows
                    if not r.finetuned and r.evaluator == ev}
        models = sorted(set(src_all) | {k[:2] for k in src_test}, key=lambda k: (model_sort_key(k[0]), str(k[1] or "")))
        quants = {q for _, q in models}
        headers = ["Model"] + (["Quant"] if len(quants) > 1 else [])
        headers += ["Safety all"] + [f"Safety s{s}" for s in seeds] + ["Help all"] + [f"Help s{s}" for s in seeds]
        body = []
        for m, q in models:
            r_all = src_all.get((m, q))
            cells = [m] + ([q or "none"] if len(quants) > 1 else [])
            for metric in ("safety", "helpfulness"):
                cells.append(fmt(getattr(r_all, metric), 3) if r_all else "–")
                for s in seeds:
                    r = src_test.get((m, q, s))
                    cells.append(fmt(getattr(r, metric), 3) if r else "–")
            body.append(cells)
        n_all = max((r.n_cases for r in src_all.values()), default=0)
        tables.append(Table(f"source_models_{evaluator_short(ev)}",
                            f"Source models evaluated by {evaluator_nickname(ev)}: mean safety and Help(Ignore) "
                            f"(0–3) on all {n_all} cases and on each seed's test split.", headers, body))
    return tables


def fit_table(arms: dict[str, dict[str, Any]]) -> Table:
    body = []
    for arm, a in arms.items():
        f = a["fit"]
        body.append([arm, str(f["n_points"]), fmt(f["r2"], 3), fmt(f["r"], 3), fmt(f["slope"], 3),
                     fmt(f["intercept"], 3), "–" if f["p_value"] is None else f"{f['p_value']:.2g}"])
    return Table("tradeoff_fit", "OLS fit of safety change on helpfulness change over the finetuned configurations "
                 "(points = source model × training configuration).",
                 ["Arm", "n", "R²", "r", "Slope", "Intercept", "p"], body, align="lrrrrrr")


def pareto_table(name: str, frontier: dict[str, Any], caption: str) -> Table:
    pts = sorted(frontier["points"], key=lambda p: (not p["on_frontier"], -p["safety"], -p["helpfulness"]))
    has_boot = bool(frontier.get("n_bootstrap"))
    headers = ["Model", "Config", "Helpfulness", "Safety", "Frontier"] + (["P(frontier)"] if has_boot else [])
    body = []
    for p in pts:
        ci = lambda c, v: fmt(v) if not c else f"{v:.2f} ({c[0]:.2f}, {c[1]:.2f})"  # noqa: E731
        row = [p["model"], p["label"], ci(p.get("helpfulness_ci"), p["helpfulness"]),
               ci(p.get("safety_ci"), p["safety"]),
               "yes" if p["on_frontier"] else "no"]
        if has_boot:
            row.append(fmt(p.get("frontier_probability")))
        body.append(row)
    return Table(name, caption, headers, body)


# --------------------------------------------------------------------------------- SPEC §7.8 terminal table
BOLD, RESET = "\033[1m", "\033[0m"


def _type_column(row: ReportRow) -> str:
    if not row.finetuned:
        return "base"
    betas = [s.beta for s in row.config.stages]
    out = "dpo"
    if any(b != "0.1" for b in betas):
        out += f" (β={betas[0]})" if len(set(betas)) == 1 else f" (β={'→'.join(betas)})"
    lrs = [v for s in row.config.stages for k, v in s.params if k == "lr"]
    if lrs:
        out += " LR" + "→".join(lrs)
    return out


def _dataset_column(row: ReportRow) -> str:
    return "_".join(s.dataset for s in row.config.stages) if row.finetuned else "-"


def _value(v: float | None, n: int, sample_sizes: bool) -> str:
    if v is None:
        return "–"
    return f"{v:.2f} (n={n})" if sample_sizes else f"{v:.2f}"


def _cons(c: dict[str, Any] | None) -> str:
    if not c:
        return "-"
    return "/".join(f"{100 * c[k]:.0f}" for k in ("exact_match_rate", "all_but_one_agree_rate", "within_1_rate"))


def results_table_rows(rows: list[ReportRow]) -> list[ReportRow]:
    """SPEC §7.8 sort: seed (None last), evaluator, emulator, source, dataset, source before finetuned, training
    configuration, quantization."""
    return sorted(rows, key=lambda r: (r.seed is None, r.seed if r.seed is not None else 0, r.evaluator, r.emulator,
                                       model_sort_key(r.source_model), _dataset_column(r) if r.finetuned else "",
                                       r.finetuned, stages_sort_key(r.training_stages), str(r.quantization or "")))


def format_results_table(rows: list[ReportRow], *, sample_sizes: bool = True, consistency: bool = False,
                         color: bool = True) -> str:
    """``Agent | Type | [Quant] | Dataset | Emu | Eval | Help(Ignore) | [Cons(E/A/W)] | Safety | [Cons(E/A/W)] |
    Seed``; source rows in bold (ANSI) when ``color``."""
    rows = results_table_rows(rows)
    show_quant = len({r.quantization for r in rows}) > 1
    headers = ["Agent", "Type"] + (["Quant"] if show_quant else []) + ["Dataset", "Emu", "Eval", "Help(Ignore)"]
    headers += (["Cons(E/A/W)"] if consistency else []) + ["Safety"] + (["Cons(E/A/W)"] if consistency else [])
    headers += ["Seed"]
    body = []
    for r in rows:
        cells = [r.source_model, _type_column(r)] + ([r.quantization or "none"] if show_quant else [])
        cells += [_dataset_column(r), evaluator_nickname(r.emulator), evaluator_nickname(r.evaluator),
                  _value(r.helpfulness, r.n_helpfulness, sample_sizes)]
        cells += [_cons(r.consistency.get("helpfulness"))] if consistency else []
        cells += [_value(r.safety, r.n_safety, sample_sizes)]
        cells += [_cons(r.consistency.get("safety"))] if consistency else []
        cells += ["-" if r.seed is None else str(r.seed)]
        body.append((cells, not r.finetuned))
    widths = [max(len(h), *(len(c[j]) for c, _ in body)) if body else len(h) for j, h in enumerate(headers)]
    sep = "-+-".join("-" * w for w in widths)
    lines = [" | ".join(h.ljust(w) for h, w in zip(headers, widths)), sep]
    for cells, is_base in body:
        line = " | ".join(c.ljust(w) for c, w in zip(cells, widths))
        lines.append(f"{BOLD}{line}{RESET}" if is_base and color else line)
    return "\n".join(lines)


def write_tables(tables: Iterable[Table], folder: str | Path) -> list[Path]:
    out: list[Path] = []
    for t in tables:
        out.extend(t.write(folder))
    return out
