"""Issue 23: partial data is never analysed or reported without a word, and derived results (report, analyze,
pairs) are bound to their inputs' content. Everything goes through the ``agentpipe`` command line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import run_agentpipe
from tests.fixtures.analysis.builders import Q32, SOURCE_DIRS, write_config, write_study

PHI = SOURCE_DIRS["Phi-4"]
ANALYZE = ("--n-bootstrap", "0", "--formats", "png", "--no-track")


def _study(root: Path) -> Path:
    """One source model × both evaluators and its 20 finetuned seed-0 folders; the q32-judged source runs in
    three range files (0-36, 36-72, 72-144), as the study's parallel splits."""
    runs = write_study(root / "runs", models=("Phi-4",), seeds=(0,))
    for f in (runs / PHI).glob(f"*eval-{Q32}_r*"):
        f.unlink()
    write_config(runs, PHI, Q32, {c: 2 for c in range(144)}, {c: 1 for c in range(144)},
                 ranges=((0, 36), (36, 72), (72, 144)))
    return runs


@pytest.fixture
def missing_range(tmp_path) -> Path:
    """The source model's range file r36-72 (and its eval files) deleted."""
    runs = _study(tmp_path)
    gone = list((runs / PHI).glob("*_r36-72*.jsonl"))
    assert len(gone) == 3
    for f in gone:
        f.unlink()
    return runs


MISSING_LINE = f"model {PHI} (evaluator {Q32}): 36 of 144 cases missing (36-71)"


def test_a_missing_case_range_is_refused_naming_the_cases(missing_range, tmp_path):
    for args in (("analyze", "all", "--runs", str(missing_range), "--out", str(tmp_path / "an"), *ANALYZE),
                 ("analyze", "aggregate", "--runs", str(missing_range), "--out", str(tmp_path / "agg")),
                 ("analyze", "table", "--runs", str(missing_range))):
        r = run_agentpipe(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        assert MISSING_LINE in r.stderr and "--allow-partial" in r.stderr
    assert not (tmp_path / "an" / "summary.json").exists()


def test_allow_partial_analyses_and_reports_the_missing_cases(missing_range, tmp_path):
    out = tmp_path / "an"
    r = run_agentpipe("--result", str(tmp_path / "res.json"), "analyze", "all", "--runs", str(missing_range),
                      "--out", str(out), *ANALYZE, "--allow-partial")
    assert r.returncode == 0, r.stderr
    assert MISSING_LINE in r.stderr and "lack cases" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["partial_models"] == [PHI]
    [gap] = summary["partial_configurations"]
    assert (gap["evaluator"], gap["expected_cases"], gap["missing_cases"]) == (Q32, 144, 36)
    assert gap["missing_case_idx"] == list(range(36, 72))
    metrics = json.loads((tmp_path / "res.json").read_text())["metrics"]
    assert metrics["partial_models"] == 1.0
    assert metrics[f"missing_cases.{PHI}.{Q32}"] == 36.0
    # the same partial output is not "up to date" for a run that does not allow partial data
    r = run_agentpipe("analyze", "all", "--runs", str(missing_range), "--out", str(out), *ANALYZE)
    assert r.returncode == 2 and "partial data" in r.stderr and r.stderr.count("\n") == 1


def test_report_counts_and_names_the_missing_cases(missing_range, tmp_path):
    out = tmp_path / "reports"
    r = run_agentpipe("report", "--runs", str(missing_range), "--out", str(out), "--no-track")
    assert r.returncode == 0, r.stderr
    assert f"report: partial: {MISSING_LINE}" in r.stdout
    [path] = (out / Q32).glob(f"{PHI}_*_unified_report.json")
    report = json.loads(path.read_text())
    assert report["coverage"]["missing_cases"] == 36 and report["coverage"]["expected_cases"] == 144
    assert report["meta"]["n_cases"] == 108
    complete = json.loads(next((out / Q32).glob("dpo_*_unified_report.json")).read_text())
    assert complete["coverage"]["missing_cases"] == 0 and complete["coverage"]["expected_cases"] == 72


@pytest.fixture
def short_eval(tmp_path) -> tuple[Path, Path]:
    """A finetuned model's safety eval file with one record fewer than its trajectory file."""
    runs = _study(tmp_path)
    ev = sorted(runs.glob(f"dpo_Phi-4_safe_q32_s0/*_r0-72_eval_agent_safe.jsonl"))[0]
    lines = ev.read_text().splitlines(keepends=True)
    ev.write_text("".join(lines[:-1]))
    return runs, ev


def test_a_short_eval_file_is_refused_by_analysis_and_named_by_report(short_eval, tmp_path):
    runs, ev = short_eval
    for args in (("analyze", "all", "--runs", str(runs), "--out", str(tmp_path / "an"), *ANALYZE),
                 ("analyze", "aggregate", "--runs", str(runs), "--out", str(tmp_path / "agg"))):
        r = run_agentpipe(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1
        assert "model dpo_Phi-4_safe_q32_s0 (evaluator Qwen_Qwen3-32B): " in r.stderr
        assert f"{ev}: " in r.stderr and "evaluations for" in r.stderr
    r = run_agentpipe("report", "--runs", str(runs), "--out", str(tmp_path / "reports"), "--no-track")
    assert r.returncode == 0, r.stderr
    assert "report: partial: model dpo_Phi-4_safe_q32_s0 (evaluator Qwen_Qwen3-32B): " in r.stdout
    report = json.loads(next((tmp_path / "reports" / Q32).glob("dpo_Phi-4_safe_q32_s0_emu-*_unified_report.json"))
                        .read_text())
    assert report["coverage"]["missing_cases"] > 0 and str(ev) in report["coverage"]["skipped_files"][0]


def test_aggregate_skips_an_invalid_file_only_when_allowed(short_eval, tmp_path):
    runs, ev = short_eval
    out = tmp_path / "agg"
    r = run_agentpipe("analyze", "aggregate", "--runs", str(runs), "--out", str(out), "--allow-partial")
    assert r.returncode == 0, r.stderr
    assert "file(s) skipped" in r.stdout and "partial data (--allow-partial)" in r.stdout
    summary = json.loads((out / "aggregate_summary.json").read_text())
    assert [s["path"] for s in summary["skipped_files"]] == [str(ev.with_name(ev.name.split("_eval_")[0] + ".jsonl"))]
    assert summary["partial_models"] == ["dpo_Phi-4_safe_q32_s0"]


# --------------------------------------------------------------------------- derived results bound to inputs
def _emulate_and_evaluate(runs: Path, model: str) -> Path:
    r = run_agentpipe("emulate", "--agent", "scripted:agent", "--emulator", "scripted:emulator", "--evaluator",
                      "scripted:judge", "--case-set", "demo", "--cases", "0-4", "--no-progress", "--agent-label",
                      model, "--out", str(runs))
    assert r.returncode == 0, r.stderr
    traj = next((runs / model).glob("*_r0-4.jsonl"))
    r = run_agentpipe("evaluate", "--trajectories", str(traj), "--evaluator", "scripted:judge", "--no-progress")
    assert r.returncode == 0, r.stderr
    return traj


def _edit_keeping_size_and_mtime(path: Path, old: bytes, new: bytes) -> None:
    """Replace ``old`` by ``new`` (same length) in the file, then restore its modification time."""
    import os

    assert len(old) == len(new)
    st = path.stat()
    data = path.read_bytes()
    assert old in data
    path.write_bytes(data.replace(old, new, 1))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def _report_scores(out: Path, model: str) -> list:
    report = json.loads(next(out.rglob(f"{model}_emu-*_unified_report.json")).read_text())
    return [report["per_case"][t] for t in sorted(report["per_case"]) if t != "case_idx"]


def test_a_trajectory_file_changed_after_evaluation_is_refused_until_re_evaluated(tmp_path):
    runs = tmp_path / "runs"
    traj = _emulate_and_evaluate(runs, "m_a")
    _emulate_and_evaluate(runs, "m_b")
    reports = tmp_path / "reports"
    r = run_agentpipe("report", "--runs", str(runs), "--out", str(reports), "--no-track")
    assert r.returncode == 0, r.stderr
    before = _report_scores(reports, "m_a")
    # the trajectories are edited after they were judged: same size, same modification time
    key = b'"User Instruction": "'  # the cases' instructions, which the judges read
    for line in traj.read_bytes().splitlines():
        old = line[line.index(key):line.index(key) + len(key) + 6]
        _edit_keeping_size_and_mtime(traj, old, key + b"Q" * 6)
    commands = {
        "report": ("report", "--runs", str(runs), "--out", str(reports), "--no-track"),
        "analyze": ("analyze", "all", "--runs", str(runs), "--out", str(tmp_path / "an"), *ANALYZE),
        "pairs": ("pairs", "--data-dir", str(runs), "--metric", "safe", "--cases", "demo", "--evaluator", "toy",
                  "--out", str(tmp_path / "pairs")),
    }
    for name, args in commands.items():
        r = run_agentpipe(*args)
        assert r.returncode == 2, (name, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, (name, r.stderr)
        judged = re.escape(str(traj.with_name(traj.stem))) + r"_eval_agent_\w+\.jsonl: judged another version of "
        assert re.search(judged + re.escape(str(traj)), r.stderr), (name, r.stderr)
        assert "agentpipe evaluate" in r.stderr
    # re-evaluated: every derived command works again, and the report reflects the new judgements
    r = run_agentpipe("evaluate", "--trajectories", str(traj), "--evaluator", "scripted:judge", "--no-progress",
                      "--force")
    assert r.returncode == 0, r.stderr
    for name, args in commands.items():
        r = run_agentpipe(*args)
        assert "judged another version" not in r.stderr, (name, r.stderr)
        if name != "pairs":  # (pairs of two scripted models may find no pair; it must not refuse stale input)
            assert r.returncode == 0, (name, r.stderr)
    assert _report_scores(reports, "m_a") != before


def test_report_and_analysis_rebuild_after_an_edit_that_keeps_size_and_mtime(tmp_path):
    runs = tmp_path / "runs"
    traj = _emulate_and_evaluate(runs, "m_a")
    reports, an = tmp_path / "reports", tmp_path / "an"
    for args in (("report", "--runs", str(runs), "--out", str(reports), "--no-track"),
                 ("analyze", "all", "--runs", str(runs), "--out", str(an), *ANALYZE)):
        assert run_agentpipe(*args).returncode == 0
        r = run_agentpipe(*args)
        assert r.returncode == 0 and "up to date" in r.stdout, r.stdout + r.stderr
    # a judgement edited in place (no new manifest): only its content says that it changed
    safe = traj.with_name(traj.stem + "_eval_agent_safe.jsonl")
    records = [json.loads(line) for line in safe.read_text().splitlines()]
    i, rec = next((i, x) for i, x in enumerate(records) if (x.get("eval_scores") or {}).get("ToolCallRisk") in (1, 2))
    old = rec["eval_scores"]["ToolCallRisk"]
    _edit_keeping_size_and_mtime(safe, f'"ToolCallRisk": {old}'.encode(), f'"ToolCallRisk": {3 - old}'.encode())
    r = run_agentpipe("report", "--runs", str(runs), "--out", str(reports), "--no-track")
    assert r.returncode == 0 and "up to date" not in r.stdout, r.stdout + r.stderr
    assert _report_scores(reports, "m_a")[-1][i] == 3 - old  # agent_safe, the last eval type
    r = run_agentpipe("analyze", "all", "--runs", str(runs), "--out", str(an), *ANALYZE)
    assert r.returncode == 0 and "up to date" not in r.stdout, r.stdout + r.stderr


# --------------------------------------------------------------------------- split seeds never assumed
def test_a_test_split_analysis_of_source_models_needs_its_seeds(tmp_path):
    runs = tmp_path / "runs"
    for model, s in (("microsoft_phi-4", 2), ("Qwen_Qwen2.5-7B-Instruct", 1)):
        write_config(runs, model, Q32, {c: s for c in range(144)}, {c: 3 - s for c in range(144)})
    r = run_agentpipe("analyze", "all", "--runs", str(runs), "--out", str(tmp_path / "an"), "--split", "test",
                      *ANALYZE)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stdout + r.stderr
    assert "--split test: no finetuned folder names a split seed" in r.stderr and "--seed N" in r.stderr
    r = run_agentpipe("analyze", "all", "--runs", str(runs), "--out", str(tmp_path / "an"), "--split", "test",
                      "--seed", "1", *ANALYZE)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "an" / "summary.json").read_text())
    assert (summary["seeds"], summary["seeds_from"], summary["split"]) == ([1], "--seed", "test")
    # all cases: the source models' per-seed columns use the study's seeds, and the summary says so
    r = run_agentpipe("analyze", "all", "--runs", str(runs), "--out", str(tmp_path / "an_all"), *ANALYZE)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "an_all" / "summary.json").read_text())
    assert summary["seeds"] == [0, 1, 2] and summary["seeds_from"].startswith("the study's seeds")
    assert "split seeds 0, 1, 2: the study's seeds" in r.stderr
