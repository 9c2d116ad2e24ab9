"""``SlurmJobTrigger``: waits for a Slurm job in the triggerer's event loop (no worker slot held) and fires one
event when the job reaches a terminal state, or when it gives up (job unknown, wait timeout).

Event payload: ``{"job_id", "state", "exit_code", "reason", "log_path", "log_tail", "log_offset", "elapsed_s"}``.
``state`` is a Slurm terminal state (``core.TERMINAL_STATES``), ``UNKNOWN`` or ``WAIT_TIMEOUT``; ``log_offset`` is
how many bytes of the job log the trigger already streamed into the log (the operator ships the rest).

A triggerer restart rebuilds the trigger from what it serialised when the task deferred: the wait's end is an
absolute ``deadline`` (a restart does not extend it), and the streamed offset is kept beside the job log
(``<log>.streamed``, written at every poll), so a rebuilt trigger goes on where the last one stopped.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from plugins.slurm.core import (
    UNKNOWN_STATE,
    WAIT_TIMEOUT_STATE,
    SlurmSettings,
    async_job_state,
    read_from,
    run_command,
    tail_file,
)


class SlurmJobTrigger(BaseTrigger):
    """Poll one Slurm job until it ends.

    :param job_id: the Slurm job id.
    :param log_path: the job's output file (tail in the event; streamed into the log when ``stream_log``).
    :param poll_interval: seconds between polls.
    :param initial_delay: seconds before the first poll. Keep ~10 s under a scheduler: Airflow 3.x fails a task
        whose trigger fires within ~5 s of deferring (apache/airflow#71580); tests that call ``run()`` directly or
        use ``dag.test()`` may use 0.
    :param timeout: give up after this many seconds from now (the job is cancelled and the event says
        WAIT_TIMEOUT); None waits for ever (the job's own --time limit still ends it). Turned into ``deadline``.
    :param deadline: the same as an absolute time (epoch seconds); what the trigger serialises.
    :param log_offset: bytes of the job log already streamed (a rebuilt trigger also reads ``<log>.streamed``).
    :param started_at: when the wait began (epoch seconds; for ``elapsed_s``).
    :param tail_lines: lines of the job log in the event.
    :param stream_log: log new job-log lines at every poll (the task's trigger log shows progress live).
    :param unknown_limit: consecutive polls where no source knows the job before giving up with UNKNOWN.
    :param cancel_on_kill: ``scancel`` the job when the user kills/clears/marks the deferred task.
    :param bin_dir: folder of the Slurm commands (default: PATH).
    """

    def __init__(self, job_id: str, log_path: str | None = None, poll_interval: float = 10.0,
                 initial_delay: float = 10.0, timeout: float | None = None, tail_lines: int = 40,
                 stream_log: bool = True, unknown_limit: int = 6, cancel_on_kill: bool = True,
                 bin_dir: str | None = None, deadline: float | None = None, log_offset: int = 0,
                 started_at: float | None = None) -> None:
        super().__init__()
        self.job_id = str(job_id)
        self.log_path = log_path
        self.poll_interval = float(poll_interval)
        self.initial_delay = float(initial_delay)
        now = time.time()
        self.deadline = float(deadline) if deadline is not None else (now + float(timeout) if timeout is not None
                                                                       else None)
        self.log_offset = int(log_offset)
        self.started_at = float(started_at) if started_at is not None else now
        self.tail_lines = int(tail_lines)
        self.stream_log = bool(stream_log)
        self.unknown_limit = int(unknown_limit)
        self.cancel_on_kill = bool(cancel_on_kill)
        self.bin_dir = bin_dir

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"job_id": self.job_id, "log_path": self.log_path, "poll_interval": self.poll_interval,
                 "initial_delay": self.initial_delay, "deadline": self.deadline, "tail_lines": self.tail_lines,
                 "stream_log": self.stream_log, "unknown_limit": self.unknown_limit,
                 "cancel_on_kill": self.cancel_on_kill, "bin_dir": self.bin_dir, "log_offset": self.log_offset,
                 "started_at": self.started_at})

    @property
    def _settings(self) -> SlurmSettings:
        return SlurmSettings(bin_dir=self.bin_dir)

    @property
    def _offset_path(self) -> str | None:
        return f"{self.log_path}.streamed" if self.log_path else None

    def _saved_offset(self) -> int:
        try:
            with open(self._offset_path or "", encoding="ascii") as fh:
                return int(fh.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _save_offset(self, offset: int) -> None:
        if self._offset_path is None:
            return
        tmp = f"{self._offset_path}.tmp{os.getpid()}"
        try:
            with open(tmp, "w", encoding="ascii") as fh:
                fh.write(str(offset))
            os.replace(tmp, self._offset_path)
        except OSError as e:  # the log folder may be read-only for the triggerer: streaming still works
            self.log.debug("cannot save the streamed offset to %s: %s", self._offset_path, e)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        start = self.started_at
        offset = max(self.log_offset, await asyncio.to_thread(self._saved_offset)) if self.stream_log else 0
        if self.initial_delay > 0:
            await asyncio.sleep(self.initial_delay)
        last_state, unknown = None, 0
        while True:
            info = await async_job_state(self._settings, self.job_id)
            if info.state != last_state:
                self.log.info("Slurm job %s: %s%s", self.job_id, info.state,
                              f" ({info.reason})" if info.reason and info.reason != "None" else "")
                last_state = info.state
            final = info.terminal
            if self.stream_log:
                new = await self._stream(offset, final=final)
                if new != offset:
                    offset = self.log_offset = new
                    await asyncio.to_thread(self._save_offset, new)
            if final:
                yield await self._event(info.state, info.exit_code, info.reason, offset, start)
                return
            unknown = unknown + 1 if info.state == UNKNOWN_STATE else 0
            if unknown >= self.unknown_limit:
                yield await self._event(UNKNOWN_STATE, "", "", offset, start)
                return
            if self.deadline is not None and time.time() > self.deadline:
                self.log.warning("Slurm job %s not finished by the wait's deadline (%.0f s after it began): "
                                 "cancelling it", self.job_id, self.deadline - start)
                await self._cancel()
                yield await self._event(WAIT_TIMEOUT_STATE, info.exit_code, info.reason, offset, start)
                return
            await asyncio.sleep(self.poll_interval)

    async def _stream(self, offset: int, *, final: bool) -> int:
        text, new = await asyncio.to_thread(read_from, self.log_path, offset, final=final)
        for line in text.splitlines():
            self.log.info("[slurm %s] %s", self.job_id, line)
        return new

    async def _event(self, state: str, exit_code: str, reason: str, offset: int, start: float) -> TriggerEvent:
        tail = await asyncio.to_thread(tail_file, self.log_path, self.tail_lines)
        return TriggerEvent({"job_id": self.job_id, "state": state, "exit_code": exit_code, "reason": reason,
                             "log_path": self.log_path, "log_tail": tail, "log_offset": offset,
                             "elapsed_s": round(time.time() - start, 1)})

    async def _cancel(self) -> None:
        rc, _, err = await run_command([self._settings.command("scancel"), self.job_id])
        if rc != 0:
            self.log.warning("scancel %s: %s", self.job_id, err.strip())

    async def on_kill(self) -> None:
        """The user killed, cleared or marked the deferred task: cancel the job (Airflow 3.3+)."""
        if self.cancel_on_kill:
            self.log.info("task killed while deferred: scancel %s", self.job_id)
            await self._cancel()
