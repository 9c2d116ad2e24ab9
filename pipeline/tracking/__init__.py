"""MLflow tracking that never loses data (DESIGN §7): a durable journal per run, replayable into MLflow.

Public API (``journal``: the journal folder; ``tracker``: ``Tracker``; ``sender``: the replay into MLflow;
``secrets``: what is never logged):

* :class:`Tracker` -- ``Tracker.open(folder, experiment=..., run_name=..., parent=..., tags=...)``; then
  ``log_params``, ``log_metrics(step=)``, ``set_tags``, ``log_artifact``, ``register_model``, ``finish`` (or use it
  as a context manager). Reopening a folder resumes the same run.
* :func:`sync` / :func:`sync_tree` -- replay unsent journal operations into MLflow (idempotent);
  CLI ``agentpipe track sync DIR``.
* :func:`run_id_for` -- the MLflow run id a journal folder was synced to.
* :func:`metric_key` -- a name made valid as an MLflow metric name (``log_metrics`` applies it).
* :data:`EXPERIMENTS` -- ``training``, ``evaluation``, ``analysis``.

Beside it: ``traces`` (every judged trajectory an MLflow trace, judgements as assessments; ``Tracker.log_traces``,
CLI ``agentpipe track traces``), ``feedback`` (reviewers' labels pulled back, judge-human agreement; CLI
``agentpipe track feedback``) and ``stage_runs`` (tokens, USD, time and GPU-hours per stage output; the DAG
parent's sums).

The tracking URI comes from the argument, else ``MLFLOW_TRACKING_URI`` (settings); with neither, runs are journaled
only. mlflow is imported only when something is sent.
"""

from pipeline.tracking.journal import EXPERIMENTS, metric_key, resolve_tracking_uri, run_id_for
from pipeline.tracking.sender import SyncReport, find_journals, reachable, sync, sync_tree
from pipeline.tracking.tracker import Tracker

__all__ = ["EXPERIMENTS", "SyncReport", "Tracker", "find_journals", "metric_key", "reachable", "resolve_tracking_uri",
           "run_id_for", "sync", "sync_tree"]
