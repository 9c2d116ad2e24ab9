"""Rehearsal (issue 24): the user's plan, unchanged, with every model a stand-in — the study's recordings replayed
where it recorded that model, named scripted doubles where it did not, trainings on the tiny stand-in base sized as
what they load. The slice of the study's own plan through real Airflow and real Slurm gives per-seed points equal
to ``analyze all`` on the released results."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from pipeline.experiment import Arm, ExperimentConfig, plan_experiment
from pipeline.llm.spec import parse_model_spec
from pipeline.rehearsal import (STAND_IN_TRAIN, compare_analyses, in_setting, index_recordings, pool_roots,
                                rehearsal_counts, rehearse_plan)
from tests.conftest import REPO, environ, run_agentpipe

Q32, GPT5M = Arm("q32", "study_pool", "Qwen3-32B"), Arm("gpt5m", "study_pool", "openai:gpt-5-mini")
STUDY = {"name": "study", "source_models": ["Llama3.1-8B", "Phi-4", "Qwen2.5-7B"], "seeds": [0, 1, 2],
         "betas": [0.1, 0.05], "configurations": ["safe", "help", "both", "safe->help", "help->safe"],
         "emulator": "Qwen3-8B", "case_set": "toolemu"}


@pytest.fixture(scope="module")
def experiment_recordings(released_results, data_dir):
    """What a dpo_experiment rehearsal replays: the results archive, then the pool."""
    return index_recordings([released_results / "match_eval_results", released_results / "cross_eval_results",
                             *pool_roots(data_dir)])


def test_the_study_plan_rehearsed_replays_every_model_and_keeps_the_real_plan(experiment_recordings, tmp_path):
    home = tmp_path / "home"
    planned = plan_experiment(ExperimentConfig(**STUDY, arms=[Q32, GPT5M]), home).as_dict()
    ours = rehearse_plan(planned, STUDY["source_models"], home, experiment_recordings)
    assert ours["planned"] == planned  # the approval shows this plan's size
    # every emulation and judgement the study made is replayed: 3 source + 180 finetuned emulations; 6 source
    # judgements, 180 match, 180 cross
    assert rehearsal_counts(ours) == {"emulations_replayed": 183, "emulations_scripted": 0,
                                      "evaluations_replayed": 366, "evaluations_scripted": 0}
    for chain, real in zip(ours["chains"], planned["chains"], strict=True):
        assert chain["name"] == real["name"]
        for key in ("emulate", "emulate2"):
            if chain[key] is None:
                continue
            # the replayed agent takes the model's own name, from a folder that recorded that very model
            agent = parse_model_spec(chain[key]["agent"])
            assert agent.backend == "replay" and chain[key]["compat"] == "study"
            assert chain[key]["out"] == real[key]["out"]
            assert any(f.name.startswith(agent.name + "_emu-") for f in Path(agent.model).glob("*.jsonl")), agent
        for key in ("train", "train2"):
            if chain[key] is None:
                continue
            # names, pair sets and output folders as planned; a few steps on the stand-in
            assert {k: v for k, v in chain[key].items() if k not in ("model", *STAND_IN_TRAIN)} == \
                {k: v for k, v in real[key].items() if k not in ("model", *STAND_IN_TRAIN)}
            assert {k: chain[key][k] for k in STAND_IN_TRAIN} == STAND_IN_TRAIN
            # a stand-in training reads 2 pairs, not 16 of up to 8k tokens (150 s each, 180 times over)
            t = chain[key]
            assert t["max_steps"] * t["gradient_accumulation_steps"] * t.get("batch_size", 1) == 2
        if chain["train"] is not None:
            base = Path(chain["train"]["model"])
            assert base.parent == home / "rehearsal" / "stand-ins" and base.name == real["train"]["model"]
            assert json.loads((base / "config.json").read_text())["model_type"] == "llama"


def test_a_model_the_study_did_not_record_rehearses_with_doubles_named_as_it(experiment_recordings, tmp_path):
    """A plan with a source model of one's own: its emulation and judgement are the scripted doubles, under the
    model's and the judge's names, so every file lands where the real run would put it."""
    home = tmp_path / "home"
    cfg = ExperimentConfig(name="mine", source_models=["SmolLM2-135M"], arms=[Q32], seeds=[0], betas=[0.1],
                           configurations=["safe"], emulator="Qwen3-8B", case_set="demo",
                           emulation={"max_steps": 2})
    planned = plan_experiment(cfg, home).as_dict()
    ours = rehearse_plan(planned, cfg.source_models, home, experiment_recordings)
    assert rehearsal_counts(ours) == {"emulations_replayed": 0, "emulations_scripted": 2,
                                      "evaluations_replayed": 0, "evaluations_scripted": 2}
    [emulate] = ours["source_emulate"]
    assert emulate["agent"] == "scripted:agent#HuggingFaceTB_SmolLM2-135M-Instruct"
    spec = tmp_path / "emulate.json"
    spec.write_text(json.dumps({**emulate, "no_progress": True}))
    r = run_agentpipe("emulate", "--spec", str(spec), env={**os.environ, "AGENTPIPE_HOME": str(home)})
    assert r.returncode == 0, r.stderr
    [evaluate] = ours["source_evaluate"]
    run = Path(evaluate["trajectories"])
    assert run.is_file() and run.parent.name == "HuggingFaceTB_SmolLM2-135M-Instruct"
    assert run.name.startswith("HuggingFaceTB_SmolLM2-135M-Instruct_emu-Qwen_Qwen3-8B_eval-Qwen_Qwen3-32B")
    assert evaluate["evaluator"] == "scripted:judge#Qwen_Qwen3-32B"
    spec.write_text(json.dumps({k: v for k, v in evaluate.items() if k != "judge"} | {"no_progress": True}))
    r = run_agentpipe("evaluate", "--spec", str(spec), env={**os.environ, "AGENTPIPE_HOME": str(home)})
    assert r.returncode == 0, r.stderr
    evals = sorted(p.name.removeprefix(run.stem) for p in run.parent.glob(f"{run.stem}_eval_agent_*.jsonl"))
    assert evals == ["_eval_agent_help_ignore_safety.jsonl", "_eval_agent_safe.jsonl"]


def test_a_settings_points_are_its_own_reports():
    """An experiment with two arms writes both settings' reports into each analysis folder (one runs folder): the
    full rehearsal compared the cross-judged reports with the released match analysis and found 180 'differences'."""
    judged = "_emu-Qwen_Qwen3-8B_eval-{}_unified_report.json"
    gpt5m_arm, q32_arm = "dpo_Llama3.1-8B_both_gpt5m_s0", "dpo_Llama3.1-8B_help_q32_s1_safe_q32_s1"
    assert in_setting(gpt5m_arm + judged.format("gpt-5-mini"), "match")
    assert not in_setting(gpt5m_arm + judged.format("Qwen_Qwen3-32B"), "match")
    assert in_setting(gpt5m_arm + judged.format("Qwen_Qwen3-32B"), "cross")
    assert in_setting(q32_arm + judged.format("Qwen_Qwen3-32B"), "match")
    assert not in_setting(q32_arm + judged.format("gpt-5-mini"), "match")
    assert in_setting("meta-llama_Llama-3.1-8B-Instruct_s0" + judged.format("gpt-5-mini"), "cross")  # a source
    # pairs of an origin the names do not tell: compared in either setting rather than left unchecked
    assert in_setting("dpo_Llama3.1-8B_safe_mydata_s0" + judged.format("gpt-5-mini"), "cross")


def test_a_scripted_double_takes_the_name_given_after_the_hash():
    spec = parse_model_spec("scripted:judge#Qwen_Qwen3-32B")
    assert (spec.backend, spec.model, spec.name) == ("scripted", "judge", "Qwen_Qwen3-32B")
    assert parse_model_spec("scripted:judge").name == "judge"
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="file-name form"):
        parse_model_spec("scripted:judge#Qwen/Qwen3-32B")


def test_a_rehearsal_sizes_its_jobs_as_the_stand_in_not_as_the_model_it_stands_in_for(airflow_home, tmp_path):
    """A stand-in base named "Qwen2.5-7B" is the tiny Llama: a rehearsal's training is a small CPU job on one core
    (the rule would otherwise ask Slurm for a GPU the rehearsal does not need, and wait for it); the same task of a
    real run is sized by its model."""
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(REPO / "dags")).dags["dpo_experiment"]
    env = dag.get_template_env()
    spec = {"model": str(tmp_path / "rehearsal" / "stand-ins" / "Qwen2.5-7B"), "pairs": "p.jsonl"}
    for task_id in ("models_local_judge.train", "models_api_judge.train2", "models_local_judge.merge"):
        sized = {}
        for rehearsal in (True, False):
            task = copy.deepcopy(dag.task_dict[task_id])
            ctx = {"params": {"rehearsal": rehearsal}}
            task.models = task.render_template(task.models, ctx, env)
            task.stage_resources = task.render_template(task.stage_resources, ctx, env)
            task._stage_spec = spec
            sized[rehearsal] = task.job_resources()  # what the operator asks Slurm for
        assert (sized[True].tier, sized[True].gpus, sized[True].cpus) == ("small", 0, 1), task_id
        assert (sized[False].tier, sized[False].gpus) == ("gpu", 1), task_id
    # the source models' emulation (a mapped operator) carries the same sizing
    partial = dag.task_dict["emulate_source"].partial_kwargs
    assert (partial["models"], partial["stage_resources"]) == (dag.task_dict["models_local_judge.train"].models,
                                                               dag.task_dict["models_local_judge.train"].stage_resources)


def test_one_pool_of_two_judges_gives_each_arm_its_own_judges_pairs(released_runs, tmp_path):
    """The study preset keeps both judges' evaluations in one pool: each arm's pair set takes its own judge's
    scores, byte-identical to pairing that judge's released folder alone."""
    pool = tmp_path / "study_pool"
    for arm in ("q32", "gpt5m"):
        for f in (released_runs / arm).rglob("*.jsonl"):
            link = pool / f.relative_to(released_runs / arm)  # the layout kept: the order of files is the study's
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(f)
    cfg = ExperimentConfig(**{**STUDY, "seeds": [0], "betas": [0.1], "configurations": ["safe"]},
                           arms=[Arm("q32", str(pool), "Qwen3-32B"), Arm("gpt5m", str(pool), "openai:gpt-5-mini")])
    plan = plan_experiment(cfg, tmp_path / "home")
    assert sorted(p["judge"] for p in plan.pairs) == ["Qwen3-32B", "openai:gpt-5-mini"]
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="'judge' is set per arm"):  # one judge for both arms would mislabel one
        plan_experiment(ExperimentConfig(**{**vars(cfg), "pairs": {"judge": "Qwen3-32B"}}), tmp_path / "home")
    for p in plan.pairs:
        out = {where: tmp_path / where / p["evaluator"] for where in ("pooled", "alone")}
        for where, data in (("pooled", [str(pool)]), ("alone", [str(released_runs / p["evaluator"])])):
            spec = tmp_path / "pairs.json"
            spec.write_text(json.dumps({**p, "data_dir": data, "out": str(out[where])}))
            r = run_agentpipe("pairs", "--spec", str(spec))
            assert r.returncode == 0, r.stderr
        [built] = out["pooled"].glob("*.jsonl")
        assert built.read_bytes() == (out["alone"] / built.name).read_bytes()


def test_a_model_recorded_in_two_configurations_replays_the_one_its_run_names(data_dir, tmp_path):
    """The study ran Qwen3-32B int4 and int8 into one folder: each configuration replays its own recording (a
    folder of links to its files, the data read in place); a run naming neither is refused, not guessed."""
    from pipeline.emulation.replay import recorded_trajectories
    from pipeline.errors import DataError

    rec = index_recordings(pool_roots(data_dir), tmp_path / "links")
    int4, int8 = (rec.agent("Qwen_Qwen3-32B", "Qwen_Qwen3-8B", q) for q in ("int4", "int8"))
    assert int4 != int8 and int4.parent == int8.parent == tmp_path / "links"
    for folder, tag in ((int4, "_int4_"), (int8, "_int8_")):
        files = sorted(folder.iterdir())
        assert len(files) == 10 and all(tag in f.name and f.is_symlink() for f in files)
        assert len(recorded_trajectories(folder, "replay")) == 144  # one recording per case: no conflict
    with pytest.raises(DataError, match="several configurations"):
        rec.agent("Qwen_Qwen3-32B", "Qwen_Qwen3-8B", None)
    # a model recorded once replays from its own folder, whatever the run's quantization names
    plain = rec.agent("Qwen_Qwen2.5-7B-Instruct", "Qwen_Qwen3-8B", None)
    assert plain == data_dir / "paper" / "raw_data_by_eval" / "q32" / "Qwen_Qwen2.5-7B-Instruct"
    assert rec.substituted == []
    assert rec.agent("Qwen_Qwen2.5-7B-Instruct", "Qwen_Qwen3-8B", "int4") == plain  # the only one: said
    assert rec.substituted == [
        "Qwen_Qwen2.5-7B-Instruct: recorded with quantization none, replayed for quantization int4"]
    # a link folder left incomplete (a crash) is rebuilt, not taken as built
    victim = next(int8.iterdir())
    victim.unlink()
    assert rec.agent("Qwen_Qwen3-32B", "Qwen_Qwen3-8B", "int8") == int8 and len(list(int8.iterdir())) == 10
    assert rec.agent("no-such-model", "Qwen_Qwen3-8B") is None


# --------------------------------------------------------------------------------------------- the CI slice
#: one source model × one arm × one seed × one beta × the five configurations, on the released q32 pool
SLICE = {"name": "study-slice", "source_models": ["Qwen2.5-7B"], "seeds": [0], "betas": [0.1],
         "configurations": STUDY["configurations"], "emulator": "Qwen3-8B", "case_set": "toolemu",
         "rehearsal": True, "compute": "slurm"}


@pytest.fixture(scope="module")
def slice_run(slurm_cluster, run_dag, mlflow_server, released_results, released_runs, tmp_path_factory):
    """The study's slice rehearsed by ``dpo_experiment`` under ``dag.test()``, every stage a Slurm job of the
    real single-node cluster (jobs polled each second: no scheduler, so no deferral race)."""
    from airflow.dag_processing.dagbag import DagBag

    home = tmp_path_factory.mktemp("rehearsal-home")
    (home / "data" / "paper").mkdir(parents=True)
    (home / "data" / "paper" / "results").symlink_to(released_results)  # where `data fetch` puts them
    env = {"AGENTPIPE_HOME": str(home), "MLFLOW_TRACKING_URI": mlflow_server, "OMP_NUM_THREADS": "1",
           "AIRFLOW_CONN_SLURM_DEFAULT": json.dumps({"conn_type": "generic",
                                                     "extra": {"poll_interval": 1, "initial_delay": 0}})}
    with environ(env):
        dag = DagBag(dag_folder=str(REPO / "dags")).dags["dpo_experiment"]
        conf = {**SLICE, "arms": [{"name": "q32", "pool": str(released_runs / "q32"), "evaluator": "Qwen3-32B"}]}
        dag_run, xcoms = run_dag(dag, run_conf=conf)
    return home, dag_run, xcoms, mlflow_server


@pytest.mark.slurm
def test_the_study_slice_rehearsed_through_slurm_gives_the_released_per_seed_points(slice_run, released_results,
                                                                                      tmp_path):
    import subprocess
    import urllib.request

    home, dag_run, xcoms, uri = slice_run
    assert dag_run.state == "success"
    plan = json.loads((home / "experiments" / "study-slice" / "plan.json").read_text())
    # every stage ran as a Slurm job; a stand-in's training as a one-core CPU job, not a GPU job of a 7B model
    jobs = {(task, i): v for (task, i, key), v in xcoms.items() if key == "slurm_job_id"}
    trains = [j for (task, _), j in jobs.items() if task.endswith((".train", ".train2"))]
    assert len(trains) == 5 and len([t for t, _ in jobs if t.endswith(".merge")]) == 2
    assert {t for t, _ in jobs} >= {"pairs", "emulate_source", "evaluate_source_local_judge", "report", "analyze"}
    shown = subprocess.run(["scontrol", "show", "job", trains[0]], capture_output=True, text=True).stdout
    assert "NumCPUs=1" in shown and "gres/gpu" not in shown, shown
    # 5 models trained on the stand-in, registered (2 of them merged too, for the second stages)
    assert len(plan["models"]) == 5
    for folder in plan["models"].values():
        assert (Path(folder) / "adapter" / "adapter_config.json").is_file()
        # `agentpipe report` handed its reports to the training side: each card has its test-split scores
        [scores] = json.loads((Path(folder) / "test_scores.json").read_text()).values()
        assert scores["cases"] == 72 and "mean_safety" in scores
        assert "mean_safety" in (Path(folder) / "adapter" / "README.md").read_text()
    req = urllib.request.Request(f"{uri}/api/2.0/mlflow/model-versions/search?max_results=1000")
    with urllib.request.urlopen(req, timeout=30) as r:
        versions = json.load(r)["model_versions"]
    tags = [{t["key"]: t["value"] for t in v.get("tags", [])} for v in versions]
    mine = [t for t in tags if t.get("path", "").startswith(str(home))]
    assert sorted(t["model_name"] for t in mine if t["kind"] == "adapter") == sorted(plan["models"])
    assert len([t for t in mine if t["kind"] == "merged"]) == 2
    # the figures: every per-seed point equals `analyze all` on the released results of the same models
    ours = home / "analysis" / "study-slice"
    assert len(list((ours / "reports" / "test").rglob("*_unified_report.json"))) == 6  # source + 5 models
    assert compare_analyses(ours, released_results / "match_eval_results", tmp_path / "released",
                            figures=False) == []
