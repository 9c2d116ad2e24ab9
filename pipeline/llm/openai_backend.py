"""Chat completions over any OpenAI-compatible HTTP endpoint: the OpenAI API, or a local ``vllm serve``.

All requests of a batch run concurrently on one ``AsyncOpenAI`` client, bounded by a semaphore. The SDK's
own retries are off: this backend retries 429 / 5xx / timeouts / connection errors itself (exponential
backoff with full jitter, honouring ``Retry-After``) so that the policy, the attempt count and the logging
are ours. A request that still fails becomes a ``ChatResponse.failure``; ``generate`` never raises for one.

The API key is held as a ``SecretStr``, never logged, never shown in ``repr`` and scrubbed from every error
string as a defence in depth.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import openai
from pydantic import SecretStr

from pipeline.errors import ConfigError
from pipeline.llm.base import ChatBackend, Progress
from pipeline.llm.pricing import cost_usd
from pipeline.llm.spec import ModelSpec
from pipeline.llm.types import ChatRequest, ChatResponse, GenerationConfig
from pipeline.settings import get_settings

log = logging.getLogger("pipeline.llm.openai")

#: Sent when no key is configured but a base URL is (local servers such as ``vllm serve`` accept any key).
PLACEHOLDER_KEY = "EMPTY"
_DEFAULT_BASE_URL = "https://api.openai.com/v1"
_MAX_ERROR_CHARS = 500
# Defence in depth for error strings: anything that looks like a bearer token or an OpenAI secret key.
_SECRET_PATTERNS = (re.compile(r"(?i)(bearer\s+)\S+"), re.compile(r"sk-[A-Za-z0-9_\-]{8,}"))


def _is_reasoning_model(name: str) -> bool:
    """gpt-5* and o-series models: they take ``max_completion_tokens`` and only default sampling settings."""
    return name.startswith("gpt-5") or re.match(r"o\d", name) is not None


def _is_openai_model(name: str) -> bool:
    return name.startswith("gpt-") or _is_reasoning_model(name)


#: Temperatures a reasoning model may be asked for without being sent one: the pipeline's default (0) and the
#: API's own (1). It samples at 1 whatever is asked; any other value would be a setting silently dropped.
_DEFAULT_TEMPERATURES = (0.0, 1.0)


def settings_not_sent(model: str, config: GenerationConfig, *, send_sampling: bool = False,
                      send_stop: bool = False) -> list[str]:
    """The requested settings an OpenAI model is not sent (the model family's rules): temperature and top_p to
    gpt-5*/o-series, which reject them; stop sequences to OpenAI models (the study never sent them; o-series
    reject them). Stages record these in their records (usage ``not_sent``) and fingerprints.
    Raises ``ConfigError`` when one of them is not a default the model applies anyway (a temperature other than
    0 or 1, top_p below 1): leaving it out would change what was asked."""
    name = model.rsplit("/", 1)[-1].lower()
    if config.regex:
        raise ConfigError(f"model '{model}': an API model is not constrained by a regular expression here; "
                          "an API model's structured answers are a JSON schema (GenerationConfig.json_schema)")
    if config.reasoning_effort and _is_openai_model(name) and not _is_reasoning_model(name):
        raise ConfigError(f"model '{model}' is not a reasoning model: it takes no reasoning_effort "
                          f"({config.reasoning_effort}); leave it unset")
    out = []
    if _is_reasoning_model(name) and not send_sampling:
        if config.temperature not in _DEFAULT_TEMPERATURES or config.top_p != 1.0:
            raise ConfigError(f"model '{model}' takes no temperature or top_p (a reasoning model samples at its "
                              f"own temperature 1): temperature {config.temperature:g}, top_p {config.top_p:g} "
                              "cannot be honoured; use temperature 0 (the default) or 1 and top_p 1")
        out += ["temperature", "top_p"]
    if config.stop and _is_openai_model(name) and not send_stop:
        out.append("stop")
    return out


@dataclass
class _Attempt:
    """How one failed attempt is handled."""

    description: str  # one line, e.g. "HTTP 500 (InternalServerError): ..."
    retryable: bool
    retry_after_s: float | None = None


class OpenAIBackend(ChatBackend):
    """A model behind an OpenAI-compatible ``/v1/chat/completions`` endpoint."""

    #: The study never sent stop sequences to OpenAI models (gpt-*, o-series, which also reject them);
    #: set True to send them anyway. Other models (e.g. served by vLLM) always get them.
    send_stop_to_gpt: bool = False
    #: gpt-5*/o-series reject non-default temperature/top_p, so they are left out for those models;
    #: set True to send them anyway (e.g. for a model version that accepts them).
    send_sampling_to_reasoning: bool = False

    def __init__(
        self,
        spec: ModelSpec,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        concurrency: int = 16,
        max_retries: int | None = None,
        timeout_s: float | None = None,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
    ) -> None:
        if spec.adapter:
            raise ConfigError(f"openai backend: model '{spec.raw}' has an adapter; adapters need hf or vllm")
        settings = get_settings()
        # unset: the settings' (AGENTPIPE_API_RETRIES, AGENTPIPE_API_TIMEOUT_S; 6 and 300 s by default)
        max_retries = settings.api_retries if max_retries is None else max_retries
        timeout_s = settings.api_timeout_s if timeout_s is None else timeout_s
        if concurrency < 1:
            raise ConfigError(f"openai backend: concurrency must be >= 1, got {concurrency}")
        if max_retries < 0:
            raise ConfigError(f"openai backend: max_retries must be >= 0, got {max_retries}")
        if not timeout_s > 0:
            raise ConfigError(f"openai backend: timeout_s must be > 0, got {timeout_s}")
        if backoff_base_s < 0 or backoff_max_s < 0:
            raise ConfigError("openai backend: backoff_base_s and backoff_max_s must be >= 0")
        self.spec = spec
        self.revision = spec.model
        self.base_url: str | None = (base_url if base_url is not None else settings.openai_base_url) or None
        if not api_key and settings.openai_api_key is not None:
            api_key = settings.openai_api_key.get_secret_value()
        if not api_key:
            if self.base_url is None:
                raise ConfigError("openai backend: set OPENAI_API_KEY in the environment, or a base URL "
                                  "(AGENTPIPE_OPENAI_BASE_URL) for a local OpenAI-compatible server")
            api_key = PLACEHOLDER_KEY
        self._api_key = SecretStr(api_key)
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.timeout_s = float(timeout_s)
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self._name = spec.model.rsplit("/", 1)[-1].lower()  # "openai/gpt-4o" → "gpt-4o" for family checks

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.spec.model!r}, base_url={_public_url(self.base_url)!r})"

    @property
    def public_url(self) -> str:
        """The base URL, without credentials (safe to record)."""
        return _public_url(self.base_url)

    def sync_client(self) -> openai.OpenAI:
        """A synchronous client with this backend's key, base URL and timeout (the Batch API's calls)."""
        return openai.OpenAI(api_key=self._api_key.get_secret_value(), base_url=self.base_url,
                             max_retries=self.max_retries, timeout=self.timeout_s)

    # ---- public API -------------------------------------------------------------------------------------

    def not_sent(self, config: GenerationConfig) -> list[str]:
        """The settings of ``config`` this model is not sent (``settings_not_sent``; raises for a refused one)."""
        return settings_not_sent(self.spec.model, config, send_sampling=self.send_sampling_to_reasoning,
                                 send_stop=self.send_stop_to_gpt)

    def generate(self, requests: Sequence[ChatRequest], progress: Progress | None = None) -> list[ChatResponse]:
        """Responses in the order of ``requests``; callable from sync code, also inside a running loop. A
        setting the model does not take and that is not its default raises ``ConfigError`` before any call."""
        batch = list(requests)
        if not batch:
            return []
        for r in batch:
            self.not_sent(r.config)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.agenerate(batch, progress))
        # A loop already runs in this thread (a notebook, an async caller): it cannot be re-entered, so the
        # batch runs on a fresh loop in a worker thread while this thread waits.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="openai-backend") as pool:
            return pool.submit(asyncio.run, self.agenerate(batch, progress)).result()

    async def agenerate(self, requests: Sequence[ChatRequest], progress: Progress | None = None
                        ) -> list[ChatResponse]:
        """The async form of ``generate`` (``progress`` is called on the event loop's thread)."""
        batch = list(requests)
        if not batch:
            return []
        semaphore = asyncio.Semaphore(self.concurrency)
        done = 0

        # One client per batch: its connection pool belongs to the event loop that runs the batch.
        async with openai.AsyncOpenAI(api_key=self._api_key.get_secret_value(), base_url=self.base_url,
                                      max_retries=0, timeout=self.timeout_s) as client:

            async def one(request: ChatRequest) -> ChatResponse:
                nonlocal done
                async with semaphore:
                    response = await self._complete(client, request)
                done += 1
                if progress is not None:
                    progress(done, len(batch))
                return response

            return list(await asyncio.gather(*(one(r) for r in batch)))

    # ---- one request --------------------------------------------------------------------------------------

    def request_kwargs(self, request: ChatRequest) -> dict[str, Any]:
        """The ``chat.completions.create`` arguments for one request (model-family rules applied)."""
        cfg = request.config
        reasoning = _is_reasoning_model(self._name)
        kwargs: dict[str, Any] = {"model": self.spec.model, "messages": list(request.messages)}
        if not reasoning or self.send_sampling_to_reasoning:
            kwargs["temperature"] = cfg.temperature
            kwargs["top_p"] = cfg.top_p
        if cfg.max_new_tokens is not None:
            kwargs["max_completion_tokens" if reasoning else "max_tokens"] = cfg.max_new_tokens
        if cfg.seed is not None:
            kwargs["seed"] = cfg.seed
        if cfg.stop and (self.send_stop_to_gpt or not _is_openai_model(self._name)):
            kwargs["stop"] = list(cfg.stop)
        if cfg.reasoning_effort:  # a non-reasoning OpenAI model was refused (settings_not_sent)
            kwargs["reasoning_effort"] = cfg.reasoning_effort
        if cfg.json_schema:  # structured outputs: the answer is JSON of this schema
            kwargs["response_format"] = {"type": "json_schema", "json_schema": json.loads(cfg.json_schema)}
        return kwargs

    async def _complete(self, client: openai.AsyncOpenAI, request: ChatRequest) -> ChatResponse:
        kwargs = self.request_kwargs(request)
        not_sent = tuple(self.not_sent(request.config))
        start = time.monotonic()
        attempts = self.max_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                # The SDK timeout bounds each network phase; this bounds the whole attempt (a slow trickle too).
                async with asyncio.timeout(self.timeout_s):
                    raw = await client.chat.completions.with_raw_response.create(**kwargs)
                body = raw.http_response.text
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure becomes a failure response
                outcome = self._classify(exc)
            else:
                response = self.parse_body(body, latency_s=time.monotonic() - start)
                response.not_sent = not_sent
                return response
            if not outcome.retryable or attempt == attempts:
                tries = f" after {attempt} attempts" if attempt > 1 else ""
                error = self.scrub(f"{outcome.description}{tries}")
                log.warning("%s: request failed: %s", self.spec.model, error)
                return ChatResponse.failure(error, latency_s=time.monotonic() - start)
            delay = self._backoff(attempt, outcome.retry_after_s)
            log.info("%s: attempt %d/%d failed (%s); retrying in %.2fs", self.spec.model, attempt, attempts,
                     self.scrub(outcome.description), delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns")

    def _backoff(self, attempt: int, retry_after_s: float | None) -> float:
        """Full jitter (uniform in [0, base·2^(attempt-1)], capped), or the server's Retry-After (capped)."""
        if retry_after_s is not None:
            return min(max(retry_after_s, 0.0), self.backoff_max_s)
        return random.uniform(0.0, min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1)))

    def _classify(self, exc: Exception) -> _Attempt:
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            # 408 is a server-side timeout; 429 a rate limit; 5xx an overloaded or failing server.
            retryable = status in (408, 429) or status >= 500
            return _Attempt(f"HTTP {status} ({type(exc).__name__}): {_one_line(exc.message)}", retryable,
                            _retry_after(exc.response.headers))
        if isinstance(exc, (openai.APITimeoutError, TimeoutError)):
            return _Attempt(f"timeout after {self.timeout_s:g}s ({type(exc).__name__})", True)
        if isinstance(exc, openai.APIConnectionError):
            cause = f" ({type(exc.__cause__).__name__})" if exc.__cause__ is not None else ""
            return _Attempt(f"connection error: {type(exc).__name__}{cause}: {_one_line(exc.message)}", True)
        return _Attempt(f"{type(exc).__name__}: {_one_line(str(exc))}", False)

    def parse_body(self, body: str, latency_s: float, *, batch: bool = False) -> ChatResponse:
        """Turn a 200 body into a response; anything unexpected is a failure, never an exception. ``batch``:
        the answer came through the Batch API (priced at its rate)."""
        try:
            data = json.loads(body)
        except ValueError:
            return self._malformed("not JSON", body, latency_s)
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return self._malformed("no choices", body, latency_s)
        choice = choices[0]
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        prompt_tokens, completion_tokens = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
        details = usage.get("prompt_tokens_details") if isinstance(usage.get("prompt_tokens_details"), dict) else {}
        cached_tokens = min(_count(details.get("cached_tokens")), prompt_tokens)
        # The served id (often dated, e.g. gpt-4o-mini-2024-07-18) prices snapshots exactly; else the requested one.
        model = data.get("model") if isinstance(data.get("model"), str) and data.get("model") else self.spec.model
        finish = choice.get("finish_reason")
        cost = cost_usd(model, prompt_tokens, completion_tokens, cached_tokens=cached_tokens, batch=batch)
        return ChatResponse(
            text=content if isinstance(content, str) else "",
            finish_reason=finish if isinstance(finish, str) else None,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            latency_s=latency_s,
            cost_usd=cost,
            unpriced=cost is None,  # not in the price table: unknown, not free
            cached_prompt_tokens=cached_tokens,
            batch=batch,
        )

    def _malformed(self, what: str, body: str, latency_s: float) -> ChatResponse:
        error = self.scrub(f"malformed response ({what}): {_one_line(body)[:200]!r}")
        log.warning("%s: %s", self.spec.model, error)
        return ChatResponse.failure(error, latency_s=latency_s)

    def scrub(self, text: str) -> str:
        """One line, bounded, with the key (and anything key-like) redacted."""
        key = self._api_key.get_secret_value()
        if key and key != PLACEHOLDER_KEY:
            text = text.replace(key, "[REDACTED]")
        text = _SECRET_PATTERNS[0].sub(r"\1[REDACTED]", text)
        text = _SECRET_PATTERNS[1].sub("[REDACTED]", text)
        text = _one_line(text)
        return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 1] + "…"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _retry_after(headers: Any) -> float | None:
    """Seconds from ``retry-after-ms`` or ``Retry-After`` (numeric form; an HTTP date falls back to backoff)."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue
        if seconds >= 0 and seconds == seconds:  # not NaN
            return seconds
    return None


def _public_url(url: str | None) -> str:
    """The base URL without any ``user:password@`` part."""
    if not url:
        return _DEFAULT_BASE_URL
    parts = urlsplit(url)
    if "@" in parts.netloc:
        parts = parts._replace(netloc=parts.netloc.rsplit("@", 1)[1])
    return urlunsplit(parts)
