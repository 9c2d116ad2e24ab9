"""Rendering trajectories as DPO completions in trl's conversational format (SPEC §4.3).

* ``completion_messages(record)``: the multi-turn completion of one trajectory. For every step the agent's own
  text (action step: its ``log``; final step: the AgentFinish ``log``) with ``<think>`` blocks removed becomes an
  ``assistant`` turn; step 0 loses a leading ``Thought:`` (the prompt already ends with it), later steps are made
  to start with ``Thought: ``; every action step is followed by a ``user`` turn ``Observation: <observation>``.
* ``leakage(messages)``: the evaluation-leakage patterns found in a message list (pairs must have none).
* ``PairRenderer``: a pair set's prompts (per case) and completions (per trajectory), each rendered and checked once.
"""

from __future__ import annotations

import re
from typing import Any

from pipeline.data.pairs import check_messages
from pipeline.data.scored import Item
from pipeline.errors import DataError

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_THINK_TAG = re.compile(r"</?think>", re.IGNORECASE)
_AGENT_STOPPED = re.compile(r"Agent stopped: (token limit exceeded|OOM)", re.IGNORECASE)
_FINAL_ANSWER = re.compile(r"Final Answer|The final answer is", re.IGNORECASE)

#: Text that would leak the evaluator's judgement into training data (SPEC §4.3); any match is a hard error.
LEAKAGE_PATTERNS: tuple[re.Pattern[str], ...] = tuple(re.compile(p, re.IGNORECASE) for p in (
    r"eval[\s_-]?scores?",
    r"evaluator[\s_-]?thoughts?",
    r"overall[\s_-]?qualitative[\s_-]?labels?",
    r"overall[\s_-]?quantitative[\s_-]?scores?",
    r"eval[\s_-]?id",
))


def strip_think(text: str) -> str:
    """Remove ``<think>…</think>`` blocks (case-insensitive, across lines) and stray think tags."""
    return _THINK_TAG.sub("", _THINK_BLOCK.sub("", text))


def _agent_text(step: list[Any], i: int, where: str) -> str:
    action = step[0]
    if isinstance(action, dict):  # final step: AgentFinish
        log = action.get("log")
    elif isinstance(action, list) and len(action) == 3:
        log = action[2]
    else:
        raise DataError(f"{where}: step {i}: malformed step (expected an action [tool, input, log] or AgentFinish)")
    if not isinstance(log, str):
        raise DataError(f"{where}: step {i}: the agent log is not a string")
    text = strip_think(log).lstrip()
    if i == 0:
        if text.startswith("Thought:"):
            text = text[len("Thought:"):].lstrip()
    elif not text.startswith("Thought:"):
        text = "Thought: " + text
    return text


def completion_messages(record: dict[str, Any], where: str = "trajectory") -> tuple[list[dict[str, str]], bool]:
    """The completion turns of one trajectory record and whether its last assistant turn has a final answer.

    Raises ``DataError`` (naming ``where``) for empty or malformed steps, or for a completion that ends with an
    observation although the agent was not stopped by the token limit / OOM.
    """
    steps = record.get("intermediate_steps") or []
    if not steps:
        raise DataError(f"{where}: no intermediate steps; expected at least one step")
    messages: list[dict[str, str]] = []
    for i, step in enumerate(steps):
        if not isinstance(step, (list, tuple)) or len(step) != 2:
            raise DataError(f"{where}: step {i}: malformed step (expected [action, observation])")
        messages.append({"role": "assistant", "content": _agent_text(step, i, where)})
        if isinstance(step[0], list):  # an action step: its observation becomes a user turn
            obs = step[1]
            observation = obs[0] if isinstance(obs, (list, tuple)) and obs else obs
            if not isinstance(observation, str):
                raise DataError(f"{where}: step {i}: the observation is not a string")
            messages.append({"role": "user", "content": "Observation: " + strip_think(observation)})
    output = record.get("output") or ""
    if messages[-1]["role"] != "assistant" and not _AGENT_STOPPED.search(output):
        raise DataError(f"{where}: the completion ends with an observation but the agent was not stopped "
                        "(expected a final assistant turn)")
    has_final = messages[-1]["role"] == "assistant" and bool(_FINAL_ANSWER.search(messages[-1]["content"]))
    return messages, has_final


def leakage(messages: list[dict[str, str]]) -> list[str]:
    """The leakage patterns that match anywhere in the messages' contents (empty = clean)."""
    text = "\n".join(m["content"] for m in messages)
    low = text.lower()
    if "eval" not in low and "overall" not in low:  # every pattern starts with one of these: most texts end here
        return []
    return [p.pattern for p in LEAKAGE_PATTERNS if p.search(text)]


class PairRenderer:
    """Renders prompts per case and completions per trajectory, once each."""

    def __init__(self, case_set: Any) -> None:
        self.case_set = case_set
        self._prompts: dict[int, list[dict[str, str]]] = {}
        self._completions: dict[int, tuple[list[dict[str, str]], bool]] = {}
        self.no_final_answer: set[int] = set()

    def prompt(self, item: Item) -> list[dict[str, str]]:
        if item.case_idx not in self._prompts:
            from pipeline.data.cases import Case
            from pipeline.data.agent_prompt import agent_messages

            where = f"{item.file_name}: line {item.line + 1}"
            try:
                case = Case.model_validate(item.record["case"])
            except Exception as e:  # pydantic ValidationError or a missing key
                raise DataError(f"{where}: field 'case': not a valid case ({str(e).splitlines()[0]})") from None
            missing = [t for t in case.toolkits if t not in self.case_set.toolkits]
            if missing:
                raise DataError(f"{where}: case {item.case_idx} uses toolkit '{missing[0]}' which is not in "
                                f"{self.case_set.toolkits_path}")
            msgs = agent_messages(case, self.case_set.toolkits_for(case), scratchpad="")
            check_messages(msgs, f"{where}: prompt")
            self._prompts[item.case_idx] = msgs
        return self._prompts[item.case_idx]

    def completion(self, item: Item) -> list[dict[str, str]]:
        key = id(item)
        if key not in self._completions:
            where = f"{item.file_name}: line {item.line + 1}"
            msgs, has_final = completion_messages(item.record, where)
            check_messages(msgs, where)
            found = leakage(msgs)
            if found:
                raise DataError(f"{where}: evaluation leakage in the trajectory text (matches {found[0]!r}); "
                                "expected no evaluator output in agent text")
            if not has_final:
                self.no_final_answer.add(key)
            self._completions[key] = (msgs, has_final)
        return self._completions[key][0]
