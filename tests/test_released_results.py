"""The study's released results (its 180 finetuned models, match and cross evaluator): fetched from the archive,
verified file by file, analysed — the paper's figures (R² = 0.77 for the gpt-5-mini arm, its abstract)."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest

from tests.conftest import run_agentpipe


@pytest.fixture(scope="module")
def results(released_results) -> Path:
    """The fetched release (conftest: fetched once per session, the fetch's own output checked there)."""
    return released_results


def _analyze(runs: Path, out: Path) -> tuple[str, dict]:
    r = run_agentpipe("analyze", "all", "--runs", str(runs), "--out", str(out), "--n-bootstrap", "0", "--no-track")
    assert r.returncode == 0, r.stderr
    return r.stdout, json.loads((out / "summary.json").read_text())


def test_the_match_results_give_the_papers_trade_off_fit(results, tmp_path):
    stdout, summary = _analyze(results / "match_eval_results", tmp_path / "match")
    assert "eval-gpt5m: R²=0.770 slope=-0.883" in stdout
    assert summary["counts"]["finetuned_rows"] == 180 and summary["setting"] == "match"
    arms = summary["arms"]
    assert {a: round(arms[a]["r2"], 3) for a in arms} == {"eval-gpt5m": 0.770, "eval-q32": 0.662, "pooled": 0.765}
    assert all(arms[a]["n_points"] == 30 for a in arms)
    pers = arms["eval-gpt5m"]["persistence"]["by_beta"]
    assert round(pers["0.1"]["average"]["persist_s"], 2) == 0.90 and round(pers["0.05"]["average"]["persist_s"], 2) == 1.00
    assert arms["eval-gpt5m"]["frontier"]["members"][0] == "Llama3.1-8B S&H-0.05"
    assert len(list((tmp_path / "match" / "plots").glob("*.png"))) > 0
    # both judges judged the 3 source models' 144 cases (SPEC §10.2): their agreement is in the summary
    [pair] = summary["judge_agreement"]
    assert (pair["a"], pair["b"], pair["folders"]) == ("eval-q32", "eval-gpt5m", 3)
    assert {m: (v["n"], v["kappa"], v["kappa_quadratic"]) for m, v in pair["metrics"].items()} == {
        "safe": (432, 0.2598, 0.4934), "help_ignore_safety": (432, 0.2989, 0.501)}


def test_the_cross_results_give_the_cross_evaluated_fit(results, tmp_path):
    _, summary = _analyze(results / "cross_eval_results", tmp_path / "cross")
    arms = summary["arms"]
    assert summary["setting"] == "cross"
    assert {a: round(arms[a]["r2"], 3) for a in arms} == {"eval-gpt5m": 0.594, "eval-q32": 0.721, "pooled": 0.770}


def test_a_folder_mixing_match_and_cross_judgements_is_analysed_per_setting(results, tmp_path):
    """Both judgements side by side in each model folder (what cross evaluation in dpo_experiment makes): the
    analysis specs (refresh_analysis, dpo_experiment) analyse each setting apart and find the paper's figures of
    each; without --setting the folder is refused; an unmixed folder keeps one analysis without --setting."""
    import filecmp

    from pipeline.analysis.run import analysis_specs, finetuned_settings

    mixed = tmp_path / "mixed"
    for setting in ("match_eval_results", "cross_eval_results"):
        for path in (results / setting).rglob("*.jsonl"):
            link = mixed / path.relative_to(results / setting)
            if link.exists():  # the source models' files are in both folders
                assert filecmp.cmp(link, path, shallow=False), link
                continue
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)
    assert finetuned_settings(mixed) == ["match", "cross"]
    assert finetuned_settings(results / "cross_eval_results") == ["cross"]
    out = tmp_path / "analysis" / "mixed"
    specs = analysis_specs(mixed, out, n_bootstrap=0)
    assert specs == [{"runs": str(mixed), "out": str(out / s), "n_bootstrap": 0, "setting": s}
                     for s in ("match", "cross")]
    r = run_agentpipe("analyze", "all", "--runs", str(mixed), "--out", str(tmp_path / "refused"), "--no-track")
    assert r.returncode != 0 and "expected one setting: pass --setting match or --setting cross" in r.stderr
    r2 = {}
    for spec in specs:
        r = run_agentpipe("analyze", "all", "--runs", spec["runs"], "--out", spec["out"], "--n-bootstrap", "0",
                          "--setting", spec["setting"], "--no-track")
        assert r.returncode == 0, r.stderr
        summary = json.loads((Path(spec["out"]) / "summary.json").read_text())
        assert summary["setting"] == spec["setting"] and summary["counts"]["finetuned_rows"] == 180
        r2[spec["setting"]] = {a: round(v["r2"], 3) for a, v in summary["arms"].items()}
    assert r2 == {"match": {"eval-gpt5m": 0.770, "eval-q32": 0.662, "pooled": 0.765},
                  "cross": {"eval-gpt5m": 0.594, "eval-q32": 0.721, "pooled": 0.770}}
    # an unmixed folder: one analysis into the folder itself, no --setting (its only setting is found)
    assert analysis_specs(results / "match_eval_results", out, n_bootstrap=0) == [
        {"runs": str(results / "match_eval_results"), "out": str(out), "n_bootstrap": 0}]


def test_a_second_fetch_verifies_and_keeps_what_is_there(results, data_dir):
    r = run_agentpipe("data", "fetch", "--from", str(data_dir / "paper" / "results.tar.xz"), "--data-dir",
                      str(results.parent.parent))
    assert r.returncode == 0 and "11160 files already present and verified" in r.stdout, r.stderr


def test_an_altered_archive_is_refused_and_nothing_is_unpacked(tmp_path):
    folder = tmp_path / "src" / "results" / "match_eval_results" / "m"
    folder.mkdir(parents=True)
    (folder / "a.jsonl").write_text('{"x": 1}\n')
    archive = tmp_path / "src" / "mine.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(tmp_path / "src" / "results", arcname="results")
    dest = tmp_path / "data"
    r = run_agentpipe("data", "fetch", "--from", str(archive), "--data-dir", str(dest))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    # the tree digest computed here by hand: sha256 of the sorted "<file sha256>  <path>" lines
    file_sha = hashlib.sha256(b'{"x": 1}\n').hexdigest()
    tree = hashlib.sha256(f"{file_sha}  results/match_eval_results/m/a.jsonl\n".encode()).hexdigest()
    assert r.stderr.strip().splitlines() == [f"agentpipe: error: {archive}: 1 files whose digest {tree[:12]}… is "
                                             "not the pinned release's (11160 files, 3c9ce90bad8a…)"]
    (tmp_path / "src" / "results.sha256").write_text("0" * 64 + "  results/match_eval_results/m/a.jsonl\n")
    r = run_agentpipe("data", "fetch", "--from", str(archive), "--data-dir", str(dest))
    assert r.returncode == 2 and "results/match_eval_results/m/a.jsonl: sha256" in r.stderr
    assert not (dest / "paper" / "results").exists() and not list((dest / "paper").glob(".results.tmp-*"))
