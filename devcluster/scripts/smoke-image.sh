#!/usr/bin/env bash
# Runs devcluster/scripts/smoke-image.py inside the trainer image of the private dockerd under $FTC_CACHE
# (no network): torch/CUDA build, the driver floor ftc derives from it, and 20 real LoRA steps on the CPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
source devcluster/scripts/lib-docker.sh
ftc_docker_start
log "smoke check of ghcr.io/ftc-project/ftc-trainer:0.1.0 under $FTC_CACHE"
dk run --rm --network none -v "$PWD/devcluster/scripts/smoke-image.py:/smoke.py:ro" \
  --entrypoint python ghcr.io/ftc-project/ftc-trainer:0.1.0 /smoke.py
