"""The request/response types every LLM backend shares."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}

#: Bumped whenever ``request_seed`` or a backend's use of a request's seed changes which tokens a sampled request
#: draws; stages that sample put it in their fingerprint's versions, so earlier sampled outputs count as another
#: configuration instead of being mixed with new ones. 2: one seed per request (hash of the stage's seed and the
#: request), drawn by each request alone (HF: a generator per row), whatever batch it is answered in.
SAMPLING_VERSION = 2


def request_seed(seed: int, *parts: Any) -> int:
    """The sampling seed of one request: a 63-bit hash of the stage's seed and what identifies the request (role,
    case, replicate, messages…), so a sampled answer depends on (seed, request) only, never on the batch it ran
    in. 63 bits: every backend (torch, vLLM, the OpenAI API's int64) takes it."""
    text = json.dumps([seed, *parts], sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate one completion. ``max_new_tokens=None`` means the backend's default cap."""

    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    #: the answer must match this regular expression (structured outputs, on engines that constrain decoding:
    #: vLLM); None: free text
    regex: str | None = None
    #: the answer must be JSON of this schema (an OpenAI ``response_format`` ``json_schema`` object, as JSON text:
    #: APIs that support structured outputs); None: free text
    json_schema: str | None = None
    #: how much a reasoning model reasons before answering (``minimal``/``low``/``medium``/``high``; OpenAI's
    #: reasoning models only: ``settings_not_sent`` refuses it for others); None: the model's default
    reasoning_effort: str | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        object.__setattr__(self, "stop", tuple(self.stop))

    def as_dict(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "stop": list(self.stop), "seed": self.seed, **({"regex": self.regex} if self.regex else {}),
                **({"reasoning_effort": self.reasoning_effort} if self.reasoning_effort else {}),
                **({"json_schema": self.json_schema} if self.json_schema else {})}


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion to make. ``replicate`` distinguishes repeated samples of the same prompt (it is
    part of the cache key); ``tag`` is free caller data (e.g. the case index) and is not. ``adapter``: a LoRA
    adapter folder to answer this request with, on a local backend serving its base model (requests for the base
    and for several adapters then run in one batch); None = the backend's own spec. ``role``: which part of the
    study the request plays (set by the stage that makes it; a replay answers by it); not in the cache key, as
    a live model's answer depends on the messages alone."""

    messages: list[Message]
    config: GenerationConfig = field(default_factory=GenerationConfig)
    replicate: int = 0
    tag: Any = None
    adapter: str | None = None
    role: Literal["agent", "emulator", "judge"] | None = None


@dataclass
class ChatResponse:
    """The result of one request. A failed request has ``error`` set and empty ``text``; it never raises."""

    text: str
    finish_reason: str | None = None  # "stop" (EOS or a stop sequence), "length", "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    error: str | None = None
    #: USD at list price; None for local models (no USD cost) and for API models missing from the price table,
    #: which are also ``unpriced`` (their cost is unknown, never 0)
    cost_usd: float | None = None
    cached: bool = False
    unpriced: bool = False
    #: requested settings the backend did not send (an API model family that does not take them)
    not_sent: tuple[str, ...] = ()
    #: prompt tokens the API served from its prompt cache (priced at the cached-input rate)
    cached_prompt_tokens: int = 0
    #: answered through the Batch API (priced at the batch rate)
    batch: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def failure(cls, error: str, latency_s: float = 0.0) -> ChatResponse:
        return cls(text="", finish_reason="error", error=error, latency_s=latency_s)

    def usage(self) -> dict[str, Any]:
        """The fields stages copy into their records (``unpriced`` only on an API call of unknown price)."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "latency_s": round(self.latency_s, 4), "cost_usd": self.cost_usd, "cached": self.cached,
                **({"unpriced": True} if self.unpriced else {}),
                **({"not_sent": list(self.not_sent)} if self.not_sent else {}),
                **({"cached_prompt_tokens": self.cached_prompt_tokens} if self.cached_prompt_tokens else {}),
                **({"batch": True} if self.batch else {})}
