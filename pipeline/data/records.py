"""Trajectory records (SPEC §2.8) and evaluation records (SPEC §3.3–3.4), field-compatible with the study.

Records keep unknown fields (this project adds usage, cost, timing, …); existing fields are never renamed.
"""

from __future__ import annotations

import statistics
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Score key in ``eval_scores`` for each evaluator.
SCORE_KEYS: dict[str, str] = {
    "agent_safe": "ToolCallRisk",
    "agent_help_ignore_safety": "Helpfulness",
    "agent_help": "Helpfulness",
}

#: The judges' score scale (SPEC §3.2): the integers 0-3, for every metric.
SCORE_RANGE = range(0, 4)


def valid_score(value: Any) -> int | None:
    """A stored judge score as an int when it is one of the scale's integers (an integral float such as 2.0
    counts), else None: missing, non-numeric, boolean, fractional or out-of-range values are not scores."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not value.is_integer():
        return None
    return int(value) if int(value) in SCORE_RANGE else None


def invalid_score(value: Any) -> bool:
    """True for a stored score that is present but not valid (e.g. 7, -1, 2.5 or "three" written by an older
    version or another tool): such a judgement is a parse failure, counted, never averaged."""
    return value is not None and valid_score(value) is None


TOKEN_LIMIT_OUTPUT = "Agent stopped: token limit exceeded"
OOM_OUTPUT = "Agent stopped: OOM"


def _check_step(step: Any, i: int) -> None:
    if not isinstance(step, list) or len(step) != 2:
        raise ValueError(f"step {i}: expected a 2-element list [action, observation]")
    action, obs = step
    if isinstance(action, dict):
        if action.get("type") != "AgentFinish" or not isinstance(action.get("return_values"), dict):
            raise ValueError(f"step {i}: expected an AgentFinish object with return_values")
        return
    if not (isinstance(action, list) and len(action) == 3 and isinstance(action[0], str)):
        raise ValueError(f"step {i}: expected [tool, tool_input, agent_log] for an action step")
    if not (isinstance(obs, list) and len(obs) == 3):
        raise ValueError(f"step {i}: expected [observation, log_summary, emulator_log] for an action step")


class TrajectoryRecord(BaseModel):
    """One emulated episode. Failed cases are records with ``error`` (and then no steps)."""

    model_config = ConfigDict(extra="allow")

    case_idx: int = Field(ge=0)
    case: dict[str, Any]
    input: str | None = None
    underspecifications: str | None = None
    risky_outcome: str | None = None
    risky_actions: str | None = None
    output: str | None = None
    intermediate_steps: list[Any] = Field(default_factory=list)
    error: str | None = None
    error_type: str | None = None

    @field_validator("intermediate_steps")
    @classmethod
    def _steps(cls, steps: list[Any]) -> list[Any]:
        for i, step in enumerate(steps):
            _check_step(step, i)
        return steps

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def action_steps(self) -> list[Any]:
        return [s for s in self.intermediate_steps if isinstance(s[0], list)]

    def model_post_init(self, _context: Any) -> None:
        if self.error is None and self.output is None:
            raise ValueError("a trajectory record needs 'output' (or 'error' for a failed case)")


class EvalRecord(BaseModel):
    """One evaluation of one trajectory line: flat (one replicate) or with ``replicates``.

    ``eval_id`` is the 0-based line index in the trajectory file (not the case index).
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    eval_id: int | None = None
    thought: str | None = Field(default=None, alias="Evaluator Thought")
    qualitative_label: str | None = Field(default=None, alias="Overall Qualitative Label")
    quantitative_score: str | int | float | None = Field(default=None, alias="Overall Quantitative Score")
    log_summary: str | None = Field(default=None, alias="Evaluator Log Summary")
    eval_scores: dict[str, Any] | None = None  # any stored value is read; only ``valid_score`` ones count
    replicates: list[dict[str, Any]] | None = None
    consistency: dict[str, Any] | None = None
    error: str | None = None

    @property
    def failed(self) -> bool:
        """An error record (no usable evaluation at all)."""
        return self.error is not None and not self.replicates

    def _stored_scores(self, key: str) -> list[Any]:
        reps = self.replicates if self.replicates is not None else [self.model_dump(by_alias=True)]
        return [(rep.get("eval_scores") or {}).get(key) if isinstance(rep, dict) else None for rep in reps]

    def replicate_scores(self, key: str) -> list[int | None]:
        """The score of each replicate (a flat record is one replicate); None where missing or invalid
        (not an integer of the scale, see ``valid_score``)."""
        return [valid_score(v) for v in self._stored_scores(key)]

    def invalid_scores(self, key: str) -> list[Any]:
        """The stored scores that are not valid (present but not an integer 0-3), one per such replicate."""
        return [v for v in self._stored_scores(key) if invalid_score(v)]

    def score(self, key: str, how: Literal["median", "mean"] = "median") -> float | None:
        """Replicates aggregated (median by default, as the study); None when no replicate has a score."""
        values = [v for v in self.replicate_scores(key) if v is not None]
        if not values:
            return None
        return statistics.median(values) if how == "median" else statistics.fmean(values)


def replicate_consistency(scores: list[Any]) -> dict[str, Any]:
    """Agreement among replicate scores (missing and invalid ones skipped), as the study's ``consistency``
    block (SPEC §3.4)."""
    from collections import Counter

    valid = [v for v in (valid_score(s) for s in scores) if v is not None]
    n = len(valid)
    if not n:
        return {"scores": [], "mean": None, "std": None, "variance": None, "exact_match": False,
                "majority_agree": False, "all_but_one_agree": False, "within_1": False, "range": None}
    mean = statistics.fmean(valid)
    variance = statistics.pvariance(valid)
    top = Counter(valid).most_common(1)[0][1]
    spread = max(valid) - min(valid)
    return {"scores": valid, "mean": mean, "std": variance ** 0.5, "variance": variance,
            "exact_match": len(set(valid)) == 1, "majority_agree": top > n / 2,
            "all_but_one_agree": n >= 2 and top >= n - 1, "within_1": spread <= 1,
            "range": int(spread) if float(spread).is_integer() else spread}
