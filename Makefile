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

.PHONY: help setup data browser pipeline train export verify test ablation bench-model serve bento loadtest bench-serve soak faults clean

help:
	@echo "make pipeline   set-up, data, train ($(ARCH)), export, verify"
	@echo "make test       set-up, data, browser, pytest"
	@echo "make serve      serve artifacts/model.onnx on PORT=3000: page at /, Swagger UI at /docs (docs/service.md)"
	@echo "make bento      import the model into the BentoML store and build a bento"
	@echo "make faults     fault battery (kill, SIGTERM, 3x overload, stalled, oversize) -> artifacts/faults/"
	@echo "make browser    install chromium + chromium-driver for the page tests (as root)"
	@echo "make ablation | bench-model | loadtest | bench-serve | soak SOAK_TIME=1m"

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

# --- service (issues 4, 10) -----------------------------------------------------------------
# Every knob is an environment variable (docs/service.md, "Settings"); MODEL=path serves another export.
MODEL ?= $(ARTIFACTS)/model.onnx
MODEL_HINT = $(MODEL) is missing: run `make export` (or `python -m export ...`), or pass MODEL=path/to/model.onnx

serve: setup
	@test -f "$(MODEL)" || { echo "$(MODEL_HINT)" >&2; exit 2; }
	MODEL_PATH=$(MODEL) $(VENV)/bin/bentoml serve service.service:Classifier --port $(PORT)

bento: setup
	@test -f "$(MODEL)" || { echo "$(MODEL_HINT)" >&2; exit 2; }
	@tag=$$($(PY) -m service.store $(MODEL)) && echo "model store: $$tag" && \
	$(VENV)/bin/bentoml build --arg model_tag=$$tag

faults: setup
	@test -f "$(MODEL)" || { echo "$(MODEL_HINT)" >&2; exit 2; }
	$(PY) -m loadtest.faults --model $(MODEL) --out $(ARTIFACTS)/faults $(if $(ONLY),--only $(ONLY)) \
		$(if $(OVERLOAD_TIME),--overload-time $(OVERLOAD_TIME)) $(if $(BENCH_LOCK),--lock "$(BENCH_LOCK)")

# --- load tests (issue 5) -------------------------------------------------------------------
loadtest: export
	$(PY) -m loadtest.run --port $(PORT) --users $(or $(USERS),16) $(if $(SPAWN_RATE),--spawn-rate $(SPAWN_RATE)) \
		--run-time $(or $(RUN_TIME),30s) --processes $(or $(PROCESSES),2) --p99-ms $(or $(P99_MS),1000) \
		$(if $(TAGS),--tags $(TAGS)) $(if $(TARGET_RPS),--target-rps $(TARGET_RPS)) \
		--model $(ARTIFACTS)/model.onnx --data-dir "$(DATA_DIR)" --out $(ARTIFACTS)/loadtest

bench-serve: export
	$(PY) -m loadtest.bench_serve $(if $(QUICK),--quick) --processes $(or $(PROCESSES),2) \
		$(if $(BENCH_USERS),--users $(BENCH_USERS)) $(if $(SETUPS),--setups $(SETUPS)) \
		$(if $(BENCH_LOCK),--lock "$(BENCH_LOCK)") \
		--model $(ARTIFACTS)/model.onnx --data-dir "$(DATA_DIR)" --out $(ARTIFACTS)/bench_serve

soak: export
	$(PY) -m loadtest.soak --time $(or $(SOAK_TIME),10m) $(if $(SOAK_WARMUP),--warmup $(SOAK_WARMUP)) --processes $(or $(PROCESSES),2) \
		$(if $(BENCH_LOCK),--lock "$(BENCH_LOCK)") --bench-results $(ARTIFACTS)/bench_serve/results.json \
		--model $(ARTIFACTS)/model.onnx --data-dir "$(DATA_DIR)" --out $(ARTIFACTS)/soak

clean:
	rm -rf $(ARTIFACTS)
