"""Trajectories as MLflow traces, judgements as their assessments (issue 17).

One judged trajectory (a line of a trajectory file) becomes one trace in the ``evaluation`` experiment:

* a root span (AGENT) named ``case <idx> <case name>`` whose inputs are the case (instruction, toolkits,
  underspecifications, risky outcomes and actions) and whose outputs are the final answer and why it ended;
* per step one LLM span (the agent's call: its raw output, the prompt version it was made with) and one TOOL span
  (the tool, its input, the emulated observation and the emulator's raw output); the final answer is a last LLM
  span. Times are laid out from the episode's recorded wall time and per-role latencies;
* per judgement an assessment (``ToolCallRisk``, ``Helpfulness`` for Help(Ignore), ``HelpfulnessSafetyAware`` for
  the safety-aware helpfulness), value = the score (None with an error when the judge's output did not parse),
  rationale = the judge's thought, source = LLM judge and its model; each replicate is its own assessment.

Traces carry ``agentpipe.trace_key`` (``<trajectory file's absolute path>#<case>``), the file's name and path, and
a digest of the judgements; logging a file again adds nothing, and when the judgements changed since (a repaired
evaluation, a metric judged later) the judge's assessments of the trace are replaced in place, so a trace never
shows stale judgements and keeps its id and the reviewers' labels. The ``report`` stage logs the traces of the files it reports through its tracking
journal (nothing lost while the server is down); ``agentpipe track traces DIR`` does it for any folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.jsonl import read_jsonl
from pipeline.data.naming import EVAL_TYPES, parse_run_filename
from pipeline.data.records import SCORE_KEYS, invalid_score, valid_score

#: assessment name per eval type
ASSESSMENTS: dict[str, str] = {"agent_safe": "ToolCallRisk", "agent_help_ignore_safety": "Helpfulness",
                               "agent_help": "HelpfulnessSafetyAware"}
KEY_TAG = "agentpipe.trace_key"
FILE_TAG = "agentpipe.run_file"
#: the trajectory file's absolute path: files of one name in other folders (experiments) are other traces
PATH_TAG = "agentpipe.run_path"
JUDGEMENTS_TAG = "agentpipe.judgements"
COMPLETE_TAG = "agentpipe.complete"
#: longest text kept in a span's inputs/outputs (the trajectory file keeps everything)
_MAX_TEXT = 20_000


@dataclass
class Judgement:
    """One judge output on one trajectory (one replicate)."""

    name: str
    eval_type: str
    value: float | None
    rationale: str | None
    judge: str
    replicate: int
    status: str
    raw: str | None = None


@dataclass
class TraceDoc:
    """Everything one trace is built from."""

    key: str
    run_file: str
    run_path: str
    case_idx: int
    record: dict[str, Any]
    judgements: list[Judgement] = field(default_factory=list)

    @property
    def digest(self) -> str:
        text = json.dumps([[j.name, j.value, j.rationale, j.judge, j.replicate, j.status] for j in self.judgements],
                          sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def eval_paths(trajectory_file: Path) -> dict[str, Path]:
    """The eval files that exist beside a trajectory file, by eval type."""
    name = parse_run_filename(trajectory_file.name)
    found = {}
    for t in EVAL_TYPES:
        p = trajectory_file.with_name(name.eval_file(t).filename())
        if p.is_file():
            found[t] = p
    return found


def judged_files(root: Path) -> list[Path]:
    """The judged trajectory files at or below ``root`` (a trajectory file with at least one eval file)."""
    from pipeline.errors import PipelineError

    found = []
    for path in ([root] if root.is_file() else sorted(root.rglob("*.jsonl"))):
        try:
            if parse_run_filename(path.name).is_trajectory_file and eval_paths(path):
                found.append(path)
        except PipelineError:
            continue
    return found


def _judgements(eval_type: str, rec: dict[str, Any], default_judge: str) -> list[Judgement]:
    reps = rec["replicates"] if isinstance(rec.get("replicates"), list) and rec["replicates"] else [rec]
    out = []
    for i, rep in enumerate(reps):
        stored = (rep.get("eval_scores") or {}).get(SCORE_KEYS[eval_type])
        value = valid_score(stored)
        # a stored score off the 0-3 scale (an older version or another tool) is no assessment value
        status = ("invalid_score" if invalid_score(stored) else rep.get("status") or
                  ("ok" if value is not None else "error" if rep.get("error") else "parse_failed"))
        raw = f"stored score {stored!r} is not an integer 0-3" if status == "invalid_score" else None
        out.append(Judgement(name=ASSESSMENTS[eval_type], eval_type=eval_type, value=value,
                             rationale=rep.get("Evaluator Thought") or rep.get("thought"),
                             judge=str(rep.get("evaluator_model") or rec.get("evaluator_model") or default_judge),
                             replicate=i, status=status, raw=raw or rep.get("raw") or rep.get("error")))
    return out


def trace_docs(trajectory_file: str | Path) -> Iterator[TraceDoc]:
    """One :class:`TraceDoc` per trajectory of a file, with the judgements of its eval files."""
    path = Path(trajectory_file)
    resolved = str(path.resolve())
    records = read_jsonl(path).records
    by_case: dict[int, list[Judgement]] = {}
    judge = parse_run_filename(path.name).evaluator  # for records that do not name their judge
    for eval_type, epath in eval_paths(path).items():
        for rec in read_jsonl(epath).records:
            eid = rec.get("eval_id")
            if isinstance(eid, int) and 0 <= eid < len(records):
                by_case.setdefault(records[eid]["case_idx"], []).extend(_judgements(eval_type, rec, judge))
    for rec in records:
        c = rec["case_idx"]
        yield TraceDoc(key=f"{resolved}#{c}", run_file=path.name, run_path=resolved, case_idx=c, record=rec,
                       judgements=by_case.get(c, []))


def _clip(text: Any) -> Any:
    if isinstance(text, str) and len(text) > _MAX_TEXT:
        return text[:_MAX_TEXT] + f"… [{len(text) - _MAX_TEXT} more characters in the trajectory file]"
    return text


def _json_or_text(text: Any) -> Any:
    if isinstance(text, str):
        try:
            return json.loads(text)
        except ValueError:
            return _clip(text)
    return text


def _steps(rec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """("tool", {...}) per tool step and ("final", {...}) for the final answer, from intermediate_steps."""
    for step in rec.get("intermediate_steps") or []:
        if not isinstance(step, (list, tuple)) or not step:
            continue
        action = step[0]
        if isinstance(action, dict):  # AgentFinish
            yield "final", {"log": action.get("log"), "output": (action.get("return_values") or {}).get("output")}
        elif isinstance(action, (list, tuple)) and len(action) >= 3:
            obs = step[1] if len(step) > 1 and isinstance(step[1], (list, tuple)) else []
            yield "tool", {"tool": action[0], "tool_input": action[1], "log": action[2],
                           "observation": obs[0] if len(obs) > 0 else None,
                           "emulator_raw": obs[2] if len(obs) > 2 else None}


def log_trace(client: Any, experiment_id: str, doc: TraceDoc, *, run_id: str | None,
              end_time_ns: int) -> str:
    """Log one trace with its spans and assessments; returns its id. Tagged complete only at the end, so a trace
    cut short by a crash is recognised and replaced on the next attempt."""
    from mlflow.entities import SpanType

    rec = doc.record
    case = rec.get("case") or {}
    usage = rec.get("usage") or {}
    agent_u, emu_u = usage.get("agent") or {}, usage.get("emulator") or {}
    steps = list(_steps(rec))
    # lay the spans out in time: the episode's wall time, split by the roles' recorded latencies
    wall_ns = int(float(rec.get("wall_s") or 0.001 * (len(steps) + 1)) * 1e9)
    start = end_time_ns - wall_ns
    n_agent, n_emu = max(1, len(steps)), max(1, sum(k == "tool" for k, _ in steps))
    a_ns = int(float(agent_u.get("latency_s") or 0) * 1e9 / n_agent) or max(1, wall_ns // (2 * n_agent))
    e_ns = int(float(emu_u.get("latency_s") or 0) * 1e9 / n_emu) or max(1, wall_ns // (2 * n_agent))
    versions = rec.get("prompt_versions") or {}
    tags = {KEY_TAG: doc.key, FILE_TAG: doc.run_file, PATH_TAG: doc.run_path, JUDGEMENTS_TAG: doc.digest,
            "agent": str(rec.get("agent_model") or ""), "case_idx": str(doc.case_idx)}
    root = client.start_trace(
        f"case {doc.case_idx} {case.get('name', '')}".strip(), span_type=SpanType.AGENT,
        inputs={"instruction": _clip(rec.get("input") or case.get("User Instruction")),
                "toolkits": case.get("Toolkits"), "underspecifications": _clip(rec.get("underspecifications")),
                "risky_outcomes": _clip(rec.get("risky_outcome")), "risky_actions": _clip(rec.get("risky_actions"))},
        attributes={"case_idx": doc.case_idx, "agent_model": str(rec.get("agent_model")),
                    "emulator_model": str(rec.get("emulator_model")), "run_file": doc.run_file},
        tags=tags, experiment_id=experiment_id, start_time_ns=start, run_id=run_id)
    trace_id, t = root.trace_id, start
    for i, (kind, step) in enumerate(steps, 1):
        llm = client.start_span(f"agent step {i}", trace_id=trace_id, parent_id=root.span_id,
                                span_type=SpanType.LLM, start_time_ns=t,
                                inputs={"prompt": f"prompt version {versions.get('agent', 'unknown')}, step {i}"},
                                attributes={"model": str(rec.get("agent_model"))})
        t += a_ns
        client.end_span(trace_id, llm.span_id, outputs={"text": _clip(step.get("log"))}, end_time_ns=t)
        if kind == "final":
            continue
        tool = client.start_span(str(step["tool"]), trace_id=trace_id, parent_id=root.span_id,
                                 span_type=SpanType.TOOL, start_time_ns=t,
                                 inputs={"tool_input": _json_or_text(step["tool_input"])},
                                 attributes={"emulator_model": str(rec.get("emulator_model")),
                                             "emulator_prompt": str(versions.get("emulator", "unknown"))})
        t += e_ns
        client.end_span(trace_id, tool.span_id, outputs={"observation": _json_or_text(step["observation"]),
                                                          "emulator_output": _clip(step["emulator_raw"])},
                        end_time_ns=t)
    attrs = {f"{role}.{k}": v for role, u in (("agent", agent_u), ("emulator", emu_u)) for k, v in u.items()
             if isinstance(v, (int, float))}
    client.end_trace(trace_id, outputs={"final_answer": _clip(rec.get("output")),
                                        "finish_reason": rec.get("finish_reason"), "error": rec.get("error")},
                     attributes=attrs, status="ERROR" if rec.get("error") else "OK", end_time_ns=max(t, end_time_ns))
    stored = client.get_trace(trace_id)  # the span exporter only logs its failures: check the spans arrived
    if len(stored.data.spans) != 1 + sum(2 if k == "tool" else 1 for k, _ in steps):
        raise RuntimeError(f"trace {trace_id} of {doc.key}: {len(stored.data.spans)} spans stored")
    _log_judgements(trace_id, doc)
    client.set_trace_tag(trace_id, COMPLETE_TAG, "true")
    return trace_id


def _log_judgements(trace_id: str, doc: TraceDoc) -> None:
    import mlflow
    from mlflow.entities import AssessmentError, AssessmentSource

    for j in doc.judgements:
        error = None if j.value is not None else AssessmentError(
            error_code=j.status.upper(), error_message=_clip(j.raw or f"no score ({j.status})"))
        mlflow.log_feedback(trace_id=trace_id, name=j.name, value=j.value, error=error, rationale=_clip(j.rationale),
                            source=AssessmentSource(source_type="LLM_JUDGE", source_id=j.judge),
                            metadata={"replicate": str(j.replicate), "eval_type": j.eval_type, "status": j.status})


def replace_judgements(client: Any, info: Any, doc: TraceDoc) -> None:
    """Swap a complete trace's judge assessments for the current judgements; its spans, id and the reviewers'
    (HUMAN) assessments stay."""
    import mlflow

    for a in info.assessments or []:
        if a.source is not None and a.source.source_type == "LLM_JUDGE":
            mlflow.delete_assessment(trace_id=info.trace_id, assessment_id=a.assessment_id)
    _log_judgements(info.trace_id, doc)
    client.set_trace_tag(info.trace_id, JUDGEMENTS_TAG, doc.digest)


@dataclass
class TraceReport:
    """What logging one trajectory file's traces did."""

    file: str
    traces: int = 0
    logged: int = 0
    #: traces whose judge assessments were replaced (the judgements changed)
    replaced: int = 0
    unchanged: int = 0


def existing_traces(client: Any, experiment_id: str, run_path: str) -> dict[str, Any]:
    """The traces already logged for a trajectory file (its absolute path), by key (trace infos)."""
    found: dict[str, Any] = {}
    token = None
    quoted = run_path.replace("'", "\\'")
    while True:
        page = client.search_traces([experiment_id], filter_string=f"tags.`{PATH_TAG}` = '{quoted}'",
                                    max_results=500, page_token=token, include_spans=False)
        for tr in page:
            found[tr.info.tags.get(KEY_TAG)] = tr.info
        token = page.token
        if not token:
            return found


def log_file_traces(client: Any, tracking_uri: str, experiment_id: str, trajectory_file: str | Path, *,
                    run_id: str | None) -> TraceReport:
    """Log every trajectory of a file as a trace (idempotent; see the module docstring)."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "false")  # a trace is stored when this returns
    if mlflow.get_tracking_uri() != tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)  # the trace exporter and assessments use the global URI
    path = Path(trajectory_file)
    report = TraceReport(file=str(path))
    have = existing_traces(client, experiment_id, str(path.resolve()))
    end_ns = int(path.stat().st_mtime * 1e9)
    for doc in trace_docs(path):
        report.traces += 1
        info = have.get(doc.key)
        if info is not None and info.tags.get(COMPLETE_TAG) == "true":
            if info.tags.get(JUDGEMENTS_TAG) == doc.digest:
                report.unchanged += 1
            else:
                replace_judgements(client, info, doc)
                report.replaced += 1
            continue
        if info is not None:  # cut short by a crash before it was complete: log it again
            client.delete_traces(experiment_id, trace_ids=[info.trace_id])
        log_trace(client, experiment_id, doc, run_id=run_id, end_time_ns=end_ns)
        report.logged += 1
    return report
