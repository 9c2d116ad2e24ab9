"""Training configuration of a finetuned model, parsed from its name alone (SPEC §7.3, §6.4, §6.5).

The study found stages by matching the model name against the stems of the DPO dataset files on disk (which
are not released, so every model looked like a source model). Here the name itself is parsed:

    dpo_<Model>[_<quant>]_<metric>[_<variant>…][_b-N][_ml-N][_beta-X][_lr-X]_s<seed>[_<metric>…_s<seed>]…

* ``metric`` is one of the reserved dataset words ``safe``, ``help``, ``both``; each occurrence starts a stage;
* the tokens after the metric up to the first parameter form the dataset stem (``help_gpt5m``); a variant
  token ``q32`` or ``gpt5m`` is the dataset origin (which evaluator labelled the pairs), kept separately
  because ``training_stages`` drop it, as in the study; another variant is read as an evaluator name
  (``safe_Qwen_Qwen3-32B`` → ``q32``, ``help_diff2`` → ``diff2``);
* ``beta`` is the ``_beta-<x>`` of the stage, default ``"0.1"`` (betas are strings);
* the seed is ``extract_seed`` of the whole name (several different seeds are an error, SPEC §5.2).

Example: ``dpo_Llama3.1-8B_help_q32_beta-0.05_s0_safe_q32_beta-0.05_s0`` → ``[("help", "0.05"), ("safe",
"0.05")]``, origin ``q32``, seed 0, label ``H,S-0.05``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.analysis.names import KNOWN_ORIGINS, evaluator_origin
from pipeline.data.naming import extract_seed, is_finetuned, source_model
from pipeline.errors import NamingError

DEFAULT_BETA = "0.1"
METRICS = ("safe", "help", "both")
METRIC_LETTER = {"safe": "S", "help": "H", "both": "S&H"}
_MARKER = re.compile(r"(?<=_)(safe|help|both)(?=_|$)")
_PARAM = re.compile(r"^(b|ml|beta|lr)-(.+)$")
_SEED_TOKEN = re.compile(r"^s(\d+)$")
_QUANT_TOKEN = re.compile(r"^(int4|int8|fp16|bf16)$")


@dataclass(frozen=True)
class Stage:
    """One DPO stage: metric, beta (string), dataset stem, dataset origin (``q32``/``gpt5m``/None), seed."""

    metric: str
    beta: str = DEFAULT_BETA
    dataset: str = ""
    origin: str | None = None
    seed: int | None = None
    params: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class TrainingConfig:
    """What a model name says about how it was trained. Source models have no stages."""

    name: str
    source_model: str
    finetuned: bool
    stages: tuple[Stage, ...] = ()
    seed: int | None = None
    quantization: str | None = None

    @property
    def training_stages(self) -> tuple[tuple[str, str], ...]:
        """``((metric, beta), …)`` as the study's ``training_stages`` (origin dropped)."""
        return tuple((s.metric, s.beta) for s in self.stages)

    @property
    def metric_sequence(self) -> tuple[str, ...]:
        return tuple(s.metric for s in self.stages)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def last_finetune_type(self) -> str | None:
        return self.stages[-1].metric if self.stages else None

    @property
    def origin(self) -> str | None:
        """The common dataset origin of the stages, ``"mixed"`` if they differ, None if unknown or a source."""
        origins = {s.origin for s in self.stages}
        if not origins or origins == {None}:
            return None
        return origins.pop() if len(origins) == 1 else "mixed"

    @property
    def dataset_type(self) -> str:
        """The study's inferred dataset type: the stems in order plus ``_s<seed>`` (SPEC §7.3)."""
        if not self.stages:
            return ""
        stems = "_".join(s.dataset for s in self.stages)
        return f"{stems}_s{self.seed}" if self.seed is not None else stems

    @property
    def label(self) -> str:
        """``S``/``H``/``S&H`` labels (SPEC §7.4); ``base`` for a source model."""
        return stage_label(self.training_stages) if self.stages else "base"

    def relation(self, evaluator: str) -> str | None:
        """``match`` when the evaluator labelled the training pairs, ``cross`` when the other known evaluator did
        (q32 vs gpt5m); None when the dataset origin is unknown."""
        origin, own = self.origin, evaluator_origin(evaluator)
        if origin is None or origin == "mixed":
            return None
        if origin == own:
            return "match"
        return "cross" if origin in KNOWN_ORIGINS and own in KNOWN_ORIGINS else None


def stage_label(training_stages: tuple[tuple[str, str], ...] | list) -> str:
    """``H-0.1`` (one stage), ``S,H-0.1`` (same betas), ``S-0.05,H-0.1`` (mixed betas). Empty raises."""
    stages = [tuple(s) for s in training_stages]
    if not stages:
        raise ValueError("a source model has no training stages and therefore no label")
    letters = [METRIC_LETTER.get(m, m) for m, _ in stages]
    betas = [b for _, b in stages]
    if len(set(betas)) == 1:
        return ",".join(letters) + f"-{betas[0]}"
    return ",".join(f"{letter}-{b}" for letter, b in zip(letters, betas))


def parse_training_config(name: str) -> TrainingConfig:
    """Parse a (sanitised) model or directory name; see the module docstring. Raises ``NamingError`` for a
    finetuned name without any stage marker and for ambiguous seeds."""
    seed = extract_seed(name)
    if not is_finetuned(name):
        # a partitioned source report is named <folder>_s<seed>: strip the seed before naming the model
        # (source_model() strips it only for Org_Model names, so that "gpt-5_s0" would stay "gpt-5_s0")
        return TrainingConfig(name=name, source_model=source_model(re.sub(r"_s\d+$", "", name)), finetuned=False,
                              seed=seed)
    src = source_model(name)
    body = name[len("dpo_"):]
    markers = list(_MARKER.finditer(body))
    if not markers:
        raise NamingError(f"finetuned model '{name}': no training stage found; expected a dataset marker "
                          f"_safe, _help or _both (e.g. dpo_Qwen2.5-7B_safe_q32_s0)")
    prefix = body[: markers[0].start()].strip("_").split("_")
    quant = next((t for t in prefix[1:] if _QUANT_TOKEN.match(t)), None)
    stages = []
    for i, m in enumerate(markers):
        end = markers[i + 1].start() if i + 1 < len(markers) else len(body)
        tokens = body[m.start(): end].strip("_").split("_")
        metric, rest = tokens[0], tokens[1:]
        variant, params, stage_seed, in_params = [], [], None, False
        for tok in rest:
            p = _PARAM.match(tok)
            s = _SEED_TOKEN.match(tok)
            if p:
                params.append((p.group(1), p.group(2)))
                in_params = True
            elif s:
                stage_seed = int(s.group(1))
                in_params = True
            elif not in_params:
                variant.append(tok)
            # tokens after the seed (e.g. a checkpoint number) are not part of the stage
        beta = next((v for k, v in params if k == "beta"), DEFAULT_BETA)
        origin = next((v for v in variant if v in KNOWN_ORIGINS), None)
        if origin is None and variant:  # e.g. this project's "safe_Qwen_Qwen3-32B" datasets: the evaluator's name
            origin = evaluator_origin("_".join(variant))
        stages.append(Stage(metric=metric, beta=beta, dataset="_".join([metric, *variant]), origin=origin,
                            seed=stage_seed, params=tuple(params)))
    return TrainingConfig(name=name, source_model=src, finetuned=True, stages=tuple(stages), seed=seed,
                          quantization=quant)
