# One entry per stage; stages share files under artifacts/, not globals. `make help` lists them.
SHELL := /bin/bash
comma := ,
empty :=
space := $(empty) $(empty)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARCH ?= seed-cnn
DATA_DIR ?= /usr/share/datasets/fashion-mnist
ARTIFACTS ?= artifacts
RUN_DIR := $(ARTIFACTS)/runs/$(ARCH)
PORT ?= 3000
# make serve listens here: this machine only; HOST=0.0.0.0 for every interface (no authentication)
HOST ?= 127.0.0.1
# the model serve, bento, the load tests and faults use: the one exported last, as it is
MODEL_PATH ?= $(ARTIFACTS)/model.onnx

.PHONY: help setup setup-serve setup-load setup-dev data browser pipeline train export verify test ablation recipes bench-model serve bento \
	faults loadtest bench-serve soak examples keras-seeds bench-onnx-fold readme-results clean

help:
	@echo "Set-up (two commands do all of it):"
	@echo "  make pipeline        set-up, data, train ARCH=$(ARCH), export, verify, bench-model, report; time per stage"
	@echo "                       (INT8=1: also an INT8 model verified on this host, docs/int8.md)"
	@echo "  make test            set-up with the dev extra, data, headless browser, the whole pytest suite"
	@echo "Stages (ARCH=seed-cnn|mlp-bn|keras-cnn|deep-cnn, DATA_DIR=$(DATA_DIR)):"
	@echo "  make setup           .venv with torch==2.13.0 and the project (setup-serve: + BentoML; setup-load: + the load"
	@echo "                       tools; setup-dev: + the dev extra)"
	@echo "  make data            the Fashion-MNIST IDX files (apt-get install dataset-fashion-mnist when missing)"
	@echo "  make browser         chromium + chromium-driver for the page test (apt-get, as root)"
	@echo "  make train           train ARCH into artifacts/runs/ARCH (skipped when current: same data files, recipe, seed)"
	@echo "  make export          fold + export + verify ARCH's run into artifacts/ (skipped when current; INT8=1 MAX_DROP=pp)"
	@echo "  make verify          re-check artifacts/model.onnx against ARCH's run (read-only: writes nothing)"
	@echo "  make bench-model     torch vs onnxruntime images/s, batch 1 and 64 (and INT8 beside FP32 when exported)"
	@echo "  make ablation        seed-cnn with and without dropout (EPOCHS=...)"
	@echo "  make recipes         seed-cnn training recipes side by side: epochs, seconds, test accuracy (~20 min)"
	@echo "  make keras-seeds     the two seed Keras models: train, Keras' ONNX export, fold, verify"
	@echo "  make bench-onnx-fold our ONNX pass vs onnxoptimizer/onnxsim/onnxslim (installs them first)"
	@echo "  make setup-zoo       .venv-zoo: torch 2.14.1 + torchvision 0.29.1 + timm (~5.5 GB) for --model torchvision/timm"
	@echo "  make bench-zoo       28 torchvision/timm nets through python -m export, beside torch.fx/torch.onnx/onnxsim/... (own venv)"
	@echo "  make bench-unseen    architectures and weights bench-zoo never uses, through the CLI (~20 min, own venv)"
	@echo "  make bench-int8      INT8: equalization/bias-correction ablation on our runs, ResNet-50/MobileNetV2 INT8 vs FP32"
	@echo "Serving and load (MODEL_PATH=$(MODEL_PATH); never trains or exports):"
	@echo "  make serve           serve MODEL_PATH on HOST=$(HOST) PORT=$(PORT): page at /, Swagger UI at /docs (PRECISION=auto|int8|fp32)"
	@echo "  make bento           MODEL_PATH into BentoML's model store, then bentoml build (then: bentoml serve bnfold-classifier:latest)"
	@echo "  make examples        request bodies for the curl examples (EXAMPLES_DIR=/tmp/fmnist)"
	@echo "  make loadtest        locust scenarios with checks (USERS=16 RUN_TIME=30s P99_MS=1000 TAGS=...)"
	@echo "  make bench-serve     any model: in-process ceiling, ours at 1-32 clients, open loop, naive FastAPI, peers"
	@echo "                       (PyTriton, TorchServe, KServe, LitServe; own venvs); goals -> exit code (~10 min; QUICK=1)"
	@echo "  make bench-real      seed-cnn, MobileNetV2, ResNet-50 (224, 448), YOLOv8n exported and bench-served (~1 h)"
	@echo "  make soak            fixed load for SOAK_TIME=10m, RSS growth and errors"
	@echo "  make faults          killed worker, SIGTERM, 3x overload, stalled clients, oversize bodies (ONLY=...; IMAGE=tag: on the image)"
	@echo "Beyond one machine (docs/deploy.md; MODEL_PATH as for serve):"
	@echo "  make container       the model into an image (bentoml containerize, lean, non-root), manifests in artifacts/k8s"
	@echo "  make base-image      the local Python 3.11 base image (debootstrap; used when Docker Hub is unreachable)"
	@echo "  make deploy-check    2 replicas behind HAProxy: each replaced under load, one SIGKILLed; 0 failed is the goal"
	@echo "  make lock            re-pin deploy/requirements.lock (the image's packages, with hashes)"
	@echo "Other:"
	@echo "  make readme-results  rewrite the README's results block from the latest reports in artifacts/"
	@echo "  make clean           remove artifacts/"

# --- set-up ---------------------------------------------------------------------------------
# torch first, in its own pip call: the pinned 2.13.0 is a local CPU wheel; resolving it together
# with the project would pull a multi-GB CUDA build. `setup` installs what the pipeline needs;
# `setup-serve` adds the serving stack (BentoML, ...) for serve/bento; `setup-dev` adds that and the
# dev extra (pytest, locust, keras, selenium, tritonclient, ...) for the targets that need them, so
# `make pipeline` does not wait for either.
# --no-compile in `setup`: byte-compiling all of torch and the rest is ~20 s of a fresh set-up, and
# Python compiles what a program imports when it imports it. `setup-dev` compiles everything once
# (the test suite starts many interpreters, and PYTHONDONTWRITEBYTECODE=1 would make each recompile).
PIP := $(PY) -m pip install -q --disable-pip-version-check
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null || $(PIP) --no-compile torch==2.13.0
	$(PIP) --no-compile -e .
	@touch $@

$(VENV)/.serve-installed: $(VENV)/.installed
	$(PIP) -e '.[serve]'
	@touch $@

# compileall: some packages ship files for other Python versions that do not compile; pip skips them
# alike, so its exit status is not the set-up's.
$(VENV)/.load-installed: $(VENV)/.installed
	$(PIP) -e '.[load]'
	@touch $@ $(VENV)/.serve-installed

$(VENV)/.dev-installed: $(VENV)/.installed
	$(PIP) -e '.[dev]'
	@$(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" > /dev/null 2>&1 || :
	@touch $@ $(VENV)/.serve-installed $(VENV)/.load-installed

setup: $(VENV)/.installed
setup-serve: $(VENV)/.serve-installed
setup-load: $(VENV)/.load-installed
setup-dev: $(VENV)/.dev-installed

data:
	@$(PYTHON) scripts/ensure_data.py --data-dir "$(DATA_DIR)"

browser:
	@$(PYTHON) scripts/ensure_browser.py

# --- pipeline -------------------------------------------------------------------------------
# --if-stale: train only when RUN_DIR holds no run trained on these data files (their sha256), this recipe
# and this seed; when it trains again it says what changed (training/provenance.py).
train: setup data
	$(PY) -m training --arch $(ARCH) --data-dir "$(DATA_DIR)" --out $(RUN_DIR) --if-stale

# --if-stale: skip when model.onnx was already exported (and verified) from these exact weights and data;
# otherwise it says why it exports again.
# INT8=1: also model_int8.onnx, quantized, verified on this host and fingerprinted (docs/int8.md; MAX_DROP=pp).
INT8_FLAGS = $(if $(filter 1 yes true,$(INT8)),--int8 $(if $(MAX_DROP),--max-drop $(MAX_DROP)))
export: train
	$(PY) -m export --run $(RUN_DIR) --data-dir "$(DATA_DIR)" --out $(ARTIFACTS) --if-stale $(INT8_FLAGS)

verify: setup
	$(PY) -m export --run $(RUN_DIR) --data-dir "$(DATA_DIR)" --out $(ARTIFACTS) --verify-only

# The stages run one after another (scripts/pipeline.py runs each of these targets and times it). A stage
# whose output did not change reused what was there, and the table says so; artifacts/pipeline_times.json
# is written only by a run that succeeded and did some work (a failed run, or one that reused everything,
# leaves the last good record). The benchmark runs again only when model.onnx changed since it last ran
# (`make bench-model` always runs).
# (the pipeline runs the benchmark itself: `make bench-model` would first re-check the export it just made)
BENCH_MODEL = $(PY) -m export.bench --model-dir $(ARTIFACTS) --run $(RUN_DIR) --data-dir "$(DATA_DIR)" --out $(ARTIFACTS)/bench_model.json

pipeline:
	@$(PYTHON) scripts/pipeline.py --artifacts $(ARTIFACTS) --run-dir $(RUN_DIR) --venv $(VENV) \
		--command "make pipeline$(if $(strip $(MAKEOVERRIDES)), $(strip $(MAKEOVERRIDES)))"

# the pipeline's last two stages (scripts/pipeline.py)
.PHONY: pipeline-bench pipeline-report
pipeline-bench:
	@if [ ! $(ARTIFACTS)/bench_model.json -nt $(ARTIFACTS)/model.onnx ]; then $(BENCH_MODEL); \
	else echo "bench-model: $(ARTIFACTS)/bench_model.json is newer than model.onnx, reused (make bench-model re-measures)"; fi
pipeline-report:
	@$(PY) -m export.report $(ARTIFACTS)

test: setup-dev data browser
	$(PY) -m pytest -q

ablation: setup data
	$(PY) -m training.ablation --data-dir "$(DATA_DIR)" --out $(ARTIFACTS)/ablation $(if $(EPOCHS),--epochs $(EPOCHS))

# seed-cnn's training recipes side by side on this machine (docs/training.md): the recipe before
# issue 11, the same through LeanSeedCNN, and the default with three seeds (~20 min)
RECIPES ?= before@0,lean-20@0,default@0+1+2
recipes: setup data
	$(PY) -m training.recipes --recipes $(RECIPES) --data-dir "$(DATA_DIR)" \
		--out $(ARTIFACTS)/recipes

bench-model: export
	$(BENCH_MODEL)

# --- service (docs/service.md) and load (docs/loadtest.md) -------------------------------------
# They use MODEL_PATH as it is; when it is missing they say which command makes it (exit 2).
NEED_MODEL = @test -f "$(MODEL_PATH)" || { echo "$(MODEL_PATH) is missing: run \`make pipeline\` (or python -m export ... --out $(dir $(MODEL_PATH)))" >&2; exit 2; }
# BENCH_LOCK=/tmp/some.lock: hold that flock for the whole run (benchmarks that must not overlap)
LOCK = $(if $(BENCH_LOCK),flock "$(BENCH_LOCK)")

# Every knob is an environment variable (docs/service.md, "Settings").
serve: setup-serve
	$(NEED_MODEL)
	MODEL_PATH="$(MODEL_PATH)" $(if $(PRECISION),PRECISION="$(PRECISION)") $(VENV)/bin/bentoml serve service.service:Classifier --host $(HOST) --port $(PORT)

bento: setup-serve
	$(NEED_MODEL)
	@tag=$$($(PY) -m service.store "$(MODEL_PATH)") && echo "model store: $$tag" && \
	$(VENV)/bin/bentoml build --arg model_tag=$$tag && \
	echo "serve the bento: $(VENV)/bin/bentoml serve bnfold-classifier:latest --host $(HOST) --port $(PORT)  (or: make container)"

faults: setup-load
	$(if $(IMAGE),,$(NEED_MODEL))
	$(LOCK) $(PY) -m loadtest.faults $(if $(IMAGE),--image $(IMAGE) --out $(ARTIFACTS)/faults-image,--model "$(MODEL_PATH)" --out $(ARTIFACTS)/faults) \
		$(if $(ONLY),--only $(ONLY)) $(if $(OVERLOAD_TIME),--overload-time $(OVERLOAD_TIME))

loadtest: setup-load data
	$(NEED_MODEL)
	$(PY) -m loadtest run --model "$(MODEL_PATH)" --port $(PORT) --users $(or $(USERS),16) \
		$(if $(SPAWN_RATE),--spawn-rate $(SPAWN_RATE)) --run-time $(or $(RUN_TIME),30s) --processes $(or $(PROCESSES),2) \
		--p99-ms $(or $(P99_MS),1000) $(if $(TAGS),--tags $(TAGS)) $(if $(TARGET_RPS),--target-rps $(TARGET_RPS)) \
		--data-dir "$(DATA_DIR)" --out $(ARTIFACTS)/loadtest

# One benchmark for any model (docs/loadtest.md). SETUPS=naive-fastapi,triton,... (none: ours and the ceiling
# only), CLIENTS=1,8,32, ROUNDS=2, PRECISION=int8; the peers' venvs (.venv-peers/NAME) are made on first use,
# before BENCH_LOCK is taken (held while measuring, not by make: installs run outside it).
bench-serve: setup-load data
	$(NEED_MODEL)
	$(PY) -m loadtest bench --model "$(MODEL_PATH)" $(if $(QUICK),--quick) $(if $(SETUPS),--setups $(SETUPS)) \
		$(if $(CLIENTS),--clients $(CLIENTS)) $(if $(ROUNDS),--rounds $(ROUNDS)) $(if $(PRECISION),--env PRECISION=$(PRECISION)) \
		$(if $(BENCH_LOCK),--lock "$(BENCH_LOCK)") --data-dir "$(DATA_DIR)" --out $(ARTIFACTS)/bench_serve

soak: setup-load data
	$(NEED_MODEL)
	$(LOCK) $(PY) -m loadtest soak --model "$(MODEL_PATH)" --time $(or $(SOAK_TIME),10m) $(if $(SOAK_WARMUP),--warmup $(SOAK_WARMUP)) \
		--processes $(or $(PROCESSES),2) --bench-results $(ARTIFACTS)/bench_serve/results.json \
		--data-dir "$(DATA_DIR)" --out $(ARTIFACTS)/soak

# example request bodies for the curl examples (JSON, raw float32, .npy, OIP v2, PNG/JPEG)
examples: setup-load data
	$(NEED_MODEL)
	$(PY) -m loadtest examples --model "$(MODEL_PATH)" --data-dir "$(DATA_DIR)" --out $(or $(EXAMPLES_DIR),/tmp/fmnist)

# --- ONNX in: the Keras seeds and the graph-pass benchmark (docs/onnx-fold.md) ------------------
# Keras 3 runs on the torch backend (keras is in the dev extra). Training stage, then export stage.
keras-seeds: setup-dev data
	KERAS_BACKEND=torch $(PY) -m training.keras_seeds --data-dir "$(DATA_DIR)" --out $(ARTIFACTS)/keras \
		$(if $(EPOCHS_MLP),--epochs-mlp $(EPOCHS_MLP)) $(if $(EPOCHS_CNN),--epochs-cnn $(EPOCHS_CNN))
	$(PY) -m export.keras_seeds $(ARTIFACTS)/keras --data-dir "$(DATA_DIR)"

# The tools we compare against are only needed here: the `bench` extra, installed on first use.
$(VENV)/.bench-installed: pyproject.toml | setup-dev
	$(PIP) -e '.[bench]'
	@touch $@

bench-onnx-fold: setup-dev $(VENV)/.bench-installed
	KERAS_BACKEND=torch $(LOCK) $(PY) -m export.bench_onnx_fold --artifacts $(ARTIFACTS) \
		--out $(ARTIFACTS)/bench_onnx_fold $(if $(ROUNDS),--rounds $(ROUNDS))

readme-results:
	$(PYTHON) scripts/readme_results.py --artifacts $(ARTIFACTS)

clean:
	rm -rf $(ARTIFACTS)

# --- deployment: container image, Kubernetes manifests, rolling replace (docs/deploy.md) ---------
# `make container` uses MODEL_PATH as serve does; BASE_IMAGE= overrides the base image (default:
# python:3.11-slim when it can be pulled, else bnfold/python:3.11-bookworm from `make base-image`).
# They install docker.io/debootstrap/haproxy and start dockerd when missing (deploy/tools.py).
.PHONY: base-image lock container deploy-check
base-image:
	@$(PYTHON) -m deploy.tools docker debootstrap
	DOCKER=$$($(PYTHON) -c 'from deploy.tools import docker_client; print(docker_client())') bash deploy/base-image.sh

# deploy/requirements.lock: what the image installs, pinned with hashes (commit the result)
lock: setup-serve
	$(PY) deploy/lock.py

container: setup-serve
	$(NEED_MODEL)
	$(PY) -m deploy.container --model "$(MODEL_PATH)" $(if $(BASE_IMAGE),--base-image "$(BASE_IMAGE)")

# two replicas behind HAProxy, each replaced under load, then one SIGKILLed (RATE=100 req/s)
deploy-check: setup-dev
	$(LOCK) $(PY) -m deploy.check --data-dir "$(DATA_DIR)" $(if $(RATE),--rate $(RATE))

# --- bench-zoo (docs/zoo.md): 25+ torchvision/timm architectures through python -m export and the peers ---
# Its own venv: torchvision needs torch 2.14.x (from this machine's disk, ~5.5 GB, runs on CPU); timm and the
# graph tools after it, then the project (pyproject's torch>=2.6 keeps 2.14.1; the stamp checks that it did).
# ZOO=resnet50,mobilenet_v2 (a subset), ZOO_TIMEOUT=900 (s per export), ZOO_ROWS=32 (verify on 32 seeded rows
# instead of the CLI's default inputs), FORCE=1 (redo cached models).
# Each model runs holding ZOO_LOCK (flock; default /tmp/bnfold-cpu.lock, the machine's benchmark lock), so
# its seconds are not shared with another benchmark; between models the others get their turn.
ZOO_LOCK ?= /tmp/bnfold-cpu.lock
ZOO_VENV := .venv-zoo
ZOO_PY := $(ZOO_VENV)/bin/python
ZOO_PIP := $(ZOO_PY) -m pip install -q --disable-pip-version-check
$(ZOO_VENV)/.installed: pyproject.toml
	@test -x $(ZOO_PY) || $(PYTHON) -m venv $(ZOO_VENV)
	$(ZOO_PIP) torch==2.14.1 torchvision==0.29.1
	$(ZOO_PIP) timm onnxsim onnxslim onnxoptimizer
	$(ZOO_PIP) -e .
	@$(ZOO_PY) -c 'import torch, sys; v = torch.__version__.split("+")[0]; print("bench-zoo venv: torch", v); sys.exit(v != "2.14.1")'
	@touch $@

# Architectures and weights bench-zoo never uses, through the CLI as a user runs it (docs/zoo.md,
# "Independent check"); ultralytics for its YOLOv8n, pinned beside the venv's torch. ~20 min.
.PHONY: bench-unseen
bench-unseen: $(ZOO_VENV)/.installed
	$(ZOO_PIP) ultralytics torch==2.14.1 torchvision==0.29.1
	$(ZOO_PY) -m bench.unseen --out $(ARTIFACTS)/bench_unseen $(if $(ONLY),--only $(ONLY))

# INT8 benchmarks (docs/int8.md): the ablation on our runs (trains the missing ones: deep-cnn and mobile-cnn
# take ~20 min each on 2 idle cores), ResNet-50 and MobileNetV2 exported with --int8 by the bench-zoo venv
# (calibrated random weights, random calibration: a speed benchmark; --max-drop 100, the report shows SQNR and
# agreement), then INT8 against FP32 on one thread. Holds BENCH_LOCK (default the machine's benchmark lock).
.PHONY: bench-int8
INT8_RUNS ?= seed-cnn,deep-cnn,mobile-cnn
INT8_ZOO ?= resnet50,mobilenet_v2
BENCH_INT8_LOCK ?= /tmp/bnfold-cpu.lock
bench-int8: setup-dev data $(ZOO_VENV)/.installed
	@for a in $(subst $(comma), ,$(INT8_RUNS)); do $(MAKE) --no-print-directory train ARCH=$$a RUN_DIR=$(ARTIFACTS)/runs/$$a || exit $$?; done
	@for n in $(subst $(comma), ,$(INT8_ZOO)); do d=$(ARTIFACTS)/bench_int8/zoo/$$n; mkdir -p $$d; \
		PYTHONPATH=$(CURDIR) $(ZOO_PY) -c "from pathlib import Path; from bench.zoo import prepare; prepare('$$n', Path('$$d/weights.safetensors'), 'int8')" && \
		PYTHONPATH=$(CURDIR) $(ZOO_PY) -m export --model bench/zoo_models.py:$$n --weights $$d/weights.safetensors --input-shape 3,224,224 \
			--name $$n --out $$d --int8 --calib random --max-drop 100 --if-stale || exit $$?; done
	flock $(BENCH_INT8_LOCK) $(PY) -m export.bench_int8 all --runs $(subst $(space),$(comma),$(foreach a,$(subst $(comma), ,$(INT8_RUNS)),$(ARTIFACTS)/runs/$(a))) \
		--model-dirs $(subst $(space),$(comma),$(foreach n,$(subst $(comma), ,$(INT8_ZOO)),$(ARTIFACTS)/bench_int8/zoo/$(n))) \
		--data-dir "$(DATA_DIR)" --out $(ARTIFACTS)/bench_int8

# Real models through the project's CLI, each bench-served with issue 25's goals (bench/real.py): resumable,
# FORCE=1 redoes, ONLY=resnet50,yolov8n, ROUNDS=2; each benchmark holds ZOO_LOCK while it measures. Its tables
# replace docs/service.md's "Serving real models" results (plots in docs/img/bench_real/). Exit 1 when a goal is short.
.PHONY: bench-real
bench-real: setup-load data $(ZOO_VENV)/.installed
	$(ZOO_PIP) ultralytics torch==2.14.1 torchvision==0.29.1
	$(PY) -m bench.real --out $(ARTIFACTS)/bench_real --lock $(ZOO_LOCK) --data-dir "$(DATA_DIR)" --docs docs/service.md \
		$(if $(ONLY),--only $(ONLY)) $(if $(FORCE),--force) $(if $(ROUNDS),--rounds $(ROUNDS))

# torchvision/timm models through python -m export: `make setup-zoo`, then `.venv-zoo/bin/python -m export --model
# torchvision.models:resnet50 ...` (torchvision does not import beside the project venv's torch 2.13.0)
.PHONY: setup-zoo bench-zoo
setup-zoo: $(ZOO_VENV)/.installed

bench-zoo: $(ZOO_VENV)/.installed
	$(ZOO_PY) -m bench.zoo --out $(ARTIFACTS)/bench_zoo --lock $(ZOO_LOCK) $(if $(ZOO),--only $(ZOO)) \
		$(if $(ZOO_TIMEOUT),--timeout $(ZOO_TIMEOUT)) $(if $(ZOO_ROWS),--rows $(ZOO_ROWS)) $(if $(FORCE),--force)
