"""Model spec strings (DESIGN §5): which backend, which weights, which adapter.

* ``Qwen3-8B`` (nickname), ``Qwen/Qwen3-8B`` (Hub id) or ``/path/to/model`` → HF transformers
* ``vllm:<id or path>`` → vLLM offline engine
* ``openai:<model>`` → any OpenAI-compatible endpoint (base URL from settings); bare ``gpt-*`` names too
* ``<base>+<adapter_path>`` → a LoRA adapter on top of the base (HF and vLLM)
* ``scripted:<script>[?<option>=<value>&…][#<name>]`` → the deterministic test double (tests and rehearsals only,
  never a default), named ``<name>`` in run-file and folder names when given (a rehearsal's double of a model the
  study did not record); its options (``pipeline.llm.scripted``) slow it down or make it fail, for tests of
  interruptions and outages
* ``replay:<run file or folder>[#<name>]`` → the outputs a recording holds, per case and role (the agent and
  emulator: ``pipeline.emulation.replay``; the judge: ``pipeline.evaluation.replay``); ``<name>`` is the name the
  replayed model takes in run-file and folder names (default: the path's, when short and not itself a run
  file's name)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pipeline.data.naming import expand_model_name, names_run_files, sanitize_model_name
from pipeline.errors import ConfigError

Backend = Literal["hf", "vllm", "openai", "scripted", "replay"]
_PREFIXES: dict[str, Backend] = {"vllm:": "vllm", "openai:": "openai", "scripted:": "scripted", "hf:": "hf",
                                 "replay:": "replay"}


@dataclass(frozen=True)
class ModelSpec:
    raw: str
    backend: Backend
    #: Hub id, local path or API model name (nicknames expanded; names keep the study's ``…Bnt`` ids).
    model: str
    adapter: str | None = None
    #: Qwen3 "nt" ids (``…Bnt``): load the plain id with thinking disabled in the chat template.
    enable_thinking: bool | None = None
    #: ``replay:<path>#<label>`` / ``scripted:<script>#<label>``: the name the model takes in file names (already in
    #: file-name form)
    label: str | None = None
    #: ``scripted:<script>?<option>=<value>&…``: the test double's options, as given (not part of ``name``)
    options: tuple[tuple[str, str], ...] = ()

    @property
    def load_id(self) -> str:
        """What to load: ``…Bnt`` ids are the plain ``…B`` weights (with thinking disabled)."""
        return self.model.replace("Bnt", "B") if self.enable_thinking is False else self.model

    @property
    def name(self) -> str:
        """The sanitised name used in run-file and folder names (a replay spec's ``#label`` verbatim)."""
        if self.label is not None:
            return self.label
        name = sanitize_model_name(self.model + (f"+{self.adapter}" if self.adapter else ""))
        if self.backend == "replay" and (len(name) > _MAX_DEFAULT_NAME or not names_run_files(name)):
            # a path's flattened form can hold a run file's own parts ('_emu-', '_eval_', '_r0-15', …), which
            # would misparse as this run's, and a long path would pass the file system's 255-byte name limit
            why = f"over {_MAX_DEFAULT_NAME} characters" if len(name) > _MAX_DEFAULT_NAME else \
                "it holds parts of a run file's name"
            shown = name if len(name) <= _MAX_DEFAULT_NAME else name[:_MAX_DEFAULT_NAME] + "…"
            raise ConfigError(f"model spec '{self.raw}': name the replayed model with replay:<path>#<name> "
                              f"(e.g. #Qwen_Qwen3-8B); the path's own name '{shown}' cannot name a run file ({why})")
        return name


def parse_model_spec(spec: str) -> ModelSpec:
    """Parse a model spec string; raises ``ConfigError`` for an empty or malformed one."""
    raw = spec.strip()
    if not raw:
        raise ConfigError("model spec: expected a nickname, Hub id, path, vllm:<id>, openai:<model> or base+adapter")
    backend: Backend = "hf"
    body = raw
    for prefix, name in _PREFIXES.items():
        if raw.startswith(prefix):
            backend, body = name, raw[len(prefix):]
            break
    else:
        if raw.startswith(("gpt-", "o1", "o3", "o4")):
            backend = "openai"
    label = None
    if backend in ("replay", "scripted") and "#" in body:  # the optional #label: the name in file names
        body, _, label = body.rpartition("#")
        _check_label(raw, label)
    options: tuple[tuple[str, str], ...] = ()
    if backend == "scripted" and "?" in body:
        body, _, query = body.partition("?")
        options = _options(raw, query)
    base, plus, adapter = body.partition("+")
    if backend == "replay":  # a file or folder path (no adapter, no nickname)
        base, plus, adapter = body, "", ""
    if plus and (not base or not adapter):
        raise ConfigError(f"model spec '{raw}': expected <base>+<adapter_path>")
    if plus and backend in ("openai", "scripted"):
        raise ConfigError(f"model spec '{raw}': adapters need a local backend (hf or vllm)")
    if not base:
        raise ConfigError(f"model spec '{raw}': missing model name")
    model = expand_model_name(base) if backend in ("hf", "vllm") else base
    enable_thinking = None
    if backend in ("hf", "vllm") and "Bnt" in model:
        enable_thinking = False
    return ModelSpec(raw=raw, backend=backend, model=model, adapter=adapter or None, enable_thinking=enable_thinking,
                     label=label, options=options)


def _options(raw: str, query: str) -> tuple[tuple[str, str], ...]:
    """``a=1&b=2`` → ``(("a", "1"), ("b", "2"))``; which names a backend accepts is the backend's to check."""
    out = []
    for item in query.split("&"):
        key, eq, value = item.partition("=")
        if not key or not eq:
            raise ConfigError(f"model spec '{raw}': expected ?<option>=<value>&… after the script name, got '{item}'")
        out.append((key, value))
    return tuple(out)


#: The longest path-derived replay name (a run file's name holds three model names and must stay under 255 bytes).
_MAX_DEFAULT_NAME = 60

#: A model name in file-name form: what ``sanitize_model_name`` leaves as it is.
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _check_label(raw: str, label: str) -> None:
    """A replay or scripted spec's ``#name`` must already be a run-file name part (it is used verbatim)."""
    if not _FILE_NAME.fullmatch(label) or sanitize_model_name(label) != label or not names_run_files(label):
        raise ConfigError(f"model spec '{raw}': expected replay:<path>#<name> or scripted:<script>#<name> with a "
                          "model name in file-name form (letters, digits, '.', '_', '-'; e.g. Qwen_Qwen3-8B), "
                          f"got '{label}'")
