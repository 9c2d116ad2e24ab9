"""Shared fixtures. Expensive things (models, servers, clusters) are built once per session here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.settings import Settings

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data (ToolEmu cases and the study's released runs), read in place, never copied."""
    d = Settings().resolved_data_dir
    if not (d / "toolemu" / "all_cases.json").is_file():
        pytest.fail(f"data directory {d} lacks toolemu/all_cases.json: set AGENTPIPE_DATA_DIR or run "
                    "`agentpipe data fetch`")
    return d


@pytest.fixture(scope="session")
def released_runs(data_dir: Path) -> Path:
    d = data_dir / "paper" / "raw_data_by_eval"
    if not d.is_dir():
        pytest.fail(f"{d} missing: run `agentpipe data fetch`")
    return d


def run_agentpipe(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real console script in a subprocess (exit codes, stderr and tracebacks as a user sees them)."""
    exe = Path(sys.executable).with_name("agentpipe")
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, env=full_env, timeout=600)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Llama with a trained tokenizer and a chat template (built in about a second)."""
    from pipeline.llm.local_models import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model, tmp_path_factory) -> Path:
    """A LoRA adapter with random (non-zero) weights on the tiny model, so it visibly changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapters") / "tiny-lora"
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    cfg = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False,
                     task_type="CAUSAL_LM")
    get_peft_model(base, cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    """SmolLM2-135M-Instruct converted once per machine into the model cache (about 16 s the first time)."""
    from pipeline.llm.local_models import smollm2

    return smollm2()
