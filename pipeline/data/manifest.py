"""Stage manifests (DESIGN §3): a small ``manifest.json`` written last, atomically, into a stage's output.

It records the stage's config, its inputs (with content hashes), the code version, counts and status. A
stage whose manifest says ``complete`` for the same config is skipped on rerun.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.data.jsonl import atomic_write_json
from pipeline.settings import PROJECT_ROOT


@lru_cache(maxsize=1)
def code_version() -> str:
    """Package version plus the git commit when running from a checkout (``0.1.0+abc1234``)."""
    try:
        sha = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def file_digest(path: str | Path) -> str:
    """sha256 of a file (of every file below it, in path order, for a folder)."""
    p = Path(path)
    h = hashlib.sha256()
    # writer lock files (pipeline.data.locks) say who wrote, not what: they are not part of a folder's contents
    files = sorted(x for x in p.rglob("*") if x.is_file() and x.suffix != ".lock") if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def config_digest(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def manifest_path(output: str | Path) -> Path:
    """``<folder>/manifest.json`` for a folder, ``<file>.manifest.json`` for a single output file."""
    p = Path(output)
    return p / "manifest.json" if p.is_dir() or not p.suffix else p.with_name(p.name + ".manifest.json")


def write_manifest(output: str | Path, *, stage: str, config: dict[str, Any], inputs: dict[str, str | Path] | None = None,
                   counts: dict[str, Any] | None = None, status: str = "complete",
                   inputs_digest: str | None = None) -> Path:
    """Write the manifest of a stage output (atomically); returns its path. ``config`` is the stage's fingerprint
    (``pipeline.stage``); ``inputs_digest`` what derived views compare to see whether their inputs changed."""
    path = manifest_path(output)
    atomic_write_json(path, {
        "stage": stage, "status": status, "config": config, "config_digest": config_digest(config),
        **({"inputs_digest": inputs_digest} if inputs_digest else {}),
        "inputs": {k: {"path": str(v), "sha256": file_digest(v) if Path(v).exists() else None}
                   for k, v in (inputs or {}).items()},
        "counts": counts or {}, "code_version": code_version(),
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    return path


def read_manifest(output: str | Path) -> dict[str, Any] | None:
    path = manifest_path(output)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_complete(output: str | Path, config: dict[str, Any]) -> bool:
    """True when the output's manifest says complete for exactly this config."""
    m = read_manifest(output)
    return bool(m) and m.get("status") == "complete" and m.get("config_digest") == config_digest(config)
