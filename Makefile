# Fresh machine: `make test` sets up .venv (torch first, CPU wheel) and runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: setup test test-slow lint compare glue-converged glue-short clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is installed first and pinned: an unpinned resolve would pull GBs of CUDA wheels.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[experiments,hub,slurm,notebooks,qlora,dev]" $(TORCH)
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/python -m pytest -q

# The slow tests and those on the real GLUE files in ../shared/data/glue (they skip where it is missing).
test-slow: setup
	$(BIN)/python -m pytest -q -m "slow or shared_data"; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

lint: setup
	$(BIN)/ruff check adalora experiments tests

# The main job: LoRA vs AdaLoRA on the planted-rank benchmark, 3 seeds, then the summary table.
compare: setup
	$(BIN)/python experiments/train.py -m experiment=planted_rank logger=none progress=false \
		hydra.sweep.dir=multirun/planted_rank
	$(BIN)/python experiments/summarize.py multirun/planted_rank

# The converged GLUE protocol (experiments/results/glue_converged): MRPC, SST-2 and RTE, one after the other; each
# tunes every method of its grid file on seed 0, then runs the other seeds at the chosen point. Tens of hours on
# 2 CPU cores; rerunning resumes killed runs and skips finished ones.
glue-converged: setup
	for t in mrpc sst2 rte; do $(BIN)/python experiments/glue_converged.py --task $$t --jobs 2 || exit 1; done
	$(BIN)/python experiments/summarize.py multirun/glue_converged --by optim.lr --by method.orth_reg_weight

# The earlier short-run protocol, kept as a record (experiments/results/glue_short): MiniLM, RTE / MRPC / SST-2,
# LoRA vs AdaLoRA at r=2 and 8, 3 seeds, then the RTE ablation in the same folder (its AdaLoRA and LoRA cells are
# the main grid's, reused). About 2 hours on 2 CPU cores; rerunning resumes killed runs and skips finished ones.
GLUE_ARGS := hydra/launcher=parallel threads=1 progress=false logger=none hydra.sweep.dir=multirun/glue
glue-short: setup
	$(BIN)/python experiments/train.py -m experiment=glue_compare $(GLUE_ARGS)
	$(BIN)/python experiments/train.py -m experiment=ablation_scores $(GLUE_ARGS)
	$(BIN)/python experiments/summarize.py multirun/glue

clean:
	rm -rf $(VENV) outputs multirun
