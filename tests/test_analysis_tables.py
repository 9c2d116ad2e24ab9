"""Tables (SPEC §7.7) and the terminal results table (SPEC §7.8)."""

from pipeline.analysis.tables import Table, format_results_table, latex_escape, results_tables
from tests.fixtures.analysis.builders import G5M, Q32, SAFE_HELP, ft, make_row, source


def test_latex_and_markdown_rendering():
    t = Table("x_results", "Scores of S&H_1 (50%)", ["Model", "Config", "Safety"],
              [["Qwen3-8B", "S&H-0.1", "1.50"], ["Phi-4", "base", "2.00"]], rules_after=[0],
              latex_cells={(1, 2): r"2.00 \ci{(1.9, 2.1)}"})
    tex = t.to_latex()
    assert r"\begin{tabular}{llr}" in tex and r"S\&H-0.1" in tex and r"2.00 \ci{(1.9, 2.1)}" in tex
    assert r"\caption{Scores of S\&H\_1 (50\%)}" in tex and r"\label{tab:x-results}" in tex
    assert tex.count(r"\midrule") == 2
    md = t.to_markdown()
    assert "| Model | Config | Safety |\n|---|---|---:|\n| Qwen3-8B | S&H-0.1 | 1.50 |" in md
    assert latex_escape("β→0.1") == r"$\beta$$\rightarrow$0.1"


def test_results_table_per_evaluator_order_and_quant_column():
    rows = [source("Qwen2.5-7B", Q32, 0, 1.0, 2.0), ft("Qwen2.5-7B", SAFE_HELP, Q32, 0, 2.0, 2.5),
            ft("Qwen2.5-7B", (("help", "0.1"),), Q32, 0, 0.5, 3.0), source("Phi-4", Q32, 0, 2.0, 2.0),
            source("Phi-4", G5M, 0, 1.0, 1.0)]
    tables = {t.name: t for t in results_tables(rows)}
    assert set(tables) == {"Qwen3-32B_results", "gpt-5-mini_results"}
    q = tables["Qwen3-32B_results"]
    assert q.headers == ["Source Model", "Training Config", "Helpfulness", "Safety"]  # one quantization: no column
    assert q.rows == [["Phi-4", "base", "2.00", "2.00"], ["Qwen2.5-7B", "base", "2.00", "1.00"],
                      ["Qwen2.5-7B", "H-0.1", "3.00", "0.50"], ["Qwen2.5-7B", "S,H-0.1", "2.50", "2.00"]]


def test_terminal_results_table():
    base = source("Qwen2.5-7B", Q32, 0, 1.0, 2.0)
    mixed = make_row("dpo_Qwen2.5-7B_safe_q32_beta-0.05_s0_help_q32_s0", Q32, 2.0, 2.5, seed=0)
    lr = make_row("dpo_Qwen2.5-7B_help_q32_lr-1e-5_s0", Q32, 2.0, 2.5, seed=0)
    text = format_results_table([lr, mixed, base], color=True)
    lines = text.splitlines()
    header = [c.strip() for c in lines[0].split("|")]
    assert header == ["Agent", "Type", "Dataset", "Emu", "Eval", "Help(Ignore)", "Safety", "Seed"]
    assert lines[2].startswith("\033[1m") and "base" in lines[2]  # source row first and bold
    cells = [[c.strip() for c in line.replace("\033[1m", "").replace("\033[0m", "").split("|")] for line in lines[2:]]
    assert cells[0] == ["Qwen2.5-7B", "base", "-", "Qwen3-8B", "Qwen3-32B", "2.00 (n=72)", "1.00 (n=72)", "0"]
    types = {c[2]: c[1] for c in cells[1:]}
    assert types == {"safe_q32_help_q32": "dpo (β=0.05→0.1)", "help_q32": "dpo LR1e-5"}
    plain = format_results_table([base], color=False, sample_sizes=False)
    assert "\033[" not in plain and "2.00" in plain and "(n=" not in plain
