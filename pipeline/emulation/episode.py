"""One case's episode: the agent loop as a small state machine, advanced one step at a time by the runner.

The runner asks each active episode for its next LLM request (agent or emulator), sends them all in one
batch, and feeds each reply back. Invalid tools and invalid inputs are answered locally, without an emulator
call (SPEC §1.2, §12.4).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

from pipeline.data.cases import Case
from pipeline.data.records import OOM_OUTPUT, TOKEN_LIMIT_OUTPUT
from pipeline.data.toolkits import Tool, Toolkit, ToolInputError, validate_tool_input
from pipeline.emulation.compat import OBSERVATION_STOPS, Compat
from pipeline.emulation.parsing import (AgentAction, AgentFinish, clean_agent_output, parse_agent_output,
                                        parse_emulator_output)
from pipeline.data import agent_prompt as agent_prompts
from pipeline.emulation.prompts import emulator as emulator_prompts
from pipeline.llm import ChatRequest, ChatResponse, GenerationConfig
from pipeline.llm.tokens import count_tokens
from pipeline.llm.types import request_seed

MAX_STEPS_OUTPUT = "Agent stopped: max steps exceeded"
#: Bumped whenever the engine's rules change what an episode records (part of emulate's fingerprint). 2: the
#: study's action-input, continuation and error-observation rules found by replaying its released runs; "Final
#: Answer" before "The final answer is". 3: the study's rules found replaying its finetuned models' runs (ToolEmu's
#: action input extraction, the error for a non-object input, OOM partial trajectories, "Thought:" cleaning).
#: 4: under study rules a replayed agent prints unexpected parameter names in the recording's order.
ENGINE_VERSION = 4


@dataclass(frozen=True)
class Limits:
    max_agent_tokens: int = 8000  # cumulative agent output tokens (cl100k), the study's budget
    max_tokens_per_call: int = 2048  # the study's HF cap, every role
    max_continuations: int = 5  # re-prompts for an unparseable agent output
    max_steps: int | None = None
    max_attempts: int = 3  # an LLM call that errors is retried this many times in all, then the case fails
    agent_temperature: float = 0.0
    emulator_temperature: float = 0.0
    #: The run's sampling seed: each sampled call draws with its own seed derived from it and the request
    #: (``request_seed``), so a case's answers do not depend on the batch it ran in.
    agent_seed: int | None = None


@dataclass
class RoleUsage:
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0  # of the priced calls (local models: none, 0)
    latency_s: float = 0.0
    cached_calls: int = 0
    unpriced_calls: int = 0  # API calls of a model missing from the price table
    priced_calls: int = 0  # calls with a known cost (a failed call has none, priced model or not)
    not_sent: list[str] = field(default_factory=list)  # requested settings the model was not sent

    def add(self, r: ChatResponse) -> None:
        self.calls += 1
        self.prompt_tokens += r.prompt_tokens
        self.completion_tokens += r.completion_tokens
        self.cost_usd += r.cost_usd or 0.0
        self.latency_s += r.latency_s
        self.cached_calls += int(r.cached)
        self.unpriced_calls += int(r.unpriced)
        self.priced_calls += r.cost_usd is not None
        self.not_sent = sorted(set(self.not_sent) | set(r.not_sent))

    def as_json(self) -> dict[str, Any]:
        """The record's usage: ``cost_usd`` is null when every call was unpriced (unknown, not $0), else the sum
        over the priced calls, with ``unpriced_calls`` saying how many it leaves out."""
        cost = None if self.unpriced_calls and not self.priced_calls else round(self.cost_usd, 6)
        out = vars(self) | {"cost_usd": cost, "latency_s": round(self.latency_s, 3)}
        if not self.not_sent:  # only an API model that leaves settings out has the key
            out.pop("not_sent")
        return out


@dataclass
class Episode:
    case_idx: int
    case: Case
    toolkits: list[Toolkit]
    compat: Compat
    limits: Limits
    mode: str  # emulator mode: adversarial | standard
    #: the printed order of unexpected parameter names (None: sorted); a replay's is the recording's
    name_order: Callable[[list[str]], list[str]] | None = None
    steps: list[list[Any]] = field(default_factory=list)
    scratchpad: str = ""
    agent_tokens: int = 0
    continuation: str = ""  # accumulated unparseable agent output
    continuation_scratchpad: str = ""
    continuations: int = 0
    last_output: str = ""  # the agent's latest output (accumulated while continuing): an OOM stop records it
    pending: tuple[str, str, str, Toolkit, Tool] | None = None  # action awaiting the emulator
    output: str | None = None
    finish_log: str = ""
    finish_reason: str | None = None
    error: str | None = None
    error_type: str | None = None
    failures: int = 0
    emulator_parse_failures: int = 0
    local_errors: int = 0
    usage: dict[str, RoleUsage] = field(default_factory=lambda: {"agent": RoleUsage(), "emulator": RoleUsage()})
    started: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> bool:
        return self.output is not None or self.error is not None

    @property
    def wants(self) -> str:
        """Which role the next request goes to."""
        return "emulator" if self.pending else "agent"

    # ------------------------------------------------------------------------------------------- requests
    def next_request(self) -> ChatRequest:
        if self.pending:
            tool_name, tool_input, _, toolkit, tool = self.pending
            pad = emulator_prompts.emulator_scratchpad(self.steps, tool_name, tool_input)
            messages = emulator_prompts.emulator_messages(self.case, toolkit, tool, pad, self.mode)  # type: ignore[arg-type]
            cfg = GenerationConfig(max_new_tokens=self.limits.max_tokens_per_call,
                                   temperature=self.limits.emulator_temperature,
                                   seed=self._seed("emulator", self.limits.emulator_temperature, messages))
            return ChatRequest(messages=messages, config=cfg, tag=self.case_idx, role="emulator")
        pad = self.continuation_scratchpad if self.continuation else self.scratchpad
        messages = agent_prompts.agent_messages(self.case, self.toolkits, pad)
        cfg = GenerationConfig(max_new_tokens=self.limits.max_tokens_per_call,
                               temperature=self.limits.agent_temperature,
                               stop=OBSERVATION_STOPS if self.compat.stop_at_observation else (),
                               seed=self._seed("agent", self.limits.agent_temperature, messages))
        return ChatRequest(messages=messages, config=cfg, tag=self.case_idx, role="agent")

    def _seed(self, role: str, temperature: float, messages: list[dict[str, str]]) -> int | None:
        """A sampled call's own seed: a function of the run's seed, the role, the case and the prompt (which
        holds the episode so far), never of the batch; None when not sampling or no seed was given."""
        if temperature <= 0 or self.limits.agent_seed is None:
            return None
        return request_seed(self.limits.agent_seed, role, self.case_idx, messages)

    # -------------------------------------------------------------------------------------------- replies
    def feed(self, role: str, response: ChatResponse) -> None:
        self.usage[role].add(response)
        if not response.ok:
            self._llm_failure(role, response.error or "unknown error")
            return
        self.failures = 0
        if role == "agent":
            self._agent_reply(response.text)
        else:
            self._emulator_reply(response.text)

    def _llm_failure(self, role: str, error: str) -> None:
        if not self.compat.oom_fails_case and "out of memory" in error.lower() and (self.steps or self.last_output):
            self._stop_oom()
            return
        self.failures += 1
        too_long = "maximum model length" in error or "too long" in error
        if too_long or self.failures >= self.limits.max_attempts:
            self.error = f"{role} call failed: {error}"
            self.error_type = "ContextLengthExceeded" if too_long else "LLMError"

    def _agent_reply(self, raw: str) -> None:
        keep_space = not self.compat.strip_after_thought
        cleaned = not self.continuation or self.compat.clean_continuations
        text = clean_agent_output(raw, keep_space=keep_space) if cleaned else raw
        self.agent_tokens += count_tokens(text)
        full = self.continuation + text if self.continuation else text
        self.last_output = full
        if self.agent_tokens >= self.limits.max_agent_tokens:
            self._finish(TOKEN_LIMIT_OUTPUT, full, "token_limit")
            return
        parsed = parse_agent_output(full, ignore_think=self.compat.final_answer_outside_think,
                                    study_input=not self.compat.first_json_object)
        if isinstance(parsed, AgentFinish):
            self._finish(parsed.output, full, "final_answer")
        elif isinstance(parsed, AgentAction):
            self.continuation, self.continuations = "", 0
            self._act(parsed, full)
        else:
            self.continuations += 1
            if self.continuations > self.limits.max_continuations:
                # the study labels this a token-limit stop too (SPEC §2.5); finish_reason tells them apart
                self._finish(TOKEN_LIMIT_OUTPUT, full, "max_continuations")
                return
            self.continuation = full
            if self.compat.continuation_without_duplicates:
                self.continuation_scratchpad = self.scratchpad + full
            else:  # the study re-appends the whole accumulated output every round
                base = self.continuation_scratchpad or self.scratchpad
                self.continuation_scratchpad = base + full

    def _act(self, action: AgentAction, log: str) -> None:
        found = next(((tk, t) for tk in self.toolkits if (t := tk.find_tool(action.tool)) is not None), None)
        if found is None:
            names = ", ".join(n for tk in self.toolkits for n in tk.tool_names())
            self._local_observation(action, log, self._error(
                f"{action.tool} is not a valid tool, try another one. You should use "
                f"available tools in [{names}] only. If you cannot (or do not need to) use any existing tools to "
                "improve your response, conclude by stating Final Answer directly."))
            return
        toolkit, tool = found
        try:
            validate_tool_input(tool, action.tool_input, study=not self.compat.object_input_message,
                                name_order=self.name_order)
        except ToolInputError as e:
            self._local_observation(action, log, self._error(str(e)))
            return
        self.pending = (action.tool, action.tool_input, log, toolkit, tool)

    def _error(self, message: str) -> str:
        """The observation of a locally answered tool error."""
        if self.compat.escaped_errors:
            return json.dumps({"error": f"InvalidRequestException: {message}"})
        return '{"error": "InvalidRequestException: ' + message + '"}'

    def _local_observation(self, action: AgentAction, log: str, observation: str) -> None:
        self.local_errors += 1
        self._record_step([action.tool, action.tool_input, log], [observation, "", observation])

    def _emulator_reply(self, raw: str) -> None:
        assert self.pending is not None
        tool_name, tool_input, log, _, _ = self.pending
        reply = parse_emulator_output(raw)
        if not reply.parsed:
            self.emulator_parse_failures += 1
        self.pending = None
        self._record_step([tool_name, tool_input, log], [reply.observation, reply.summary, reply.log])

    def _record_step(self, action: list[str], observation: list[str]) -> None:
        self.steps.append([action, observation])
        self.scratchpad += agent_prompts.scratchpad_step(action[2], observation[0])
        max_steps = self.limits.max_steps
        if max_steps is not None and len(self.steps) >= max_steps:
            self._finish(MAX_STEPS_OUTPUT, action[2], "max_steps")

    def _finish(self, output: str, log: str, reason: str) -> None:
        self.output, self.finish_log, self.finish_reason = output, log, reason
        self.steps.append([{"return_values": {"output": output}, "log": log, "type": "AgentFinish"}, ""])

    def _stop_oom(self) -> None:
        """The study's partial trajectory after an out-of-memory call (SPEC §2.7): no AgentFinish step."""
        self.pending = None
        self.output, self.finish_log, self.finish_reason = OOM_OUTPUT, self.last_output, "oom"
        self.steps.append([["[OOM]", "", self.last_output], ["[OOM]", "", "[OOM]"]])

    # --------------------------------------------------------------------------------------------- record
    def record(self, extra: dict[str, Any]) -> dict[str, Any]:
        """The trajectory record (SPEC §2.8 keys first, then this project's added fields)."""
        usage = {role: u.as_json() for role, u in self.usage.items()}
        if self.error is not None:
            return {"error": self.error, "error_type": self.error_type, "case": self.case.to_json(),
                    "case_idx": self.case_idx, "usage": usage, **extra}
        inputs = self.case.prompt_inputs()
        rec: dict[str, Any] = {} if self.finish_reason == "oom" else {"input": inputs["input"]}  # as the study
        if self.mode == "adversarial" and self.finish_reason != "oom":
            rec.update(underspecifications=inputs["underspecifications"], risky_outcome=inputs["risky_outcome"],
                       risky_actions=inputs["risky_actions"])
        rec.update(output=self.output, intermediate_steps=self.steps, case=self.case.to_json(),
                   case_idx=self.case_idx)
        rec.update(finish_reason=self.finish_reason, agent_output_tokens=self.agent_tokens,
                   emulator_parse_failures=self.emulator_parse_failures, local_tool_errors=self.local_errors,
                   usage=usage, wall_s=round(time.monotonic() - self.started, 3), **extra)
        return rec
