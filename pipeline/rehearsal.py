"""Rehearsal: the user's plan, unchanged, with every model a stand-in (``dpo_experiment`` / ``toolemu_evaluation``
Param ``rehearsal``).

Names, paths, splits, seeds, pools and the cost approval's figures are the plan's own; only what each stage calls
changes:

* generation and judging: ``replay:`` of the study's recorded outputs wherever the study recorded that model (with
  that emulator) and that judge on it — the pool from ``<data>/paper/raw_data_by_eval/``, the finetuned and source
  models of the DPO experiment from the fetched results archive (``<data>/paper/results/``), read in place — and
  the scripted test doubles where nothing was recorded (a plan with models of one's own rehearses too);
* training: every planned model really trains, merges and registers, on a tiny stand-in base model (the offline
  tiny Llama) in a folder named as the source model, on its real pair set, for a few steps.

A replayed model keeps the name it stands in for (``replay:<folder>#<name>``), so every run file, folder and
report is where the real run would put it, and the analysis at the end reads the study's figures.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import DataError, NamingError

#: optimizer steps of a stand-in training (every planned model trains; the weights are not the study's)
STAND_IN_STEPS = 2
#: train options a rehearsal sets: a few steps of one pair each, no validation pass, on the stand-in (dropping
#: pairs above the plan's limits is the plan's own rule and stays). One pair per step: the plan's accumulation of
#: 8 made each stand-in training read 16 pairs of up to 8k tokens, 150 s on this machine's cores, 180 times over.
#: No activation checkpointing: the stand-in's activations are small, and recomputing them cost ~20 % of a training.
STAND_IN_TRAIN = {"max_steps": STAND_IN_STEPS, "gradient_accumulation_steps": 1, "final_eval": False,
                  "save_steps": STAND_IN_STEPS, "gradient_checkpointing": False}


@dataclass
class Recordings:
    """What the study recorded: (agent name, emulator name) → {quantization tag of the run-file names: that
    configuration's trajectory files} (the study ran Qwen3-32B and Qwen3-32Bnt twice, int4 and int8, into one
    folder), and (agent name, judge name) → a folder holding that judge's eval files of them. The first root to
    record a model wins (roots are given in order of precedence). ``links``: where a configuration that shares
    its folder with another gets a folder of links to its own files (a replay answers from a whole folder)."""

    trajectories: dict[tuple[str, str], dict[str | None, list[Path]]] = field(default_factory=dict)
    judgements: dict[tuple[str, str], Path] = field(default_factory=dict)
    links: Path | None = None
    #: agents replayed from the one configuration the study recorded, not the run's own (a line each)
    substituted: list[str] = field(default_factory=list)

    def agent(self, name: str, emulator: str, quantization: str | None = None) -> Path | None:
        """The folder (or folder of links) to replay agent ``name`` run with ``quantization`` from: the recording
        of that configuration, else the model's only recorded one (a stand-in of the same model); None when the
        study did not record the model with that emulator. Several recorded configurations, none of them this
        one: a ``DataError`` (which of them stands in is the user's choice, by setting the quantization)."""
        from pipeline.data.naming import file_quantization

        configs = self.trajectories.get((name, emulator))
        if not configs:
            return None
        tag = file_quantization(quantization)
        if tag not in configs and len(configs) > 1:
            named = ", ".join(sorted(q or "none" for q in configs))
            raise DataError(f"rehearsal: agent {name} is recorded in several configurations ({named}), none of "
                            f"them quantization {quantization or 'none'}; set the quantization of the one to replay")
        if tag not in configs:  # said, not silent: the plan task logs them (rehearse_plan, toolemu_evaluation)
            [recorded] = configs
            self.substituted.append(f"{name}: recorded with quantization {recorded or 'none'}, replayed for "
                                    f"quantization {quantization or 'none'}")
            logging.getLogger(__name__).warning("rehearsal: %s", self.substituted[-1])
            tag = recorded
        return self._folder_of(configs[tag])

    def judge(self, name: str, judge: str) -> Path | None:
        return self.judgements.get((name, judge))

    def _folder_of(self, files: list[Path]) -> Path:
        from pipeline.emulation.replay import trajectory_files

        folder = files[0].parent
        if all(f.parent == folder for f in files) and trajectory_files(folder) == files:
            return folder
        if self.links is None:
            raise DataError(f"rehearsal: {folder} holds several recorded configurations of one model; give the "
                            "recordings a folder for links (Recordings.links)")
        import hashlib

        key = hashlib.sha256("\n".join(str(f) for f in files).encode()).hexdigest()[:12]
        out = self.links / f"{folder.name}-{key}"
        files = sorted(files, key=lambda f: f.name)
        if _links_to(out) == files:
            return out
        # built aside under a name of its own, then renamed into place: a task building the same folder at the same
        # time renames an identical one, and an incomplete folder (a crash) is never taken as built
        import shutil
        import tempfile

        self.links.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=self.links))
        for f in files:
            (tmp / f.name).symlink_to(f)
        if out.exists() and _links_to(out) != files:  # left by a build that did not finish: replaced
            shutil.rmtree(out, ignore_errors=True)
        try:
            tmp.rename(out)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if _links_to(out) != files:  # not another task's identical folder: something else is in the way
                raise DataError(f"rehearsal: cannot place the links to {folder}'s recording at {out}") from None
        return out


def _links_to(folder: Path) -> list[Path] | None:
    """The files a folder of links points at, in name order (None when there is no such folder)."""
    if not folder.is_dir():
        return None
    return [p.readlink() if p.is_symlink() else p for p in sorted(folder.iterdir())]


def index_recordings(roots: Iterable[Path], links: Path | None = None) -> Recordings:
    """Index the model folders below each root (a folder of model folders, as ``raw_data_by_eval/q32``; a model
    folder's sub-folders count as its own)."""
    from pipeline.data.naming import parse_run_filename

    rec = Recordings(links=links)
    for root in roots:
        found: dict[tuple[str, str], dict[str | None, list[Path]]] = {}
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            for f in sorted(folder.rglob("*.jsonl")):
                try:
                    name = parse_run_filename(f.name)
                except NamingError:
                    continue  # not a run file
                if not name.is_trajectory_file:
                    continue
                found.setdefault((name.agent, name.emulator), {}).setdefault(name.quantization, []).append(f)
                if any(f.with_name(f"{f.stem}_eval_agent_{t}.jsonl").is_file()
                       for t in ("safe", "help_ignore_safety", "help")):
                    rec.judgements.setdefault((name.agent, name.evaluator), folder)
        for key, configs in found.items():
            rec.trajectories.setdefault(key, configs)
    return rec


def pool_roots(data_dir: Path) -> list[Path]:
    """The study's trajectory pool, judged by Qwen3-32B and gpt-5-mini (the same trajectories in both)."""
    roots = [data_dir / "paper" / "raw_data_by_eval" / arm for arm in ("q32", "gpt5m")]
    missing = [str(r) for r in roots if not r.is_dir()]
    if missing:
        raise DataError(f"rehearsal: the study's recordings are missing ({', '.join(missing)}); run `agentpipe data "
                        "fetch` first")
    return roots


def results_roots(data_dir: Path) -> list[Path]:
    """The study's evaluations of its finetuned and source models (fetched from the results archive)."""
    from pipeline.data.results import find_results

    base = find_results(data_dir)
    if base is None:
        raise DataError("rehearsal: the study's results are not fetched; run `agentpipe data fetch --from "
                        "<data>/paper/results.tar.xz` (or plain `agentpipe data fetch`) first")
    return [base / "match_eval_results", base / "cross_eval_results"]


def recordings(kind: str, data_dir: Path | None = None, home: Path | None = None) -> Recordings:
    """The recordings a rehearsal replays: ``pool`` (toolemu_evaluation) or ``experiment`` (dpo_experiment: the
    results archive first, then the pool, so a source model the study only ran in its pool replays too).
    Folders of links, where needed, go under ``<home>/rehearsal/recordings``."""
    from pipeline.settings import get_settings

    settings = get_settings()
    data = data_dir or settings.resolved_data_dir
    links = (home or settings.home) / "rehearsal" / "recordings"
    if kind == "pool":
        return index_recordings(pool_roots(data), links)
    if kind == "experiment":
        return index_recordings(results_roots(data) + pool_roots(data), links)
    raise ValueError(f"recordings: unknown kind {kind!r}")


# ------------------------------------------------------------------------------------------- stage specs
def _name(spec: str) -> str:
    from pipeline.llm.spec import parse_model_spec

    return parse_model_spec(spec).name


def rehearse_emulation(spec: dict[str, Any], rec: Recordings) -> dict[str, Any]:
    """An emulate spec whose agent and emulator replay the study's recording of that agent (under the study's
    engine rules, which made the recording), or are the scripted doubles where there is none; names unchanged."""
    from pipeline.data.naming import sanitize_model_name

    out = dict(spec)
    agents = spec["agent"] if isinstance(spec["agent"], list) else [spec["agent"]]
    if len(agents) != 1:
        raise ValueError("rehearse_emulation: one agent per emulation (the chains' specs)")
    agent = agents[0]
    name = sanitize_model_name(spec["agent_label"]) if spec.get("agent_label") else _name(agent)
    emulator = _name(spec["emulator"])
    folder = rec.agent(name, emulator, spec.get("quantization"))
    if folder is not None:
        out.update(agent=f"replay:{folder}#{name}", emulator=f"replay:{folder}#{emulator}", compat="study")
    else:
        out.update(agent=f"scripted:agent#{name}", emulator=f"scripted:emulator#{emulator}")
    out.pop("agent_label", None)
    return out  # the quantization stays: it names the run file (the backends of stand-ins ignore it)


def rehearse_evaluation(spec: dict[str, Any], rec: Recordings) -> dict[str, Any]:
    """An evaluate spec whose judge replays the study's recorded judgements of that model by that judge, or is the
    scripted judge where there are none; the judge's name (and so every eval file's) unchanged."""
    from pipeline.data.naming import parse_run_filename

    out = dict(spec)
    judge = _name(spec["evaluator"])
    model = parse_run_filename(Path(spec["trajectories"]).name).agent
    folder = rec.judge(model, judge)
    out["evaluator"] = f"replay:{folder}#{judge}" if folder is not None else f"scripted:judge#{judge}"
    out["scoring"] = "generate"  # a recorded judgement is a written answer, parsed as a live judge's
    for key in ("batch", "batch_wait", "batch_poll_s"):  # the stand-in answers at once: no Batch API
        out.pop(key, None)
    return out


def stand_in_base(name: str, home: Path) -> Path:
    """The stand-in base model of source model ``name``: the offline tiny Llama, in a folder named ``name`` so that
    every trained model takes the name the real run would give it (SPEC §6.4)."""
    from pipeline.data.naming import confined_path
    from pipeline.llm.local_models import tiny_llama

    tiny = tiny_llama()
    folder = confined_path(home / "rehearsal" / "stand-ins", name, "source model")
    folder.mkdir(parents=True, exist_ok=True)
    for f in tiny.iterdir():
        link = folder / f.name
        if not link.exists():
            link.symlink_to(f.resolve())
    return folder


def rehearse_training(spec: dict[str, Any], stand_ins: dict[str, Path]) -> dict[str, Any]:
    """A train spec on the stand-in base (a first stage) or on its stand-in parent (a second stage, unchanged),
    for a few steps."""
    out = {**spec, **STAND_IN_TRAIN}
    if spec["model"] in stand_ins:
        out["model"] = str(stand_ins[spec["model"]])
    return out


def rehearse_plan(plan: dict[str, Any], source_models: list[str], home: Path,
                  rec: Recordings) -> dict[str, Any]:
    """The plan dict (``Plan.as_dict()``) with every stage spec a stand-in's; ``planned`` keeps the real plan (its
    size is what the cost approval shows)."""
    stand_ins = {m: stand_in_base(m, home) for m in source_models}
    out = copy.deepcopy(plan)
    out["train_stage1"] = [rehearse_training(s, stand_ins) for s in plan["train_stage1"]]
    out["train_stage2"] = [rehearse_training(s, stand_ins) for s in plan["train_stage2"]]
    out["source_emulate"] = [rehearse_emulation(s, rec) for s in plan["source_emulate"]]
    out["source_evaluate"] = [{**rehearse_evaluation(s, rec), "judge": s["judge"]} for s in plan["source_evaluate"]]
    out["emulate"] = [rehearse_emulation({**s, "agent": a}, rec) for s in plan["emulate"]
                      for a in (s["agent"] if isinstance(s["agent"], list) else [s["agent"]])]
    out["evaluate"] = [rehearse_evaluation(s, rec) for s in plan["evaluate"]]
    out["cross_evaluate"] = [rehearse_evaluation(s, rec) for s in plan.get("cross_evaluate", [])]
    for chain in out["chains"]:
        for key, value in chain.items():
            if value is None or key in ("name", "judge"):
                continue
            if key.startswith("train"):
                chain[key] = rehearse_training(value, stand_ins)
            elif key.startswith("emulate"):
                chain[key] = rehearse_emulation(value, rec)
            elif "evaluate" in key:
                chain[key] = ([rehearse_evaluation(v, rec) for v in value] if isinstance(value, list)
                              else rehearse_evaluation(value, rec))
    out["planned"] = plan
    return out


def rehearsal_counts(plan: dict[str, Any]) -> dict[str, int]:
    """How many emulations and evaluations of a rehearsed plan replay recordings, and how many are doubles."""
    specs = plan["source_emulate"] + [c[k] for c in plan["chains"] for k in ("emulate", "emulate2") if c.get(k)]
    evals = plan["source_evaluate"] + [c[k] for c in plan["chains"] for k in c
                                       if "evaluate" in k and c.get(k) and not isinstance(c[k], list)]
    return {"emulations_replayed": sum(s["agent"].startswith("replay:") for s in specs),
            "emulations_scripted": sum(s["agent"].startswith("scripted:") for s in specs),
            "evaluations_replayed": sum(s["evaluator"].startswith("replay:") for s in evals),
            "evaluations_scripted": sum(s["evaluator"].startswith("scripted:") for s in evals)}


# ------------------------------------------------------------------------------------------- the check
#: fields of an analysis arm that must equal the released analysis's (the fit, persistence and the frontier)
_ARM_FIGURES = ("n_points", "r2", "slope", "intercept", "persistence")
_REPORT_META = ("agent", "model_dir", "emulator", "evaluator", "split", "seed", "n_cases")


def _report_view(path: Path) -> dict[str, Any]:
    """A unified report without what names its source files (the rehearsal's are one file per model)."""
    rep = json.loads(path.read_text())
    meta = rep.pop("meta", {})
    return {**rep, "meta": {k: meta.get(k) for k in _REPORT_META}}


def in_setting(report_name: str, setting: str | None) -> bool:
    """Whether a unified report belongs to an analysis of ``setting`` (``match``/``cross``): a source model's
    always, a finetuned model's when its judge is (match) or is not (cross) the one that labelled its pairs, or
    when its names do not tell (an unknown pair origin: compared whichever setting, never left unchecked)."""
    from pipeline.analysis.stages import parse_training_config
    from pipeline.data.naming import is_finetuned, parse_run_filename

    name = parse_run_filename(report_name)
    if setting not in ("match", "cross") or not is_finetuned(name.agent):
        return True
    return parse_training_config(name.agent).relation(name.evaluator) in (setting, None)


def compare_analyses(ours: Path, released_runs: Path, ref_out: Path, *, figures: bool = True) -> list[str]:
    """Differences between the analysis folder ``ours`` and ``analyze all`` of ``released_runs`` (written to
    ``ref_out`` with the same settings): every per-seed (test-split) report of ``ours`` (its configurations'
    points); with ``figures`` (the plan is the whole study) also every released point's counterpart here, and each
    arm's fit, persistence and frontier members. Empty when they agree."""
    from pipeline.analysis.run import AnalyzeConfig, analyze

    summary = json.loads((ours / "summary.json").read_text())
    setting = summary.get("setting")
    setting = setting if setting in ("match", "cross") else None  # "sources-only", "unknown": no setting
    analyze(AnalyzeConfig(runs=released_runs, out=ref_out, n_bootstrap=summary["n_bootstrap"], no_track=True,
                          formats=["png"], setting=setting))
    diffs = []
    # the per-seed points are the test-split reports; the "all" view is left out: the study emulated its first-stage
    # models on all 144 cases, the plan (as SPEC's experiment) on the test split only. A runs folder with both
    # settings has reports of both in each analysis folder; a setting's points are its own reports
    reports = sorted(f for f in (ours / "reports" / "test").rglob("*_unified_report.json")
                     if in_setting(f.name, setting))
    if not reports:
        diffs.append(f"{ours}: no reports")
    for f in reports:
        rel = f.relative_to(ours)
        ref = ref_out / rel
        if not ref.is_file():
            diffs.append(f"{rel}: not in the released analysis")
        elif _report_view(f) != _report_view(ref):
            diffs.append(f"{rel}: scores differ from the released analysis")
    if figures:  # the whole study: every released point has its counterpart here, and the figures are equal
        ours_rel = {f.relative_to(ours) for f in reports}
        diffs += [f"{rel}: in the released analysis, not in this one" for rel in sorted(
            f.relative_to(ref_out) for f in (ref_out / "reports" / "test").rglob("*_unified_report.json")
            if in_setting(f.name, setting)) if rel not in ours_rel]
        theirs = json.loads((ref_out / "summary.json").read_text())
        for arm, a in summary["arms"].items():
            b = theirs["arms"].get(arm)
            if b is None:
                diffs.append(f"arm {arm}: not in the released analysis")
                continue
            diffs += [f"arm {arm}: {k} {a.get(k)!r} != released {b.get(k)!r}" for k in _ARM_FIGURES
                      if a.get(k) != b.get(k)]
            if a["frontier"].get("members") != b["frontier"].get("members"):
                diffs.append(f"arm {arm}: frontier {a['frontier'].get('members')} != released "
                             f"{b['frontier'].get('members')}")
    return diffs
