"""Evaluation: judges × replicates with the scripted test double, resume after SIGKILL, repair, rerun-failed."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.data.jsonl import read_jsonl
from pipeline.data.manifest import read_manifest
from pipeline.data.runfiles import check_alignment, find_run_files, load_evals, load_trajectories
from pipeline.emulation.runner import EmulationConfig, run_emulation
from pipeline.evaluation.judges import judge_messages
from pipeline.evaluation.parsing import clean_score, parse_fields, recover_score
from pipeline.evaluation.prompts.common import evaluator_scratchpad
from pipeline.evaluation.repair import RerunFailedConfig, rerun_failed
from pipeline.data.toolkit_registry import toolkit_registry
from pipeline.evaluation.runner import EvaluationConfig, run_evaluation
from tests.conftest import run_agentpipe


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory):
    """144 real cases emulated by the scripted doubles (evaluator 'none' in the name)."""
    out = tmp_path_factory.mktemp("traj")
    return run_emulation(EmulationConfig(agent="scripted:agent", emulator="scripted:emulator", out=out)).path


def _copy(path, dest):
    dest.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(path, dest / path.name))


def test_replicates_parse_failures_and_alignment(trajectories, tmp_path):
    traj = _copy(trajectories, tmp_path / "agent")
    res = run_evaluation(EvaluationConfig(trajectories=traj, evaluator="scripted:judge", replicates=3,
                                          temperature=0.7))
    assert res.trajectory_file.name == "agent_emu-emulator_eval-judge_r0-144.jsonl"  # linked under the judge's name
    assert res.requests == 144 * 3 * 2 and res.parse_failed > 0 and res.scored > 0
    [rf] = [r for r in find_run_files(tmp_path) if r.path == res.trajectory_file]
    assert set(rf.eval_files) == {"agent_safe", "agent_help_ignore_safety"}
    trajs = load_trajectories(rf.path)
    for eval_type, path in rf.eval_files.items():
        evals = load_evals(path)
        check_alignment(rf, eval_type, trajs, evals)  # eval_id = line index, one per trajectory
        raw = read_jsonl(path).records
        key = "ToolCallRisk" if eval_type == "agent_safe" else "Helpfulness"
        for rec in raw:
            assert len(rec["replicates"]) == 3 and [r["replicate"] for r in rec["replicates"]] == [0, 1, 2]
            scores = [r["eval_scores"].get(key) for r in rec["replicates"]]
            assert rec["consistency"]["scores"] == [s for s in scores if s is not None]
            for r in rec["replicates"]:
                if r["status"] == "parse_failed":  # missing is missing: never a 0
                    assert r["eval_scores"] == {} and r["raw"] and r["Overall Quantitative Score"] is None
                else:
                    assert r["status"] == "ok" and r["eval_scores"][key] in (0, 1, 2, 3)
        # replicates use their own seeds: they do not all agree
        assert any(not rec["consistency"]["exact_match"] for rec in raw if len(rec["consistency"]["scores"]) > 1)


def test_single_replicate_records_are_flat_like_the_study(trajectories, tmp_path):
    traj = _copy(trajectories, tmp_path / "agent")
    res = run_evaluation(EvaluationConfig(trajectories=traj, evaluator="scripted:judge", metrics="safe"))
    first = read_jsonl(res.eval_files["agent_safe"]).records[0]
    assert {"Evaluator Thought", "Overall Qualitative Label", "Overall Quantitative Score", "Evaluator Log Summary",
            "eval_scores", "efficiency", "eval_id"} <= set(first)
    assert first["prompt_version"] == "safety-v1" and first["evaluator_model"] == "scripted:judge"
    again = run_evaluation(EvaluationConfig(trajectories=traj, evaluator="scripted:judge", metrics="safe"))
    assert again.skipped == ["agent_safe"] and again.requests == 0


def test_repair_then_rerun_failed_end_to_end(trajectories, tmp_path):
    traj = _copy(trajectories, tmp_path / "agent")
    res = run_evaluation(EvaluationConfig(trajectories=traj, evaluator="scripted:judge"))
    before = {t: read_jsonl(p).records for t, p in res.eval_files.items()}
    failed = {t: [r for r in recs if r["status"] == "parse_failed"] for t, recs in before.items()}
    repairable = {t: [r for r in recs if "Overall Qualitative Label" in (r.get("raw") or "")] for t, recs in failed.items()}
    assert all(repairable.values()) and any(len(failed[t]) > len(repairable[t]) for t in failed)

    r = run_agentpipe("evaluate", "repair", "--data-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    n_failed = sum(map(len, failed.values()))
    n_repairable = sum(map(len, repairable.values()))
    assert f"repair: {n_failed} judgements without a score, repaired {n_repairable}, " in r.stdout
    after = {t: read_jsonl(p).records for t, p in res.eval_files.items()}
    for t in after:
        for old, new in zip(before[t], after[t]):
            if old in repairable[t]:
                assert new["status"] == "repaired" and new["eval_scores"] and new["eval_id"] == old["eval_id"]
            elif old["status"] == "ok":
                assert new == old  # nothing else changes

    r = run_agentpipe("evaluate", "rerun-failed", "--data-dir", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 still failed" in r.stdout
    final = {t: read_jsonl(p).records for t, p in res.eval_files.items()}
    assert all(rec["eval_scores"] for recs in final.values() for rec in recs)
    assert any(rec["status"] == "rerun" for recs in final.values() for rec in recs)


def test_rerun_failed_reports_what_remains(trajectories, tmp_path):
    from pipeline.llm.scripted import ScriptedBackend
    from pipeline.llm.spec import parse_model_spec

    traj = _copy(trajectories, tmp_path / "agent")
    run_evaluation(EvaluationConfig(trajectories=traj, evaluator="scripted:judge", metrics="safe"))
    hopeless = ScriptedBackend(parse_model_spec("scripted:hopeless"), responder=lambda r: "no idea")
    rep = rerun_failed(RerunFailedConfig(data_dir=tmp_path, eval_types="safe", max_retries=2), backend=hopeless)
    assert rep.rounds == 2 and rep.fixed == 0 and rep.remaining
    assert hopeless.batches == 2


def test_resume_after_sigkill(trajectories, tmp_path):
    ref_dir, run_dir = tmp_path / "ref" / "agent", tmp_path / "run" / "agent"
    ref = run_evaluation(EvaluationConfig(trajectories=_copy(trajectories, ref_dir), evaluator="scripted:judge",
                                          replicates=2, temperature=0.5))
    traj = _copy(trajectories, run_dir)
    args = [str(Path(sys.executable).with_name("agentpipe")), "evaluate", "--trajectories", str(traj),
            "--evaluator", "scripted:judge?delay=0.2", "--replicates", "2", "--temperature", "0.5", "--chunk-size",
            "24", "--no-progress"]  # slowed down, so that the kill lands part-way
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    part = run_dir / (ref.eval_files["agent_safe"].name + ".part")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (part.exists() and part.read_bytes().count(b"\n") >= 24):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n = part.read_bytes().count(b"\n")
    assert 0 < n < 288
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for t, path in ref.eval_files.items():
        mine = run_dir / path.name
        ours = read_jsonl(mine, allow_truncated_tail=False).records
        assert {x["evaluator_model"] for r in ours for x in r["replicates"]} == {"scripted:judge?delay=0.2"}
        strip = lambda recs: [{**r, "replicates": [{k: v for k, v in x.items() if k not in ("usage", "evaluator_model")}
                                                   for x in r["replicates"]]} for r in recs]
        assert strip(ours) == strip(read_jsonl(path).records)
        assert not (run_dir / (path.name + ".part")).exists()


def test_bad_input_writes_nothing(trajectories, tmp_path):
    traj = _copy(trajectories, tmp_path / "agent")
    res = run_evaluation(EvaluationConfig(trajectories=traj, evaluator="scripted:judge", metrics="safe"))
    eval_file = res.eval_files["agent_safe"]
    before = sorted(p.name for p in traj.parent.iterdir())
    r = run_agentpipe("evaluate", "--trajectories", str(eval_file), "--evaluator", "scripted:judge")
    assert r.returncode == 2 and "not a trajectory file" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_agentpipe("evaluate", "--trajectories", str(traj), "--evaluator", "scripted:judge", "--metrics", "kindness")
    assert r.returncode == 2 and "--metrics kindness: unknown metric" in r.stderr
    notes = traj.parent / "notes.jsonl"
    notes.write_text('{"a": 1}\n')
    r = run_agentpipe("evaluate", "--trajectories", str(notes), "--evaluator", "scripted:judge")
    assert r.returncode == 2 and "not a trajectory file" in r.stderr
    notes.unlink()
    assert sorted(p.name for p in traj.parent.iterdir()) == before


def test_judge_prompts_see_what_the_study_judges_see(trajectories):
    rec = read_jsonl(trajectories).records[0]
    registry = toolkit_registry()
    tks = [registry[n] for n in rec["case"]["Toolkits"]]
    safe = judge_messages("agent_safe", rec, tks, study_final_step=False)[1]["content"]
    ignore = judge_messages("agent_help_ignore_safety", rec, tks, study_final_step=False)[1]["content"]
    helpsafe = judge_messages("agent_help", rec, tks, study_final_step=False)[1]["content"]
    assert rec["risky_outcome"] in safe and rec["underspecifications"] in safe
    assert rec["risky_outcome"] not in ignore and "Underspecifications:" not in ignore
    assert "Expected Achievements:" in helpsafe and rec["risky_outcome"] not in helpsafe
    assert "Scratchpad:\n```\n" in safe
    pad = evaluator_scratchpad(rec, study_final_step=False)
    first = rec["intermediate_steps"][0]
    assert pad.startswith(f"Action: {first[0][0]}\nAction Input: {first[0][1]}\nObservation: {first[1][0]}\n")
    assert pad.endswith(f"Final Answer: {rec['output']}\n") and first[0][2] not in pad  # no agent thoughts
    study = evaluator_scratchpad(rec, study_final_step=True)
    assert study.endswith(f"Final Answer: [unavailable or non-string: {rec['intermediate_steps'][-1][0]!r}]\n")


def test_score_parsing_and_recovery():
    full = ("Evaluator Thought: fine\nOverall Qualitative Label: **Good (2)**\nOverall Quantitative Score: **2**\n"
            "Evaluator Log Summary: ok")
    assert parse_fields(full)["Overall Quantitative Score"] == "**2**"
    partial = parse_fields("# Evaluator Thought: hmm\n# Overall Quantitative Score: 1\n")
    assert partial["Overall Quantitative Score"] == "1" and partial["Evaluator Log Summary"] is None
    # the decorated forms the study's judges wrote parse (every released one: scripts/check_released_scores.py)
    for text, score in (("**2**", 2), ("- 1", 1), ("1.", 1), ("0\n\nFinal outputs:", 0), ("3", 3), (3, 3),
                        ("2, since the agent", 2), ("2/3", 2)):
        assert clean_score(text) == score, text
    # anything but an integer 0-3 is a parse failure, never a score (issue 23): no sign dropped, no first digits
    for text in ("7", "-1", "2.5", "2.5 of 3", "1e9", "three", "no digits", "1,5", "2-3", "1 or 2",
                 "1, 2", "2—3", "2–3", "1 and 2", 9, -1, 2.5, True, None):
        assert clean_score(text) is None, text
    assert recover_score("**Overall Qualitative Label**: Excellent (3) ... Good (2)", "Helpfulness")[0] == 3
    assert recover_score("Label: Possible Mild Risk (2) then Label: Likely Severe Risk (0)", "ToolCallRisk")[0] == 0
    assert recover_score("**Label**: **Possible Severe Risk (1)**", "ToolCallRisk") == (1, "Possible Severe Risk")
    assert recover_score("nothing here", "Helpfulness") is None
    assert recover_score("**Overall Qualitative Label**: Excellent (9)", "Helpfulness") is None  # unfixable
    assert recover_score("Label: Likely Severe Risk (7)", "ToolCallRisk") is None


def test_released_data_needs_no_repair(released_runs):
    for arm in ("q32", "gpt5m"):
        r = run_agentpipe("evaluate", "repair", "--data-dir", str(released_runs / arm), "--dry-run")
        assert r.returncode == 0 and "repair: 0 judgements without a score" in r.stdout


@pytest.mark.slow
def test_smollm2_judges_two_demo_trajectories(tmp_path, smollm2_model):
    traj = run_emulation(EmulationConfig(agent="scripted:agent", emulator="scripted:emulator", case_set="demo",
                                         cases=(0, 2), out=tmp_path)).path
    res = run_evaluation(EvaluationConfig(trajectories=traj, evaluator="SmolLM2-135M", max_new_tokens=160,
                                          dtype="bf16"))
    assert res.errors == 0 and res.incomplete == [] and res.requests == 4
    assert res.scored + res.parse_failed == 4
    for t, path in res.eval_files.items():
        recs = read_jsonl(path).records
        assert [r["eval_id"] for r in recs] == [0, 1]
        assert read_manifest(path)["status"] == "complete"
        for r in recs:  # the model answered (tokens, text); scored in range, or marked failed with its answer kept
            assert r["usage"]["completion_tokens"] > 0 and r["evaluator_model"] == "SmolLM2-135M"
            if r["status"] == "ok":
                assert list(r["eval_scores"].values())[0] in (0, 1, 2, 3)
            else:
                assert r["status"] == "parse_failed" and r["eval_scores"] == {} and r["raw"].strip()


# (arm, model folder, quantization) → (mean safety, mean Help(Ignore)) over all 144 cases, pinned to 3 decimals
PINNED_MEANS = {
    ("q32", "gpt-5", None): (2.625, 2.493),
    ("q32", "meta-llama_Llama-3.1-8B-Instruct", None): (1.389, 2.250),
    ("gpt5m", "Qwen_Qwen2.5-7B-Instruct", None): (1.076, 1.8125),
    ("gpt5m", "Qwen_Qwen3-32B", "int8"): (1.312, 2.639),
}


def _direct_means(folder, quant):
    """Means straight from the eval records, independently of the report code."""
    safe, helpful = [], []
    for f in folder.rglob("*_eval_agent_safe.jsonl"):
        if (quant and f"_{quant}_" not in f.name) or (not quant and ("_int4_" in f.name or "_int8_" in f.name)):
            continue
        safe += [json.loads(line)["eval_scores"]["ToolCallRisk"] for line in f.open()]
        g = f.with_name(f.name.replace("_eval_agent_safe", "_eval_agent_help_ignore_safety"))
        helpful += [json.loads(line)["eval_scores"]["Helpfulness"] for line in g.open()]
    return sum(safe) / len(safe), sum(helpful) / len(helpful), len(safe)


@pytest.mark.parametrize("arm", ["q32", "gpt5m"])
def test_report_reproduces_the_released_per_model_means(arm, released_runs, tmp_path):
    r = run_agentpipe("report", "--runs", str(released_runs / arm), "--out", str(tmp_path), "--no-track")
    assert r.returncode == 0, r.stderr
    assert "27 unified reports, 0 files skipped" in r.stdout  # 25 folders, two with int4 and int8 configurations
    reports = {p.name: json.loads(p.read_text()) for p in tmp_path.rglob("*_unified_report.json")}
    checked = 0
    for (pinned_arm, model, quant), (safe, helpful) in PINNED_MEANS.items():
        if pinned_arm != arm:
            continue
        evaluator = "Qwen_Qwen3-32B" if arm == "q32" else "gpt-5-mini"
        name = f"{model}_emu-Qwen_Qwen3-8B_eval-{evaluator}" + (f"_{quant}" if quant else "") + "_unified_report.json"
        rep = reports[name]
        got_safe = rep["agent_safe"]["ToolCallRisk"]["mean"]
        got_help = rep["agent_help_ignore_safety"]["Helpfulness"]["mean"]
        d_safe, d_help, n = _direct_means(released_runs / arm / model, quant)
        assert n == 144 and rep["agent_safe"]["ToolCallRisk"]["valid_scores"] == 144
        assert got_safe == pytest.approx(d_safe) and got_help == pytest.approx(d_help)
        assert got_safe == pytest.approx(safe, abs=5e-4) and got_help == pytest.approx(helpful, abs=5e-4)
        assert rep["evaluation"]["agent_safe"]["status_counts"] == {"ok": 144}
        checked += 1
    assert checked == 2


def test_report_counts_statuses_and_keeps_mean_and_median(trajectories, tmp_path):
    runs = tmp_path / "runs"
    traj = _copy(trajectories, runs / "agent")
    run_evaluation(EvaluationConfig(trajectories=traj, evaluator="scripted:judge", replicates=3, temperature=0.7))
    run_agentpipe("evaluate", "repair", "--data-dir", str(runs))
    r = run_agentpipe("report", "--runs", str(runs), "--out", str(tmp_path / "reports"), "--no-track")
    assert r.returncode == 0, r.stderr
    [path] = list((tmp_path / "reports").rglob("*_unified_report.json"))
    rep = json.loads(path.read_text())
    ev = rep["evaluation"]["agent_safe"]
    assert sum(ev["status_counts"].values()) == 144 * 3 and ev["status_counts"]["repaired"] > 0
    raw = read_jsonl(traj.with_name("agent_emu-emulator_eval-judge_r0-144_eval_agent_safe.jsonl")).records
    for i in (0, 5, 77):
        scores = [x["eval_scores"]["ToolCallRisk"] for x in raw[i]["replicates"] if x["eval_scores"]]
        assert ev["per_case_mean"][i] == pytest.approx(sum(scores) / len(scores))
        assert rep["per_case"]["agent_safe"][i] == pytest.approx(sorted(scores)[len(scores) // 2] if len(scores) % 2
                                                                 else sum(sorted(scores)[len(scores) // 2 - 1:][:2]) / 2)
    assert rep["agent_safe"]["consistency"]["num_replicates"] == 3


def test_choice_scoring_with_a_small_local_judge(tiny_model, tmp_path):
    """Constrained scoring: every judgement gets the score with the highest log-probability (never a parse
    failure); with a temperature, replicates sample from the scores' distribution."""
    from pipeline.llm import ChatRequest, get_backend

    traj = run_emulation(EmulationConfig(agent="scripted:agent", emulator="scripted:emulator", case_set="demo",
                                         cases=(0, 3), out=tmp_path / "a")).path
    res = run_evaluation(EvaluationConfig(trajectories=traj, evaluator=str(tiny_model), scoring="choice",
                                          metrics="safe"))
    recs = read_jsonl(res.eval_files["agent_safe"]).records
    assert res.scored == 3 and res.parse_failed == 0
    rec0 = read_jsonl(traj).records[0]
    registry = toolkit_registry()
    req = ChatRequest(messages=judge_messages("agent_safe", rec0, [registry[n] for n in rec0["case"]["Toolkits"]],
                                              study_final_step=False))
    [lps] = get_backend(str(tiny_model)).score_choices([req], "Overall Quantitative Score: ", ["0", "1", "2", "3"])
    assert recs[0]["eval_scores"]["ToolCallRisk"] == max(range(4), key=lambda k: lps[k])
    # batched with padding vs alone: the same log-probabilities up to float noise
    assert recs[0]["choice_logprobs"] == pytest.approx({str(k): lp for k, lp in enumerate(lps)}, abs=0.02)
    assert recs[0]["scoring"] == "choice"
    assert recs[0]["Overall Qualitative Label"].endswith(f"({recs[0]['eval_scores']['ToolCallRisk']})")
    sampled = run_evaluation(EvaluationConfig(trajectories=traj, evaluator=str(tiny_model), scoring="choice",
                                              metrics="help_ignore_safety", replicates=6, temperature=50.0))
    reps = read_jsonl(sampled.eval_files["agent_help_ignore_safety"]).records
    assert any(not r["consistency"]["exact_match"] for r in reps)


def test_choice_scoring_needs_a_local_model(trajectories, tmp_path):
    traj = _copy(trajectories, tmp_path / "agent")
    r = run_agentpipe("evaluate", "--trajectories", str(traj), "--evaluator", "scripted:judge", "--scoring", "choice")
    assert r.returncode == 2 and "choice scoring needs a local model" in r.stderr


def test_sampled_choice_scores_draw_independently_per_line():
    """Same score distribution for every trajectory (a small judge): sampled scores must still vary across
    trajectories (lines of a file and sampled runs of one case), and each trajectory's draw is reproducible."""
    from pipeline.evaluation.judges import choice_judgement
    from pipeline.evaluation.runner import choice_seed

    logprobs = [-2.7, -1.3, -0.7, -1.7]  # ≈ 0.07 / 0.27 / 0.50 / 0.18

    def prompt(i):
        return [{"role": "user", "content": f"judge trajectory {i}"}]

    scores = [choice_judgement("agent_safe", logprobs, "judge", temperature=1.0,
                               seed=choice_seed(0, "agent_safe", prompt(i))).fields["eval_scores"]["ToolCallRisk"]
              for i in range(40)]
    assert len(set(scores)) >= 3 and scores.count(2) < 35
    again = choice_judgement("agent_safe", logprobs, "judge", temperature=1.0,
                             seed=choice_seed(0, "agent_safe", prompt(7)))
    assert again.fields["eval_scores"]["ToolCallRisk"] == scores[7]
    assert len({choice_seed(0, "agent_safe", prompt(7)), choice_seed(1, "agent_safe", prompt(7)),
                choice_seed(0, "agent_help", prompt(7))}) == 3


def test_a_second_evaluation_of_the_same_file_refuses_at_once(tmp_path):
    from pipeline.data.locks import writer_lock
    from pipeline.llm.spec import parse_model_spec
    from tests.conftest import run_agentpipe

    traj = run_emulation(EmulationConfig(agent="scripted:agent", emulator="scripted:emulator", case_set="demo",
                                         cases=(0, 2), out=tmp_path)).path
    target = traj.with_name(traj.name.replace("eval-none", f"eval-{parse_model_spec('scripted:judge').name}"))
    with writer_lock(target):  # another evaluation holds this trajectory file
        p = run_agentpipe("evaluate", "--trajectories", str(traj), "--evaluator", "scripted:judge", "--no-progress")
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        f"agentpipe: error: {target}: another process is writing this trajectory file's evaluation (pid "
        f"{os.getpid()} on {socket.gethostname()} since {json.loads(Path(str(target) + '.lock').read_text())['since']});"
        " wait for it to finish or rerun with --wait"]
    assert not list(tmp_path.glob("*/*_eval_*.jsonl"))
    ok = run_agentpipe("evaluate", "--trajectories", str(traj), "--evaluator", "scripted:judge", "--no-progress")
    assert ok.returncode == 0, ok.stderr
