"""``SlurmJobTrigger``: waits for a Slurm job in the triggerer's event loop (no worker slot held) and fires one
event when the job reaches a terminal state, or when it gives up (job unknown, wait timeout).

Event payload: ``{"job_id", "state", "exit_code", "reason", "log_path", "log_tail", "log_offset", "elapsed_s"}``.
``state`` is a Slurm terminal state (``core.TERMINAL_STATES``), ``UNKNOWN`` or ``WAIT_TIMEOUT``; ``log_offset`` is
how many bytes of the job log the trigger already streamed into the log (the operator ships the rest).
"""

from __future__ import annotations

import asyncio
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
    :param timeout: give up after this many seconds (the job is cancelled and the event says WAIT_TIMEOUT);
        None waits for ever (the job's own --time limit still ends it).
    :param tail_lines: lines of the job log in the event.
    :param stream_log: log new job-log lines at every poll (the task's trigger log shows progress live).
    :param unknown_limit: consecutive polls where no source knows the job before giving up with UNKNOWN.
    :param cancel_on_kill: ``scancel`` the job when the user kills/clears/marks the deferred task.
    :param bin_dir: folder of the Slurm commands (default: PATH).
    """

    def __init__(self, job_id: str, log_path: str | None = None, poll_interval: float = 10.0,
                 initial_delay: float = 10.0, timeout: float | None = None, tail_lines: int = 40,
                 stream_log: bool = True, unknown_limit: int = 6, cancel_on_kill: bool = True,
                 bin_dir: str | None = None) -> None:
        super().__init__()
        self.job_id = str(job_id)
        self.log_path = log_path
        self.poll_interval = float(poll_interval)
        self.initial_delay = float(initial_delay)
        self.timeout = float(timeout) if timeout is not None else None
        self.tail_lines = int(tail_lines)
        self.stream_log = bool(stream_log)
        self.unknown_limit = int(unknown_limit)
        self.cancel_on_kill = bool(cancel_on_kill)
        self.bin_dir = bin_dir

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"job_id": self.job_id, "log_path": self.log_path, "poll_interval": self.poll_interval,
                 "initial_delay": self.initial_delay, "timeout": self.timeout, "tail_lines": self.tail_lines,
                 "stream_log": self.stream_log, "unknown_limit": self.unknown_limit,
                 "cancel_on_kill": self.cancel_on_kill, "bin_dir": self.bin_dir})

    @property
    def _settings(self) -> SlurmSettings:
        return SlurmSettings(bin_dir=self.bin_dir)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        start = time.monotonic()
        offset = 0
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
                offset = await self._stream(offset, final=final)
            if final:
                yield await self._event(info.state, info.exit_code, info.reason, offset, start)
                return
            unknown = unknown + 1 if info.state == UNKNOWN_STATE else 0
            if unknown >= self.unknown_limit:
                yield await self._event(UNKNOWN_STATE, "", "", offset, start)
                return
            if self.timeout is not None and time.monotonic() - start > self.timeout:
                self.log.warning("Slurm job %s not finished after %.0f s: cancelling it", self.job_id, self.timeout)
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
                             "elapsed_s": round(time.monotonic() - start, 1)})

    async def _cancel(self) -> None:
        rc, _, err = await run_command([self._settings.command("scancel"), self.job_id])
        if rc != 0:
            self.log.warning("scancel %s: %s", self.job_id, err.strip())

    async def on_kill(self) -> None:
        """The user killed, cleared or marked the deferred task: cancel the job (Airflow 3.3+)."""
        if self.cancel_on_kill:
            self.log.info("task killed while deferred: scancel %s", self.job_id)
            await self._cancel()
