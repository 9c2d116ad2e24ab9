"""On-disk response cache (SQLite), opt-in per role.

Key = model spec + resolved revision + messages + generation config (+ the replicate index when the
temperature is above 0, so replicates stay distinct samples). Only successful responses are stored.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from pipeline.llm.base import ChatBackend, Progress
from pipeline.llm.types import ChatRequest, ChatResponse


def cache_key(backend: ChatBackend, request: ChatRequest) -> str:
    payload = {
        "model": backend.spec.model, "adapter": backend.spec.adapter, "backend": backend.spec.backend,
        "revision": backend.revision, "messages": request.messages, "config": request.config.as_dict(),
        "replicate": request.replicate if request.config.temperature > 0 else 0,
    }
    if request.adapter:  # the weights that answer: path and contents of the request's adapter
        from pipeline.llm.local_common import folder_revision

        payload["request_adapter"] = [request.adapter, folder_revision(request.adapter)]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class ResponseCache:
    """A SQLite key → response store, safe across threads and processes (WAL, busy timeout)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, response TEXT NOT NULL)")
        self._db.commit()

    def get_many(self, keys: Sequence[str]) -> dict[str, ChatResponse]:
        found: dict[str, ChatResponse] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start:start + 500])
                q = f"SELECT key, response FROM responses WHERE key IN ({','.join('?' * len(chunk))})"
                for key, raw in self._db.execute(q, chunk):
                    found[key] = ChatResponse(**json.loads(raw))
        return found

    def put_many(self, items: Sequence[tuple[str, ChatResponse]]) -> None:
        rows = [(k, json.dumps({**asdict(r), "cached": False})) for k, r in items if r.ok]
        if not rows:
            return
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO responses VALUES (?, ?)", rows)
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class CachedBackend(ChatBackend):
    """Wraps a backend: answers cache hits from disk and sends only the misses, in one batch."""

    def __init__(self, inner: ChatBackend, cache: ResponseCache) -> None:
        self.inner, self.cache = inner, cache
        self.spec, self.revision = inner.spec, inner.revision

    def generate(self, requests: Sequence[ChatRequest], progress: Progress | None = None) -> list[ChatResponse]:
        keys = [cache_key(self.inner, r) for r in requests]
        hits = self.cache.get_many(keys)
        out: list[ChatResponse | None] = []
        for k in keys:
            hit = hits.get(k)
            if hit is not None:
                hit.cached = True
            out.append(hit)
        misses = [i for i, o in enumerate(out) if o is None]
        if misses:
            fresh = self.inner.generate([requests[i] for i in misses], progress)
            for i, r in zip(misses, fresh):
                out[i] = r
            self.cache.put_many([(keys[i], r) for i, r in zip(misses, fresh)])
        elif progress:
            progress(len(requests), len(requests))
        return out  # type: ignore[return-value]

    def score_choices(self, requests, prefix, choices):  # noqa: ANN001, ANN201 - same as ChatBackend
        return self.inner.score_choices(requests, prefix, choices)  # cheap forward passes: not cached

    def close(self) -> None:
        self.inner.close()
        self.cache.close()
