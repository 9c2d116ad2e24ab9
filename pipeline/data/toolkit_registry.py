"""The toolkit registry: every toolkit the project knows, by name (ToolEmu's when its data is present, and the demo
set's), and the checks that a file's cases name only known toolkits. Read by evaluation (the judge's tool
specifications), replay and repair: it lives in ``data`` because several stages need it."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline.data.cases import load_named_case_set
from pipeline.data.toolkits import Toolkit
from pipeline.errors import DataError, PipelineError


def toolkit_registry() -> dict[str, Toolkit]:
    """Every toolkit the project knows (ToolEmu's when the data is present, and the demo set's)."""
    registry: dict[str, Toolkit] = {}
    for name in ("toolemu", "demo"):
        try:
            toolkits = load_named_case_set(name).toolkits
        except PipelineError:  # a set whose data is absent adds nothing; a toolkit it lacks is refused by name
            continue
        for tk_name, tk in toolkits.items():
            if tk_name in registry and registry[tk_name] != tk:  # one name, two specifications: which one?
                raise DataError(f"toolkit {tk_name}: specified differently by the ToolEmu and demo case sets")
            registry[tk_name] = tk
    return registry


def judged_toolkits(cases: list[dict[str, Any]], registry: dict[str, Toolkit], where: str) -> dict[str, Toolkit]:
    """The registry's toolkit of every name the ``cases`` use; a name the registry lacks refuses the file in one
    line naming it and ``where`` (the judge, or a replay, would otherwise see no specification of that toolkit)."""
    names = {n for case in cases if isinstance(case, dict) and isinstance(case.get("Toolkits"), list)
             for n in case["Toolkits"] if isinstance(n, str)}
    unknown = sorted(names - registry.keys())
    if unknown:
        try:
            load_named_case_set("toolemu")
            why = ""
        except PipelineError as e:  # the likely cause, said on the same line
            why = f"; ToolEmu's toolkits are not loaded ({e})"
        raise DataError(f"{where}: toolkit{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} not in the toolkit "
                        f"registry ({len(registry)} toolkits of the ToolEmu and demo case sets){why}")
    return {n: registry[n] for n in sorted(names)}


def toolkits_digest(toolkits: dict[str, Toolkit]) -> str:
    """sha256 of the tool specifications the judge sees, by toolkit name (part of an eval file's fingerprint:
    a changed specification is a different evaluation)."""
    text = json.dumps({n: tk.description("low") for n, tk in sorted(toolkits.items())}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()
