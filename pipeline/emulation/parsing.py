"""Parsing the agent's ReAct output and the emulator's reply (SPEC §2.5, §2.6)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

FINAL_MARKERS = ("Final Answer", "The final answer is")
_ACTION = re.compile(r"Action: (.*?)[\n]*Action Input:[\s]*(.*)", re.DOTALL)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)
_EMULATOR = re.compile(r"Simulator Log Summary: (.*?)[\n]*Observation:[\s]*(.*)", re.DOTALL)


def clean_agent_output(text: str, strip_after_thought: bool = True) -> str:
    """The study's post-processing of every agent call: strip, drop a leading ``Thought:``, end with a newline.
    ``strip_after_thought=False``: the study's exact rule, which cut the prefix only (``Thought: X`` → `` X``)."""
    text = text.lstrip()
    if text.startswith("Thought:"):
        text = text[len("Thought:"):]
        text = text.lstrip() if strip_after_thought else text
    return text.rstrip() + "\n"


@dataclass(frozen=True)
class AgentFinish:
    output: str


@dataclass(frozen=True)
class AgentAction:
    tool: str
    tool_input: str


def parse_agent_output(text: str, *, ignore_think: bool,
                       study_input: bool = False) -> AgentFinish | AgentAction | None:
    """A finish (``Final Answer`` anywhere: the text after its last occurrence; without one, the same for ``The
    final answer is``), an action, or None (unparseable).
    ``study_input``: the action input as the study kept it (``study_action_input``)."""
    searchable = _THINK_BLOCK.sub("", text) if ignore_think else text
    for marker in FINAL_MARKERS:  # "Final Answer" first; "The final answer is" only when it is absent
        pos = searchable.rfind(marker)
        if pos >= 0:
            return AgentFinish(output=searchable[pos + len(marker):].strip())
    m = _ACTION.search(text)
    if m:
        extract = study_action_input if study_input else extract_action_input
        return AgentAction(tool=m.group(1).strip(), tool_input=extract(m.group(2)))
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


_BAD_ESCAPE = re.compile(r'\\([^"\\/bfnrtu])')


def study_action_input(text: str) -> str:
    """The action input as the study recorded it (found by replaying its 3,888 released trajectories: 11,344 of
    11,350 action steps): a fenced block is unwrapped and stripped; text that parses as JSON as a whole (trailing newline
    included) is kept whole; a JSON object followed by other text is cut after the object; invalid escapes
    (``\\$``, ``\\_``) and Python booleans are fixed first when that makes it parse; text that still does not
    parse is kept whole (tool validation then rejects it). Finally stripped of spaces and double quotes."""
    fenced = _FENCE.search(text)
    if fenced:
        text = fenced.group(1).strip()
    decoder = json.JSONDecoder(strict=False)
    fixed = _BAD_ESCAPE.sub(r"\1", text)
    for attempt in (text, fixed, re.sub(r"\bTrue\b", "true", re.sub(r"\bFalse\b", "false", fixed))):
        try:
            decoder.decode(attempt)
            return attempt.strip(' "')
        except json.JSONDecodeError:
            pass
        try:
            _, end = decoder.raw_decode(attempt)
            return attempt[:end].strip(' "')
        except json.JSONDecodeError:
            pass
    return text.strip(' "')


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
