"""The paper's DPO experiment as a plan of stage specs (used by the ``dpo_experiment`` DAG; no Airflow here).

For source models × evaluator arms × split seeds × betas × configurations (``safe``, ``help``, ``both``,
``safe->help``, ``help->safe``) the plan lists the option dicts of ``agentpipe`` stages twice over:

* **chains** (what the DAG runs): one per first-stage model, its own path
  train → test-split emulation → evaluation, and train → merge → second-stage train → emulation → evaluation
  when a two-stage configuration builds on it; each model moves on as soon as its own inputs exist.
* **phases** (``pairs``, ``train_stage1``, …, ``evaluate``, ``cross_evaluate``): the same stages phase by phase,
  with the test-split emulation of one base model's first-stage adapters grouped into one run (a backend that
  serves many adapters at once loads the base once). ``benchmarks/experiment_makespan.py`` compares the two
  schedules.

Cross evaluation (``cross_evaluation``, on by default with two arms): every finetuned model is judged by its own
arm's judge (the match setting) and by the other arm's (cross: the study's ``cross_eval_results``); the second
judgement links the same trajectory file under that judge's name in the model folder, so both live side by side
and the analysis runs once per setting (``analyze`` into ``analysis/<name>/match``, ``analyze_cross`` into
``analysis/<name>/cross``; without cross evaluation one analysis into ``analysis/<name>``). The analysis tells
the settings apart by the dataset origin in a model's name, so cross evaluation needs arms named after their
judges as the study's (``q32`` for a Qwen…32B judge, ``gpt5m`` for gpt-5-mini).

Output names are deterministic (SPEC §6.4, DESIGN §4), so every path a later stage needs is known up front,
and a stage shared by several configurations (the ``safe`` model is also the first stage of ``safe->help``) is
planned once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.analysis.names import KNOWN_ORIGINS, evaluator_origin
from pipeline.analysis.run import SETTINGS, analysis_specs
from pipeline.data.cases import load_named_case_set
from pipeline.data.naming import confined_path
from pipeline.errors import ConfigError
from pipeline.preference.pairs import PairConfig
from pipeline.training.naming import dataset_name, model_name

#: configuration → its DPO stages, in order
CONFIGURATIONS: dict[str, tuple[str, ...]] = {
    "safe": ("safe",), "help": ("help",), "both": ("both",),
    "safe->help": ("safe", "help"), "help->safe": ("help", "safe"),
}
#: dataset → the pair-building options (help = the paper's Help(Ignore); both = Help(Ignore) and safety)
DATASETS: dict[str, dict[str, Any]] = {
    "safe": {"metric": "safe"},
    "help": {"metric": "help_ignore_safety"},
    "both": {"metric": "help_ignore_safety", "metric2": "safe", "mode": "both"},
}
#: judge kinds (``judge_kind``): the DAG takes an evaluation's slot from the pool of its judge's kind
JUDGE_KINDS = ("local", "api", "batch")
#: a chain's cross-evaluation steps, one per judge kind and stage: ``cross_evaluate_<kind>`` judges the
#: first-stage model, ``cross_evaluate2_<kind>`` the second-stage one, with the other arm's judge of that kind
CROSS_STEPS = tuple(f"cross_evaluate{stage}_{kind}" for stage in ("", "2") for kind in JUDGE_KINDS)


@dataclass
class Arm:
    """An evaluator arm: the trajectory pool its judge labelled, and the judge (for the test-split evaluation)."""

    name: str  # short, used in dataset names (q32, gpt5m, demo)
    pool: str  # folder of model folders with trajectories and eval files
    evaluator: str  # judge model spec


@dataclass
class ExperimentConfig:
    name: str
    source_models: list[str]
    arms: list[Arm]
    seeds: list[int] = field(default_factory=lambda: [0])
    betas: list[float] = field(default_factory=lambda: [0.1])
    configurations: list[str] = field(default_factory=lambda: ["safe", "help", "safe->help"])
    emulator: str = "Qwen3-8B"
    case_set: str = "toolemu"
    case_range: str | None = None  # "START-END" within the case set (default: every case)
    emulation: dict[str, Any] = field(default_factory=dict)  # extra emulate options (max_steps, compat, …)
    evaluation: dict[str, Any] = field(default_factory=dict)  # extra evaluate options (replicates, …)
    #: model backend options of the emulate and evaluate stages (pipeline.llm.options: dtype, max_model_len, …)
    backend: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)  # extra train options (max_steps, max_length, …)
    pairs: dict[str, Any] = field(default_factory=dict)  # extra pairs options (min_score_difference, …)
    n_bootstrap: int = 1000
    #: judge every finetuned model by every other arm's judge too (None: on when there are two or more arms)
    cross_evaluation: bool | None = None

    @property
    def cross(self) -> bool:
        """Whether the finetuned models are cross-evaluated."""
        return len(self.arms) >= 2 if self.cross_evaluation is None else bool(self.cross_evaluation)

    def validate(self) -> None:
        unknown = sorted(set(self.configurations) - set(CONFIGURATIONS))
        if unknown:
            raise ConfigError(f"configurations {unknown}: expected some of {', '.join(CONFIGURATIONS)}")
        if not self.source_models or not self.arms or not self.seeds or not self.betas:
            raise ConfigError("experiment: expected at least one source model, arm, seed and beta")
        if len({a.name for a in self.arms}) != len(self.arms):
            raise ConfigError("experiment: arm names must be unique")
        from pipeline.llm.spec import parse_model_spec

        backends = {parse_model_spec(a.evaluator).backend for a in self.arms}
        for option, kinds in _JUDGE_OPTIONS.items():
            if self.evaluation.get(option) and not backends & set(kinds):
                raise ConfigError(f"evaluation option {option}: concerns {' and '.join(kinds)} judges, and no arm's "
                                  f"judge is one ({', '.join(a.evaluator for a in self.arms)})")
        if "judge" in self.pairs:  # each arm's pair sets take its own judge's scores (the plan sets it per arm)
            raise ConfigError("pairs: 'judge' is set per arm (its evaluator); remove it from the pairs options")
        # both become parts of output paths (trajectories/<name>, analysis/<name>, pairs/<…_arm_…>.jsonl)
        confined_path(".", self.name, "experiment name")
        for arm in self.arms:
            confined_path(".", arm.name, "experiment arm name")
        if self.cross:
            self._check_cross_arms()

    def _check_cross_arms(self) -> None:
        """The analysis tells a match from a cross judgement by the arm name in a model's name (its dataset
        origin) against the judge's origin token (``pipeline.analysis.stages``): refuse what it could not tell
        now rather than after the judging."""
        if len(self.arms) < 2:
            raise ConfigError("cross_evaluation: expected two arms (each finetuned model judged by the other arm's "
                              f"judge too), got {len(self.arms)}")
        for arm in self.arms:
            origin = evaluator_origin(arm.evaluator)
            if arm.name != origin or origin not in KNOWN_ORIGINS:
                raise ConfigError(
                    f"experiment arm '{arm.name}' (judge {arm.evaluator}): cross evaluation expected arms named "
                    f"after their judges as the analysis knows them ({' or '.join(KNOWN_ORIGINS)}: q32 for a "
                    "Qwen…32B judge, gpt5m for gpt-5-mini), so that it can tell match from cross judgements; "
                    "rename the arm or set cross_evaluation false")


@dataclass
class Plan:
    pairs: list[dict[str, Any]] = field(default_factory=list)
    train_stage1: list[dict[str, Any]] = field(default_factory=list)
    merge: list[dict[str, Any]] = field(default_factory=list)
    train_stage2: list[dict[str, Any]] = field(default_factory=list)
    emulate: list[dict[str, Any]] = field(default_factory=list)
    evaluate: list[dict[str, Any]] = field(default_factory=list)
    #: the finetuned models' evaluations by the other arms' judges (empty without cross evaluation)
    cross_evaluate: list[dict[str, Any]] = field(default_factory=list)
    #: ``analyze all`` of the runs: without cross evaluation into analysis/<name>; with it the match setting
    #: into analysis/<name>/match, and ``analyze_cross`` (else None) the cross setting into analysis/<name>/cross
    analyze: dict[str, Any] = field(default_factory=dict)
    analyze_cross: dict[str, Any] | None = None
    #: per first-stage model: {"name", "judge", "train", "emulate", "evaluate", "merge", "train2", "emulate2",
    #: "evaluate2", *CROSS_STEPS}; a step the chain does not have is None. ``judge`` is "local" or "api" (the
    #: arm's judge); ``cross_evaluate[2]_<kind>`` is the evaluation by the other arm's judge when of that kind.
    chains: list[dict[str, Any]] = field(default_factory=list)
    #: the source models' test-split emulations, and their evaluations by every arm's judge (with "judge")
    source_emulate: list[dict[str, Any]] = field(default_factory=list)
    source_evaluate: list[dict[str, Any]] = field(default_factory=list)
    #: finetuned model name → its folder (for lineage and the summary)
    models: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("pairs", "train_stage1", "merge", "train_stage2", "emulate",
                                              "evaluate", "cross_evaluate", "analyze", "analyze_cross", "chains",
                                              "source_emulate", "source_evaluate", "models")}


def experiment_from_params(p: dict[str, Any], home: Path) -> ExperimentConfig:
    """The experiment of ``dpo_experiment``'s params (a pool named by a relative path is under
    ``<home>/trajectories``); a param left out takes ``ExperimentConfig``'s default."""
    arms = [Arm(a["name"], str(Path(a["pool"]) if Path(a["pool"]).is_absolute() else home / "trajectories" / a["pool"]),
                a["evaluator"]) for a in p["arms"]]
    defaults = ExperimentConfig(name="", source_models=[], arms=[])
    return ExperimentConfig(name=p["name"], source_models=list(p["source_models"]), arms=arms,
                            seeds=list(p.get("seeds", defaults.seeds)),
                            betas=[float(b) for b in p.get("betas", defaults.betas)],
                            configurations=list(p.get("configurations", defaults.configurations)),
                            emulator=p.get("emulator", defaults.emulator), case_set=p.get("case_set", defaults.case_set),
                            case_range=p.get("cases") or None, emulation=dict(p.get("emulation") or {}),
                            evaluation=dict(p.get("evaluation") or {}), backend=dict(p.get("backend") or {}),
                            train=dict(p.get("train") or {}), pairs=dict(p.get("pairs") or {}),
                            n_bootstrap=p.get("n_bootstrap", defaults.n_bootstrap),
                            cross_evaluation=p.get("cross_evaluation"))


def judge_kind(evaluator: str, batch: bool = False) -> str:
    """``api`` for a judge behind an API endpoint (its DAG pool bounds concurrent requests), ``batch`` for one
    that answers through the Batch API (its task waits deferred, holding no slot), else ``local``."""
    from pipeline.llm.spec import parse_model_spec

    if parse_model_spec(evaluator).backend != "openai":
        return "local"
    return "batch" if batch else "api"


def plan_experiment(cfg: ExperimentConfig, home: Path) -> Plan:
    """Every stage spec of the experiment (see the module docstring)."""
    cfg.validate()
    planner = _Planner(cfg, home)
    for model in cfg.source_models:
        planner.source(model)
        for arm in cfg.arms:
            for seed in cfg.seeds:
                for beta in cfg.betas:
                    for conf in cfg.configurations:
                        planner.configuration(model, arm, seed, beta, CONFIGURATIONS[conf])
    plan = planner.plan
    analyses = analysis_specs(planner.runs, home / "analysis" / cfg.name, list(SETTINGS) if cfg.cross else [],
                              n_bootstrap=cfg.n_bootstrap)
    plan.analyze, plan.analyze_cross = analyses[0], (analyses[1] if len(analyses) > 1 else None)
    return plan


class _Planner:
    """Builds a ``Plan`` one source model and configuration at a time; every spec is planned once."""

    def __init__(self, cfg: ExperimentConfig, home: Path) -> None:
        self.cfg, self.plan = cfg, Plan()
        self.cases = _case_range(cfg.case_range, len(load_named_case_set(cfg.case_set)))
        self.runs = home / "trajectories" / cfg.name
        self.pairs_dir, self.models_dir = home / "pairs", home / "models"
        self.max_length = int(cfg.train.get("max_length", 8192))
        self.batch_size = int(cfg.train.get("batch_size", 1))
        self.quantization = str(cfg.train.get("quantization", "none"))
        self.pair_paths: dict[tuple[str, int, str], str] = {}
        self.trained: dict[tuple, str] = {}  # (model, arm, seed, beta, datasets…) → its agent spec
        #: (base model, seed) → the test-split emulation of that base's first-stage adapters: one run for them all
        #: (one engine or loaded model; every adapter's episodes in the same batches; a run file per adapter)
        self.by_base: dict[tuple[str, int], dict[str, Any]] = {}
        self.chains: dict[str, dict[str, Any]] = {}  # first-stage model folder → its chain

    def pairs_for(self, arm: Arm, seed: int, dataset: str) -> str:
        key = (arm.name, seed, dataset)
        if key not in self.pair_paths:
            opts = {**DATASETS[dataset], **self.cfg.pairs}
            pc = PairConfig(seed=seed, split="train", **{k: v for k, v in opts.items() if k in (
                "metric", "metric2", "mode", "min_score_difference", "min_chosen_score", "consistency")})
            path = self.pairs_dir / f"{pc.name(arm.name)}.jsonl"
            self.pair_paths[key] = str(path)
            # ``judge``: a pool may hold several judges' evaluations of the same trajectories (one pool, two arms)
            self.plan.pairs.append({"data_dir": [arm.pool], "evaluator": arm.name, "cases": self.cfg.case_set,
                                    "seed": seed, "split": "train", "out": str(self.pairs_dir), **opts,
                                    "judge": arm.evaluator})
        return self.pair_paths[key]

    def emulate_test_split(self, agent: str, base: str | None, seed: int) -> None:
        cfg, plan = self.cfg, self.plan
        if base is None:  # a second-stage model: its base is its own merged parent
            plan.emulate.append(_emulate_spec(cfg, agent, cfg.arms[0].evaluator, self.runs, self.cases, seed=seed))
        elif (base, seed) in self.by_base:
            self.by_base[(base, seed)]["agent"].append(agent)
        else:
            spec = _emulate_spec(cfg, agent, cfg.arms[0].evaluator, self.runs, self.cases, seed=seed)
            spec["agent"] = [agent]
            self.by_base[(base, seed)] = spec
            plan.emulate.append(spec)

    def train(self, base: str, arm: Arm, seed: int, beta: float, dataset: str, stage: int) -> str:
        pairs = self.pairs_for(arm, seed, dataset)
        name = model_name(base, dataset_name(pairs, seed), seed, beta=beta, max_length=self.max_length,
                          batch_size=self.batch_size, quantization=self.quantization)
        out = self.models_dir / name
        spec = {"model": base, "pairs": pairs, "seed": seed, "beta": beta, "out": str(out), **self.cfg.train}
        target = self.plan.train_stage1 if stage == 1 else self.plan.train_stage2
        if spec not in target:
            target.append(spec)
        self.plan.models[name] = str(out)
        return str(out)

    def kind(self, arm: Arm) -> str:
        """The judge kind of the arm's evaluations (``batch``: an API judge with the evaluation option set)."""
        return judge_kind(arm.evaluator, bool(self.cfg.evaluation.get("batch")))

    def chain(self, arm: Arm, first: str) -> dict[str, Any]:
        if first not in self.chains:
            self.chains[first] = {"name": Path(first).name, "judge": self.kind(arm),
                                  "train": next(t for t in self.plan.train_stage1 if t["out"] == first),
                                  **dict.fromkeys(("emulate", "evaluate", "merge", "train2", "emulate2", "evaluate2",
                                                   *CROSS_STEPS))}
            self.plan.chains.append(self.chains[first])
        return self.chains[first]

    def source(self, model: str) -> None:
        """The source model is emulated once on every case; each arm's judge evaluates it (match and source rows)."""
        cfg, plan = self.cfg, self.plan
        source_traj = _emulate_spec(cfg, model, cfg.arms[0].evaluator, self.runs, self.cases, seed=None)
        plan.emulate.append(source_traj)
        plan.source_emulate.append(source_traj)
        for arm in cfg.arms:
            spec = _evaluate_spec(cfg, model, arm, self.runs, self.cases, seed=None, label=None)
            plan.evaluate.append(spec)
            plan.source_evaluate.append({**spec, "judge": self.kind(arm)})

    def configuration(self, model: str, arm: Arm, seed: int, beta: float, stages: tuple[str, ...]) -> None:
        """One trained model (one or two stages) and its chain: training, merge, emulation, evaluations."""
        cfg, plan = self.cfg, self.plan
        first = self.train(model, arm, seed, beta, stages[0], 1)
        link = self.chain(arm, first)
        key = (model, arm.name, seed, beta, *stages)
        base: str | None = model
        if len(stages) == 1:
            agent = f"{model}+{first}/adapter"
        else:
            base = None
            merged = f"{first}/merged"
            spec = {"adapter": f"{first}/adapter", "out": merged}
            if spec not in plan.merge:
                plan.merge.append(spec)
            second = self.train(merged, arm, seed, beta, stages[1], 2)
            agent = f"{merged}+{second}/adapter"
            link["merge"] = spec
            link["train2"] = next(t for t in plan.train_stage2 if t["out"] == second)
        if key in self.trained:
            return
        self.trained[key] = agent
        self.emulate_test_split(agent, base, seed)
        evaluation = _evaluate_spec(cfg, agent, arm, self.runs, self.cases, seed=seed, label=None)
        plan.evaluate.append(evaluation)
        step = "" if len(stages) == 1 else "2"  # the chain's own emulation: this model alone
        link[f"emulate{step}"] = _emulate_spec(cfg, agent, cfg.arms[0].evaluator, self.runs, self.cases, seed=seed)
        link[f"evaluate{step}"] = evaluation
        if cfg.cross:
            _cross_evaluate(cfg, plan, link, step, agent, arm, self.runs, self.cases, seed)


def _cross_evaluate(cfg: ExperimentConfig, plan: Plan, link: dict[str, Any], step: str, agent: str, arm: Arm,
                    runs: Path, cases: tuple[int, int], seed: int) -> None:
    """The chain step ``cross_evaluate{step}_<kind>`` for each other arm: its judge evaluates ``agent``'s
    trajectory file (the one its own arm's evaluation reads)."""
    for other in cfg.arms:
        if other is arm:
            continue
        spec = _evaluate_spec(cfg, agent, other, runs, cases, seed=seed, label=None)
        key = f"cross_evaluate{step}_{judge_kind(other.evaluator, bool(cfg.evaluation.get('batch')))}"
        if link[key] is not None:  # validate() allows two arms only: one other judge
            raise ConfigError(f"experiment: two other arms' judges of one kind for {agent}; expected one")
        link[key] = spec
        plan.cross_evaluate.append(spec)


def _case_range(text: str | None, n_cases: int) -> tuple[int, int]:
    if not text:
        return 0, n_cases
    try:
        a, b = (int(x) for x in text.split("-", 1))
    except ValueError:
        raise ConfigError(f"cases '{text}': expected START-END") from None
    if not 0 <= a < b <= n_cases:
        raise ConfigError(f"cases '{text}': expected a range within 0-{n_cases}")
    return a, b


def _emulate_spec(cfg: ExperimentConfig, agent: str, evaluator: str, runs: Path, cases: tuple[int, int],
                  seed: int | None) -> dict[str, Any]:
    spec = {"agent": agent, "emulator": cfg.emulator, "evaluator": evaluator, "case_set": cfg.case_set,
            "cases": f"{cases[0]}-{cases[1]}", "out": str(runs), "no_progress": True, **cfg.backend,
            **cfg.emulation}
    if seed is not None:
        spec.update(test_only=True, seed=seed)
    return spec


def _evaluate_spec(cfg: ExperimentConfig, agent: str, arm: Arm, runs: Path, cases: tuple[int, int],
                   seed: int | None, label: str | None) -> dict[str, Any]:
    """Evaluate the agent's trajectory file; its path follows from the emulation's naming."""
    from pipeline.data.naming import RunFileName, file_quantization
    from pipeline.llm.spec import parse_model_spec

    name = label or parse_model_spec(agent).name
    traj = RunFileName(name, parse_model_spec(cfg.emulator).name, parse_model_spec(cfg.arms[0].evaluator).name,
                       quantization=file_quantization(cfg.emulation.get("quantization")),
                       case_range=cases)
    return {"trajectories": str(runs / name / traj.filename()), "evaluator": arm.evaluator, "no_progress": True,
            **cfg.backend, **_judge_options(cfg.evaluation, arm.evaluator)}


#: evaluation options that concern one kind of judge (the backend of its spec): an experiment's evaluation options
#: apply to every arm, and each of these only to the arms whose judge it concerns
_JUDGE_OPTIONS = {"batch": ("openai",), "reasoning_effort": ("openai",), "structured": ("vllm", "openai")}


def _judge_options(options: dict[str, Any], evaluator: str) -> dict[str, Any]:
    """An experiment's evaluation options for one arm's judge: ``batch`` and ``reasoning_effort`` for API judges,
    ``structured`` for vLLM and API judges (``dags/README.md``), the rest for every judge. An option that concerns
    none of the experiment's judges is refused (``ExperimentConfig.validate``)."""
    from pipeline.llm.spec import parse_model_spec

    backend = parse_model_spec(evaluator).backend
    return {k: v for k, v in options.items() if backend in _JUDGE_OPTIONS.get(k, (backend,))}
