"""Replay recorded trajectories through the real episode engine, and compare what it rebuilds with the record.

``ReplayBackend`` (model spec ``replay:<run file or folder>[#<name>]``) answers the agent role with the agent
outputs a recording holds (each step's ``log``) and the emulator role with the emulator outputs (each emulated
step's raw log), in order, per case (``ChatRequest.tag`` is the case index, ``ChatRequest.role`` the role). It is a reproduction and debugging tool
for real runs — the study's released trajectories above all — not a test double: everything else (parsing,
validation, local tool errors, the token budget, continuations, stop rules) is the engine's own.

``replay_runs`` drives every trajectory below a folder through ``Episode`` + ``advance`` and classifies the
first difference of each rebuilt trajectory: step count, tool, tool input, observation, final output, stop.
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.data.cases import Case
from pipeline.data.records import OOM_OUTPUT, TOKEN_LIMIT_OUTPUT
from pipeline.emulation.parsing import FINAL_MARKERS
from pipeline.errors import DataError, NamingError
from pipeline.llm import register_backend
from pipeline.llm.base import ChatBackend, Progress
from pipeline.llm.spec import ModelSpec
from pipeline.llm.types import ChatRequest, ChatResponse

#: What the engine answers locally (no emulator call): the step keeps the error as observation and log.
_LOCAL_ERROR = '{"error": "InvalidRequestException'


def agent_outputs(record: dict[str, Any]) -> list[str]:
    """The agent calls' outputs of a recorded trajectory, in order: each step's log, split where the study
    joined a continuation (see ``split_continuation``)."""
    from pipeline.emulation.parsing import parse_agent_output

    out: list[str] = []
    for i, s in enumerate(record["intermediate_steps"]):
        log = s[0]["log"] if isinstance(s[0], dict) else s[0][2]
        if is_oom_step(s) and i and log == record["intermediate_steps"][i - 1][0][2]:
            continue  # the call after this step ran out of memory: the OOM step repeats the step's output
        if (isinstance(s[0], dict) and record.get("output") == TOKEN_LIMIT_OUTPUT
                and parse_agent_output(log, ignore_think=False) is None):
            out += _as_returned(split_lines(log, MAX_CONTINUATIONS + 1))  # gave up after its last continuation
        else:
            out += _as_returned(split_continuation(log))
    return out


def first_output(text: str) -> str:
    """The output of a step's first call that the study's cleaning turned into ``text`` (see ``_as_returned``)."""
    return "Thought:" + text if text[:1].isspace() else text


def _as_returned(outputs: list[str]) -> list[str]:
    """A step's call outputs as the model returned them: a cleaned first output that starts with whitespace
    had a ``Thought:`` before it, which the study's cleaning dropped (and only it)."""
    return ["Thought:" + outputs[0], *outputs[1:]] if outputs[0][:1].isspace() else outputs


#: The study's continuation limit (SPEC §2.5): an episode that never parsed made this many calls plus one.
MAX_CONTINUATIONS = 5
#: a locally answered "Unexpected parameters: {'a', 'b'}" observation: the names as the recording printed them
_UNEXPECTED = re.compile(r"Unexpected parameters: \{([^{}]*)\}")


def split_lines(log: str, n: int) -> list[str]:
    """An unparseable log as the ``n`` calls that made it: the first lines up to one a cleaned output can end
    with (not with whitespace before its newline), as the first output, then one line per call, the last call
    taking the rest (empty outputs when there are fewer lines)."""
    from pipeline.emulation.parsing import clean_agent_output

    ends = [i + 1 for i, ch in enumerate(log) if ch == "\n"]
    cut = next((i for i in ends if clean_agent_output(first_output(log[:i]), keep_space=True) == log[:i]),
               ends[0] if ends else len(log))
    head, rest = log[:cut], log[cut:]
    pieces = [head]
    lines = rest.splitlines(keepends=True)
    pieces += lines[:n - 2] + ["".join(lines[n - 2:])] if n > 1 else []
    return pieces + [""] * (n - len(pieces))


def split_continuation(log: str) -> list[str]:
    """A step log as the agent calls that made it. Every first output of a call was cleaned and so ends with a
    newline; a log without one is a first output the engine could not parse joined with a continuation's raw
    output. The split is at the first line break after which the prefix is still unparseable (any such split
    parses the same joined text; only the continuation count may differ from the original run's)."""
    from pipeline.emulation.parsing import clean_agent_output, parse_agent_output

    if log.endswith("\n"):
        return [log]
    start = 0
    while (i := log.find("\n", start)) >= 0:
        head = log[:i + 1]
        if (clean_agent_output(first_output(head), keep_space=True) == head
                and parse_agent_output(head, ignore_think=False) is None):
            return [head, log[i + 1:]]
        if parse_agent_output(head, ignore_think=False) is not None:
            break
        start = i + 1
    return [log]


def is_local_step(step: list[Any]) -> bool:
    """An action step the engine answered itself (invalid tool or input): no emulator call was made."""
    obs = step[1]
    return obs[1] == "" and obs[2] == obs[0] and str(obs[0]).startswith(_LOCAL_ERROR)


def is_oom_step(step: list[Any]) -> bool:
    """The study's last step of an episode stopped by an out-of-memory call (SPEC §2.7)."""
    return isinstance(step[0], list) and step[0][0] == "[OOM]" and step[1] == ["[OOM]", "", "[OOM]"]


def emulator_outputs(record: dict[str, Any]) -> list[str]:
    """The emulator's raw output of every emulated step (an unparseable reply was recorded as ``""``: replayed
    as such it parses to the same empty observation)."""
    return [s[1][2] for s in record["intermediate_steps"]
            if not isinstance(s[0], dict) and not is_local_step(s) and not is_oom_step(s)]


def recorded_trajectories(path: Path, spec: str) -> list[dict[str, Any]]:
    """The trajectories a recording holds, in case order: a run file's, or those of every trajectory file below
    a folder merged per case index (the study stores one model as several range files). The same case recorded
    twice with different content is a ``DataError`` naming both files (the replay could not tell which to
    answer from); recorded twice alike (a run file and its copy under another judge's name) is one case."""
    from pipeline.data.jsonl import read_jsonl

    if path.is_file():
        return read_jsonl(path).records
    if not path.is_dir():
        raise DataError(f"{spec}: no run file or folder at {path}")
    files = trajectory_files(path)
    if not files:
        raise DataError(f"{spec}: no trajectory files below {path}")
    by_case: dict[Any, tuple[Path, dict[str, Any]]] = {}
    for f in files:
        for i, rec in enumerate(read_jsonl(f).records):
            if "case_idx" not in rec:
                raise DataError(f"{f}: line {i + 1} has no case_idx")
            seen = by_case.setdefault(rec["case_idx"], (f, rec))
            if seen[1] != rec:
                raise DataError(f"{spec}: case {rec['case_idx']} is recorded twice with different content: "
                                f"{seen[0]} and {f}")
    return [rec for _, (_, rec) in sorted(by_case.items(), key=lambda kv: kv[0])]


class ReplayBackend(ChatBackend):
    """Answers from recorded outputs, per case and role (``ChatRequest.role``), in order; an engine that asks
    for more than was recorded gets a failed response (the episode then fails: a difference the replay
    reports). A request without a role, or for the judge (``pipeline.evaluation.replay`` replays judgements),
    gets a failed response too."""

    def __init__(self, spec: ModelSpec | None = None, records: Sequence[dict[str, Any]] | None = None) -> None:
        if records is None:
            if spec is None:
                raise DataError("replay backend: give a run file or folder (replay:<path>) or records")
            records = recorded_trajectories(Path(spec.model), spec.raw)
        self.spec = spec
        self.revision = f"replay:{spec.model}" if spec else "replay"
        self._queues: dict[tuple[Any, str], list[str]] = {}
        #: case → agent outputs whose answer was cut off at a stop sequence (written after an invented observation)
        self.cut: Counter = Counter()
        #: cases whose recorded episode stopped at an out-of-memory call: asked past the record, the backend
        #: runs out of memory there again
        self._oom = {rec["case_idx"] for rec in records if rec.get("output") == OOM_OUTPUT}
        #: case → the name lists of its recorded "Unexpected parameters: {…}" observations, in printed order
        self._printed: dict[Any, list[list[str]]] = {}
        for rec in records:
            for step in rec.get("intermediate_steps") or []:
                observation = step[1][0] if len(step) > 1 and step[1] and isinstance(step[1][0], str) else ""
                for m in _UNEXPECTED.finditer(observation):
                    try:
                        names = ast.literal_eval("[" + m.group(1) + "]")
                    except (ValueError, SyntaxError):
                        continue  # not a printed list of names: nothing to take the order from
                    self._printed.setdefault(rec["case_idx"], []).append([str(n) for n in names])
        #: cases whose unexpected names were printed in the recording's order rather than sorted
        self.reordered: Counter = Counter()
        for rec in records:
            if "intermediate_steps" not in rec:
                continue  # a failed episode recorded no outputs
            self._queues[(rec["case_idx"], "agent")] = list(reversed(agent_outputs(rec)))
            self._queues[(rec["case_idx"], "emulator")] = list(reversed(emulator_outputs(rec)))

    def name_order(self, case_idx: Any) -> Callable[[list[str]], list[str]]:
        """How case ``case_idx`` prints a set of unexpected parameter names: in the order the recording printed
        that same set, in the recording's sequence (the study printed a Python set, whose order its process's
        string hash decided: no rule reproduces it), else sorted."""

        def order(names: list[str]) -> list[str]:
            # the next recorded print of the same names (one set can print in two orders within an episode:
            # the order also follows the set's insertion history)
            queue = self._printed.get(case_idx, [])
            for i, printed in enumerate(queue):
                if sorted(printed) == sorted(names):
                    del queue[i]
                    if printed != sorted(names):
                        self.reordered[case_idx] += 1
                    return list(printed)
            return sorted(names)

        return order

    def generate(self, requests: Sequence[ChatRequest], progress: Progress | None = None) -> list[ChatResponse]:
        out = []
        for r in requests:
            if r.role not in ("agent", "emulator"):
                out.append(ChatResponse.failure(f"replay: a trajectory replay answers the agent and the emulator, "
                                                f"not a request of role {r.role} (case {r.tag})"))
                continue
            queue = self._queues.get((r.tag, r.role))
            if not queue and r.tag in self._oom:
                out.append(ChatResponse.failure(f"replay: CUDA out of memory (as recorded) for case {r.tag}"))
                continue
            if not queue:
                out.append(ChatResponse.failure(f"replay: no more recorded {r.role} outputs for case {r.tag}"))
                continue
            text = queue.pop()
            for stop in r.config.stop:  # as a real backend: the output ends before a stop sequence
                if stop in text:
                    text, rest = text[:text.index(stop)], text[text.index(stop):]
                    if any(m in rest for m in FINAL_MARKERS):  # the recorded answer came after an invented step
                        self.cut[r.tag] += 1
            out.append(ChatResponse(text=text, finish_reason="stop"))
        return out


register_backend("replay", ReplayBackend)  # get_backend("replay:<path>") for the agent and emulator roles


# ---------------------------------------------------------------------------------------------- comparison
#: Kinds of difference, in the order they are looked for (the first one found classifies a trajectory).
KINDS = ("past the record", "engine error", "step count", "tool", "tool input", "observation", "final output", "stop",
         "log")


def stop_of(output: str | None) -> str:
    """How an episode ended, from its output (the study labels both a token-limit stop and exhausted
    continuations ``Agent stopped: token limit exceeded``)."""
    from pipeline.emulation.episode import MAX_STEPS_OUTPUT

    if output == TOKEN_LIMIT_OUTPUT:
        return "token limit"
    if output == MAX_STEPS_OUTPUT:
        return "max steps"
    return "final answer"


def _same_input(a: str, b: str, exact: bool) -> bool:
    if exact or a == b:
        return a == b
    try:  # the same JSON object, written with other whitespace, is the same tool call
        return json.loads(a, strict=False) == json.loads(b, strict=False)
    except ValueError:
        return False


def first_difference(recorded: dict[str, Any], rebuilt: dict[str, Any],
                     exact: bool = True) -> tuple[str, str] | None:
    """(kind, detail) of the first difference between a recorded and a rebuilt trajectory, or None.
    ``exact=False`` takes tool inputs that are the same JSON object as the same."""
    if "error" in rebuilt:
        if "replay: no more recorded" in rebuilt["error"]:
            return "past the record", "the engine went on where the recorded episode had ended"
        return "engine error", rebuilt["error"]
    a, b = recorded["intermediate_steps"], rebuilt["intermediate_steps"]
    for i, (x, y) in enumerate(zip(a, b)):
        x_final, y_final = isinstance(x[0], dict), isinstance(y[0], dict)
        if x_final or y_final:
            if x_final != y_final:
                return "step count", f"step {i}: recorded {'finish' if x_final else 'action'}, rebuilt " \
                                     f"{'finish' if y_final else 'action'}"
            break
        if x[0][0] != y[0][0]:
            return "tool", f"step {i}: {x[0][0]!r} → {y[0][0]!r}"
        if not _same_input(x[0][1], y[0][1], exact):
            return "tool input", f"step {i}: {x[0][1]!r} → {y[0][1]!r}"
        if x[1][0] != y[1][0]:
            return "observation", f"step {i}: {str(x[1][0])[:80]!r} → {str(y[1][0])[:80]!r}"
    if len(a) != len(b):
        return "step count", f"{len(a)} recorded, {len(b)} rebuilt"
    if recorded.get("output") != rebuilt.get("output"):
        return "final output", f"{str(recorded.get('output'))[:80]!r} → {str(rebuilt.get('output'))[:80]!r}"
    if stop_of(recorded.get("output")) != stop_of(rebuilt.get("output")):
        return "stop", f"{stop_of(recorded.get('output'))} → {stop_of(rebuilt.get('output'))}"
    if exact:  # the agent's text of each step (the study's judge read the final one: docs/compat.md)
        for i, (x, y) in enumerate(zip(a, b)):
            x_log, y_log = _log_of(x), _log_of(y)
            if x_log != y_log:
                return "log", f"step {i}: …{x_log[-40:]!r} → …{y_log[-40:]!r}"
    return None


def _log_of(step: list[Any]) -> str:
    return step[0].get("log", "") if isinstance(step[0], dict) else step[0][2]


@dataclass
class ReplayReport:
    compat: str
    total: int = 0
    identical: int = 0
    by_kind: Counter = field(default_factory=Counter)
    examples: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind → first file, case, detail
    differences: list[dict[str, Any]] = field(default_factory=list)
    #: how the rebuilt episodes ended (the engine's finish reasons)
    finish_reasons: Counter = field(default_factory=Counter)
    #: why the differing episodes differ (``why``)
    reasons: Counter = field(default_factory=Counter)
    #: observations whose unexpected names printed in the recording's order, not sorted (study rules)
    set_orders: int = 0

    @property
    def rate(self) -> float:
        return self.identical / self.total if self.total else 0.0

    def line(self) -> str:
        order = (f"; {self.set_orders} set print order{'s' if self.set_orders != 1 else ''} taken from the "
                 "recording" if self.set_orders else "")
        return f"replay: {self.identical} of {self.total} trajectories identical ({100 * self.rate:.2f} %){order}"

    def to_json(self) -> dict[str, Any]:
        return {"compat": self.compat, "total": self.total, "identical": self.identical, "rate": self.rate,
                "set_orders": self.set_orders,
                "by_kind": dict(self.by_kind.most_common()), "examples": self.examples,
                "finish_reasons": dict(self.finish_reasons.most_common()), "reasons": dict(self.reasons.most_common()),
                "differences": self.differences}


def why(record: dict[str, Any], kind: str, cut: int, max_steps: int | None) -> str:
    """Why the engine's rules change a recorded episode: the first that applies."""
    from pipeline.emulation.parsing import _THINK_BLOCK

    if cut:
        return "its answer followed an observation the agent wrote itself (cut at the stop sequence)"
    final = record["intermediate_steps"][-1][0]
    log = final.get("log", "") if isinstance(final, dict) else ""
    if "Final Answer" in log and "Final Answer" not in _THINK_BLOCK.sub("", log):
        return "its Final Answer is inside <think> (not an answer)"
    if max_steps is not None and len(record["intermediate_steps"]) - 1 > max_steps:
        return f"more than {max_steps} steps"
    if kind == "observation":
        return "a locally answered tool error is escaped (valid JSON)"
    if kind == "tool input":
        return "the action input is its first JSON object"
    return "other"


def trajectory_files(root: Path) -> list[Path]:
    """Every trajectory file below ``root`` (a single file counts), sorted."""
    from pipeline.data.naming import parse_run_filename

    if root.is_file():
        return [root]
    files = []
    for p in sorted(root.rglob("*.jsonl")):
        try:
            if parse_run_filename(p.name).is_trajectory_file:
                files.append(p)
        except NamingError:  # not a run file (notes, pair sets): not replayed
            continue
    return files


def replay_file(path: Path, compat: str, report: ReplayReport, toolkits: dict[str, Any]) -> None:
    """Replay every trajectory of one run file into ``report``."""
    from pipeline.data.jsonl import read_jsonl
    from pipeline.emulation.compat import get_compat
    from pipeline.emulation.episode import Episode, Limits
    from pipeline.emulation.runner import advance
    from pipeline.data.toolkit_registry import judged_toolkits

    records = [r for r in read_jsonl(path).records if "intermediate_steps" in r]
    judged_toolkits([r["case"] for r in records], toolkits, str(path))  # an unknown toolkit refuses the file
    c = get_compat(compat)
    limits = Limits(max_steps=c.max_steps, max_attempts=1)
    episodes = []
    for rec in records:
        case = Case.model_validate(rec["case"])
        kits = [toolkits[n] for n in case.toolkits]
        mode = "adversarial" if "underspecifications" in rec else "standard"
        episodes.append(Episode(case_idx=rec["case_idx"], case=case, toolkits=kits, compat=c, limits=limits,
                                mode=mode))
    backend = ReplayBackend(records=records)
    if not c.sorted_unexpected_names:
        for ep in episodes:
            ep.name_order = backend.name_order(ep.case_idx)
    advance(episodes, {"agent": backend, "emulator": backend})
    report.set_orders += sum(backend.reordered.values())
    for rec, ep in zip(records, episodes):
        rebuilt = ep.record({})
        report.total += 1
        report.finish_reasons[rebuilt.get("finish_reason") or "error"] += 1
        diff = first_difference(rec, rebuilt, exact=compat == "study")
        if diff is None:
            report.identical += 1
            continue
        kind, detail = diff
        report.by_kind[kind] += 1
        reason = why(rec, kind, backend.cut[rec["case_idx"]], c.max_steps)
        report.reasons[reason] += 1
        item = {"file": str(path), "case_idx": rec["case_idx"], "kind": kind, "detail": detail, "reason": reason}
        report.examples.setdefault(kind, item)
        report.differences.append(item)


class ReplayConfig(BaseModel):
    """``agentpipe replay``: what to replay and with which engine rules (a check: it writes only its report)."""

    model_config = ConfigDict(extra="forbid")
    stage: ClassVar[str] = "replay"

    runs: Path = Field(description="folder of run files (searched recursively) or one trajectory file",
                       json_schema_extra={"metavar": "DIR"})
    compat: Literal["correct", "study"] = Field(default="study", description="the engine's rules: study (the "
                                                "released runs' own) or correct (how the project's defaults "
                                                "would have ended the same episodes)")
    judgements: bool = Field(default=False, description="replay the recorded judgements instead: every eval file "
                             "under --runs through the replay judge and the parser, compared with the recorded "
                             "scores (--compat does not apply)")
    out: Path | None = Field(default=None, description="write the details (every difference) as JSON here")


def replay_runs(runs: Path, compat: str, files: Iterable[Path] | None = None) -> ReplayReport:
    """Replay every trajectory below ``runs`` (or ``files``) with the engine's ``compat`` rules."""
    from pipeline.data.toolkit_registry import toolkit_registry

    paths = list(files) if files is not None else trajectory_files(Path(runs))
    if not paths:
        raise DataError(f"--runs {runs}: no trajectory files")
    toolkits = toolkit_registry()
    report = ReplayReport(compat=compat)
    for path in paths:
        replay_file(path, compat, report, toolkits)
    if not report.total:  # an empty (or only truncated) file is nothing replayed, not "0 of 0 identical"
        raise DataError(f"--runs {runs}: no trajectories in {len(paths)} trajectory file(s)")
    return report


def format_table(report: ReplayReport) -> str:
    """Differences by kind with one example each, then (when they say more) the reasons."""
    rows = [f"  {kind:<16} {n:>6}  e.g. {report.examples[kind]['file'].rsplit('/', 1)[-1]} case "
            f"{report.examples[kind]['case_idx']}: {report.examples[kind]['detail'][:100]}"
            for kind, n in report.by_kind.most_common()]
    if report.compat != "study" and report.reasons:
        rows.append("  why:")
        rows += [f"  {n:>6}  {reason}" for reason, n in report.reasons.most_common()]
    return "\n".join(rows)


