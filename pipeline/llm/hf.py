"""HF transformers backend: true batched generation on CPU or GPU, LoRA adapters, quantization.

Models load once per process (``hf_loading``: cached by weights + adapter + dtype + quantization). Requests are
grouped by sampling settings, sorted by prompt length and generated in batches with left padding; each row stops on
its own EOS, stop sequences or token cap. On CUDA out-of-memory the batch is halved and retried. A sampled
request draws from its own seeded stream (``_RowSampler``), so its answer does not depend on its batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.llm.base import ChatBackend, Progress
from pipeline.llm.hf_loading import (ADAPTER_NAMES, BASE_ADAPTER, LOADED, LOADED_ADAPTERS, adapter_id, attach_adapter,
                                     is_peft, load_model, model_key, resolve_model_id)
from pipeline.llm.local_common import DEFAULT_MAX_NEW_TOKENS, folder_revision, render_prompt, single_token_choices
from pipeline.llm.options import normalize_dtype
from pipeline.llm.spec import ModelSpec
from pipeline.llm.types import ChatRequest, ChatResponse

log = logging.getLogger("pipeline.llm.hf")

#: loaded model key → its prompt-prefix KV cache (shared by every backend on those weights: agent and emulator)
_PREFIX_CACHES: dict[tuple, Any] = {}


class _RowStopper:
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


class _RowSampler:
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


#: generation-config settings ``generate`` would apply when sampling that ``_RowSampler`` does not, with the values
#: that leave sampling unchanged
_UNAPPLIED_SAMPLING = {"min_p": (None, 0, 0.0), "typical_p": (None, 1, 1.0), "epsilon_cutoff": (None, 0, 0.0),
                       "eta_cutoff": (None, 0, 0.0), "top_h": (None, 0, 0.0)}


def _check_sampling_settings(generation_config: Any, model: str) -> None:
    """Refuse to sample a model whose generation config sets a warper the row sampler does not apply: its
    samples would come from another distribution than ``generate``'s (and the fingerprint would not say so)."""
    set_ = {k: getattr(generation_config, k, None) for k, neutral in _UNAPPLIED_SAMPLING.items()
            if getattr(generation_config, k, None) not in neutral}
    if set_:
        from pipeline.errors import ConfigError

        shown = ", ".join(f"{k}={v}" for k, v in sorted(set_.items()))
        raise ConfigError(f"{model}: its generation config sets {shown}, which sampling here does not apply; "
                          "sample at temperature 0, or clear these settings in the model's generation_config.json")


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

    ``prefix_cache_gb``: memory for the key/value caches of recent prompts (``pipeline.llm.prefix_cache``;
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
        self.prefix = None
        if prefix_cache_gb is None or prefix_cache_gb > 0:
            from pipeline.llm.prefix_cache import PrefixCache, default_budget_bytes

            budget = (default_budget_bytes(self.model.device.type) if prefix_cache_gb is None
                      else int(prefix_cache_gb * 2**30))
            self.prefix = _PREFIX_CACHES.setdefault(self._key, PrefixCache(budget))
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

    def _adapter_names(self, reqs: Sequence[ChatRequest]) -> list[str] | None:
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
            _check_sampling_settings(self.model.generation_config, self.spec.model)
        prompts: list[str | None] = []
        for i, r in enumerate(requests):
            try:
                prompts.append(self.render(r.messages))
            except Exception as e:  # a bad message list fails only its own request
                prompts.append(None)
                out[i] = ChatResponse.failure(f"chat template failed: {e}")
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            if prompts[i] is not None:
                c = r.config
                # seeds are per row (_RowSampler), so requests of one temperature and top_p share batches
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

        t0 = time.perf_counter()
        enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
        names = self._adapter_names(reqs)
        prompt_len = enc["input_ids"].shape[1]
        room = max(1, self.max_model_length() - prompt_len)  # never run past the model's positions
        caps = [min(r.config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, room) for r in reqs]
        stopper = _RowStopper(self.tok, prompt_len, [r.config.stop for r in reqs], caps)
        temperature, top_p = sampling
        gen_kwargs: dict[str, Any] = {"max_new_tokens": max(caps), "pad_token_id": self.tok.pad_token_id,
                                      "stopping_criteria": StoppingCriteriaList([stopper])}
        if names is not None:
            gen_kwargs["adapter_names"] = names
        # greedy decoding of the token each row's own sampler picked (or of the most likely one at temperature 0)
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if temperature > 0:
            sampler = _RowSampler([r.config.seed for r in reqs], temperature, top_p,
                                  getattr(self.model.generation_config, "top_k", None), self.model.device)
            gen_kwargs["logits_processor"] = LogitsProcessorList([sampler])
        with torch.inference_mode():
            if self.prefill_per_request and (len(prompts) > 1 or self.prefix is not None):
                prefilled = self._prefill_alone(enc, names)
                if prefilled is not None:  # generate then runs only each prompt's last token, batched
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

    def _prefill_alone(self, enc: Any, names: list[str] | None = None) -> tuple[str, Any] | None:
        """The batch's KV cache over all but each prompt's last token, computed one unpadded prompt at a time
        (identical prompts, e.g. an evaluation's replicates, once) and left-padded into one cache, with the
        keyword ``generate`` takes it by; None (use the batched prefill) when the model's cache is not a plain
        one."""
        import torch
        from transformers import DynamicCache

        ids, mask = enc["input_ids"], enc["attention_mask"]
        width = ids.shape[1] - 1
        rows, done = [], {}
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            if n < 2:
                return None
            head = ids[row:row + 1, ids.shape[1] - n:-1]
            adapter = {"adapter_names": [names[row]]} if names is not None else {}
            key = (tuple(head[0].tolist()), names[row] if names is not None else None)
            if key not in done:
                out, cache = self._forward_reusing(head, names[row] if names is not None else None, adapter)
                cache_kw = _cache_keyword()
                if cache is None:
                    return None  # sliding-window or hybrid caches: not padded here
                done[key] = cache
            rows.append(done[key])
        layers = []
        for i in range(len(rows[0].layers)):
            keys = [torch.nn.functional.pad(c.layers[i].keys, (0, 0, width - c.layers[i].keys.shape[-2], 0))
                    for c in rows]
            values = [torch.nn.functional.pad(c.layers[i].values, (0, 0, width - c.layers[i].values.shape[-2], 0))
                      for c in rows]
            layers.append((torch.cat(keys), torch.cat(values)))
        return cache_kw, DynamicCache(ddp_cache_data=layers, config=self.model.config)

    def _forward_reusing(self, ids: Any, name: str | None, adapter: dict[str, Any], keep: int = 1) -> tuple[Any, Any]:
        """One unpadded prompt's forward pass (logits of its last ``keep`` tokens) and its plain DynamicCache, starting
        from the longest cached prefix when the prefix cache has one; the result is cached in turn. The cache
        is None for models whose cache is not a plain DynamicCache (then nothing is reused or kept)."""
        from transformers import DynamicCache

        row = ids[0].cpu()
        n, key, layers = self.prefix.lookup(row, name) if self.prefix is not None else (0, None, [])
        n = min(n, int(row.numel()) - keep)  # the last ``keep`` tokens run: their logits are wanted
        if n > 0:
            past = DynamicCache(ddp_cache_data=[(k[:, :, :n], v[:, :, :n]) for k, v in layers],
                                config=self.model.config)
            out = self.model(input_ids=ids[:, n:], use_cache=True, logits_to_keep=keep,
                             **{_cache_keyword(): past}, **adapter)
        else:
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=keep, **adapter)
        _, cache = _output_cache(out)
        if cache is None or type(cache) is not DynamicCache or any(
                type(layer).__name__ != "DynamicLayer" for layer in cache.layers):
            self.prefix = None  # this model's cache cannot be cropped and padded: no reuse
            return out, None
        if self.prefix is not None:
            self.prefix.store(row, name, [(layer.keys, layer.values) for layer in cache.layers], (n, key))
        return out, cache

    def score_choices(self, requests: Sequence[ChatRequest], prefix: str, choices: Sequence[str]) -> list[list[float]]:
        """Sum of token log-probs of ``prefix + choice`` continuations' choice tokens, per request and choice
        (batched forward passes with left padding, or one request at a time with ``prefill`` per request)."""
        names = self._adapter_names(requests) or [None] * len(requests)
        all_heads = [(self.render(r.messages) + prefix, name) for r, name in zip(requests, names)]
        heads = list(dict.fromkeys(all_heads))  # identical prompts (an evaluation's replicates) are scored once
        row_of = {h: i for i, h in enumerate(heads)}
        single = self._single_token_choices(heads[0][0] if heads else prefix, choices)
        if single is not None:  # the usual case (digits): one forward pass per request scores every choice
            unique = self._next_token_logprobs(heads, single)
        else:
            unique = self._choice_token_logprobs(heads, choices)
        return [list(unique[row_of[h]]) for h in all_heads]

    @property
    def _forward_batch(self) -> int:
        """Rows per scoring forward pass: one (unpadded) when prefilling per request, else the batch size."""
        return 1 if self.prefill_per_request else self.batch_size

    def _choice_token_logprobs(self, heads: list[tuple[str, str | None]],
                               choices: Sequence[str]) -> list[list[float]]:
        """Summed log-probs of each (possibly multi-token) choice after each (head, adapter name)."""
        import torch

        rows = []  # (request index, choice index, token ids, number of choice tokens)
        for i, (head, _) in enumerate(heads):
            head_ids = self.tok(head, add_special_tokens=False)["input_ids"]
            for j, choice in enumerate(choices):
                full = self.tok(head + choice, add_special_tokens=False)["input_ids"]
                n_choice = len(full) - len(head_ids)
                if n_choice < 1 or full[: len(head_ids)] != head_ids:  # the choice merged into the prefix
                    n_choice = max(1, len(self.tok(choice, add_special_tokens=False)["input_ids"]))
                rows.append((i, j, full, n_choice))
        out = [[float("-inf")] * len(choices) for _ in heads]
        pad = self.tok.pad_token_id
        step = self._forward_batch
        for start in range(0, len(rows), step):
            chunk = rows[start:start + step]
            width = max(len(ids) for _, _, ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for k, (_, _, ids, _) in enumerate(chunk):
                input_ids[k, width - len(ids):] = torch.tensor(ids)
                mask[k, width - len(ids):] = 1
            keep = max(n for *_, n in chunk) + 1  # only the logits that predict the choice tokens
            adapter = ({"adapter_names": [heads[i][1] for i, *_ in chunk]} if heads[0][1] is not None else {})
            with torch.inference_mode():
                if step == 1 and self.prefix is not None:  # one unpadded row: start from a cached prefix
                    logits = self._forward_reusing(input_ids.to(self.model.device), heads[chunk[0][0]][1],
                                                   adapter, keep)[0].logits.float()
                else:
                    logits = self.model(input_ids=input_ids.to(self.model.device), attention_mask=mask.to(
                        self.model.device), logits_to_keep=keep, **adapter).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            targets = input_ids[:, -(keep - 1):].to(logp.device)
            token_lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            for k, (i, j, _, n_choice) in enumerate(chunk):
                out[i][j] = float(token_lp[k, -n_choice:].sum())
        return out

    def _single_token_choices(self, head: str, choices: Sequence[str]) -> list[int] | None:
        return single_token_choices(lambda t: self.tok(t, add_special_tokens=False)["input_ids"], head, choices)

    def _next_token_logprobs(self, heads: list[tuple[str, str | None]], token_ids: list[int]) -> list[list[float]]:
        import torch

        order = sorted(range(len(heads)), key=lambda i: len(heads[i][0]))
        results: dict[int, list[float]] = {}
        step = self._forward_batch
        for start in range(0, len(order), step):
            idx = order[start:start + step]
            enc = self.tok([heads[i][0] for i in idx], return_tensors="pt", padding=True,
                           add_special_tokens=False).to(self.model.device)
            adapter = {"adapter_names": [heads[i][1] for i in idx]} if heads[0][1] is not None else {}
            with torch.inference_mode():  # left padding: the last position is real
                if step == 1 and self.prefix is not None:  # one unpadded row: start from a cached prefix
                    logits = self._forward_reusing(enc["input_ids"], heads[idx[0]][1], adapter)[0].logits[:, -1]
                    logits = logits.float()
                else:
                    logits = self.model(**enc, logits_to_keep=1, **adapter).logits[:, -1].float()
            logp = torch.log_softmax(logits, dim=-1)[:, token_ids]
            for k, i in enumerate(idx):
                results[i] = [float(x) for x in logp[k]]
        return [results[i] for i in range(len(heads))]

    def _eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        out = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        out.update(i for i in (self.tok.eos_token_id, self.tok.pad_token_id) if i is not None)
        return out


def _output_cache(out: Any) -> tuple[str, Any]:
    """(keyword, cache) of a forward pass's KV cache: transformers 5.2x calls it ``cache``, earlier 5.x lines
    (the one vLLM pins) ``past_key_values``; ``generate`` takes it by the same name."""
    fields = getattr(out, "__dataclass_fields__", {})
    name = "cache" if "cache" in fields else "past_key_values"
    return name, getattr(out, name, None)


def _cache_keyword() -> str:
    """The keyword a forward pass takes its KV cache by (the name of the output field, see _output_cache)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _is_oom(e: Exception) -> bool:
    return "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"


def _empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
