"""What API calls cost: a USD price table per million tokens, for the ``cost_usd`` field of responses.

The table lives in ``prices.json`` beside this module (edit it when prices change). A JSON file of the same
shape named by ``AGENTPIPE_PRICES`` is merged on top: its entries replace or add to the built-in ones.
Costs are list-price estimates. Prompt tokens the API served from its prompt cache (``cached_tokens`` in the
usage) cost the model's ``cached_input`` price; a model without one is charged its full input price for them (an
upper bound, never an understatement). Answers through the Batch API cost ``batch_multiplier`` (0.5: half price) of
the synchronous price.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pipeline.errors import ConfigError

#: The built-in, editable price table.
DEFAULT_PRICES_FILE = Path(__file__).with_name("prices.json")
#: Environment variable naming an override file (same shape as ``prices.json``).
PRICES_ENV = "AGENTPIPE_PRICES"


#: What the Batch API costs, relative to the synchronous price (OpenAI: half), unless a table says otherwise.
BATCH_MULTIPLIER = 0.5


@dataclass(frozen=True)
class Price:
    """USD per million tokens (``cached_input``: of prompt tokens served from the prompt cache; None: not listed)."""

    input: float
    output: float
    cached_input: float | None = None


def _price(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _read_table(path: Path) -> tuple[dict[str, Price], float | None]:
    """The table's models and its ``batch_multiplier`` (None when it sets none)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"price table {path}: file not found (check {PRICES_ENV})") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"price table {path}: not readable JSON ({type(e).__name__}: {e})") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise ConfigError(f"price table {path}: expected an object with a 'models' object")
    table: dict[str, Price] = {}
    for model, entry in models.items():
        values = [entry.get(k) for k in ("input", "output")] if isinstance(entry, dict) else [None, None]
        if not all(_price(v) for v in values):
            raise ConfigError(f"price table {path}: models.{model} needs non-negative numbers 'input' and 'output'")
        cached = entry.get("cached_input")
        if cached is not None and not _price(cached):
            raise ConfigError(f"price table {path}: models.{model}.cached_input: expected a non-negative number")
        table[model] = Price(input=float(values[0]), output=float(values[1]),  # type: ignore[arg-type]
                             cached_input=None if cached is None else float(cached))
    multiplier = data.get("batch_multiplier")
    if multiplier is not None and not (_price(multiplier) and multiplier <= 1):
        raise ConfigError(f"price table {path}: batch_multiplier: expected a number in [0, 1], got {multiplier!r}")
    return table, None if multiplier is None else float(multiplier)


@lru_cache(maxsize=8)
def _load(default: str, default_stamp: tuple[int, int], override: str | None,
          override_stamp: tuple[int, int] | None) -> tuple[dict[str, Price], float]:
    # Keyed on (mtime, size) stamps so an edited file is picked up without restarting the process.
    table, multiplier = _read_table(Path(default))
    if override is not None:
        more, its_multiplier = _read_table(Path(override))
        table.update(more)
        multiplier = its_multiplier if its_multiplier is not None else multiplier
    return table, BATCH_MULTIPLIER if multiplier is None else multiplier


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return (-1, -1)  # _read_table reports the problem with the file's name
    return (st.st_mtime_ns, st.st_size)


def _effective() -> tuple[dict[str, Price], float]:
    override_env = os.environ.get(PRICES_ENV, "").strip()
    override = Path(override_env).expanduser() if override_env else None
    return _load(str(DEFAULT_PRICES_FILE), _stamp(DEFAULT_PRICES_FILE),
                 str(override) if override else None, _stamp(override) if override else None)


def load_prices() -> dict[str, Price]:
    """The effective price table: ``prices.json`` with the ``AGENTPIPE_PRICES`` file (if set) merged on top."""
    return dict(_effective()[0])


def batch_multiplier() -> float:
    """The Batch API's price relative to the synchronous one (``batch_multiplier``; 0.5 unless a table says)."""
    return _effective()[1]


def price_for(model: str) -> Price | None:
    """The price entry for ``model``: an exact key, else the longest key that is a ``-``-separated prefix
    (``gpt-5-mini-2025-08-07`` → ``gpt-5-mini``). ``None`` for unknown models. A provider prefix such as
    ``openai/`` is ignored."""
    name = model.rsplit("/", 1)[-1].strip()
    table = load_prices()
    if name in table:
        return table[name]
    # The "-" boundary keeps an unknown "gpt-5.3" from being priced as "gpt-5".
    matches = [key for key in table if name.startswith(key + "-")]
    return table[max(matches, key=len)] if matches else None


def cost_usd(model: str, prompt_tokens: int, completion_tokens: int, *, cached_tokens: int = 0,
             batch: bool = False) -> float | None:
    """USD cost of one call at list price, or ``None`` when the model is not in the price table.
    ``cached_tokens`` of the prompt tokens cost the cached-input price; ``batch``: at the Batch API's rate."""
    price = price_for(model)
    if price is None:
        return None
    cached = min(max(cached_tokens, 0), prompt_tokens)
    cached_price = price.input if price.cached_input is None else price.cached_input
    usd = ((prompt_tokens - cached) * price.input + cached * cached_price + completion_tokens * price.output) / 1e6
    return usd * batch_multiplier() if batch else usd
