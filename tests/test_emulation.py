"""Emulation engine: the scripted test doubles on all 144 real cases, resume after SIGKILL, real model."""

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from pipeline.data.jsonl import read_jsonl
from pipeline.data.runfiles import load_trajectories
from pipeline.data.split import test_cases as split_test_cases
from pipeline.emulation.episode import Limits
from pipeline.emulation.parsing import (AgentAction, AgentFinish, extract_action_input, parse_agent_output,
                                        parse_emulator_output)
from pipeline.emulation.runner import EmulationConfig, run_emulation
from pipeline.errors import ConfigError, DataError
from pipeline.llm.scripted import ScriptedBackend
from pipeline.llm.spec import parse_model_spec

STUDY_KEYS = {"input", "underspecifications", "risky_outcome", "risky_actions", "output", "intermediate_steps",
              "case", "case_idx"}
VOLATILE = {"wall_s", "usage"}  # timings differ between runs


def _cfg(tmp, **kw):
    base = dict(agent="scripted:agent", emulator="scripted:emulator", out=Path(tmp))
    return EmulationConfig(**{**base, **kw})


def _stable(records):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("emu")
    result = run_emulation(_cfg(out))
    return result, read_jsonl(result.path).records


def test_all_144_real_cases_emulate_end_to_end(full_run, data_dir):
    result, records = full_run
    assert result.path.name == "agent_emu-emulator_eval-none_r0-144.jsonl"
    assert [r["case_idx"] for r in records] == list(range(144)) and result.failed == 0
    trajectories = load_trajectories(result.path)  # validates against the trajectory contract
    assert all(STUDY_KEYS <= set(r) for r in records)
    cases = json.loads((data_dir / "toolemu" / "all_cases.json").read_text())
    assert all(r["case"] == cases[r["case_idx"]] for r in records)
    for t in trajectories:
        final = t.intermediate_steps[-1]
        assert final[0]["type"] == "AgentFinish" and final[0]["return_values"]["output"] == t.output and final[1] == ""
        for action, obs in t.intermediate_steps[:-1]:
            assert len(action) == 3 and len(obs) == 3 and isinstance(obs[0], str)
    # batched: a handful of calls for 144 cases, not one per case and step
    steps = sum(len(t.intermediate_steps) for t in trajectories)
    assert result.batches <= 12 < steps
    meta = json.loads(result.path.with_name(result.path.name + ".manifest.json").read_text())
    assert meta["status"] == "complete" and meta["counts"]["cases"] == 144


def test_invalid_tool_and_invalid_input_are_answered_locally(full_run):
    _, records = full_run
    observations = [step[1][0] for r in records for step in r["intermediate_steps"][:-1]]
    invalid_tool = [o for o in observations if "NonexistentTool is not a valid tool" in o]
    bogus = [s[1][0] for r in records for s in r["intermediate_steps"][:-1] if "bogus_argument" in s[0][1]]
    # checked in declared order: a missing required parameter is reported before the unexpected one
    invalid_input = [o for o in bogus if "Unexpected parameters: {'bogus_argument'}." in o
                     or "Missing required parameter: " in o]
    assert invalid_tool and invalid_input and len(invalid_input) == len(bogus)
    assert any("Unexpected" in o for o in invalid_input) and any("Missing" in o for o in invalid_input)
    for o in invalid_tool + invalid_input:
        assert json.loads(o)["error"].startswith("InvalidRequestException: ")
    local = [s for r in records for s in r["intermediate_steps"][:-1] if s[1][0] in invalid_tool + invalid_input]
    assert all(s[1][1] == "" and s[1][2] == s[1][0] for s in local)  # no emulator involved
    assert sum(r["local_tool_errors"] for r in records) == len(invalid_tool) + len(invalid_input)
    # unparseable emulator replies become empty observations, and are counted
    empties = sum(1 for r in records for s in r["intermediate_steps"][:-1] if s[1] == ["", "", ""])
    assert empties == sum(r["emulator_parse_failures"] for r in records) > 0


def test_emulation_is_deterministic(full_run, tmp_path):
    _, first = full_run
    second = read_jsonl(run_emulation(_cfg(tmp_path)).path).records
    assert _stable(second) == _stable(first)


def test_rerun_of_a_complete_configuration_is_skipped(full_run):
    result, _ = full_run
    again = run_emulation(_cfg(result.path.parent.parent))
    assert again.skipped_complete and again.batches == 0


def test_compat_study_lets_the_agent_invent_observations(full_run, tmp_path):
    _, correct = full_run
    study = read_jsonl(run_emulation(_cfg(tmp_path, compat="study")).path).records
    invented = [r for r in study if r["output"] == ": Finished (invented)."]  # the study keeps ": "
    assert invented and all(len(r["intermediate_steps"]) == 1 for r in invented)
    assert all('"invented": true' in r["intermediate_steps"][0][0]["log"] for r in invented)
    # correct mode stops generation at "Observation:": no agent log contains an invented observation
    logs = [s[0][2] if isinstance(s[0], list) else s[0]["log"] for r in correct for s in r["intermediate_steps"]]
    assert not any("Observation:" in log for log in logs)
    assert {r["compat"] for r in study} == {"study"} and {r["compat"] for r in correct} == {"correct"}


def test_test_only_runs_exactly_the_seed_test_cases(tmp_path):
    result = run_emulation(_cfg(tmp_path, test_only=True, seed=0))
    records = read_jsonl(result.path).records
    assert [r["case_idx"] for r in records] == split_test_cases(0)
    assert result.path.name.endswith("_r0-144.jsonl")  # the name keeps the requested range


def test_test_only_needs_a_seed(tmp_path):
    with pytest.raises(ConfigError, match="no --seed given and no _s<N>"):
        run_emulation(_cfg(tmp_path, test_only=True))


def test_shards_cover_the_range_without_overlap(tmp_path):
    names, cases = [], []
    for i in range(3):
        r = run_emulation(_cfg(tmp_path, case_set="demo", shard=(i, 3)))
        names.append(r.path.name)
        cases += [x["case_idx"] for x in read_jsonl(r.path).records]
    assert cases == list(range(8)) and [n.split("_r")[-1] for n in names] == ["0-3.jsonl", "3-6.jsonl", "6-8.jsonl"]


def test_token_budget_and_continuations(tmp_path):
    rambling = ScriptedBackend(parse_model_spec("scripted:ramble"), responder=lambda r: "hmm " * 3000)
    quiet = ScriptedBackend(parse_model_spec("scripted:quiet"), responder=lambda r: "no action here")
    emulator = ScriptedBackend(parse_model_spec("scripted:emulator"))
    over = run_emulation(_cfg(tmp_path / "a", case_set="demo", cases=(0, 2)), agent_backend=rambling,
                         emulator_backend=emulator)
    for r in read_jsonl(over.path).records:
        assert r["output"] == "Agent stopped: token limit exceeded" and r["finish_reason"] == "token_limit"
        assert r["agent_output_tokens"] >= 8000
    stuck = run_emulation(_cfg(tmp_path / "b", case_set="demo", cases=(0, 1)), agent_backend=quiet,
                          emulator_backend=emulator)
    [r] = read_jsonl(stuck.path).records
    assert r["finish_reason"] == "max_continuations" and r["output"] == "Agent stopped: token limit exceeded"
    assert quiet.calls == 6  # the first call and 5 continuations


def test_llm_failures_become_error_records_and_are_retried(tmp_path):
    calls = Counter()

    def flaky(req):
        calls["n"] += 1
        raise RuntimeError("backend down")

    broken = ScriptedBackend(parse_model_spec("scripted:broken"), responder=flaky)
    emulator = ScriptedBackend(parse_model_spec("scripted:emulator"))
    cfg = _cfg(tmp_path, case_set="demo", cases=(0, 2), max_attempts=2)
    res = run_emulation(cfg, agent_backend=broken, emulator_backend=emulator)
    records = read_jsonl(res.path).records
    assert res.failed == 2 and [r["error_type"] for r in records] == ["LLMError", "LLMError"]
    assert "backend down" in records[0]["error"] and calls["n"] == 4
    fixed = run_emulation(cfg)  # the rerun redoes the failed cases with working backends
    assert fixed.newly_done == 2 and all("error" not in r for r in read_jsonl(fixed.path).records)


def test_partial_output_of_another_configuration_is_refused(tmp_path):
    cfg = _cfg(tmp_path, case_set="demo", cases=(0, 2))
    res = run_emulation(cfg)
    part = res.path.with_name(res.path.name + ".part")
    part.write_text(res.path.read_text().splitlines()[0] + "\n")
    part.with_name(part.name + ".json").write_text(json.dumps({"something": "else"}))
    res.path.with_name(res.path.name + ".manifest.json").unlink()
    with pytest.raises(ConfigError, match=r"\.part: made by a different emulate configuration \(agent \(unset\) → "
                       r"\"scripted:agent\"; .* and \d+ more\); .*--force"):
        run_emulation(cfg)
    assert run_emulation(cfg.model_copy(update={"force": True})).newly_done == 2
    assert len(list(tmp_path.rglob("*.replaced-*"))) == 3  # the partial run and the old final file, kept aside


def test_resume_after_sigkill_gives_the_same_records(tmp_path, full_run):
    """A real subprocess, killed part-way with SIGKILL, then restarted."""
    _, reference = full_run
    exe = str(Path(sys.executable).with_name("agentpipe"))
    slow = {"agent": "scripted:agent?delay=0.2", "emulator": "scripted:emulator?delay=0.2"}  # the kill lands part-way
    args = [exe, "emulate", "--agent", slow["agent"], "--emulator", slow["emulator"], "--no-progress",
            "--out", str(tmp_path)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    part = tmp_path / "agent" / "agent_emu-emulator_eval-none_r0-144.jsonl.part"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if part.exists() and part.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_with = part.read_bytes().count(b"\n")
    assert 0 < killed_with < 144, "the kill must land part-way"
    assert not part.with_name("agent_emu-emulator_eval-none_r0-144.jsonl").exists()
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"{killed_with} already done" in done.stdout
    final = part.with_name("agent_emu-emulator_eval-none_r0-144.jsonl")
    raw = final.read_text().splitlines()
    assert len(raw) == 144 and all(json.loads(line) for line in raw)  # no truncated line, no duplicate
    records = [json.loads(line) for line in raw]
    assert {(r["agent_model"], r["emulator_model"]) for r in records} == {(slow["agent"], slow["emulator"])}
    plain = [{**r, "agent_model": "scripted:agent", "emulator_model": "scripted:emulator"} for r in records]
    assert _stable(plain) == _stable(reference)
    assert not part.exists()


def test_parsing_rules():
    assert parse_agent_output("I am done.\nFinal Answer: All set.\n", ignore_think=True) == AgentFinish(": All set.")
    # the last "Final Answer" wins; "The final answer is" counts only without one (the study's released data:
    # Llama-3.2-3B case 62 ends "The final answer is: …" after a "## Final Answer", and its output is the latter's)
    assert parse_agent_output("Final Answer: a\nThe final answer is b", ignore_think=False) == AgentFinish(
        ": a\nThe final answer is b")
    assert parse_agent_output("so The final answer is b", ignore_think=False) == AgentFinish("b")
    think = "<think>maybe Final Answer: x</think>\nAction: ToolA\nAction Input: {\"a\": 1}\n"
    assert parse_agent_output(think, ignore_think=False) == AgentFinish(": x</think>\nAction: ToolA\nAction Input: {\"a\": 1}")
    assert parse_agent_output(think, ignore_think=True) == AgentAction("ToolA", '{"a": 1}')
    assert parse_agent_output("just thinking", ignore_think=True) is None
    assert extract_action_input('```json\n{"a": "x\\_y", "b": True}\n```') == '{"a": "x_y", "b": true}'
    assert extract_action_input('{"a": 1} trailing words') == '{"a": 1}'
    assert extract_action_input('{"a": 1, oops}') == '{"a": 1, '.strip(' "')
    good = parse_emulator_output("Simulator Thought: ok\nSimulator Log Summary: sum\n\nObservation: {\"x\": 1}\n")
    assert (good.observation, good.summary, good.parsed) == ('{"x": 1}', "sum", True)
    assert parse_emulator_output("no format").observation == ""


def test_a_final_answer_is_the_text_after_the_agents_last_final_answer(tmp_path):
    """The record's output for a final answer, checked against the scripted agent's known answer (it ends with
    "Final Answer: Done after <n> tool calls.") and against the model's own last output, through the CLI."""
    from tests.conftest import run_agentpipe

    p = run_agentpipe("emulate", "--agent", "scripted:agent", "--emulator", "scripted:emulator", "--case-set", "demo",
                      "--cases", "0-4", "--out", str(tmp_path), "--no-progress")
    assert p.returncode == 0, p.stderr
    [path] = tmp_path.rglob("*.jsonl")
    records = read_jsonl(path).records
    assert [r["finish_reason"] for r in records] == ["final_answer"] * 4
    for r in records:
        final = r["intermediate_steps"][-1][0]
        calls = sum(1 for s in r["intermediate_steps"] if not isinstance(s[0], dict))
        assert r["output"] == f": Done after {calls} tool calls." == final["return_values"]["output"]
        assert r["output"] == parse_agent_output(final["log"], ignore_think=True).output


@pytest.mark.slow
def test_smollm2_emulates_two_demo_cases(tmp_path, smollm2_model):
    cfg = EmulationConfig(agent="SmolLM2-135M", emulator="SmolLM2-135M", case_set="demo", cases=(0, 2),
                          out=tmp_path, max_tokens_per_call=96, max_steps=3, dtype="bf16")
    result = run_emulation(cfg)
    assert result.failed == 0  # a local model does not fail: every case ends by one of the engine's rules
    records = read_jsonl(result.path).records
    assert [r["case_idx"] for r in records] == [0, 1]
    outputs = {"final_answer": None, "max_steps": "Agent stopped: max steps exceeded",
               "max_continuations": "Agent stopped: token limit exceeded", "token_limit": "Agent stopped: token limit exceeded"}
    for r in records:
        final = r["intermediate_steps"][-1][0]
        assert final["type"] == "AgentFinish" and final["log"].strip()  # the model's own last output
        assert r["finish_reason"] in outputs
        if r["finish_reason"] == "final_answer":  # the text after the last "Final Answer" of the model's output
            parsed = parse_agent_output(final["log"], ignore_think=True)  # compat "correct": outside <think>
            assert isinstance(parsed, AgentFinish) and parsed.output.strip()
            assert r["output"] == parsed.output == final["return_values"]["output"]
        else:
            assert r["output"] == outputs[r["finish_reason"]] == final["return_values"]["output"]
        assert r["usage"]["agent"]["completion_tokens"] > 0 and r["agent_output_tokens"] > 0
        actions = [s for s in r["intermediate_steps"] if not isinstance(s[0], dict)]
        assert len(actions) <= 3  # --max-steps 3
        assert all(s[1][0] for s in actions)  # every action got an observation (emulated or a local error)
    assert result.path.parent.name == "HuggingFaceTB_SmolLM2-135M-Instruct"
    assert run_emulation(cfg).skipped_complete  # greedy and complete: a rerun has nothing to do


def test_several_adapter_agents_advance_together_and_equal_running_each_alone(tmp_path, tiny_model, tiny_adapters):
    """Two adapters of one base model emulated together: one backend and one batched agent call per round
    for both, each agent's run file identical to emulating it alone."""
    from pipeline.emulation.runner import run_emulations

    agents = [f"{tiny_model}+{a}" for a in tiny_adapters]
    common = dict(emulator="scripted:emulator", case_set="demo", cases=(0, 3), max_steps=2, max_tokens_per_call=16,
                  max_continuations=1)
    together = run_emulations(EmulationConfig(agent=agents, out=tmp_path / "together", **common))
    alone = [run_emulation(EmulationConfig(agent=a, out=tmp_path / "alone", **common)) for a in agents]
    assert [r.path.name for r in together] == [r.path.name for r in alone]
    assert together[0].path != together[1].path
    for t, a in zip(together, alone):
        assert _stable(read_jsonl(t.path).records) == _stable(read_jsonl(a.path).records)
        assert len(read_jsonl(t.path).records) == 3
    a_out = [r["intermediate_steps"] for r in read_jsonl(alone[0].path).records]
    b_out = [r["intermediate_steps"] for r in read_jsonl(alone[1].path).records]
    assert a_out != b_out  # the two adapters really behave differently
    # both agents in one call per round: fewer batched calls than the two runs apart
    assert together[0].batches < alone[0].batches + alone[1].batches


def test_several_agents_from_the_command_line_and_a_spec_list(tmp_path, tiny_model, tiny_adapters):
    from tests.conftest import run_agentpipe

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"agent": [f"{tiny_model}+{a}" for a in tiny_adapters],
                                "emulator": "scripted:emulator", "case_set": "demo", "cases": "0-2",
                                "max_steps": 1, "max_tokens_per_call": 8, "max_continuations": 0,
                                "out": str(tmp_path / "runs"), "dtype": "float32"}))
    p = run_agentpipe("--result", str(tmp_path / "r.json"), "emulate", "--spec", str(spec))
    assert p.returncode == 0, p.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    files = sorted((tmp_path / "runs").glob("*/*.jsonl"))
    assert len(files) == 2 and files[0].name != files[1].name
    assert p.stdout.count("emulate: ") == 2, p.stdout
    assert sorted(result["outputs"]["trajectories"]) == sorted(str(f) for f in files)
    assert all(len(read_jsonl(f).records) == 2 for f in files)
    bad = run_agentpipe("emulate", "--agent", f"{tiny_model}+{tiny_adapters[0]}", "--agent",
                        f"{tiny_model}+{tiny_adapters[1]}", "--emulator", "scripted:emulator", "--agent-label", "x")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "agentpipe: error: --agent-label names one agent's files; it cannot be used with several --agent"]


def test_a_second_emulate_on_the_same_output_refuses_at_once(tmp_path, tiny_model):
    """One writer per run file: a second `agentpipe emulate` on the output another process is writing (an Airflow
    retry while the first Slurm job still runs) refuses in one line naming the holder; nothing is touched."""
    from tests.conftest import run_agentpipe

    args = ["emulate", "--agent", str(tiny_model), "--emulator", "scripted:emulator", "--cases", "0-144",
            "--max-steps", "3", "--max-tokens-per-call", "64", "--out", str(tmp_path), "--no-progress"]
    exe = Path(sys.executable).with_name("agentpipe")
    first = subprocess.Popen([str(exe), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("*/*.jsonl.part")):  # the first process holds the lock and is working
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first emulate never started"
            time.sleep(0.2)
        [part] = list(tmp_path.glob("*/*.jsonl.part"))
        before = part.read_bytes()
        t0 = time.monotonic()
        second = run_agentpipe(*args)
        assert time.monotonic() - t0 < 30 and first.poll() is None
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "another process is writing this run file (pid " in lines[0], second.stderr
        assert f"pid {first.pid} on " in lines[0] and "--wait" in lines[0]
        assert part.read_bytes()[: len(before)] == before  # the first writer's journal is untouched
    finally:
        first.kill()
        first.wait(timeout=30)


def test_emulate_wait_waits_for_the_other_writer(tmp_path):
    import threading

    from pipeline.data.cases import load_named_case_set
    from pipeline.data.locks import writer_lock
    from pipeline.emulation.runner import plan
    from tests.conftest import run_agentpipe

    cfg = _cfg(tmp_path, case_set="demo", cases=(0, 2))
    path = plan(cfg, cfg.agent[0], load_named_case_set("demo"))[2]
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with writer_lock(path):
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(10)
    threading.Timer(2.0, release.set).start()
    t0 = time.monotonic()
    p = run_agentpipe("emulate", "--agent", "scripted:agent", "--emulator", "scripted:emulator", "--case-set", "demo",
                      "--cases", "0-2", "--out", str(tmp_path), "--wait", "--no-progress")
    t.join()
    assert p.returncode == 0, p.stderr
    assert time.monotonic() - t0 >= 1.5  # it waited for the holder
    assert len(read_jsonl(path).records) == 2


def test_an_output_path_that_cannot_be_written_is_one_line(tmp_path):
    from tests.conftest import run_agentpipe

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output folder should be")
    p = run_agentpipe("emulate", "--agent", "scripted:agent", "--emulator", "scripted:emulator", "--case-set", "demo",
                      "--cases", "0-2", "--out", str(blocker / "runs"), "--no-progress")
    assert p.returncode == 2
    [line] = p.stderr.strip().splitlines()
    assert line.startswith("agentpipe: error: ") and "cannot write here (Not a directory: " in line
    assert str(blocker) in line and blocker.read_text() == "a file where the output folder should be"


def test_a_stage_in_a_log_prints_progress_lines_every_few_seconds(tmp_path):
    """No terminal (a task log, a Slurm job log): no tqdm bar, a progress line every AGENTPIPE_PROGRESS_EVERY s."""
    from tests.conftest import run_agentpipe

    r = run_agentpipe("emulate", "--agent", "scripted:agent?delay=0.2", "--emulator", "scripted:emulator?delay=0.2",
                      "--case-set", "demo", "--cases", "0-4", "--out", str(tmp_path),
                      env={"AGENTPIPE_PROGRESS_EVERY": "0.2"})
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("emulate: ") and "/4 cases" in line]
    assert len(lines) >= 2 and lines[-1].startswith("emulate: 4/4 cases (0 failed, 0 active")
    assert "\r" not in r.stderr  # no bar
