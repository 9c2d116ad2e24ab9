"""Replaying the study's released trajectories through the real episode engine (``pipeline.emulation.replay``).

The released runs are real LLM behaviour no double imitates (``<think>`` blocks, fenced JSON, invented
observations, continuations, exhausted budgets); replaying them pins the engine's study mode to the study and
measures what the project's defaults change.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.emulation.parsing import parse_agent_output, study_action_input
from pipeline.emulation.replay import (ReplayBackend, agent_outputs, replay_runs, split_continuation, split_lines,
                                       trajectory_files)
from pipeline.llm import ChatRequest, GenerationConfig
from tests.conftest import run_agentpipe


@pytest.fixture(scope="module")
def released(data_dir) -> Path:
    return data_dir / "paper" / "raw_data_by_eval"


def _sample(root: Path) -> list[Path]:
    """The first run file (15 cases) of each of the 25 models: a fixed sample of 375 trajectories."""
    files = [trajectory_files(d)[0] for d in sorted(root.iterdir()) if d.is_dir()]
    assert len(files) == 25
    return files


def test_every_released_q32_trajectory_replays_in_study_mode(released, tmp_path):
    details = tmp_path / "details.json"
    r = run_agentpipe("replay", "--runs", str(released / "q32"), "--compat", "study", "--out", str(details))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == ("replay: 3888 of 3888 trajectories identical (100.00 %); 1 set print order "
                                        "taken from the recording")
    report = json.loads(details.read_text())
    assert report["by_kind"] == {} and report["differences"] == [] and report["set_orders"] == 1
    assert report["finish_reasons"] == {"final_answer": 3817, "max_continuations": 59, "token_limit": 12}


def test_a_fixed_sample_of_all_25_models_pins_both_modes(released):
    files = _sample(released / "gpt5m")
    study = replay_runs(released / "gpt5m", "study", files=files)
    assert (study.identical, study.total) == (375, 375)
    correct = replay_runs(released / "gpt5m", "correct", files=files)
    assert (correct.identical, correct.total) == (166, 375)
    assert dict(correct.by_kind) == {"past the record": 207, "tool input": 2}
    cut = "its answer followed an observation the agent wrote itself (cut at the stop sequence)"
    assert dict(correct.reasons) == {cut: 207, "the action input is its first JSON object": 2}


def test_emulate_with_replay_backends_rebuilds_a_released_run_file(released, tmp_path):
    [source] = [f for f in trajectory_files(released / "q32" / "Qwen_Qwen3-8B") if "_r0-15_" in f.name]
    result = tmp_path / "r.json"
    p = run_agentpipe("--result", str(result), "emulate", "--agent", f"replay:{source}", "--emulator",
                      f"replay:{source}#Qwen_Qwen3-8B", "--compat", "study", "--cases", "0-15",
                      "--agent-label", "replayed",
                      "--out", str(tmp_path / "runs"), "--no-progress")
    assert p.returncode == 0, p.stderr
    rebuilt = [json.loads(x) for x in Path(json.loads(result.read_text())["outputs"]["trajectories"]).open()]
    recorded = [json.loads(x) for x in source.open()]
    keys = ("input", "underspecifications", "risky_outcome", "risky_actions", "output", "intermediate_steps",
            "case", "case_idx")
    assert [{k: r[k] for k in keys} for r in rebuilt] == [{k: r[k] for k in keys} for r in recorded]


def test_a_rebuilt_thought_text_is_a_difference_under_study_rules(released_results):
    """Under study rules every step's log is compared too (the full rehearsal found rebuilt episodes whose judge
    lookups missed on one action step's thought text): this finetuned episode ends that step with one blank line
    where the recording has two."""
    run = released_results / "match_eval_results" / "dpo_Llama3.1-8B_both_q32_beta-0.05_s1"
    [source] = [f for f in trajectory_files(run) if "_r116-130_" in f.name]
    report = replay_runs(run, "study", files=[source])
    assert (report.identical, report.total) == (6, 7)
    assert dict(report.by_kind) == {"log": 1} and report.examples["log"]["case_idx"] == 118
    assert report.examples["log"]["detail"].startswith("step 0: ")
    assert replay_runs(run, "correct", files=[source]).by_kind.get("log") is None  # compared under study rules only


def test_a_replayed_set_of_unexpected_names_prints_in_the_recordings_order(released, tmp_path):
    """Llama-3.2-3B, case 65: the study printed {'sender_information', 'package_details', …} in its process's hash
    order; the engine sorts, a replay through `emulate` takes the recording's order and rebuilds the episode."""
    [source] = [f for f in trajectory_files(released / "q32" / "meta-llama_Llama-3.2-3B-Instruct")
                if "_r60-74_" in f.name]
    result = tmp_path / "r.json"
    p = run_agentpipe("--result", str(result), "emulate", "--agent", f"replay:{source}", "--emulator",
                      f"replay:{source}#Qwen_Qwen3-8B", "--compat", "study", "--cases", "65-66",
                      "--agent-label", "replayed",
                      "--out", str(tmp_path / "runs"), "--no-progress")
    assert p.returncode == 0, p.stderr
    [rebuilt] = [json.loads(x) for x in Path(json.loads(result.read_text())["outputs"]["trajectories"]).open()]
    [recorded] = [r for r in map(json.loads, source.open()) if r["case_idx"] == 65]
    observation = recorded["intermediate_steps"][0][1][0]
    assert "{'sender_information', 'package_details', 'recipient_information'}" in observation  # not sorted
    assert rebuilt["intermediate_steps"] == recorded["intermediate_steps"]


def test_the_project_rules_print_the_names_sorted_even_in_a_replay(released):
    """--compat correct shows the project's own behaviour: sorted names, the recording's order not taken."""
    [source] = [f for f in trajectory_files(released / "q32" / "meta-llama_Llama-3.2-3B-Instruct")
                if "_r60-74_" in f.name]
    study, correct = (replay_runs(released / "q32", c, files=[source]) for c in ("study", "correct"))
    assert (study.set_orders, correct.set_orders) == (1, 0)


def test_one_episode_can_print_the_same_names_in_two_orders():
    """A set's order follows its insertion history too: each print takes the recording's next one."""
    from pipeline.emulation.replay import ReplayBackend

    def obs(names):
        return '{"error": "InvalidRequestException: Unexpected parameters: {' + ", ".join(map(repr, names)) + '}."}'

    steps = [[["T", "{}", "log"], [obs(n), "", obs(n)]] for n in (["b", "a"], ["a", "b"], ["c"])]
    backend = ReplayBackend(records=[{"case_idx": 7, "intermediate_steps": steps, "output": "done"}])
    order = backend.name_order(7)
    assert [order(["a", "b"]), order(["a", "b"]), order(["c"]), order(["a", "b"])] == [
        ["b", "a"], ["a", "b"], ["c"], ["a", "b"]]  # the last: nothing recorded left, sorted
    assert backend.reordered == {7: 1}
    assert backend.name_order(8)(["z", "y"]) == ["y", "z"]  # a case without such a record: sorted


def test_the_study_action_input_rules():
    assert study_action_input('{"a": 1}\n') == '{"a": 1}\n'  # parses whole: kept whole
    assert study_action_input('{"a": 1}\nObservation: {"b": 2}\n') == '{"a": 1}'  # more text: cut
    assert study_action_input('{"a": "x", "y"}\n') == '{"a": "x", "y"}\n'  # does not parse: kept whole
    assert study_action_input('```json\n{"a": 1}\n```\nthen more') == '{"a": 1}'  # fenced: unwrapped, stripped
    assert study_action_input('{"c": "grep \'a\\|b\'"}\n') == '{"c": "grep \'a|b\'"}\n'  # invalid escape fixed
    assert study_action_input('{"ok": True}') == '{"ok": true}'


def test_continuations_are_split_where_the_study_joined_them():
    # a first output (cleaned, ends with a newline) that does not parse, then the continuation as returned
    joined = "I need the observation first.\nAction: ToolA\nAction Input: {}"
    assert split_continuation(joined) == ["I need the observation first.\n", "Action: ToolA\nAction Input: {}"]
    assert split_continuation("Action: ToolA\nAction Input: {}\n") == ["Action: ToolA\nAction Input: {}\n"]
    assert split_lines("a\nb\nc\n", 6) == ["a\n", "b\n", "c\n", "", "", ""]
    assert "".join(split_lines("a\nb\nc\nd\ne\nf\ng\nh", 6)) == "a\nb\nc\nd\ne\nf\ng\nh"
    record = {"output": "Agent stopped: token limit exceeded",
              "intermediate_steps": [[{"log": "never\nparses\n", "return_values": {}, "type": "AgentFinish"}, ""]]}
    assert len(agent_outputs(record)) == 6  # the first call and its 5 continuations


def test_the_replay_backend_answers_per_case_and_role_and_then_fails():
    from pipeline.data import agent_prompt as agent_prompts

    record = {"case_idx": 3, "intermediate_steps": [
        [["ToolA", "{}", "Action: ToolA\nAction Input: {}\n"], ["{\"x\": 1}", "sum", "Simulator Log Summary: sum\n"
                                                                "Observation: {\"x\": 1}"]],
        [{"log": "Final Answer: done\n", "return_values": {"output": ": done"}, "type": "AgentFinish"}, ""]]}
    backend = ReplayBackend(records=[record])
    agent = ChatRequest(messages=[{"role": "system", "content": agent_prompts.SYSTEM}], config=GenerationConfig(),
                        tag=3, role="agent")
    emulator = ChatRequest(messages=[{"role": "system", "content": "You are the simulator."}],
                           config=GenerationConfig(), tag=3, role="emulator")
    a1, e1, a2, a3 = (backend.generate([r])[0] for r in (agent, emulator, agent, agent))
    assert a1.text.startswith("Action: ToolA") and e1.text.endswith('{"x": 1}') and a2.text == "Final Answer: done\n"
    assert not a3.ok and "no more recorded agent outputs for case 3" in a3.error
    stopped = ChatRequest(messages=agent.messages, config=GenerationConfig(stop=("\nObservation:",)), tag=4,
                          role="agent")
    backend = ReplayBackend(records=[{**record, "case_idx": 4, "intermediate_steps": [[{
        "log": "Action: ToolA\nAction Input: {}\nObservation: {}\nFinal Answer: made up\n", "return_values": {},
        "type": "AgentFinish"}, ""]]}])
    [cut] = backend.generate([stopped])
    assert cut.text == "Action: ToolA\nAction Input: {}" and backend.cut[4] == 1  # the answer after an invented step
    assert parse_agent_output(cut.text, ignore_think=True).tool == "ToolA"
