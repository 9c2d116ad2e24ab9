"""Trace logging rate (issue 24): judged trajectories logged as MLflow traces, bulk vs the old per-trace path.

    .venv/bin/python benchmarks/trace_logging.py --tracking-uri http://127.0.0.1:5055 \
        [--runs <results>/match_eval_results] [--models 3] [--no-baseline]

Takes the first ``--models`` model folders under ``--runs`` and logs every judged trajectory of them twice, each
time into a new experiment of the given (real) tracking server, and prints traces/s and HTTP requests per trace:

* ``bulk``     — ``pipeline.tracking.traces.log_files_traces``: one search per folder, the spans of up to 200
                 traces in one OTLP request, one StartTraceV3 per trace (tags, metadata and assessments together);
* ``baseline`` — the per-trace path used before: MLflow's fluent span API with synchronous export (one request per
                 span), ``get_trace`` to check the spans arrived, one request per assessment, then the tag
                 ``complete`` (reimplemented below, contents identical).

A second ``bulk`` pass over the same files (``rerun``) measures what a resumed report costs (nothing to log).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

def _baseline_log_trace(client, experiment_id, doc, *, run_id, end_time_ns):  # noqa: ANN001, ANN202
    """The per-trace path before issue 24 (pipeline/tracking/traces.py log_trace), for comparison."""
    import mlflow
    from mlflow.entities import AssessmentError, AssessmentSource, SpanType

    from pipeline.tracking.traces import (COMPLETE_TAG, FILE_TAG, JUDGEMENTS_TAG, KEY_TAG, PATH_TAG, _clip,
                                          _json_or_text, _steps)

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
    for j in doc.judgements:
        error = None if j.value is not None else AssessmentError(
            error_code=j.status.upper(), error_message=_clip(j.raw or f"no score ({j.status})"))
        mlflow.log_feedback(trace_id=trace_id, name=j.name, value=j.value, error=error, rationale=_clip(j.rationale),
                            source=AssessmentSource(source_type="LLM_JUDGE", source_id=j.judge),
                            metadata={"replicate": str(j.replicate), "eval_type": j.eval_type, "status": j.status})
    client.set_trace_tag(trace_id, COMPLETE_TAG, "true")


class _Counter:
    """Counts the HTTP requests this process makes (requests.Session.send)."""

    def __init__(self) -> None:
        import requests

        self.n = 0
        original = requests.Session.send

        def send(session, request, **kw):  # noqa: ANN001, ANN202
            self.n += 1
            return original(session, request, **kw)

        requests.Session.send = send


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tracking-uri", required=True, help="a running MLflow server (http://...)")
    ap.add_argument("--runs", type=Path, default=Path(os.environ.get("AGENTPIPE_HOME", "/tmp")) / "data" / "paper"
                    / "results" / "match_eval_results")
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()
    os.environ["MLFLOW_ENABLE_ASYNC_TRACE_LOGGING"] = "false"
    import mlflow
    from mlflow import MlflowClient

    from pipeline.tracking.traces import judged_files, log_files_traces, trace_docs

    mlflow.set_tracking_uri(args.tracking_uri)
    client = MlflowClient(args.tracking_uri)
    folders = sorted(p for p in args.runs.iterdir() if p.is_dir())[:args.models]
    files = [f for d in folders for f in judged_files(d)]
    counter = _Counter()
    rows = []
    bulk_exp = client.create_experiment(f"bench-bulk-{uuid.uuid4().hex[:8]}")
    for name in ("bulk", "rerun"):
        before, t0 = counter.n, time.perf_counter()
        reps = log_files_traces(client, args.tracking_uri, bulk_exp, files, run_id=None)
        n = sum(r.traces for r in reps)
        rows.append((name, n, sum(r.logged for r in reps), time.perf_counter() - t0, counter.n - before))
    if not args.no_baseline:
        exp = client.create_experiment(f"bench-baseline-{uuid.uuid4().hex[:8]}")
        before, t0, n = counter.n, time.perf_counter(), 0
        for f in files:
            end_ns = int(f.stat().st_mtime * 1e9)
            for doc in trace_docs(f):
                _baseline_log_trace(client, exp, doc, run_id=None, end_time_ns=end_ns)
                n += 1
        rows.append(("baseline", n, n, time.perf_counter() - t0, counter.n - before))
    print(f"{len(folders)} model folders, {len(files)} trajectory files")
    for name, n, logged, wall, requests in rows:
        print(f"{name:9s} {n:6d} traces ({logged} logged) {wall:7.1f} s  {n / wall:7.1f} traces/s  "
              f"{requests / max(1, n):5.2f} HTTP requests/trace")
    if not args.no_baseline:
        print(f"bulk vs baseline: {rows[2][3] / rows[0][3]:.1f}x faster")


if __name__ == "__main__":
    main()
