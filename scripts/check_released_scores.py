"""Every released judgement's raw 'Overall Quantitative Score' parsed by the current ``clean_score`` and compared
with the score the study stored (issue 23 made out-of-range and non-integer scores parse failures; every released
score is within 0-3, so none may change).

Run from the repository root: PYTHONPATH=$PWD python scripts/check_released_scores.py [data root]
"""
import json
import sys
from collections import Counter
from pathlib import Path

from pipeline.evaluation.parsing import clean_score

root = Path(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data/paper/raw_data_by_eval")
files = sorted(root.glob("*/*/*_eval_*.jsonl"))
n = parsed = 0
differs: Counter = Counter()
for f in files:
    for line in f.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        for rep in rec["replicates"] if isinstance(rec.get("replicates"), list) else [rec]:
            raw = rep.get("Overall Quantitative Score")
            score = clean_score(raw)
            n += 1
            parsed += score is not None
            if list((rep.get("eval_scores") or {}).values()) != [score]:
                differs[(repr(raw)[:60], score)] += 1
print(f"{len(files)} eval files, {n} judgements: {parsed} parse, {n - parsed} parse failures, "
      f"{sum(differs.values())} differ from the stored score")
for (raw, score), count in differs.most_common():
    print(f"  {count} × {raw} → {score}")
sys.exit(1 if differs else 0)
