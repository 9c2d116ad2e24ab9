"""``agentpipe track``: replay tracking journals into MLflow and show what is not synced yet."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_sync(args: argparse.Namespace) -> int:
    from pipeline.errors import DataError
    from pipeline.tracking.journal import find_journals, resolve_tracking_uri, sync

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


def _cmd_status(args: argparse.Namespace) -> int:
    from pipeline.tracking.journal import find_journals, read_journal, read_state, resolve_tracking_uri

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
    tsub = p.add_subparsers(dest="track_command", required=True, metavar="{sync,status}")
    s = tsub.add_parser("sync", help="send un-synced journal operations below DIR to MLflow (idempotent)")
    s.add_argument("dir", type=Path, help="a stage output folder (searched recursively for journal.jsonl)")
    s.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    s.set_defaults(func=_cmd_sync)
    st = tsub.add_parser("status", help="show journals below DIR and what is not synced")
    st.add_argument("dir", type=Path)
    st.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    st.set_defaults(func=_cmd_status)
