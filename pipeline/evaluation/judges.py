"""The three judges (SPEC §3.1): what each sees, how its request is built, how its answer becomes a record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.data.cases import Case
from pipeline.data.records import SCORE_KEYS
from pipeline.data.toolkits import Toolkit
from pipeline.errors import ConfigError
from pipeline.evaluation.parsing import FIELDS, clean_score, parse_fields
from pipeline.evaluation.prompts import helpfulness, safety
from pipeline.evaluation.prompts.common import evaluator_scratchpad
from pipeline.llm import ChatResponse

#: CLI metric name → eval type (the eval-file suffix). ``help_ignore_safety`` is the paper's Help(Ignore).
METRICS = {"safe": "agent_safe", "help_ignore_safety": "agent_help_ignore_safety", "help": "agent_help"}


def eval_types_for(metrics: str | list[str]) -> list[str]:
    """Parse ``safe,help_ignore_safety`` (metric names or eval types) into eval types; unknown → ConfigError."""
    names = [m.strip() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip()]
    out = []
    for name in names:
        eval_type = METRICS.get(name, name if name in METRICS.values() else None)
        if eval_type is None:
            raise ConfigError(f"--metrics {name}: unknown metric; expected {', '.join(METRICS)}")
        out.append(eval_type)
    if not out:
        raise ConfigError("--metrics: expected at least one of " + ", ".join(METRICS))
    return out


def prompt_version(eval_type: str) -> str:
    return safety.PROMPT_VERSION if eval_type == "agent_safe" else helpfulness.PROMPT_VERSIONS[eval_type]


def judge_messages(eval_type: str, record: dict[str, Any], toolkits: list[Toolkit], *,
                   study_final_step: bool) -> list[dict[str, str]]:
    """The judge's messages for one trajectory record."""
    case = Case.model_validate(record["case"])
    inputs = case.prompt_inputs()
    specs = "\n".join(tk.description("low") for tk in toolkits)
    pad = evaluator_scratchpad(record, study_final_step=study_final_step)
    if eval_type == "agent_safe":
        return safety.render(inputs, specs, pad)
    return helpfulness.render(eval_type, inputs, specs, pad)


@dataclass(frozen=True)
class Judgement:
    """One replicate's result, as the flat record fields plus this project's extras."""

    fields: dict[str, Any]

    @property
    def score(self) -> float | None:
        scores = self.fields.get("eval_scores") or {}
        return next(iter(scores.values()), None)


def read_judgement(eval_type: str, response: ChatResponse, evaluator: str) -> Judgement:
    """Turn a judge's reply into a replicate record. An unparseable answer is data: score null, status
    ``parse_failed`` and the raw text kept (for repair); a failed call has status ``error``."""
    extra = {"evaluator_model": evaluator, "prompt_version": prompt_version(eval_type),
             "finish_reason": response.finish_reason, "usage": response.usage()}
    if not response.ok:
        return Judgement({**{f: None for f in FIELDS}, "eval_scores": {}, "status": "error",
                          "error": response.error, **extra})
    fields = parse_fields(response.text)
    score = clean_score(fields["Overall Quantitative Score"])
    key = SCORE_KEYS[eval_type]
    rec: dict[str, Any] = dict(fields)
    rec["eval_scores"] = {key: score} if score is not None else {}
    rec["efficiency"] = response.prompt_tokens + response.completion_tokens
    rec["status"] = "ok" if score is not None else "parse_failed"
    if score is None:
        rec["raw"] = response.text
    return Judgement({**rec, **extra})
