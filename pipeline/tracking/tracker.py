"""``Tracker``: one tracked run, journaled in a folder and sent to MLflow when it answers (see ``journal``)."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.data.jsonl import JsonlAppender
from pipeline.errors import ConfigError

from pipeline.tracking.journal import (EXPERIMENTS, JOURNAL, PARENT_ENV, context_tags, metric_key, now_ms,
                                       read_journal, read_state, resolve_tracking_uri, sync_lock)
from pipeline.tracking.secrets import clean_params
from pipeline.tracking.sender import TrackingRefused, _Sender, reachable

log = logging.getLogger("pipeline.tracking")


# ----------------------------------------------------------------------------------------------------- tracker
class Tracker:
    """One tracked run, journaled in a folder. Use :meth:`open`; see the module docstring."""

    def __init__(self, folder: Path, tracking_uri: str | None, retry_interval_s: float) -> None:
        self.folder = folder
        self.tracking_uri = tracking_uri
        self.retry_interval_s = retry_interval_s
        self._ops: list[dict[str, Any]] = read_journal(folder)
        self._seq = (self._ops[-1]["seq"] + 1) if self._ops else 0
        self._journal = JsonlAppender(folder / JOURNAL)
        self._offline_until = 0.0
        self._finished = False
        self.journal_id: str = self._ops[0]["journal_id"] if self._ops else uuid.uuid4().hex
        #: True when :meth:`open` continued an existing journal (a resumed run).
        self.resumed = bool(self._ops)

    @classmethod
    def open(cls, folder: str | Path, *, experiment: str, run_name: str | None = None,
             parent: str | Path | None = None, tags: Mapping[str, Any] | None = None,
             tracking_uri: str | None = None, retry_interval_s: float = 60.0) -> Tracker:
        """Start a run journaled in ``folder``, or resume it when the folder already has a journal.

        ``experiment``: one of ``training``, ``evaluation``, ``analysis``. ``parent``: an MLflow run id or the
        folder of the parent run's tracker (nested run). ``tracking_uri``: default from the settings; None and
        nothing configured means journal only. While the server is unreachable, sending is retried at most every
        ``retry_interval_s`` seconds (and once more when the run ends).
        """
        if experiment not in EXPERIMENTS:
            raise ConfigError(f"experiment '{experiment}': expected one of {', '.join(EXPERIMENTS)}")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        t = cls(folder, resolve_tracking_uri(tracking_uri), retry_interval_s)
        if t._ops:
            first = t._ops[0]
            if first.get("op") != "start":
                raise ConfigError(f"{folder / JOURNAL}: first operation is not 'start'; not a tracking journal")
            if first.get("experiment") != experiment:
                raise ConfigError(f"{folder / JOURNAL}: belongs to experiment '{first.get('experiment')}', "
                                  f"not '{experiment}'")
            t._append({"op": "resume"})
        else:
            op: dict[str, Any] = {"op": "start", "journal_id": t.journal_id, "experiment": experiment,
                                  "run_name": run_name, "tags": {**context_tags(), **{k: str(v) for k, v in
                                                                                        (tags or {}).items()}}}
            parent = parent if parent is not None else os.environ.get(PARENT_ENV) or None
            if parent is not None:
                p = Path(parent)
                if isinstance(parent, Path) or p.exists() or "/" in str(parent):
                    op["parent_folder"] = os.path.relpath(p.resolve(), folder.resolve())
                else:
                    op["parent_run_id"] = str(parent)
            t._append(op)
        return t

    # -- logging API
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters (values become strings; secret-looking names are dropped)."""
        cleaned = clean_params(params)
        if cleaned:
            self._append({"op": "params", "params": cleaned})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log numeric metrics at a step (non-numeric values are ignored)."""
        values = {metric_key(k): float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if values:
            self._append({"op": "metrics", "metrics": values, "step": step})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if tags:
            self._append({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file or a folder (uploaded from disk when synced, so it must stay in place until then)."""
        p = Path(path).resolve()
        if not p.exists():
            raise ConfigError(f"artifact {p}: not found")
        self._append({"op": "artifact", "path": str(p), "rel": os.path.relpath(p, self.folder.resolve()),
                      "artifact_path": artifact_path})

    def log_input(self, name: str, path: str | Path, digest: str, *, context: str = "training",
                  profile: Mapping[str, Any] | None = None, schema: str | None = None) -> None:
        """Record a file this run read as an MLflow dataset input (``digest``: the file's hash, so one file is
        one dataset wherever it is used; ``profile``: counts shown beside it)."""
        self._append({"op": "input", "name": name, "source": str(Path(path).resolve()), "digest": digest[:36],
                      "context": context, "profile": dict(profile or {}), "schema": schema})

    def log_traces(self, *trajectory_files: str | Path) -> None:
        """Log every trajectory of (judged) trajectory files as traces of this run, with their judgements as
        assessments (``pipeline.tracking.traces``; read from disk when synced, idempotent). One journal operation
        per file; several files are sent together (one bulk write)."""
        paths = [Path(f).resolve() for f in trajectory_files]
        for p in paths:
            if not p.is_file():
                raise ConfigError(f"trajectory file {p}: not found")
        for n, p in enumerate(paths, 1):
            self._append({"op": "traces", "path": str(p), "rel": os.path.relpath(p, self.folder.resolve())},
                         send=n == len(paths))

    def register_model(self, name: str, artifact_path: str, *, tags: Mapping[str, Any] | None = None,
                       description: str | None = None, aliases: list[str] | tuple[str, ...] = (),
                       in_place: str | Path | None = None) -> None:
        """Register this run's artifact ``artifact_path`` as a new version of registered model ``name`` and point
        ``aliases`` at it. ``in_place``: a local folder registered where it is (``file://`` source, nothing
        uploaded), where the backend accepts local sources; else it is uploaded once as ``artifact_path``."""
        op: dict[str, Any] = {"op": "register_model", "name": name, "artifact_path": artifact_path,
                              "tags": {k: str(v) for k, v in (tags or {}).items()}, "description": description,
                              "aliases": list(aliases)}
        if in_place is not None:
            p = Path(in_place).resolve()
            if not p.is_dir():
                raise ConfigError(f"model folder {p}: not found")
            op.update(source_path=str(p), path=str(p), rel=os.path.relpath(p, self.folder.resolve()))
        self._append(op)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run (FINISHED, FAILED or KILLED) and make a last attempt to send everything."""
        if self._finished:
            return
        self._finished = True
        self._append({"op": "end", "status": status}, final=True)
        self._journal.close()

    # -- state
    def logged(self, metric: str) -> list[float]:
        """The values of ``metric`` this run has logged so far (its journal, across resumes), in order."""
        key = metric_key(metric)
        return [op["metrics"][key] for op in self._ops if op["op"] == "metrics" and key in op["metrics"]]

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, once the start has been sent."""
        if self.tracking_uri is None:
            return None
        return read_state(self.folder).get("targets", {}).get(self.tracking_uri, {}).get("run_id")

    @property
    def pending(self) -> int:
        if self.tracking_uri is None:
            return len(self._ops)
        synced = read_state(self.folder).get("targets", {}).get(self.tracking_uri, {}).get("synced_seq", -1)
        return sum(op["seq"] > synced for op in self._ops)

    def flush(self, force: bool = False) -> bool:
        """Send pending operations now; True when everything is in MLflow."""
        if self.tracking_uri is None:
            return False
        if not force and time.monotonic() < self._offline_until:
            return False
        try:
            if not reachable(self.tracking_uri):
                self._offline_until = time.monotonic() + self.retry_interval_s
                return False
        except TrackingRefused as e:
            return self._refused(e)
        with sync_lock(self.folder, blocking=force) as got:
            if not got:
                return False  # another process (agentpipe track sync) is sending right now
            try:
                sender = _Sender(self.folder, self.tracking_uri)
                _, ok = sender.send(self._ops)
            except TrackingRefused as e:
                return self._refused(e)
            except Exception as e:  # noqa: BLE001 - tracking must never fail the stage
                log.warning("tracking: could not send to %s (%s); kept in %s", self.tracking_uri,
                            " ".join(str(e).split())[:200], self.folder / JOURNAL)
                ok = False
        if not ok:
            self._offline_until = time.monotonic() + self.retry_interval_s
        return ok and self.pending == 0

    def _refused(self, e: TrackingRefused) -> bool:
        """Credentials refused: an error in the log (once per run), the journal kept; the stage goes on."""
        if not self.refused:
            log.error("tracking: %s", e)
        self.refused = str(e)
        self._offline_until = time.monotonic() + self.retry_interval_s
        return False

    #: why the server refused this run's client (401/403), else None
    refused: str | None = None

    def _append(self, op: dict[str, Any], final: bool = False, send: bool = True) -> None:
        op = {"seq": self._seq, "ts": now_ms(), **op}
        if "journal_id" not in op and op["op"] == "register_model":
            op["journal_id"] = self.journal_id
        self._journal.append(op)
        self._ops.append(op)
        self._seq += 1
        if send or final:
            self.flush(force=final)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("KILLED")
        else:
            self.finish("FAILED")
