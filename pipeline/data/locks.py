"""Inter-process locks on files (``fcntl.flock``): released by the kernel when the holder exits, even on SIGKILL.

* :func:`file_lock` — the primitive: an exclusive lock on a lock file, blocking or not.
* :func:`writer_lock` — one writer per stage output: a second process on the same output (an Airflow retry while
  the first Slurm job still runs, a user starting the command twice) refuses at once with one line naming the
  holder, or waits for it with ``wait=True``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import ConfigError


@contextlib.contextmanager
def file_lock(path: str | Path, *, blocking: bool = True) -> Iterator[tuple[bool, object]]:
    """Hold an exclusive lock on ``path`` (created if missing). Yields ``(acquired, file)``: ``acquired`` is False
    only when ``blocking=False`` and another process holds it. A no-op where ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield True, None
        return
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False, fh
            return
        try:
            yield True, fh
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def lock_path(output: Path) -> Path:
    return output.with_name(output.name + ".lock")


@contextlib.contextmanager
def writer_lock(output: str | Path, *, wait: bool = False, what: str = "output") -> Iterator[None]:
    """Be the only process writing ``output``. The lock file beside it (``<output>.lock``) records the holder's
    pid, host and start time; a second writer raises ``ConfigError`` naming them (or blocks with ``wait``)."""
    output = Path(output)
    path = lock_path(output)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(path, blocking=wait) as (acquired, fh):
            if not acquired:
                raise ConfigError(f"{output}: another process is writing this {what} ({_holder(path)}); wait for "
                                  "it to finish or rerun with --wait")
            if fh is not None:
                fh.seek(0)
                fh.truncate()
                fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
                fh.flush()
            yield
    except (PermissionError, NotADirectoryError, FileExistsError, IsADirectoryError) as e:
        # an unwritable folder, or a file where a folder is expected: one line naming the path, not a traceback
        raise ConfigError(f"{output}: cannot write here ({e.strerror}: {e.filename})") from None


def _holder(path: Path) -> str:
    try:
        d = json.loads(path.read_text())
        return f"pid {d['pid']} on {d['host']} since {d['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
