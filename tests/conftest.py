"""Shared fixtures. Expensive things (models, servers, clusters) are built once per session here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.settings import Settings

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data (ToolEmu cases and the study's released runs), read in place, never copied."""
    d = Settings().resolved_data_dir
    if not (d / "toolemu" / "all_cases.json").is_file():
        pytest.fail(f"data directory {d} lacks toolemu/all_cases.json: set AGENTPIPE_DATA_DIR or run "
                    "`agentpipe data fetch`")
    return d


@pytest.fixture(scope="session")
def released_runs(data_dir: Path) -> Path:
    d = data_dir / "paper" / "raw_data_by_eval"
    if not d.is_dir():
        pytest.fail(f"{d} missing: run `agentpipe data fetch`")
    return d


def run_agentpipe(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real console script in a subprocess (exit codes, stderr and tracebacks as a user sees them)."""
    exe = Path(sys.executable).with_name("agentpipe")
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, env=full_env, timeout=600)
