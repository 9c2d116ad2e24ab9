"""benchmarks/gpu_check.py stays runnable where no GPU is: every section in its small CPU form, and the files
`make gpu-wheels` prepares for a bare GPU node."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_every_section_small_on_cpu(tiny_model, tmp_path):
    out = tmp_path / "gpu_check.json"
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                        "--model", str(tiny_model), "--case-set", "demo", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    got = json.loads(out.read_text())
    sections = ["hf_generate", "emulation", "dpo_bf16", "qlora_int4", "merge", "choice_scoring"]
    assert {s: got[s]["ok"] for s in sections} == dict.fromkeys(sections, True)
    assert got["emulation"]["cases"] == 2 and got["emulation"]["ratio"] > 0
    assert got["dpo_bf16"]["steps"] == 2 and got["qlora_int4"]["quantization"] == "int4"
    assert got["merge"]["max_abs_logit_diff"] <= 1e-3
    assert sum(got["choice_scoring"]["score_histogram"]) == 8


def test_gpu_check_without_a_gpu_says_so(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "x.json")],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 2 and "no CUDA device here" in p.stderr and not (tmp_path / "x.json").exists()
