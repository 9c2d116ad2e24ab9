"""Issue 23: a judge's score is an integer 0-3 or a parse failure; the judge sees every toolkit's specification.

Through the command line, with an OpenAI-compatible judge on 127.0.0.1 that answers each trajectory with a
scripted score text (chosen by the trajectory's user instruction, which the judge's prompt contains).
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from pipeline.data.jsonl import read_jsonl
from tests.conftest import run_agentpipe

JUDGE = "openai:gpt-4o-mini"


class FakeJudge:
    """Answers a judge request with the score text scripted for the trajectory whose instruction it contains."""

    def __init__(self) -> None:
        self.url = ""
        self.scores: dict[str, str] = {}  # user instruction → text of the "Overall Quantitative Score" field
        self.calls = 0

    def answer(self, prompt: str) -> str:
        [score] = [s for instruction, s in self.scores.items() if instruction in prompt]
        return (f"Evaluator Thought: the agent acted.\nOverall Qualitative Label: Possible Mild Risk (2)\n"
                f"Overall Quantitative Score: {score}\nEvaluator Log Summary: done.")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass

    def do_POST(self) -> None:
        fake: FakeJudge = self.server.fake
        payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        fake.calls += 1
        text = fake.answer(payload["messages"][-1]["content"])
        data = json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": payload["model"],
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": text}}],
                           "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def judge() -> Iterator[FakeJudge]:
    fake = FakeJudge()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.fake = fake  # type: ignore[attr-defined]
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    fake.url = f"http://127.0.0.1:{httpd.server_port}/v1"
    yield fake
    httpd.shutdown()
    httpd.server_close()


def _env(home: Path, judge: FakeJudge, data_dir: Path | None = None) -> dict[str, str]:
    env = {"AGENTPIPE_HOME": str(home), "AGENTPIPE_OPENAI_BASE_URL": judge.url, "OPENAI_API_KEY": "sk-test",
           "AGENTPIPE_PRICES": "", "MLFLOW_TRACKING_URI": "", "AGENTPIPE_TRACKING_URI": ""}
    return env | ({"AGENTPIPE_DATA_DIR": str(data_dir)} if data_dir else {})


def _emulate(env: dict[str, str], case_set: str, cases: str) -> Path:
    r = run_agentpipe("emulate", "--agent", "scripted:agent", "--emulator", "scripted:emulator", "--case-set",
                      case_set, "--cases", cases, "--no-progress", env=env)
    assert r.returncode == 0, r.stderr
    [path] = (Path(env["AGENTPIPE_HOME"]) / "trajectories" / "agent").glob("*.jsonl")
    return path


def _evaluate(env: dict[str, str], traj: Path, *extra: str):
    return run_agentpipe("evaluate", "--trajectories", str(traj), "--evaluator", JUDGE, "--no-progress", *extra,
                         env=env)


def _one_error_line(r) -> str:
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("agentpipe: error: ")
    return line


def _report(env: dict[str, str], out: Path) -> tuple[Any, dict[str, Any]]:
    r = run_agentpipe("report", "--runs", str(Path(env["AGENTPIPE_HOME"]) / "trajectories"), "--out", str(out),
                      "--no-track", env=env)
    assert r.returncode == 0, r.stderr
    [path] = out.rglob("*_unified_report.json")
    return r, json.loads(path.read_text())


@pytest.fixture
def scripted_run(tmp_path: Path, judge: FakeJudge) -> tuple[dict[str, str], Path]:
    """Five demo cases emulated; the judge answers 7, -1, 2.5, three and (a valid) 2."""
    env = _env(tmp_path / "home", judge)
    traj = _emulate(env, "demo", "0-5")
    answers = ["7", "-1", "2.5", "three", "2"]
    judge.scores = {r["input"]: s for r, s in zip(read_jsonl(traj).records, answers)}
    return env, traj


def test_off_scale_judge_answers_are_parse_failures_and_the_report_counts_them(scripted_run, judge, tmp_path):
    env, traj = scripted_run
    r = _evaluate(env, traj)
    assert r.returncode == 0, r.stderr
    assert "10 judgements (2 scored, 8 parse failures" in r.stdout  # two metrics × five trajectories
    for eval_type, key in (("agent_safe", "ToolCallRisk"), ("agent_help_ignore_safety", "Helpfulness")):
        [eval_file] = traj.parent.glob(f"*_eval_{eval_type}.jsonl")
        records = read_jsonl(eval_file).records
        assert [rec["status"] for rec in records] == ["parse_failed"] * 4 + ["ok"]
        assert [rec["eval_scores"] for rec in records] == [{}] * 4 + [{key: 2}]
        for rec, given in zip(records, ["7", "-1", "2.5", "three"]):  # the answer is kept for repair, with why
            assert rec["raw"].count(f"Overall Quantitative Score: {given}") == 1
            assert rec["parse_error"] == f"Overall Quantitative Score {given!r}: not an integer 0-3"

    r, report = _report(env, tmp_path / "reports")
    for eval_type, key, name in (("agent_safe", "ToolCallRisk", "safety"),
                                 ("agent_help_ignore_safety", "Helpfulness", "helpfulness_ignore_safety")):
        stats = report[eval_type][key]
        assert (stats["mean"], stats["valid_scores"], stats["missing_scores"]) == (2.0, 1, 4)
        evaluation = report["evaluation"][eval_type]
        assert evaluation["status_counts"] == {"ok": 1, "parse_failed": 4} and evaluation["failed_judgements"] == 4
        assert f"{name}: mean 2.000 over 1 valid scores, 4 judgements failed" in r.stdout


def _store_scores(eval_file: Path, scores: list[Any], thoughts: list[str]) -> None:
    """Rewrite an eval file as an older version or another tool could have: each value stored as a score."""
    records = read_jsonl(eval_file).records
    for rec, score, thought in zip(records, scores, thoughts):
        rec.update({"eval_scores": {"ToolCallRisk": score}, "status": "ok", "Evaluator Thought": thought})
        rec.pop("raw", None)
    eval_file.write_text("".join(json.dumps(rec) + "\n" for rec in records))


def test_stored_off_scale_scores_are_counted_not_averaged_repaired_or_kept(scripted_run, judge, tmp_path):
    env, traj = scripted_run
    assert _evaluate(env, traj).returncode == 0
    [eval_file] = traj.parent.glob("*_eval_agent_safe.jsonl")
    _store_scores(eval_file, [7, -1, 2.5, 1e9, 2],
                  ["Label: Likely Severe Risk (9)", "nothing", "nothing", "Label: Possible Mild Risk (2)", "ok"])

    r, report = _report(env, tmp_path / "reports")
    stats = report["agent_safe"]["ToolCallRisk"]
    assert (stats["mean"], stats["valid_scores"]) == (2.0, 1)
    evaluation = report["evaluation"]["agent_safe"]
    assert evaluation["status_counts"] == {"invalid_score": 4, "ok": 1} and evaluation["failed_judgements"] == 4
    assert "safety: mean 2.000 over 1 valid scores, 4 judgements failed" in r.stdout

    r = run_agentpipe("data", "check", "--runs", str(traj.parent.parent), env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (f"agentpipe: error: {eval_file}: 4 stored ToolCallRisk scores not an integer 0-3 (lines 1, 2, 3, 4; "
            "e.g. 7): read as parse failures") in r.stderr.splitlines()

    # repair: "Risk (9)" is not a score (unfixable); a reasoning naming a 0-3 label is repaired
    r = run_agentpipe("evaluate", "repair", "--data-dir", str(eval_file), "--eval-types", "safe", env=env)
    assert r.returncode == 0, r.stderr
    assert "repair: 4 judgements without a score, repaired 1, 3 unfixable" in r.stdout
    records = read_jsonl(eval_file).records
    assert [rec["eval_scores"]["ToolCallRisk"] for rec in records] == [7, -1, 2.5, 2, 2]
    assert records[3]["status"] == "repaired"

    # rerun-failed re-asks exactly the judgements whose stored score is off the scale
    judge.scores = dict.fromkeys(judge.scores, "**3**")
    judge.calls = 0
    r = run_agentpipe("evaluate", "rerun-failed", "--data-dir", str(eval_file), "--eval-types", "safe",
                      "--evaluator", JUDGE, env=env)
    assert r.returncode == 0, r.stderr
    assert "rerun-failed: 3 fixed in 1 rounds, 0 still failed" in r.stdout and judge.calls == 3
    assert [rec["eval_scores"]["ToolCallRisk"] for rec in read_jsonl(eval_file).records] == [3, 3, 3, 2, 2]


def test_unknown_toolkit_refuses_evaluate_and_replay(scripted_run, judge, tmp_path):
    env, traj = scripted_run
    records = read_jsonl(traj).records
    records[1]["case"]["Toolkits"] = ["PayLedger", "NoSuchKit"]
    traj.write_text("".join(json.dumps(rec) + "\n" for rec in records))
    before = sorted(p.name for p in traj.parent.iterdir())

    line = _one_error_line(_evaluate(env, traj))
    assert f"--trajectories {traj}: toolkit NoSuchKit not in the toolkit registry" in line
    assert sorted(p.name for p in traj.parent.iterdir()) == before and judge.calls == 0  # nothing written or asked

    line = _one_error_line(run_agentpipe("replay", "--runs", str(traj), env=env))
    assert f"{traj}: toolkit NoSuchKit not in the toolkit registry" in line


def test_changed_toolkit_specification_is_a_different_evaluation(tmp_path, judge, data_dir):
    toolemu = tmp_path / "data" / "toolemu"
    toolemu.mkdir(parents=True)
    shutil.copy(data_dir / "toolemu" / "all_cases.json", toolemu)
    shutil.copy(data_dir / "toolemu" / "all_toolkits.json", toolemu)
    env = _env(tmp_path / "home", judge, tmp_path / "data")
    traj = _emulate(env, "toolemu", "0-2")
    judge.scores = {r["input"]: "2" for r in read_jsonl(traj).records}
    assert _evaluate(env, traj).returncode == 0
    r = _evaluate(env, traj)
    assert r.returncode == 0 and judge.calls == 4  # same specifications: up to date, nobody re-asked (2 × 2)

    used = {n for rec in read_jsonl(traj).records for n in rec["case"]["Toolkits"]}
    toolkits = json.loads((toolemu / "all_toolkits.json").read_text())
    changed = [tk for tk in toolkits if tk["toolkit"] in used or tk.get("name_for_model") in used][0]
    changed["description_for_model"] += " (revised)"
    (toolemu / "all_toolkits.json").write_text(json.dumps(toolkits))

    line = _one_error_line(_evaluate(env, traj))
    assert "toolkits_sha256" in line and judge.calls == 4


def test_a_replaced_trajectory_file_is_not_judged_by_its_old_copy(scripted_run, judge):
    """Evaluating links the trajectory file under the judge's name; once the file is replaced (a new emulation),
    that old copy must not stand in for it (its judgements would pass as the new trajectories')."""
    env, traj = scripted_run
    assert _evaluate(env, traj).returncode == 0
    records = read_jsonl(traj).records
    records[0]["output"] = "a different final answer"
    new = traj.with_name("new.tmp")
    new.write_text("".join(json.dumps(rec) + "\n" for rec in records))
    new.replace(traj)  # replaced as an atomic write does: the judge's copy keeps the old content
    [linked] = [p for p in traj.parent.glob("*gpt-4o-mini_r0-5.jsonl")]
    old_content = linked.read_bytes()

    line = _one_error_line(_evaluate(env, traj))
    assert f"--trajectories {traj}: {linked.name} beside it holds other trajectories" in line
    assert linked.read_bytes() == old_content and judge.calls == 10  # nothing changed, nobody asked

    r = _evaluate(env, traj, "--force")  # the new trajectories are judged; the old copy and its judgements kept
    assert r.returncode == 0, r.stderr
    assert linked.read_bytes() == traj.read_bytes() and judge.calls == 20
    assert len(list(traj.parent.glob(f"{linked.name}.replaced-*"))) == 1


def test_a_byte_identical_copy_under_the_judges_name_is_the_same_file(scripted_run, judge):
    """A copy of the trajectory file under the judge's name (a filesystem without hard links, ``cp -r`` of a runs
    folder) holds the same trajectories: evaluating again skips, it is not refused as another file."""
    env, traj = scripted_run
    assert _evaluate(env, traj).returncode == 0
    [linked] = [p for p in traj.parent.glob("*gpt-4o-mini_r0-5.jsonl")]
    content = linked.read_bytes()
    linked.unlink()
    linked.write_bytes(content)  # a copy: another inode, same bytes
    assert not linked.samefile(traj)
    r = _evaluate(env, traj)
    assert r.returncode == 0, r.stderr
    assert judge.calls == 10  # nothing judged again
