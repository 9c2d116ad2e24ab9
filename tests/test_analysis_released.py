"""The analysis on the study's released source-model data (SPEC §10.1): pinned means checked against an
independent computation straight from the eval records, and ``agentpipe analyze all`` on the q32 folder."""

import json
from collections import Counter
from pathlib import Path

import pytest

from pipeline.analysis.partition import partition
from pipeline.data.reports import collect_config_scores
from pipeline.analysis.rows import row_from_content
from tests.conftest import run_agentpipe

EVALUATOR = {"q32": "Qwen_Qwen3-32B", "gpt5m": "gpt-5-mini"}
# SPEC §11.1
TEST_SPLITS = {
    0: [0, 1, 7, 8, 9, 10, 11, 12, 18, 24, 26, 28, 30, 31, 33, 35, 39, 40, 41, 42, 45, 51, 55, 56, 57, 60, 61, 63, 64,
        66, 68, 69, 70, 71, 72, 77, 78, 80, 81, 85, 87, 90, 91, 92, 93, 94, 98, 102, 103, 105, 106, 107, 108, 112, 115,
        116, 117, 119, 122, 123, 124, 126, 128, 129, 130, 131, 133, 136, 137, 139, 140, 141],
    1: [0, 1, 2, 3, 4, 7, 12, 13, 15, 16, 23, 24, 27, 28, 29, 30, 34, 36, 37, 38, 40, 42, 44, 48, 50, 53, 54, 56, 58,
        63, 64, 65, 67, 68, 69, 70, 71, 75, 80, 82, 83, 86, 87, 89, 92, 93, 96, 97, 99, 101, 102, 104, 108, 110, 112,
        114, 115, 116, 117, 118, 120, 123, 124, 126, 131, 133, 134, 135, 136, 137, 138, 139],
}
# (arm, model folder, quantization, seed or None for all 144 cases) -> (mean safety, mean Help(Ignore))
PINNED = {
    ("q32", "Qwen_Qwen2.5-7B-Instruct", None, None): (1.465, 2.167),
    ("gpt5m", "Qwen_Qwen2.5-7B-Instruct", None, None): (1.076, 1.812),
    ("q32", "Qwen_Qwen2.5-7B-Instruct", None, 0): (1.542, 2.403),
    ("gpt5m", "Qwen_Qwen2.5-7B-Instruct", None, 0): (1.181, 1.792),
    ("q32", "gpt-5", None, None): (2.625, 2.493),
    ("gpt5m", "gpt-5", None, None): (2.285, 2.660),
    ("q32", "meta-llama_Llama-3.1-8B-Instruct", None, None): (1.389, 2.250),
    ("gpt5m", "meta-llama_Llama-3.1-8B-Instruct", None, None): (0.903, 2.056),
    ("q32", "microsoft_phi-4", None, 1): (1.694, 2.639),
    ("gpt5m", "Qwen_Qwen3-32Bnt", "int8", None): (1.097, 2.264),  # the files in the nested sub-folder
}


def independent_means(folder: Path, evaluator: str, quant: str | None, cases: list[int] | None):
    """Mean safety and Help(Ignore) computed directly from the JSONL files (no project code)."""
    sums = {"agent_safe": [], "agent_help_ignore_safety": []}
    for traj in sorted(folder.rglob("*.jsonl")):
        name = traj.name
        if "_eval_" in name or f"_eval-{evaluator}_" not in name:
            continue
        if (quant is None) == any(f"_{q}_" in name for q in ("int4", "int8")) or (quant and f"_{quant}_" not in name):
            continue
        case_idx = [json.loads(line)["case_idx"] for line in traj.read_text().splitlines() if line.strip()]
        for eval_type, key in (("agent_safe", "ToolCallRisk"), ("agent_help_ignore_safety", "Helpfulness")):
            evals = [json.loads(line) for line in traj.with_name(traj.stem + f"_eval_{eval_type}.jsonl")
                     .read_text().splitlines() if line.strip()]
            sums[eval_type] += [e["eval_scores"][key] for c, e in zip(case_idx, evals) if cases is None or c in cases]
    return (sum(sums["agent_safe"]) / len(sums["agent_safe"]),
            sum(sums["agent_help_ignore_safety"]) / len(sums["agent_help_ignore_safety"]), len(sums["agent_safe"]))


@pytest.fixture(scope="module")
def released_rows(released_runs):
    configs = collect_config_scores(released_runs).configs
    rows = {}
    for rep in partition(configs, "all").reports + partition(configs, "test", seeds=[0, 1, 2]).reports:
        row = row_from_content(rep.content, rep.filename)
        rows[(row.evaluator, rep.content["meta"]["model_dir"], row.quantization, row.seed)] = (row, rep.content)
    return rows


@pytest.mark.parametrize("key", list(PINNED), ids=lambda k: "-".join(map(str, k)))
def test_pinned_source_model_means(released_runs, released_rows, key):
    arm, folder, quant, seed = key
    row, _ = released_rows[(EVALUATOR[arm], folder, quant, seed)]
    safety, helpfulness, n = independent_means(released_runs / arm / folder, EVALUATOR[arm], quant,
                                               TEST_SPLITS[seed] if seed is not None else None)
    assert n == (72 if seed is not None else 144) == row.n_safety == row.n_helpfulness
    assert round(row.safety, 3) == round(safety, 3) == PINNED[key][0]
    assert round(row.helpfulness, 3) == round(helpfulness, 3) == PINNED[key][1]


def test_released_counts_and_score_distributions(released_rows):
    all_rows = [v for k, v in released_rows.items() if k[3] is None]
    assert len(all_rows) == 54 and {r.source_model for r, _ in all_rows}.__len__() == 25
    assert sum(1 for k in released_rows if k[3] is not None) == 54 * 3
    # SPEC §10.1: the released score distributions, summed over the reports' histograms
    expected = {("q32", "agent_safe"): [276, 1387, 1166, 1059],
                ("q32", "agent_help_ignore_safety"): [235, 329, 844, 2480],
                ("gpt5m", "agent_safe"): [959, 1317, 741, 871],
                ("gpt5m", "agent_help_ignore_safety"): [444, 362, 866, 2216]}
    for (arm, eval_type), counts in expected.items():
        total = Counter()
        for row, content in all_rows:
            if row.evaluator == EVALUATOR[arm]:
                block = next(iter(content[eval_type].values()))
                total.update(block["histogram"])
                assert block["missing_scores"] == 0 and block["total_evals"] == 144
        assert [total[f"{s}.0"] for s in range(4)] == counts


def test_analyze_all_on_released_q32_folder(released_runs, tmp_path):
    out = tmp_path / "an"
    r = run_agentpipe("analyze", "all", "--runs", str(released_runs / "q32"), "--out", str(out), "--n-bootstrap", "200")
    assert r.returncode == 0, r.stderr
    assert "frontier: gpt-5, gpt-5.1, Qwen3-14B, Qwen3-32B (int4)" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["split"] == "all" and summary["setting"] == "sources-only" and summary["seeds"] == [0, 1, 2]
    assert set(summary["arms"]) == {"eval-q32", "pooled"}
    arm = summary["arms"]["eval-q32"]
    assert arm["r2"] is None and not arm["fit"]["available"] and "source models only" in arm["fit"]["reason"]
    assert not arm["persistence"]["available"] and arm["persistence"]["reason"]
    assert arm["frontier"]["members"] == ["gpt-5", "gpt-5.1", "Qwen3-14B", "Qwen3-32B (int4)"]
    # the frontier, recomputed independently from the points' means
    pts = [(p["helpfulness"], p["safety"], p["name"]) for p in arm["frontier"]["points"]]
    assert len(pts) == 27
    brute = sorted(n for h, s, n in pts if not any(h2 >= h and s2 >= s and (h2, s2) != (h, s) for h2, s2, _ in pts))
    assert brute == sorted(arm["frontier"]["members"])
    gpt5 = next(p for p in arm["frontier"]["points"] if p["name"] == "gpt-5")
    assert round(gpt5["safety"], 3) == 2.625 and gpt5["safety_ci"][0] < 2.625 < gpt5["safety_ci"][1]
    sm = {(e["model"], e["quantization"]): e for e in summary["source_models"]}
    assert round(sm[("Qwen2.5-7B", None)]["test"]["0"]["safety"], 3) == 1.542
    for name in ("pareto", "pareto_eval-q32", "overall", "overall_eval-q32"):
        for ext in ("png", "pdf"):
            assert (out / "plots" / f"{name}.{ext}").stat().st_size > 10_000
    assert (out / "plots" / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(summary["skipped_plots"]) >= {"delta_by_model", "delta_by_model_eval-q32"}
    for name in ("source_models_eval-q32", "Qwen3-32B_results", "pareto_eval-q32", "hyperparams"):
        assert (out / "tables" / f"{name}.tex").read_text().startswith("\\begin{table}")
        assert (out / "tables" / f"{name}.md").is_file()
    md = (out / "tables" / "source_models_eval-q32.md").read_text()
    assert "| Qwen2.5-7B | none | 1.465 | 1.542 |" in md and "| gpt-5 | none | 2.625 |" in md
    assert sorted(str(p) for p in (out / "plots").iterdir()) == sorted(summary["files"]["plots"])


def test_analyze_table_on_released_folder(released_runs):
    r = run_agentpipe("analyze", "table", "--runs", str(released_runs / "q32"), "--split", "test", "--seed", "0")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [c.strip() for c in lines[0].split("|")] == ["Agent", "Type", "Quant", "Dataset", "Emu", "Eval",
                                                         "Help(Ignore)", "Safety", "Seed"]
    row = next(line for line in lines if line.startswith("Qwen2.5-7B "))
    cells = [c.strip() for c in row.split("|")]
    assert cells[:2] == ["Qwen2.5-7B", "base"] and "2.40 (n=72)" in cells and "1.54 (n=72)" in cells
    assert cells[-1] == "0"
    assert len(lines) == 2 + 27


#: SPEC §10.1's score distributions (0/1/2/3) of the 3,888 released trajectories, per arm and metric
DISTRIBUTIONS = {("q32", "safe"): [276, 1387, 1166, 1059], ("q32", "help_ignore_safety"): [235, 329, 844, 2480],
                 ("gpt5m", "safe"): [959, 1317, 741, 871], ("gpt5m", "help_ignore_safety"): [444, 362, 866, 2216]}


def test_judge_agreement_of_the_two_arms_on_the_released_trajectories(released_runs, tmp_path):
    """q32 vs gpt5m on the same 3,888 trajectories: the per-judge means follow from SPEC §10.1's distributions, and
    kappa = (p_o - p_e) / (1 - p_e) with p_e from those distributions (computed here, not by the code)."""
    from tests.conftest import run_agentpipe

    out = tmp_path / "agreement.json"
    r = run_agentpipe("analyze", "agreement", "--a", str(released_runs / "q32"), "--b", str(released_runs / "gpt5m"),
                      "--out", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    for metric, m in result["metrics"].items():
        a, b = DISTRIBUTIONS[("q32", metric)], DISTRIBUTIONS[("gpt5m", metric)]
        n = sum(a)
        assert (m["n"], m["only_a"], m["only_b"]) == (n, 0, 0)
        assert m["mean_a"] == pytest.approx(sum(i * c for i, c in enumerate(a)) / n, abs=1e-4)
        assert m["mean_b"] == pytest.approx(sum(i * c for i, c in enumerate(b)) / n, abs=1e-4)
        p_e = sum(x * y for x, y in zip(a, b)) / n**2
        assert m["kappa"] == pytest.approx((m["exact_agreement"] - p_e) / (1 - p_e), abs=2e-3)
    assert "safe: n=3888 exact=0.505 kappa=0.334 kappa_quadratic=0.605" in r.stdout
