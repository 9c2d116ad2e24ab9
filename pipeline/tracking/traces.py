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

import functools
import hashlib
import json
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


#: spans sent in one OTLP request, traces built before they are sent (memory stays bounded)
_SPANS_PER_REQUEST = 2000
_TRACES_PER_BATCH = 200
#: concurrent StartTraceV3 requests (one per trace: MLflow has no bulk call for trace infos)
_WORKERS = 8


def trace_id_for(experiment_id: str, key: str) -> tuple[int, str]:
    """The trace's OTel id and MLflow id, derived from its experiment and key: a trace logged again after a
    crash (spans stored, trace info not yet) overwrites its own spans instead of leaving a stray copy."""
    from mlflow.tracing.utils import encode_trace_id

    otel = int.from_bytes(hashlib.sha256(f"{experiment_id}\0{key}".encode()).digest()[:16], "big") or 1
    return otel, "tr-" + encode_trace_id(otel)


@dataclass
class _SpanBuilder:
    """Finished MLflow spans of one trace, built in memory (no tracer, no exporter: nothing is sent)."""

    otel_trace_id: int
    trace_id: str
    spans: list[Any] = field(default_factory=list)

    def span_id(self, index: int) -> int:
        """The id of the trace's span number ``index`` (0: the root), derived like the trace id."""
        return int.from_bytes(hashlib.sha256(f"{self.trace_id}/{index}".encode()).digest()[:8], "big") or 1

    def add(self, name: str, span_type: str, start: int, end: int, *, parent: int | None, inputs: Any,
            outputs: Any, attributes: dict[str, Any], status: str = "OK",
            experiment_id: str | None = None) -> int:
        from mlflow.entities import Span, SpanStatus
        from mlflow.tracing.constant import SpanAttributeKey
        from mlflow.tracing.utils import build_otel_context, dump_span_attribute_value
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import ReadableSpan

        span_id = self.span_id(len(self.spans))
        attrs: dict[str, Any] = {SpanAttributeKey.REQUEST_ID: self.trace_id, SpanAttributeKey.SPAN_TYPE: span_type,
                                 SpanAttributeKey.INPUTS: inputs, **attributes, SpanAttributeKey.OUTPUTS: outputs}
        if experiment_id is not None:
            attrs = {SpanAttributeKey.EXPERIMENT_ID: experiment_id, **attrs}
        self.spans.append(Span(ReadableSpan(
            name=name, context=build_otel_context(self.otel_trace_id, span_id),
            parent=build_otel_context(self.otel_trace_id, parent) if parent is not None else None,
            start_time=start, end_time=end, status=SpanStatus(status).to_otel_status(),
            attributes={k: dump_span_attribute_value(v) for k, v in attrs.items()}, resource=Resource.get_empty())))
        return span_id


@functools.cache
def _env_metadata() -> dict[str, str]:
    """What MLflow's own exporter records about the logging process (source, user, git), resolved once."""
    from mlflow.tracing.utils.environment import resolve_env_metadata

    return dict(resolve_env_metadata())


def build_trace(doc: TraceDoc, experiment_id: str, *, run_id: str | None, end_time_ns: int) -> Any:
    """One trajectory as a finished MLflow ``Trace``: its spans, tags (``complete`` included), metadata and the
    judge's assessments, ready to be sent in bulk (:func:`send_traces`)."""
    from mlflow.entities import SpanType, Trace, TraceData, TraceInfo, TraceLocation, TraceState
    from mlflow.tracing.constant import TRACE_SCHEMA_VERSION, TRACE_SCHEMA_VERSION_KEY, TraceMetadataKey, TraceTagKey
    from mlflow.tracing.utils import add_size_stats_to_trace_metadata
    from mlflow.tracing.utils.truncation import set_request_response_preview

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
    otel_id, trace_id = trace_id_for(experiment_id, doc.key)
    b = _SpanBuilder(otel_id, trace_id)
    name = f"case {doc.case_idx} {case.get('name', '')}".strip()
    attrs = {"case_idx": doc.case_idx, "agent_model": str(rec.get("agent_model")),
             "emulator_model": str(rec.get("emulator_model")), "run_file": doc.run_file,
             **{f"{role}.{k}": v for role, u in (("agent", agent_u), ("emulator", emu_u)) for k, v in u.items()
                if isinstance(v, (int, float))}}
    last = start + sum(a_ns + (e_ns if k == "tool" else 0) for k, _ in steps)
    end = max(last, end_time_ns)
    root_id = b.add(name, SpanType.AGENT, start, end, parent=None, experiment_id=experiment_id, attributes=attrs,
                    inputs={"instruction": _clip(rec.get("input") or case.get("User Instruction")),
                            "toolkits": case.get("Toolkits"),
                            "underspecifications": _clip(rec.get("underspecifications")),
                            "risky_outcomes": _clip(rec.get("risky_outcome")),
                            "risky_actions": _clip(rec.get("risky_actions"))},
                    outputs={"final_answer": _clip(rec.get("output")), "finish_reason": rec.get("finish_reason"),
                             "error": rec.get("error")}, status="ERROR" if rec.get("error") else "OK")
    t = start
    for i, (kind, step) in enumerate(steps, 1):
        b.add(f"agent step {i}", SpanType.LLM, t, t + a_ns, parent=root_id,
              inputs={"prompt": f"prompt version {versions.get('agent', 'unknown')}, step {i}"},
              outputs={"text": _clip(step.get("log"))}, attributes={"model": str(rec.get("agent_model"))})
        t += a_ns
        if kind == "final":
            continue
        b.add(str(step["tool"]), SpanType.TOOL, t, t + e_ns, parent=root_id,
              inputs={"tool_input": _json_or_text(step["tool_input"])},
              outputs={"observation": _json_or_text(step["observation"]),
                       "emulator_output": _clip(step["emulator_raw"])},
              attributes={"emulator_model": str(rec.get("emulator_model")),
                          "emulator_prompt": str(versions.get("emulator", "unknown"))})
        t += e_ns
    metadata = {**_env_metadata(), TRACE_SCHEMA_VERSION_KEY: str(TRACE_SCHEMA_VERSION)}
    if run_id:
        metadata[TraceMetadataKey.SOURCE_RUN] = run_id
    tags = {TraceTagKey.TRACE_NAME: name, KEY_TAG: doc.key, FILE_TAG: doc.run_file, PATH_TAG: doc.run_path,
            JUDGEMENTS_TAG: doc.digest, "agent": str(rec.get("agent_model") or ""), "case_idx": str(doc.case_idx),
            COMPLETE_TAG: "true"}
    info = TraceInfo(trace_id=trace_id, trace_location=TraceLocation.from_experiment_id(experiment_id),
                     request_time=start // 1_000_000, execution_duration=(end - start) // 1_000_000,
                     state=TraceState.ERROR if rec.get("error") else TraceState.OK, trace_metadata=metadata, tags=tags,
                     assessments=_feedbacks(trace_id, doc))
    trace = Trace(info=info, data=TraceData(spans=b.spans))
    set_request_response_preview(info, trace.data)
    add_size_stats_to_trace_metadata(trace)
    return trace


def send_traces(tracing: Any, experiment_id: str, traces: list[Any]) -> None:
    """Store built traces: their spans in a few OTLP requests, then one trace info per trace (tags, metadata and
    assessments together, so a trace is tagged complete in the same write that gives it its judgements). Spans
    go first: a crash in between leaves trace rows without tags, which the next attempt overwrites (same ids)."""
    from concurrent.futures import ThreadPoolExecutor

    if not traces:
        return
    spans = [s for tr in traces for s in tr.data.spans]
    for i in range(0, len(spans), _SPANS_PER_REQUEST):
        tracing.log_spans(experiment_id, spans[i:i + _SPANS_PER_REQUEST])
    with ThreadPoolExecutor(min(_WORKERS, max(1, len(traces)))) as pool:
        list(pool.map(lambda tr: tracing.start_trace(tr.info), traces))  # re-raises the first failure


def _feedbacks(trace_id: str, doc: TraceDoc) -> list[Any]:
    """The judge's assessments of a trace, as ``mlflow.log_feedback`` makes them."""
    from mlflow.entities import AssessmentError, AssessmentSource, Feedback

    out = []
    for j in doc.judgements:
        error = None if j.value is not None else AssessmentError(
            error_code=j.status.upper(), error_message=_clip(j.raw or f"no score ({j.status})"))
        fb = Feedback(name=j.name, value=j.value, error=error, rationale=_clip(j.rationale),
                      source=AssessmentSource(source_type="LLM_JUDGE", source_id=j.judge),
                      metadata={"replicate": str(j.replicate), "eval_type": j.eval_type, "status": j.status})
        fb.trace_id = trace_id
        out.append(fb)
    return out


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


def existing_traces(client: Any, experiment_id: str, folder: str) -> dict[str, Any]:
    """The traces already logged for the trajectory files of one folder (its absolute path), by key (trace
    infos): one search for the whole folder, not one per file."""
    found: dict[str, Any] = {}
    token = None
    # LIKE wildcards in the folder's name may match other folders too: the keys below are exact
    pattern = (folder.rstrip("/") + "/%").replace("'", "\\'")
    while True:
        page = client.search_traces([experiment_id], filter_string=f"tags.`{PATH_TAG}` LIKE '{pattern}'",
                                    max_results=500, page_token=token, include_spans=False)
        for tr in page:
            found[tr.info.tags.get(KEY_TAG)] = tr.info
        token = page.token
        if not token:
            return found


def log_file_traces(client: Any, tracking_uri: str, experiment_id: str, trajectory_file: str | Path, *,
                    run_id: str | None) -> TraceReport:
    """Log every trajectory of a file as a trace (idempotent; see the module docstring)."""
    return log_files_traces(client, tracking_uri, experiment_id, [trajectory_file], run_id=run_id)[0]


def log_files_traces(client: Any, tracking_uri: str, experiment_id: str, trajectory_files: list[str | Path], *,
                     run_id: str | None) -> list[TraceReport]:
    """Log every trajectory of these files as traces (idempotent; see the module docstring), in bulk: one
    search per folder for what is there, the new traces' spans in a few requests and one trace info each."""
    import mlflow
    from mlflow.tracing.client import TracingClient

    if mlflow.get_tracking_uri() != tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)  # replacing judgements uses the global URI
    tracing = TracingClient(tracking_uri)
    paths = [Path(f) for f in trajectory_files]
    have: dict[str, dict[str, Any]] = {}
    reports, pending = [], []
    for path in paths:
        folder = str(path.resolve().parent)
        if folder not in have:
            have[folder] = existing_traces(client, experiment_id, folder)
        report = TraceReport(file=str(path))
        end_ns = int(path.stat().st_mtime * 1e9)
        for doc in trace_docs(path):
            report.traces += 1
            info = have[folder].get(doc.key)
            if info is not None and info.tags.get(COMPLETE_TAG) == "true":
                if info.tags.get(JUDGEMENTS_TAG) == doc.digest:
                    report.unchanged += 1
                else:
                    replace_judgements(client, info, doc)
                    report.replaced += 1
                continue
            if info is not None:  # cut short by a crash before it was complete: log it again
                client.delete_traces(experiment_id, trace_ids=[info.trace_id])
            pending.append(build_trace(doc, experiment_id, run_id=run_id, end_time_ns=end_ns))
            report.logged += 1
            if len(pending) >= _TRACES_PER_BATCH:
                send_traces(tracing, experiment_id, pending)
                pending = []
        reports.append(report)
    send_traces(tracing, experiment_id, pending)
    return reports
