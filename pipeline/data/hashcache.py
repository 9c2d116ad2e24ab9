"""Content digests of input files, cached so that unchanged files are not read again (issue 23).

Derived views (report, analyze) must notice any change of their inputs' content, also an edit that keeps a
file's size and modification time (``touch -d``/``os.utime`` restore the mtime). Only hashing catches that; the
cache makes it cheap: an entry is keyed by the file's (size, mtime_ns, ctime_ns, inode, device). The inode change time
cannot be set by a user — any write or ``utime`` moves it — so a file whose four values are unchanged has not
been touched since it was hashed. An entry whose ctime is within ``RACY_S`` of the moment it was hashed is not
kept (a write in the same clock tick could follow it unseen; git's "racy clean" rule).

Measured on the study's released results (5,580 JSONL files, 371 MB; this 2-core machine): hashing everything
3.8–5.4 s, a warm cache (stat only) 0.4–0.7 s. The cache lives in ``$AGENTPIPE_HOME/cache/file_digests.json``;
losing it (or a concurrent writer's entries) costs time only, never correctness. It relies on a filesystem that
keeps real inode change times (local disks, NFS); on FUSE mounts of object stores, where ctime may equal mtime,
an edit that restores size and mtime could be missed: set ``AGENTPIPE_DIGEST_CACHE=0`` there to hash every time.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Iterable

from pipeline.data.manifest import file_digest

log = logging.getLogger(__name__)

#: seconds: entries of files changed this recently before hashing are not cached
RACY_S = 2.0


def _cache_path() -> Path:
    from pipeline.settings import get_settings

    return get_settings().home / "cache" / "file_digests.json"


def _load(path: Path) -> dict[str, list]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # no cache yet, or a damaged one: every file is hashed (correct, only slower)
    return data if isinstance(data, dict) else {}


def _save(path: Path, cache: dict[str, list]) -> None:
    from pipeline.data.jsonl import atomic_write_json

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, cache)
    except OSError as e:  # a read-only home: the digests are still right, the next run hashes again
        log.info("file digest cache not saved (%s): %s", path, e)


def file_digests(paths: Iterable[Path]) -> dict[Path, str]:
    """``file_digest`` of each file (``pipeline.data.manifest``), read only when it changed since cached."""
    cache_file = _cache_path()
    if os.environ.get("AGENTPIPE_DIGEST_CACHE", "1") == "0":
        return {Path(p): file_digest(p) for p in paths}
    cache = _load(cache_file)
    out: dict[Path, str] = {}
    changed = False
    for p in paths:
        p = Path(p)
        st = p.stat()
        key = os.path.abspath(p)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
        hit = cache.get(key)
        if isinstance(hit, list) and len(hit) == 6 and hit[:5] == stamp:
            out[p] = hit[5]
            continue
        out[p] = digest = file_digest(p)
        if time.time() - st.st_ctime_ns / 1e9 > RACY_S:
            cache[key] = [*stamp, digest]
            changed = True
        elif key in cache:
            del cache[key]
            changed = True
    if changed:  # entries of files gone since are dropped, so the cache does not grow without bound
        _save(cache_file, {k: v for k, v in cache.items() if Path(k).exists()})
    return out


def cached_file_digest(path: Path) -> str:
    """``file_digest`` of one file, cached (see ``file_digests``)."""
    return file_digests([path])[Path(path)]

