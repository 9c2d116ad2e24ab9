"""Per-row decoding for batched generation: each row stops on its own stop sequences and token cap
(``RowStopper``), and a sampled row draws from its own seeded stream (``RowSampler``), so that neither a row's end
nor its tokens depend on which rows share its batch."""

from __future__ import annotations

from typing import Any

from pipeline.errors import ConfigError


class RowStopper:
    """Per-row stopping: stop sequences (on decoded text) and per-row token caps. Records why each row ended."""

    def __init__(self, tok: Any, prompt_len: int, stops: list[tuple[str, ...]], caps: list[int]) -> None:
        self.tok, self.prompt_len, self.stops, self.caps = tok, prompt_len, stops, caps
        self.reason: list[str | None] = [None] * len(stops)
        self.window = [max((len(s) for s in st), default=0) + 8 for st in stops]

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        n_new = input_ids.shape[1] - self.prompt_len
        for row in range(input_ids.shape[0]):
            if self.reason[row] is not None:
                done[row] = True
                continue
            if self.stops[row]:
                tail_ids = input_ids[row, max(self.prompt_len, input_ids.shape[1] - self.window[row]):]
                tail = self.tok.decode(tail_ids, skip_special_tokens=True)
                if any(s in tail for s in self.stops[row]):
                    self.reason[row] = "stop"
            if self.reason[row] is None and n_new >= self.caps[row]:
                self.reason[row] = "length"
            done[row] = self.reason[row] is not None
        return done


class RowSampler:
    """Sampling with one random stream per row: each row's next token is drawn with a ``torch.Generator`` seeded
    by its request's seed, and the row's scores become that token alone (``generate`` then decodes greedily).
    ``generate``'s own sampling draws the whole batch from one global stream, so a row's tokens would depend on
    which rows share its batch (batch size, OOM halving, where a resume started). The warpers are those
    ``generate`` applies when sampling: temperature, the model's top_k (when its generation config sets one),
    top_p. A row without a seed draws from the global stream (not reproducible)."""

    def __init__(self, seeds: list[int | None], temperature: float, top_p: float, top_k: int | None,
                 device: Any) -> None:
        import torch
        from transformers import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                  TopPLogitsWarper)

        self.generators = [None if s is None else torch.Generator(device=device).manual_seed(s) for s in seeds]
        warpers: list[Any] = [TemperatureLogitsWarper(temperature)]
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        self.warpers = LogitsProcessorList(warpers)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        probs = torch.softmax(self.warpers(input_ids, scores).float(), dim=-1)
        picked = torch.full_like(scores, float("-inf"))
        for row, gen in enumerate(self.generators):  # rows alone: a row's draw never depends on its batch-mates
            token = torch.multinomial(probs[row], 1, generator=gen)
            picked[row, token] = 0.0
        return picked


#: generation-config settings ``generate`` would apply when sampling that ``RowSampler`` does not, with the values
#: that leave sampling unchanged
_UNAPPLIED_SAMPLING = {"min_p": (None, 0, 0.0), "typical_p": (None, 1, 1.0), "epsilon_cutoff": (None, 0, 0.0),
                       "eta_cutoff": (None, 0, 0.0), "top_h": (None, 0, 0.0)}


def check_sampling_settings(generation_config: Any, model: str) -> None:
    """Refuse to sample a model whose generation config sets a warper the row sampler does not apply: its
    samples would come from another distribution than ``generate``'s (and the fingerprint would not say so)."""
    set_ = {k: getattr(generation_config, k, None) for k, neutral in _UNAPPLIED_SAMPLING.items()
            if getattr(generation_config, k, None) not in neutral}
    if set_:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(set_.items()))
        raise ConfigError(f"{model}: its generation config sets {shown}, which sampling here does not apply; "
                          "sample at temperature 0, or clear these settings in the model's generation_config.json")
