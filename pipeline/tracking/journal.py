"""MLflow tracking that never loses data: a durable local journal first, MLflow second (DESIGN §7).

Every call on a :class:`Tracker` appends one operation to ``<folder>/journal.jsonl`` (fsync'ed) and then, when a
tracking server is configured and reachable, sends the pending operations to MLflow. If MLflow is down or not
configured nothing fails: the journal keeps everything and :func:`sync` (``agentpipe track sync DIR``) replays it
later. Replaying is idempotent: ``sync_state.json`` records, per tracking URI, the MLflow run id and the last
operation sent; a run is found again by its ``agentpipe.journal_id`` tag, metrics carry their original timestamps
(MLflow keeps one row per identical point) and model versions carry the operation key they were created by.

    from pipeline.tracking import Tracker

    with Tracker.open(out / "tracking" / "train", experiment="training", run_name=name,
                      parent=None, tags={"stage": "train"}) as t:       # reopening the folder resumes the run
        t.log_params({"lr": 5e-5, "beta": 0.1})
        t.log_metrics({"loss": 0.69}, step=1)
        t.log_artifact(out / "adapter", "adapter")
        t.register_model(name, "adapter", tags={"base_model": "...", "seed": "0"})
    # leaving the block ends the run (FINISHED, or FAILED on an exception)

``parent`` is an MLflow run id or another tracker's folder (nested runs; resolved at sync time). Without it the
run nests under ``$AGENTPIPE_MLFLOW_PARENT_RUN_ID`` when set (an Airflow DAG run). Airflow / Slurm context
(dag, run, task, job id) and the code version are added as tags. Parameters whose names look like secrets are
never logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.jsonl import JsonlAppender, atomic_write_json, read_jsonl
from pipeline.errors import ConfigError

log = logging.getLogger("pipeline.tracking")

JOURNAL = "journal.jsonl"
STATE = "sync_state.json"
_LOCK = ".sync.lock"
#: Experiment names (DESIGN §7).
EXPERIMENTS = ("training", "evaluation", "analysis")
#: tag of a parent run's mirror in another experiment: the parent's run id
MIRROR_TAG = "agentpipe.mirror_of"
#: Names of parameters that are never logged (matched case-insensitively anywhere in the name).
#: Words of a parameter name that make it a secret (whole words: ``max_new_tokens`` and ``tokenizer`` are not)
_SECRET_WORDS = frozenset({"token", "secret", "secrets", "password", "passwd", "credential", "credentials",
                           "authorization", "apikey", "auth"})
#: ``<word>_key`` names that are secrets (``api_key``, ``access_key``, …; ``sort_key`` is not)
_KEY_OWNERS = frozenset({"api", "access", "secret", "private", "openai", "openrouter", "hf", "mlflow", "wandb"})


def is_secret_name(name: str) -> bool:
    """Whether a parameter name names a secret: a secret word (token, password, …) as a whole word, or a key
    of an API or account (``OPENAI_API_KEY``, ``apiKey``, ``hf-token``)."""
    words = re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name)).lower())
    return any(w in _SECRET_WORDS for w in words) or any(
        w == "key" and i > 0 and words[i - 1] in _KEY_OWNERS for i, w in enumerate(words))
_SECRET_VALUE = re.compile(r"^(sk-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{20,})$")
_MAX_PARAM = 6000
_ENV_TAGS = {"AIRFLOW_CTX_DAG_ID": "airflow.dag_id", "AIRFLOW_CTX_DAG_RUN_ID": "airflow.run_id",
             "AIRFLOW_CTX_TASK_ID": "airflow.task_id", "AIRFLOW_CTX_TRY_NUMBER": "airflow.try_number",
             "SLURM_JOB_ID": "slurm.job_id"}
PARENT_ENV = "AGENTPIPE_MLFLOW_PARENT_RUN_ID"


_METRIC_UNSAFE = re.compile(r"[^\w.\- :/]")


def metric_key(name: str) -> str:
    """``name`` as a valid MLflow metric name. The configuration labels' ``,`` (sequential stages) and ``&``
    (combined data) become ``:`` and `` and `` so that ``S,H`` and ``S&H`` stay apart; any other character
    MLflow refuses becomes ``_``."""
    return _METRIC_UNSAFE.sub("_", name.replace(",", ":").replace("&", " and "))


def _now_ms() -> int:
    return int(time.time() * 1000)


def resolve_tracking_uri(uri: str | None = None) -> str | None:
    """The tracking URI to use: ``uri``, else the settings (``MLFLOW_TRACKING_URI``), else None (journal only)."""
    if uri:
        return uri
    from pipeline.settings import get_settings

    return get_settings().mlflow_tracking_uri or None


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


def clean_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Parameters as MLflow strings; secret-looking names or values are dropped, long values truncated."""
    out: dict[str, str] = {}
    for k, v in params.items():
        value = v if isinstance(v, str) else json.dumps(v, default=str) if isinstance(v, (list, dict)) else str(v)
        if is_secret_name(str(k)) or _SECRET_VALUE.match(value.strip()):
            log.warning("parameter '%s' looks like a secret: not logged", k)
            continue
        out[str(k)] = value[:_MAX_PARAM]
    return out


def _context_tags() -> dict[str, str]:
    from pipeline.data.manifest import code_version

    tags = {"agentpipe.code_version": code_version(), "agentpipe.host": socket.gethostname()}
    for env, tag in _ENV_TAGS.items():
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


@contextlib.contextmanager
def _locked(folder: Path, blocking: bool = True) -> Iterator[bool]:
    """An exclusive lock on the folder's sync lock file; yields False when ``blocking=False`` and it is taken."""
    from pipeline.data.locks import file_lock

    with file_lock(folder / _LOCK, blocking=blocking) as (acquired, _):
        yield acquired


# --------------------------------------------------------------------------------------------------- sync state
def read_state(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / STATE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {"targets": {}}


def _target(state: dict[str, Any], uri: str) -> dict[str, Any]:
    return state.setdefault("targets", {}).setdefault(uri, {"run_id": None, "synced_seq": -1, "rejected": []})


def read_journal(folder: Path) -> list[dict[str, Any]]:
    path = folder / JOURNAL
    if not path.is_file():
        return []
    return read_jsonl(path).records  # a line cut by a crash is ignored (and repaired on the next append)


def run_id_for(folder: str | Path, tracking_uri: str | None = None) -> str | None:
    """The MLflow run id a journal folder was synced to (None when not synced to that URI yet)."""
    uri = resolve_tracking_uri(tracking_uri)
    if uri is None:
        return None
    return read_state(Path(folder)).get("targets", {}).get(uri, {}).get("run_id")


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
        self.target = _target(self.state, uri)

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
    with _locked(folder):
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
                                  "run_name": run_name, "tags": {**_context_tags(), **{k: str(v) for k, v in
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
        with _locked(self.folder, blocking=force) as got:
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
        op = {"seq": self._seq, "ts": _now_ms(), **op}
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
