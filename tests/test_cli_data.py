"""`agentpipe data check / fetch` and `split` through the real console script."""

import json
import shutil

import pytest

from pipeline.cli import main
from tests.conftest import run_agentpipe


def test_data_check_reads_everything_and_prints_counts(data_dir):
    r = run_agentpipe("data", "check", "--data-dir", str(data_dir))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "cases: 144" in out and "toolkits: 38 with 330 tools" in out
    assert "540 trajectory files, 1080 eval files" in out
    for evaluator in ("Qwen_Qwen3-32B", "gpt-5-mini"):
        assert f"evaluator {evaluator}: 3888 trajectories (0 failed)" in out
    assert out.count("agent_safe: 3888 evaluations, 0 without a score") == 2
    assert out.count("agent_help_ignore_safety: 3888 evaluations, 0 without a score") == 2
    assert "incomplete" not in out
    row = next(line for line in out.splitlines() if line.strip().startswith("Qwen_Qwen3-32Bnt "))
    assert row.split()[1:] == ["288", "288"]  # int4 + int8 files, one of them in a nested folder (gpt5m)


def test_data_check_demo_assets(capsys):
    assert main(["data", "check", "--cases", "demo"]) == 0
    assert "cases: 8" in capsys.readouterr().out


def _assert_one_line_error(r, *fragments):
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("agentpipe: error: ") and "Traceback" not in r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def _snapshot(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_malformed_case_file(tmp_path, data_dir):
    cases = json.loads((data_dir / "toolemu" / "all_cases.json").read_text())[:5]
    del cases[3]["Potential Risky Actions"]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    shutil.copy(data_dir / "toolemu" / "all_toolkits.json", tmp_path / "toolkits.json")
    before = _snapshot(tmp_path)
    r = run_agentpipe("data", "check", "--cases", str(tmp_path / "cases.json"))
    _assert_one_line_error(r, "cases.json: case 3 (official_3): field 'Potential Risky Actions': field required")
    assert _snapshot(tmp_path) == before


def test_case_file_that_is_not_json(tmp_path):
    (tmp_path / "cases.json").write_text('[{"name": "x",')
    (tmp_path / "toolkits.json").write_text("[]")
    _assert_one_line_error(run_agentpipe("data", "check", "--cases", str(tmp_path / "cases.json")),
                           "cases.json: not valid JSON at line 1")


def test_unknown_toolkit_name(tmp_path, data_dir):
    cases = json.loads((data_dir / "toolemu" / "all_cases.json").read_text())[:2]
    cases[1]["Toolkits"] = ["Gmail", "Teleporter"]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    shutil.copy(data_dir / "toolemu" / "all_toolkits.json", tmp_path / "toolkits.json")
    _assert_one_line_error(run_agentpipe("data", "check", "--cases", str(tmp_path / "cases.json")),
                           "case 1 (official_1): field 'Toolkits': unknown toolkit 'Teleporter'")


def _copy_run_file(released_runs, dest, folder="gpt-5-nano"):
    src = sorted((released_runs / "q32" / folder).glob("*_r0-15_*"))
    dest.mkdir(parents=True)
    for p in src:
        shutil.copy(p, dest / p.name)
    return sorted(dest.glob("*"))


def test_truncated_jsonl_line(tmp_path, released_runs):
    runs = tmp_path / "runs"
    files = _copy_run_file(released_runs, runs / "gpt-5-nano")
    traj = next(p for p in files if "_eval_" not in p.name)
    data = traj.read_bytes()
    traj.write_bytes(data[: len(data) - 500])  # cut inside the last record, as a crash would
    before = _snapshot(runs)
    r = run_agentpipe("data", "check", "--data-dir", str(released_runs.parent.parent), "--runs", str(runs))
    assert r.returncode == 2
    errors = r.stderr.strip().splitlines()
    assert any(f"{traj.name}: line 15 is truncated" in e for e in errors), r.stderr
    assert all(e.startswith("agentpipe: error: ") for e in errors) and "Traceback" not in r.stderr
    assert _snapshot(runs) == before


def test_ambiguous_seed_in_a_model_folder(tmp_path, released_runs):
    runs = tmp_path / "runs"
    files = _copy_run_file(released_runs, runs / "dpo_X_safe_q32_s0_help_q32_s1")
    for p in files:  # keep 3 lines: an incomplete range, so its seed is needed
        p.write_text("".join(p.read_text().splitlines(keepends=True)[:3]))
    r = run_agentpipe("data", "check", "--data-dir", str(released_runs.parent.parent), "--runs", str(runs))
    _assert_one_line_error(r, "ambiguous seed in 'dpo_X_safe_q32_s0_help_q32_s1'")


def test_split_command():
    r = run_agentpipe("split", "--seed", "0", "--json")
    assert r.returncode == 0
    got = json.loads(r.stdout)
    assert len(got["test"]) == 72 and got["test"][:5] == [0, 1, 7, 8, 9]


@pytest.mark.parametrize("cmd", [[], ["data"], ["data", "fetch"], ["data", "check"], ["split"]])
def test_help_on_every_command(cmd):
    r = run_agentpipe(*cmd, "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: agentpipe")


def test_data_fetch_from_a_local_folder(tmp_path, data_dir):
    dest = tmp_path / "data"
    r = run_agentpipe("data", "fetch", "--from", str(data_dir), "--data-dir", str(dest))
    assert r.returncode == 0, r.stderr
    assert "1622 files fetched and verified, 0 already present" in r.stdout
    assert (dest / "toolemu" / "all_cases.json").read_bytes() == (data_dir / "toolemu" / "all_cases.json").read_bytes()
    assert len([p for p in (dest / "paper" / "raw_data_by_eval").rglob("*.jsonl")]) == 1620
    again = run_agentpipe("data", "fetch", "--from", str(data_dir), "--data-dir", str(dest))
    assert "0 files fetched and verified, 1622 already present" in again.stdout
    # the fetched copy is a complete data directory
    assert main(["data", "check", "--data-dir", str(dest), "--no-runs"]) == 0


def test_data_fetch_rejects_a_corrupted_source(tmp_path, data_dir):
    src = tmp_path / "src"
    shutil.copytree(data_dir / "toolemu", src / "toolemu")
    with open(src / "toolemu" / "all_cases.json", "ab") as f:
        f.write(b" ")
    dest = tmp_path / "data"
    r = run_agentpipe("data", "fetch", "--from", str(src), "--data-dir", str(dest), "--only", "toolemu")
    _assert_one_line_error(r, "all_cases.json: sha256", "does not match the manifest")
    assert not (dest / "toolemu" / "all_cases.json").exists()
    assert [p.name for p in (dest / "toolemu").iterdir()] in (["all_toolkits.json"], [])  # no temp files left
