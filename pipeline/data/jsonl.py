"""Crash-safe JSON / JSONL files.

* Whole files are written to a temporary sibling and renamed into place (``atomic_write_*``): a reader sees
  the old file or the new one, never half of one.
* Record streams are appended one complete line at a time and fsync'ed (``JsonlAppender``): after a crash a
  record is either a complete line or absent (at worst a truncated *last* line, which readers report and
  ``JsonlAppender`` cuts off before appending again).
"""

from __future__ import annotations

import glob
import json
import os
import socket
import tempfile
from datetime import datetime, timezone
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import DataError

_UMASK = os.umask(0)
os.umask(_UMASK)


def dumps(record: Any) -> str:
    """One JSON line (no newline), UTF-8 kept readable as in the study's files."""
    return json.dumps(record, ensure_ascii=False)


def temp_prefix(path: Path) -> str:
    """The name prefix of this process's temporary siblings of ``path``: ``.<name>.tmp-<host>-<pid>-``. The host
    and pid say whose a temporary file is, so a later run can tell a dead writer's leftover from a live one's."""
    return f"{_temp_stem(path)}{socket.gethostname()}-{os.getpid()}-"


def _temp_stem(path: Path) -> str:
    """``.<name>.tmp-``; a long name is cut and given a digest of the whole, so that the temporary sibling of a
    file whose name nears the 255-byte limit can still be created (and still belongs to that one file)."""
    name, raw = path.name, os.fsencode(path.name)  # fsencode: a name that is not UTF-8 round-trips as bytes
    if len(raw) > 150:
        import hashlib

        name = os.fsdecode(raw[:120]) + "~" + hashlib.sha1(raw).hexdigest()[:12]
    return f".{name}.tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_dead_temps(path: str | Path) -> list[Path]:
    """Delete the temporary siblings of ``path`` (files or folders named by ``temp_prefix``) whose writer was a
    process on this host that no longer runs (killed mid-write); returns them. Another host's temporary files, and
    a live process's, are never touched (a pid reused by a live process keeps its file: the safe side)."""
    path = Path(path)
    prefix, host = _temp_stem(path), socket.gethostname()
    removed = []
    for p in path.parent.glob(glob.escape(prefix + host) + "-*"):
        # <host>-<pid>-<suffix>: the host may hold '-' (node-45123), the suffix never does, so read from the right
        # and require this host exactly (host 'node' must not claim host 'node-45123''s files)
        parts = p.name[len(prefix):].rsplit("-", 2)
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit() or _pid_alive(int(parts[1])):
            continue
        if p.is_dir() and not p.is_symlink():
            import shutil

            shutil.rmtree(p, ignore_errors=True)  # a dead writer's half-written folder: nothing in it is kept
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def atomic_write_text(path: str | Path, text: str | Iterable[str]) -> None:
    """Write ``text`` (a string, or chunks written as they come: nothing holds the whole file) to ``path``
    atomically (temp file in the same folder + fsync + rename). Temporary files that a killed writer left for
    ``path`` are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "w", encoding="utf-8", buffering=1 << 20) as f:
            if isinstance(text, str):
                f.write(text)
            else:
                for chunk in text:
                    f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a failed write names no file: name the one meant
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> None:
    """Write one JSON document atomically."""
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


def atomic_write_jsonl(path: str | Path, records: Iterable[Any]) -> int:
    """Write a whole JSONL file atomically; returns the number of records."""
    lines = [dumps(r) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported on every filesystem; the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class JsonlContent:
    """What a tolerant read of a JSONL file found."""

    path: Path
    records: list[Any] = field(default_factory=list)
    #: 1-based line number of a truncated last line (a crash mid-write), else None.
    truncated_line: int | None = None

    @property
    def complete(self) -> bool:
        return self.truncated_line is None


def read_json_object(path: str | Path, what: str = "file") -> dict[str, Any]:
    """A JSON file holding an object; unreadable, not JSON or not an object is a ``DataError`` naming the file and
    ``what`` it should be (``FileNotFoundError`` passes through: callers say what a missing file means)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: unreadable {what} ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_jsonl(path: str | Path, *, allow_truncated_tail: bool = True) -> JsonlContent:
    """Read a JSONL file.

    A last line that is not valid JSON *and* lacks its newline is what a crash mid-write leaves: it is reported
    in ``truncated_line`` (or raised when ``allow_truncated_tail`` is False). Any other bad line is a
    ``DataError`` naming the file and line. Blank lines are skipped.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    content = JsonlContent(path=path)
    lines = data.split(b"\n")
    ends_with_newline = data.endswith(b"\n")
    last = len(lines) - 1
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            content.records.append(json.loads(raw))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            is_tail = i == last and not ends_with_newline
            if is_tail:
                content.truncated_line = i + 1
                if allow_truncated_tail:
                    break
                raise DataError(
                    f"{path}: line {i + 1} is truncated (incomplete JSON at the end of the file, "
                    f"probably an interrupted write); expected one complete JSON object per line"
                ) from None
            raise DataError(f"{path}: line {i + 1} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    return content


def iter_jsonl(path: str | Path) -> Iterator[Any]:
    """Records of a JSONL file; a truncated last line raises (use ``read_jsonl`` to tolerate it)."""
    yield from read_jsonl(path, allow_truncated_tail=False).records


def _truncate_quietly(fd: int, size: int) -> None:
    """Cut a file back to ``size`` after a failed write; when even that fails the half line stays, and the next
    ``JsonlAppender`` cuts it off (``_repair_tail``), so the original error is the one to report."""
    try:
        os.ftruncate(fd, size)
    except OSError:
        pass


class JsonlAppender:
    """Append records durably: one complete line per record, flushed and fsync'ed per ``append`` call.

    Opening cuts off a truncated last line left by an earlier crash, so the file stays valid JSONL.
    Use as a context manager.
    """

    def __init__(self, path: str | Path, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_tail()
        self._f = open(self.path, "ab", buffering=0)  # unbuffered: nothing of a failed append is written later

    def _repair_tail(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb+") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            # Find the start of the unterminated last line.
            pos = size - 1
            while pos > 0:
                start = max(0, pos - 65536)
                f.seek(start)
                idx = f.read(pos - start).rfind(b"\n")
                if idx >= 0:
                    pos = start + idx + 1
                    break
                pos = start
            f.seek(pos)
            tail = f.read()
            try:
                json.loads(tail)
            except (json.JSONDecodeError, UnicodeDecodeError):
                f.truncate(pos)  # a record cut by a crash: drop it, the stage redoes it
            else:
                f.seek(0, os.SEEK_END)
                f.write(b"\n")  # a complete record that only lacks its newline: keep it
            f.flush()
            os.fsync(f.fileno())

    def append(self, *records: Any) -> None:
        """Append records (one line each) and make them durable before returning."""
        if not records:
            return
        data = memoryview("".join(dumps(r) + "\n" for r in records).encode("utf-8"))
        fd = self._f.fileno()
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            while data:
                data = data[os.write(fd, data):]
            if self.fsync:
                os.fsync(fd)
        except OSError as e:  # e.g. disk full: cut what was written of these records, name the file
            _truncate_quietly(fd, start)
            raise OSError(e.errno, e.strerror, str(self.path)) from None

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def move_aside(*paths: Path) -> list[Path]:
    """Rename each existing path to ``<name>.replaced-<UTC time>`` (never deletes); returns the new paths."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    moved = []
    for p in paths:
        if p.exists() or p.is_symlink():
            target = p.with_name(f"{p.name}.replaced-{stamp}")
            os.replace(p, target)
            moved.append(target)
    return moved
