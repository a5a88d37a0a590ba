#!/usr/bin/env bash
# Import images built by devcluster/scripts/build-images.sh into a containerd (namespace k8s.io, the CRI's), unpacked for
# the overlayfs snapshotter the CRI uses, so pods run them without any registry.
#
# Usage: devcluster/scripts/load-images.sh ADDRESS TAG...      ADDRESS: the containerd's gRPC socket path
#
# A tag is skipped when containerd already has it as the same image: the config digest of the image the
# tag names in containerd equals the Docker image ID (both are the sha256 of the same config JSON) and the
# snapshot of its top layer (its chain ID) exists in overlayfs, i.e. it is unpacked. A rebuilt image has a
# new config digest and is imported again, replacing the tag. The tags that need it go through
# `docker save TAG | ctr images import` each (containerd stores a layer shared between them once).
#
# Disk: once an image is unpacked its compressed-layer blobs serve nothing (pods run from the snapshots),
# so they are deleted, as the CRI's discard_unpacked_layers does for pulled images: a node then holds the
# step images once (~6 GB), not twice. An earlier version's snapshots go in a synchronous garbage
# collection at the end.
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

# TAG's image manifest in containerd as JSON (of an index, its linux/amd64 manifest); empty when containerd
# does not have TAG.
manifest_of() {
  local tag="$1" digest
  digest="$(c images ls "name==$tag" 2>/dev/null | awk -v t="$tag" '$1 == t {print $3}')"
  [[ -n "$digest" ]] || return 0
  c content get "$digest" | python3 -c '
import json, subprocess, sys
doc = json.load(sys.stdin)
if "manifests" in doc:  # an index: the linux/amd64 manifest
    ms = [m for m in doc["manifests"] if m.get("platform", {}).get("architecture", "amd64") == "amd64"]
    doc = json.loads(subprocess.run(sys.argv[1:] + [ms[0]["digest"]], check=True, capture_output=True).stdout)
print(json.dumps(doc))
' ctr --address "$address" -n k8s.io content get
}

# The state of TAG in containerd: "CONFIG_DIGEST CHAIN_ID" (empty when containerd does not have it).
containerd_state() {
  local manifest
  manifest="$(manifest_of "$1")"
  [[ -n "$manifest" ]] || return 0
  python3 -c '
import hashlib, json, subprocess, sys
config = json.loads(sys.stdin.read())["config"]["digest"]
chain = None
for diff_id in json.loads(subprocess.run(sys.argv[1:] + [config], check=True, capture_output=True).stdout)["rootfs"]["diff_ids"]:
    chain = diff_id if chain is None else "sha256:" + hashlib.sha256(f"{chain} {diff_id}".encode()).hexdigest()
print(config, chain)
' ctr --address "$address" -n k8s.io content get <<<"$manifest"
}

# The digests of TAG's layer blobs in containerd, one per line.
layer_blobs() {
  local manifest
  manifest="$(manifest_of "$1")"
  [[ -n "$manifest" ]] || return 0
  python3 -c 'import json, sys; print("\n".join(layer["digest"] for layer in json.load(sys.stdin)["layers"]))' <<<"$manifest"
}

# Delete TAG's layer blobs (it is unpacked; its manifest and config stay, which is all the CRI reads).
discard_layers() {
  local tag="$1" digest n=0
  for digest in $(layer_blobs "$tag"); do
    if c content rm "$digest" >/dev/null 2>&1; then n=$((n + 1)); fi
  done
  ((n == 0)) || log "discarded $n unpacked layer blob(s) of $tag"
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
# A synchronous garbage collection (removing a throwaway tag triggers one): the layers and snapshots that
# only an earlier version of an image used go now, not at some later collection.
collect_garbage() {
  local any
  any="$(c images ls -q | sed -n 1p)"
  [[ -n "$any" ]] || return 0
  c images tag --force "$any" ftc.local/gc:collect >/dev/null && c images rm --sync ftc.local/gc:collect >/dev/null
}
if ((${#todo[@]} == 0)); then
  log "nothing to import"
  drop_stale_ids
  for tag in "$@"; do discard_layers "$tag"; done
  collect_garbage
  exit 0
fi

t=$SECONDS
drop_stale_ids
# A full import needs the image's blobs and its snapshots at once (about twice its size). Where the disk
# holding containerd's root is short of that, the old versions of the images to import go first (their
# shared layers are then imported again: slower, but it fits); where it is short even then, say so.
need_gib=0
for tag in "${todo[@]}"; do
  need_gib=$((need_gib + 2 * $(dk image inspect -f '{{.Size}}' "$tag") / 1073741824 + 1))
done
free_gib() { df --output=avail -BG "${FTC_CACHE:-$HOME/.cache/ftc}" 2>/dev/null | tail -1 | tr -dc 0-9; }
if (($(free_gib) < need_gib)); then
  for tag in "${todo[@]}"; do
    if c images rm "$tag" >/dev/null 2>&1; then log "removed the old $tag first ($(free_gib) GiB free, up to $need_gib GiB needed)"; fi
  done
  collect_garbage
  if (($(free_gib) < need_gib)); then
    log "warning: $(free_gib) GiB free under ${FTC_CACHE:-$HOME/.cache/ftc}, importing ${todo[*]} may need up to $need_gib GiB"
  fi
fi
# The version being replaced keeps a name until the import is done: an import re-points the tag before it
# unpacks, and a garbage collection in between would take the old version's snapshots that the unpacker
# already counted on as the new one's lower layers ("parent snapshot ... does not exist").
for keep in $(c images ls -q | grep '^ftc.local/importing:' || true); do c images rm "$keep" >/dev/null; done  # a failed run's
kept=()
for tag in "${todo[@]}"; do
  keep="ftc.local/importing:$(printf '%s' "$tag" | tr -c 'A-Za-z0-9_.-' '-' | cut -c1-120)"
  if c images tag --force "$tag" "$keep" >/dev/null 2>&1; then kept+=("$keep"); fi
done
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
      echo "error: $tag could not be imported into $address as ${ids[$tag]}, unpacked in $SNAPSHOTTER ($(free_gib) GiB free under ${FTC_CACHE:-$HOME/.cache/ftc})" >&2
      exit 1
    fi
    log "$tag not imported (attempt $attempt); trying again"
  done
  discard_layers "$tag"
done
log "imported ${#todo[@]} image(s) in $((SECONDS - t)) s"
for keep in "${kept[@]}"; do c images rm "$keep" >/dev/null 2>&1 || true; done
drop_stale_ids
collect_garbage
log "$(free_gib) GiB free under ${FTC_CACHE:-$HOME/.cache/ftc}"
