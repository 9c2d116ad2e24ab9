"""The study's whole experiment on a cluster of N GPUs, simulated: phase-by-phase (the old ``dpo_experiment``) vs
per-model chains (today's), with the plan ``pipeline.experiment`` makes for it.

    .venv/bin/python benchmarks/experiment_makespan.py [--gpus 8 32 128] [--hours train=3 emulate=1 ...]

The experiment: source models Llama3.1-8B, Phi-4, Qwen2.5-7B × arms q32 (Qwen3-32B judge, on a GPU) and gpt5m
(gpt-5-mini over the API) × seeds 0-2 × β 0.1, 0.05 × safe, help, both, safe->help, help->safe = 180 trained
models (SPEC §10.2), each emulated on its seed's 72 test cases and judged by its arm's judge; the source models
on all 144 cases, judged by both.

Durations per job, in hours on one GPU (``--hours`` overrides; these are assumptions, not measurements): DPO with
LoRA of a 7-14B model on one pair set (≈5-11k pairs, 1 epoch) ``train`` 3 h — the study's set-up of a single
large GPU per run; ``merge`` 0.2 h; emulation of 72 test cases with an 8B agent and the 8B emulator ``emulate``
1 h (the issue's figure; 144 cases: 2 h); a local 32B judge on those ``evaluate_local`` 0.5 h; the API judge
``evaluate_api`` 0.25 h of wall time and no GPU (at most ``--api-slots`` at once); pair sets 0.02 h on a CPU.
The phase schedule emulates one base model's first-stage adapters of a seed together (one job, as long as the
sum of its adapters unless ``--group-speedup``); the chains emulate each model alone.

Printed per N: makespan, GPU idle fraction (1 − GPU-busy hours / (N × makespan)), when the first trained model's
evaluation is done, and the ratio phases / chains.
"""

from __future__ import annotations

import argparse
import heapq
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HOURS = {"pairs": 0.02, "train": 3.0, "merge": 0.2, "emulate": 1.0, "emulate_all": 2.0, "evaluate_local": 0.5,
         "evaluate_api": 0.25}


@dataclass
class Job:
    name: str
    hours: float
    pool: str  # "gpu", "api" (the judge_api pool) or "cpu" (unbounded)
    priority: int = 0
    deps: list[str] = field(default_factory=list)
    trained_eval: bool = False  # the evaluation of a trained model


def _plan():
    from pipeline.experiment import Arm, ExperimentConfig, plan_experiment

    cfg = ExperimentConfig(name="study", source_models=["Llama3.1-8B", "Phi-4", "Qwen2.5-7B"],
                           arms=[Arm("q32", "pool", "Qwen3-32B"), Arm("gpt5m", "pool", "openai:gpt-5-mini")],
                           seeds=[0, 1, 2], betas=[0.1, 0.05],
                           configurations=["safe", "help", "both", "safe->help", "help->safe"], case_set="toolemu")
    with tempfile.TemporaryDirectory() as tmp:
        return plan_experiment(cfg, Path(tmp))


def _eval_hours(spec: dict, h: dict) -> tuple[float, str]:
    from pipeline.experiment import judge_kind

    api = judge_kind(spec["evaluator"]) == "api"
    return (h["evaluate_api"], "api") if api else (h["evaluate_local"], "gpu")


def chain_jobs(plan, h: dict) -> list[Job]:
    """Today's DAG: pair sets, then one chain per first-stage model; deeper steps first (CHAIN_PRIORITY)."""
    from pipeline.experiment import CROSS_STEPS
    from plugins.dag_common import CHAIN_PRIORITY

    from pipeline.llm.spec import parse_model_spec

    jobs = [Job(f"pairs{i}", h["pairs"], "cpu") for i in range(len(plan.pairs))]
    pairs = [j.name for j in jobs]
    for i, spec in enumerate(plan.source_emulate):
        jobs.append(Job(f"src-emu{i}", h["emulate_all"], "gpu", 10))
        for k, ev in enumerate(plan.source_evaluate):
            if Path(ev["trajectories"]).parent.name == parse_model_spec(spec["agent"]).name:
                hours, pool = _eval_hours(ev, h)
                jobs.append(Job(f"src-eval{k}", hours, pool, 10, [f"src-emu{i}"]))
    for c, chain in enumerate(plan.chains):
        prev = {"train": pairs, "emulate": ["train"], "evaluate": ["emulate"], "merge": ["train"],
                "train2": ["merge"], "emulate2": ["train2"], "evaluate2": ["emulate2"],
                # the other arm's judge (cross evaluation), after the model's own evaluation
                **{k: [f"emulate{n}", f"evaluate{n}"] for k in CROSS_STEPS
                   for n in ["2" if k.startswith("cross_evaluate2") else ""]}}
        for step, before in prev.items():
            if chain[step] is None:
                continue
            name = f"c{c}.{step}"
            deps = before if step == "train" else [f"c{c}.{b}" for b in before if chain[b] is not None]
            if "evaluate" in step:
                hours, pool = _eval_hours(chain[step], h)
            else:
                hours, pool = {"train": h["train"], "train2": h["train"], "merge": h["merge"]}.get(
                    step, h["emulate"]), "gpu"
            priority = CHAIN_PRIORITY[step.rsplit("_", 1)[0] if step.startswith("cross_") else step]
            jobs.append(Job(name, hours, pool, priority, deps, step.startswith("evaluate")))
    return jobs


def phase_jobs(plan, h: dict, group_speedup: float) -> list[Job]:
    """The old DAG: pairs >> train >> merge >> train_second_stage >> emulate >> evaluate, each phase a barrier."""
    phases: list[list[Job]] = []
    phases.append([Job(f"pairs{i}", h["pairs"], "cpu") for i in range(len(plan.pairs))])
    phases.append([Job(f"train1.{i}", h["train"], "gpu") for i in range(len(plan.train_stage1))])
    phases.append([Job(f"merge{i}", h["merge"], "gpu") for i in range(len(plan.merge))])
    phases.append([Job(f"train2.{i}", h["train"], "gpu") for i in range(len(plan.train_stage2))])
    emulate = []
    for i, spec in enumerate(plan.emulate):
        if isinstance(spec["agent"], list):
            hours = h["emulate"] * len(spec["agent"]) / group_speedup
        else:
            hours = h["emulate"] if spec.get("test_only") else h["emulate_all"]
        emulate.append(Job(f"emu{i}", hours, "gpu"))
    phases.append(emulate)
    sources = {Path(e["trajectories"]).parent.name for e in plan.source_evaluate}
    evaluate = []
    for i, spec in enumerate(plan.evaluate + plan.cross_evaluate):
        hours, pool = _eval_hours(spec, h)
        evaluate.append(Job(f"eval{i}", hours, pool, trained_eval=Path(spec["trajectories"]).parent.name
                            not in sources))
    phases.append(evaluate)
    jobs: list[Job] = []
    barrier: list[str] = []
    for phase in phases:
        for j in phase:
            j.deps = list(barrier)
        jobs += phase
        barrier = [j.name for j in phase]
    return jobs


def simulate(jobs: list[Job], gpus: int, api_slots: int) -> dict[str, float]:
    """List scheduling: whenever a GPU (or API slot) is free, the ready job of highest priority starts; CPU jobs
    (pair sets) start at once."""
    by_name = {j.name: j for j in jobs}
    waiting = {j.name: set(j.deps) for j in jobs}
    dependents: dict[str, list[str]] = {}
    for j in jobs:
        for d in j.deps:
            dependents.setdefault(d, []).append(j.name)
    ready = [(-j.priority, i, j.name) for i, j in enumerate(jobs) if not j.deps]
    heapq.heapify(ready)
    running: list[tuple[float, str]] = []
    now, busy, first_eval = 0.0, 0.0, None
    free = {"gpu": gpus, "api": api_slots, "cpu": len(jobs)}
    order = {j.name: i for i, j in enumerate(jobs)}
    while ready or running:
        blocked = []
        while ready:
            item = heapq.heappop(ready)
            j = by_name[item[2]]
            if free[j.pool] == 0:
                blocked.append(item)
                continue
            free[j.pool] -= 1
            busy += j.hours if j.pool == "gpu" else 0.0
            heapq.heappush(running, (now + j.hours, j.name))
        for item in blocked:
            heapq.heappush(ready, item)
        now, name = heapq.heappop(running)
        j = by_name[name]
        free[j.pool] += 1
        if j.trained_eval and first_eval is None:
            first_eval = now
        for d in dependents.get(name, []):
            waiting[d].discard(name)
            if not waiting[d]:
                heapq.heappush(ready, (-by_name[d].priority, order[d], d))
    return {"makespan_h": now, "gpu_idle": 1 - busy / (gpus * now), "first_model_evaluated_h": first_eval or 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--hours", nargs="*", default=[], metavar="STAGE=H", help=f"override {sorted(HOURS)}")
    ap.add_argument("--api-slots", type=int, default=8, help="judge_api pool slots")
    ap.add_argument("--group-speedup", type=float, default=1.0,
                    help="how much faster a grouped multi-adapter emulation is than its adapters one by one")
    args = ap.parse_args()
    h = dict(HOURS)
    for item in args.hours:
        key, _, value = item.partition("=")
        if key not in h:
            raise SystemExit(f"--hours {item}: unknown stage '{key}'; expected one of {', '.join(sorted(h))}")
        h[key] = float(value)
    plan = _plan()
    print(f"plan: {len(plan.train_stage1) + len(plan.train_stage2)} trained models ({len(plan.chains)} chains), "
          f"{len(plan.evaluate)} evaluations + {len(plan.cross_evaluate)} cross evaluations; hours per job {h}")
    print(f"{'GPUs':>5} | {'phases: makespan':>16} {'idle':>6} {'1st eval':>8} | {'chains: makespan':>16} {'idle':>6} "
          f"{'1st eval':>8} | ratio")
    for n in args.gpus:
        a = simulate(phase_jobs(plan, h, args.group_speedup), n, args.api_slots)
        b = simulate(chain_jobs(plan, h), n, args.api_slots)
        print(f"{n:>5} | {a['makespan_h']:>14.1f} h {a['gpu_idle']:>6.1%} {a['first_model_evaluated_h']:>6.1f} h | "
              f"{b['makespan_h']:>14.1f} h {b['gpu_idle']:>6.1%} {b['first_model_evaluated_h']:>6.1f} h | "
              f"{a['makespan_h'] / b['makespan_h']:.2f}x")


if __name__ == "__main__":
    main()
