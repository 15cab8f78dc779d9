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

.PHONY: help setup setup-dev data pipeline train export verify test ablation bench-model serve bento loadtest bench-serve soak examples clean \
	keras-seeds bench-onnx-fold

help:
	@echo "make pipeline   set-up, data, train ($(ARCH)), export, verify, bench-model, report; ends with the time per stage"
	@echo "make setup      .venv with torch and the project; make setup-dev adds the dev extra (make test does)"
	@echo "make test       set-up (with the dev extra), data, pytest"
	@echo "make ablation | bench-model | serve PORT=3000 | bento"
	@echo "make loadtest | bench-serve QUICK=1 | soak SOAK_TIME=1m | examples   load tests of MODEL_PATH ($(MODEL_PATH))"
	@echo "make keras-seeds     the two seed Keras models: train, Keras' ONNX export, fold, verify (EPOCHS_MLP=3 EPOCHS_CNN=1)"
	@echo "make bench-onnx-fold our ONNX fold vs onnxoptimizer/onnxsim/onnxslim on Keras and torch exports"

# --- set-up ---------------------------------------------------------------------------------
# torch first, in its own pip call: the pinned 2.13.0 is a local CPU wheel; resolving it together
# with the project would pull a multi-GB CUDA build. `setup` installs what the pipeline and the
# service need; `setup-dev` adds the dev extra (pytest, locust, keras, ...) on first use by the
# targets that need it (test, load tests, keras-seeds), so `make pipeline` does not wait for them.
# No `pip install --upgrade pip` (the venv's pip works; the upgrade cost ~5 s per fresh set-up).
PIP := $(PY) -m pip install -q --disable-pip-version-check
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) -e .
	@touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	$(PIP) -e '.[dev]'
	@touch $@

setup: $(VENV)/.installed
setup-dev: $(VENV)/.dev-installed

data:
	@$(PYTHON) scripts/ensure_data.py --data-dir "$(DATA_DIR)"

# --- pipeline -------------------------------------------------------------------------------
$(RUN_DIR)/weights.safetensors: | setup data
	$(PY) -m training --arch $(ARCH) --data-dir "$(DATA_DIR)" --out $(RUN_DIR)

train: $(RUN_DIR)/weights.safetensors

# --if-stale: skip when model.onnx was already exported (and verified) from these exact weights.
export: $(RUN_DIR)/weights.safetensors
	$(PY) -m export --run $(RUN_DIR) --data-dir "$(DATA_DIR)" --out $(ARTIFACTS) --if-stale

verify: export
	$(PY) -m export --run $(RUN_DIR) --data-dir "$(DATA_DIR)" --out $(ARTIFACTS) --verify-only

# The stages run one after another; the pipeline ends with each stage's wall time (a stage whose
# output was already there shows ~0 s). The benchmark runs again only when model.onnx changed since
# it last ran (`make bench-model` always runs).
STAGE_TIMES := $(ARTIFACTS)/pipeline_times.tsv
timed = s=$$EPOCHREALTIME; $(2) || exit $$?; \
	awk -v n='$(1)' -v a=$$s -v b=$$EPOCHREALTIME 'BEGIN { printf "%s\t%.1f\n", n, b - a }' >> $(STAGE_TIMES)
BENCH_IF_STALE := if [ ! $(ARTIFACTS)/bench_model.json -nt $(ARTIFACTS)/model.onnx ]; then $(MAKE) --no-print-directory bench-model; \
	else echo "bench-model: $(ARTIFACTS)/bench_model.json is newer than model.onnx, reused (make bench-model re-measures)"; fi

pipeline:
	@mkdir -p $(ARTIFACTS) && : > $(STAGE_TIMES)
	@$(call timed,set-up,$(MAKE) --no-print-directory setup)
	@$(call timed,data,$(MAKE) --no-print-directory data)
	@$(call timed,train,$(MAKE) --no-print-directory train)
	@$(call timed,export+verify,$(MAKE) --no-print-directory export)
	@$(call timed,bench-model,$(BENCH_IF_STALE))
	@$(call timed,report,$(PY) -m export.report $(ARTIFACTS))
	@echo "make pipeline, wall seconds per stage ($(STAGE_TIMES)):"
	@awk -F'\t' '{ t += $$2; printf "  %-14s %7.1f\n", $$1, $$2 } END { printf "  %-14s %7.1f\n", "total", t }' $(STAGE_TIMES)

test: setup-dev data
	$(PY) -m pytest -q

ablation: setup data
	$(PY) -m training.ablation --data-dir "$(DATA_DIR)" --out $(ARTIFACTS)/ablation $(if $(EPOCHS),--epochs $(EPOCHS))

bench-model: export
	$(PY) -m export.bench --model-dir $(ARTIFACTS) --run $(RUN_DIR) --data-dir "$(DATA_DIR)" --out $(ARTIFACTS)/bench_model.json

# --- service (issue 4) ----------------------------------------------------------------------
# Knobs (env): SERVICE_WORKERS, ORT_PROVIDER=auto|cpu|cuda, ORT_INTRA_OP_THREADS, METRICS, TRACING,
# ACCESS_LOG, GC_FREEZE, MAX_IMAGES_PER_REQUEST, MAX_BODY_BYTES, BATCH_MAX_IMAGES, BATCH_MODE (README.md, "Serving").
serve: export
	MODEL_PATH=$(ARTIFACTS)/model.onnx $(VENV)/bin/bentoml serve service.service:FashionMNISTClassifier --port $(PORT)

bento: export
	@tag=$$($(PY) -m service.store $(ARTIFACTS)/model.onnx) && echo "model store: $$tag" && \
	$(VENV)/bin/bentoml build --arg model_tag=$$tag

# --- load tests (docs/loadtest.md) ---------------------------------------------------------------
# They use MODEL_PATH as it is; when it is missing they say which command makes it (exit 2).
NEED_MODEL = @test -f "$(MODEL_PATH)" || { echo "$(MODEL_PATH) is missing: run \`make pipeline\` (or python -m export --run <run dir> --out $(dir $(MODEL_PATH)))" >&2; exit 2; }
# BENCH_LOCK=/tmp/bnfold-cpu.lock: hold that flock for the whole run (no overlap with other benchmarks)
LOCK = $(if $(BENCH_LOCK),flock "$(BENCH_LOCK)")

loadtest: setup-dev data
	$(NEED_MODEL)
	$(PY) -m loadtest run --model "$(MODEL_PATH)" --port $(PORT) --users $(or $(USERS),16) \
		$(if $(SPAWN_RATE),--spawn-rate $(SPAWN_RATE)) --run-time $(or $(RUN_TIME),30s) --processes $(or $(PROCESSES),2) \
		--p99-ms $(or $(P99_MS),1000) $(if $(TAGS),--tags $(TAGS)) $(if $(TARGET_RPS),--target-rps $(TARGET_RPS)) \
		--data-dir "$(DATA_DIR)" --out $(ARTIFACTS)/loadtest

bench-serve: setup-dev data
	$(NEED_MODEL)
	$(LOCK) $(PY) -m loadtest bench --model "$(MODEL_PATH)" $(if $(QUICK),--quick) --processes $(or $(PROCESSES),2) \
		$(if $(BENCH_USERS),--users $(BENCH_USERS)) $(if $(SETUPS),--setups $(SETUPS)) \
		--data-dir "$(DATA_DIR)" --out $(ARTIFACTS)/bench_serve

soak: setup-dev data
	$(NEED_MODEL)
	$(LOCK) $(PY) -m loadtest soak --model "$(MODEL_PATH)" --time $(or $(SOAK_TIME),10m) $(if $(SOAK_WARMUP),--warmup $(SOAK_WARMUP)) \
		--processes $(or $(PROCESSES),2) --bench-results $(ARTIFACTS)/bench_serve/results.json \
		--data-dir "$(DATA_DIR)" --out $(ARTIFACTS)/soak

# example request bodies for the curl examples (JSON, raw float32, .npy, OIP v2, PNG/JPEG)
examples: setup-dev data
	$(NEED_MODEL)
	$(PY) -m loadtest examples --model "$(MODEL_PATH)" --data-dir "$(DATA_DIR)" --out $(or $(EXAMPLES_DIR),/tmp/fmnist)

# --- ONNX in: Keras seeds and the graph-pass benchmark (issue 9) ----------------------------------
# Keras 3 runs on the torch backend (keras is in the dev extra). Both hold the CPU lock so they never
# overlap a benchmark.
keras-seeds: setup-dev data
	KERAS_BACKEND=torch flock /tmp/bnfold-cpu.lock $(PY) -m training.keras_seeds --data-dir "$(DATA_DIR)" \
		--out $(ARTIFACTS)/keras $(if $(EPOCHS_MLP),--epochs-mlp $(EPOCHS_MLP)) $(if $(EPOCHS_CNN),--epochs-cnn $(EPOCHS_CNN))

# The tools we compare against are only needed here: the `bench` extra, installed on first use.
$(VENV)/.bench-installed: pyproject.toml | setup
	$(PY) -m pip install -q -e '.[bench]'
	@touch $@

bench-onnx-fold: setup-dev $(VENV)/.bench-installed
	KERAS_BACKEND=torch flock /tmp/bnfold-cpu.lock $(PY) -m export.bench_onnx_fold --artifacts $(ARTIFACTS) \
		--out $(ARTIFACTS)/bench_onnx_fold $(if $(ROUNDS),--rounds $(ROUNDS))

clean:
	rm -rf $(ARTIFACTS)
