"""Test cases in the ToolEmu format (SPEC §1.1) and loading a case set (cases + the toolkits they use)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.data.toolkits import Toolkit
from pipeline.errors import DataError
from pipeline.settings import ASSETS_DIR, get_settings


class Underspecifications(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    task_information: list[str] = Field(alias="Task Information")
    safety_constraints: list[str] = Field(alias="Safety & Security Constraints")


class Case(BaseModel):
    """One test case. Serialises back (``by_alias=True``) to exactly the ToolEmu keys."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    name: str
    toolkits: list[str] = Field(alias="Toolkits", min_length=1)
    #: A string; ToolEmu also allows {"Standard": …, "Red-teaming": …} variants (unused by the study).
    user_instruction: str | dict[str, str] = Field(alias="User Instruction")
    underspecifications: Underspecifications = Field(alias="Underspecifications")
    expected_achievements: list[str] = Field(alias="Expected Achievements")
    potential_risky_outcomes: list[str] = Field(alias="Potential Risky Outcomes")
    potential_risky_actions: list[str] = Field(alias="Potential Risky Actions")

    @property
    def instruction(self) -> str:
        """The user instruction as used by the study (case type ``legacy``: the standard variant)."""
        if isinstance(self.user_instruction, str):
            return self.user_instruction
        return self.user_instruction.get("Standard") or next(iter(self.user_instruction.values()))

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True)

    def prompt_inputs(self) -> dict[str, str | None]:
        """The case fields as prompt variables, serialised as the study does (SPEC §1.1)."""
        under = {
            "Task Information Underspecifications": self.underspecifications.task_information,
            "Safety & Security Constraint Underspecifications": self.underspecifications.safety_constraints,
        }
        return {
            "input": self.instruction,
            "underspecifications": serialize(under),
            "risky_outcome": serialize(self.potential_risky_outcomes),
            "risky_actions": serialize(self.potential_risky_actions),
            "expected_achievements": serialize(self.expected_achievements),
        }


def serialize(value: Any, indent: int = 0) -> str | None:
    """Render a prompt value: strings as is, lists as ``* item`` lines, dicts as ``- key: value`` lines.

    Empty lists/dicts become ``None``; nested items are indented by 4 spaces per level.
    """
    if isinstance(value, str):
        return value
    pad = " " * indent
    if isinstance(value, list):
        if not value:
            return None
        return "\n" + "\n".join(f"{pad}* {serialize(v, indent + 4)}" for v in value)
    if isinstance(value, dict):
        if not value:
            return None
        return "\n" + "\n".join(f"{pad}- {k}: {serialize(v, indent + 4)}" for k, v in value.items())
    return str(value)


@dataclass(frozen=True)
class CaseSet:
    """Cases (their list position is ``case_idx``) with the toolkits they need, checked against each other."""

    cases: list[Case]
    toolkits: dict[str, Toolkit]
    cases_path: Path
    toolkits_path: Path

    def __len__(self) -> int:
        return len(self.cases)

    def toolkits_for(self, case: Case) -> list[Toolkit]:
        return [self.toolkits[name] for name in case.toolkits]

    def tool_count(self) -> int:
        return sum(len(t.tools) for t in self.toolkits.values())


def _load_json_list(path: Path, what: str) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: {what} file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read {what} file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: {what} file is not UTF-8 text (byte {e.start}); expected JSON") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of {what}, got {type(data).__name__}")
    return data


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    return f"field '{loc}': {e['msg'].lower()}"


def load_toolkits(path: str | Path) -> dict[str, Toolkit]:
    """Load a toolkits file; a bad entry raises one ``DataError`` naming the file, toolkit index and field."""
    path = Path(path)
    out: dict[str, Toolkit] = {}
    for i, raw in enumerate(_load_json_list(path, "toolkits")):
        label = f"toolkit {i}" + (f" ({raw.get('toolkit')})" if isinstance(raw, dict) and raw.get("toolkit") else "")
        if not isinstance(raw, dict):
            raise DataError(f"{path}: {label}: expected a JSON object, got {type(raw).__name__}")
        try:
            tk = Toolkit.model_validate(raw)
        except ValidationError as e:
            raise DataError(f"{path}: {label}: {_first_error(e)}") from None
        if tk.name_for_model in out:
            raise DataError(f"{path}: {label}: duplicate toolkit name '{tk.name_for_model}'")
        out[tk.name_for_model] = tk
    return out


def load_cases(path: str | Path) -> list[Case]:
    """Load a cases file; a bad case raises one ``DataError`` naming the file, case index and field."""
    path = Path(path)
    cases = []
    for i, raw in enumerate(_load_json_list(path, "cases")):
        label = f"case {i}" + (f" ({raw.get('name')})" if isinstance(raw, dict) and raw.get("name") else "")
        if not isinstance(raw, dict):
            raise DataError(f"{path}: {label}: expected a JSON object, got {type(raw).__name__}")
        try:
            cases.append(Case.model_validate(raw))
        except ValidationError as e:
            raise DataError(f"{path}: {label}: {_first_error(e)}") from None
    return cases


def load_case_set(cases_path: str | Path, toolkits_path: str | Path) -> CaseSet:
    """Load cases and toolkits and check that every toolkit a case names exists."""
    cases_path, toolkits_path = Path(cases_path), Path(toolkits_path)
    cases = load_cases(cases_path)  # first: a bad cases file is named, not a missing toolkits file beside it
    toolkits = load_toolkits(toolkits_path)
    for i, case in enumerate(cases):
        for name in case.toolkits:
            if name not in toolkits:
                raise DataError(
                    f"{cases_path}: case {i} ({case.name}): field 'Toolkits': unknown toolkit '{name}' "
                    f"(expected one of the {len(toolkits)} toolkits in {toolkits_path.name})"
                )
    return CaseSet(cases=cases, toolkits=toolkits, cases_path=cases_path, toolkits_path=toolkits_path)


#: Named case sets: ``toolemu`` (the study's 144 cases, in the data directory) and ``demo`` (project-authored).
def case_set_paths(name: str, data_dir: Path | None = None) -> tuple[Path, Path]:
    """Paths of a named case set, or of ``CASES.json`` (toolkits expected beside it as ``toolkits.json``)."""
    if name == "toolemu":
        root = (data_dir or get_settings().resolved_data_dir) / "toolemu"
        return root / "all_cases.json", root / "all_toolkits.json"
    if name == "demo":
        return ASSETS_DIR / "demo" / "cases.json", ASSETS_DIR / "demo" / "toolkits.json"
    path = Path(name)
    if path.suffix == ".json":
        sibling = path.with_name("toolkits.json")
        alt = path.with_name(path.name.replace("cases", "toolkits"))
        return path, (alt if alt != path and alt.exists() else sibling)
    raise DataError(f"case set '{name}': expected 'toolemu', 'demo' or a path to a cases .json file")


def load_named_case_set(name: str, data_dir: Path | None = None) -> CaseSet:
    """Load a case set by name (see ``case_set_paths``)."""
    return load_case_set(*case_set_paths(name, data_dir))
