"""Decoding attention on CPU without copying the key/value cache per token.

transformers' SDPA path repeats each key/value head for its query heads (``repeat_kv``, a copy of the whole cache)
whenever an attention mask is present, i.e. in every padded batch: on CUDA a masked grouped-query call would fall
back to the math kernel. PyTorch's CPU kernel takes ``enable_gqa`` with a mask and gives the same values bit for
bit (``tests/test_hf_decoding.py``), ~18x faster for 16 rows of 3,000 tokens. ``sdpa_gqa`` is transformers' SDPA
with that one change for a decoded token (one query position); everything else goes to transformers' own function.
"""

from __future__ import annotations

from typing import Any

#: the attention implementation name the HF backend gives its CPU models (``use_on_cpu``)
NAME = "sdpa_gqa"
#: model families whose modeling code takes attention only through transformers' attention interface; others
#: (e.g. DeepSeek-V3.2's sparse index mask) test the implementation's name and keep "sdpa"
MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3", "phi3", "granite", "olmo2"})


def sdpa_gqa(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
             scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers' attention-function signature; (B, q, heads, d) output as ``sdpa_attention_forward``."""
    import torch
    from transformers.integrations.sdpa_attention import PagedAttentionCache, sdpa_attention_forward

    if (query.shape[2] != 1 or query.device.type != "cpu" or getattr(module, "num_key_value_groups", 1) == 1
            or kwargs.get("position_bias") is not None or isinstance(kwargs.get("cache"), PagedAttentionCache)
            or kwargs.get("output_attentions")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def use_on_cpu(model: Any) -> None:
    """Give a CPU model of ``MODEL_TYPES`` loaded with SDPA attention ``sdpa_gqa`` (registered with
    transformers, with SDPA's masks, once per process); other models and devices are left as they are."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if (model.device.type != "cpu" or getattr(model.config, "model_type", None) not in MODEL_TYPES
            or getattr(model.config, "_attn_implementation", None) != "sdpa"):
        return
    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, sdpa_gqa)
    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        # the same masks as SDPA: a name without a mask function gets no mask at all (padding unmasked)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
