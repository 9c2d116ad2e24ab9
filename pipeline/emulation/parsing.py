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


def clean_agent_output(text: str, *, keep_space: bool = False) -> str:
    """The study's post-processing of every agent call: strip, drop a leading ``Thought:``, end with a newline.
    ``keep_space``: as the study (ToolEmu's ``_fix_text``), only the prefix is dropped, so ``Thought: Done``
    becomes `` Done`` (after the scratchpad's ``Thought:`` it reads ``Thought: Done`` again)."""
    text = text.lstrip()
    if text.startswith("Thought:"):
        text = text[len("Thought:"):] if keep_space else text[len("Thought:"):].lstrip()
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


#: The study's fenced block: only one that holds a JSON object (``{…}``) right inside its fences is unwrapped.
_STUDY_FENCE = re.compile(r"```(?:json)?\s*(\{.*?\})\s*```", re.DOTALL)


def study_action_input(text: str) -> str:
    """The action input as the study extracted it (ToolEmu's ``get_first_json_object_str``: every action step of
    the released trajectories follows it, 5,876 in the pool, 16,611 in the finetuned models'): the first fenced
    block that holds a JSON object is unwrapped; the text, left-stripped, is parsed; at each error an invalid
    escape (``\\$``: every occurrence of that pair loses its backslash) or a Python boolean (every ``True``/
    ``False``) is fixed and parsing retried; at any other error the text is cut there, and the cut is kept when
    it parses (a JSON object followed by other text), else the (fixed) text is kept whole (tool validation then
    rejects it). Finally stripped of spaces, then of double quotes."""
    fenced = _STUDY_FENCE.search(text)
    if fenced:
        text = fenced.group(1)
    text = kept = text.lstrip()
    decoder = json.JSONDecoder(strict=False)
    while True:
        try:
            decoder.decode(text)
            break
        except json.JSONDecodeError as e:
            fixed = _study_json_fix(text, e.pos)
            if fixed is None:
                text = text[:e.pos].rstrip()
                break
            text = kept = fixed
    try:
        decoder.decode(text)
        kept = text
    except json.JSONDecodeError:  # the cut does not parse either: the whole (fixed) text is the input
        pass
    return kept.strip(" ").strip('"')


def _study_json_fix(text: str, pos: int) -> str | None:
    """ToolEmu's ``special_fix_for_json_obj``: the text with the slip at ``pos`` fixed everywhere, or None."""
    if text.startswith("\\", pos) and pos + 1 < len(text):  # {"a\_b": 1}: every "\_" becomes "_"
        return text.replace(text[pos:pos + 2], text[pos + 1])
    for python, json_name in (("True", "true"), ("False", "false")):
        if text.startswith(python, pos):
            return text.replace(python, json_name)
    return None


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
