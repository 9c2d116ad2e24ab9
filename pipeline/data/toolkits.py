"""Toolkits and tools in the ToolEmu format (SPEC §1.2): model, prompt descriptions, tool-input validation."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Detail = Literal["low", "medium", "high"]

#: JSON-schema-like type names used by the toolkits and the Python types they accept (int counts as number).
PARAM_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (float, int),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
}
#: How a type error names the expected type (the study's names: an array is a ``List``)
TYPE_NAMES = {"string": "str", "integer": "int", "number": "float", "boolean": "bool", "array": "List",
              "object": "Dict"}


class _Spec(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class Parameter(_Spec):
    name: str
    type: str
    description: str = ""
    #: Absent in two ToolEmu parameters: rendered as required, but not enforced (SPEC §1.2 quirk).
    required: bool | None = None


class Return(_Spec):
    name: str
    type: str
    description: str = ""


class ToolException(_Spec):
    name: str
    description: str = ""


class Tool(_Spec):
    name: str
    summary: str
    parameters: list[Parameter] = Field(default_factory=list)
    returns: list[Return] = Field(default_factory=list)
    exceptions: list[ToolException] = Field(default_factory=list)


class Toolkit(_Spec):
    toolkit: str
    name_for_model: str
    name_for_human: str = ""
    description_for_model: str
    description_for_human: str = ""
    category: str | None = None
    tools: list[Tool]

    def tool_names(self) -> list[str]:
        """Names the agent uses: ``name_for_model`` + tool name (``Todoist`` + ``SearchTasks``)."""
        return [self.name_for_model + t.name for t in self.tools]

    def find_tool(self, full_name: str) -> Tool | None:
        for t in self.tools:
            if self.name_for_model + t.name == full_name:
                return t
        return None

    def description(self, detail: Detail) -> str:
        """The toolkit text used in prompts (SPEC §1.2)."""
        head = f"<{self.name_for_model}>: {self.description_for_model}\nTool APIs:\n"
        body = ""
        for tool in self.tools:
            text = tool_description(tool, detail).rstrip("\n").replace("\n", "\n\t")
            body += f"\t* {self.name_for_model + tool.name}: {text}\n"
        return head + body


def _param_label(p: Parameter) -> str:
    return f"{p.name} ({p.type}, optional)" if p.required is False else f"{p.name} ({p.type})"


def tool_description(tool: Tool, detail: Detail) -> str:
    """Summary plus arguments/returns (and exceptions at ``high``) of one tool."""
    text = tool.summary.rstrip("., ") + "\n"
    if detail == "low":
        args = ", ".join(_param_label(p) for p in tool.parameters)
        rets = ", ".join(f"{r.name} ({r.type})" for r in tool.returns)
        return text + f"  Arguments: {args}\n  Returns: {rets}\n"
    text += "  Arguments:\n" + "".join(f"\t- {_param_label(p)}: {p.description}\n" for p in tool.parameters)
    text += "  Returns:\n" + "".join(f"\t- {r.name} ({r.type}): {r.description}\n" for r in tool.returns)
    if detail == "high":
        text += "  Exceptions:\n" + "".join(f"\t- {e.name}: {e.description}\n" for e in tool.exceptions)
    return text


class ToolInputError(ValueError):
    """The agent's Action Input does not fit the tool; the message becomes the error observation."""


def parse_tool_input(raw: str, *, study: bool = False) -> dict[str, Any]:
    """Parse an Action Input as a JSON object (non-strict: control characters allowed inside strings).
    ``study``: JSON that is not an object gets the study's message, the Python error its validation raised when
    it called ``.keys()`` on the value (``'list' object has no attribute 'keys'``)."""
    try:
        value = json.loads(raw, strict=False)
    except json.JSONDecodeError as e:
        raise ToolInputError(
            f"Invalid format: {e}. Please format it as a JSON object with necessary fields matching the "
            "tool's argument specifications. Do not include backsticks to wrap the JSON object."
        ) from None
    if not isinstance(value, dict):
        if study:
            raise ToolInputError(f"'{type(value).__name__}' object has no attribute 'keys'")
        raise ToolInputError(
            f"Invalid format: expected a JSON object, got {type(value).__name__}. Please format it as a JSON "
            "object with necessary fields matching the tool's argument specifications."
        )
    return value


def validate_tool_input(tool: Tool, raw: str, *, study: bool = False,
                        name_order: Callable[[list[str]], list[str]] | None = None) -> dict[str, Any]:
    """Parse and check an Action Input against a tool's parameters (SPEC §1.2); raises ``ToolInputError``.

    Checks, in the study's order: each declared parameter in turn (type if present, presence if required),
    then unexpected keys. Parameters without a ``required`` flag are not enforced. ``study``: the study's
    message for JSON that is not an object (``parse_tool_input``). ``name_order``: the order the unexpected
    names are printed in (default sorted; the study printed a Python set, in its process's hash order, which a
    replay takes from the recording).
    """
    args = parse_tool_input(raw, study=study)
    for p in tool.parameters:
        if p.name in args:
            expected = PARAM_TYPES.get(p.type)
            value = args[p.name]
            if expected is not None and not isinstance(value, expected):
                raise ToolInputError(
                    f"Invalid type for {p.name}: {type(value).__name__}, expected {TYPE_NAMES[p.type]}."
                )
        elif p.required:
            raise ToolInputError(f"Missing required parameter: {p.name}.")
    unexpected = sorted(set(args) - {p.name for p in tool.parameters})
    if unexpected and name_order is not None:
        unexpected = name_order(unexpected)
    if unexpected:
        raise ToolInputError("Unexpected parameters: {" + ", ".join(repr(k) for k in unexpected) + "}.")
    return args
