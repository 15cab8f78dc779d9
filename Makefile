# One entry per stage; stages share files under artifacts/, not globals.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARCH ?= seed-cnn
DATA_DIR ?= /usr/share/datasets/fashion-mnist
ARTIFACTS ?= artifacts
RUN_DIR := $(ARTIFACTS)/runs/$(ARCH)
PORT ?= 3000
# the model the load tests use: the one exported last, never re-exported or retrained by them
MODEL_PATH ?= $(ARTIFACTS)/model.onnx

.PHONY: help setup data browser pipeline train export verify test ablation bench-model serve bento faults \
	loadtest bench-serve soak examples clean keras-seeds bench-onnx-fold

help:
	@echo "make pipeline   set-up, data, train ($(ARCH)), export, verify"
	@echo "make test       set-up, data, browser, pytest"
	@echo "make serve      serve MODEL_PATH ($(MODEL_PATH)) on PORT=3000: page at /, Swagger UI at /docs (docs/service.md)"
	@echo "make bento      import MODEL_PATH into the BentoML model store and build a bento"
	@echo "make faults     fault battery on MODEL_PATH (kill, SIGTERM, 3x overload, stalled, oversize) -> artifacts/faults/"
	@echo "make browser    chromium + chromium-driver for the page tests (apt-get, as root)"
	@echo "make ablation | bench-model"
	@echo "make loadtest | bench-serve QUICK=1 | soak SOAK_TIME=1m | examples   load tests of MODEL_PATH ($(MODEL_PATH))"
	@echo "make keras-seeds     the two seed Keras models: train, Keras' ONNX export, fold, verify (EPOCHS_MLP=3 EPOCHS_CNN=1)"
	@echo "make bench-onnx-fold our ONNX fold vs onnxoptimizer/onnxsim/onnxslim on Keras and torch exports"

# --- set-up ---------------------------------------------------------------------------------
# torch first, in its own pip call: the pinned 2.13.0 is a local CPU wheel; resolving it together
# with the project would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

setup: $(VENV)/.installed

data:
	@$(PYTHON) scripts/ensure_data.py --data-dir "$(DATA_DIR)"

browser:
	@$(PYTHON) scripts/ensure_browser.py

# --- pipeline -------------------------------------------------------------------------------
$(RUN_DIR)/weights.safetensors: | setup data
	$(PY) -m training --arch $(ARCH) --data-dir "$(DATA_DIR)" --out $(RUN_DIR)

train: $(RUN_DIR)/weights.safetensors

# --if-stale: skip when model.onnx was already exported (and verified) from these exact weights.
export: $(RUN_DIR)/weights.safetensors
	$(PY) -m export --run $(RUN_DIR) --data-dir "$(DATA_DIR)" --out $(ARTIFACTS) --if-stale

verify: export
	$(PY) -m export --run $(RUN_DIR) --data-dir "$(DATA_DIR)" --out $(ARTIFACTS) --verify-only

# The benchmark runs again only when model.onnx changed since it last ran (`make bench-model` always runs).
pipeline: export
	@if [ ! $(ARTIFACTS)/bench_model.json -nt $(ARTIFACTS)/model.onnx ]; then $(MAKE) --no-print-directory bench-model; \
	else echo "bench-model: $(ARTIFACTS)/bench_model.json is newer than model.onnx, reused (make bench-model re-measures)"; fi
	@$(PY) -m export.report $(ARTIFACTS)

test: setup data browser
	$(PY) -m pytest -q

ablation: setup data
	$(PY) -m training.ablation --data-dir "$(DATA_DIR)" --out $(ARTIFACTS)/ablation $(if $(EPOCHS),--epochs $(EPOCHS))

bench-model: export
	$(PY) -m export.bench --model-dir $(ARTIFACTS) --run $(RUN_DIR) --data-dir "$(DATA_DIR)" --out $(ARTIFACTS)/bench_model.json

# --- service (issues 4, 10; docs/service.md) ----------------------------------------------------
# They use MODEL_PATH as it is; when it is missing they say which command makes it (exit 2).
NEED_MODEL = @test -f "$(MODEL_PATH)" || { echo "$(MODEL_PATH) is missing: run \`make pipeline\` (or python -m export --run <run dir> --out $(dir $(MODEL_PATH)))" >&2; exit 2; }
# BENCH_LOCK=/tmp/bnfold-cpu.lock: hold that flock for the whole run (no overlap with other benchmarks)
LOCK = $(if $(BENCH_LOCK),flock "$(BENCH_LOCK)")

# Every knob is an environment variable (docs/service.md, "Settings").
serve: setup
	$(NEED_MODEL)
	MODEL_PATH="$(MODEL_PATH)" $(VENV)/bin/bentoml serve service.service:Classifier --port $(PORT)

bento: setup
	$(NEED_MODEL)
	@tag=$$($(PY) -m service.store "$(MODEL_PATH)") && echo "model store: $$tag" && \
	$(VENV)/bin/bentoml build --arg model_tag=$$tag

faults: setup
	$(NEED_MODEL)
	$(LOCK) $(PY) -m loadtest.faults --model "$(MODEL_PATH)" --out $(ARTIFACTS)/faults $(if $(ONLY),--only $(ONLY)) \
		$(if $(OVERLOAD_TIME),--overload-time $(OVERLOAD_TIME))

# --- load tests (docs/loadtest.md) ---------------------------------------------------------------

loadtest: setup data
	$(NEED_MODEL)
	$(PY) -m loadtest run --model "$(MODEL_PATH)" --port $(PORT) --users $(or $(USERS),16) \
		$(if $(SPAWN_RATE),--spawn-rate $(SPAWN_RATE)) --run-time $(or $(RUN_TIME),30s) --processes $(or $(PROCESSES),2) \
		--p99-ms $(or $(P99_MS),1000) $(if $(TAGS),--tags $(TAGS)) $(if $(TARGET_RPS),--target-rps $(TARGET_RPS)) \
		--data-dir "$(DATA_DIR)" --out $(ARTIFACTS)/loadtest

bench-serve: setup data
	$(NEED_MODEL)
	$(LOCK) $(PY) -m loadtest bench --model "$(MODEL_PATH)" $(if $(QUICK),--quick) --processes $(or $(PROCESSES),2) \
		$(if $(BENCH_USERS),--users $(BENCH_USERS)) $(if $(SETUPS),--setups $(SETUPS)) \
		--data-dir "$(DATA_DIR)" --out $(ARTIFACTS)/bench_serve

soak: setup data
	$(NEED_MODEL)
	$(LOCK) $(PY) -m loadtest soak --model "$(MODEL_PATH)" --time $(or $(SOAK_TIME),10m) $(if $(SOAK_WARMUP),--warmup $(SOAK_WARMUP)) \
		--processes $(or $(PROCESSES),2) --bench-results $(ARTIFACTS)/bench_serve/results.json \
		--data-dir "$(DATA_DIR)" --out $(ARTIFACTS)/soak

# example request bodies for the curl examples (JSON, raw float32, .npy, OIP v2, PNG/JPEG)
examples: setup data
	$(NEED_MODEL)
	$(PY) -m loadtest examples --model "$(MODEL_PATH)" --data-dir "$(DATA_DIR)" --out $(or $(EXAMPLES_DIR),/tmp/fmnist)

# --- ONNX in: Keras seeds and the graph-pass benchmark (issue 9) ----------------------------------
# Keras 3 runs on the torch backend (keras is in the dev extra). Both hold the CPU lock so they never
# overlap a benchmark.
keras-seeds: setup data
	KERAS_BACKEND=torch $(PY) -m training.keras_seeds --data-dir "$(DATA_DIR)" --out $(ARTIFACTS)/keras \
		$(if $(EPOCHS_MLP),--epochs-mlp $(EPOCHS_MLP)) $(if $(EPOCHS_CNN),--epochs-cnn $(EPOCHS_CNN))
	$(PY) -m export.keras_seeds $(ARTIFACTS)/keras --data-dir "$(DATA_DIR)"

# The tools we compare against are only needed here: the `bench` extra, installed on first use.
$(VENV)/.bench-installed: pyproject.toml | setup
	$(PY) -m pip install -q -e '.[bench]'
	@touch $@

bench-onnx-fold: setup $(VENV)/.bench-installed
	KERAS_BACKEND=torch flock /tmp/bnfold-cpu.lock $(PY) -m export.bench_onnx_fold --artifacts $(ARTIFACTS) \
		--out $(ARTIFACTS)/bench_onnx_fold $(if $(ROUNDS),--rounds $(ROUNDS))

clean:
	rm -rf $(ARTIFACTS)
