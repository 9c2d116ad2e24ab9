"""``agentpipe track``: replay tracking journals into MLflow and show what is not synced yet."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_sync(args: argparse.Namespace) -> int:
    from pipeline.errors import DataError
    from pipeline.tracking import find_journals, resolve_tracking_uri, sync

    folders = find_journals(args.dir)
    if not folders:
        raise DataError(f"{args.dir}: no tracking journal (journal.jsonl) at or below this folder")
    uri = resolve_tracking_uri(args.tracking_uri)
    failed = 0
    for folder in folders:
        report = sync(folder, uri)
        print(report.line())
        if report.refused:  # a configuration error, not an outage: say it once and stop
            print(f"agentpipe: error: {report.refused}", file=sys.stderr)
            return 2
        failed += (not report.reachable) or report.pending > 0
    if failed:
        print(f"agentpipe: error: {failed} journal(s) not fully synced to {uri}", file=sys.stderr)
        return 1
    return 0


def _report_run(client, experiment_id: str, path: Path) -> str | None:  # noqa: ANN001 - an MlflowClient
    """The evaluation run of the report that covers a trajectory file (by its agent, emulator and judge)."""
    from pipeline.data.naming import parse_run_filename

    name = parse_run_filename(path.name)
    for agent in dict.fromkeys((path.parent.name, name.agent)):
        found = client.search_runs([experiment_id], filter_string=(
            f"tags.agent = '{agent}' and tags.emulator = '{name.emulator}' and tags.evaluator = '{name.evaluator}'"),
            order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            return found[0].info.run_id
    return None


def _cmd_traces(args: argparse.Namespace) -> int:
    from pipeline.errors import ConfigError, DataError
    from pipeline.tracking import reachable, resolve_tracking_uri
    from pipeline.tracking.traces import judged_files, log_file_traces

    uri = resolve_tracking_uri(args.tracking_uri)
    if uri is None:
        raise ConfigError("no MLflow tracking URI: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    if not args.dir.exists():
        raise DataError(f"{args.dir}: not found")
    files = judged_files(args.dir)
    if not files:
        raise DataError(f"{args.dir}: no judged trajectory file (a trajectory file with its _eval_ files) here")
    if not reachable(uri):
        print(f"agentpipe: error: tracking server {uri} unreachable; nothing logged", file=sys.stderr)
        return 1
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(args.experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(args.experiment)
    total = logged = 0
    for path in files:
        run_id = args.run_id or _report_run(client, exp_id, path)
        rep = log_file_traces(client, uri, exp_id, path, run_id=run_id)
        total, logged = total + rep.traces, logged + rep.logged
        print(f"{path}: {rep.traces} traces ({rep.logged} logged, {rep.replaced} with new judgements, "
              f"{rep.unchanged} already there){'' if run_id else ' (no report run found to link)'}")
    print(f"track traces: {total} traces in experiment '{args.experiment}', {logged} logged now")
    return 0


def _cmd_feedback(args: argparse.Namespace) -> int:
    from pipeline.data.naming import confined_path
    from pipeline.errors import ConfigError
    from pipeline.settings import get_settings
    from pipeline.tracking.feedback import pull_feedback, write_feedback
    from pipeline.tracking import reachable, resolve_tracking_uri

    out = args.out or confined_path(get_settings().home / "feedback", f"{args.experiment}.jsonl", "--experiment")
    uri = resolve_tracking_uri(args.tracking_uri)
    if uri is None:
        raise ConfigError("no MLflow tracking URI: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    if not reachable(uri):
        print(f"agentpipe: error: tracking server {uri} unreachable; nothing pulled", file=sys.stderr)
        return 1
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(args.experiment)
    if exp is None:
        raise ConfigError(f"--experiment {args.experiment}: no such MLflow experiment on {uri}")
    rows = pull_feedback(client, exp.experiment_id)
    n = write_feedback(rows, out)
    traces = len({r["trace_id"] for r in rows})
    print(f"track feedback: {n} human labels on {traces} traces → {out}"
          + ("" if n else " (none yet: add feedback named ToolCallRisk or Helpfulness on a trace in the UI)"))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from pipeline.tracking import find_journals, resolve_tracking_uri
    from pipeline.tracking.journal import read_journal, read_state

    uri = resolve_tracking_uri(args.tracking_uri)
    for folder in find_journals(args.dir):
        ops = read_journal(folder)
        targets = read_state(folder).get("targets", {})
        lines = []
        for target_uri, t in sorted(targets.items()):
            pending = sum(op["seq"] > t.get("synced_seq", -1) for op in ops)
            lines.append(f"  {target_uri}: run {t.get('run_id') or '-'}, {pending} pending, "
                         f"{len(t.get('rejected', []))} rejected")
        if uri and uri not in targets:
            lines.append(f"  {uri}: never synced, {len(ops)} pending")
        end = next((op.get("status") for op in reversed(ops) if op["op"] == "end"), "RUNNING")
        print(f"{folder}: {len(ops)} operations, {end}")
        print("\n".join(lines) if lines else "  (no tracking URI configured)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("track", help="replay tracking journals into MLflow",
                       description="Every stage journals what it logs (params, metrics, artifacts, models) in its "
                       "output folder and sends it to MLflow when reachable; `track sync` replays what was not sent.")
    tsub = p.add_subparsers(dest="track_command", required=True, metavar="{sync,status,traces,feedback}")
    s = tsub.add_parser("sync", help="send un-synced journal operations below DIR to MLflow (idempotent)")
    s.add_argument("dir", type=Path, help="a stage output folder (searched recursively for journal.jsonl)")
    s.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    s.set_defaults(func=_cmd_sync)
    st = tsub.add_parser("status", help="show journals below DIR and what is not synced")
    st.add_argument("dir", type=Path)
    st.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    st.set_defaults(func=_cmd_status)
    tr = tsub.add_parser("traces", help="log every judged trajectory below DIR as an MLflow trace with its "
                         "judgements as assessments (idempotent)")
    tr.add_argument("dir", type=Path, help="a trajectory file, a model folder or a folder of model folders")
    tr.add_argument("--experiment", default="evaluation", help="MLflow experiment (default: evaluation)")
    tr.add_argument("--run-id", help="link the traces to this run (default: the report run of the same agent, "
                    "emulator and judge, when one exists)")
    tr.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    tr.set_defaults(func=_cmd_traces)
    fb = tsub.add_parser("feedback", help="pull reviewers' labels set on traces in the MLflow UI, with the judge's "
                         "scores beside them (JSONL; `report` then gives judge-human agreement)")
    fb.add_argument("--experiment", default="evaluation", help="MLflow experiment (default: evaluation)")
    fb.add_argument("--out", type=Path, help="JSONL file (default $AGENTPIPE_HOME/feedback/<experiment>.jsonl, "
                    "which `report` reads)")
    fb.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    fb.set_defaults(func=_cmd_feedback)
