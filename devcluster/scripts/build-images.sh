#!/usr/bin/env bash
# Build the project's images from their Dockerfiles with a private dockerd, without any registry:
#   ftc.local/debian:bookworm          the base: mmdebstrap minbase + python3 (3.11) + ca-certificates
#   ftc.local/uv:<v>                   just /uv, a copy of .venv/bin/uv (the version the Makefile pins)
#   registry.k8s.io/pause:<v>          a static pause binary (the sandbox image the nodes' CRI config names)
#   ghcr.io/ftc-project/ftc-step-base:<appVersion>   step_kernel/Dockerfile: torch, the API, the step kernel
#   ghcr.io/ftc-project/ftc-{trainer,evaluator}:<appVersion>   FROM the step base (--build-arg STEP_BASE=...)
#   ghcr.io/ftc-project/ftc-operator:<appVersion>   operator/Dockerfile (no torch)
#                                      with --build-arg BASE=ftc.local/debian:bookworm UV_IMAGE=ftc.local/uv:<v>
# The base, uv and pause images are made once (rebuilt only when missing); the Dockerfile builds are
# incremental through BuildKit's cache in the dockerd's data root ${FTC_CACHE:-~/.cache/ftc}/docker, which
# stays when the script's dockerd is stopped at exit.
#
# TORCH_CUDA=cu128 (`make images-cu128`, in a cache of its own) builds the step images on the CUDA 12.8 torch for NVIDIA drivers
# older than R580 (--build-arg TORCH_CUDA, see step_kernel/Dockerfile and docs/images.md); default cu130.
#
# Usage: devcluster/scripts/build-images.sh       prints $FTC_CACHE/images/images.json on the last line:
#   {"images": {TAG: {"id": "sha256:...", "size": BYTES, "build_seconds": S}, ...}, ...}
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=lib-docker.sh
source "$here/lib-docker.sh"

# --- versions: one source each ---------------------------------------------------------------------
app_version="$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$repo/pyproject.toml")"
chart_version="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$repo/helm/ftc/Chart.yaml")"
if [[ "$chart_version" != "$app_version" ]]; then
  echo "error: pyproject version $app_version != helm/ftc/Chart.yaml appVersion $chart_version" >&2
  exit 1
fi
uv_version="$(sed -n 's/.*uv==\([0-9][0-9.]*\).*/\1/p' "$repo/Makefile" | head -n 1)"
[[ -n "$uv_version" ]] || { echo "error: no uv==X.Y.Z pin in the Makefile" >&2; exit 1; }
uv_bin="$repo/.venv/bin/uv"
[[ -x "$uv_bin" ]] || { echo "error: $uv_bin missing (run make install)" >&2; exit 1; }
have_uv="$("$uv_bin" --version | awk '{print $2}')"
if [[ "$have_uv" != "$uv_version" ]]; then
  echo "error: $uv_bin is $have_uv, the Makefile pins $uv_version (run make clean install)" >&2
  exit 1
fi
for df in operator/Dockerfile step_kernel/Dockerfile; do
  if ! grep -qx "ARG UV_IMAGE=ghcr.io/astral-sh/uv:$uv_version" "$repo/$df"; then
    echo "error: $df does not default UV_IMAGE to ghcr.io/astral-sh/uv:$uv_version (the Makefile's uv pin)" >&2
    exit 1
  fi
done

TORCH_CUDA="${TORCH_CUDA:-cu130}"
case "$TORCH_CUDA" in
  cu130 | cu128) ;;
  *) echo "error: TORCH_CUDA=$TORCH_CUDA: use cu130 (default; NVIDIA driver R580 or newer) or cu128 (R525 or newer)" >&2; exit 1 ;;
esac

BASE_IMAGE=ftc.local/debian:bookworm
UV_IMAGE="ftc.local/uv:$uv_version"
PAUSE_IMAGE=registry.k8s.io/pause:3.10
STEP_BASE_IMAGE="ghcr.io/ftc-project/ftc-step-base:$app_version"
TRAINER_IMAGE="ghcr.io/ftc-project/ftc-trainer:$app_version"
EVALUATOR_IMAGE="ghcr.io/ftc-project/ftc-evaluator:$app_version"
OPERATOR_IMAGE="ghcr.io/ftc-project/ftc-operator:$app_version"
IMAGE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

out="$FTC_CACHE/images"
mkdir -p "$out"
ftc_docker_start
work="$(mktemp -d "$out/work.XXXXXX")"
cleanup() { rm -rf "$work"; ftc_docker_stop; }
trap cleanup EXIT

declare -A seconds=()
have_image() { dk image inspect "$1" >/dev/null 2>&1; }

# The Debian mirror of this machine's apt sources (deb822 .sources or one-line .list), not the security one.
debian_mirror() {
  local m
  m="$(awk '/^URIs:/ {u=$2} /^Suites:/ && / bookworm( |$)/ && u !~ /security/ {print u; exit}' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null || true)"
  if [[ -z "$m" ]]; then
    m="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
          | awk '$1 == "deb" && $0 !~ /security/ && / bookworm / {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' || true)"
  fi
  echo "${m:-http://deb.debian.org/debian}"
}

# --- base: mmdebstrap ------------------------------------------------------------------------------
t=$SECONDS
if have_image "$BASE_IMAGE"; then
  log "$BASE_IMAGE present"
else
  mirror="$(debian_mirror)"
  log "building $BASE_IMAGE with mmdebstrap from $mirror"
  # This machine's own CAs (/usr/local/share/ca-certificates, e.g. a TLS-inspecting egress proxy's) are
  # trusted in the local base too, and SSL_CERT_FILE points uv (which otherwise uses its built-in roots)
  # at the system bundle, so the builds reach PyPI wherever the host does.
  hook=':'
  if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    hook='mkdir -p "$1/usr/local/share/ca-certificates" && cp /usr/local/share/ca-certificates/*.crt "$1/usr/local/share/ca-certificates/" && chroot "$1" update-ca-certificates >/dev/null'
  fi
  mmdebstrap --quiet --variant=minbase --include=python3,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook="$hook" bookworm "$work/base.tar" "$mirror"
  dk import --change "ENV PATH=$IMAGE_PATH" --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["/bin/bash"]' "$work/base.tar" "$BASE_IMAGE" >/dev/null
  rm -f "$work/base.tar"
  log "$BASE_IMAGE imported"
fi
seconds[$BASE_IMAGE]=$((SECONDS - t))

# --- uv: just /uv ----------------------------------------------------------------------------------
t=$SECONDS
if have_image "$UV_IMAGE"; then
  log "$UV_IMAGE present"
else
  mkdir -p "$work/uv"
  cp "$uv_bin" "$work/uv/uv"
  tar -C "$work/uv" --numeric-owner --owner=0 --group=0 -cf "$work/uv.tar" uv
  dk import "$work/uv.tar" "$UV_IMAGE" >/dev/null
  log "$UV_IMAGE imported (uv $uv_version from $uv_bin)"
fi
seconds[$UV_IMAGE]=$((SECONDS - t))

# --- pause: a static binary that sleeps until SIGINT/SIGTERM and reaps children -------------------------
t=$SECONDS
if have_image "$PAUSE_IMAGE"; then
  log "$PAUSE_IMAGE present"
else
  mkdir -p "$work/pause/root"
  cat >"$work/pause/pause.c" <<'C'
#include <signal.h>
#include <stddef.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, NULL, WNOHANG) > 0) {} }

int main(void) {
  struct sigaction sa = {0};
  sa.sa_handler = stop;
  if (sigaction(SIGINT, &sa, NULL) < 0 || sigaction(SIGTERM, &sa, NULL) < 0) return 1;
  sa.sa_handler = reap;
  sa.sa_flags = SA_NOCLDSTOP | SA_RESTART;
  if (sigaction(SIGCHLD, &sa, NULL) < 0) return 2;
  for (;;) pause();
}
C
  gcc -static -O2 -Wall -o "$work/pause/root/pause" "$work/pause/pause.c"
  strip "$work/pause/root/pause"
  tar -C "$work/pause/root" --numeric-owner --owner=0 --group=0 -cf "$work/pause.tar" pause
  dk import --change 'ENTRYPOINT ["/pause"]' --change 'USER 65535:65535' "$work/pause.tar" "$PAUSE_IMAGE" >/dev/null
  log "$PAUSE_IMAGE imported"
fi
seconds[$PAUSE_IMAGE]=$((SECONDS - t))

# --- the Dockerfiles -------------------------------------------------------------------------------
# No bridge network exists in this dockerd: builds use the host's network.
# Step headers of BuildKit's plain progress are echoed as they start; the whole output goes to a log.
build() {
  local tag="$1" dockerfile="$2" t=$SECONDS
  local blog="$out/build-${dockerfile%%/*}.log"
  local -A shown=()
  log "building $tag from $dockerfile"
  if ! dk build --network=host --progress=plain \
      --build-arg "BASE=$BASE_IMAGE" --build-arg "UV_IMAGE=$UV_IMAGE" --build-arg "VERSION=$app_version" \
      --build-arg "STEP_BASE=$STEP_BASE_IMAGE" --build-arg "TORCH_CUDA=$TORCH_CUDA" \
      -f "$repo/$dockerfile" -t "$tag" "$repo" 2>&1 \
      | tee "$blog" | { grep --line-buffered -E '^#[0-9]+ \[.*\] RUN' || true; } \
      | while IFS= read -r line; do
          [[ -z "${shown[${line%% *}]:-}" ]] || continue
          shown[${line%% *}]=1
          log "  ${line:0:150}"
        done; then
    tail -n 40 "$blog" >&2
    echo "error: building $tag failed; full log: $blog" >&2
    return 1
  fi
  seconds[$tag]=$((SECONDS - t))
  log "built $tag in ${seconds[$tag]} s ($(grep -c '^#[0-9]* CACHED$' "$blog" || true) steps cached)"
}
build "$STEP_BASE_IMAGE" step_kernel/Dockerfile
build "$TRAINER_IMAGE" trainer_image/Dockerfile
build "$EVALUATOR_IMAGE" evaluator_image/Dockerfile
build "$OPERATOR_IMAGE" operator/Dockerfile
# The images a rebuild replaced (now untagged) go, and so does every BuildKit cache record this run did not
# use (an earlier version's layers: the torch layer alone is ~5 GB, and the disk also holds two nodes' copies
# of the images). A record this run hit or built was used in the last $SECONDS s and stays, so the next
# build of the same sources is fully cached and gives the same image IDs (nothing to import again).
dk image prune -f >/dev/null
reclaimed="$(dk builder prune -f --filter "until=$((SECONDS + 60))s" 2>&1 | sed -n 's/^Total[^:]*:[[:space:]]*//p' | tail -n 1)"
log "build cache not used by this build removed (${reclaimed:-0B})"

# --- images.json -----------------------------------------------------------------------------------
tags=("$OPERATOR_IMAGE" "$STEP_BASE_IMAGE" "$TRAINER_IMAGE" "$EVALUATOR_IMAGE" "$BASE_IMAGE" "$UV_IMAGE" "$PAUSE_IMAGE")
{
  for tag in "${tags[@]}"; do
    printf '%s\t%s\t%s\n' "$tag" "$(dk image inspect -f '{{.Id}} {{.Size}}' "$tag")" "${seconds[$tag]}"
  done
} | python3 -c '
import json, sys, time
images = {}
for line in sys.stdin:
    tag, id_size, secs = line.rstrip("\n").split("\t")
    image_id, size = id_size.split()
    images[tag] = {"id": image_id, "size": int(size), "build_seconds": int(secs)}
json.dump({"images": images, "uv_version": sys.argv[2], "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
          open(sys.argv[1], "w"), indent=2)
' "$out/images.json.tmp" "$uv_version"
mv "$out/images.json.tmp" "$out/images.json"
for tag in "${tags[@]}"; do
  log "$(printf '%-45s %8s MB' "$tag" "$(($(dk image inspect -f '{{.Size}}' "$tag") / 1000000))")"
done
# Stop our dockerd now so that the path is the last line.
trap - EXIT
cleanup
log "done"
echo "$out/images.json"
