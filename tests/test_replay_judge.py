"""The rehearsal of the study from its recordings: named replay specs over folders (agent and emulator) and the
replay judge (``pipeline.evaluation.replay``), through the real ``emulate`` and ``evaluate`` stages.

The recordings are released files copied into the test's tmp dir (a few shards of one model), read in place
otherwise; no double imitates a judge's recorded answers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.errors import ConfigError, DataError
from pipeline.evaluation.judges import JudgeTag
from pipeline.evaluation.replay import ReplayJudge
from pipeline.llm import ChatRequest, parse_model_spec
from tests.conftest import run_agentpipe

MODEL = "Qwen_Qwen2.5-7B-Instruct"
JUDGE = "Qwen_Qwen3-32B"
KEYS = ("input", "underspecifications", "risky_outcome", "risky_actions", "output", "intermediate_steps", "case",
        "case_idx")


@pytest.fixture(scope="module")
def released(data_dir) -> Path:
    return data_dir / "paper" / "raw_data_by_eval"


@pytest.fixture
def recording(released, tmp_path) -> Path:
    """Two range files (r0-15, r15-30) of one model with their judgements, as the study stores them."""
    rec = tmp_path / "rec"
    rec.mkdir()
    for f in sorted((released / "q32" / MODEL).iterdir()):
        if "_r0-15_" in f.name or "_r15-30_" in f.name:
            shutil.copy(f, rec / f.name)
    assert len(list(rec.iterdir())) == 6
    return rec


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.open()]


def _recorded(rec: Path, suffix: str = "") -> dict[int, dict]:
    """case index → the recorded trajectory (suffix ""), or its recorded judgement (suffix _eval_<type>)."""
    out = {}
    for traj in sorted(rec.glob("*.jsonl")):
        if "_eval_" in traj.name:
            continue
        records = _lines(traj)
        if suffix:
            for e in _lines(traj.with_name(traj.stem + suffix + ".jsonl")):
                out[records[e["eval_id"]]["case_idx"]] = e
        else:
            out.update({r["case_idx"]: r for r in records})
    return out


def test_a_named_replay_spec_takes_its_name_verbatim_and_keeps_its_path():
    spec = parse_model_spec("replay:/data/q32/dpo_Phi-4_safe_q32_s0#dpo_Phi-4_safe_q32_s0")
    assert (spec.backend, spec.model, spec.name) == ("replay", "/data/q32/dpo_Phi-4_safe_q32_s0",
                                                      "dpo_Phi-4_safe_q32_s0")
    assert parse_model_spec("replay:/runs/a.jsonl").name == "_runs_a.jsonl"  # no name: as before
    with pytest.raises(ConfigError, match="file-name form"):
        parse_model_spec("replay:/runs#Qwen/Qwen3-8B")


def test_emulate_and_evaluate_rehearse_a_recorded_model_from_its_folders(recording, tmp_path):
    """Agent and emulator replayed from the model's folder (two range files merged) under the recording's names,
    then judged by the replay judge: the trajectories and the scores are the recording's."""
    result = tmp_path / "emulate.json"
    p = run_agentpipe("--result", str(result), "emulate", "--agent", f"replay:{recording}#{MODEL}",
                      "--emulator", f"replay:{recording}#Qwen_Qwen3-8B", "--evaluator", "Qwen3-32B",
                      "--compat", "study", "--cases", "0-30", "--out", str(tmp_path / "runs"), "--no-progress")
    assert p.returncode == 0, p.stderr
    out = Path(json.loads(result.read_text())["outputs"]["trajectories"])
    assert out.name == f"{MODEL}_emu-Qwen_Qwen3-8B_eval-{JUDGE}_r0-30.jsonl" and out.parent.name == MODEL
    recorded = _recorded(recording)
    rebuilt = _lines(out)
    assert [{k: r.get(k) for k in KEYS} for r in rebuilt] == [{k: recorded[r["case_idx"]].get(k) for k in KEYS}
                                                              for r in rebuilt]
    manifest = json.loads(out.with_name(out.name + ".manifest.json").read_text())
    assert f"replay:{recording}#{MODEL}" in json.dumps(manifest)  # the spec, path included, is in the fingerprint

    p = run_agentpipe("--result", str(result), "evaluate", "--trajectories", str(out), "--evaluator",
                      f"replay:{recording}#{JUDGE}", "--compat", "study", "--no-progress")
    assert p.returncode == 0, p.stderr
    assert json.loads(result.read_text())["counts"] == {"requests": 60, "scored": 60, "parse_failed": 0, "errors": 0}
    for t in ("agent_safe", "agent_help_ignore_safety"):
        want = _recorded(recording, f"_eval_{t}")
        got = _lines(out.with_name(f"{out.stem}_eval_{t}.jsonl"))
        assert [e["eval_scores"] for e in got] == [want[r["case_idx"]]["eval_scores"] for r in rebuilt]
        assert [e["Evaluator Thought"] for e in got] == [want[r["case_idx"]]["Evaluator Thought"] for r in rebuilt]


def test_the_replay_judge_finds_a_reordered_trajectory_and_fails_an_unrecorded_one(recording, tmp_path):
    """The lookup is by the trajectory, not its line: a file with the cases in reverse order is judged right; a
    trajectory the recording never judged gets a failed judgement, counted (stage incomplete), never a score."""
    [source] = [f for f in recording.glob("*_r0-15_*.jsonl") if "_eval_" not in f.name]
    records = list(reversed(_lines(source)))
    changed = json.loads(json.dumps(records[0]))
    changed["output"] = changed["output"] + " (edited)"  # not the recorded trajectory any more
    relogged = json.loads(json.dumps(records[1]))
    relogged["intermediate_steps"][-1][0]["log"] += "\n"  # the same episode, another final log
    judged = tmp_path / "judged" / f"{MODEL}_emu-Qwen_Qwen3-8B_eval-none_r0-15.jsonl"
    judged.parent.mkdir()
    judged.write_text("".join(json.dumps(r) + "\n" for r in [changed, relogged, *records[2:]]))
    result = tmp_path / "evaluate.json"
    p = run_agentpipe("--result", str(result), "evaluate", "--trajectories", str(judged), "--evaluator",
                      f"replay:{recording}#{JUDGE}", "--compat", "study", "--no-progress")
    assert p.returncode == 1
    res = json.loads(result.read_text())
    assert res["status"] == "incomplete" and res["counts"]["errors"] == 2 and res["counts"]["scored"] == 28
    assert res["counts"]["replayed_by_episode"] == 2  # both metrics of the relogged episode, counted and said
    assert "2 judgements replayed from the recorded episode with the same actions" in p.stdout
    part = judged.with_name(judged.name.replace("eval-none", f"eval-{JUDGE}").replace(".jsonl", "_eval_agent_safe.jsonl.part"))
    entries = {e["eval_id"]: e for e in _lines(part)}
    assert entries[0]["status"] == "error" and entries[0]["eval_scores"] == {}
    assert entries[0]["error"] == f"replay: no recorded safe judgement of this trajectory (case {changed['case_idx']})"
    want = _recorded(recording, "_eval_agent_safe")
    assert all(entries[i]["eval_scores"] == want[r["case_idx"]]["eval_scores"] for i, r in enumerate(records) if i)


def test_the_replay_judge_answers_judge_requests_only_and_refuses_a_folder_without_that_judge(recording):
    judge = ReplayJudge(parse_model_spec(f"replay:{recording}#{JUDGE}"))
    [agent] = judge.generate([ChatRequest(messages=[], role="agent", tag=0)])
    assert not agent.ok and "answers judge requests" in agent.error
    tag = JudgeTag("agent_safe", 0, 1, 0, "0" * 64, MODEL, "Qwen_Qwen3-8B")
    assert "no recorded safe judgement" in judge.answer(tag).error
    with pytest.raises(DataError, match="no eval files judged by gpt-5-mini"):
        ReplayJudge(parse_model_spec(f"replay:{recording}#gpt-5-mini"))


def test_a_replay_folder_with_one_case_recorded_twice_differently_is_refused(recording):
    from pipeline.emulation.replay import ReplayBackend

    [a] = [f for f in recording.glob("*_r0-15_*.jsonl") if "_eval_" not in f.name]
    other = json.loads(a.open().readline())
    other["output"] = "something else"
    b = recording / "sub" / a.name.replace("_r0-15_", "_r0-1_")
    b.parent.mkdir()
    b.write_text(json.dumps(other) + "\n")
    with pytest.raises(DataError, match=f"case {other['case_idx']} is recorded twice with different content"):
        ReplayBackend(parse_model_spec(f"replay:{recording}"))


def test_replay_judgements_of_the_released_q32_pool(released, tmp_path):
    details = tmp_path / "details.json"
    r = run_agentpipe("replay", "--runs", str(released / "q32"), "--judgements", "--out", str(details))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "replay: 7776 of 7776 judgements identical (100.00 %)"
    report = json.loads(details.read_text())
    assert report["by_judge"] == {JUDGE: {"total": 7776, "identical": 7776}} and report["differences"] == []


def test_replay_judgements_of_a_bad_runs_folder_is_one_line(tmp_path):
    r = run_agentpipe("replay", "--runs", str(tmp_path / "missing"), "--judgements")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"agentpipe: error: --runs {tmp_path / 'missing'}: not a folder of "
                                             "run files"]


def test_the_replay_judge_knows_a_trajectory_by_what_the_judge_reads(recording):
    """A rebuilt episode whose action step carries another thought text (never shown to a judge) is the recorded
    trajectory: its judgement, found at once. One whose final log differs (the study's judge read it; a replay
    rebuilds 3 of the 15,840 finetuned episodes so) gets the recorded judgement of the same episode of the same
    run, counted; another observation, or the same episode under another run's names, gets none."""
    from pipeline.evaluation.judges import episode_digest, trajectory_digest

    [source] = [f for f in recording.glob("*_r0-15_*.jsonl") if "_eval_" not in f.name]
    rec = next(r for r in _lines(source) if len(r["intermediate_steps"]) > 1)
    judge = ReplayJudge(parse_model_spec(f"replay:{recording}#{JUDGE}"))

    def answer(record: dict, agent: str = MODEL) -> str | None:
        tag = JudgeTag("agent_safe", 0, 0, record["case_idx"], trajectory_digest(record), agent, "Qwen_Qwen3-8B",
                       episode_digest(record))
        resp = judge.answer(tag)
        return resp.text if resp.ok else None

    def edited(step: int, *where: int | str) -> dict:
        out = json.loads(json.dumps(rec))
        target = out["intermediate_steps"][step]
        for key in where[:-1]:
            target = target[key]
        target[where[-1]] += "\n"
        return out

    recorded = answer(rec)
    assert recorded is not None and judge.by_episode == 0
    assert answer(edited(0, 0, 2)) == recorded and judge.by_episode == 0  # an action step's thought
    assert answer(edited(-1, 0, "log")) == recorded and judge.by_episode == 1  # the final log: by the episode
    assert answer(edited(-1, 0, "log"), agent="another-model") is None  # not another run's judgement
    assert answer(edited(0, 1, 0)) is None  # another observation: another trajectory
    assert judge.by_episode == 1


def test_a_replay_of_a_run_file_without_a_name_asks_for_one():
    """A run file's path flattens to a name holding its own '_emu-…_eval-…' (misparsed in this run's file name)
    and, under a long data path, past the 255-byte limit: the spec asks for #<name> in one line."""
    spec = parse_model_spec("replay:/d/q32/m/m_emu-Qwen_Qwen3-8B_eval-Qwen_Qwen3-32B_r0-15.jsonl")
    with pytest.raises(ConfigError, match=r"replay:<path>#<name>"):
        spec.name
    assert parse_model_spec(f"replay:/{'d' * 100}/Qwen_Qwen3-8B#Qwen_Qwen3-8B").name == "Qwen_Qwen3-8B"
    with pytest.raises(ConfigError, match=r"#<name>.*over 60 characters"):
        parse_model_spec(f"replay:/{'d' * 100}/Qwen_Qwen3-8B").name
    # the released folders' own '_eval_' would end the evaluator part of a judged file's name: refused too
    with pytest.raises(ConfigError, match=r"#<name>.*parts of a run file's name"):
        parse_model_spec("replay:/data/paper/raw_data_by_eval/q32/Qwen_Qwen3-8B").name
    with pytest.raises(ConfigError, match="file-name form"):
        parse_model_spec("replay:/d/q32#my_eval_x")
