import json

import pytest

from pipeline.data.cases import case_set_paths, load_case_set, load_named_case_set, serialize
from pipeline.data.jsonl import JsonlAppender, atomic_write_json, read_jsonl
from pipeline.data.records import EvalRecord, TrajectoryRecord
from pipeline.data.runfiles import find_run_files, load_evals, load_trajectories
from pipeline.data.toolkits import ToolInputError, validate_tool_input
from pipeline.errors import DataError


@pytest.fixture(scope="module")
def toolemu(data_dir):
    return load_named_case_set("toolemu", data_dir)


def test_toolemu_case_set_counts(toolemu):
    assert len(toolemu.cases) == 144 and len(toolemu.toolkits) == 38 and toolemu.tool_count() == 330
    assert [c.name for c in toolemu.cases] == [f"official_{i}" for i in range(144)]
    tool_names = [n for tk in toolemu.toolkits.values() for n in tk.tool_names()]
    assert len(set(tool_names)) == 330 and "TodoistSearchTasks" in tool_names


def test_cases_round_trip_to_the_toolemu_format(toolemu, data_dir):
    raw = json.loads((data_dir / "toolemu" / "all_cases.json").read_text())
    assert [c.to_json() for c in toolemu.cases] == raw


def test_demo_case_set_is_valid_and_covers_risk_types(data_dir):
    demo = load_named_case_set("demo")
    assert 6 <= len(demo.cases) <= 10
    risks = " ".join(o.split(":")[0].lower() for c in demo.cases for o in c.potential_risky_outcomes)
    for kind in ("data loss", "privacy", "financial", "physical"):
        assert kind in risks
    toolemu_names = {t["toolkit"] for t in json.loads(case_set_paths("toolemu", data_dir)[1].read_text())}
    assert not toolemu_names & set(demo.toolkits), "demo toolkits must be project-authored"


def test_serialized_prompt_inputs_match_the_released_records(toolemu, released_runs):
    """Every released trajectory echoes its case's serialised fields; ours must be identical (SPEC §1.1)."""
    checked = 0
    for rf in find_run_files(released_runs / "q32" / "Qwen_Qwen3-8B"):
        for t in load_trajectories(rf.path):
            inputs = toolemu.cases[t.case_idx].prompt_inputs()
            assert inputs["input"] == t.input
            assert inputs["underspecifications"] == t.underspecifications
            assert inputs["risky_outcome"] == t.risky_outcome
            assert inputs["risky_actions"] == t.risky_actions
            checked += 1
    assert checked == 144


def test_serialize_rules():
    assert serialize("x") == "x"
    assert serialize([]) is None and serialize({}) is None
    assert serialize(["a", "b"]) == "\n* a\n* b"
    assert serialize({"k": ["a"]}) == "\n- k: \n    * a"


def test_toolkit_description_levels(toolemu):
    tk = toolemu.toolkits["Todoist"]
    low, medium, high = (tk.description(d) for d in ("low", "medium", "high"))
    assert low.startswith("<Todoist>: ") and "\nTool APIs:\n\t* TodoistCreateTask: " in low
    assert "  Arguments: task_name (string), description (string, optional)" in low
    assert "\t\t- task_name (string): The name of the task.\n" in medium and "Exceptions" not in medium
    assert "\t  Exceptions:\n\t\t- " in high


def test_tool_input_validation(toolemu):
    tool = toolemu.toolkits["Todoist"].find_tool("TodoistCreateTask")
    assert validate_tool_input(tool, '{"task_name": "a", "priority": 2}') == {"task_name": "a", "priority": 2}
    cases = {
        '{"task_name": "a"': "Invalid format: ",
        '{"priority": 1}': "Missing required parameter: task_name.",
        '{"task_name": "a", "colour": "red", "bogus": 1}': "Unexpected parameters: {'bogus', 'colour'}.",
        '{"task_name": 5}': "Invalid type for task_name: int, expected str.",
        '["a"]': "Invalid format: expected a JSON object",
    }
    for raw, message in cases.items():
        with pytest.raises(ToolInputError) as e:
            validate_tool_input(tool, raw)
        assert str(e.value).startswith(message), (raw, str(e.value))
    # "number" accepts ints; JSON parsing is non-strict (raw control characters in strings are accepted)
    search = toolemu.toolkits["Todoist"].find_tool("TodoistSearchTasks")
    assert validate_tool_input(search, '{"keywords": "a\tb"}') == {"keywords": "a\tb"}


def test_released_records_validate(released_runs):
    rf = find_run_files(released_runs / "gpt5m" / "gpt-5")[0]
    trajs = load_trajectories(rf.path)
    evals = load_evals(rf.eval_files["agent_safe"])
    assert all(isinstance(t, TrajectoryRecord) and t.intermediate_steps[-1][0]["type"] == "AgentFinish" for t in trajs)
    assert all(isinstance(e, EvalRecord) and e.score("ToolCallRisk") in (0, 1, 2, 3) for e in evals)
    # extra fields survive a round trip (records are field-compatible, never renamed)
    dumped = evals[0].model_dump(by_alias=True, exclude_unset=True)
    assert set(dumped) == set(json.loads(rf.eval_files["agent_safe"].read_text().splitlines()[0]))


def test_replicate_scores_use_the_median():
    rec = EvalRecord.model_validate({"eval_id": 0, "replicates": [
        {"eval_scores": {"Helpfulness": 1}}, {"eval_scores": {"Helpfulness": 1}}, {"eval_scores": {"Helpfulness": 3}},
        {"error": "boom"}]})
    assert rec.replicate_scores("Helpfulness") == [1, 1, 3, None]
    assert rec.score("Helpfulness") == 1 and rec.score("Helpfulness", "mean") == pytest.approx(5 / 3)
    assert EvalRecord.model_validate({"eval_id": 0, "eval_scores": {}}).score("Helpfulness") is None


def test_atomic_json_write_replaces_whole_file(tmp_path):
    p = tmp_path / "a" / "m.json"
    atomic_write_json(p, {"x": 1})
    atomic_write_json(p, {"x": 2})
    assert json.loads(p.read_text()) == {"x": 2}
    assert [f.name for f in p.parent.iterdir()] == ["m.json"]  # no temp files left behind


def test_appender_repairs_a_truncated_tail_and_reader_reports_it(tmp_path):
    p = tmp_path / "r.jsonl"
    with JsonlAppender(p) as out:
        out.append({"i": 0}, {"i": 1})
    with open(p, "a") as f:
        f.write('{"i": 2, "trunc')  # what a crash mid-write leaves
    content = read_jsonl(p)
    assert [r["i"] for r in content.records] == [0, 1] and content.truncated_line == 3
    with pytest.raises(DataError, match=r"r.jsonl: line 3 is truncated"):
        read_jsonl(p, allow_truncated_tail=False)
    with JsonlAppender(p) as out:  # reopening cuts the broken line, then appends cleanly
        out.append({"i": 2})
    assert [r["i"] for r in read_jsonl(p, allow_truncated_tail=False).records] == [0, 1, 2]


def test_appender_keeps_a_complete_record_missing_its_newline(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"i": 0}\n{"i": 1}')
    with JsonlAppender(p) as out:
        out.append({"i": 2})
    assert [r["i"] for r in read_jsonl(p).records] == [0, 1, 2]


def test_bad_line_in_the_middle_is_an_error(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"i": 0}\nnot json\n{"i": 2}\n')
    with pytest.raises(DataError, match=r"r.jsonl: line 2 is not valid JSON"):
        read_jsonl(p)


def test_unknown_toolkit_in_a_case_is_one_clear_error(tmp_path, data_dir):
    cases = json.loads((data_dir / "toolemu" / "all_cases.json").read_text())[:3]
    cases[2]["Toolkits"] = ["Todoist", "NoSuchKit"]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    with pytest.raises(DataError) as e:
        load_case_set(tmp_path / "cases.json", data_dir / "toolemu" / "all_toolkits.json")
    msg = str(e.value)
    assert "cases.json: case 2 (official_2): field 'Toolkits': unknown toolkit 'NoSuchKit'" in msg
    assert "\n" not in msg
