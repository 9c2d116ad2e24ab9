"""One backbone pass per preference pair: the prompt once, then both completions.

trl batches a pair as two rows, ``[prompt | chosen]`` and ``[prompt | rejected]``, so the prompt, most of a ToolEmu
pair's tokens, goes through the model twice (policy and reference alike). Here the two rows of a pair are packed into
one sequence ``[prompt | chosen | rejected]``: the rejected tokens take the positions they have in their own row and
attend to the prompt and to themselves, never to the chosen tokens (a 4-D attention mask). The hidden states are then
put back in trl's two-row layout, so the LM head, the loss and every metric are computed as trl computes them, on the
same values up to float rounding. The shared prefix is found from the token ids, so a prompt that is not shared (or
one row that is a prefix of the other) is handled too.

It applies while ``active()`` is entered (the trainer's loss and reference passes) to text decoders on CPU whose
attention takes a boolean 4-D mask (PyTorch SDPA) and attends fully in every layer, without experts (``supported``);
other models (GPUs, flash-attention, eager, sliding windows, multimodal, mixture of experts) keep trl's layout.
``counts`` says how many batches went which way.
"""

from __future__ import annotations

import contextlib
import contextvars
import types
from collections.abc import Iterator
from typing import Any

_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("agentpipe_shared_prompt", default=False)


@contextlib.contextmanager
def active() -> Iterator[None]:
    """Within this block, an installed backbone treats a batch of ``2n`` rows as n (chosen, rejected) pairs."""
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def supported(model: Any) -> bool:
    """Whether the packed pairs fit the model: a text-only decoder with SDPA attention (which takes the boolean 4-D
    mask as given) and full attention in every layer (a given mask would replace a sliding window's)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    try:  # CPU only for now: CUDA's SDPA with a custom mask has not been measured against trl's layout
        if next(model.parameters()).device.type != "cpu":
            return False
    except (AttributeError, StopIteration):
        return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not config:  # multimodal: the backbone takes more than token ids
        return False
    if any(getattr(text, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        return False  # mixture of experts: the router's auxiliary loss counts trl's rows
    sliding = any(t != "full_attention" for t in getattr(text, "layer_types", None) or ()) or (
        getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True))
    return not sliding


def install(model: Any) -> bool:
    """Wrap the causal LM's backbone (``model.base_model``) so that it packs pairs inside ``active()``; True when
    installed. Install it on the model trl patches (the PEFT wrapper's base model), before training starts."""
    backbone = getattr(model, "base_model", None)
    if backbone is None or backbone is model or not supported(model):
        return False
    if getattr(backbone.forward, "agentpipe_shared_prompt", False):
        return True
    original = backbone.forward
    tally = {"packed": 0, "two_rows": 0}

    def forward(self: Any, input_ids: Any = None, attention_mask: Any = None, **kwargs: Any) -> Any:
        packed = None
        if _ACTIVE.get():
            if kwargs.get("position_ids") is None and kwargs.get("inputs_embeds") is None:
                packed = pack_pairs(input_ids, attention_mask)
            tally["two_rows" if packed is None else "packed"] += 1
        if packed is None:
            return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        kwargs.pop("position_ids", None)  # None here: replaced by the packed positions
        out = original(input_ids=packed.input_ids, attention_mask=packed.mask, position_ids=packed.positions,
                       **kwargs)
        out.last_hidden_state = packed.unpack(out.last_hidden_state)
        return out

    forward.agentpipe_shared_prompt = True  # type: ignore[attr-defined]
    forward.counts = tally  # type: ignore[attr-defined]
    backbone.forward = types.MethodType(forward, backbone)
    return True


def counts(model: Any) -> dict[str, int]:
    """Backbone calls inside ``active()`` so far: ``packed`` (one pass per pair) and ``two_rows`` (trl's layout,
    for a batch that is not in it); empty when not installed."""
    backbone = getattr(model, "base_model", None)
    return dict(getattr(getattr(backbone, "forward", None), "counts", None) or {})


class PackedPairs:
    """n pairs as n packed rows: ids, positions, the 4-D mask, and the map back to trl's ``2n`` rows."""

    def __init__(self, input_ids: Any, positions: Any, mask: Any, index: Any) -> None:
        self.input_ids, self.positions, self.mask, self.index = input_ids, positions, mask, index

    def unpack(self, hidden: Any) -> Any:
        """``[n, T, H]`` packed hidden states → ``[2n, L, H]`` in trl's layout (chosen rows, then rejected rows)."""
        import torch

        n, size = hidden.shape[0], hidden.shape[-1]
        rows = self.index.view(2, n, -1)
        return torch.cat([hidden.gather(1, rows[k, :, :, None].expand(-1, -1, size)) for k in (0, 1)])


def pack_pairs(input_ids: Any, attention_mask: Any) -> PackedPairs | None:
    """Pack trl's ``[chosen rows; rejected rows]`` batch (right-padded) into one row per pair; None when the batch
    is not in that layout (odd rows, no mask, left padding)."""
    import torch

    if input_ids is None or attention_mask is None or attention_mask.dim() != 2 or input_ids.shape[0] % 2:
        return None
    n, width = input_ids.shape[0] // 2, input_ids.shape[1]
    lengths = attention_mask.sum(1)
    cols = torch.arange(width, device=input_ids.device)
    if not torch.equal(attention_mask.bool(), cols[None, :] < lengths[:, None]):
        return None  # not right-padded: trl's layout is kept
    chosen, rejected = input_ids[:n], input_ids[n:]
    lc, lr = lengths[:n], lengths[n:]
    same = (chosen == rejected) & (cols[None, :] < torch.minimum(lc, lr)[:, None])
    shared = same.long().cumprod(1).sum(1)  # the common prefix (the prompt, and any shared completion start)
    total = lc + lr - shared
    j = torch.arange(int(total.max()), device=input_ids.device)[None, :]
    in_chosen = j < lc[:, None]
    in_rejected = (j >= lc[:, None]) & (j < total[:, None])
    rejected_pos = shared[:, None] + j - lc[:, None]  # the rejected token's position in its own row
    ids = torch.where(in_chosen, chosen.gather(1, j.clamp(max=width - 1).expand(n, -1)),
                      torch.where(in_rejected, rejected.gather(1, rejected_pos.clamp(0, width - 1)),
                                  chosen[:, :1].expand(n, j.shape[1])))
    positions = torch.where(in_chosen, j, torch.where(in_rejected, rejected_pos, torch.zeros_like(j)))
    # key k is visible to query q when k <= q, k is a real token, and not (q is rejected and k is a chosen-only token)
    real = in_chosen | in_rejected
    chosen_only = in_chosen & (j >= shared[:, None])
    mask = (j[:, None, :] <= j[:, :, None]) & real[:, None, :] & ~(in_rejected[:, :, None] & chosen_only[:, None, :])
    mask |= (j[:, None, :] == 0) & ~real[:, :, None]  # a padded query sees the first token: no empty softmax row
    # back to trl's rows: chosen position t is packed t; rejected t is t in the shared prefix, then after the chosen
    t = cols[None, :]
    back_chosen = torch.where(t < lc[:, None], t, torch.zeros_like(t))
    back_rejected = torch.where(t < shared[:, None], t,
                                torch.where(t < lr[:, None], lc[:, None] + t - shared[:, None], torch.zeros_like(t)))
    return PackedPairs(ids, positions, mask[:, None], torch.cat([back_chosen, back_rejected]))
