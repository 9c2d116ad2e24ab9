"""Cost and time of every stage as MLflow runs, and their sums on the DAG run's parent (issue 17, item 4).

``emulate``, ``evaluate`` and ``pairs`` each log one run per output file (journaled under
``$AGENTPIPE_HOME/tracking/<stage>/<output name>-<hash of its path>``; a rerun on the same output resumes the same run) with the
output's counts, tokens and USD per role (``tokens_agent``, ``cost_usd_emulator``, ``tokens_judge``, …: totals of
the whole output, from its records), and time: ``wall_s`` and ``gpu_hours``, summed over every invocation that
worked on the output (``run_wall_s`` per invocation, by step). On Slurm the time is the job's elapsed time
(``SLURM_JOB_START_TIME``) and the GPUs are the job's; elsewhere the stage's wall time and the visible GPUs.

:func:`child_sums` adds these up over a DAG run's stage runs (nested runs, in every experiment), which the DAG's
last task logs on the parent run as ``total_<metric>``.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: metrics that add up over stages (the DAG's parent logs their sums)
SUMMED_PREFIXES = ("tokens_", "cost_usd_", "unpriced_calls_")
SUMMED = ("wall_s", "gpu_hours")
#: model backends that run on this machine's GPUs (scripted test doubles stand in for local models)
LOCAL_BACKENDS = ("hf", "vllm", "scripted")


def gpu_count() -> int:
    """GPUs this process was given: the Slurm job's, else ``CUDA_VISIBLE_DEVICES`` (torch is not imported)."""
    for var in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    for var in ("SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES"):
        value = os.environ.get(var)
        if value is not None:
            return len([g for g in value.split(",") if g.strip() and g.strip() != "-1"])
    return 0


def elapsed_s(wall_s: float) -> float:
    """The Slurm job's elapsed time when inside one (model loading included), else ``wall_s``."""
    start = os.environ.get("SLURM_JOB_START_TIME", "")
    if os.environ.get("SLURM_JOB_ID") and start.isdigit():
        return max(wall_s, time.time() - int(start))
    return wall_s


def usage_metrics(usage: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """``tokens_<role>`` (prompt + completion) and ``cost_usd_<role>`` from per-role usage totals. A role whose
    calls were all unpriced (an API model missing from the price table) logs no ``cost_usd_<role>`` (unknown, not
    0); ``unpriced_calls_<role>`` counts the calls a logged cost leaves out. A role with priced API calls also
    logs what they would have cost in either mode, ``cost_usd_<role>_if_sync`` and ``cost_usd_<role>_if_batch``
    (through the Batch API, at ``pipeline.llm.pricing.batch_multiplier``), whichever way they were made."""
    from pipeline.llm.pricing import batch_multiplier

    out: dict[str, float] = {}
    for role, u in usage.items():
        out[f"tokens_{role}"] = float((u.get("prompt_tokens") or 0) + (u.get("completion_tokens") or 0))
        out[f"prompt_tokens_{role}"] = float(u.get("prompt_tokens") or 0)
        unpriced = int(u.get("unpriced_calls") or 0)
        if not unpriced or u.get("priced_calls"):  # a sum over no priced call is unknown, not 0
            out[f"cost_usd_{role}"] = round(float(u.get("cost_usd") or 0.0), 6)
        if u.get("cost_usd"):  # priced API calls: both modes
            in_batch = float(u.get("cost_usd_batch") or 0.0)
            in_sync = float(u["cost_usd"]) - in_batch
            m = batch_multiplier()
            out[f"cost_usd_{role}_if_sync"] = round(in_sync + (in_batch / m if m else 0.0), 6)
            out[f"cost_usd_{role}_if_batch"] = round(in_sync * m + in_batch, 6)
        if unpriced:
            out[f"unpriced_calls_{role}"] = float(unpriced)
    return out


def add_usage(total: dict[str, dict[str, float]], role: str, usage: Mapping[str, Any] | None) -> None:
    """Add one record's usage of ``role`` to running totals: an emulation record's role totals (``calls``,
    ``unpriced_calls``) or one call's usage (one call, ``unpriced`` when its price is unknown)."""
    if not usage:
        return
    t = total.setdefault(role, {"prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0, "calls": 0,
                                "unpriced_calls": 0, "priced_calls": 0, "cost_usd_batch": 0.0})
    for k in ("prompt_tokens", "completion_tokens", "cost_usd"):
        t[k] += usage.get(k) or 0  # cost_usd: null when unknown (counted below) or a local model's (no cost)
    if usage.get("batch"):  # answered through the Batch API (priced at its rate)
        t["cost_usd_batch"] = t.get("cost_usd_batch", 0.0) + (usage.get("cost_usd") or 0)
    t["calls"] += usage["calls"] if "calls" in usage else 1
    t["unpriced_calls"] += usage.get("unpriced_calls") or int(bool(usage.get("unpriced")))
    # calls with a known cost: a role total says how many (older records: one, when it has a cost), one call
    # whether it has one (a failed call has none, whatever its model's price)
    t["priced_calls"] += usage.get("priced_calls", int(usage.get("cost_usd") is not None)) if "calls" in usage \
        else int(usage.get("cost_usd") is not None)


def log_stage_run(stage: str, output: str | Path, *, experiment: str, params: Mapping[str, Any],
                  counts: Mapping[str, Any], usage: Mapping[str, Mapping[str, Any]], wall_s: float,
                  share: float = 1.0, gpus: int | None = None, tracking_uri: str | None = None) -> str | None:
    """Log (or resume) the MLflow run of one stage output; returns its run id once sent.

    ``wall_s``: the invocation's wall time (the Slurm job's elapsed time replaces it inside a job); ``share``: this
    output's part of it when one invocation made several outputs together; ``gpus``: the GPUs the stage used
    (default: the job's or the visible ones; 0 for stages that run on CPU or call an API)."""
    from pipeline.settings import get_settings
    from pipeline.tracking.tracker import Tracker

    name = Path(output).name.removesuffix(".jsonl")
    # the output's absolute path picks the journal: two outputs of one name in other folders are other runs
    where = hashlib.sha256(str(Path(output).resolve()).encode()).hexdigest()[:8]
    folder = get_settings().home / "tracking" / stage / f"{re.sub(r'[^A-Za-z0-9._=-]+', '_', name)}-{where}"
    job = os.environ.get("SLURM_JOB_ID")
    with Tracker.open(folder, experiment=experiment, run_name=f"{stage} {name}", tracking_uri=tracking_uri,
                      tags={"agentpipe.stage": stage, "output": str(output)}) as t:
        if not t.resumed:
            t.log_params({**params, "output": str(output)})
        invocation = len(t.logged("run_wall_s"))
        gpus = gpu_count() if gpus is None else gpus
        elapsed = elapsed_s(wall_s) * share
        t.log_metrics({"run_wall_s": round(elapsed, 3), "run_gpus": gpus}, step=invocation)
        t.log_metrics({**{k: float(v) for k, v in counts.items() if isinstance(v, (int, float))},
                       **usage_metrics(usage),
                       "wall_s": round(sum(t.logged("run_wall_s")), 3),
                       "gpu_hours": round(sum(w * g for w, g in zip(t.logged("run_wall_s"), t.logged("run_gpus")))
                                          / 3600, 6)})
        if job:
            t.set_tags({"slurm.job_id": job})
        return t.run_id


def child_sums(run_id: str, tracking_uri: str) -> dict[str, float]:
    """The summed metrics (:data:`SUMMED`, ``tokens_*``, ``cost_usd_*``) of every run below ``run_id`` (its
    children, their children, and those hanging under its mirrors in other experiments)."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.journal import EXPERIMENTS, MIRROR_TAG

    client = MlflowClient(tracking_uri=tracking_uri)
    ids = [e.experiment_id for name in EXPERIMENTS if (e := client.get_experiment_by_name(name))]
    if not ids:
        return {}
    parents = [run_id] + [r.info.run_id for r in client.search_runs(ids, f"tags.`{MIRROR_TAG}` = '{run_id}'")]
    totals: dict[str, float] = {}
    seen: set[str] = set()
    while parents:
        found = []
        for p in parents:
            for run in client.search_runs(ids, f"tags.`mlflow.parentRunId` = '{p}'", max_results=5000):
                if run.info.run_id in seen:
                    continue
                seen.add(run.info.run_id)
                found.append(run.info.run_id)
                for k, v in run.data.metrics.items():
                    if k in SUMMED or k.startswith(SUMMED_PREFIXES):
                        totals[k] = totals.get(k, 0.0) + v
        parents = found
    return {k: round(v, 6) for k, v in sorted(totals.items())}
