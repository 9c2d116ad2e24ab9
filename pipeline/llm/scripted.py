"""TEST DOUBLE: a deterministic scripted chat model for tests of the stages. Never a default.

``scripted:<name>`` selects a responder registered with ``register_script``: a function from a request to
the reply text. The roles' doubles register themselves with the stages that use them (``scripted:agent`` and
``scripted:emulator`` with emulation, ``scripted:judge`` with evaluation); ``scripted:echo`` is here. The backend
counts its calls so tests can assert on them (e.g. zero calls on a cache hit).

Options in the spec (``scripted:agent?delay=0.4``) give tests of interruptions and outages a double that is
slow or down, in any process the spec reaches (a CLI run, an Airflow task, a Slurm job):

* ``delay=<seconds>``: every batched call sleeps that long first;
* ``fail_while=<path>``: every request fails while the file ``<path>`` exists (an outage that a test ends by
  removing the file, so that the same command's rerun completes).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.llm.base import ChatBackend, Progress
from pipeline.llm.spec import ModelSpec
from pipeline.llm.types import ChatRequest, ChatResponse

Responder = Callable[[ChatRequest], str]
_SCRIPTS: dict[str, Responder] = {}
_OPTIONS = ("delay", "fail_while")


def register_script(name: str, responder: Responder) -> None:
    """Make ``scripted:<name>`` answer with ``responder(request)``."""
    _SCRIPTS[name] = responder


def _echo(request: ChatRequest) -> str:
    return next((m["content"] for m in reversed(request.messages) if m["role"] == "user"), "")


register_script("echo", _echo)


class ScriptedBackend(ChatBackend):
    """Answers from a registered script; a responder that raises fails only its own request."""

    def __init__(self, spec: ModelSpec, responder: Responder | None = None) -> None:
        self.spec = spec
        if responder is None:
            if spec.model not in _SCRIPTS:
                raise ConfigError(f"model spec '{spec.raw}': no test-double script named '{spec.model}' "
                                  f"(registered: {', '.join(sorted(_SCRIPTS))})")
            responder = _SCRIPTS[spec.model]
        self.responder = responder
        self.delay_s, self.fail_while = _read_options(spec)
        self.revision = f"scripted:{spec.model}"
        self.calls = 0  # requests answered
        self.batches = 0  # generate() calls

    def generate(self, requests: Sequence[ChatRequest], progress: Progress | None = None) -> list[ChatResponse]:
        self.batches += 1
        time.sleep(self.delay_s)
        down = self.fail_while is not None and self.fail_while.exists()
        out = []
        for i, r in enumerate(requests):
            self.calls += 1
            t0 = time.perf_counter()
            try:
                if r.config.regex or r.config.json_schema:
                    raise ValueError("the scripted double does not constrain answers (regex)")
                if down:
                    raise ConnectionError(f"scripted outage (while {self.fail_while} exists)")
                text = self.responder(r)
            except Exception as e:  # noqa: BLE001 - a test double's error is a failed response, as a real backend's
                out.append(ChatResponse.failure(f"{type(e).__name__}: {e}"))
            else:
                for s in r.config.stop:
                    if s in text:
                        text = text[: text.index(s)]
                words = sum(len(m["content"].split()) for m in r.messages)
                out.append(ChatResponse(text=text, finish_reason="stop", prompt_tokens=words,
                                        completion_tokens=len(text.split()), latency_s=time.perf_counter() - t0))
            if progress:
                progress(i + 1, len(requests))
        return out


def _read_options(spec: ModelSpec) -> tuple[float, Path | None]:
    """``delay`` (seconds, ≥ 0) and ``fail_while`` (a path) from the spec's options; anything else is refused."""
    delay, fail_while = 0.0, None
    keys = [key for key, _ in spec.options]
    if len(set(keys)) < len(keys):
        raise ConfigError(f"model spec '{spec.raw}': each test-double option once, got {', '.join(keys)}")
    for key, value in spec.options:
        if key == "delay":
            try:
                delay = float(value)
            except ValueError:
                delay = -1.0
            if not 0 <= delay < math.inf:
                raise ConfigError(f"model spec '{spec.raw}': delay={value}: expected seconds (a number ≥ 0)")
        elif key == "fail_while" and value:
            fail_while = Path(value)
        else:
            raise ConfigError(f"model spec '{spec.raw}': unknown or empty test-double option '{key}' (expected "
                              f"{' or '.join(o + '=…' for o in _OPTIONS)})")
    return delay, fail_while
