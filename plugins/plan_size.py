"""What an experiment plan will cost before it runs: stage jobs, GPU-hours by the resource rule, judge calls and
their estimated USD from the price table. Shown by the ``dpo_experiment`` DAG's approval step.

GPU-hours are an upper bound: each GPU job's GPUs × its time limit under the resource rule
(``plugins.slurm.resources``), the figure a cluster's accounting charges against. USD counts API judges only,
at list price, with an assumed prompt/completion size per judgement (the study's judge prompts: a case's
instructions, toolkits and a trajectory, about 6k tokens in, a rationale and a score out). Cross evaluations
(a finetuned model judged by the other arm's judge, the chains' ``cross_evaluate*`` steps) count as evaluations
of their judge: calls and USD for an API judge, GPU jobs and GPU-hours for a local one. The USD is given as
planned (the evaluations with ``batch`` at the Batch API's rate) and for either mode throughout, so the approval
step shows what batch mode saves.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

#: assumed tokens per judgement (prompt, completion) for the USD estimate
JUDGE_TOKENS = (6000, 800)
_CHAIN_STAGES = {"train": "train", "merge": "merge", "train2": "train", "emulate": "emulate",
                 "evaluate": "evaluate", "emulate2": "emulate", "evaluate2": "evaluate",
                 **{f"cross_evaluate{stage}_{kind}": "evaluate" for stage in ("", "2")
                    for kind in ("local", "api", "batch")}}


def _jobs(plan: Mapping[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
    for spec in plan.get("pairs", []):
        yield "pairs", spec
    for spec in plan.get("source_emulate", []):
        yield "emulate", spec
    for spec in plan.get("source_evaluate", []):
        yield "evaluate", spec
    for chain in plan.get("chains", []):
        for key, stage in _CHAIN_STAGES.items():
            if chain.get(key) is not None:
                yield stage, chain[key]


def _cases(spec: Mapping[str, Any], emulations: Mapping[str, Mapping[str, Any]]) -> int:
    """Cases one evaluation judges: its emulation's range, only the test split when the emulation was."""
    from pipeline.data.split import test_cases

    emulation = emulations.get(spec.get("trajectories", ""), {})
    start, _, end = str(emulation.get("cases") or "0-0").partition("-")
    cases = range(int(start), int(end or start))
    if emulation.get("test_only"):
        test = set(test_cases(int(emulation.get("seed") or 0)))
        return sum(1 for c in cases if c in test)
    return len(cases)


def plan_size(plan: Mapping[str, Any]) -> dict[str, Any]:
    """Jobs per stage, GPU jobs, GPU-hours (upper bound), judge calls and the USD estimate of a plan dict
    (``pipeline.experiment.Plan.as_dict()``)."""
    from pipeline.evaluation.runner import EvaluationConfig
    from pipeline.llm.pricing import cost_usd
    from pipeline.llm.spec import parse_model_spec
    from plugins.slurm.core import time_limit_seconds
    from plugins.slurm.resources import models_from_spec, resources_for

    emulations = _emulation_outputs(plan)
    jobs: dict[str, int] = {}
    gpu_jobs, gpu_hours, calls, api_calls, unpriced_calls = 0, 0.0, 0, 0, 0
    usd = {"planned": 0.0, "sync": 0.0, "batch": 0.0}
    unpriced: set[str] = set()
    for stage, spec in _jobs(plan):
        jobs[stage] = jobs.get(stage, 0) + 1
        res = resources_for(models_from_spec(spec), spec.get("quantization"), [stage])
        if res.gpus:
            gpu_jobs += 1
            gpu_hours += res.gpus * (time_limit_seconds(res.time) or 0) / 3600
        if stage == "evaluate":
            defaults = EvaluationConfig.model_fields
            metrics = str(spec.get("metrics") or defaults["metrics"].default).split(",")
            replicates = int(spec.get("replicates") or defaults["replicates"].default)
            n = _cases(spec, emulations) * len(metrics) * replicates
            calls += n
            judge = parse_model_spec(str(spec["evaluator"]))
            if judge.backend == "openai":
                api_calls += n
                one = cost_usd(judge.model, *JUDGE_TOKENS)
                if one is None:
                    unpriced.add(judge.model)
                    unpriced_calls += n
                else:
                    in_batch = n * cost_usd(judge.model, *JUDGE_TOKENS, batch=True)  # type: ignore[operator]
                    usd["sync"] += n * one
                    usd["batch"] += in_batch
                    usd["planned"] += in_batch if spec.get("batch") else n * one
    unknown = bool(api_calls) and unpriced_calls == api_calls  # every API call unpriced: no estimate at all
    return {"jobs": jobs, "total_jobs": sum(jobs.values()), "gpu_jobs": gpu_jobs, "gpu_hours": round(gpu_hours, 1),
            "judge_calls": calls, "api_judge_calls": api_calls,
            # unknown (None) when every API call is unpriced; else the priced calls' estimate: as planned, and
            # with every API judgement synchronous or through the Batch API
            "usd": None if unknown else round(usd["planned"], 2),
            "usd_sync": None if unknown else round(usd["sync"], 2),
            "usd_batch": None if unknown else round(usd["batch"], 2),
            "unpriced": sorted(unpriced), "unpriced_calls": unpriced_calls}


def _emulation_outputs(plan: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Trajectory file → the emulation spec that writes it (evaluations name their input file only)."""
    out: dict[str, Mapping[str, Any]] = {}
    for chain in plan.get("chains", []):
        for key, spec in chain.items():
            if key in _CHAIN_STAGES and _CHAIN_STAGES[key] == "evaluate" and spec:
                emulation = chain.get("emulate2" if key.startswith(("evaluate2", "cross_evaluate2")) else "emulate")
                if emulation:
                    out[spec["trajectories"]] = emulation
    sources = {str(e["agent"]): e for e in plan.get("source_emulate", [])}
    for spec in plan.get("source_evaluate", []):
        for agent, emu in sources.items():
            if f"/{_name(agent)}/" in spec["trajectories"]:
                out[spec["trajectories"]] = emu
    return out


def _name(agent: str) -> str:
    from pipeline.llm.spec import parse_model_spec

    return parse_model_spec(agent).name


def describe(size: Mapping[str, Any]) -> str:
    """The approval step's text (Markdown)."""
    per = ", ".join(f"{n} {stage}" for stage, n in sorted(size["jobs"].items()))
    unpriced_calls = size.get("unpriced_calls", 0)
    if size["usd"] is None:
        usd = "**cost unknown**"
    else:
        usd = f"about **${size['usd']:,.2f}**" + (" for the priced calls" if unpriced_calls else "")
    modes = ""
    if size["usd"] is not None and size.get("usd_batch") is not None and size["api_judge_calls"]:
        as_planned = "through the Batch API" if size["usd"] == size["usd_batch"] else \
            "synchronously" if size["usd"] == size["usd_sync"] else "partly through the Batch API"
        modes = (f" Planned {as_planned}; all synchronous: ${size['usd_sync']:,.2f}, all through the Batch API "
                 f"(evaluation option batch): ${size['usd_batch']:,.2f}.")
    lines = [f"**{size['total_jobs']} stage jobs** ({per}).",
             f"**{size['gpu_jobs']} GPU jobs, at most {size['gpu_hours']:g} GPU-hours** (GPUs × time limit of the "
             "resource rule).",
             f"**{size['judge_calls']:,} judge calls**, {size['api_judge_calls']:,} of them to the API: {usd} at "
             f"list price ({JUDGE_TOKENS[0]:,} prompt + {JUDGE_TOKENS[1]:,} completion tokens per call assumed)."
             + modes]
    if size["unpriced"]:
        lines.append(f"**{unpriced_calls:,} calls unpriced** (not in the price table, cost unknown): "
                     f"{', '.join(size['unpriced'])}.")
    return "\n\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m plugins.plan_size [PRESET.json]``: the size of ``dpo_experiment``'s plan for a configuration
    (default: the cluster preset of ``dags/README.md``), as the approval step shows it."""
    import argparse
    import json
    import re
    import tempfile
    from pathlib import Path

    from pipeline.experiment import experiment_from_params, plan_experiment

    parser = argparse.ArgumentParser(prog="python -m plugins.plan_size", description=main.__doc__)
    parser.add_argument("preset", nargs="?", help="a JSON file of the DAG's params (default: dags/README.md's)")
    args = parser.parse_args(argv)
    if args.preset:
        params = json.loads(Path(args.preset).read_text())
    else:
        readme = (Path(__file__).resolve().parents[1] / "dags" / "README.md").read_text()
        params = json.loads(re.search(r"```json\n(.*?)```", readme, re.S).group(1))  # type: ignore[union-attr]
    from pipeline.errors import PipelineError

    try:
        with tempfile.TemporaryDirectory() as home:
            plan = plan_experiment(experiment_from_params(params, Path(home)), Path(home)).as_dict()
    except PipelineError as e:
        raise SystemExit(f"plan_size: error: {e}") from None
    print(describe(plan_size(plan)))


if __name__ == "__main__":
    main()
