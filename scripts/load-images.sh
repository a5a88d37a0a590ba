#!/usr/bin/env bash
# Import images built by scripts/build-images.sh into a containerd (namespace k8s.io, the CRI's), unpacked for
# the overlayfs snapshotter the CRI uses, so pods run them without any registry.
#
# Usage: scripts/load-images.sh ADDRESS TAG...      ADDRESS: the containerd's gRPC socket path
#
# A tag is skipped when containerd already has it as the same image: the config digest of the image the
# tag names in containerd equals the Docker image ID (both are the sha256 of the same config JSON) and the
# snapshot of its top layer (its chain ID) exists in overlayfs, i.e. it is unpacked. A rebuilt image has a
# new config digest and is imported again, replacing the tag. The tags that need it go through
# `docker save TAG | ctr images import` each (containerd stores a layer shared between them once).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if (($# < 2)); then
  echo "usage: $0 CONTAINERD_ADDRESS TAG..." >&2
  exit 2
fi
address="$1"
shift
# shellcheck source=lib-docker.sh
source "$here/lib-docker.sh"
SNAPSHOTTER=overlayfs
command -v ctr >/dev/null || { echo "error: ctr missing (Debian package containerd)" >&2; exit 1; }
[[ -S "$address" ]] || { echo "error: no containerd socket at $address" >&2; exit 1; }
c() { ctr --address "$address" -n k8s.io "$@"; }

# The state of TAG in containerd: "CONFIG_DIGEST CHAIN_ID" (empty when containerd does not have it).
containerd_state() {
  local tag="$1" digest
  digest="$(c images ls "name==$tag" 2>/dev/null | awk -v t="$tag" '$1 == t {print $3}')"
  [[ -n "$digest" ]] || return 0
  c content get "$digest" | python3 -c '
import hashlib, json, subprocess, sys
doc = json.load(sys.stdin)
get = lambda d: json.loads(subprocess.run(sys.argv[1:] + [d], check=True, capture_output=True).stdout)
if "manifests" in doc:  # an index: the linux/amd64 manifest
    ms = [m for m in doc["manifests"] if m.get("platform", {}).get("architecture", "amd64") == "amd64"]
    doc = get(ms[0]["digest"])
config = doc["config"]["digest"]
chain = None
for diff_id in get(config)["rootfs"]["diff_ids"]:
    chain = diff_id if chain is None else "sha256:" + hashlib.sha256(f"{chain} {diff_id}".encode()).hexdigest()
print(config, chain)
' ctr --address "$address" -n k8s.io content get
}

# Whether TAG is in containerd as Docker image ID, unpacked in overlayfs.
is_loaded() {
  local tag="$1" want="$2" config chain
  read -r config chain <<<"$(containerd_state "$tag")"
  [[ -n "${config:-}" && "$config" == "$want" ]] || return 1
  c snapshots --snapshotter "$SNAPSHOTTER" info "$chain" >/dev/null 2>&1
}

ftc_docker_start
todo=()
declare -A ids=()
for tag in "$@"; do
  if ! ids[$tag]="$(dk image inspect -f '{{.Id}}' "$tag" 2>/dev/null)"; then
    echo "error: $tag is not in the build's dockerd (run make images)" >&2
    exit 1
  fi
  if is_loaded "$tag" "${ids[$tag]}"; then
    log "$tag already in $address (${ids[$tag]:0:19})"
  else
    todo+=("$tag")
  fi
done
# The CRI also names every image it has seen by its ID (sha256:<config digest>); such a name left from an
# earlier build keeps that build's layers on disk. Drop the ID names that are not one of the given images.
drop_stale_ids() {
  local keep=" ${ids[*]} " ref
  for ref in $(c images ls -q | grep -E '^sha256:[0-9a-f]{64}$' || true); do
    if [[ $keep != *" $ref "* ]]; then
      c images rm "$ref" >/dev/null && log "removed the stale image name $ref"
    fi
  done
}
if ((${#todo[@]} == 0)); then
  log "nothing to import"
  drop_stale_ids
  exit 0
fi

t=$SECONDS
# Disk: a node keeps each image twice (its layer blobs and their unpacked snapshots; ~12 GB for the two step
# images). When the disk holding containerd's root is short of room for another copy, the old versions of
# the images to import go first (their shared layers are then imported again: slower, but it fits).
drop_stale_ids
free_gib=$(df --output=avail -BG "${FTC_CACHE:-$HOME/.cache/ftc}" 2>/dev/null | tail -1 | tr -dc 0-9)  # the nodes' roots
if [[ -n "$free_gib" ]] && (( free_gib < ${FTC_LOAD_MIN_FREE_GIB:-30} )); then
  for tag in "${todo[@]}"; do
    if c images rm --sync "$tag" >/dev/null 2>&1; then log "removed the old $tag first (${free_gib} GiB free)"; fi
  done
fi
log "importing ${todo[*]} into $address (namespace k8s.io, $SNAPSHOTTER)"
# One image at a time: containerd 1.6 unpacking two images that share layers at once can fail with
# "parent snapshot ... does not exist"; an import that fails anyway (a garbage collection racing it) is
# tried again.
for tag in "${todo[@]}"; do
  for attempt in 1 2 3; do
    if dk save "$tag" | c images import --snapshotter "$SNAPSHOTTER" - >/dev/null && is_loaded "$tag" "${ids[$tag]}"; then
      break
    fi
    if ((attempt == 3)); then
      echo "error: $tag could not be imported into $address as ${ids[$tag]}, unpacked in $SNAPSHOTTER" >&2
      exit 1
    fi
    log "$tag not imported (attempt $attempt); trying again"
  done
done
log "imported ${#todo[@]} image(s) in $((SECONDS - t)) s"
drop_stale_ids
