"""The HF transformers backend: true batched generation on CPU or GPU, LoRA adapters, quantization.

Models load once per process (``loading``: cached by weights + adapter + dtype + quantization). Requests are
grouped by sampling settings, sorted by prompt length and generated in batches with left padding; each row stops on
its own EOS, stop sequences or token cap (``decoding``). On CUDA out-of-memory the batch is halved and retried. A
sampled request draws from its own seeded stream, so its answer does not depend on its batch. Prompts that start
like an earlier one are prefilled from where they differ (``prefix``); ``score_choices`` is in ``choices``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.llm.base import ChatBackend, Progress
from pipeline.llm.hf.decoding import RowSampler, RowStopper, check_sampling_settings
from pipeline.llm.hf.loading import (ADAPTER_NAMES, BASE_ADAPTER, LOADED, LOADED_ADAPTERS, adapter_id, attach_adapter,
                                     is_peft, load_model, model_key, resolve_model_id)
from pipeline.llm.hf.prefix import (PREFIX_CACHES, PrefixCache, cache_keyword, default_budget_bytes, forward_reusing,
                                    prefill_alone)
from pipeline.llm.local_common import DEFAULT_MAX_NEW_TOKENS, folder_revision, render_prompt
from pipeline.llm.options import normalize_dtype
from pipeline.llm.spec import ModelSpec
from pipeline.llm.types import ChatRequest, ChatResponse

log = logging.getLogger("pipeline.llm.hf")

#: why a request whose answer must match a regular expression fails here
UNCONSTRAINED = ("a constrained answer needs the vLLM engine (vllm:<model>, a regex) or an API (a JSON schema); this "
                 "backend cannot constrain it")


PREFILL_MODES = ("auto", "batched", "per_request")


class HFBackend(ChatBackend):
    """Local transformers models. Options: ``batch_size`` (halved on OOM), ``dtype`` (auto: bf16 on GPU,
    fp32 on CPU; or bfloat16/float16/float32), ``quantization`` (int4/int8 via bitsandbytes, fp16, bf16),
    ``prefill`` (``per_request``: each prompt's KV cache is computed alone, unpadded, and only decoding is
    batched; ``batched``: one padded forward pass; ``auto``, the default: per request on CPU, where a padded
    batched prefill of long prompts is slower than one prompt at a time, batched on GPU). vLLM engine options
    (pipeline.llm.options.VLLM_ONLY) are accepted and ignored.

    Requests may name their own LoRA adapter (``ChatRequest.adapter``): adapters are loaded once into the model
    and rows for different adapters and the base run in one batch (peft's mixed-adapter batches).

    ``prefix_cache_gb``: memory for the key/value caches of recent prompts (``pipeline.llm.hf.prefix``;
    default 4 GiB on CPU, a fifth of the free GPU memory; 0 turns reuse off). A prompt that starts like a cached
    one (an episode's next step) is prefilled from where they differ. Used by per-request prefill and by
    choice scoring one request at a time (the CPU default); a batched prefill (GPU) skips it."""

    def __init__(self, spec: ModelSpec, *, batch_size: int | None = None, dtype: str | None = "auto",
                 quantization: str | None = None, device: str | None = None, prefill: str = "auto",
                 prefix_cache_gb: float | None = None, **engine_options: Any) -> None:
        from pipeline.llm.options import VLLM_ONLY

        unknown = sorted(set(engine_options) - VLLM_ONLY)
        if unknown:
            raise TypeError(f"HFBackend got unexpected options {unknown}")
        if prefill not in PREFILL_MODES:
            raise ConfigError(f"prefill '{prefill}': expected one of {', '.join(PREFILL_MODES)}")
        self.spec = spec
        self.batch_size = max(1, batch_size or 16)
        self._key = model_key(spec, normalize_dtype(dtype), quantization, device)
        load_model(spec, dtype=dtype, quantization=quantization, device=device)
        self.prefill_per_request = (prefill == "per_request"
                                    or (prefill == "auto" and self.model.device.type == "cpu"))
        self.prefix: PrefixCache | None = None
        if prefix_cache_gb is None or prefix_cache_gb > 0:
            budget = (default_budget_bytes(self.model.device.type) if prefix_cache_gb is None
                      else int(prefix_cache_gb * 2**30))
            self.prefix = PREFIX_CACHES.setdefault(self._key, PrefixCache(budget))
        path = resolve_model_id(spec.load_id)
        self.revision = folder_revision(path) if Path(path).is_dir() else spec.load_id
        if spec.adapter:
            self.revision += "+" + folder_revision(spec.adapter)
        self.revision += f":{quantization or 'none'}:{normalize_dtype(dtype)}"

    @property
    def model(self) -> Any:
        """The loaded model, looked up each time: loading a request's adapter may wrap it in a PeftModel, and
        every backend sharing these weights must then see (and name adapters for) the wrapped one."""
        return LOADED[self._key][0]

    @property
    def tok(self) -> Any:
        return LOADED[self._key][1]

    def adapter_names(self, reqs: Sequence[ChatRequest]) -> list[str] | None:
        """peft adapter names per row (loading request adapters on first use), or None for a plain model."""
        for r in reqs:
            if r.adapter:
                self._load_request_adapter(r.adapter)
        if not is_peft(self.model):
            return None
        own = "default" if self.spec.adapter else BASE_ADAPTER
        return [ADAPTER_NAMES[adapter_id(r.adapter)] if r.adapter else own for r in reqs]

    def _load_request_adapter(self, adapter: str) -> None:
        aid = adapter_id(adapter)
        loaded = LOADED_ADAPTERS.setdefault(self._key, set())
        if aid in loaded:
            return
        name = ADAPTER_NAMES.setdefault(aid, f"adapter_{len(ADAPTER_NAMES) + 1}")
        model, tok = LOADED[self._key]
        model = attach_adapter(model, self.spec, adapter, name)
        model.eval()
        LOADED[self._key] = (model, tok)
        loaded.add(aid)

    def max_model_length(self) -> int:
        """Context length: the model's position limit (the tokenizer's limit is often a huge placeholder)."""
        limit = getattr(self.model.config, "max_position_embeddings", None) or 10**9
        tok_limit = getattr(self.tok, "model_max_length", None) or 10**9
        return int(min(limit, tok_limit if tok_limit < 10**8 else limit))

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text the model sees (the tokenizer's chat template with the generation prompt)."""
        return render_prompt(self.tok, self.spec, messages)

    def generate(self, requests: Sequence[ChatRequest], progress: Progress | None = None) -> list[ChatResponse]:
        out: list[ChatResponse | None] = [None] * len(requests)
        if any(r.config.temperature > 0 for r in requests):  # a model's setting: refused before any request runs
            check_sampling_settings(self.model.generation_config, self.spec.model)
        prompts: list[str | None] = []
        for i, r in enumerate(requests):
            if r.config.regex or r.config.json_schema:  # never answered unconstrained in its place
                prompts.append(None)
                out[i] = ChatResponse.failure(UNCONSTRAINED)
                continue
            try:
                prompts.append(self.render(r.messages))
            except Exception as e:  # a bad message list fails only its own request
                prompts.append(None)
                out[i] = ChatResponse.failure(f"chat template failed: {e}")
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            if prompts[i] is not None:
                c = r.config
                # seeds are per row (RowSampler), so requests of one temperature and top_p share batches
                sampling = (c.temperature, c.top_p) if c.temperature > 0 else (0.0, 1.0)
                groups.setdefault(sampling, []).append(i)
        done = sum(o is not None for o in out)
        max_len = self.max_model_length()
        for sampling, idxs in list(groups.items()):
            lengths = {i: len(self.tok(prompts[i], add_special_tokens=False)["input_ids"]) for i in idxs}
            for i in [i for i in idxs if lengths[i] >= max_len]:
                out[i] = ChatResponse.failure(f"prompt of {lengths[i]} tokens is longer than the maximum model "
                                              f"length {max_len}")
                idxs.remove(i)
                done += 1
            idxs.sort(key=lambda i: lengths[i])
            start = 0
            while start < len(idxs):
                chunk = idxs[start:start + self.batch_size]
                try:
                    results = self._generate_batch([prompts[i] for i in chunk],  # type: ignore[misc]
                                                   [requests[i] for i in chunk], sampling)
                except Exception as e:
                    if _is_oom(e) and self.batch_size > 1:
                        self.batch_size //= 2
                        log.warning("out of memory: batch size halved to %d", self.batch_size)
                        _empty_cache()
                        continue
                    results = [ChatResponse.failure(f"generation failed: {type(e).__name__}: {e}")] * len(chunk)
                for i, res in zip(chunk, results):
                    out[i] = res
                start += len(chunk)
                done += len(chunk)
                if progress:
                    progress(done, len(requests))
        return out  # type: ignore[return-value]

    def _generate_batch(self, prompts: list[str], reqs: list[ChatRequest], sampling: tuple) -> list[ChatResponse]:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        from pipeline.llm.hf.growing_cache import growing_cache

        t0 = time.perf_counter()
        enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
        names = self.adapter_names(reqs)
        prompt_len = enc["input_ids"].shape[1]
        room = max(1, self.max_model_length() - prompt_len)  # never run past the model's positions
        caps = [min(r.config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, room) for r in reqs]
        stopper = RowStopper(self.tok, prompt_len, [r.config.stop for r in reqs], caps)
        temperature, top_p = sampling
        gen_kwargs: dict[str, Any] = {"max_new_tokens": max(caps), "pad_token_id": self.tok.pad_token_id,
                                      "stopping_criteria": StoppingCriteriaList([stopper])}
        if names is not None:
            gen_kwargs["adapter_names"] = names
        # greedy decoding of the token each row's own sampler picked (or of the most likely one at temperature 0)
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if temperature > 0:
            sampler = RowSampler([r.config.seed for r in reqs], temperature, top_p,
                                  getattr(self.model.generation_config, "top_k", None), self.model.device)
            gen_kwargs["logits_processor"] = LogitsProcessorList([sampler])
        with torch.inference_mode():
            # on CPU the cache has room for every token to be decoded: none is copied per token (growing_cache)
            decode_room = max(caps) + 1
            prefilled = None
            if self.prefill_per_request and (len(prompts) > 1 or self.prefix is not None):
                prefilled = prefill_alone(self.forward_reusing, self.model, enc, names, decode_room)
            if prefilled is None:
                cache = growing_cache(self.model, decode_room)
                prefilled = None if cache is None else (cache_keyword(), cache)
            if prefilled is not None:  # after prefill_alone, generate runs only each prompt's last token, batched
                gen_kwargs[prefilled[0]] = prefilled[1]
            seqs = self.model.generate(**enc, **gen_kwargs)
        latency = time.perf_counter() - t0
        eos_ids = self._eos_ids()
        results = []
        for row, r in enumerate(reqs):
            n_prompt = int(enc["attention_mask"][row].sum())
            new = seqs[row, prompt_len:].tolist()[: caps[row]]
            # a row that ended on EOS is padded (with EOS/pad) while the others go on, and may reach its cap
            # in padding: it stopped at its first EOS, not by length
            end = next((j for j, t in enumerate(new) if t in eos_ids), None)
            if end is not None:
                new, finish = new[: end + 1], "stop"
            else:
                finish = "stop" if stopper.reason[row] == "stop" else "length"
            text = self.tok.decode([t for t in new if t not in eos_ids], skip_special_tokens=True)
            cut = [text.find(s) for s in r.config.stop if s in text]
            if cut:
                text, finish = text[: min(cut)], "stop"
            results.append(ChatResponse(text=text, finish_reason=finish, prompt_tokens=n_prompt,
                                        completion_tokens=len(new), latency_s=latency / len(reqs)))
        return results

    def forward_reusing(self, ids: Any, name: str | None, adapter: dict[str, Any],
                        keep: int = 1) -> tuple[Any, Any]:
        """``prefix.forward_reusing`` on this backend's model and prefix cache; a model whose cache cannot be
        cropped and padded turns reuse off for this backend."""
        out, cache = forward_reusing(self.model, self.prefix, ids, name, adapter, keep)
        if cache is None:
            self.prefix = None
        return out, cache

    def score_choices(self, requests: Sequence[ChatRequest], prefix: str, choices: Sequence[str]) -> list[list[float]]:
        """Sum of token log-probs of ``prefix + choice`` continuations' choice tokens, per request and choice
        (``pipeline.llm.hf.choices``)."""
        from pipeline.llm.hf.choices import score_choices

        return score_choices(self, requests, prefix, choices)

    def _eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        out = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        out.update(i for i in (self.tok.eos_token_id, self.tok.pad_token_id) if i is not None)
        return out



def _is_oom(e: Exception) -> bool:
    return "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"


def _empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
