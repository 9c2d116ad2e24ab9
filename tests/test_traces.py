"""Trajectories as MLflow traces with the judge's assessments, and human labels pulled back (issue 17, items 1-2).

Against the session's real MLflow server: a scripted (test-double) agent, emulator and judge make a small judged
run; ``report`` logs its traces through its journal; ``track traces`` adds nothing the second time, replaces a
trace whose judgements changed, and a trace journaled while the server was down arrives on sync.
"""

import json
import statistics
from pathlib import Path

import pytest

from tests.conftest import run_agentpipe

pytestmark = pytest.mark.usefixtures("mlflow_server")


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


@pytest.fixture(scope="module")
def judged_run(tmp_path_factory, mlflow_server):
    """A judged run of 3 demo cases (agent label unique to this module) and its report, logged to MLflow."""
    home = tmp_path_factory.mktemp("traces-home")
    env = {"AGENTPIPE_HOME": str(home), "MLFLOW_TRACKING_URI": mlflow_server}
    r = run_agentpipe("emulate", "--agent", "scripted:agent", "--agent-label", "traced-agent", "--emulator",
                      "scripted:emulator", "--case-set", "demo", "--cases", "0-3", env=env)
    assert r.returncode == 0, r.stderr
    raw = next((home / "trajectories" / "traced-agent").glob("*_eval-none_*.jsonl"))
    r = run_agentpipe("evaluate", "--trajectories", str(raw), "--evaluator", "scripted:judge", "--replicates", "2",
                      "--temperature", "0.7", env=env)
    assert r.returncode == 0, r.stderr
    r = run_agentpipe("report", "--runs", str(home / "trajectories"), env=env)
    assert r.returncode == 0, r.stderr
    judged = next((home / "trajectories" / "traced-agent").glob("*_eval-judge_*[0-9].jsonl"))
    return home, env, judged


def _traces(uri, path):
    """The traces of one trajectory file (by its absolute path)."""
    c = _client(uri)
    exp = c.get_experiment_by_name("evaluation")
    return c.search_traces([exp.experiment_id], filter_string=f"tags.`agentpipe.run_path` = '{path.resolve()}'",
                           max_results=100)


def test_report_logs_one_trace_per_trajectory_with_spans_and_judge_assessments(judged_run, mlflow_server):
    home, _, judged = judged_run
    records = [json.loads(line) for line in judged.read_text().splitlines()]
    traces = {int(t.info.tags["case_idx"]): t for t in _traces(mlflow_server, judged)}
    assert sorted(traces) == sorted(r["case_idx"] for r in records) == [0, 1, 2]
    report = json.loads(next((home / "reports").rglob("*traced-agent*_unified_report.json")).read_text())
    report_run = _client(mlflow_server).search_runs(
        [_client(mlflow_server).get_experiment_by_name("evaluation").experiment_id],
        filter_string="tags.agent = 'traced-agent'")[0].info.run_id
    evals = {t: [json.loads(x) for x in judged.with_name(judged.name[:-6] + f"_eval_{t}.jsonl").read_text()
                 .splitlines()] for t in ("agent_safe", "agent_help_ignore_safety")}
    for rec in records:
        tr = traces[rec["case_idx"]]
        assert tr.info.request_metadata["mlflow.sourceRun"] == report_run  # linked to the model's evaluation run
        spans = tr.data.spans
        root = next(s for s in spans if s.parent_id is None)
        assert root.span_type == "AGENT" and root.inputs["instruction"] == rec["input"]
        tools = [s for s in spans if s.span_type == "TOOL"]
        tool_steps = [st for st in rec["intermediate_steps"] if isinstance(st[0], list)]
        assert [s.name for s in tools] == [st[0][0] for st in tool_steps]
        assert [json.dumps(s.outputs["observation"]) for s in tools] == \
               [json.dumps(json.loads(st[1][0])) for st in tool_steps]
        assert len([s for s in spans if s.span_type == "LLM"]) == len(rec["intermediate_steps"])
        # every replicate of every judgement is an assessment with the judge's thought as rationale
        got = sorted((a.name, a.metadata["replicate"], a.value, a.rationale, a.source.source_type, a.source.source_id)
                     for a in tr.info.assessments)
        want = []
        for t, name in (("agent_safe", "ToolCallRisk"), ("agent_help_ignore_safety", "Helpfulness")):
            ev = next(e for e in evals[t] if records[e["eval_id"]]["case_idx"] == rec["case_idx"])
            key = "ToolCallRisk" if t == "agent_safe" else "Helpfulness"
            for i, rep in enumerate(ev["replicates"]):
                value = (rep.get("eval_scores") or {}).get(key)
                want.append((name, str(i), None if value is None else float(value), rep["Evaluator Thought"],
                             "LLM_JUDGE", "scripted:judge"))
        assert got == sorted(want)
    # a judgement that did not parse is an assessment with an error, not a missing one
    failed = [a for t in traces.values() for a in t.info.assessments if a.value is None]
    n_failed = sum(rep.get("status") == "parse_failed" for es in evals.values() for e in es for rep in e["replicates"])
    assert n_failed > 0 and len(failed) == n_failed and all(a.error.error_code == "PARSE_FAILED" for a in failed)
    assert report["meta"]["agent"] == "traced-agent"


def test_logging_again_adds_nothing_and_changed_judgements_are_replaced_in_place(judged_run, mlflow_server,
                                                                                  tmp_path):
    import shutil

    import mlflow
    from mlflow.entities import AssessmentSource

    home, env, judged = judged_run
    before = {t.info.trace_id for t in _traces(mlflow_server, judged)}
    r = run_agentpipe("track", "traces", str(home / "trajectories"), env=env)
    assert r.returncode == 0, r.stderr
    assert "3 traces (0 logged" in r.stdout
    assert {t.info.trace_id for t in _traces(mlflow_server, judged)} == before
    # a repair changed one judgement of a trace a reviewer had labelled: the judge's assessments are replaced,
    # the trace (its id) and the reviewer's label stay
    epath = judged.with_name(judged.name[:-6] + "_eval_agent_help_ignore_safety.jsonl")
    lines = [json.loads(x) for x in epath.read_text().splitlines()]
    records = [json.loads(x) for x in judged.read_text().splitlines()]
    case = records[lines[1]["eval_id"]]["case_idx"]
    traces = {int(t.info.tags["case_idx"]): t for t in _traces(mlflow_server, judged)}
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.log_feedback(trace_id=traces[case].info.trace_id, name="Helpfulness", value=1, rationale="kept",
                        source=AssessmentSource(source_type="HUMAN", source_id="keeper@lab"))
    lines[1]["replicates"][0]["eval_scores"]["Helpfulness"] = 0
    lines[1]["replicates"][0]["Evaluator Thought"] = "Re-judged: the agent did not finish the task."
    epath.write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = run_agentpipe("track", "traces", str(judged), env=env)
    assert r.returncode == 0, r.stderr
    assert "3 traces (0 logged, 1 with new judgements, 2 already there)" in r.stdout
    after = {int(t.info.tags["case_idx"]): t for t in _traces(mlflow_server, judged)}
    assert {t.info.trace_id for t in after.values()} == before
    helpfulness = [a for a in after[case].info.assessments if a.name == "Helpfulness"]
    judge = sorted((a.metadata["replicate"], a.value) for a in helpfulness if a.source.source_type == "LLM_JUDGE")
    assert judge[0] == ("0", 0.0) and len(judge) == 2  # the old replicate 0 is gone, not beside the new one
    assert next(a for a in helpfulness if a.source.source_type == "LLM_JUDGE" and a.metadata["replicate"] ==
                "0").rationale.startswith("Re-judged")
    [kept] = [a for a in helpfulness if a.source.source_type == "HUMAN"]
    assert (kept.value, kept.rationale) == (1.0, "kept")
    mlflow.delete_assessment(trace_id=kept.trace_id, assessment_id=kept.assessment_id)  # other tests count labels
    # a file of the same name in another folder (another experiment's runs) is another set of traces
    other = tmp_path / "other-experiment" / judged.parent.name
    other.mkdir(parents=True)
    for f in judged.parent.glob(judged.name[:-6] + "*.jsonl"):
        shutil.copy(f, other / f.name)
    r = run_agentpipe("track", "traces", str(other / judged.name), env=env)
    assert r.returncode == 0, r.stderr
    assert "3 traces (3 logged" in r.stdout
    assert len(_traces(mlflow_server, other / judged.name)) == 3
    assert {t.info.trace_id for t in _traces(mlflow_server, judged)} == before


def test_traces_journaled_while_the_server_is_down_arrive_on_sync(judged_run, mlflow_server, tmp_path):
    import shutil

    from pipeline.tracking import Tracker, sync

    _, _, judged = judged_run
    copy_dir = tmp_path / "other-agent"
    copy_dir.mkdir()
    copy = copy_dir / judged.name.replace("traced-agent", "offline-agent")
    for f in judged.parent.glob(judged.name[:-6] + "*.jsonl"):
        shutil.copy(f, copy_dir / f.name.replace("traced-agent", "offline-agent"))
    with Tracker.open(tmp_path / "journal", experiment="evaluation", run_name="offline",
                      tracking_uri="http://127.0.0.1:9") as t:  # nothing listens on port 9
        t.log_traces(copy)
    assert _traces(mlflow_server, copy) == []
    report = sync(tmp_path / "journal", mlflow_server)
    assert report.pending == 0 and not report.rejected
    traces = _traces(mlflow_server, copy)
    assert len(traces) == 3
    assert {t.info.request_metadata["mlflow.sourceRun"] for t in traces} == {report.run_id}
    assert sync(tmp_path / "journal", mlflow_server).sent == 0


def test_human_labels_are_pulled_and_reported_beside_the_judge(judged_run, mlflow_server, tmp_path):
    import mlflow
    from mlflow.entities import AssessmentSource

    home, env, judged = judged_run
    # the judge's score per case (median of the replicates, as pairs use) from the eval file
    records = [json.loads(x) for x in judged.read_text().splitlines()]
    safe = [json.loads(x) for x in judged.with_name(judged.name[:-6] + "_eval_agent_safe.jsonl").read_text()
            .splitlines()]
    judge = {}
    for e in safe:
        vals = [rep["eval_scores"]["ToolCallRisk"] for rep in e["replicates"]
                if (rep.get("eval_scores") or {}).get("ToolCallRisk") is not None]
        judge[records[e["eval_id"]]["case_idx"]] = int(statistics.median(vals)) if vals else None
    scored = [c for c, v in sorted(judge.items()) if v is not None]
    assert len(scored) >= 2, judge
    traces = {int(t.info.tags["case_idx"]): t for t in _traces(mlflow_server, judged)}
    mlflow.set_tracking_uri(mlflow_server)
    # what the UI's "add feedback" sends: a HUMAN-sourced assessment on the trace; one agrees, one does not
    human = {scored[0]: judge[scored[0]], scored[1]: (judge[scored[1]] + 2) % 4}
    for c, value in human.items():
        mlflow.log_feedback(trace_id=traces[c].info.trace_id, name="ToolCallRisk", value=value, rationale="reviewed",
                            source=AssessmentSource(source_type="HUMAN", source_id="reviewer@lab"))
    # a label that is not a score (the UI accepts text) is skipped with a warning, not a crash
    mlflow.log_feedback(trace_id=traces[scored[0]].info.trace_id, name="ToolCallRisk", value="unsafe",
                        source=AssessmentSource(source_type="HUMAN", source_id="typo@lab"))
    labels = tmp_path / "labels.jsonl"
    r = run_agentpipe("track", "feedback", "--out", str(labels), env=env)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in labels.read_text().splitlines()]
    mine = [row for row in rows if row["run_file"] == judged.name]
    assert {(row["case_idx"], row["human"], row["reviewer"], row["judge"]) for row in mine} == \
           {(c, v, "reviewer@lab", judge[c]) for c, v in human.items()}
    # report: judge-human agreement on the labelled trajectories (one of two agrees)
    r = run_agentpipe("report", "--runs", str(home / "trajectories"), "--out", str(tmp_path / "reports"),
                      "--human-labels", str(labels), "--no-track", env=env)
    assert r.returncode == 0, r.stderr
    rep = json.loads(next((tmp_path / "reports").rglob("*traced-agent*_unified_report.json")).read_text())
    got = rep["human_agreement"]["agent_safe"]
    assert got["labels"] == 2 and got["accuracy"] == 0.5
    assert "agent_help_ignore_safety" not in rep["human_agreement"]  # nobody labelled helpfulness
    r = run_agentpipe("report", "--runs", str(home / "trajectories"), "--out", str(tmp_path / "r2"),
                      "--human-labels", str(tmp_path / "missing.jsonl"), env=env)
    assert r.returncode != 0 and "--human-labels" in r.stderr and "Traceback" not in r.stderr


def test_traces_are_logged_in_bulk_one_request_per_trace_and_a_rerun_only_searches(judged_run, mlflow_server,
                                                                                  tmp_path, monkeypatch):
    """Issue 24: the spans of many traces go in one request and each trace's info (tags, metadata, assessments)
    in one more; the existing traces of a folder are found by one search. The old path made ~10 requests per
    trace (one per span, a read-back, one per assessment, one for the tag)."""
    import shutil

    import requests

    from pipeline.tracking.traces import COMPLETE_TAG, log_files_traces

    _, _, judged = judged_run
    folder = tmp_path / "traced-agent"
    folder.mkdir()
    copies = []
    base = judged.name[:-len(".jsonl")]
    for i in range(2):  # two trajectory files of one folder (time-stamped names), each with its eval files
        for src in judged.parent.glob(base + "*.jsonl"):
            shutil.copy(src, folder / src.name.replace(base, f"{base}_0101_00000{i}"))
        copies.append(folder / f"{base}_0101_00000{i}.jsonl")
    sent: list[str] = []
    original = requests.Session.send

    def counting_send(session, request, **kw):
        sent.append(request.url)
        return original(session, request, **kw)

    monkeypatch.setattr(requests.Session, "send", counting_send)
    c = _client(mlflow_server)
    exp = c.get_experiment_by_name("evaluation").experiment_id
    reports = log_files_traces(c, mlflow_server, exp, copies, run_id=None)
    n = sum(r.traces for r in reports)
    assert n == 6 and sum(r.logged for r in reports) == 6
    assert sum("/v1/traces" in u for u in sent) == 1  # every span of the six traces in one OTLP request
    assert sum(u.endswith("/traces") and "/v1/" not in u for u in sent) <= n + 2, sent  # one info per trace
    assert len(sent) <= n + 4, sent
    for path in copies:
        traces = _traces(mlflow_server, path)
        assert len(traces) == 3 and all(t.info.tags[COMPLETE_TAG] == "true" for t in traces)
        assert all(len(t.info.assessments) == 4 and len(t.data.spans) >= 2 for t in traces)
    sent.clear()
    reports = log_files_traces(c, mlflow_server, exp, copies, run_id=None)
    assert [r.unchanged for r in reports] == [3, 3] and not any(r.logged for r in reports)
    assert len(sent) == 1, sent  # one search for the folder, none per file or per trace
