"""The one interface all backends implement: many requests in, one response per request out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from pipeline.errors import ConfigError
from pipeline.llm.spec import ModelSpec
from pipeline.llm.types import ChatRequest, ChatResponse

#: Called after each finished request with (number done, total).
Progress = Callable[[int, int], None]


class ChatBackend(ABC):
    """A chat model. ``generate`` takes a whole batch; one failed request never fails the others."""

    spec: ModelSpec

    #: Identifies the exact weights (a commit hash, a file digest, an API model version) for cache keys.
    revision: str = ""

    @abstractmethod
    def generate(self, requests: Sequence[ChatRequest], progress: Progress | None = None) -> list[ChatResponse]:
        """Responses in the order of ``requests``."""

    def score_choices(self, requests: Sequence[ChatRequest], prefix: str, choices: Sequence[str]) -> list[list[float]]:
        """Log-probability of each choice as the start of the assistant's reply ``prefix + choice``.

        Constrained scoring for models too small to follow an answer format. Local backends only.
        """
        raise ConfigError(f"model '{self.spec.raw}': choice scoring needs a local model (HF transformers backend)")

    def close(self) -> None:
        """Release resources (engines, pools). Backends stay usable until closed."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.raw!r})"
