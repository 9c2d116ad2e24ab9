"""Model names and run-file names (SPEC §2.2, §2.3, §5.2).

* Model specs: nicknames (``Qwen3-8B``) expand to Hub ids; ``base+adapter`` attaches a LoRA adapter.
* Sanitised model names are the folder/file names of runs; finetuned models start with ``dpo_``.
* Run files are named ``{agent}_emu-{emu}_eval-{eval}[_{quant}][_r{a}-{b}][_{DDMM_HHMMSS}]{suffix}.jsonl``;
  the study's timestamped names are read, this project writes deterministic names without timestamps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.errors import NamingError

NICKNAME_TO_ID: dict[str, str] = {
    "Qwen3-8B": "Qwen/Qwen3-8B",
    "Qwen3-8Bnt": "Qwen/Qwen3-8Bnt",
    "Qwen3-14B": "Qwen/Qwen3-14B",
    "Qwen3-14Bnt": "Qwen/Qwen3-14Bnt",
    "Qwen3-30B": "Qwen/Qwen3-30B-A3B-Thinking-2507",
    "Qwen3-30Bnt": "Qwen/Qwen3-30B-A3B-Instruct-2507",
    "Qwen3-32B": "Qwen/Qwen3-32B",
    "Qwen3-32Bnt": "Qwen/Qwen3-32Bnt",
    "Qwen2.5-7B": "Qwen/Qwen2.5-7B-Instruct",
    "Qwen2.5-32B": "Qwen/Qwen2.5-32B-Instruct",
    "Llama-3B": "meta-llama/Llama-3.2-3B-Instruct",
    "Llama3.2-3B": "meta-llama/Llama-3.2-3B-Instruct",
    "Llama-8B": "meta-llama/Llama-3.1-8B-Instruct",
    "Llama3.1-8B": "meta-llama/Llama-3.1-8B-Instruct",
    "Llama3.1-70B": "meta-llama/Llama-3.1-70B-Instruct",
    "Llama3.3-70B": "meta-llama/Llama-3.3-70B-Instruct",
    "Phi-4": "microsoft/phi-4",
    "Phi-4-mini": "microsoft/Phi-4-mini-instruct",
    "Phi-4-rplus": "microsoft/Phi-4-reasoning-plus",
    "Phi-4-r": "microsoft/Phi-4-reasoning",
    "Mixtral": "mistralai/Mixtral-8x7B-Instruct-v0.1",
    "Mixtral-8x7B": "mistralai/Mixtral-8x7B-Instruct-v0.1",
    "Yi-34B": "01-ai/Yi-34B-Chat",
    "Yi-1.5-34B": "01-ai/Yi-1.5-34B-Chat-16K",
    "Yi-1.5-9B": "01-ai/Yi-1.5-9B-Chat-16K",
    # Small models that ship offline (pipeline.llm.local_models): demo and tests.
    "SmolLM2-135M": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "tiny-llama": "agentpipe/tiny-llama",
    **{g: g for g in ("gpt-5-mini", "gpt-5", "gpt-5.1", "gpt-5.2", "gpt-4o-mini", "gpt-4o")},
}

#: id → nickname; the last nickname wins for shared ids, Qwen3 dense ids map to their plain nickname.
ID_TO_NICKNAME: dict[str, str] = {v: k for k, v in NICKNAME_TO_ID.items()}
ID_TO_NICKNAME.update({f"Qwen/Qwen3-{s}B": f"Qwen3-{s}B" for s in (8, 14, 32)})

#: Words that mark a DPO dataset inside a model name; never use them in source model names.
RESERVED_DATASET_WORDS = ("safe", "help", "both")
_DATASET_MARKER = re.compile(r"_(help|safe|both)(_|$)")
_TRAINED_DIRS = r"(?:dpo_output|dpo_merged|dpo_trained|dpo_adapters)"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_SEED = re.compile(r"_s(\d+)")


def expand_model_name(name: str) -> str:
    """Nickname → Hub id (other strings pass through); in ``base+adapter`` only the base is expanded."""
    base, plus, adapter = name.partition("+")
    return NICKNAME_TO_ID.get(base, base) + plus + adapter


def nickname(model_id: str) -> str:
    """Hub id → nickname when one exists, else the id unchanged."""
    return ID_TO_NICKNAME.get(model_id, model_id)


def _flat(text: str) -> str:
    return text.replace("/", "_").replace(" ", "_")


def sanitize_model_name(name: str) -> str:
    """The folder/file-name form of a model spec (SPEC §2.3 sanitising rules, in order).

    Besides the study's ``dpo_output|dpo_merged|dpo_trained|dpo_adapters/<dir>`` folders, this project's own
    layout ``…/models/<dir>/{adapter,merged,checkpoints/…}`` (DESIGN §4) is recognised as a finetuned model.
    """
    if "+" in name:
        adapter = name.split("+", 1)[1]
        found = _trained_dir(adapter)
        if found is None:
            return _flat(adapter)
        ckpt = _CHECKPOINT.search(adapter)
        return f"dpo_{found}_{ckpt.group(1)}" if ckpt else f"dpo_{found}"
    m = re.match(rf"^{_TRAINED_DIRS}/([^/]+)(/.*)?$", name)
    if m:
        return f"dpo_{m.group(1)}"
    found = _project_model_dir(name)
    if found is not None:
        return f"dpo_{found}"
    return _flat(name)


def _trained_dir(path: str) -> str | None:
    m = re.search(rf"{_TRAINED_DIRS}/([^/]+)", path)
    if m:
        return m.group(1)
    return _project_model_dir(path)


def _project_model_dir(path: str) -> str | None:
    m = re.search(r"(?:^|/)models/([^/]+)/(?:adapter|merged|checkpoints)(?:/|$)", path.rstrip("/") + "/")
    return m.group(1) if m else None


def is_finetuned(sanitized_name: str) -> bool:
    """Finetuned models are the ones whose sanitised name starts with ``dpo_``."""
    return sanitized_name.startswith("dpo_")


def source_model(name: str) -> str:
    """The source (pre-finetuning) model of a sanitised model name, as a nickname where one exists."""
    if name.startswith("dpo_"):
        first = name[4:].split("_", 1)[0]
        return nickname(expand_model_name(first))
    marker = _DATASET_MARKER.search(name)
    if marker:
        return name[: marker.start()]
    stripped = re.sub(r"_s\d+$", "", name)
    if "_" in stripped:
        as_id = stripped.replace("_", "/", 1)
        if as_id in ID_TO_NICKNAME:
            return ID_TO_NICKNAME[as_id]
    return name


def extract_seed(text: str) -> int | None:
    """The split seed named by ``_s<N>`` in a model name or path; several different values are an error."""
    seeds = {int(s) for s in _SEED.findall(text)}
    if not seeds:
        return None
    if len(seeds) > 1:
        raise NamingError(f"ambiguous seed in '{text}': found _s{', _s'.join(str(s) for s in sorted(seeds))}; "
                          "expected one seed value")
    return seeds.pop()


# --------------------------------------------------------------------------------------------- run files
EVAL_TYPES = ("agent_safe", "agent_help_ignore_safety", "agent_help")
QUANTIZATIONS = ("int4", "int8", "fp16", "bf16")


def file_quantization(quantization: str | None) -> str | None:
    """The quantization part of a run-file name: precisions such as int4, int8, fp8, bf16. A pre-quantized
    checkpoint's method (awq, gptq) is not named: the model id already says which weights ran."""
    return quantization if quantization and re.fullmatch(r"(?:int|fp|bf)\d+", quantization) else None

_RUN_NAME = re.compile(
    r"^(?P<agent>.+?)_emu-(?P<emu>.+?)_eval-(?P<eval>.+?)"
    r"(?=_(?:int|fp|bf)\d+|_r\d+-\d+|_\d{4}_\d{6}|_eval_|_unified|$)"
    r"(?:_(?P<quant>(?:int|fp|bf)\d+))?"
    r"(?:_r(?P<start>\d+)-(?P<end>\d+))?"
    r"(?:_(?P<ts>\d{4}_\d{6}))?"
    r"(?P<suffix>.*)$",
    re.DOTALL,
)
_EVAL_SUFFIX = re.compile(r"^_eval_(agent_help_ignore_safety|agent_safe|agent_help)(?:_t(?P<temp>[0-9.]+))?$")


@dataclass(frozen=True)
class RunFileName:
    """The parts of a run file name. ``suffix`` is what follows the timestamp, e.g. ``_eval_agent_safe``."""

    agent: str
    emulator: str
    evaluator: str
    quantization: str | None = None
    case_range: tuple[int, int] | None = None
    timestamp: str | None = None
    suffix: str = ""
    extension: str = ".jsonl"

    @property
    def eval_type(self) -> str | None:
        """``agent_safe`` / ``agent_help_ignore_safety`` / ``agent_help`` for eval files, else None."""
        m = _EVAL_SUFFIX.match(self.suffix)
        return m.group(1) if m else None

    @property
    def is_trajectory_file(self) -> bool:
        return self.suffix == "" and self.extension == ".jsonl"

    @property
    def stem(self) -> str:
        """Name without suffix and extension: the trajectory file's stem, shared by its eval files."""
        parts = [f"{self.agent}_emu-{self.emulator}_eval-{self.evaluator}"]
        if self.quantization:
            parts.append(self.quantization)
        if self.case_range is not None:
            parts.append(f"r{self.case_range[0]}-{self.case_range[1]}")
        if self.timestamp:
            parts.append(self.timestamp)
        return "_".join(parts)

    @property
    def config_key(self) -> tuple[str, str, str, str | None]:
        """(agent, emulator, evaluator, quantization): one run configuration, across its range files."""
        return (self.agent, self.emulator, self.evaluator, self.quantization)

    def filename(self) -> str:
        return self.stem + self.suffix + self.extension

    def trajectory(self) -> RunFileName:
        """The trajectory file this (eval) file belongs to."""
        return replace(self, suffix="", extension=".jsonl")

    def eval_file(self, eval_type: str, temperature: float | None = None) -> RunFileName:
        """The eval file of this trajectory file for one evaluator (``_t<temp>`` when temperature > 0)."""
        if eval_type not in EVAL_TYPES:
            raise NamingError(f"unknown eval type '{eval_type}'; expected one of {', '.join(EVAL_TYPES)}")
        temp = f"_t{temperature:g}" if temperature else ""
        return replace(self, suffix=f"_eval_{eval_type}{temp}", extension=".jsonl")

    def report(self) -> RunFileName:
        """The unified-report name of this configuration (no range, no timestamp)."""
        return replace(self, case_range=None, timestamp=None, suffix="_unified_report", extension=".json")


def parse_run_filename(name: str) -> RunFileName:
    """Parse a run file name (a basename; the study's timestamped names are accepted)."""
    base = name.rsplit("/", 1)[-1]
    ext = ".jsonl" if base.endswith(".jsonl") else ".json" if base.endswith(".json") else ""
    if not ext:
        raise NamingError(f"run file '{base}': expected a .jsonl or .json file name")
    body = base[: -len(ext)]
    if "_emu-" not in body or "_eval-" not in body:
        raise NamingError(f"run file '{base}': expected '<agent>_emu-<emulator>_eval-<evaluator>…{ext}'")
    m = _RUN_NAME.match(body)
    if not m:
        raise NamingError(f"run file '{base}': cannot parse agent/emulator/evaluator")
    if re.search(r"_r\d", m["eval"]) or re.match(r"_r\d", m["suffix"]):
        raise NamingError(f"run file '{base}': malformed case range; expected _r<start>-<end>")
    case_range = None
    if m["start"] is not None:
        start, end = int(m["start"]), int(m["end"])
        if not 0 <= start < end:
            raise NamingError(f"run file '{base}': case range r{start}-{end} must have 0 <= start < end")
        case_range = (start, end)
    return RunFileName(
        agent=m["agent"], emulator=m["emu"], evaluator=m["eval"], quantization=m["quant"],
        case_range=case_range, timestamp=m["ts"], suffix=m["suffix"], extension=ext,
    )


def names_run_files(name: str) -> bool:
    """Whether ``name`` can be any of the three model parts of a run file's name (agent, emulator, evaluator):
    each such name, and its eval file's, parses back to the same parts."""
    for rf in (RunFileName(name, "e", "j", quantization="int4", case_range=(0, 15)),
               RunFileName("a", name, "j", case_range=(0, 15)),
               RunFileName("a", "e", name, quantization="int4", case_range=(0, 15))):
        for f in (rf, rf.eval_file("agent_safe")):
            try:
                if parse_run_filename(f.filename()) != f:
                    return False
            except NamingError:
                return False
    return True


def confined_path(folder: str | Path, name: str, option: str) -> Path:
    """``folder / name`` for a ``name`` made from a user's option (``option``, e.g. ``--evaluator``): it must be
    one plain file or folder name (no separator, not ``.`` or ``..``), so that the path stays inside ``folder``
    whatever the option says; otherwise ``ConfigError`` naming the option. Every name that becomes part of an
    output path goes through here."""
    from pipeline.errors import ConfigError

    if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise ConfigError(f"{option}: the output name {name!r} made from it is not a plain file name (no '/', "
                          f"'\\', '.' or '..'); it must stay inside {folder}")
    return Path(folder) / name
