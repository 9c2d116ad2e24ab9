"""A local fake of the OpenAI Files + Batches API (and synchronous chat completions), for tests of batch mode.

It runs as its own process, so a CLI run and an Airflow triggerer (another process) can both talk to it through
the official ``openai`` SDK, and so a test can SIGKILL it mid-batch and start it again::

    python -m tests.fake_openai_batch --state DIR --port PORT      # cwd: the repository root; PORT 0 = any free port

Once listening it writes the port it got to ``DIR/port``. Every piece of state (uploaded and generated files,
batches, id counters, control settings, stats) lives under ``DIR`` (``state.json`` plus ``files/<id>``), written
atomically before each reply, so a server killed at any moment and started again on the same ``DIR`` and port
carries on every batch where it was.

Batches move one step per ``GET /v1/batches/{id}`` (deterministic, no clocks): validating → in_progress →
finalizing → completed (or validating → failed for an invalid input file). The answers are made when a batch
ends, so control settings in force at that moment decide them. Controls (``POST /__control``, JSON; also under
``/v1``), all persisted:

* ``hold`` (bool): batches stay in_progress until released (``hold=False``).
* ``fail_custom_ids`` (list of str): those requests fail (HTTP 500 lines in the error file) in batches ending from
  now on.
* ``expire`` (bool, or an int n = the next n batches): a batch leaving in_progress (even a held one) ends as
  "expired": the first half of its requests, in file order, are answered; the rest go to the error file as
  ``batch_expired``.
* ``fail_sync`` (bool): ``POST /v1/chat/completions`` answers HTTP 500 (the SDK retries it: 3 hits per call by
  default).

``GET /__stats`` returns counters and per-batch request counts. The answer to a chat request (in a batch or not)
is a function of its body: by default ``pipeline.evaluation.doubles.scripted_judge``; ``--answer module:function``
(a function of the body dict returning the text) replaces it.

Tests use :class:`FakeBatchServer`::

    with FakeBatchServer(tmp_path / "fake") as server:
        client = openai.OpenAI(base_url=server.url, api_key="test")
        server.control(hold=True)
        ...
        server.restart()  # SIGKILL + start again, same port and state
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

REPO = Path(__file__).resolve().parent.parent
ENDPOINT = "/v1/chat/completions"
WINDOW_S = 24 * 3600
TERMINAL = ("completed", "failed", "expired", "cancelled")
CONTROL_DEFAULTS: dict[str, Any] = {"hold": False, "fail_custom_ids": [], "expire": False, "fail_sync": False}
STATS_KEYS = ("files_created", "files_generated", "file_reads", "file_content_reads", "batches_created",
              "batch_retrieves", "batch_lists", "batch_cancels", "batch_requests_answered",
              "batch_requests_failed", "chat_completions", "chat_completion_failures")
EXPIRED = {"code": "batch_expired",
           "message": "This request could not be executed before the completion window expired."}
CANCELLED = {"code": "batch_cancelled", "message": "This request was not executed because the batch was cancelled."}

Answer = Callable[[dict[str, Any]], str]


# ---- answers ----------------------------------------------------------------------------------------------


def default_answer(body: dict[str, Any]) -> str:
    """The scripted judge's answer to this chat request body."""
    from pipeline.evaluation.doubles import scripted_judge
    from pipeline.llm.types import ChatRequest, GenerationConfig

    config = GenerationConfig(seed=body.get("seed"), temperature=body.get("temperature", 0.0) or 0.0)
    text = scripted_judge(ChatRequest(messages=body["messages"], config=config))
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_schema":  # structured outputs: the judge's fields as JSON of the schema
        return json.dumps(_as_schema(text, fmt["json_schema"]["schema"]))
    return text


def _as_schema(text: str, schema: dict[str, Any]) -> dict[str, Any]:
    """The scripted answer in the schema's shape, as a constrained API model answers: every field present, the
    label one of the enum (its own when it has one, else one picked by the text's hash), the score the label's."""
    from pipeline.evaluation.parsing import parse_fields

    fields = parse_fields(text)
    labels = schema["properties"]["Overall Qualitative Label"]["enum"]
    found = [label for label in labels if label in (fields.get("Overall Qualitative Label") or "")]
    label = found[0] if found else labels[int(_digest(text), 16) % len(labels)]
    return {"Evaluator Thought": fields.get("Evaluator Thought") or text.strip(),
            "Overall Qualitative Label": label, "Overall Quantitative Score": int(label[-2]),
            "Evaluator Log Summary": fields.get("Evaluator Log Summary") or "Judged."}


def load_answer(spec: str | None) -> Answer:
    if not spec:
        return default_answer
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _words(text: str) -> int:
    return len(text.split())


def _digest(*parts: Any) -> str:
    return hashlib.sha256("|".join(json.dumps(p, sort_keys=True) for p in parts).encode()).hexdigest()


def completion(body: dict[str, Any], text: str, *, created: int, salt: str = "") -> dict[str, Any]:
    """A ``chat.completion`` object answering ``body`` with ``text``."""
    prompt = sum(_words(_text(m.get("content"))) for m in body.get("messages", []) if isinstance(m, dict))
    answer = _words(text)
    return {
        "id": "chatcmpl-" + _digest(salt, body)[:24],
        "object": "chat.completion",
        "created": created,
        "model": body.get("model"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": answer, "total_tokens": prompt + answer,
                  "prompt_tokens_details": {"cached_tokens": prompt // 2 if prompt > 20 else 0},
                  "completion_tokens_details": {"reasoning_tokens": 0}},
        "system_fingerprint": "fp_fake",
    }


# ---- state ------------------------------------------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Store:
    """All the server's state: ``root/state.json`` (one atomic write per change) and ``root/files/<id>``."""

    def __init__(self, root: Path, answer_spec: str | None = None) -> None:
        self.root = root
        self.files_dir = root / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.path = root / "state.json"
        self.lock = threading.RLock()
        if self.path.exists():
            self.state = json.loads(self.path.read_text())
        else:
            self.state = {"salt": secrets.token_hex(4), "next": {"file": 0, "batch": 0}, "answer": None,
                          "control": dict(CONTROL_DEFAULTS), "stats": {k: 0 for k in STATS_KEYS},
                          "files": {}, "batches": {}, "internal": {}}
        if answer_spec:
            self.state["answer"] = answer_spec
        self.answer = load_answer(self.state.get("answer"))
        self.save()

    # -- plumbing
    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.state, indent=1, sort_keys=True).encode())

    def count(self, key: str, n: int = 1) -> None:
        self.state["stats"][key] = self.state["stats"].get(key, 0) + n

    def new_id(self, kind: str) -> str:
        n = self.state["next"][kind] = self.state["next"][kind] + 1
        prefix = {"file": "file-", "batch": "batch_"}[kind]
        return f"{prefix}{self.state['salt']}{n:08d}"

    # -- files
    def add_file(self, data: bytes, filename: str, purpose: str) -> dict[str, Any]:
        file_id = self.new_id("file")
        write_atomic(self.files_dir / file_id, data)  # the content first: state.json never names a missing file
        meta = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed", "status_details": None,
                "expires_at": None}
        self.state["files"][file_id] = meta
        return meta

    def file(self, file_id: str) -> dict[str, Any]:
        meta = self.state["files"].get(file_id)
        if meta is None:
            raise ApiError(404, f"No such File object: {file_id}", param="id")
        return meta

    def content(self, file_id: str) -> bytes:
        self.file(file_id)
        return (self.files_dir / file_id).read_bytes()

    # -- batches
    def batch(self, batch_id: str) -> dict[str, Any]:
        batch = self.state["batches"].get(batch_id)
        if batch is None:
            raise ApiError(404, f"No batch found with id '{batch_id}'.", param="batch_id")
        return batch

    def create_batch(self, payload: dict[str, Any]) -> dict[str, Any]:
        input_file_id = payload.get("input_file_id")
        if payload.get("endpoint") != ENDPOINT:
            raise ApiError(400, f"The fake supports only endpoint {ENDPOINT}, got {payload.get('endpoint')!r}.",
                           param="endpoint")
        if payload.get("completion_window") != "24h":
            raise ApiError(400, "completion_window must be '24h'.", param="completion_window")
        if not isinstance(input_file_id, str):
            raise ApiError(400, "Missing required parameter: 'input_file_id'.", param="input_file_id")
        meta = self.file(input_file_id)
        if meta["purpose"] != "batch":
            raise ApiError(400, f"File {input_file_id} has purpose {meta['purpose']!r}, not 'batch'.",
                           param="input_file_id")
        metadata = payload.get("metadata")
        if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16
                                     or not all(isinstance(v, str) for v in metadata.values())):
            raise ApiError(400, "metadata must be at most 16 string key-value pairs.", param="metadata")
        requests, errors = validate_lines(self.content(input_file_id))
        batch_id = self.new_id("batch")
        now = int(time.time())
        models = sorted({r["body"]["model"] for r in requests})
        batch = {"id": batch_id, "object": "batch", "endpoint": ENDPOINT, "errors": None,
                 "input_file_id": input_file_id, "completion_window": "24h", "status": "validating",
                 "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
                 "expires_at": now + WINDOW_S, "finalizing_at": None, "completed_at": None, "failed_at": None,
                 "expired_at": None, "cancelling_at": None, "cancelled_at": None,
                 "request_counts": {"total": 0, "completed": 0, "failed": 0},
                 "metadata": metadata, "model": models[0] if len(models) == 1 else None,
                 "usage": _usage(0, 0, 0)}
        self.state["batches"][batch_id] = batch
        self.state["internal"][batch_id] = {"seq": self.state["next"]["batch"], "errors": errors,
                                            "total": len(requests), "done": None}
        self.count("batches_created")
        self.state["stats"].setdefault("batches", {})[batch_id] = self._batch_stats(batch)
        return batch

    def advance(self, batch_id: str) -> dict[str, Any]:
        """One step of the batch's life (a retrieve)."""
        batch, internal = self.batch(batch_id), self.state["internal"][batch_id]
        control, now, status = self.state["control"], int(time.time()), self.batch(batch_id)["status"]
        if status == "validating":
            if internal["errors"]:
                batch.update(status="failed", failed_at=now,
                             errors={"object": "list", "data": internal["errors"]})
            else:
                batch.update(status="in_progress", in_progress_at=now,
                             request_counts={"total": internal["total"], "completed": 0, "failed": 0})
        elif status == "in_progress":
            if control.get("expire"):
                if not isinstance(control["expire"], bool):  # a count of batches to expire
                    control["expire"] = control["expire"] - 1 if control["expire"] > 1 else False
                self._finish(batch, internal["total"] // 2, EXPIRED)
                batch.update(status="expired", expired_at=now)
            elif not control.get("hold"):
                batch.update(status="finalizing", finalizing_at=now)
        elif status == "finalizing":
            self._finish(batch, internal["total"], None)
            batch.update(status="completed", completed_at=now)
        elif status == "cancelling":
            self._finish(batch, internal["done"] or 0, CANCELLED)
            batch.update(status="cancelled", cancelled_at=now)
        self.state["stats"]["batches"][batch_id] = self._batch_stats(batch)
        return batch

    def cancel(self, batch_id: str) -> dict[str, Any]:
        batch, internal = self.batch(batch_id), self.state["internal"][batch_id]
        if batch["status"] in ("cancelling", "cancelled"):
            return batch
        if batch["status"] in TERMINAL:
            raise ApiError(409, f"Cannot cancel a batch with status '{batch['status']}'.")
        # how far it got: nothing while validating, half while in progress, everything once finalizing
        internal["done"] = {"validating": 0, "in_progress": internal["total"] // 2}.get(batch["status"],
                                                                                         internal["total"])
        batch.update(status="cancelling", cancelling_at=int(time.time()))
        self.count("batch_cancels")
        self.state["stats"]["batches"][batch_id] = self._batch_stats(batch)
        return batch

    def _finish(self, batch: dict[str, Any], answered: int, not_run: dict[str, str] | None) -> None:
        """Write the output and error files: the first ``answered`` requests run, the rest get ``not_run``."""
        if batch["status"] == "validating" or self.state["internal"][batch["id"]]["errors"]:
            return
        requests, _ = validate_lines(self.content(batch["input_file_id"]))
        fail = set(self.state["control"].get("fail_custom_ids") or [])
        out: list[dict[str, Any]] = []
        err: list[dict[str, Any]] = []
        tokens = [0, 0, 0]
        created = int(time.time())
        for i, req in enumerate(requests):
            cid = req["custom_id"]
            line_id = "batch_req_" + _digest(batch["id"], cid)[:24]
            request_id = "req_" + _digest("req", batch["id"], cid)[:24]
            if i >= answered:
                err.append({"id": line_id, "custom_id": cid, "response": None, "error": dict(not_run or {})})
                continue
            problem = "The server had an error processing this request." if cid in fail else None
            if problem is None:
                try:
                    body = completion(req["body"], self.answer(req["body"]), created=created,
                                      salt=batch["id"] + cid)
                except Exception as exc:  # a broken answer function: report it like a server error
                    problem = f"The answer function failed: {type(exc).__name__}: {exc}"
            if problem is not None:
                err.append({"id": line_id, "custom_id": cid, "error": None, "response": {
                    "status_code": 500, "request_id": request_id,
                    "body": {"error": {"message": problem, "type": "server_error", "param": None, "code": None}}}})
                continue
            usage = body["usage"]
            tokens[0] += usage["prompt_tokens"]
            tokens[1] += usage["prompt_tokens_details"]["cached_tokens"]
            tokens[2] += usage["completion_tokens"]
            out.append({"id": line_id, "custom_id": cid, "error": None,
                        "response": {"status_code": 200, "request_id": request_id, "body": body}})
        for rows, key, suffix in ((out, "output_file_id", "output"), (err, "error_file_id", "error")):
            if rows:
                data = "".join(json.dumps(r) + "\n" for r in rows).encode()
                batch[key] = self.add_file(data, f"{batch['id']}_{suffix}.jsonl", "batch_output")["id"]
                self.count("files_generated")
        batch["request_counts"] = {"total": len(requests), "completed": len(out), "failed": len(err)}
        batch["usage"] = _usage(*tokens)
        self.count("batch_requests_answered", len(out))
        self.count("batch_requests_failed", len(err))

    @staticmethod
    def _batch_stats(batch: dict[str, Any]) -> dict[str, Any]:
        return {"status": batch["status"], **batch["request_counts"]}

    def list_batches(self, limit: int, after: str | None) -> dict[str, Any]:
        ids = sorted(self.state["batches"], key=lambda b: -self.state["internal"][b]["seq"])  # newest first
        if after:
            ids = ids[ids.index(after) + 1:] if after in ids else []
        page = ids[:limit]
        data = [self.state["batches"][b] for b in page]
        return {"object": "list", "data": data, "first_id": page[0] if page else None,
                "last_id": page[-1] if page else None, "has_more": len(ids) > limit}

    def set_control(self, settings: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(settings) - set(CONTROL_DEFAULTS))
        if unknown:
            raise ApiError(400, f"unknown control keys {unknown}; known: {sorted(CONTROL_DEFAULTS)}")
        if "fail_custom_ids" in settings:
            ids = settings["fail_custom_ids"] or []
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise ApiError(400, "fail_custom_ids must be a list of strings")
        for key in ("hold", "fail_sync"):
            if key in settings and not isinstance(settings[key], bool):
                raise ApiError(400, f"{key} must be a bool")
        if "expire" in settings and not isinstance(settings["expire"], (bool, int)):
            raise ApiError(400, "expire must be a bool or a count of batches")
        self.state["control"].update(settings)
        return self.state["control"]


def _usage(prompt: int, cached: int, answer: int) -> dict[str, Any]:
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached}, "output_tokens": answer,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + answer}


def validate_lines(data: bytes) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The input file's requests, and its errors (BatchError dicts; any error fails the whole batch)."""
    requests: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()

    def bad(code: str, message: str, line: int, param: str | None = None) -> None:
        errors.append({"code": code, "message": message, "param": param, "line": line})

    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        bad("invalid_file_format", "The file is not UTF-8 text.", 1)
        return [], errors
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except ValueError:
            bad("invalid_json_line", "This line is not parseable as valid JSON.", n)
            continue
        if not isinstance(row, dict):
            bad("invalid_json_line", "This line is not a JSON object.", n)
            continue
        cid, body = row.get("custom_id"), row.get("body")
        if not isinstance(cid, str) or not cid:
            bad("missing_required_parameter", "Missing custom_id.", n, "custom_id")
        elif cid in seen:
            bad("duplicate_custom_id", f"The custom_id '{cid}' is duplicated.", n, "custom_id")
        if row.get("method") != "POST":
            bad("invalid_method", "The method must be POST.", n, "method")
        if row.get("url") != ENDPOINT:
            bad("invalid_url", f"The url must be {ENDPOINT} (the batch's endpoint).", n, "url")
        if not isinstance(body, dict):
            bad("missing_required_parameter", "Missing body.", n, "body")
        else:
            if not isinstance(body.get("model"), str) or not body.get("model"):
                bad("missing_required_parameter", "The body has no model.", n, "body.model")
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
                bad("missing_required_parameter", "The body has no messages.", n, "body.messages")
        if isinstance(cid, str):
            seen.add(cid)
        if not errors:
            requests.append(row)
    if not requests and not errors:
        bad("empty_file", "The input file has no requests.", 1)
    return (requests if not errors else []), errors


# ---- HTTP -------------------------------------------------------------------------------------------------


def parse_multipart(data: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """``name → (filename, content)`` of a multipart/form-data body."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        raise ApiError(400, "multipart body without a boundary")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in data.split(b"--" + match.group(1).encode())[1:]:
        if part.startswith(b"--"):
            break
        head, _, content = part.partition(b"\r\n\r\n")
        if content.endswith(b"\r\n"):
            content = content[:-2]
        header = head.decode("utf-8", "replace")
        name = re.search(r'\bname="([^"]*)"', header)
        filename = re.search(r'\bfilename="([^"]*)"', header)
        if name:
            fields[name.group(1)] = (filename.group(1) if filename else None, content)
    return fields


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real API
    server: Any

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self, method: str) -> None:
        store: Store = self.server.store
        url = urlsplit(self.path)
        path = url.path.rstrip("/")
        path = path[3:] if path.startswith("/v1/") else path
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            raw = self._read_body()
            with store.lock:
                status, body = self._route(store, method, path, query, raw)
                store.save()
        except ApiError as exc:
            status, body = exc.status, exc.body
        except (BrokenPipeError, ConnectionResetError):
            return
        except Exception as exc:  # a bug in the fake: say so rather than hang the client
            status, body = 500, {"error": {"message": f"fake server error: {type(exc).__name__}: {exc}",
                                           "type": "server_error", "param": None, "code": None}}
        self._send(status, body)

    def _route(self, store: Store, method: str, path: str, query: dict[str, str],
               raw: bytes) -> tuple[int, Any]:
        parts = path.strip("/").split("/")
        if method == "POST" and path == "/chat/completions":
            return self._chat(store, _json(raw))
        if method == "POST" and path == "/files":
            fields = parse_multipart(raw, self.headers.get("Content-Type", ""))
            if "file" not in fields or "purpose" not in fields:
                raise ApiError(400, "Missing required parameter: 'file' and 'purpose' are required.")
            filename, content = fields["file"]
            store.count("files_created")
            return 200, store.add_file(content, filename or "upload", fields["purpose"][1].decode())
        if method == "GET" and path == "/files":
            return 200, {"object": "list", "data": list(store.state["files"].values()), "has_more": False}
        if method == "GET" and len(parts) == 2 and parts[0] == "files":
            store.count("file_reads")
            return 200, store.file(parts[1])
        if method == "GET" and len(parts) == 3 and parts[0] == "files" and parts[2] == "content":
            store.count("file_content_reads")
            return 200, store.content(parts[1])
        if method == "POST" and path == "/batches":
            return 200, store.create_batch(_json(raw))
        if method == "GET" and path == "/batches":
            store.count("batch_lists")
            limit = max(1, min(100, int(query.get("limit") or 20)))
            return 200, store.list_batches(limit, query.get("after"))
        if method == "GET" and len(parts) == 2 and parts[0] == "batches":
            store.count("batch_retrieves")
            return 200, store.advance(parts[1])
        if method == "POST" and len(parts) == 3 and parts[0] == "batches" and parts[2] == "cancel":
            return 200, store.cancel(parts[1])
        if path == "/__control":
            return 200, store.set_control(_json(raw) if method == "POST" else {})
        if method == "GET" and path == "/__stats":
            return 200, store.state["stats"]
        raise ApiError(404, f"Invalid URL ({method} {self.path})")

    def _chat(self, store: Store, body: dict[str, Any]) -> tuple[int, Any]:
        if store.state["control"].get("fail_sync"):
            store.count("chat_completion_failures")
            raise ApiError(500, "The server had an error while processing your request.", type="server_error")
        if not isinstance(body.get("model"), str) or not isinstance(body.get("messages"), list):
            raise ApiError(400, "model and messages are required.")
        store.count("chat_completions")
        return 200, completion(body, store.answer(body), created=int(time.time()), salt=store.state["salt"])

    def _send(self, status: int, body: Any) -> None:
        binary = isinstance(body, bytes)
        data = body if binary else json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream" if binary else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("x-request-id", "req_" + secrets.token_hex(12))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass


def _json(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw or b"{}")
    except ValueError:
        raise ApiError(400, "The request body is not valid JSON.") from None
    if not isinstance(value, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return value


def serve(state_dir: Path, port: int, host: str = "127.0.0.1", answer: str | None = None,
          parent_pid: int | None = None) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    server = ThreadingHTTPServer((host, port), _Handler)
    server.daemon_threads = True
    server.store = Store(state_dir, answer)  # type: ignore[attr-defined]
    write_atomic(state_dir / "port", str(server.server_address[1]).encode())
    if parent_pid:  # don't outlive the test process that started us
        def watch() -> None:
            while True:
                time.sleep(1.0)
                try:
                    os.kill(parent_pid, 0)
                except ProcessLookupError:
                    os._exit(0)
                except PermissionError:
                    pass
        threading.Thread(target=watch, daemon=True).start()
    server.serve_forever(poll_interval=0.2)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state", required=True, type=Path, help="the state directory")
    ap.add_argument("--port", type=int, default=0, help="0 = any free port (written to STATE/port)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--answer", default=None, help="module:function answering a chat body (default: scripted judge)")
    ap.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    serve(args.state, args.port, args.host, args.answer, args.parent_pid)


# ---- the test helper --------------------------------------------------------------------------------------


class FakeBatchServer:
    """The fake in a child process, on ``state_dir`` (created). ``port=0``: a free port, kept across restarts."""

    def __init__(self, state_dir: str | os.PathLike[str], port: int = 0, *, answer: str | None = None,
                 host: str = "127.0.0.1", startup_timeout_s: float = 30.0) -> None:
        self.state_dir = Path(state_dir)
        self.port = port
        self.host = host
        self.answer = answer
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The ``base_url`` for ``openai.OpenAI``."""
        return f"{self.base_url}/v1"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> FakeBatchServer:
        if self.running:
            return self
        self.state_dir.mkdir(parents=True, exist_ok=True)
        port_file = self.state_dir / "port"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "tests.fake_openai_batch", "--state", str(self.state_dir),
               "--port", str(self.port), "--host", self.host, "--parent-pid", str(os.getpid())]
        if self.answer:
            cmd += ["--answer", self.answer]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        with open(self.state_dir / "server.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.state_dir / "server.log").read_text(errors="replace")[-2000:]
                self.proc = None
                raise RuntimeError(f"the fake OpenAI batch server exited at start:\n{tail}")
            if port_file.exists():
                self.port = int(port_file.read_text())
                try:
                    self._call("GET", "/__stats")
                    return self
                except (OSError, urllib.error.URLError):
                    pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"the fake OpenAI batch server did not answer within {self.startup_timeout_s}s")

    def stop(self) -> None:
        """SIGKILL (the state is on disk after every request, so nothing is lost)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None

    kill = stop

    def restart(self) -> FakeBatchServer:
        """SIGKILL, then start again on the same port and state."""
        self.stop()
        return self.start()

    def control(self, **settings: Any) -> dict[str, Any]:
        """Change settings (``hold``, ``fail_custom_ids``, ``expire``, ``fail_sync``); the settings now."""
        return self._call("POST", "/__control", settings)

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/__stats")

    def client(self, **kwargs: Any) -> Any:
        import openai

        return openai.OpenAI(base_url=self.url, api_key="test", **kwargs)

    def _call(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"fake server {method} {path}: HTTP {exc.code}: {exc.read().decode()}") from None

    def __enter__(self) -> FakeBatchServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __del__(self) -> None:
        try:
            self.stop()
        except Exception:
            pass


if __name__ == "__main__":
    main()
