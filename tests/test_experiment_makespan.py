"""The makespan simulator of benchmarks/experiment_makespan.py on hand-checkable job lists, and the study's plan
through both schedules (every job scheduled once, chains never slower)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sim():
    spec = importlib.util.spec_from_file_location("experiment_makespan", REPO / "benchmarks" / "experiment_makespan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_list_scheduling_by_hand(sim):
    Job = sim.Job
    jobs = [Job("a", 2.0, "gpu"), Job("b", 1.0, "gpu", priority=1), Job("c", 1.0, "gpu", priority=5, deps=["b"]),
            Job("d", 3.0, "api", deps=["a"], trained_eval=True)]
    # 2 GPUs: a [0,2], b [0,1], c [1,2]; d waits for a: [2,5]. GPU busy 4 of 2 x 5.
    r = sim.simulate(jobs, gpus=2, api_slots=1)
    assert r == {"makespan_h": 5.0, "gpu_idle": pytest.approx(1 - 4 / 10), "first_model_evaluated_h": 5.0}
    # 1 GPU: the ready job of highest priority first: b [0,1], then c (5) before a (0): c [1,2], a [2,4], d [4,7]
    assert sim.simulate(jobs, gpus=1, api_slots=1)["makespan_h"] == 7.0


def test_the_study_plan_on_both_schedules(sim):
    plan = sim._plan()
    h = dict(sim.HOURS)
    chains, phases = sim.chain_jobs(plan, h), sim.phase_jobs(plan, h, 1.0)
    trained = len(plan.train_stage1) + len(plan.train_stage2)
    assert trained == 180 and len(plan.chains) == 108
    assert sum(j.name.endswith((".train", ".train2")) for j in chains) == 180
    for n in (8, 32, 128):
        a, b = sim.simulate(phases, n, 8), sim.simulate(chains, n, 8)
        assert b["makespan_h"] <= a["makespan_h"] and b["first_model_evaluated_h"] < a["first_model_evaluated_h"]
