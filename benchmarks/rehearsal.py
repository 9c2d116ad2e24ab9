"""The study end to end through Airflow, rehearsed: every model a stand-in, the paper's figures at the end.

    python benchmarks/rehearsal.py                 # (make rehearsal) the full study: pool, 180 models, analysis
    python benchmarks/rehearsal.py --slice         # one source model × one arm × one seed × one beta × 5 configs

Starts MLflow and Airflow (LocalExecutor, the pools) as ``make demo`` does, under ``--home`` (default
``runs/rehearsal``), then triggers with ``rehearsal: true``:

1. ``toolemu_evaluation`` six times — the study's pool of 27 agent configurations (25 models, by the quantization
   each ran with: none, int4, int8) on the 144 cases, judged by Qwen3-32B and by gpt-5-mini — every output
   replayed from ``<data>/paper/raw_data_by_eval`` (full run only; the slice pairs the released pool directly);
2. ``dpo_experiment`` with the study's preset (``dags/README.md``): pairs, 180 trainings on the stand-in base,
   merges, test-split emulations and match + cross evaluations replayed from the results archive, reports, and
   the analyses.

Then it checks the pair sets against ``agentpipe pairs`` on the released pool, and the analyses against
``agentpipe analyze all`` on the released results (every per-seed report, fit, persistence and frontier), and
prints the number of tasks, the wall time, the time per stage kind, the scheduler's per-task overhead, the services'
peak memory and the figures beside the paper's. Exit status 1 when a figure differs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: the study's trajectory pool: its 27 agent configurations (25 models; Qwen3-32B and Qwen3-32Bnt ran twice), by the
#: quantization each run had (the tag of raw_data_by_eval's file names): one toolemu_evaluation run per group
POOL_AGENTS = {
    "none": ["Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen3-14B", "Qwen/Qwen3-14Bnt", "Qwen/Qwen3-8B", "Qwen/Qwen3-8Bnt",
             "meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.2-3B-Instruct", "microsoft/phi-4",
             "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "gpt-4o-mini", "gpt-5", "gpt-5-mini", "gpt-5-nano",
             "gpt-5.1", "gpt-5.2"],
    "int4": ["Qwen/Qwen2.5-32B-Instruct", "Qwen/Qwen3-30B-A3B-Instruct-2507", "Qwen/Qwen3-30B-A3B-Thinking-2507",
             "Qwen/Qwen3-32B", "Qwen/Qwen3-32Bnt", "meta-llama/Llama-3.1-70B-Instruct",
             "meta-llama/Llama-3.3-70B-Instruct", "mistralai/Mixtral-8x7B-Instruct-v0.1"],
    "int8": ["Qwen/Qwen3-32B", "Qwen/Qwen3-32Bnt"]}
JUDGES = {"q32": "Qwen3-32B", "gpt5m": "openai:gpt-5-mini"}
#: the study's plan: the cluster preset of dags/README.md (compute and approval aside)
STUDY = {"name": "study", "source_models": ["Llama3.1-8B", "Phi-4", "Qwen2.5-7B"],
         "arms": [{"name": "q32", "pool": "study_pool", "evaluator": "Qwen3-32B"},
                  {"name": "gpt5m", "pool": "study_pool", "evaluator": "openai:gpt-5-mini"}],
         "seeds": [0, 1, 2], "betas": [0.1, 0.05],
         "configurations": ["safe", "help", "both", "safe->help", "help->safe"],
         "emulator": "Qwen3-8B", "case_set": "toolemu"}
#: what the paper reports (abstract and tables): R² of the trade-off fit per arm, match and cross evaluated
PAPER = {"match": {"eval-gpt5m": 0.77, "eval-q32": 0.662}, "cross": {"eval-gpt5m": 0.594, "eval-q32": 0.721}}


def slice_plan(data_dir: Path) -> dict[str, Any]:
    """One source model × one arm × one seed × one beta × the five configurations, on the released q32 pool."""
    return {**STUDY, "name": "study-slice", "source_models": ["Qwen2.5-7B"],
            "arms": [{"name": "q32", "pool": str(data_dir / "paper" / "raw_data_by_eval" / "q32"),
                      "evaluator": "Qwen3-32B"}],
            "seeds": [0], "betas": [0.1]}


class MemorySampler(threading.Thread):
    """Peak resident memory of each service's process group (MLflow, the Airflow components), sampled."""

    def __init__(self, pids: Path, every_s: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.pids, self.every_s, self.peak = pids, every_s, defaultdict(int)
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(self.every_s):
            groups = {}
            for f in self.pids.glob("*.pid"):
                try:
                    groups[int(f.read_text())] = f.stem
                except ValueError:
                    continue
            rss: dict[str, int] = defaultdict(int)
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                try:
                    pgid = os.getpgid(int(proc.name))
                    if pgid in groups:
                        pages = int((proc / "statm").read_text().split()[1])
                        rss[groups[pgid]] += pages * os.sysconf("SC_PAGE_SIZE")
                except (OSError, ValueError):
                    continue  # the process ended between the listing and the read
            for name, b in rss.items():
                self.peak[name] = max(self.peak[name], b)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        return dict(self.peak)


def _iso(t: str | None) -> float | None:
    from datetime import datetime

    return datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp() if t else None


def task_profile(af, dag_id: str, run_id: str) -> dict[str, Any]:
    """Task count, time per stage kind and the scheduler's wait per task (queued → started), from Airflow's task
    records of one run."""
    tis = af.task_instances(dag_id, run_id)
    by_kind: dict[str, list[float]] = defaultdict(list)
    waits = []
    for ti in tis:
        if ti["state"] != "success" or ti.get("duration") is None:
            continue
        by_kind[ti["task_id"].rsplit(".", 1)[-1]].append(ti["duration"])
        q, s = _iso(ti.get("queued_when")), _iso(ti.get("start_date"))
        if q and s:
            waits.append(s - q)
    return {"tasks": len(tis), "succeeded": sum(ti["state"] == "success" for ti in tis),
            "by_kind": {k: {"n": len(v), "total_s": sum(v), "mean_s": sum(v) / len(v)} for k, v in by_kind.items()},
            "queue_wait_mean_s": sum(waits) / len(waits) if waits else None, "busy": busy_slots(tis),
            "active_s": active_s(tis)}


def busy_slots(tis: list[dict[str, Any]], pause_s: float = 300) -> dict[int, float]:
    """Seconds of the run during which n tasks were running, for each n (0 = none: the scheduler between two
    tasks, or waiting on a dependency), from the tasks' start and end times (skipped ones included). A pause with
    nothing running longer than ``pause_s`` (the machine stopped, then ``--resume``) is left out."""
    events = []
    for ti in tis:
        a, b = _iso(ti.get("start_date")), _iso(ti.get("end_date"))
        if a is not None and b is not None and b >= a:  # a task cleared and not yet rerun keeps an older end
            events += [(a, 1), (b, -1)]
    events.sort(key=lambda e: (e[0], -e[1]))  # a start before an end at the same time: a skipped task takes 0 s
    out: dict[int, float] = defaultdict(float)
    running, last = 0, None
    for t, step in events:
        if last is not None and not (running == 0 and t - last > pause_s):
            out[running] += t - last
        running, last = running + step, t
    return dict(out)


def registry_versions(mlflow_url: str) -> int:
    """How many model versions the MLflow registry holds (every trained and merged model registers one)."""
    import urllib.parse
    import urllib.request

    n, token = 0, None
    while True:
        query = {"max_results": 1000, **({"page_token": token} if token else {})}
        url = f"{mlflow_url}/api/2.0/mlflow/model-versions/search?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=60) as r:
            page = json.load(r)
        n += len(page.get("model_versions", []))
        token = page.get("next_page_token")
        if not token:
            return n


def active_s(tis: list[dict[str, Any]], pause_s: float = 300) -> float:
    """Seconds of a run's span during which it was going on: with tasks running, or between two tasks for less
    than ``pause_s`` (the scheduler's latency); a longer pause (the machine stopped, then ``--resume``) is left out."""
    return sum(busy_slots(tis, pause_s).values())


def resume_runs(af, timeout_s: float) -> list[tuple[str, str, dict[str, Any], float]]:
    """The rehearsal's runs already under this home, in the order they ran. An unfinished one (the machine stopped
    under it) is followed to its end: its task instances left running or queued by the stopped services, and the
    failed ones with what depends on them, are cleared first, so they run again (every stage resumes its output)."""
    out = []
    for dag_id in ("toolemu_evaluation", "dpo_experiment"):
        for r in af.call("GET", f"/dags/{dag_id}/dagRuns?order_by=start_date&limit=100")["dag_runs"]:
            state, run_id = r["state"], r["dag_run_id"]
            if state != "success":
                for only in ("only_running", "only_failed"):
                    af.call("POST", f"/dags/{dag_id}/clearTaskInstances",
                            {"dry_run": False, "dag_run_id": run_id, only: True, "include_downstream": True,
                             "reset_dag_runs": True, **({"only_failed": False} if only == "only_running" else {})})
                state = af.follow(dag_id, run_id, timeout=timeout_s)
            prof = task_profile(af, dag_id, run_id)
            out.append((dag_id, state, prof, prof["active_s"]))
            if state != "success":
                return out
    return out


def run_dag(af, dag_id: str, conf: dict[str, Any], timeout_s: float) -> tuple[str, dict[str, Any], float]:
    t0 = time.monotonic()
    af.wait_for_dag(dag_id)
    run_id = af.trigger(dag_id, conf)
    state = af.follow(dag_id, run_id, timeout=timeout_s)
    return state, task_profile(af, dag_id, run_id), time.monotonic() - t0


def _pair_view(path: Path) -> list[str]:
    """A pair set's records with each trajectory named by its run (agent, emulator, judge, quantization) and case,
    not by file and line: the study's run files carry its own case ranges and start times (and a line is a
    position in such a file), a rehearsal's its own."""
    from pipeline.data.naming import parse_run_filename

    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        for side in ("chosen", "rejected"):
            n = parse_run_filename(rec[f"{side}_file"])
            rec[f"{side}_file"] = (n.agent, n.emulator, n.evaluator, n.quantization)
            del rec[f"{side}_line"]
        out.append(json.dumps(rec, sort_keys=True))
    return out


def check_pairs(home: Path, plan: dict[str, Any]) -> tuple[list[str], list[str], int]:
    """The rehearsal's pair sets against ``agentpipe pairs`` on the released pool: (those that differ beyond the
    trajectories' file names and lines, those holding the same pairs in another order, how many are
    byte-identical)."""
    import subprocess

    from pipeline.settings import get_settings

    data = get_settings().resolved_data_dir / "paper" / "raw_data_by_eval"
    ref = home / "rehearsal-check" / "pairs"
    bad, reordered, same = [], [], 0
    for spec in json.loads((home / "experiments" / plan["name"] / "plan.json").read_text())["pairs"]:
        args = {**spec, "data_dir": [str(data / spec["evaluator"])], "out": str(ref)}
        spec_file = ref.parent / "spec.json"
        spec_file.parent.mkdir(parents=True, exist_ok=True)
        spec_file.write_text(json.dumps(args))
        subprocess.run([sys.executable, "-m", "pipeline.cli", "pairs", "--spec", str(spec_file)], check=True,
                       capture_output=True)
    for ours in sorted((home / "pairs").glob("*.jsonl")):
        theirs = ref / ours.name
        if not theirs.is_file():
            bad.append(f"{ours.name} (not built from the released pool)")
        elif ours.read_bytes() == theirs.read_bytes():
            same += 1
        elif (a := _pair_view(ours)) != (b := _pair_view(theirs)):
            ca, cb = Counter(a), Counter(b)
            differ = max(sum((cb - ca).values()), sum((ca - cb).values()))
            # only the gpt5m pool has a reason to load in another order: its nested int8 folder sorts first
            # (load order = sorted paths, SPEC §4.2; docs/compat.md)
            if not differ and "_gpt5m_" in ours.name:
                reordered.append(ours.name)
            else:
                bad.append(f"{ours.name} ({differ} of {len(b)} pairs differ"
                           + ("; the same pairs in another order)" if not differ else ")"))
    return bad, reordered, same


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", type=Path, default=Path(os.environ.get("AGENTPIPE_HOME", REPO / "runs" / "rehearsal")))
    ap.add_argument("--slice", action="store_true", help="one source model × one arm × one seed × one beta")
    ap.add_argument("--compute", choices=["local", "slurm"], default="local")
    ap.add_argument("--slots", type=int, default=2, help="tasks at once (the gpu pool's slots and the DAG's "
                    "max active tasks; default 2 = this machine's cores)")
    ap.add_argument("--timeout-min", type=float, default=240)
    ap.add_argument("--resume", action="store_true", help="follow the rehearsal already under --home to its end "
                    "(after its services or the machine stopped) instead of starting one; its wall time is then "
                    "the runs' active time")
    args = ap.parse_args(argv)
    home = args.home.resolve()
    os.environ["AGENTPIPE_HOME"] = str(home)
    os.environ.setdefault("AGENTPIPE_GPU_SLOTS", str(args.slots))
    os.environ.setdefault("AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG", str(args.slots))
    os.environ.setdefault("AIRFLOW__CORE__PARALLELISM", str(max(2, args.slots)))
    sys.path.insert(0, str(REPO / "scripts"))
    import demo  # the services and the REST client of `make demo`

    from pipeline.data.results import fetch_results, find_results, writable_data_dir
    from pipeline.rehearsal import compare_analyses
    from pipeline.settings import get_settings

    t0 = time.monotonic()
    data_dir = get_settings().resolved_data_dir
    if find_results(data_dir) is None:
        archive = data_dir / "paper" / "results.tar.xz"
        fetch_results(writable_data_dir(data_dir), archive if archive.is_file() else None)
    results = find_results(data_dir)
    urls = demo.up()
    sampler = MemorySampler(home / "pids")
    sampler.start()
    af = demo.Airflow(urls["airflow"], urls["user"], urls["password"])
    common = {"rehearsal": True, "compute": args.compute}
    runs: list[tuple[str, str, dict[str, Any], float]] = []
    plan = slice_plan(data_dir) if args.slice else STUDY
    if args.resume:
        runs = resume_runs(af, args.timeout_min * 60)
    elif not args.slice:
        for (arm, judge), (quant, agents) in itertools.product(JUDGES.items(), POOL_AGENTS.items()):
            conf = {"agents": agents, "emulator": "Qwen3-8B", "evaluator": judge, "case_set": "toolemu",
                    "quantization": quant, "run_name": "study_pool", **common}
            runs.append(("toolemu_evaluation", *run_dag(af, "toolemu_evaluation", conf, args.timeout_min * 60)))
            if runs[-1][1] != "success":
                break
    if not args.resume and all(r[1] == "success" for r in runs):
        runs.append(("dpo_experiment", *run_dag(af, "dpo_experiment", {**plan, **common}, args.timeout_min * 60)))
    wall = sum(r[3] for r in runs) if args.resume else time.monotonic() - t0
    peaks = sampler.stop()
    failed = [r[0] for r in runs if r[1] != "success"]
    tasks = sum(r[2]["tasks"] for r in runs)
    kinds: dict[str, list[float]] = defaultdict(list)
    for _, _, prof, _ in runs:
        for k, v in prof["by_kind"].items():
            kinds[k] += [v["total_s"], v["n"]]
    print(f"\n{'stage kind':24s} {'tasks':>6s} {'total s':>9s} {'mean s':>7s}")
    for k in sorted(kinds, key=lambda k: -sum(kinds[k][0::2])):
        total, n = sum(kinds[k][0::2]), sum(kinds[k][1::2])
        print(f"{k:24s} {n:6.0f} {total:9.0f} {total / n:7.1f}")
    for dag_id, state, prof, secs in runs:
        print(f"{dag_id}: {state}, {prof['tasks']} tasks in {secs / 60:.1f} min, scheduler queue wait "
              f"{prof['queue_wait_mean_s'] or 0:.1f} s per task on average")
    busy: dict[int, float] = defaultdict(float)
    for _, _, prof, _ in runs:  # the runs follow one another: their spans add up
        for n, secs in prof["busy"].items():
            busy[n] += secs
    span = sum(busy.values()) or 1.0
    print("tasks running at once: " + ", ".join(f"{n} for {100 * busy[n] / span:.0f} % of the time"
                                                for n in sorted(busy, reverse=True)
                                                if busy[n] / span >= 0.005))  # not a resume's brief overlap
    print("services' peak memory: " + (", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in sorted(peaks.items()))
                                       or "not sampled (the runs ended before the first sample)"))
    if failed:
        print(f"rehearsal: {', '.join(failed)} failed; see {home / 'airflow' / 'logs'}", file=sys.stderr)
        return 1
    bad_pairs, reordered, same = ([], [], 0) if args.slice else check_pairs(home, plan)
    n_pairs = len(list((home / "pairs").glob("*.jsonl")))
    if not args.slice:
        print(f"pair sets: {n_pairs - len(bad_pairs) - len(reordered)} of {n_pairs} identical to `agentpipe pairs` "
              f"on the released pool ({same} byte for byte; the others in all but the trajectories' file names and "
              "lines)" + (f"; {len(reordered)} hold the same pairs in another order: "
                          f"{', '.join(reordered)}" if reordered else "")
              + (f"; differ: {', '.join(bad_pairs)}" if bad_pairs else ""))
    figures, problems = {}, list(bad_pairs)
    for setting in ("match", "cross"):
        ours = home / "analysis" / plan["name"] / setting
        if setting == "match" and not ours.is_dir():  # one arm: no cross setting, the analysis is the folder
            ours = ours.parent
        if not (ours / "summary.json").is_file():
            continue
        ref = home / "rehearsal-check" / f"released-{setting}"
        diffs = compare_analyses(ours, results / f"{setting}_eval_results", ref, figures=not args.slice)
        problems += diffs
        s = json.loads((ours / "summary.json").read_text())
        figures[setting] = {arm: a["r2"] for arm, a in s["arms"].items()}
        print(f"{setting}: " + ", ".join(f"R² {arm} {r2:.3f} (paper {PAPER[setting].get(arm, float('nan')):.3g})"
                                         for arm, r2 in figures[setting].items() if arm in PAPER[setting])
              + f"; {'equal to' if not diffs else f'{len(diffs)} differences from'} `analyze all` on the released "
              f"{setting} results")
        for arm in ("eval-gpt5m", "eval-q32"):
            by_beta = (s["arms"].get(arm) or {}).get("persistence", {}).get("by_beta", {})
            if by_beta:
                print(f"  {arm} persistence: " + "; ".join(
                    f"β {b}: Persist(S) {_num(v['average'].get('persist_s'))}, Persist(H) "
                    f"{_num(v['average'].get('persist_h'))}" for b, v in sorted(by_beta.items())))
        for d in diffs[:10]:
            print(f"  {d}")
    n_models = len(list((home / "models").glob("*/adapter")))
    n_merged = len(list((home / "models").glob("*/merged/config.json")))
    try:
        versions = str(registry_versions(urls["mlflow"]))
    except OSError as e:  # MLflow not answering: the summary still prints (the runs' outcome is above)
        versions = f"n/a ({e})"
    print(f"models: {n_models} adapters, {n_merged} merged, {versions} registry versions")
    match, cross = figures.get("match", {}), figures.get("cross", {})
    active = " active" if args.resume else ""
    line = (f"rehearsal: {n_models} models trained, {tasks:,} tasks, {wall / 60:.1f} min{active}; match R² "
            + ", ".join(f"{a} {match[a]:.3f}" for a in ("eval-gpt5m", "eval-q32") if a in match))
    if cross:
        line += "; cross R² " + " / ".join(f"{cross[a]:.3f}" for a in ("eval-gpt5m", "eval-q32") if a in cross)
    print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
