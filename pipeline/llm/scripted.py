"""TEST DOUBLE: a deterministic scripted chat model for tests of the stages. Never a default.

``scripted:<name>`` selects a responder registered with ``register_script``: a function from a request to
the reply text. The backend counts its calls so tests can assert on them (e.g. zero calls on a cache hit).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

from pipeline.errors import ConfigError
from pipeline.llm.base import ChatBackend, Progress
from pipeline.llm.spec import ModelSpec
from pipeline.llm.types import ChatRequest, ChatResponse

Responder = Callable[[ChatRequest], str]
_SCRIPTS: dict[str, Responder] = {}
#: Modules that register role doubles (imported on first use, so ``scripted:agent`` works in any process).
_DOUBLE_MODULES = ("pipeline.emulation.doubles", "pipeline.evaluation.doubles")


def register_script(name: str, responder: Responder) -> None:
    """Make ``scripted:<name>`` answer with ``responder(request)``."""
    _SCRIPTS[name] = responder


def _echo(request: ChatRequest) -> str:
    return next((m["content"] for m in reversed(request.messages) if m["role"] == "user"), "")


register_script("echo", _echo)


def _import_doubles() -> None:
    import importlib

    for name in _DOUBLE_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not name.startswith(e.name):  # a real import error inside the module
                raise


class ScriptedBackend(ChatBackend):
    """Answers from a registered script; a responder that raises fails only its own request."""

    def __init__(self, spec: ModelSpec, responder: Responder | None = None) -> None:
        self.spec = spec
        if responder is None:
            if spec.model not in _SCRIPTS:
                _import_doubles()
            if spec.model not in _SCRIPTS:
                raise ConfigError(f"model spec '{spec.raw}': no test-double script named '{spec.model}' "
                                  f"(registered: {', '.join(sorted(_SCRIPTS))})")
            responder = _SCRIPTS[spec.model]
        self.responder = responder
        self.revision = f"scripted:{spec.model}"
        self.calls = 0  # requests answered
        self.batches = 0  # generate() calls

    def generate(self, requests: Sequence[ChatRequest], progress: Progress | None = None) -> list[ChatResponse]:
        self.batches += 1
        # tests that must interrupt a run part-way slow the double down (seconds per batch); tests of an outage
        # make every request fail (AGENTPIPE_SCRIPTED_DOWN=1)
        time.sleep(float(os.environ.get("AGENTPIPE_SCRIPTED_DELAY", "0")))
        down = os.environ.get("AGENTPIPE_SCRIPTED_DOWN") == "1"
        out = []
        for i, r in enumerate(requests):
            self.calls += 1
            t0 = time.perf_counter()
            try:
                if down:
                    raise ConnectionError("scripted outage (AGENTPIPE_SCRIPTED_DOWN=1)")
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
