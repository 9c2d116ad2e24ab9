"""The OpenAI-compatible backend against a real HTTP server on 127.0.0.1, and the price table.

The server answers ``POST /v1/chat/completions`` from per-test scripts keyed by the last user message (the
"marker"), so concurrent requests get deterministic replies; it counts calls, records request bodies and
headers, and tracks the most requests in flight at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import ConfigError
from pipeline.llm import pricing
from pipeline.llm.openai_backend import OpenAIBackend
from pipeline.llm.spec import parse_model_spec
from pipeline.llm.types import ChatRequest, ChatResponse, GenerationConfig

KEY = "sk-test-SECRET-123"


# ---- the fake server --------------------------------------------------------------------------------------


@dataclass
class Reply:
    """One scripted answer. ``body=None`` → a normal completion echoing the marker."""

    status: int = 200
    body: str | dict | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


class FakeOpenAI:
    def __init__(self) -> None:
        self.url = ""
        self.lock = threading.Lock()
        self.stop = threading.Event()  # wakes sleeping handlers at teardown
        self.scripts: dict[str, list[Reply]] = {}
        self.calls: Counter[str] = Counter()
        self.bodies: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.auth_headers: list[str | None] = []
        self.in_flight = 0
        self.max_in_flight = 0

    def script(self, marker: str, *replies: Reply) -> None:
        """Replies in order for requests whose last message is ``marker``; the last one repeats."""
        self.scripts[marker] = list(replies)

    def next_reply(self, marker: str) -> Reply:
        with self.lock:
            queue = self.scripts.get(marker)
            if not queue:
                return Reply()
            return queue.pop(0) if len(queue) > 1 else queue[0]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real API
    server: Any

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def do_POST(self) -> None:
        fake: FakeOpenAI = self.server.fake
        payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        if self.path != "/v1/chat/completions":
            self._send(Reply(404, {"error": {"message": f"no route {self.path}"}}), payload)
            return
        marker = payload["messages"][-1]["content"]
        with fake.lock:
            fake.calls[marker] += 1
            fake.bodies[marker].append(payload)
            fake.auth_headers.append(self.headers.get("Authorization"))
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
        try:
            reply = fake.next_reply(marker)
            if reply.delay_s:
                fake.stop.wait(reply.delay_s)
            self._send(reply, payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout): expected in the timeout tests
        finally:
            with fake.lock:
                fake.in_flight -= 1

    def _send(self, reply: Reply, payload: dict[str, Any]) -> None:
        body = reply.body
        if body is None:
            body = completion(f"echo: {payload['messages'][-1]['content']}", model=payload["model"],
                              usage={"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15})
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No real key, base URL, price override or proxy from the developer's environment."""
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "AGENTPIPE_OPENAI_BASE_URL", "AGENTPIPE_PRICES",
                "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    yield


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.fake = fake  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{httpd.server_port}/v1"
    yield fake
    fake.stop.set()
    httpd.shutdown()
    httpd.server_close()


def make(url: str, model: str = "openai:gpt-4o-mini", **kw: Any) -> OpenAIBackend:
    kw = {"max_retries": 2, "backoff_base_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 5.0, **kw}
    return OpenAIBackend(parse_model_spec(model), base_url=url, api_key=kw.pop("api_key", KEY), **kw)


def req(marker: str, **config: Any) -> ChatRequest:
    return ChatRequest(messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": marker}],
                       config=GenerationConfig(**config))


def completion(content: str | None, *, model: str = "gpt-4o-mini", usage: dict | None = None,
               finish: str = "stop") -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "finish_reason": finish, "message": {"role": "assistant", "content": content}}],
            "usage": usage or {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


# ---- success path -----------------------------------------------------------------------------------------


def test_success_fills_text_usage_cost_and_sends_the_key(server: FakeOpenAI, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"models": {"gpt-4o-mini": {"input": 1.0, "output": 2.0}}}))
    monkeypatch.setenv("AGENTPIPE_PRICES", str(prices))
    server.script("hi", Reply(body=completion("hello there", model="gpt-4o-mini-2024-07-18", finish="length",
                                              usage={"prompt_tokens": 1000, "completion_tokens": 500})))
    [r] = make(server.url).generate([req("hi")])
    assert r.ok and r.text == "hello there" and r.finish_reason == "length"
    assert (r.prompt_tokens, r.completion_tokens) == (1000, 500)
    # dated served id → gpt-4o-mini entry of the override file: (1000·1 + 500·2) / 1e6
    assert r.cost_usd == pytest.approx(0.002)
    assert 0 < r.latency_s < 5 and not r.cached
    assert server.calls["hi"] == 1 and server.auth_headers == [f"Bearer {KEY}"]


def test_null_content_is_empty_text_and_unknown_model_has_no_cost(server: FakeOpenAI) -> None:
    server.script("q", Reply(body=completion(None, model="my-local-model")))
    [r] = make(server.url, "openai:my-local-model").generate([req("q")])
    assert r.ok and r.text == "" and r.cost_usd is None and r.prompt_tokens == 1


def test_request_parameters_follow_the_model_family(server: FakeOpenAI) -> None:
    cfg = {"max_new_tokens": 64, "temperature": 0.7, "top_p": 0.9, "stop": ("\nObservation:",), "seed": 3}
    make(server.url, "openai:gpt-4o-mini").generate([req("gpt4", **cfg)])
    make(server.url, "openai:gpt-5-mini").generate([req("gpt5", **{**cfg, "temperature": 0.0, "top_p": 1.0})])
    with pytest.raises(ConfigError, match="gpt-5-mini' takes no temperature or top_p"):
        make(server.url, "openai:gpt-5-mini").generate([req("gpt5-refused", **cfg)])
    assert not server.calls["gpt5-refused"]
    make(server.url, "openai:Qwen/Qwen3-8B").generate([req("qwen", **cfg)])
    make(server.url, "openai:gpt-4o-mini").generate([req("defaults")])
    gpt4, gpt5, qwen, defaults = (server.bodies[m][0] for m in ("gpt4", "gpt5", "qwen", "defaults"))
    assert gpt4["model"] == "gpt-4o-mini" and gpt4["messages"][-1] == {"role": "user", "content": "gpt4"}
    assert (gpt4["max_tokens"], gpt4["temperature"], gpt4["top_p"], gpt4["seed"]) == (64, 0.7, 0.9, 3)
    assert "stop" not in gpt4 and "max_completion_tokens" not in gpt4  # the study never sent stop to gpt-*
    assert gpt5["max_completion_tokens"] == 64 and gpt5["seed"] == 3
    assert not {"max_tokens", "temperature", "top_p", "stop"} & gpt5.keys()  # gpt-5 rejects these
    assert qwen["model"] == "Qwen/Qwen3-8B" and qwen["stop"] == ["\nObservation:"] and qwen["max_tokens"] == 64
    assert not {"max_tokens", "max_completion_tokens", "seed", "stop"} & defaults.keys()
    backend = make(server.url, "openai:gpt-4o-mini")
    backend.send_stop_to_gpt = True
    backend.generate([req("gpt4-stop", **cfg)])
    assert server.bodies["gpt4-stop"][0]["stop"] == ["\nObservation:"]


def test_placeholder_key_for_a_local_server_without_a_key(server: FakeOpenAI) -> None:
    backend = OpenAIBackend(parse_model_spec("openai:Qwen/Qwen3-8B"), base_url=server.url)
    assert backend.generate([req("x")])[0].ok
    assert server.auth_headers == ["Bearer EMPTY"]


def test_base_url_and_key_come_from_settings(server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTPIPE_OPENAI_BASE_URL", server.url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    backend = OpenAIBackend(parse_model_spec("gpt-4o-mini"), backoff_base_s=0.01)
    assert backend.generate([req("x")])[0].text == "echo: x"
    assert server.auth_headers == [f"Bearer {KEY}"]


# ---- retries ----------------------------------------------------------------------------------------------


def test_429_then_200_is_retried(server: FakeOpenAI) -> None:
    server.script("r", Reply(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"}), Reply())
    [r] = make(server.url).generate([req("r")])
    assert r.ok and r.text == "echo: r" and server.calls["r"] == 2


def test_retry_after_is_honoured_and_capped(server: FakeOpenAI) -> None:
    server.script("wait", Reply(429, {"error": {"message": "later"}}, {"Retry-After": "0.4"}), Reply())
    [r] = make(server.url, backoff_max_s=5.0).generate([req("wait")])
    assert r.ok and server.calls["wait"] == 2 and r.latency_s >= 0.4  # waited as told, not the 0.01 s backoff
    server.script("long", Reply(429, {"error": {"message": "later"}}, {"Retry-After": "30"}), Reply())
    t0 = time.monotonic()
    [r] = make(server.url, backoff_max_s=0.05).generate([req("long")])
    assert r.ok and server.calls["long"] == 2 and time.monotonic() - t0 < 3  # capped at backoff_max_s


def test_persistent_500_fails_after_max_retries(server: FakeOpenAI) -> None:
    server.script("boom", Reply(500, {"error": {"message": "upstream exploded", "type": "server_error"}}))
    [r] = make(server.url, max_retries=3).generate([req("boom")])
    assert not r.ok and r.finish_reason == "error" and r.text == ""
    assert server.calls["boom"] == 4  # max_retries + 1
    assert "HTTP 500" in r.error and "after 4 attempts" in r.error and "\n" not in r.error


def test_400_is_not_retried(server: FakeOpenAI) -> None:
    server.script("bad", Reply(400, {"error": {"message": "context too long", "type": "invalid_request_error"}}))
    [r] = make(server.url, max_retries=5).generate([req("bad")])
    assert not r.ok and server.calls["bad"] == 1
    assert "HTTP 400" in r.error and "BadRequestError" in r.error and "context too long" in r.error


def test_a_hang_times_out_quickly(server: FakeOpenAI) -> None:
    server.script("hang", Reply(delay_s=2.0))
    t0 = time.monotonic()
    [r] = make(server.url, timeout_s=0.5, max_retries=1).generate([req("hang")])
    elapsed = time.monotonic() - t0
    assert not r.ok and "timeout" in r.error.lower() and "after 2 attempts" in r.error
    assert server.calls["hang"] == 2
    assert elapsed < 1.9  # two 0.5 s attempts, not two 2 s waits


def test_a_server_that_never_answers_is_bounded_by_the_api_settings(server: FakeOpenAI) -> None:
    """AGENTPIPE_API_TIMEOUT_S and AGENTPIPE_API_RETRIES bound a hung server through the command line (not
    300 s × 7 attempts), and --help documents them."""
    from tests.conftest import run_agentpipe

    server.script("never", Reply(delay_s=3600))
    env = {"AGENTPIPE_OPENAI_BASE_URL": server.url, "AGENTPIPE_API_TIMEOUT_S": "0.5", "AGENTPIPE_API_RETRIES": "2"}
    t0 = time.monotonic()
    p = run_agentpipe("llm", "chat", "never", "--model", "openai:gpt-4o-mini", env=env)
    assert time.monotonic() - t0 < 20
    assert p.returncode == 1 and "timeout after 0.5s" in p.stderr and "after 3 attempts" in p.stderr, p.stderr
    assert server.calls["never"] == 3
    bad = run_agentpipe("llm", "chat", "x", "--model", "openai:gpt-4o-mini", env={**env, "AGENTPIPE_API_RETRIES": "-1"})
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "AGENTPIPE_API_RETRIES" in bad.stderr, bad.stderr
    helptext = " ".join(run_agentpipe("--help").stdout.split())
    assert "AGENTPIPE_API_TIMEOUT_S" in helptext and "AGENTPIPE_API_RETRIES" in helptext


def test_api_settings_are_the_backend_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTPIPE_API_TIMEOUT_S", "12.5")
    monkeypatch.setenv("AGENTPIPE_API_RETRIES", "0")
    backend = OpenAIBackend(parse_model_spec("openai:gpt-4o-mini"), base_url="http://127.0.0.1:9/v1")
    assert (backend.timeout_s, backend.max_retries) == (12.5, 0)
    assert make("http://127.0.0.1:9/v1", timeout_s=3, max_retries=4).max_retries == 4  # explicit options win


def test_connection_refused_is_retried_then_fails() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    [r] = make(f"http://127.0.0.1:{port}/v1", max_retries=2).generate([req("x")])
    assert not r.ok and "connection error" in r.error and "after 3 attempts" in r.error


@pytest.mark.parametrize("body", ["not json", {"id": "x", "object": "chat.completion"}, {"choices": []},
                                  ["a", "list"]])
def test_malformed_body_is_a_failure(server: FakeOpenAI, body: Any) -> None:
    server.script("m", Reply(200, body))
    [r] = make(server.url).generate([req("m")])
    assert not r.ok and r.error.startswith("malformed response") and server.calls["m"] == 1


# ---- batches ----------------------------------------------------------------------------------------------


def test_one_failure_never_fails_the_batch(server: FakeOpenAI) -> None:
    server.script("bad", Reply(400, {"error": {"message": "nope"}}))
    server.script("junk", Reply(200, "not json"))
    server.script("flaky", Reply(503, {"error": {"message": "busy"}}), Reply())
    server.script("dead", Reply(500, {"error": {"message": "down"}}))
    markers = ["a", "bad", "b", "junk", "flaky", "dead", "c"]
    seen: list[tuple[int, int]] = []
    out = make(server.url).generate([req(m) for m in markers], progress=lambda d, t: seen.append((d, t)))
    assert [r.ok for r in out] == [True, False, True, False, True, False, True]
    assert [r.text for r in out if r.ok] == ["echo: a", "echo: b", "echo: flaky", "echo: c"]  # in request order
    assert "HTTP 400" in out[1].error and "malformed" in out[3].error and "HTTP 500" in out[5].error
    assert all(isinstance(r, ChatResponse) for r in out)
    assert seen == [(i, len(markers)) for i in range(1, len(markers) + 1)]


def test_concurrency_bound_is_respected(server: FakeOpenAI) -> None:
    markers = [f"slow{i}" for i in range(6)]
    for m in markers:
        server.script(m, Reply(delay_s=0.25))
    out = make(server.url, concurrency=2).generate([req(m) for m in markers])
    assert all(r.ok for r in out) and server.max_in_flight == 2
    out = make(server.url, concurrency=16).generate([req(m) for m in markers])
    assert all(r.ok for r in out) and server.max_in_flight == 6  # and they do run in parallel when allowed


def test_generate_works_inside_a_running_event_loop(server: FakeOpenAI) -> None:
    backend = make(server.url)

    async def caller() -> list[ChatResponse]:
        return backend.generate([req("one"), req("two")])  # sync call from async code

    assert [r.text for r in asyncio.run(caller())] == ["echo: one", "echo: two"]
    assert backend.generate([]) == []


# ---- the key never leaks ----------------------------------------------------------------------------------


def test_the_key_never_leaks(server: FakeOpenAI, caplog: pytest.LogCaptureFixture,
                             capfd: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("openai", "httpx", "httpx2", "httpcore", "httpcore2", "pipeline.llm.openai"):
        caplog.set_level(logging.DEBUG, logger=name)
    # The real API echoes (part of) a rejected key in 401 bodies; this one echoes all of it.
    server.script("auth", Reply(401, {"error": {"message": f"Incorrect API key provided: {KEY}. Bearer {KEY}"}}))
    server.script("rate", Reply(429, {"error": {"message": f"rate limited for key {KEY}"}}, {"Retry-After": "0"}))
    server.script("junk", Reply(200, f"<html>Authorization: Bearer {KEY}</html>"))
    server.script("ok", Reply())
    backend = make(server.url, max_retries=1)
    out = backend.generate([req(m) for m in ("auth", "rate", "junk", "ok")])
    assert [r.ok for r in out] == [False, False, False, True]
    for r in out:
        assert KEY not in (r.error or "") and "SECRET" not in (r.error or "")
    assert "HTTP 401" in out[0].error and "[REDACTED]" in out[0].error
    assert server.calls["rate"] == 2 and server.auth_headers.count(f"Bearer {KEY}") == 5  # the key was sent
    retry_logs = [rec for rec in caplog.records if rec.name == "pipeline.llm.openai" and "retrying" in rec.message]
    assert retry_logs, "expected the retry to be logged"
    assert caplog.records and all(KEY not in rec.getMessage() and KEY not in str(rec.args) for rec in caplog.records)
    assert KEY not in caplog.text
    assert KEY not in repr(backend) and KEY not in str(backend) and KEY not in repr(vars(backend))
    captured = capfd.readouterr()
    assert KEY not in captured.out and KEY not in captured.err


def test_config_errors_and_repr(server: FakeOpenAI) -> None:
    with pytest.raises(ConfigError, match="OPENAI_API_KEY") as e:
        OpenAIBackend(parse_model_spec("gpt-4o"))  # no key, no base URL
    assert KEY not in str(e.value)
    for bad in ({"concurrency": 0}, {"max_retries": -1}, {"timeout_s": 0}):
        with pytest.raises(ConfigError) as e:
            OpenAIBackend(parse_model_spec("gpt-4o"), api_key=KEY, **bad)
        assert KEY not in str(e.value) and KEY not in repr(e.value)
    backend = make(server.url)
    assert repr(backend) == f"OpenAIBackend(model='gpt-4o-mini', base_url='{server.url}')"
    with_credentials = make("http://user:hunter2@127.0.0.1:1/v1")
    assert "hunter2" not in repr(with_credentials) and "127.0.0.1:1/v1" in repr(with_credentials)
    assert repr(OpenAIBackend(parse_model_spec("gpt-4o"), api_key=KEY)) == \
        "OpenAIBackend(model='gpt-4o', base_url='https://api.openai.com/v1')"


# ---- pricing ----------------------------------------------------------------------------------------------


def test_cost_usd_from_the_builtin_table() -> None:
    table = pricing.load_prices()
    for model in ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "gpt-5", "gpt-5-mini",
                  "gpt-5-nano", "gpt-5.1", "gpt-5.2"):
        assert table[model].input > 0 and table[model].output >= table[model].input
    mini = table["gpt-5-mini"]
    assert pricing.cost_usd("gpt-5-mini", 2_000_000, 1_000_000) == pytest.approx(2 * mini.input + mini.output)
    # a dated id uses its base entry (the longest matching prefix: gpt-5-mini, not gpt-5)
    assert pricing.cost_usd("gpt-5-mini-2025-08-07", 2_000_000, 1_000_000) == \
        pricing.cost_usd("gpt-5-mini", 2_000_000, 1_000_000)
    assert pricing.cost_usd("gpt-4o-mini-2024-07-18", 10, 10) == pricing.cost_usd("gpt-4o-mini", 10, 10)
    assert pricing.cost_usd("openai/gpt-4.1-nano", 10, 10) == pricing.cost_usd("gpt-4.1-nano", 10, 10)
    assert pricing.cost_usd("gpt-4o", 0, 0) == 0.0
    for unknown in ("Qwen/Qwen3-8B", "gpt-5.3", "gpt-5mini", "llama"):
        assert pricing.cost_usd(unknown, 100, 100) is None


def test_prices_override_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    override = tmp_path / "prices.json"
    override.write_text(json.dumps({"models": {"gpt-4o": {"input": 1, "output": 3},
                                               "my-model": {"input": 0.5, "output": 0.5}}}))
    monkeypatch.setenv("AGENTPIPE_PRICES", str(override))
    assert pricing.cost_usd("gpt-4o-2024-08-06", 1_000_000, 1_000_000) == pytest.approx(4.0)
    assert pricing.cost_usd("my-model", 2_000_000, 0) == pytest.approx(1.0)
    assert pricing.cost_usd("gpt-4.1", 1, 1) is not None  # built-in entries stay
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"models": {"gpt-4o": {"input": "free"}}}))
    monkeypatch.setenv("AGENTPIPE_PRICES", str(broken))
    with pytest.raises(ConfigError, match="models.gpt-4o"):
        pricing.cost_usd("gpt-4o", 1, 1)
    monkeypatch.setenv("AGENTPIPE_PRICES", str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="not found"):
        pricing.cost_usd("gpt-4o", 1, 1)


def test_an_unpriced_api_model_costs_null_not_zero(server: FakeOpenAI, tmp_path: Path) -> None:
    """An API model missing from the price table: its records' cost is null (the call marked unpriced), the
    report's judge cost is null with the number of unpriced calls, never $0.00; a priced model still sums."""
    from tests.conftest import run_agentpipe

    env = {"AGENTPIPE_OPENAI_BASE_URL": server.url, "AGENTPIPE_HOME": str(tmp_path / "home")}
    out = tmp_path / "runs"
    p = run_agentpipe("emulate", "--agent", "openai:house-model", "--emulator", "scripted:emulator", "--case-set",
                      "demo", "--cases", "0-2", "--max-continuations", "1", "--out", str(out), "--no-progress",
                      env=env)
    assert p.returncode == 0, p.stderr
    [traj] = out.glob("*/*.jsonl")
    records = [json.loads(line) for line in traj.read_text().splitlines()]
    for rec in records:
        agent = rec["usage"]["agent"]
        assert agent["calls"] > 0 and agent["unpriced_calls"] == agent["calls"] and agent["cost_usd"] is None
        assert rec["usage"]["emulator"]["unpriced_calls"] == 0  # a local model: no cost, not unpriced
    p = run_agentpipe("evaluate", "--trajectories", str(traj), "--evaluator", "openai:house-model", "--no-progress",
                      env=env)
    assert p.returncode == 0, p.stderr
    [judged] = traj.parent.glob("*_eval_agent_safe.jsonl")
    usages = [json.loads(line)["usage"] for line in judged.read_text().splitlines()]
    assert len(usages) == 2 and all(u["cost_usd"] is None and u["unpriced"] is True for u in usages)
    p = run_agentpipe("report", "--runs", str(out), "--out", str(tmp_path / "reports"), "--no-track", env=env)
    assert p.returncode == 0, p.stderr
    [report] = (tmp_path / "reports").rglob("*_unified_report.json")
    block = json.loads(report.read_text())["evaluation"]["agent_safe"]
    assert block["judge_cost_usd"] is None and block["judge_unpriced_calls"] == 2


def test_usage_metrics_do_not_log_unknown_cost_as_zero() -> None:
    from pipeline.tracking.stage_runs import add_usage, usage_metrics

    totals: dict = {}
    for _ in range(3):
        add_usage(totals, "judge", {"prompt_tokens": 10, "completion_tokens": 5, "cost_usd": None, "unpriced": True})
    add_usage(totals, "agent", {"calls": 4, "unpriced_calls": 1, "prompt_tokens": 1, "completion_tokens": 1,
                                "cost_usd": 0.5})
    add_usage(totals, "emulator", {"calls": 2, "unpriced_calls": 0, "prompt_tokens": 1, "completion_tokens": 1,
                                   "cost_usd": 0.0})  # a local model
    metrics = usage_metrics(totals)
    assert "cost_usd_judge" not in metrics and metrics["unpriced_calls_judge"] == 3
    assert metrics["cost_usd_agent"] == 0.5 and metrics["unpriced_calls_agent"] == 1
    assert metrics["cost_usd_emulator"] == 0.0 and "unpriced_calls_emulator" not in metrics


def test_the_cost_approval_says_unpriced_calls_are_unknown() -> None:
    from plugins.plan_size import describe

    base = {"jobs": {"evaluate": 1}, "total_jobs": 1, "gpu_jobs": 0, "gpu_hours": 0.0, "judge_calls": 288,
            "api_judge_calls": 288}
    text = describe({**base, "usd": None, "unpriced": ["house-model"], "unpriced_calls": 288})
    assert "cost unknown" in text and "288 calls unpriced" in text and "$0.00" not in text
    partial = describe({**base, "usd": 1.5, "unpriced": ["house-model"], "unpriced_calls": 144})
    assert "$1.50** for the priced calls" in partial and "144 calls unpriced" in partial


def test_a_setting_a_reasoning_model_does_not_take_is_refused_or_recorded(server: FakeOpenAI, tmp_path: Path) -> None:
    """gpt-5*/o-series take no temperature or top_p: a non-default one is refused in one line before anything is
    written; the defaults (which the model applies anyway) are recorded as not sent, in each record's usage and in
    the output's fingerprint. Stop sequences not sent to an OpenAI agent are recorded the same way."""
    from tests.conftest import run_agentpipe

    env = {"AGENTPIPE_OPENAI_BASE_URL": server.url, "AGENTPIPE_HOME": str(tmp_path / "home")}
    out = tmp_path / "runs"
    p = run_agentpipe("emulate", "--agent", "openai:gpt-4o-mini", "--emulator", "scripted:emulator", "--case-set",
                      "demo", "--cases", "0-2", "--max-continuations", "1", "--out", str(out), "--no-progress",
                      env=env)
    assert p.returncode == 0, p.stderr
    [traj] = out.glob("*/*.jsonl")
    assert all(json.loads(line)["usage"]["agent"]["not_sent"] == ["stop"] for line in traj.read_text().splitlines())
    assert all("stop" not in body for bodies in server.bodies.values() for body in bodies)
    manifest = json.dumps(json.loads(traj.with_name(traj.name + ".manifest.json").read_text()))
    assert '"not_sent": {"agent": ["stop"]}' in manifest

    refused = run_agentpipe("evaluate", "--trajectories", str(traj), "--evaluator", "openai:gpt-5-mini",
                            "--temperature", "0.7", "--no-progress", env=env)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "gpt-5-mini' takes no temperature or top_p" in refused.stderr and "temperature 0.7" in refused.stderr
    assert not list(traj.parent.glob("*_eval_*")), "nothing written for a refused setting"

    calls_before = sum(server.calls.values())
    p = run_agentpipe("evaluate", "--trajectories", str(traj), "--evaluator", "openai:gpt-5-mini", "--no-progress",
                      env=env)
    assert p.returncode == 0, p.stderr
    assert sum(server.calls.values()) == calls_before + 4
    [judged] = traj.parent.glob("*_eval_agent_safe.jsonl")
    assert all(json.loads(line)["usage"]["not_sent"] == ["temperature", "top_p"]
               for line in judged.read_text().splitlines())
    manifest = json.loads(judged.with_name(judged.name + ".manifest.json").read_text())
    assert "temperature" in json.dumps(manifest) and '"not_sent": ["temperature", "top_p"]' in json.dumps(manifest)


def test_a_failed_call_does_not_turn_unknown_cost_into_zero() -> None:
    """A failed call has no cost whatever its model's price: an unpriced model's usage with one failed call is
    still unknown (null / not logged), not the $0 sum over no priced call."""
    from pipeline.emulation.episode import RoleUsage
    from pipeline.llm import ChatResponse
    from pipeline.tracking.stage_runs import add_usage, usage_metrics

    role = RoleUsage()
    role.add(ChatResponse(text="x", finish_reason="stop", prompt_tokens=10, completion_tokens=5, unpriced=True))
    role.add(ChatResponse.failure("server error"))
    assert role.as_json()["cost_usd"] is None and role.as_json()["unpriced_calls"] == 1
    priced = RoleUsage()
    priced.add(ChatResponse(text="x", finish_reason="stop", prompt_tokens=10, completion_tokens=5, cost_usd=0.25))
    priced.add(ChatResponse.failure("server error"))
    assert priced.as_json()["cost_usd"] == 0.25

    totals: dict = {}
    add_usage(totals, "judge", {"prompt_tokens": 10, "completion_tokens": 5, "cost_usd": None, "unpriced": True})
    add_usage(totals, "judge", {"prompt_tokens": 0, "completion_tokens": 0, "cost_usd": None})  # the failed call
    add_usage(totals, "agent", role.as_json())
    metrics = usage_metrics(totals)
    assert "cost_usd_judge" not in metrics and "cost_usd_agent" not in metrics
