"""``OpenAIBatchTrigger``: waits for an OpenAI Batch API batch in the triggerer's event loop (no worker or pool slot
held) and fires one event when the batch ends: ``{"batch_id", "status", "completed", "failed", "elapsed_s"}``, where
``status`` is a terminal batch status, ``WAIT_TIMEOUT`` when the wait gave up, or ``ERROR`` (with ``error``) when
the API refused to say (bad key, no such batch): waiting would not change that.

The stage that submitted the batch (``evaluate --batch``, run by ``StageOperator`` with ``batch_wait`` off) returns
``waiting`` with the batch's id; the operator defers on this trigger, and when it fires it runs the same stage
again, which collects the answers. The API key comes from the triggerer's environment or settings
(``OPENAI_API_KEY``: the triggerer needs it as the workers do), never from the trigger's serialised arguments; a
poll that fails for a while (the service unreachable, 5xx, 429) is logged and retried at the next interval.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

#: Terminal statuses of a batch (``pipeline.llm.openai_batch.TERMINAL``, repeated: this module stays light).
TERMINAL = ("completed", "failed", "expired", "cancelled")
WAIT_TIMEOUT = "WAIT_TIMEOUT"
ERROR = "ERROR"
#: how long a wait lasts unless told: the batch's 24 h completion window, and an hour for finalizing
DEFAULT_TIMEOUT_S = 25 * 3600


class OpenAIBatchTrigger(BaseTrigger):
    """Poll one batch until it ends.

    :param batch_id: the batch's id.
    :param base_url: the API's base URL (as the stage recorded it, without credentials; None: OpenAI's).
    :param poll_interval: seconds between polls.
    :param timeout: give up after this many seconds from now (None: 25 h, the batch's 24 h window and an hour).
    :param deadline: the same as an absolute time (epoch seconds); what the trigger serialises.
    :param started_at: when the wait began (epoch seconds; for ``elapsed_s``).
    """

    def __init__(self, batch_id: str, base_url: str | None = None, poll_interval: float = 60.0,
                 timeout: float | None = None, deadline: float | None = None,
                 started_at: float | None = None) -> None:
        super().__init__()
        self.batch_id = str(batch_id)
        self.base_url = base_url
        self.poll_interval = float(poll_interval)
        now = time.time()
        self.deadline = float(deadline) if deadline is not None else now + float(
            timeout if timeout is not None else DEFAULT_TIMEOUT_S)
        self.started_at = float(started_at) if started_at is not None else now

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"batch_id": self.batch_id, "base_url": self.base_url, "poll_interval": self.poll_interval,
                 "deadline": self.deadline, "started_at": self.started_at})

    def _client(self) -> Any:
        import openai

        from pipeline.settings import get_settings

        key = get_settings().openai_api_key
        return openai.AsyncOpenAI(api_key=key.get_secret_value() if key is not None else "EMPTY",
                                  base_url=self.base_url, max_retries=2, timeout=60.0)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        async with self._client() as client:
            while True:
                try:
                    batch = await client.batches.retrieve(self.batch_id)
                except Exception as e:  # noqa: BLE001 - the service away for a while: logged, polled again
                    status = getattr(e, "status_code", None)
                    if status in (400, 401, 403, 404):  # a refusal that waiting will not change
                        yield self._event(ERROR, None, error=f"HTTP {status} ({type(e).__name__}) polling batch "
                                                             f"{self.batch_id} at {self.base_url or 'OpenAI'}")
                        return
                    self.log.warning("batch %s: poll failed (%s); retrying in %.0f s", self.batch_id,
                                     type(e).__name__, self.poll_interval)
                else:
                    counts = batch.request_counts
                    self.log.info("batch %s: %s (%s done, %s failed)", self.batch_id, batch.status,
                                  getattr(counts, "completed", "?"), getattr(counts, "failed", "?"))
                    if batch.status in TERMINAL:
                        yield self._event(batch.status, counts)
                        return
                if time.time() >= self.deadline:
                    yield self._event(WAIT_TIMEOUT, None)
                    return
                await asyncio.sleep(self.poll_interval)

    def _event(self, status: str, counts: Any, error: str | None = None) -> TriggerEvent:
        return TriggerEvent({"batch_id": self.batch_id, "status": status, **({"error": error} if error else {}),
                             "completed": getattr(counts, "completed", None),
                             "failed": getattr(counts, "failed", None),
                             "elapsed_s": round(time.time() - self.started_at, 1)})
