# Set-up and entry points. `make demo` and `make test` each work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The tested torch. From the default index that is the CUDA build on Linux (several GB); for the
# CPU build: make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
# and for a given CUDA version the matching index, e.g. .../whl/cu128 (README).
TORCH ?= torch==2.13.0
# Optional dependency groups (pyproject.toml). CI adds qlora, so the 4-bit tests run on its CPU.
EXTRAS ?= test,reference

.PHONY: install demo compare test check bench
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -c .ci/constraints.txt -e ".[$(EXTRAS)]"
	touch $@

# The whole DAG on the offline demo (tiny Qwen3 + generated pairs), CPU, as a DVC experiment.
demo: install
	$(BIN)/python -m pipeline.demo

# This commit's experiments, best first (held-out win rate, then eval loss), in 80 columns.
compare: install
	$(BIN)/python -m pipeline.compare

# Unit tests plus the end-to-end DVC runs on the offline demo.
test: install
	$(BIN)/python -m pytest

# The fast tier: everything but the end-to-end DVC runs (tests marked slow).
check: install
	$(BIN)/python -m pytest -m "not slow"

# Training throughput and memory against TRL's DPOTrainer (the train stage's own path);
# prints a table, writes bench/results/latest.json. ~30 min on 2 CPU cores, most of it TRL
# (~9 min a repetition). DVC experiment and queue timings: `python bench/dvc_runs.py first|sweep`.
bench: install
	$(BIN)/python bench/dpo_vs_trl.py
