"""Test hook (tests/test_crash_resume.py), loaded by ``agentpipe`` subprocesses whose PYTHONPATH starts with this
folder: it counts the file-system operations that make a stage's writes durable or visible (``os.fsync``,
``os.replace``, ``os.rename``, ``os.unlink``, ``os.rmdir``) on paths below ``AGENTPIPE_TEST_WRITES_ROOT`` and

* ``AGENTPIPE_TEST_CRASH_AT=N``: kills the process (``os._exit(137)``, no cleanup, like SIGKILL) just before the
  N-th one;
* ``AGENTPIPE_TEST_CRASH_SUFFIX=S`` (with ``CRASH_AT``): counts only the fsyncs of files whose path ends with ``S``
  (e.g. ``.part``: killed right after the N-th append to a journal was written, before it was made durable);
* ``AGENTPIPE_TEST_ENOSPC_AT=N``: makes the N-th fsync of a file and every later one fail with ``ENOSPC``, as a full disk
  does (data written to a full disk fails at the latest when it is made durable);
* ``AGENTPIPE_TEST_WRITES_COUNT=<file>``: writes the number of operations (and of fsyncs) seen to that file at
  exit, as ``<operations> <fsyncs of files>``;
* ``AGENTPIPE_TEST_WRITES_LOG=<file>``: appends ``<operation> <path>`` for each one (a
  rename's destination).

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
    log_file = os.environ.get("AGENTPIPE_TEST_WRITES_LOG")
    suffix = os.environ.get("AGENTPIPE_TEST_CRASH_SUFFIX")
    seen, fsyncs, matched = [0], [0], [0]
    root = os.path.realpath(_ROOT)

    def below_root(target) -> str | None:
        if isinstance(target, int):  # an fd: the file it is open on
            try:
                target = os.readlink(f"/proc/self/fd/{target}")
            except OSError:
                return None
        path = os.path.realpath(os.fsdecode(target))
        return path if path == root or path.startswith(root + os.sep) else None

    def wrap(name: str):
        real = getattr(os, name)

        def op(target, *args, **kwargs):
            path = below_root(target)
            if path:
                seen[0] += 1
                if suffix is None and seen[0] == crash_at:
                    os._exit(137)
                if suffix is not None and name == "fsync" and path.endswith(suffix):
                    matched[0] += 1
                    if matched[0] == crash_at:
                        os._exit(137)
                if log_file:  # a rename is logged by its destination: what it puts in place
                    shown = os.path.realpath(os.fsdecode(args[0])) if name in ("replace", "rename") else path
                    with open(log_file, "a") as f:
                        f.write(f"{name} {shown}\n")
                if name == "fsync" and not os.path.isdir(path):  # a folder's entries take no new space
                    fsyncs[0] += 1
                    if full_at and fsyncs[0] >= full_at:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(target, *args, **kwargs)

        op.__name__ = name
        setattr(os, name, op)

    for name in ("fsync", "replace", "rename", "unlink", "rmdir"):
        wrap(name)
    if count_file:
        atexit.register(lambda: open(count_file, "w").write(f"{seen[0]} {fsyncs[0]}"))


if _ROOT:
    _install()
