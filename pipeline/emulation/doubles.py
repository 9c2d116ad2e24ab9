"""TEST DOUBLES for the agent and emulator roles: deterministic scripted replies, for tests only.

``scripted:agent`` and ``scripted:emulator`` read the prompt they are given (tool names and specs, the user
input, the steps so far) and answer in the expected format. A hash of the user input picks each case's
behaviour, so that across many cases every path occurs: valid calls, an invalid tool name, invalid input,
an unparseable output (continuation), a fabricated observation after the action (what ``--compat study``
lets through), and unparseable emulator replies. Same prompt → same reply, always.
"""

from __future__ import annotations

import hashlib
import json
import re

from pipeline.llm.scripted import register_script
from pipeline.llm.types import ChatRequest

_DUMMY = {"string": "example", "integer": 1, "number": 1.5, "boolean": True, "array": [], "object": {}}


def _h(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def _params(prompt: str, tool: str) -> list[tuple[str, str, bool]]:
    """(name, type, required) of a tool, read from its medium-detail spec in the agent prompt."""
    m = re.search(rf"\t\* {re.escape(tool)}: .*?\n\t  Arguments:\n(.*?)\t  Returns:", prompt, re.DOTALL)
    out = []
    for line in (m.group(1).splitlines() if m else []):
        pm = re.match(r"\t\t- (\w+) \((\w+)(, optional)?\)", line)
        if pm:
            out.append((pm.group(1), pm.group(2), pm.group(3) is None))
    return out


def scripted_agent(request: ChatRequest) -> str:
    prompt = request.messages[-1]["content"]
    tools = re.search(r"^Available tools: (.*)$", prompt, re.MULTILINE).group(1).split(", ")  # type: ignore[union-attr]
    user_input = prompt.rsplit("\nUser Input: ", 1)[1].split("\nThought: ", 1)[0]
    history = prompt.rsplit("\nUser Input: ", 1)[1]
    step = history.count("\nObservation:")
    # "sampling": with a temperature above 0 the seed changes the plan, as a real sampled agent would differ
    h = _h(user_input + (f"|{request.config.seed}" if request.config.temperature > 0 else ""))
    n_actions = 1 + h % 3
    if h % 11 == 2 and "(thinking it over)" not in history:
        return "(thinking it over) I am not sure which tool fits yet."  # no Action: a continuation follows
    if step >= n_actions:
        return f"I have what I need.\nFinal Answer: Done after {step} tool calls."
    tool = tools[(h + step) % len(tools)]
    args = {name: _DUMMY[typ] for name, typ, required in _params(prompt, tool) if required}
    if step == 0 and h % 7 == 0:
        tool = "NonexistentTool"
    elif step == 0 and h % 7 == 1:
        args = {"bogus_argument": 1}
    text = f"I should call {tool}.\nAction: {tool}\nAction Input: {json.dumps(args)}\n"
    if h % 5 == 3:  # an agent that invents the tool's output and finishes in the same call
        text += 'Observation: {"invented": true}\nThought: That worked.\nFinal Answer: Finished (invented).'
    return text


def scripted_emulator(request: ChatRequest) -> str:
    prompt = request.messages[-1]["content"]
    current = re.search(r"Current tool:\n\* (\w+): (.*?)\n\nUser Input:", prompt, re.DOTALL)
    if current is None:
        return "unparseable"
    tool, spec = current.group(1), current.group(2)
    call = prompt.rsplit("Action Input: ", 1)[1].split("\n", 1)[0]
    if _h(tool + call) % 13 == 4:
        return "Simulator Thought: I cannot simulate this call."  # no Observation: parse failure
    returns = spec.split("  Returns:\n", 1)[1].split("  Exceptions:", 1)[0] if "  Returns:\n" in spec else ""
    obs = {m.group(1): _DUMMY.get(m.group(2), "x") for m in re.finditer(r"\t- (\w+) \((\w+)\)", returns)}
    return (f"Simulator Thought: The call to {tool} is valid.\nSimulator Log Summary: {tool} returned "
            f"{len(obs)} fields.\nObservation: {json.dumps(obs)}")


register_script("agent", scripted_agent)
register_script("emulator", scripted_emulator)
