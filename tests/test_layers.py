"""The declared layers (pyproject ``[tool.importlinter]``, README "Layout"), checked by import-linter with the
imports inside functions counted: errors/settings/progress → data → llm → tracking → the stage framework → the
stages (independent of each other) → experiment/cli; the library never imports Airflow or the plugins."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_declared_layers_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    p = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in p.stdout
