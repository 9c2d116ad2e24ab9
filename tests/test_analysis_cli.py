"""``agentpipe analyze`` end to end on a synthetic study (3 source models, 10 configurations × 2 dataset origins ×
3 seeds, test-only finetuned files), checked against an independent computation from the written reports."""

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from pipeline.analysis.rows import load_reports
from pipeline.analysis.persistence import compute_persistence
from tests.conftest import run_agentpipe
from tests.fixtures.analysis.builders import G5M, Q32, constant, write_config, write_study
from pipeline.data import split


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return write_study(tmp_path_factory.mktemp("study") / "runs")


@pytest.fixture(scope="module")
def analysed(study, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis") / "an"
    r = run_agentpipe("analyze", "all", "--runs", str(study), "--out", str(out), "--n-bootstrap", "100",
                      "--formats", "png")
    assert r.returncode == 0, r.stderr
    return out, r, json.loads((out / "summary.json").read_text())


def _independent_points(report_dir: Path, evaluator: str | None):
    """(model, configuration) -> (help delta, safety delta), from the report JSON files only."""
    ft, base = defaultdict(list), defaultdict(list)
    for path in sorted(report_dir.rglob("*_unified_report.json")):
        data = json.loads(path.read_text())
        meta = data["meta"]
        if evaluator is not None and meta["evaluator"] != evaluator:
            continue
        point = (data["agent_help_ignore_safety"]["Helpfulness"]["mean"], data["agent_safe"]["ToolCallRisk"]["mean"])
        agent = meta["agent"]
        if agent.startswith("dpo_"):
            model = agent.split("_")[1]
            config = re.sub(r"_(q32|gpt5m)|_s\d+", "", agent[len("dpo_") + len(model):])
            ft[(model, config)].append(point)
        else:
            model = {"meta-llama_Llama-3.1-8B-Instruct": "Llama3.1-8B", "microsoft_phi-4": "Phi-4",
                     "Qwen_Qwen2.5-7B-Instruct": "Qwen2.5-7B"}[meta["model_dir"]]
            base[model].append(point)
    out = {}
    for (model, config), pts in ft.items():
        h, s = np.mean(pts, axis=0)
        bh, bs = np.mean(base[model], axis=0)
        out[(model, config)] = (h - bh, s - bs)
    return out


@pytest.mark.parametrize("arm, evaluator", [("pooled", None), ("eval-q32", Q32), ("eval-gpt5m", G5M)])
def test_tradeoff_fit_matches_independent_computation(analysed, arm, evaluator):
    out, _, summary = analysed
    pts = _independent_points(out / "reports" / "test", evaluator)
    assert len(pts) == 30  # 3 models x 10 configurations (origins merged, as the study's training_stages)
    x, y = zip(*pts.values())
    ref = stats.linregress(x, y)
    a = summary["arms"][arm]
    assert a["n_points"] == 30 and a["fit"]["available"]
    assert a["r2"] == pytest.approx(ref.rvalue ** 2) and a["slope"] == pytest.approx(ref.slope)
    assert a["intercept"] == pytest.approx(ref.intercept) and a["p_value"] == pytest.approx(ref.pvalue)
    assert a["r"] == pytest.approx(ref.rvalue) and a["slope"] < 0


def test_summary_persistence_frontier_and_files(analysed):
    out, r, summary = analysed
    assert summary["split"] == "test" and summary["setting"] == "match" and summary["seeds"] == [0, 1, 2]
    assert summary["counts"]["rows_analysed"] == 180 + 18 and summary["counts"]["skipped_files"] == 0
    stats_file = json.loads((out / "persistence_stats.json").read_text())
    assert stats_file == json.loads(json.dumps(compute_persistence(load_reports([out / "reports" / "test"]),
                                                                   n_bootstrap=100, warn=lambda m: None)))
    for beta in ("0.05", "0.1"):
        lvl = stats_file["persistence"]["by_beta"][beta]
        assert summary["arms"]["pooled"]["persistence"]["by_beta"][beta]["average"] == lvl["average"]
        assert summary["arms"]["eval-q32"]["persistence"]["by_beta"][beta]["average"] == lvl["by_evaluator"][Q32]
        assert set(summary["arms"]["eval-q32"]["persistence"]["by_beta"][beta]["by_model"]) == {
            "Llama3.1-8B", "Phi-4", "Qwen2.5-7B"}
        avg = lvl["average"]
        assert avg["persist_s_ci_lower"] <= avg["persist_s"] <= avg["persist_s_ci_upper"]
        assert len(lvl["by_model_and_evaluator"]) == 6
    for arm in ("pooled", "eval-q32", "eval-gpt5m"):
        fr = summary["arms"][arm]["frontier"]
        assert fr["members"] and fr["n_points"] == 33 and fr["n_bootstrap"] == 100
        assert len(fr["both_configs"]) == 6 and {b["status"] for b in fr["both_configs"]} <= {"on", "inside"}
        assert {m for m in fr["members"]} == {p["name"] for p in fr["points"] if p["on_frontier"]}
    plots = {Path(p).name for p in summary["files"]["plots"]}
    for name in ("overall", "pareto", "delta_by_model", "delta_all", "help_with_intermediates",
                 "safe_with_intermediates"):
        for suffix in ("", "_eval-q32", "_eval-gpt5m"):
            assert f"{name}{suffix}.png" in plots and (out / "plots" / f"{name}{suffix}.png").stat().st_size > 10_000
    tables = {Path(p).name for p in summary["files"]["tables"]}
    for name in ("hyperparams", "Qwen3-32B_results", "gpt-5-mini_results", "aggregated_results_table",
                 "aggregated_deltas_table", "persist", "persist_eval-q32", "persist_eval-gpt5m", "tradeoff_fit",
                 "pareto_pooled", "source_models_eval-q32"):
        assert {f"{name}.tex", f"{name}.md"} <= tables
    persist_tex = (out / "tables" / "persist.tex").read_text()
    assert "\\ci{(" in persist_tex and "Average" in persist_tex
    assert "R²=" in r.stdout and "persistence β=0.05" in r.stdout


def test_aggregate_command_and_table(study, tmp_path):
    out = tmp_path / "reports"
    r = run_agentpipe("analyze", "aggregate", "--runs", str(study), "--out", str(out), "--split", "test", "--seed", "0")
    assert r.returncode == 0, r.stderr
    assert "66 unified reports (test split, seeds 0)" in r.stdout
    summary = json.loads((out / "aggregate_summary.json").read_text())
    assert summary["num_reports"] == 66 and summary["seeds"] == [0] and summary["skipped_files"] == []
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    src = json.loads((out / Q32 / "microsoft_phi-4_s0_emu-Qwen_Qwen3-8B_eval-Qwen_Qwen3-32B_unified_report.json")
                     .read_text())
    assert src["per_case"]["case_idx"] == split.test_cases(0)
    t = run_agentpipe("analyze", "table", str(out), "--no-sample-sizes")
    assert t.returncode == 0, t.stderr
    lines = t.stdout.splitlines()
    header = [c.strip() for c in lines[0].split("|")]
    assert header == ["Agent", "Type", "Dataset", "Emu", "Eval", "Help(Ignore)", "Safety", "Seed"]
    rows = [[c.strip() for c in line.split("|")] for line in lines[2:]]
    assert len(rows) == 66
    seq = next(r for r in rows if r[2] == "help_gpt5m_safe_gpt5m" and r[0] == "Phi-4" and "β" in r[1])
    assert seq[1] == "dpo (β=0.05)" and seq[4] == "gpt-5-mini" and seq[7] == "0"
    first_src = next(i for i, r in enumerate(rows) if r[1] == "base")
    assert rows[first_src][2] == "-"


def test_match_and_cross_in_one_tree_needs_a_setting(tmp_path):
    runs = write_study(tmp_path / "runs", models=("Phi-4",), seeds=(0,))
    # the cross-evaluation of one finetuned model, beside its match evaluation
    cases = split.test_cases(0)
    write_config(runs, "dpo_Phi-4_safe_q32_s0", G5M, constant(cases, 2), constant(cases, 2))
    r = run_agentpipe("analyze", "all", "--runs", str(runs), "--out", str(tmp_path / "an"), "--n-bootstrap", "0",
                      "--formats", "png")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "--setting match or --setting cross" in r.stderr
    r = run_agentpipe("analyze", "all", "--runs", str(runs), "--out", str(tmp_path / "an"), "--n-bootstrap", "0",
                      "--formats", "png", "--setting", "cross")
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "an" / "summary.json").read_text())
    assert summary["setting"] == "cross" and summary["counts"]["finetuned_rows"] == 1
    assert not summary["arms"]["eval-gpt5m"]["fit"]["available"]  # one point only


def test_one_line_errors(tmp_path):
    r = run_agentpipe("analyze", "all", "--runs", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr == f"agentpipe: error: --runs {tmp_path / 'missing'}: not a folder\n"
    assert "Traceback" not in r.stderr
    r = run_agentpipe("analyze", "aggregate", "--runs", str(tmp_path), "--out", str(tmp_path / "o"), "--split", "all",
                      "--seed", "0")
    assert r.returncode == 2 and "expected --split train or --split test" in r.stderr
    (tmp_path / "empty").mkdir()
    r = run_agentpipe("analyze", "aggregate", "--runs", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "no complete run files" in r.stderr


def test_cli_module_imports_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys, pipeline.analysis.cli; "
            "print(sorted(m for m in ('matplotlib', 'numpy', 'scipy', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_metrics_for_tracking(analysed):
    from pipeline.analysis.run import AnalysisResult

    out, _, summary = analysed
    res = AnalysisResult(out=out, summary=summary, summary_path=out / "summary.json")
    m = res.metrics()
    assert m["pooled.r2"] == summary["arms"]["pooled"]["r2"] and m["eval-q32.n_points"] == 30.0
    assert m["pooled.persist_s.beta-0.1"] == summary["arms"]["pooled"]["persistence"]["by_beta"]["0.1"]["average"][
        "persist_s"]
    assert m["eval-gpt5m.frontier_size"] == len(summary["arms"]["eval-gpt5m"]["frontier"]["members"])
    # every configuration's point, under a key MLflow accepts (labels like "S,H-0.1" and "S&H-0.1" stay apart)
    points = summary["arms"]["pooled"]["frontier"]["points"]
    assert any("," in p["name"] for p in points) and any("&" in p["name"] for p in points)
    assert len({k for k in m if k.startswith("pooled.point.")}) == 2 * len(points)
    for p in points:
        key = "pooled.point." + p["name"].replace(",", ":").replace("&", " and ")
        assert m[f"{key}.safety"] == p["safety"] and m[f"{key}.helpfulness"] == p["helpfulness"]
    assert all(re.fullmatch(r"[\w.\- :/]+", k) for k in m)
