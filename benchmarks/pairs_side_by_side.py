"""The six pair sets of the study (safe, help, both × q32, gpt5m; all cases), built by the project and by a reference
implementation, side by side in one process tree; prints time and peak memory per set and the ratio.

    .venv/bin/python benchmarks/pairs_side_by_side.py [--data-dir …/raw_data_by_eval] [--only project|reference]

* ``project``   — ``agentpipe pairs`` (one process per set, what an Airflow task runs);
* ``reference`` — ``reference_pairs`` below: a plain re-implementation of SPEC §4's rules **written for this
  benchmark** (not the study's code): every line parsed with ``json``, every item kept with its record, all
  pairs enumerated per case, each record dumped with ``json.dumps`` into a list, the file written at the end —
  the straightforward way. It renders prompts and completions with the project's renderers (the rules are
  shared), supports what the released data needs (one replicate, mode ``both``) and its output must equal the
  project's byte for byte (checked here by sha256), so the two do the same work.

Each set runs in a fresh process; its peak memory is that process's max RSS (``getrusage`` in a wrapper).
Targets (issue 16): all six sets ≤ 5 s in all, ≤ 150 MB peak per set, ≥ 4× the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path

SETS = {"safe": ("safe", None), "help": ("help_ignore_safety", None), "both": ("help_ignore_safety", "safe")}


def reference_pairs(folder: Path, metric: str, metric2: str | None, out: Path) -> int:
    """SPEC §4 the plain way (see the module docstring); returns the number of pairs."""
    from pipeline.data.cases import Case, load_named_case_set
    from pipeline.data.records import SCORE_KEYS
    from pipeline.data.runfiles import find_run_files
    from pipeline.data.agent_prompt import agent_messages
    from pipeline.evaluation.judges import METRICS
    from pipeline.preference.render import completion_messages

    case_set = load_named_case_set("toolemu")
    metrics = [m for m in (metric, metric2) if m]
    items = []
    for rf in sorted(find_run_files(folder), key=lambda rf: str(rf.path)):
        trajectories = [json.loads(line) for line in rf.path.read_text(encoding="utf-8").splitlines() if line]
        evals = {m: [json.loads(line) for line in rf.eval_files[METRICS[m]].read_text(encoding="utf-8").splitlines()
                     if line] for m in metrics}
        for line, traj in enumerate(trajectories):
            scores = {}
            for m in metrics:
                value = (evals[m][line].get("eval_scores") or {}).get(SCORE_KEYS[METRICS[m]])
                if value is not None:
                    scores[m] = int(statistics.median([value]))
            if metric in scores and not traj.get("error"):
                items.append({"record": traj, "scores": scores, "model": rf.model_dir, "file": rf.path.name,
                              "line": line, "case_idx": traj["case_idx"]})
    by_case: dict[int, list[dict]] = {}
    for it in items:
        by_case.setdefault(it["case_idx"], []).append(it)
    records = []
    prompts: dict[int, list] = {}
    for case_idx, group in sorted(by_case.items()):  # the output goes case by case, ascending
        for a, b in combinations(group, 2):
            c, r = (a, b) if a["scores"][metric] >= b["scores"][metric] else (b, a)
            d = c["scores"][metric] - r["scores"][metric]
            if d == 0 or d < 2 or c["scores"][metric] < 2:  # the defaults: min difference 2, min chosen 2
                continue
            if metric2:
                if metric2 not in c["scores"] or metric2 not in r["scores"]:
                    continue
                d2 = c["scores"][metric2] - r["scores"][metric2]
                if d2 <= 0 or d2 < 2 or c["scores"][metric2] < 2:
                    continue
            if case_idx not in prompts:
                case = Case.model_validate(c["record"]["case"])
                prompts[case_idx] = agent_messages(case, case_set.toolkits_for(case), scratchpad="")
            rec = {"prompt": prompts[case_idx], "chosen": completion_messages(c["record"])[0],
                   "rejected": completion_messages(r["record"])[0], "case_idx": case_idx,
                   "chosen_score": c["scores"][metric], "rejected_score": r["scores"][metric],
                   "chosen_model": c["model"], "rejected_model": r["model"], "chosen_file": c["file"],
                   "rejected_file": r["file"], "score_difference": d, "chosen_line": c["line"],
                   "rejected_line": r["line"], "metric": metric, "evaluator": folder.name}
            if metric2:
                rec.update(metric2=metric2, mode="both", chosen_score2=c["scores"][metric2],
                           rejected_score2=r["scores"][metric2])
            records.append(json.dumps(rec, ensure_ascii=False))
    out.write_text("".join(line + "\n" for line in records), encoding="utf-8")
    return len(records)


def _peak_of(argv: list[str]) -> tuple[float, float, str]:
    """Like _child, but the peak memory of this child alone (a wrapper process reports its own max RSS)."""
    code = ("import resource, subprocess, sys, time; t=time.perf_counter(); p=subprocess.run(sys.argv[1:], "
            "capture_output=True, text=True); s=time.perf_counter()-t; "
            "print(p.returncode, s, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024, "
            "(p.stdout.strip().splitlines() or [''])[-1].replace(' ', '\\x01')); sys.stderr.write(p.stderr)")
    p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    rc, seconds, peak, last = p.stdout.split()
    if rc != "0":
        raise SystemExit(f"{' '.join(argv)} failed:\n{p.stderr[-2000:]}")
    return float(seconds), float(peak), last.replace("\x01", " ")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, help="raw_data_by_eval (default: <data dir>/paper/raw_data_by_eval)")
    ap.add_argument("--only", choices=["project", "reference"])
    ap.add_argument("--reference-set", nargs=4, metavar=("FOLDER", "METRIC", "METRIC2", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.reference_set:  # the child process of one reference set
        folder, metric, metric2, out = args.reference_set
        n = reference_pairs(Path(folder), metric, None if metric2 == "-" else metric2, Path(out))
        print(f"reference: {n} pairs")
        return 0
    if args.data_dir is None:
        from pipeline.settings import get_settings

        args.data_dir = get_settings().resolved_data_dir / "paper" / "raw_data_by_eval"
    from pipeline.data.fetch import sha256_of

    exe = str(Path(sys.executable).with_name("agentpipe"))
    print(f"load: {os.getloadavg()[0]:.2f} (1-min average) on {os.cpu_count()} CPUs")
    totals = {"project": 0.0, "reference": 0.0}
    peaks = {"project": 0.0, "reference": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        for arm in ("q32", "gpt5m"):
            for label, (metric, metric2) in SETS.items():
                name = f"{label}_{arm}"
                line = f"{name:11s}"
                sha = {}
                if args.only in (None, "project"):
                    flags = ["--metric", metric] + (["--metric2", metric2, "--mode", "both"] if metric2 else [])
                    s, mb, _ = _peak_of([exe, "pairs", "--data-dir", str(args.data_dir / arm), *flags,
                                         "--out", str(Path(tmp) / "project")])
                    totals["project"] += s
                    peaks["project"] = max(peaks["project"], mb)
                    produced = sorted((Path(tmp) / "project").glob(f"*{arm}*.jsonl"), key=os.path.getmtime)[-1]
                    sha["project"] = sha256_of(produced)
                    line += f" project {s:5.2f} s {mb:6.0f} MB"
                if args.only in (None, "reference"):
                    out = Path(tmp) / f"ref_{name}.jsonl"
                    s, mb, last = _peak_of([sys.executable, __file__, "--reference-set", str(args.data_dir / arm),
                                            metric, metric2 or "-", str(out)])
                    totals["reference"] += s
                    peaks["reference"] = max(peaks["reference"], mb)
                    sha["reference"] = sha256_of(out)
                    line += f" | reference {s:5.2f} s {mb:6.0f} MB ({last})"
                if len(sha) == 2:
                    line += "  identical" if sha["project"] == sha["reference"] else "  DIFFERENT"
                print(line, flush=True)
    print(f"total: project {totals['project']:.1f} s (peak {peaks['project']:.0f} MB per set), reference "
          f"{totals['reference']:.1f} s (peak {peaks['reference']:.0f} MB)")
    if totals["project"] and totals["reference"]:
        print(f"ratio: reference / project {totals['reference'] / totals['project']:.2f}x (targets: all six <= 5 s, "
              "<= 150 MB per set, >= 4x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
