"""The OpenAI Batch API for a stage's requests: half the price and far higher rate limits, answers within 24 h.

``BatchJob`` turns a list of requests into one batch and back:

* Each request becomes one JSONL line: ``custom_id`` is the caller's key, ``body`` is what ``OpenAIBackend`` would
  send synchronously (the same model-family rules, the same settings not sent).
* The job is journaled in a small JSON file before any call that could spend:
  1. the job's key (a digest of its lines), then
  2. the uploaded input file's id, then
  3. the batch's id, the moment the batch exists.
* A process killed anywhere reattaches. It finds the journaled batch, or, if it was killed between creating the
  batch and journaling its id, the batch whose metadata carries the job's key (the API lists batches). One job
  never creates two batches, and a job whose batch failed to be created at all is submitted again.
* Once the caller has saved a batch's answers it marks the batch collected (``mark_collected``). The journal keeps
  the collected ids, and a collected, failed or cancelled batch is never reattached: a retry of the same requests
  is a new batch.
* The journal is one per caller's output. A batch in it that is not collected yet and holds other requests (another
  configuration's), or lives on another server, is refused in one line rather than overwritten (``force`` keeps
  the journal aside and starts anew).
* ``poll`` reads the batch's status.
* ``results`` reads its output and error files into one ``ChatResponse`` per ``custom_id``, for every request of
  the job: an answer priced at the batch rate, or a failure. A failure is a request the batch answered with an
  error, or one it never ran (the batch expired, was cancelled or failed): the caller records it like any failed
  request, and a rerun asks again only for those.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError, PipelineError
from pipeline.llm.types import ChatRequest, ChatResponse

if TYPE_CHECKING:
    from pipeline.llm.openai_backend import OpenAIBackend

log = logging.getLogger("pipeline.llm.openai_batch")

#: The batch's statuses after which nothing changes.
TERMINAL = ("completed", "failed", "expired", "cancelled")
#: The metadata key naming the job a batch belongs to (how a killed process finds its batch again).
JOB_KEY = "agentpipe_job"
#: Batches listed when looking for a job's batch that was created but not journaled (newest first).
_LISTED = 500


class BatchError(PipelineError):
    """The Batch API refused or lost something that a rerun cannot fix by itself (one line)."""


@dataclass
class BatchState:
    """The journal of one job (``<journal>.json``)."""

    key: str
    model: str
    requests: int
    base_url: str
    input_file_id: str | None = None
    batch_id: str | None = None
    status: str | None = None
    #: ``custom_id`` → digest of its line: a later job whose requests are all in this batch, unchanged, is
    #: answered from it (a rerun after a crash that saved part of the answers spends nothing again)
    lines: dict[str, str] | None = None
    #: batches whose answers the caller saved: never reattached
    collected: list[str] | None = None


def job_key(lines: Sequence[str]) -> str:
    """The job's identity: a digest of its request lines (same requests, same job)."""
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode())
    return h.hexdigest()[:24]


class BatchJob:
    """One batch of ``requests`` (``custom_id`` → request) on ``backend``'s model, journaled at ``journal``."""

    def __init__(self, backend: OpenAIBackend, journal: Path, requests: Sequence[tuple[str, ChatRequest]], *,
                 force: bool = False) -> None:
        ids = [cid for cid, _ in requests]
        if len(set(ids)) != len(ids):
            raise ConfigError("batch: custom ids must be unique")
        self.backend = backend
        self.journal = Path(journal)
        self.requests = list(requests)
        self.lines = [json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                                  "body": backend.request_kwargs(req)}, sort_keys=True) + "\n"
                      for cid, req in self.requests]
        for _, req in self.requests:  # a setting the model does not take and that is not its default: refused now
            backend.not_sent(req.config)
        self.key = job_key(self.lines)
        self.digests = {cid: hashlib.sha256(line.encode()).hexdigest()[:16]
                        for (cid, _), line in zip(self.requests, self.lines)}
        self.state = self._read_journal(force)

    # ---- the journal ------------------------------------------------------------------------------------

    def _read_journal(self, force: bool) -> BatchState:
        fresh = BatchState(key=self.key, model=self.backend.spec.model, requests=len(self.lines),
                           base_url=self.backend.public_url, lines=self.digests, collected=[])
        data = read_journal(self.journal)
        if data is None:
            return fresh
        fresh.collected = list(data.get("collected") or [])
        pending = data.get("batch_id")
        if not pending:  # every batch in it collected: this job starts anew (its upload reused, if it got that far)
            if data.get("key") == self.key and data.get("base_url") == fresh.base_url:
                fresh.input_file_id = data.get("input_file_id")
            return fresh
        recorded = data.get("lines") if isinstance(data.get("lines"), dict) else {}
        covered = all(recorded.get(cid) == d for cid, d in self.digests.items())
        if data.get("base_url") != self.backend.public_url or data.get("key") != self.key and not covered:
            where = data.get("base_url") != self.backend.public_url
            if force:
                from pipeline.data.jsonl import move_aside

                for moved in move_aside(self.journal):
                    log.warning("batch %s left uncollected; its journal kept aside: %s", pending, moved)
                return fresh
            raise BatchError(
                f"{self.journal}: batch {pending} ({data.get('status')}) " +
                (f"lives on {data.get('base_url')}, not {self.backend.public_url}: point the settings at that server "
                 "to collect it" if where else "holds other requests of this output (another configuration's): "
                 "collect it with the command that started it") +
                ", or rerun with --force to leave it (the journal kept aside)")
        if data.get("key") != self.key:
            log.info("batch: %s answers these %d requests already (part of its job)", pending, len(self.digests))
            self.key = str(data["key"])
        return BatchState(**{k: data.get(k) for k in BatchState.__dataclass_fields__})

    def _save(self) -> None:
        from pipeline.data.jsonl import atomic_write_json

        atomic_write_json(self.journal, asdict(self.state))

    # ---- submit, poll, collect ----------------------------------------------------------------------------

    def submit(self) -> BatchState:
        """The job's batch: the journaled one, one found by its key, or a new one (journaled as it is made)."""
        if self.state.batch_id:
            return self.state
        self._save()  # the intent first: a process killed after this point finds its batch by the key
        with self.backend.sync_client() as client:
            found = self._find(client)
            if found is not None:
                log.info("batch: reattached to %s (created for job %s before a restart)", found, self.key)
                self.state.batch_id = found
                self._save()
                return self.state
            if not self.state.input_file_id:
                data = "".join(self.lines).encode()
                uploaded = client.files.create(file=(f"agentpipe-{self.key}.jsonl", io.BytesIO(data)),
                                               purpose="batch")
                self.state.input_file_id = uploaded.id
                self._save()
            batch = client.batches.create(input_file_id=self.state.input_file_id, endpoint="/v1/chat/completions",
                                          completion_window="24h", metadata={JOB_KEY: self.key})
            self.state.batch_id, self.state.status = batch.id, batch.status
            self._save()
        log.info("batch: %s created for %d requests (job %s)", batch.id, len(self.lines), self.key)
        return self.state

    def _find(self, client: Any) -> str | None:
        """A batch made for this job but not journaled (the process died between creating and journaling)."""
        seen = 0
        collected = set(self.state.collected or ())
        for batch in client.batches.list(limit=100):
            if ((batch.metadata or {}).get(JOB_KEY) == self.key and batch.id not in collected
                    and batch.status not in ("failed", "cancelled", "cancelling")):
                return str(batch.id)
            seen += 1
            if seen >= _LISTED:
                break
        return None

    def poll(self) -> dict[str, Any]:
        """The batch's status and request counts (journaled)."""
        if not self.state.batch_id:
            raise BatchError(f"{self.journal}: no batch submitted yet for job {self.key}")
        with self.backend.sync_client() as client:
            batch = client.batches.retrieve(self.state.batch_id)
        if batch.status != self.state.status:
            self.state.status = batch.status
            self._save()
        counts = batch.request_counts
        return {"status": batch.status, "batch_id": batch.id,
                "completed": getattr(counts, "completed", 0) if counts else 0,
                "failed": getattr(counts, "failed", 0) if counts else 0, "total": len(self.lines)}

    def wait(self, *, poll_s: float = 30.0, progress: Callable[[dict[str, Any]], None] | None = None) -> str:
        """Poll until the batch ends; its final status."""
        while True:
            info = self.poll()
            if progress is not None:
                progress(info)
            if info["status"] in TERMINAL:
                return str(info["status"])
            time.sleep(poll_s)

    def results(self) -> dict[str, ChatResponse]:
        """One response per request of the job, once its batch has ended."""
        if self.state.status not in TERMINAL:
            raise BatchError(f"batch {self.state.batch_id}: not finished (status {self.state.status})")
        out: dict[str, ChatResponse] = {}
        wanted = {cid for cid, _ in self.requests}
        by_id = dict(self.requests)
        with self.backend.sync_client() as client:
            batch = client.batches.retrieve(self.state.batch_id)
            for file_id in (batch.output_file_id, batch.error_file_id):
                if not file_id:
                    continue
                text = client.files.content(file_id).text
                for n, line in enumerate(text.splitlines(), 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError:
                        raise BatchError(f"batch {batch.id}: line {n} of file {file_id} is not JSON") from None
                    cid = row.get("custom_id") if isinstance(row, dict) else None
                    if cid not in wanted:
                        continue  # not a request of this job
                    out[cid] = self._response(row, by_id[cid])
        why = {"expired": "the batch expired before this request ran", "cancelled": "the batch was cancelled",
               "failed": f"the batch failed ({_errors(batch)})"}.get(batch.status, "no answer in the batch's files")
        for cid, _ in self.requests:
            if cid not in out:
                out[cid] = ChatResponse.failure(f"batch {batch.id}: {why}")
        return out

    def _response(self, row: dict[str, Any], request: ChatRequest) -> ChatResponse:
        """One line of the output or error file as a response (priced at the batch rate)."""
        resp = row.get("response") if isinstance(row.get("response"), dict) else None
        error = row.get("error")
        if resp is None or error:
            code = (error or {}).get("code") if isinstance(error, dict) else None
            message = (error or {}).get("message") if isinstance(error, dict) else None
            return ChatResponse.failure(self.backend.scrub(f"batch request not answered: {code or 'error'}: "
                                                           f"{message or 'no response'}"))
        status = resp.get("status_code")
        body = resp.get("body")
        if status != 200:
            detail = (body or {}).get("error", {}) if isinstance(body, dict) else {}
            message = detail.get("message") if isinstance(detail, dict) else None
            return ChatResponse.failure(self.backend.scrub(f"batch request failed: HTTP {status}: "
                                                           f"{message or json.dumps(body)[:200]}"))
        response = self.backend.parse_body(json.dumps(body), latency_s=0.0, batch=True)
        response.not_sent = tuple(self.backend.not_sent(request.config))
        return response


def _errors(batch: Any) -> str:
    errors = getattr(getattr(batch, "errors", None), "data", None) or []
    return "; ".join(f"{getattr(e, 'code', '?')}: {getattr(e, 'message', '')}" for e in errors[:3]) or "no detail"


def read_journal(journal: Path) -> dict[str, Any] | None:
    """A batch journal's content (None when there is none)."""
    try:
        data = json.loads(Path(journal).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise BatchError(f"{journal}: unreadable batch journal ({type(e).__name__}); it names the batch these "
                         "requests were sent in: check it before removing it") from None
    return data if isinstance(data, dict) else None


def pending_batch(journal: Path) -> str | None:
    """The batch a journal names whose answers are not saved yet (None: none)."""
    data = read_journal(journal)
    return str(data["batch_id"]) if data and data.get("batch_id") else None


def mark_collected(journal: Path) -> str | None:
    """The caller saved the journaled batch's answers: it is never reattached (the journal keeps its id)."""
    from pipeline.data.jsonl import atomic_write_json

    data = read_journal(journal)
    if not data or not data.get("batch_id"):
        return None
    done = str(data["batch_id"])
    data["collected"] = [*(data.get("collected") or []), done]
    data.update(batch_id=None, input_file_id=None, status=None)
    atomic_write_json(journal, data)
    return done
