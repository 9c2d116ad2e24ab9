"""Test hook (tests/test_crash_resume.py), loaded by ``agentpipe`` subprocesses whose PYTHONPATH starts with this
folder: it counts the file-system operations that make a stage's writes durable or visible (``os.fsync``,
``os.replace``, ``os.rename``, ``os.unlink``, ``os.rmdir``) on paths below ``AGENTPIPE_TEST_WRITES_ROOT`` and

* ``AGENTPIPE_TEST_CRASH_AT=N``: kills the process (``os._exit(137)``, no cleanup, like SIGKILL) just before the
  N-th one;
* ``AGENTPIPE_TEST_ENOSPC_AT=N``: makes the N-th one (and every later fsync) fail with ``ENOSPC``, as a full disk
  does;
* ``AGENTPIPE_TEST_WRITES_COUNT=<file>``: writes the number of operations seen to that file at exit.

Never imported by the project's code; production has no such hook.
"""

import atexit
import errno
import os

_ROOT = os.environ.get("AGENTPIPE_TEST_WRITES_ROOT")


def _install() -> None:
    crash_at = int(os.environ.get("AGENTPIPE_TEST_CRASH_AT") or 0)
    full_at = int(os.environ.get("AGENTPIPE_TEST_ENOSPC_AT") or 0)
    count_file = os.environ.get("AGENTPIPE_TEST_WRITES_COUNT")
    seen = [0]
    root = os.path.realpath(_ROOT)

    def below_root(target) -> bool:
        if isinstance(target, int):  # an fd: the file it is open on
            try:
                target = os.readlink(f"/proc/self/fd/{target}")
            except OSError:
                return False
        path = os.path.realpath(os.fsdecode(target))
        return path == root or path.startswith(root + os.sep)

    def wrap(name: str):
        real = getattr(os, name)

        def op(target, *args, **kwargs):
            if below_root(target):
                seen[0] += 1
                if seen[0] == crash_at:
                    os._exit(137)
                if full_at and (seen[0] == full_at or seen[0] > full_at and name == "fsync"):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(target, *args, **kwargs)

        op.__name__ = name
        setattr(os, name, op)

    for name in ("fsync", "replace", "rename", "unlink", "rmdir"):
        wrap(name)
    if count_file:
        atexit.register(lambda: open(count_file, "w").write(str(seen[0])))


if _ROOT:
    _install()
