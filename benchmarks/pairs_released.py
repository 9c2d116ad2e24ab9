"""Time building the six pair sets of the study (safe, help, both × q32, gpt5m) with the real `agentpipe pairs`.

    .venv/bin/python benchmarks/pairs_released.py [--out DIR] [--seed N]

Each set is one `agentpipe pairs` process (what an Airflow task runs); prints counts and wall time per set and in
total. With --seed, builds that seed's train split instead of all cases.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETS = {"safe": ["--metric", "safe"], "help": ["--metric", "help_ignore_safety"],
        "both": ["--metric", "help_ignore_safety", "--metric2", "safe", "--mode", "both"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path,
                    help="raw_data_by_eval folder (default: <data dir>/paper/raw_data_by_eval)")
    ap.add_argument("--out", type=Path, help="output folder (default: a temporary folder)")
    ap.add_argument("--seed", type=int)
    args = ap.parse_args()
    if args.data_dir is None:
        from pipeline.settings import get_settings

        args.data_dir = get_settings().resolved_data_dir / "paper" / "raw_data_by_eval"
    exe = Path(sys.executable).with_name("agentpipe")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        total = time.perf_counter()
        for arm in ("q32", "gpt5m"):
            for label, flags in SETS.items():
                cmd = [str(exe), "pairs", "--data-dir", str(args.data_dir / arm), *flags, "--out", str(out), "--force"]
                if args.seed is not None:
                    cmd += ["--seed", str(args.seed)]
                t0 = time.perf_counter()
                r = subprocess.run(cmd, capture_output=True, text=True)
                dt = time.perf_counter() - t0
                if r.returncode != 0:
                    print(r.stderr, file=sys.stderr)
                    return r.returncode
                line = r.stdout.strip().splitlines()[-1]
                path = Path(line.rsplit("-> ", 1)[1].split(" (")[0])
                stats = json.loads(path.with_name(path.stem + ".stats.json").read_text())
                size = path.stat().st_size / 1e6
                print(f"{path.stem:24s} {stats['pairs']:6d} pairs  {stats['cases_with_pairs']:3d} cases  "
                      f"{size:6.0f} MB  {dt:5.1f} s")
        print(f"total {time.perf_counter() - total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
