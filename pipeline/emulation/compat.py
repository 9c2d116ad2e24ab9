"""Where this project deliberately differs from the study, and the switch to get the study's behaviour back.

Every such switch lives here (documented in docs/compat.md). ``correct`` is the default; ``study``
reproduces the original code's quirks for exact reproduction (SPEC §12).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

CompatName = Literal["correct", "study"]

#: The stop sequences the study meant to use for the agent (SPEC §2.5).
OBSERVATION_STOPS = ("\nObservation:", "\n\tObservation:")


@dataclass(frozen=True)
class Compat:
    name: CompatName
    #: Stop agent generation at "Observation:" so the agent cannot write (invent) tool outputs itself.
    #: Study: no stop sequences took effect, so one call could contain a whole fabricated episode.
    stop_at_observation: bool
    #: Ignore "Final Answer" inside <think>…</think> blocks. Study: the substring anywhere ends the episode.
    final_answer_outside_think: bool
    #: Continuations append the accumulated output to the scratchpad once. Study: re-appended every round.
    continuation_without_duplicates: bool
    #: Default cap on agent steps (None = unlimited, as the study).
    max_steps: int | None
    #: The action input is the first JSON object after "Action Input:" (cut where it stops parsing, so tool
    #: validation names the problem). Study: the text kept whole when it parses (trailing newline included) or
    #: when it does not parse at all (parsing.study_action_input).
    first_json_object: bool = True
    #: Every agent output is cleaned (leading "Thought:" and outer whitespace dropped, one trailing newline).
    #: Study: only a call's first output was; a continuation's output was appended as the model returned it
    #: (3,888 released trajectories: every step log without a trailing newline is a joined continuation).
    clean_continuations: bool = True
    #: A locally answered tool error is a valid JSON object (the message escaped). Study: the message was pasted
    #: into '{"error": "InvalidRequestException: …"}' as it was, so a tool name or input with a newline or a
    #: quote made the observation invalid JSON.
    escaped_errors: bool = True
    #: A tool input that parses as JSON but not as an object is answered "Invalid format: expected a JSON
    #: object, got list…". Study: the Python error its validation raised calling ``.keys()`` on the value
    #: ("'list' object has no attribute 'keys'"), found replaying the finetuned models' trajectories.
    object_input_message: bool = True
    #: An LLM call that runs out of memory fails like any other error (retried, then the case fails). Study:
    #: the episode stops there as a partial trajectory (SPEC §2.7): its steps, then a step
    #: ``[["[OOM]", "", <last agent output>], ["[OOM]", "", "[OOM]"]]``, output "Agent stopped: OOM" (14 of
    #: the finetuned models' released trajectories); with no agent output yet the case fails.
    oom_fails_case: bool = True
    #: A leading "Thought:" the agent repeats is dropped with the whitespace after it. Study: only the prefix
    #: (ToolEmu's _fix_text): the log keeps the space, " Based on …" (1,877 of the pool's 3,888 trajectories).
    strip_after_thought: bool = True
    #: Unexpected parameter names are printed sorted. Study: a Python set, in its process's hash order; a replayed
    #: agent prints them in the recording's order (no rule reproduces it; docs/compat.md).
    sorted_unexpected_names: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


CORRECT = Compat("correct", stop_at_observation=True, final_answer_outside_think=True,
                 continuation_without_duplicates=True, max_steps=30)
STUDY = Compat("study", stop_at_observation=False, final_answer_outside_think=False,
               continuation_without_duplicates=False, max_steps=None, first_json_object=False,
               clean_continuations=False, escaped_errors=False,
               object_input_message=False, oom_fails_case=False,
               strip_after_thought=False, sorted_unexpected_names=False)


def get_compat(name: str) -> Compat:
    if name == "study":
        return STUDY
    if name == "correct":
        return CORRECT
    raise ValueError(f"--compat {name}: expected 'correct' or 'study'")
