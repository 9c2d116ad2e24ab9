"""``evaluate --batch``: an API judge's requests sent through the OpenAI Batch API (``pipeline.llm.openai_batch``).

The requests are the ones a synchronous run makes: the same messages, settings and seeds. Their answers become the
same eval records (``read_judgement``), priced at the batch rate. One batch carries every pending judgement of a
trajectory file, all metrics and replicates, journaled beside it as ``<trajectory file>.batch.json``.

* **Resume.** A killed process reattaches to its batch (``BatchJob``). A rerun after the answers were saved
  submits nothing. A rerun after a crash that saved only part of them collects the rest from the same batch.
* **Failures.** Requests the batch did not answer (per-request errors, expiry, cancellation) are recorded as failed
  requests. The stage is then ``incomplete``, and the same command asks again for exactly those, in a new batch.
* **Waiting.** With ``batch_wait`` the stage polls until the batch ends. Without it, the stage returns at once with
  the batch's id (status ``waiting``), and a later run of the same command collects. The Airflow operator does
  this: it defers on a trigger that polls the batch, holding no worker slot.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.llm import ChatBackend, ChatRequest
from pipeline.llm.openai_batch import TERMINAL, BatchJob, mark_collected, pending_batch

log = logging.getLogger("pipeline.evaluation")


def batch_journal(trajectory_file: Path) -> Path:
    """Where a trajectory file's evaluation batch is journaled."""
    return trajectory_file.with_name(trajectory_file.name + ".batch.json")


def check_batch_backend(backend: ChatBackend, evaluator: str) -> Any:
    """The OpenAI backend a batch needs (one line otherwise)."""
    from pipeline.llm.cache import CachedBackend
    from pipeline.llm.openai_backend import OpenAIBackend

    if isinstance(backend, CachedBackend):
        raise ConfigError("--batch: the response cache answers request by request; drop --cache")
    if not isinstance(backend, OpenAIBackend):
        raise ConfigError(f"--batch: evaluator {evaluator} is not an OpenAI-compatible API judge (openai:<model> or "
                          "gpt-*); a local judge batches by itself")
    return backend


def custom_id(eval_type: str, line: int, replicate: int) -> str:
    return f"{eval_type}:{line}:{replicate}"


def judge_in_batch(backend: ChatBackend, evaluator: str, trajectory_file: Path,
                   items: list[tuple[tuple[str, int, int], ChatRequest]], *, wait: bool, poll_s: float,
                   force: bool = False,
                   progress: Callable[[str], None] | None = None) -> tuple[dict[tuple[str, int, int], Any] | None,
                                                                          dict[str, Any]]:
    """Send ``items`` ((metric, line, replicate), request) as one batch, or reattach to theirs.

    Returns ``(responses, info)``: the responses by key once the batch has ended (``None`` while it runs and
    ``wait`` is off), and the batch's id and status (``info``).
    """
    api = check_batch_backend(backend, evaluator)
    journal = batch_journal(trajectory_file)
    job = BatchJob(api, journal, [(custom_id(*key), req) for key, req in items], force=force)
    job.submit()

    def tell(info: dict[str, Any]) -> None:
        if progress is not None:
            progress(f"batch {info['batch_id']}: {info['status']} ({info['completed']} done, {info['failed']} "
                     f"failed of {info['total']})")

    if wait:
        status = job.wait(poll_s=poll_s, progress=tell)
    else:
        info = job.poll()
        tell(info)
        status = info["status"]
    info = {"batch_id": job.state.batch_id, "status": status, "requests": len(items),
            "journal": str(journal), "base_url": job.state.base_url, "poll_s": poll_s}
    if status not in TERMINAL:
        return None, info
    by_id = job.results()
    return {key: by_id[custom_id(*key)] for key, _ in items}, info


def batch_done(trajectory_file: Path) -> None:
    """The answers are saved: the batch is marked collected (a retry of the same requests is a new batch)."""
    done = mark_collected(batch_journal(trajectory_file))
    if done:
        log.info("batch %s: answers saved", done)


def check_no_pending_batch(trajectory_file: Path, *, force: bool) -> None:
    """A synchronous run over judgements a batch still holds would pay for them twice: refused (one line), or
    with ``force`` the batch is left and its journal kept aside."""
    from pipeline.data.jsonl import move_aside
    from pipeline.errors import DataError

    from pipeline.llm.openai_batch import BatchError

    journal = batch_journal(trajectory_file)
    try:
        pending = pending_batch(journal)
    except BatchError:
        if not force:
            raise
        pending = "(unreadable journal)"
    if pending is None:
        return
    if not force:
        raise DataError(f"{trajectory_file}: batch {pending} of this file's judgements is not collected yet "
                        f"({journal.name}); rerun with --batch to collect it (nothing is sent twice), or with --force "
                        "to judge synchronously (the batch left, its journal kept aside)")
    for moved in move_aside(journal):
        log.warning("batch %s left uncollected; its journal kept aside: %s", pending, moved)
