"""Progress of a long stage: a tqdm bar on a terminal, else a line every N seconds (task logs, Slurm job logs).

``$AGENTPIPE_PROGRESS_EVERY`` sets N (default 60 s; 0 turns the lines off). ``--no-progress`` turns the bar off.
"""

from __future__ import annotations

import os
import sys
import time

DEFAULT_EVERY_S = 60.0


class ProgressLines:
    """``update(done, total, details)`` prints ``<stage>: <done>/<total> <unit> (<details>), <elapsed> s`` to
    stderr at most every ``every`` seconds, and always for the last update."""

    def __init__(self, stage: str, unit: str, every: float | None = None) -> None:
        env = os.environ.get("AGENTPIPE_PROGRESS_EVERY", "").strip()
        self.every = float(env) if env else (DEFAULT_EVERY_S if every is None else every)
        self.stage, self.unit = stage, unit
        self.t0 = time.monotonic()
        self.last = self.t0

    def update(self, done: int, total: int, details: str = "") -> None:
        now = time.monotonic()
        if self.every <= 0 or (now - self.last < self.every and done < total):
            return
        self.last = now
        extra = f" ({details})" if details else ""
        print(f"{self.stage}: {done}/{total} {self.unit}{extra}, {now - self.t0:.0f} s", file=sys.stderr, flush=True)


def wants_bar(no_progress: bool) -> bool:
    """A bar only on a terminal and unless turned off; elsewhere ``ProgressLines``."""
    return not no_progress and sys.stderr.isatty()
