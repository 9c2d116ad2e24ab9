"""What is never logged: parameters whose names or values look like secrets (tokens, keys, passwords); long values
are cut to what MLflow takes."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any


log = logging.getLogger("pipeline.tracking")

#: Names of parameters that are never logged (matched case-insensitively anywhere in the name).
#: Words of a parameter name that make it a secret (whole words: ``max_new_tokens`` and ``tokenizer`` are not)
_SECRET_WORDS = frozenset({"token", "secret", "secrets", "password", "passwd", "credential", "credentials",
                           "authorization", "apikey", "auth"})
#: ``<word>_key`` names that are secrets (``api_key``, ``access_key``, …; ``sort_key`` is not)
_KEY_OWNERS = frozenset({"api", "access", "secret", "private", "openai", "openrouter", "hf", "mlflow", "wandb"})


def is_secret_name(name: str) -> bool:
    """Whether a parameter name names a secret: a secret word (token, password, …) as a whole word, or a key
    of an API or account (``OPENAI_API_KEY``, ``apiKey``, ``hf-token``)."""
    words = re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name)).lower())
    return any(w in _SECRET_WORDS for w in words) or any(
        w == "key" and i > 0 and words[i - 1] in _KEY_OWNERS for i, w in enumerate(words))
_SECRET_VALUE = re.compile(r"^(sk-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{20,})$")
_MAX_PARAM = 6000


def clean_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Parameters as MLflow strings; secret-looking names or values are dropped, long values truncated."""
    out: dict[str, str] = {}
    for k, v in params.items():
        value = v if isinstance(v, str) else json.dumps(v, default=str) if isinstance(v, (list, dict)) else str(v)
        if is_secret_name(str(k)) or _SECRET_VALUE.match(value.strip()):
            log.warning("parameter '%s' looks like a secret: not logged", k)
            continue
        out[str(k)] = value[:_MAX_PARAM]
    return out
