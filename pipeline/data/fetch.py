"""``agentpipe data fetch``: download (or copy from a local folder) and verify the public data sets.

The manifest (``assets/manifest.json``) lists every file with its sha256 and size, grouped by source; a
file's URL is its source's ``base_url`` + its path inside the source. Files land in the data directory
under the same relative paths (``toolemu/all_cases.json``, ``paper/raw_data_by_eval/q32/…``), each written
to a temp file, verified, then renamed, so an interrupted fetch never leaves a bad file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.jsonl import atomic_write_json
from pipeline.errors import DataError
from pipeline.settings import ASSETS_DIR

MANIFEST_PATH = ASSETS_DIR / "manifest.json"


@dataclass(frozen=True)
class ManifestFile:
    source: str
    path: str  # relative to the data directory
    url: str
    sha256: str
    size: int


def load_manifest(path: Path = MANIFEST_PATH, sources: list[str] | None = None) -> list[ManifestFile]:
    """The files of the manifest, optionally restricted to some sources (``toolemu``, ``paper``)."""
    try:
        manifest = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the data manifest ({e})") from None
    known = manifest["sources"]
    for s in sources or []:
        if s not in known:
            raise DataError(f"--only {s}: unknown source; expected one of {', '.join(known)}")
    out = []
    for name, src in known.items():
        if sources and name not in sources:
            continue
        for rel, meta in src["files"].items():
            out.append(ManifestFile(source=name, path=f"{src['prefix']}/{rel}", url=src["base_url"] + rel,
                                    sha256=meta["sha256"], size=meta["size"]))
    return out


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class FetchResult:
    fetched: int = 0
    already_present: int = 0


def fetch(data_dir: Path, *, source_dir: Path | None = None, sources: list[str] | None = None,
          workers: int = 8, progress: Callable[[str], None] | None = None) -> FetchResult:
    """Bring every manifest file into ``data_dir``: copied from ``source_dir`` when given, else downloaded.

    Files already present with the right checksum are skipped. A checksum or size mismatch raises
    ``DataError`` naming the file; nothing unverified is ever moved into ``data_dir``.
    """
    files = load_manifest(sources=sources)
    if source_dir is not None and not source_dir.is_dir():
        raise DataError(f"--from {source_dir}: folder not found")
    result = FetchResult()
    todo = []
    for f in files:
        dest = data_dir / f.path
        if dest.is_file() and dest.stat().st_size == f.size and sha256_of(dest) == f.sha256:
            result.already_present += 1
        else:
            todo.append(f)

    def one(f: ManifestFile) -> None:
        dest = data_dir / f.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                if source_dir is not None:
                    src = source_dir / f.path
                    if not src.is_file():
                        raise DataError(f"--from {source_dir}: missing file {f.path}")
                    with open(src, "rb") as inp:
                        shutil.copyfileobj(inp, out, 1 << 20)
                else:
                    try:
                        with urllib.request.urlopen(f.url, timeout=60) as resp:  # noqa: S310 (https URLs from the manifest)
                            shutil.copyfileobj(resp, out, 1 << 20)
                    except OSError as e:
                        raise DataError(f"{f.url}: download failed ({e}); use --from DIR with a local copy") from None
            got = sha256_of(tmp)
            if got != f.sha256:
                origin = source_dir / f.path if source_dir is not None else f.url
                raise DataError(f"{origin}: sha256 {got[:12]}… does not match the manifest ({f.sha256[:12]}…)")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        if progress:
            progress(f.path)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for fut in [pool.submit(one, f) for f in todo]:
            fut.result()
            result.fetched += 1
    return result


def build_manifest(data_dir: Path, sources: dict[str, tuple[str, str]], out: Path = MANIFEST_PATH) -> None:
    """(Maintainers) write the manifest from a verified local copy: ``{name: (prefix, base_url)}``."""
    manifest: dict = {"sources": {}}
    for name, (prefix, base_url) in sources.items():
        root = data_dir / prefix
        files = {}
        for p in sorted(x for x in root.rglob("*") if x.is_file()):
            files[p.relative_to(root).as_posix()] = {"sha256": sha256_of(p), "size": p.stat().st_size}
        manifest["sources"][name] = {"prefix": prefix, "base_url": base_url, "files": files}
    atomic_write_json(out, manifest, indent=1)
