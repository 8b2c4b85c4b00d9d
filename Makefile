# Fresh machine: `make test` sets up .venv (torch first, CPU wheel) and runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: setup test test-slow lint compare clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is installed first and pinned: an unpinned resolve would pull GBs of CUDA wheels.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[experiments,hub,slurm,notebooks,dev]" $(TORCH)
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

lint: setup
	$(BIN)/ruff check adalora experiments tests

# The main job: LoRA vs AdaLoRA on the planted-rank benchmark, 3 seeds, then the summary table.
compare: setup
	$(BIN)/python experiments/train.py -m experiment=planted_rank logger=none progress=false \
		hydra.sweep.dir=multirun/planted_rank
	$(BIN)/python experiments/summarize.py multirun/planted_rank

clean:
	rm -rf $(VENV) outputs multirun
