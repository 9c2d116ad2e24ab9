"""The study's engine rules found by replaying the finetuned models' released trajectories (docs/compat.md).

Each test drives a small hand-written episode through the real engine (``Episode`` + ``advance``) with the
recorded-output backend (``ReplayBackend``), or calls the parsing function, and asserts the study's result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.data.records import OOM_OUTPUT
from pipeline.emulation.parsing import clean_agent_output, study_action_input
from pipeline.emulation.replay import agent_outputs, replay_runs

_NAME = "m_emu-Qwen_Qwen3-8B_eval-Qwen_Qwen3-32B_r0-1_0101_000000.jsonl"


@pytest.fixture(scope="module")
def case0(data_dir) -> dict[str, Any]:
    """ToolEmu case 0 (toolkit Todoist)."""
    return json.loads((data_dir / "toolemu" / "all_cases.json").read_text())[0]


def _replay(tmp_path: Path, case: dict[str, Any], steps: list[Any], output: str, compat: str = "study"):
    """Replay one recorded episode of case 0; the report's first difference (None when identical)."""
    record = {"output": output, "intermediate_steps": steps, "case": case, "case_idx": 0}
    path = tmp_path / _NAME
    path.write_text(json.dumps(record) + "\n")
    report = replay_runs(tmp_path, compat, files=[path])
    assert report.total == 1
    return report.differences[0] if report.differences else None


def _finish(log: str) -> list[Any]:
    return [{"return_values": {"output": ": done"}, "log": log, "type": "AgentFinish"}, ""]


def _local(tool: str, tool_input: str, log: str, message: str) -> list[Any]:
    error = '{"error": "InvalidRequestException: ' + message + '"}'
    return [[tool, tool_input, log], [error, "", error]]


def test_the_action_input_is_toolemus_first_json_object():
    # only a fence holding a JSON object is unwrapped: a code block after the input is no fence around it
    text = '{"name": "John"}  # search\n```\n\nPlease wait for the observation.\n\n```python\nimport json\n'
    assert study_action_input(text) == '{"name": "John"}'
    assert study_action_input('```json\n{"a": 1}\n```') == '{"a": 1}'
    # a slip is fixed everywhere once parsing stops at it ("True" inside a string too), and kept when the rest
    # still does not parse
    assert study_action_input('{"a": True, "b": "True"}\n') == '{"a": true, "b": "true"}\n'
    assert study_action_input('{"a": "\\_x", "b"}') == '{"a": "_x", "b"}'
    assert study_action_input('{"a": 1}\nObservation: {"b": 2}\n') == '{"a": 1}'  # cut after the object
    assert study_action_input('"plain text" ') == "plain text"


def test_a_json_input_that_is_no_object_gets_the_python_error(tmp_path, case0):
    log = 'Action: TodoistSearchTasks\nAction Input: ["Test", "x"]\n'
    steps = [_local("TodoistSearchTasks", '["Test", "x"]\n', log, "'list' object has no attribute 'keys'"),
             _finish("Final Answer: done\n")]
    assert _replay(tmp_path, case0, steps, ": done") is None
    diff = _replay(tmp_path, case0, steps, ": done", compat="correct")  # the project's own message
    assert diff["kind"] == "observation" and "Invalid format" in diff["detail"]


def test_an_out_of_memory_call_after_a_step_ends_a_partial_trajectory(tmp_path, case0):
    log = "I create it first.\nAction: TodoistCreateTask\nAction Input: {}\n"
    steps = [_local("TodoistCreateTask", "{}\n", log, "Missing required parameter: task_name."),
             [["[OOM]", "", log], ["[OOM]", "", "[OOM]"]]]  # the next agent call ran out of memory
    assert _replay(tmp_path, case0, steps, OOM_OUTPUT) is None
    assert _replay(tmp_path, case0, steps, OOM_OUTPUT, compat="correct")["kind"] == "engine error"


def test_an_out_of_memory_continuation_records_the_accumulated_output(tmp_path, case0):
    joined = "I cannot parse this.\nStill thinking about it"  # a first output, then a continuation's
    steps = [[["[OOM]", "", joined], ["[OOM]", "", "[OOM]"]]]
    record = {"output": OOM_OUTPUT, "intermediate_steps": steps}
    assert agent_outputs(record) == ["I cannot parse this.\n", "Still thinking about it"]
    assert _replay(tmp_path, case0, steps, OOM_OUTPUT) is None


def test_an_out_of_memory_episode_is_recorded_as_the_study_did(case0):
    from pipeline.data.cases import Case
    from pipeline.data.toolkit_registry import toolkit_registry
    from pipeline.emulation.compat import get_compat
    from pipeline.emulation.episode import Episode, Limits
    from pipeline.llm import ChatResponse

    case = Case.model_validate(case0)
    kits = [toolkit_registry()[n] for n in case.toolkits]
    episodes = {c: Episode(case_idx=0, case=case, toolkits=kits, compat=get_compat(c), limits=Limits(max_attempts=1),
                           mode="adversarial") for c in ("study", "correct")}
    for ep in episodes.values():
        ep.feed("agent", ChatResponse(text="Thinking only", finish_reason="stop"))  # unparseable: continue
        ep.feed("agent", ChatResponse.failure("generation failed: OutOfMemoryError: CUDA out of memory"))
    rec = episodes["study"].record({})
    assert rec["output"] == OOM_OUTPUT and "input" not in rec and "underspecifications" not in rec
    assert rec["intermediate_steps"] == [[["[OOM]", "", "Thinking only\n"], ["[OOM]", "", "[OOM]"]]]
    assert episodes["correct"].record({})["error_type"] == "LLMError"


def test_a_repeated_thought_prefix_is_dropped_without_the_space_after_it(tmp_path, case0):
    assert clean_agent_output("  Thought: Done.\n", keep_space=True) == " Done.\n"
    assert clean_agent_output("  Thought: Done.\n") == "Done.\n"  # the project's default
    log = " A task first.\nAction: TodoistCreateTask\nAction Input: {}\n"  # the model wrote "Thought: A task"
    steps = [_local("TodoistCreateTask", "{}\n", log, "Missing required parameter: task_name."),
             _finish(" Done.\nFinal Answer: done\n")]
    assert agent_outputs({"output": ": done", "intermediate_steps": steps})[0] == "Thought:" + log
    from pipeline.emulation.replay import ReplayBackend
    from pipeline.data.cases import Case
    from pipeline.data.toolkit_registry import toolkit_registry
    from pipeline.emulation.compat import get_compat
    from pipeline.emulation.episode import Episode, Limits
    from pipeline.emulation.runner import advance

    case = Case.model_validate(case0)
    record = {"output": ": done", "intermediate_steps": steps, "case": case0, "case_idx": 0}
    ep = Episode(case_idx=0, case=case, toolkits=[toolkit_registry()[n] for n in case.toolkits],
                 compat=get_compat("study"), limits=Limits(max_attempts=1), mode="adversarial")
    backend = ReplayBackend(records=[record])
    advance([ep], {"agent": backend, "emulator": backend})
    assert ep.record({})["intermediate_steps"] == steps  # the logs keep their space, byte for byte
