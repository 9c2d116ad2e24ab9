"""The study's released results (its ``results/`` folder): fetch, verify, unpack under the data directory.

``results/match_eval_results`` (each finetuned model judged by the evaluator whose scores built its pairs) and
``results/cross_eval_results`` (judged by the other one), 183 model folders each. They come from an archive
(``--from results.tar.xz``; identical files stored once as hard links), a folder holding ``results/``, or the
study's public repository at the pinned commit (its tarball). Every file is verified: against a ``results.sha256``
list beside the archive when there is one (a bad file is named), and always against the digest of the whole
list pinned in ``assets/manifest.json`` (``tree_sha256``: sha256 of the sorted ``<sha256>  <path>`` lines).
Files are unpacked into a temporary folder beside the destination and moved into place only once verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.fetch import MANIFEST_PATH, sha256_of
from pipeline.errors import DataError

ARCHIVE_SUFFIXES = (".tar.xz", ".tar.gz", ".tgz", ".tar")


@dataclass(frozen=True)
class ResultsSource:
    """The pinned release: where to download it and what it must contain."""

    prefix: str  # below the data directory: <data dir>/<prefix>/results/…
    archive_url: str
    archive_root: str  # the folder the repository tarball puts everything in
    files: int
    tree_sha256: str


@dataclass
class ResultsFetch:
    path: Path  # <data dir>/<prefix>/results
    files: int
    already_present: bool = False


def results_source(manifest: Path = MANIFEST_PATH) -> ResultsSource:
    data = json.loads(manifest.read_text())["results"]
    return ResultsSource(**data)


def tree_digest(entries: dict[str, str]) -> str:
    """sha256 of the sorted ``<sha256>  <path>`` lines of a file list (path → sha256)."""
    h = hashlib.sha256()
    for path in sorted(entries):
        h.update(f"{entries[path]}  {path}\n".encode())
    return h.hexdigest()


def read_sha_list(path: Path) -> dict[str, str]:
    """A ``sha256sum``-style list: path → sha256."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            sha, rel = line.split(None, 1)
            out[rel.strip().lstrip("*")] = sha
    return out


def _hash_tree(root: Path) -> dict[str, str]:
    """``results/…`` path → sha256 of every file below ``root/results``."""
    base = root / "results"
    return {f"results/{p.relative_to(base).as_posix()}": sha256_of(p)
            for p in sorted(base.rglob("*")) if p.is_file()}


def _verify(root: Path, src: ResultsSource, listed: dict[str, str] | None, origin: str) -> int:
    got = _hash_tree(root)
    if listed is not None:
        for rel, sha in sorted(listed.items()):
            if rel not in got:
                raise DataError(f"{origin}: {rel} is missing")
            if got[rel] != sha:
                raise DataError(f"{origin}: {rel}: sha256 {got[rel][:12]}… does not match its list ({sha[:12]}…)")
    if len(got) != src.files or tree_digest(got) != src.tree_sha256:
        raise DataError(f"{origin}: {len(got)} files whose digest {tree_digest(got)[:12]}… is not the pinned "
                        f"release's ({src.files} files, {src.tree_sha256[:12]}…)")
    return len(got)


def _extract(archive: Path, into: Path, member_root: str = "") -> None:
    """Unpack the ``results/`` members of a tar archive (hard links kept) into ``into``."""
    try:
        with tarfile.open(archive) as tar:
            members = []
            for m in tar.getmembers():
                name = m.name.removeprefix(member_root)
                if not (name == "results" or name.startswith("results/")):
                    continue
                m.name = name
                if m.islnk():
                    m.linkname = m.linkname.removeprefix(member_root)
                members.append(m)
            tar.extractall(into, members=members, filter="data")
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"--from {archive}: cannot unpack ({e})") from None


def writable_data_dir(data_dir: Path) -> Path:
    """``data_dir``, or ``$AGENTPIPE_HOME/data`` when ``data_dir`` is read-only (as the shared copy is)."""
    from pipeline.settings import get_settings

    probe = data_dir if data_dir.exists() else data_dir.parent
    # the mode bits, not only access(): root may write anywhere, but a folder without write bits (the shared
    # read-only copy of the data) is not to be written into
    writable = os.access(probe, os.W_OK) and bool(probe.stat().st_mode & 0o200)
    return data_dir if writable else get_settings().home / "data"


def find_results(data_dir: Path | None = None) -> Path | None:
    """Where ``data fetch`` put the results: under the data directory, else under ``$AGENTPIPE_HOME/data``."""
    from pipeline.settings import get_settings

    settings = get_settings()
    prefix = results_source().prefix
    for root in (data_dir or settings.resolved_data_dir, settings.home / "data"):
        if (root / prefix / "results" / "match_eval_results").is_dir():
            return root / prefix / "results"
    return None


def fetch_results(data_dir: Path, source: Path | None = None, src: ResultsSource | None = None) -> ResultsFetch:
    """Bring the release to ``<data_dir>/<prefix>/results`` (see the module docstring); idempotent."""
    src = src or results_source()
    dest = data_dir / src.prefix / "results"
    if dest.is_dir():
        try:
            return ResultsFetch(dest, _verify(dest.parent, src, None, str(dest)), already_present=True)
        except DataError:
            pass  # incomplete or different: fetched again below, then swapped in
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".results.tmp-", dir=dest.parent))
    try:
        listed = None
        if source is None:
            archive = work / "release.tar.gz"
            try:
                with urllib.request.urlopen(src.archive_url, timeout=120) as resp, open(archive, "wb") as out:  # noqa: S310
                    shutil.copyfileobj(resp, out, 1 << 20)
            except OSError as e:
                raise DataError(f"{src.archive_url}: download failed ({e}); use --from with the archive "
                                "(results.tar.xz) or a folder holding results/") from None
            _extract(archive, work, src.archive_root)
            archive.unlink()
            origin = src.archive_url
        elif source.is_file() and source.name.endswith(ARCHIVE_SUFFIXES):
            _extract(source, work)
            sha_list = source.with_name("results.sha256")
            listed = read_sha_list(sha_list) if sha_list.is_file() else None
            origin = str(source)
        elif (source / "results").is_dir():
            shutil.copytree(source / "results", work / "results")
            sha_list = source / "results.sha256"
            listed = read_sha_list(sha_list) if sha_list.is_file() else None
            origin = str(source)
        else:
            raise DataError(f"--from {source}: expected a results archive ({', '.join(ARCHIVE_SUFFIXES)}) or a "
                            "folder holding results/")
        n = _verify(work, src, listed, origin)
        if dest.exists():  # an incomplete or altered earlier copy: kept aside, never mixed with this one
            from pipeline.data.jsonl import move_aside

            move_aside(dest)
        os.replace(work / "results", dest)
        return ResultsFetch(dest, n)
    finally:
        shutil.rmtree(work, ignore_errors=True)
