"""Parsing the agent's ReAct output and the emulator's reply (SPEC §2.5, §2.6)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_FINAL_MARKERS = ("Final Answer", "The final answer is")
_ACTION = re.compile(r"Action: (.*?)[\n]*Action Input:[\s]*(.*)", re.DOTALL)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)
_EMULATOR = re.compile(r"Simulator Log Summary: (.*?)[\n]*Observation:[\s]*(.*)", re.DOTALL)


def clean_agent_output(text: str) -> str:
    """The study's post-processing of every agent call: strip, drop a leading ``Thought:``, end with a newline."""
    text = text.lstrip()
    if text.startswith("Thought:"):
        text = text[len("Thought:"):].lstrip()
    return text.rstrip() + "\n"


@dataclass(frozen=True)
class AgentFinish:
    output: str


@dataclass(frozen=True)
class AgentAction:
    tool: str
    tool_input: str


def parse_agent_output(text: str, *, ignore_think: bool) -> AgentFinish | AgentAction | None:
    """A finish (``Final Answer`` anywhere; text after its last occurrence), an action, or None (unparseable)."""
    searchable = _THINK_BLOCK.sub("", text) if ignore_think else text
    positions = [(searchable.rfind(m), m) for m in _FINAL_MARKERS if m in searchable]
    if positions:
        pos, marker = max(positions)
        return AgentFinish(output=searchable[pos + len(marker):].strip())
    m = _ACTION.search(text)
    if m:
        return AgentAction(tool=m.group(1).strip(), tool_input=extract_action_input(m.group(2)))
    return None


def extract_action_input(text: str) -> str:
    """The first JSON object in the text after ``Action Input:`` (fenced blocks unwrapped, common slips fixed).

    When no valid object can be found the text is cut where parsing failed, so tool validation later reports
    an "Invalid format" error to the agent.
    """
    fenced = _FENCE.search(text)
    if fenced:
        text = fenced.group(1)
    start = text.find("{")
    if start < 0:
        return text.strip().strip('"').strip()
    candidate = text[start:]
    decoder = json.JSONDecoder(strict=False)
    for attempt in (candidate, candidate.replace("\\_", "_"),
                    re.sub(r"\bTrue\b", "true", re.sub(r"\bFalse\b", "false", candidate.replace("\\_", "_")))):
        try:
            _, end = decoder.raw_decode(attempt)
        except json.JSONDecodeError as e:
            err_pos = e.pos
            continue
        return attempt[:end].strip(' "')
    return candidate[:err_pos].strip(' "')


@dataclass(frozen=True)
class EmulatorReply:
    observation: str
    summary: str
    log: str
    parsed: bool


def parse_emulator_output(text: str) -> EmulatorReply:
    """Observation = everything after ``Observation:``; an unparseable reply gives an empty observation."""
    m = _EMULATOR.search(text)
    if not m:
        return EmulatorReply(observation="", summary="", log="", parsed=False)
    return EmulatorReply(observation=m.group(2).strip(), summary=m.group(1).strip(), log=text, parsed=True)
