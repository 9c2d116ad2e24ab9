"""The resource rule: what a stage job asks Slurm for, from the models it loads and their quantization.

The study's rule (SPEC §8): a model's size in billions of parameters is the first ``(\\d+)[bB]`` in its id (a
table for Phi models, API models 0, an adapter adds 4); the sizes of the local models a job loads are summed;
when the sum is above the quantization's threshold the job needs a big-memory GPU:

    quantization         threshold   (about)
    none / fp16 / bf16   > 24 B      2 GB per B
    int8                 > 35 B      1 GB per B
    int4                 > 65 B      0.5 GB per B

Only API models (or no model) → a CPU job. Deliberate differences from the study, all conservative:
``NxMB`` (Mixtral-8x7B) counts N·M instead of M; ``…135M`` sizes are read (0.135 B); local models under 1 B in
total ("small": SmolLM2-135M, the tiny test model) run as CPU jobs; a local model whose size cannot be read gets
a GPU (the study gave it none).

The rule returns an abstract GPU class (``big``), never a cluster's node or feature name: the connection's
``gpu_constraints`` maps it to a Slurm ``--constraint``. Everything is overridable per task.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

#: Abstract GPU classes the rule can ask for (mapped to --constraint by the connection's gpu_constraints).
GPU_CLASSES = ("big",)
#: Big-GPU thresholds in billions of parameters, by quantization.
THRESHOLDS_B = {"none": 24.0, "fp16": 24.0, "bf16": 24.0, "int8": 35.0, "int4": 65.0,
                # vLLM: fp8 weights take a byte per parameter; AWQ/GPTQ checkpoints are 4-bit; compressed-tensors
                # can be anything, so it is sized as unquantized
                "fp8": 35.0, "awq": 65.0, "gptq": 65.0, "awq_marlin": 65.0, "gptq_marlin": 65.0,
                "compressed-tensors": 24.0}
#: What an adapter adds to its base model's size (study: +4).
ADAPTER_EXTRA_B = 4.0
#: Below this total size, local models run as CPU jobs ("small").
SMALL_B = 1.0
#: Memory cap for "small" CPU jobs (the stage's own figure assumes a real model).
SMALL_MEM = "8G"
#: Sizes the regex cannot read (lower-case id or nickname → billions).
KNOWN_SIZES_B = {
    "microsoft/phi-4": 14.0, "phi-4": 14.0,
    "microsoft/phi-4-mini-instruct": 4.0, "phi-4-mini": 4.0,
    "microsoft/phi-4-reasoning": 14.0, "phi-4-r": 14.0,
    "microsoft/phi-4-reasoning-plus": 14.0, "phi-4-rplus": 14.0,
    "agentpipe/tiny-llama": 0.001, "tiny-llama": 0.001,
}
_TRAINED = re.compile(r"(?:^|/)(?:dpo|sft)_(?:output|merged|trained|adapters)/([^/_]+)")
_MOE = re.compile(r"(\d+)x(\d+(?:\.\d+)?)[bB]")
_BILLIONS = re.compile(r"(\d+(?:\.\d+)?)[bB]")
_MILLIONS = re.compile(r"(\d+(?:\.\d+)?)[mM](?![a-zA-Z])")

#: Per stage (first word, or "word word"): time limit, memory, CPUs; GPU stages get the model rule, CPU stages none.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "emulate": {"time": "03:00:00", "mem": "8G", "cpus": 2},
    "evaluate": {"time": "04:00:00", "mem": "8G", "cpus": 2},
    "evaluate repair": {"time": "02:00:00", "mem": "8G", "cpus": 2},
    "evaluate rerun-failed": {"time": "02:00:00", "mem": "8G", "cpus": 2},
    "train": {"time": "3-00:00:00", "mem": "100G", "cpus": 8},
    "merge": {"time": "00:30:00", "mem": "10G", "cpus": 2},
    "pairs": {"time": "00:30:00", "mem": "4G", "cpus": 1, "cpu_only": True},
    "analyze": {"time": "00:30:00", "mem": "4G", "cpus": 1, "cpu_only": True},
    "report": {"time": "00:30:00", "mem": "4G", "cpus": 1, "cpu_only": True},
    "track": {"time": "00:30:00", "mem": "2G", "cpus": 1, "cpu_only": True},
}
DEFAULT_STAGE = {"time": "03:00:00", "mem": "8G", "cpus": 1}
#: Spec keys that name models a stage loads (the operator reads them when no ``models`` are given).
MODEL_KEYS = ("agent", "emulator", "evaluator", "model", "base_model", "models")
#: Keys a ``resources`` override may set.
OVERRIDE_KEYS = ("gpus", "gpu_constraint", "mem", "time", "partition", "cpus", "constraint", "extra_args")


@dataclass(frozen=True)
class Resources:
    """What one job asks for. ``gpu_constraint`` is an abstract class (``big``) or a literal Slurm constraint."""

    gpus: int = 0
    gpu_constraint: str | None = None
    mem: str = "8G"
    time: str = "03:00:00"
    partition: str | None = None
    cpus: int = 1
    #: Informational: cpu | small | gpu | big (what the rule decided) and the summed local model size.
    tier: str = "cpu"
    size_b: float = 0.0
    #: A literal --constraint (wins over gpu_constraint) and extra sbatch arguments, from overrides only.
    constraint: str | None = None
    extra_args: tuple[str, ...] = ()

    def override(self, overrides: Mapping[str, Any] | None) -> Resources:
        """A copy with ``overrides`` applied (keys: OVERRIDE_KEYS); unknown keys raise."""
        if not overrides:
            return self
        unknown = sorted(set(overrides) - set(OVERRIDE_KEYS))
        if unknown:
            raise ValueError(f"resources: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(OVERRIDE_KEYS)}")
        values = dict(overrides)
        for key in ("gpus", "cpus"):
            if values.get(key) is not None:
                values[key] = int(values[key])
        if "extra_args" in values:
            values["extra_args"] = tuple(str(a) for a in values["extra_args"] or ())
        if "gpus" in values and values["gpus"] == 0 and "gpu_constraint" not in values:
            values["gpu_constraint"] = None
        return replace(self, **values)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["extra_args"] = list(self.extra_args)
        return d


def _is_api(spec: str) -> bool:
    """API models, test doubles and replayed recordings cost no GPU (parsed like pipeline.llm.spec: openai:,
    scripted:, replay:, gpt-*, o1/o3/o4)."""
    s = spec.strip()
    return s.startswith(("openai:", "scripted:", "replay:", "gpt-", "o1", "o3", "o4")) or s.lower() in ("none", "")


def _size_from_text(text: str) -> float | None:
    low = text.lower()
    if low in KNOWN_SIZES_B:
        return KNOWN_SIZES_B[low]
    m = _MOE.search(text)
    if m:
        return int(m.group(1)) * float(m.group(2))
    m = _BILLIONS.search(text)
    if m:
        return float(m.group(1))
    for key in sorted(KNOWN_SIZES_B, key=len, reverse=True):  # longest first: phi-4-mini before phi-4
        if low.endswith(key) or low.endswith(key + "-instruct"):
            return KNOWN_SIZES_B[key]
    m = _MILLIONS.search(text)
    if m:
        return float(m.group(1)) / 1000.0
    return None


def model_size_b(spec: str | None) -> float | None:
    """A model spec's size in billions: 0 for API models and test doubles, None when it cannot be read."""
    if not spec or _is_api(spec):
        return 0.0
    body = spec.strip()
    for prefix in ("vllm:", "hf:"):
        if body.startswith(prefix):
            body = body[len(prefix):]
    base, plus, adapter = body.partition("+")
    try:
        from pipeline.data.naming import expand_model_name

        base_id = expand_model_name(base)
    except ImportError:  # pipeline not importable: the nickname stays as it is (the regex still reads most)
        base_id = base
    size = _size_of_id(base_id)
    if size is None and base_id != base:
        size = _size_of_id(base)
    if size is not None and plus and adapter:
        size += ADAPTER_EXTRA_B
    return size


def _size_of_id(model_id: str) -> float | None:
    m = _TRAINED.search(model_id)
    if m:  # dpo_merged/<nickname>_… → the nickname's size
        size = model_size_b(m.group(1))
        if size is not None:
            return size
    if model_id.startswith(("/", ".", "~")):  # a local folder: read the last few path components only
        for part in reversed([p for p in model_id.split("/") if p][-4:]):
            size = _size_from_text(part)
            if size is not None:
                return size
        return None
    return _size_from_text(model_id)


def models_from_spec(spec: Mapping[str, Any] | None) -> list[str]:
    """The model specs a stage spec names (MODEL_KEYS; lists allowed)."""
    out: list[str] = []
    for key in MODEL_KEYS:
        value = (spec or {}).get(key)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, str) and v and v.lower() != "none":
                out.append(v)
    return out


def stage_defaults(stage: str | Iterable[str]) -> dict[str, Any] | None:
    """The STAGE_DEFAULTS entry for a stage (``"evaluate repair"`` before ``"evaluate"``), None when there is none."""
    words = stage.split() if isinstance(stage, str) else [str(w) for w in stage]
    for key in (" ".join(words[:2]), words[0] if words else ""):
        if key in STAGE_DEFAULTS:
            return dict(STAGE_DEFAULTS[key])
    return None


def resources_for(models: Iterable[str | None], quantization: str | None = None, stage: str | Iterable[str] = "",
                  *, default_time: str | None = None, default_mem: str | None = None) -> Resources:
    """The rule (see the module docstring) for a stage that loads ``models`` with ``quantization``."""
    quant = (quantization or "none").lower()
    if quant not in THRESHOLDS_B:
        raise ValueError(f"quantization '{quantization}': expected one of {', '.join(THRESHOLDS_B)}")
    d = stage_defaults(stage)
    if d is None:  # a stage without a table entry: the connection's defaults, else DEFAULT_STAGE
        d = {**DEFAULT_STAGE, **{k: v for k, v in (("time", default_time), ("mem", default_mem)) if v}}
    time, mem = d["time"], d["mem"]
    cpus = int(d["cpus"])
    # adapters of one base model (several agents emulated together) share one load of the base's weights
    plain = [m for m in models if m and "+" not in m]
    adapted: dict[str, str] = {}
    for m in models:
        if m and "+" in m:
            adapted.setdefault(m.partition("+")[0], m)
    sizes = [model_size_b(m) for m in [*plain, *adapted.values()]]
    local = [s for s in sizes if s != 0.0]
    if d.get("cpu_only") or not local:
        return Resources(gpus=0, mem=mem, time=time, cpus=cpus, tier="cpu", size_b=0.0)
    total = sum(s for s in local if s is not None)
    if None not in local and total < SMALL_B:
        return Resources(gpus=0, mem=SMALL_MEM if _mem_gb(mem) > _mem_gb(SMALL_MEM) else mem, time=time,
                         cpus=max(cpus, 4), tier="small", size_b=round(total, 3))
    big = total > THRESHOLDS_B[quant]
    return Resources(gpus=1, gpu_constraint="big" if big else None, mem=mem, time=time, cpus=cpus,
                     tier="big" if big else "gpu", size_b=round(total, 3))


def _mem_gb(text: str) -> float:
    """``"100G"`` → 100; ``"512M"`` → 0.5; ``"1T"`` → 1024 (Slurm's default unit is M)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(text).upper())
    if not m:
        return float("inf")
    return float(m.group(1)) * {"K": 1 / 1024 ** 2, "M": 1 / 1024, "": 1 / 1024, "G": 1, "T": 1024}[m.group(2)]
