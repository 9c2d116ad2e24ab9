"""Aggregating the study's released run folders (both evaluator arms, 1,620 files) into unified reports, cold.

    .venv/bin/python benchmarks/analysis_speed.py [--runs ../shared/data/paper/raw_data_by_eval] [--no-baseline]

Each variant runs in a fresh process after the run files are evicted from the page cache
(``posix_fadvise(DONTNEED)`` on those files only), and prints wall time and peak memory (max RSS):

* ``fast``     — ``pipeline.analysis`` (trajectory files read for their ``case_idx`` only), reports for all cases
                 and for the test splits of seeds 0, 1, 2, written to a temporary folder;
* ``baseline`` — the straightforward way with the project's loaders: every trajectory and eval record validated
                 (``load_trajectories`` + ``load_evals``), then the same reports.

Target (issue 7): ``fast`` under 10 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def evict(root: Path) -> int:
    """Drop the run files from the page cache (no root needed; other files are not touched)."""
    n = 0
    for path in root.rglob("*.jsonl"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            n += 1
        finally:
            os.close(fd)
    return n


def _baseline_collect(root: Path):
    """The same configurations, loading every record through the validating loaders."""
    from pipeline.data.reports import REQUIRED_EVAL_TYPES, CollectResult, ConfigScores, FileProblem
    from pipeline.data.records import SCORE_KEYS
    from pipeline.data.runfiles import check_alignment, find_run_files, is_complete, load_evals, load_trajectories
    from pipeline.errors import PipelineError

    configs: dict[tuple, ConfigScores] = {}
    problems = []
    files = find_run_files(root)
    for rf in files:
        try:
            if any(t not in rf.eval_files for t in REQUIRED_EVAL_TYPES):
                raise PipelineError(f"{rf.path}: eval files missing")
            trajs = load_trajectories(rf.path)
            if not is_complete(rf, trajs):
                raise PipelineError(f"{rf.path}: incomplete")
            key = (rf.model_dir, *rf.name.config_key[1:])
            cfg = configs.setdefault(key, ConfigScores(rf.model_dir, rf.name.emulator, rf.name.evaluator,
                                                       rf.name.quantization))
            cfg.files.append(str(rf.path))
            for eval_type, path in rf.eval_files.items():
                evals = load_evals(path)
                check_alignment(rf, eval_type, trajs, evals)
                dest = cfg.scores.setdefault(eval_type, {})
                for t, e in zip(trajs, evals):
                    dest[t.case_idx] = e.score(SCORE_KEYS[eval_type])
        except PipelineError as e:
            problems.append(FileProblem(str(rf.path), str(e)))
    return CollectResult(configs=[configs[k] for k in sorted(configs, key=str)], problems=problems,
                         files_processed=len(files))


def child(variant: str, runs: Path) -> None:
    t0 = time.perf_counter()
    from pipeline.analysis.partition import partition
    from pipeline.data.reports import collect_config_scores, write_reports

    t_import = time.perf_counter() - t0
    collected = collect_config_scores(runs, warn=False) if variant == "fast" else _baseline_collect(runs)
    t_load = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as out:
        n_all = len(write_reports(partition(collected.configs, "all").reports, Path(out) / "all"))
        n_test = len(write_reports(partition(collected.configs, "test", seeds=[0, 1, 2]).reports, Path(out) / "test"))
    wall = time.perf_counter() - t0
    n_files = collected.files_processed
    n_evals = sum(len(v) for c in collected.configs for v in c.scores.values())
    print(json.dumps({"variant": variant, "wall_s": round(wall, 3), "import_s": round(t_import, 3),
                      "load_s": round(t_load, 3), "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF)
                                                                        .ru_maxrss / 1024, 1),
                      "trajectory_files": n_files, "eval_records": n_evals, "configurations": len(collected.configs),
                      "reports_all": n_all, "reports_test": n_test, "skipped_files": len(collected.problems)}))


def run_variant(variant: str, runs: Path) -> dict:
    evict(runs)
    res = subprocess.run([sys.executable, __file__, "--child", variant, "--runs", str(runs)], capture_output=True,
                         text=True, cwd=REPO)
    if res.returncode != 0:
        sys.exit(f"{variant} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=REPO.parent / "shared" / "data" / "paper" / "raw_data_by_eval")
    ap.add_argument("--no-baseline", action="store_true", help="skip the validating-loader baseline")
    ap.add_argument("--child", choices=["fast", "baseline"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.runs)
        return
    n_files = sum(1 for _ in args.runs.rglob("*.jsonl"))
    size = sum(p.stat().st_size for p in args.runs.rglob("*.jsonl")) / 2 ** 20
    print(f"runs: {args.runs} ({n_files} files, {size:.0f} MiB); CPU cores: {os.cpu_count()}; cold (evicted from "
          "the page cache before each variant)")
    results = [run_variant("fast", args.runs)]
    if not args.no_baseline:
        results.append(run_variant("baseline", args.runs))
    for r in results:
        print(f"{r['variant']:>9}: wall {r['wall_s']:.2f} s (imports {r['import_s']:.2f} s, loading "
              f"{r['load_s'] - r['import_s']:.2f} s, reports {r['wall_s'] - r['load_s']:.2f} s), peak RSS "
              f"{r['peak_rss_mib']:.0f} MiB; {r['trajectory_files']} trajectory files, {r['eval_records']} eval "
              f"records, {r['configurations']} configurations -> {r['reports_all']} + {r['reports_test']} reports")
    if len(results) == 2:
        print(f"speed-up vs baseline: {results[1]['wall_s'] / results[0]['wall_s']:.1f}x")
    fast = results[0]["wall_s"]
    print(f"target < 10 s: {'met' if fast < 10 else 'NOT met'} ({fast:.2f} s)")


if __name__ == "__main__":
    main()
