"""MLflow tracking that never loses data: a durable local journal first, MLflow second (DESIGN §7). This module:
the journal folder (operations, sync state, its lock) and the names every part shares; ``tracker`` the API,
``sender`` the replay into MLflow, ``secrets`` what is never logged.

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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.data.jsonl import read_jsonl

log = logging.getLogger("pipeline.tracking")

JOURNAL = "journal.jsonl"
STATE = "sync_state.json"
_LOCK = ".sync.lock"
#: Experiment names (DESIGN §7).
EXPERIMENTS = ("training", "evaluation", "analysis")
#: tag of a parent run's mirror in another experiment: the parent's run id
MIRROR_TAG = "agentpipe.mirror_of"
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


def now_ms() -> int:
    return int(time.time() * 1000)


def resolve_tracking_uri(uri: str | None = None) -> str | None:
    """The tracking URI to use: ``uri``, else the settings (``MLFLOW_TRACKING_URI``), else None (journal only)."""
    if uri:
        return uri
    from pipeline.settings import get_settings

    return get_settings().mlflow_tracking_uri or None


def context_tags() -> dict[str, str]:
    from pipeline.data.manifest import code_version

    tags = {"agentpipe.code_version": code_version(), "agentpipe.host": socket.gethostname()}
    for env, tag in _ENV_TAGS.items():
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


@contextlib.contextmanager
def sync_lock(folder: Path, blocking: bool = True) -> Iterator[bool]:
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


def target_of(state: dict[str, Any], uri: str) -> dict[str, Any]:
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


