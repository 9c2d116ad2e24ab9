"""Replaying a journal folder's operations into MLflow, idempotently (``sync``), and the server checks around it
(reachable; refused credentials are not an outage)."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.jsonl import atomic_write_json
from pipeline.errors import ConfigError

from pipeline.tracking.journal import (EXPERIMENTS, JOURNAL, MIRROR_TAG, STATE, read_journal, read_state,
                                       resolve_tracking_uri, sync_lock, target_of)

log = logging.getLogger("pipeline.tracking")


def reachable(uri: str, timeout_s: float = 2.0) -> bool:
    """Whether the tracking backend answers: ``GET <uri>/health`` for http(s); local stores always are."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
            return r.status == 200
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise TrackingRefused(uri, e.code) from None
        return False
    except (urllib.error.URLError, OSError, socket.timeout, ValueError):
        return False


class TrackingRefused(ConfigError):
    """The tracking server answered 401/403: wrong or missing credentials, not an outage (nothing will come of
    retrying until the configuration changes)."""

    def __init__(self, uri: str, status: int) -> None:
        super().__init__(f"tracking server {uri} refused the request (HTTP {status}): set MLFLOW_TRACKING_USERNAME "
                         "and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN; the journal keeps everything for "
                         "`agentpipe track sync`")
        self.status = status


def _refusal(e: Exception) -> int | None:
    """The HTTP status of an MLflow client error when it is 401/403."""
    get = getattr(e, "get_http_status_code", None)
    try:
        status = int(get()) if callable(get) else None
    except (TypeError, ValueError):
        status = None
    if status is None:
        found = re.search(r"\b(401|403)\b", str(e)) if "Unauthorized" in str(e) or "Forbidden" in str(e) else None
        status = int(found.group(1)) if found else None
    return status if status in (401, 403) else None


# ---------------------------------------------------------------------------------------------------- sending
#: operations sent together when consecutive in a journal: run data in one log_batch, trajectory files' traces
#: in one bulk write
_LOG_OPS = ("metrics", "params", "tags")
_BATCHED = {**{k: _LOG_OPS for k in _LOG_OPS}, "traces": ("traces",)}


class _Sender:
    """Sends journal operations of one folder to one tracking URI (call under the folder's lock)."""

    def __init__(self, folder: Path, uri: str) -> None:
        self.folder, self.uri = folder, uri
        for var, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")):
            os.environ.setdefault(var, value)  # fail fast when the server dies mid-sync; the journal keeps the rest
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.state = read_state(folder)
        self.target = target_of(self.state, uri)

    def save(self) -> None:
        atomic_write_json(self.folder / STATE, self.state)

    # -- helpers
    def _experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        kwargs: dict[str, Any] = {}
        if self.uri.startswith("sqlite:///"):  # keep artifacts beside the database, not in the CWD
            kwargs["artifact_location"] = (Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts" / name).as_uri()
        try:
            return self.client.create_experiment(name, **kwargs)
        except Exception:  # accepted only when another process created it meanwhile; else re-raised
            exp = self.client.get_experiment_by_name(name)  # created concurrently
            if exp is None:
                raise
            return exp.experiment_id

    def _parent_run_id(self, op: dict[str, Any]) -> str | None:
        if op.get("parent_run_id"):
            return op["parent_run_id"]
        ref = op.get("parent_folder")
        if not ref:
            return None
        parent = (self.folder / ref).resolve() if not Path(ref).is_absolute() else Path(ref)
        if not (parent / JOURNAL).is_file():
            log.warning("%s: parent journal %s not found: run not nested", self.folder, parent)
            return None
        report = sync(parent, self.uri)
        return report.run_id

    def _start(self, op: dict[str, Any]) -> None:
        exp_id = self._experiment_id(op["experiment"])
        self.target["experiment_id"] = exp_id
        found = self.client.search_runs([exp_id], filter_string=f"tags.`agentpipe.journal_id` = '{op['journal_id']}'",
                                        max_results=1)
        if found:
            self.target["run_id"] = found[0].info.run_id
            return
        tags = dict(op.get("tags") or {})
        tags["agentpipe.journal_id"] = op["journal_id"]
        tags["agentpipe.journal"] = str(self.folder.resolve())
        parent = self._parent_run_id(op)
        if parent:
            tags["mlflow.parentRunId"] = self._parent_in(exp_id, parent)
        run = self.client.create_run(exp_id, start_time=op["ts"], tags=tags, run_name=op.get("run_name"))
        self.target["run_id"] = run.info.run_id

    def _parent_in(self, exp_id: str, parent_id: str) -> str:
        """The parent as seen from experiment ``exp_id``: itself when it lives there, else its mirror there.

        The MLflow UI draws a run under its parent only inside one experiment; a DAG run's stages log to the
        training, evaluation and analysis experiments, so each of those gets a mirror of the parent run (same
        name and tags, ``agentpipe.mirror_of`` = the parent's id, ended when the parent ends)."""
        parent = self.client.get_run(parent_id)
        if parent.info.experiment_id == exp_id:
            return parent_id
        found = self.client.search_runs([exp_id], filter_string=f"tags.`{MIRROR_TAG}` = '{parent_id}'",
                                        max_results=1)
        if found:
            return found[0].info.run_id
        tags = {k: v for k, v in parent.data.tags.items() if not k.startswith("mlflow.")}
        tags[MIRROR_TAG] = parent_id
        mirror = self.client.create_run(exp_id, start_time=parent.info.start_time, tags=tags,
                                        run_name=parent.info.run_name)
        if parent.info.end_time:
            self.client.set_terminated(mirror.info.run_id, status=parent.info.status, end_time=parent.info.end_time)
        return mirror.info.run_id

    def _end_mirrors(self, status: str, end_time: int) -> None:
        ids = [e.experiment_id for name in EXPERIMENTS if (e := self.client.get_experiment_by_name(name))]
        run_id = self.target["run_id"]
        for mirror in self.client.search_runs(ids, filter_string=f"tags.`{MIRROR_TAG}` = '{run_id}'") if ids else []:
            self.client.set_terminated(mirror.info.run_id, status=status, end_time=end_time)

    def _register(self, op: dict[str, Any]) -> None:
        from mlflow.exceptions import MlflowException

        run_id, name = self.target["run_id"], op["name"]
        key = f"{op['journal_id']}:{op['seq']}"
        try:
            self.client.create_registered_model(name)
        except MlflowException as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code) and "already exists" not in str(e):
                raise
        version = next((mv.version for mv in self.client.search_model_versions(f"name = '{name}'")
                        if (mv.tags or {}).get("agentpipe.op") == key), None)
        if version is None:
            tags = {**{k: str(v) for k, v in (op.get("tags") or {}).items()}, "agentpipe.op": key}
            source = f"runs:/{run_id}/{op['artifact_path']}"
            if op.get("source_path"):  # files registered where they are: no upload, no second copy
                version = self._register_in_place(name, op, tags)
                if version is not None:
                    self._aliases(name, op, version)
                    return
                self.client.log_artifacts(run_id, str(self._local(op, "model folder")), op["artifact_path"])
            version = self.client.create_model_version(name, source=source, run_id=run_id, tags=tags,
                                                       description=op.get("description")).version
        self._aliases(name, op, version)

    def _register_in_place(self, name: str, op: dict[str, Any], tags: dict[str, str]) -> str | None:
        """Create the version with the local folder itself as its source (``file://``); None when the backend
        refuses local sources (an MLflow server accepts them only inside the run's own artifact folder): the caller
        then uploads the folder once and registers that, and the version's ``agentpipe.weights`` tag says so."""
        from mlflow.exceptions import MlflowException

        local = self._local(op, "model folder")
        try:
            return self.client.create_model_version(
                name, source=local.as_uri(), run_id=self.target["run_id"],
                tags={**tags, "agentpipe.weights": "in place"}, description=op.get("description")).version
        except MlflowException as e:
            if "local path" not in str(e) or "INVALID_PARAMETER_VALUE" not in str(e.error_code):
                raise
        log.warning("%s: the tracking server refuses local model sources; uploading %s to the run's artifacts "
                    "(a second copy of the weights; a direct database tracking URI registers them in place)",
                    self.uri, local)
        tags["agentpipe.weights"] = "uploaded (the tracking server refuses local sources)"
        return None

    def _aliases(self, name: str, op: dict[str, Any], version: str) -> None:
        for alias in op.get("aliases") or []:  # moves the alias to this version
            self.client.set_registered_model_alias(name, alias, version)

    def _input(self, op: dict[str, Any]) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=op["name"], digest=op["digest"], source_type="local",
                          source=json.dumps({"uri": op["source"]}), schema=op.get("schema"),
                          profile=json.dumps(op.get("profile") or {}))
        self.client.log_inputs(self.target["run_id"], datasets=[DatasetInput(
            dataset, tags=[InputTag(key="mlflow.data.context", value=op.get("context", "training"))])])

    def _local(self, op: dict[str, Any], what: str) -> Path:
        """The file an operation refers to: relative to the journal (the tree moved), else its absolute path."""
        local = (self.folder / op["rel"]).resolve() if op.get("rel") else Path(op["path"])
        if not local.exists():
            local = Path(op["path"])
        if not local.exists():
            raise FileNotFoundError(f"{what} {op['path']} no longer exists")
        return local

    def _traces(self, ops: list[dict[str, Any]]) -> None:
        """Consecutive ``traces`` operations are logged together (one bulk write, see ``traces``)."""
        from pipeline.tracking.traces import log_files_traces

        local = [self._local(op, "trajectory file") for op in ops]
        reports = log_files_traces(self.client, self.uri, self.target["experiment_id"], local,
                                   run_id=self.target["run_id"])
        for rep in reports:
            log.info("%s: %d traces (%d logged, %d with new judgements)", Path(rep.file).name, rep.traces,
                     rep.logged, rep.replaced)

    def _artifact(self, op: dict[str, Any]) -> None:
        local = self._local(op, "artifact")
        if local.is_dir():
            self.client.log_artifacts(self.target["run_id"], str(local), op.get("artifact_path"))
        else:
            self.client.log_artifact(self.target["run_id"], str(local), op.get("artifact_path"))

    def _batch(self, ops: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        metrics, params, tags = [], [], []
        for op in ops:
            if op["op"] == "metrics":
                metrics += [Metric(k, float(v), op["ts"], op.get("step") or 0) for k, v in op["metrics"].items()]
            elif op["op"] == "params":
                params += [Param(k, v) for k, v in op["params"].items()]
            else:
                tags += [RunTag(k, str(v)) for k, v in op["tags"].items()]
        for i in range(0, max(len(metrics), len(params), len(tags)), 100):
            self.client.log_batch(self.target["run_id"], metrics=metrics[i:i + 100], params=params[i:i + 100],
                                  tags=tags[i:i + 100])

    def _apply(self, group: list[dict[str, Any]]) -> None:
        op = group[0]
        kind = op["op"]
        if kind == "start":
            self._start(op)
        elif self.target.get("run_id") is None:
            raise RuntimeError("journal has no start operation before its first operation")
        elif kind in ("metrics", "params", "tags"):
            self._batch(group)
        elif kind == "resume":
            self.client.update_run(self.target["run_id"], status="RUNNING")
        elif kind == "end":
            self.client.set_terminated(self.target["run_id"], status=op.get("status", "FINISHED"), end_time=op["ts"])
            self._end_mirrors(op.get("status", "FINISHED"), op["ts"])
        elif kind == "artifact":
            self._artifact(op)
        elif kind == "register_model":
            self._register(op)
        elif kind == "input":
            self._input(op)
        elif kind == "traces":
            self._traces(group)
        else:
            raise RuntimeError(f"unknown journal operation '{kind}'")

    def send(self, ops: list[dict[str, Any]]) -> tuple[int, bool]:
        """Send the operations not yet sent; returns (number sent, whether the backend stayed reachable)."""
        pending = [op for op in ops if op["seq"] > self.target["synced_seq"]]
        sent = 0
        i = 0
        single_until = -1  # after a failed group of traces, its operations are retried one by one
        while i < len(pending):
            group = [pending[i]]
            kinds = _BATCHED.get(group[0]["op"], ()) if i >= single_until else ()
            while i + len(group) < len(pending) and pending[i + len(group)]["op"] in kinds and len(group) < 200:
                group.append(pending[i + len(group)])  # batch consecutive operations of one kind
            try:
                self._apply(group)
            except Exception as e:  # noqa: BLE001 - decide below whether the server is down or the op is bad
                status = _refusal(e)
                if status is not None:
                    self.save()
                    raise TrackingRefused(self.uri, status) from None
                if not reachable(self.uri):
                    log.warning("tracking server %s unreachable: %d operations kept in %s for `agentpipe track "
                                "sync`", self.uri, len(pending) - i, self.folder / JOURNAL)
                    self.save()
                    return sent, False
                if len(group) > 1 and group[0]["op"] == "traces":  # each file again, alone (retries, a missing file)
                    single_until = i + len(group)
                    continue
                if group[0]["op"] == "traces" and not isinstance(e, FileNotFoundError) and self._retry(group[0]):
                    log.warning("%s: traces of %s not all logged (%s); kept for the next sync", self.folder,
                                Path(group[0]["path"]).name, " ".join(str(e).split())[:300])
                    self.save()
                    return sent, False
                if group[0]["op"] == "start":  # without a run nothing else can be sent: keep it all for later
                    log.warning("%s: could not start the MLflow run on %s: %s", self.folder, self.uri,
                                " ".join(str(e).split())[:300])
                    self.save()
                    return sent, False
                if len(group) > 1:  # isolate the bad operation
                    for op in group:
                        sent += self._send_one(op)
                    i += len(group)
                    continue
                self._reject(group[0], e)
            else:
                sent += len(group)
            self.target["synced_seq"] = group[-1]["seq"]
            i += len(group)
            self.save()
        return sent, True

    def _retry(self, op: dict[str, Any], attempts: int = 3) -> bool:
        """Whether a failed operation is kept for another sync (a server error on one of many requests is usually
        passing); after ``attempts`` failures it is rejected so that the rest of the journal is not held up."""
        tries = self.target.setdefault("attempts", {})
        tries[str(op["seq"])] = tries.get(str(op["seq"]), 0) + 1
        return tries[str(op["seq"])] < attempts

    def _send_one(self, op: dict[str, Any]) -> int:
        try:
            self._apply([op])
        except Exception as e:  # noqa: BLE001 - a refused operation is recorded (retried, then rejected), not fatal
            self._reject(op, e)
            return 0
        finally:
            self.target["synced_seq"] = op["seq"]
            self.save()
        return 1

    def _reject(self, op: dict[str, Any], e: Exception) -> None:
        msg = " ".join(str(e).split())[:300]
        log.warning("%s: operation %d (%s) rejected by %s: %s", self.folder / JOURNAL, op["seq"], op["op"], self.uri,
                    msg)
        self.target.setdefault("rejected", []).append({"seq": op["seq"], "op": op["op"], "error": msg})


@dataclass
class SyncReport:
    """What one :func:`sync` of one journal folder did."""

    folder: Path
    tracking_uri: str
    operations: int = 0
    sent: int = 0
    pending: int = 0
    run_id: str | None = None
    reachable: bool = True
    rejected: list[dict[str, Any]] = field(default_factory=list)
    #: why the server refused the client (401/403), else None
    refused: str | None = None

    def line(self) -> str:
        if self.refused:
            return f"{self.folder}: refused: {self.refused}"
        status = "unreachable" if not self.reachable else "ok" if not self.pending else "pending"
        rej = f", {len(self.rejected)} rejected" if self.rejected else ""
        return (f"{self.folder}: {status}: {self.sent} sent now, {self.pending} pending of {self.operations}{rej} "
                f"(run {self.run_id or '-'})")


def sync(folder: str | Path, tracking_uri: str | None = None) -> SyncReport:
    """Replay a journal folder's unsent operations into MLflow (idempotent); returns what happened.

    Raises ``ConfigError`` when no tracking URI is given or configured.
    """
    folder = Path(folder)
    uri = resolve_tracking_uri(tracking_uri)
    if uri is None:
        raise ConfigError("no MLflow tracking URI: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    ops = read_journal(folder)
    report = SyncReport(folder=folder, tracking_uri=uri, operations=len(ops))
    try:
        return _sync(folder, uri, ops, report)
    except TrackingRefused as e:
        report.refused = str(e)
        target = read_state(folder).get("targets", {}).get(uri, {})
        report.pending = sum(op["seq"] > target.get("synced_seq", -1) for op in ops)
        return report


def _sync(folder: Path, uri: str, ops: list[dict[str, Any]], report: SyncReport) -> SyncReport:
    if not reachable(uri):
        report.reachable = False
        target = read_state(folder).get("targets", {}).get(uri, {})
        report.pending = sum(op["seq"] > target.get("synced_seq", -1) for op in ops)
        report.run_id = target.get("run_id")
        return report
    with sync_lock(folder):
        sender = _Sender(folder, uri)
        report.sent, report.reachable = sender.send(ops)
        report.run_id = sender.target.get("run_id")
        report.pending = sum(op["seq"] > sender.target["synced_seq"] for op in ops)
        report.rejected = list(sender.target.get("rejected", []))
    return report


def find_journals(root: str | Path) -> list[Path]:
    """Journal folders at or below ``root``, parents (shallower paths) first."""
    root = Path(root)
    if (root / JOURNAL).is_file():
        found = [root]
    else:
        found = []
    found += sorted((p.parent for p in root.rglob(JOURNAL) if p.parent != root), key=lambda p: (len(p.parts), str(p)))
    return found


def sync_tree(root: str | Path, tracking_uri: str | None = None) -> list[SyncReport]:
    """:func:`sync` every journal folder at or below ``root``."""
    return [sync(folder, tracking_uri) for folder in find_journals(root)]
