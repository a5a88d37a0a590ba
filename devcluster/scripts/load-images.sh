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
# one `docker save TAG...` (a layer shared between them is in the stream once) into `ctr images import`.
#
# Disk: once an image is unpacked its compressed-layer blobs serve nothing (pods run from the snapshots),
# so they are deleted, as the CRI's discard_unpacked_layers does for pulled images: a node then holds the
# step images once (~6 GB), not twice. An earlier version's snapshots go in a synchronous garbage
# collection at the end.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if (($# < 2)); then
  echo "usage: $0 CONTAINERD_ADDRESS[,ADDRESS...] TAG..." >&2
  exit 2
fi
IFS=, read -r -a addresses <<<"$1"
shift
# shellcheck source=lib-docker.sh
source "$here/lib-docker.sh"
SNAPSHOTTER=overlayfs
command -v ctr >/dev/null || { echo "error: ctr missing (Debian package containerd)" >&2; exit 1; }
for address in "${addresses[@]}"; do
  [[ -S "$address" ]] || { echo "error: no containerd socket at $address" >&2; exit 1; }
done
address="${addresses[0]}"  # the containerd that c() talks to; the loops below set it
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
declare -A ids=()
for tag in "$@"; do
  if ! ids[$tag]="$(dk image inspect -f '{{.Id}}' "$tag" 2>/dev/null)"; then
    echo "error: $tag is not in the build's dockerd (run make images)" >&2
    exit 1
  fi
done
# What each containerd lacks; the union goes into the one stream.
declare -A wanted=()
targets=()
todo_of() {
  local tag todo=()
  for tag in "$@"; do
    if is_loaded "$tag" "${ids[$tag]}"; then
      log "$tag already in $address (${ids[$tag]:0:19})" >&2
    else
      todo+=("$tag")
    fi
  done
  echo "${todo[*]}"
}
for address in "${addresses[@]}"; do
  read -r -a todo <<<"$(todo_of "$@")"
  if ((${#todo[@]})); then
    targets+=("$address")
    for tag in "${todo[@]}"; do wanted[$tag]=1; done
  fi
done
todo=()
for tag in "$@"; do [[ -z "${wanted[$tag]:-}" ]] || todo+=("$tag"); done
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
tidy_all() {
  for address in "${addresses[@]}"; do
    drop_stale_ids
    for tag in "$@"; do discard_layers "$tag"; done
    collect_garbage
  done
}
if ((${#todo[@]} == 0)); then
  log "nothing to import"
  tidy_all "$@"
  exit 0
fi

t=$SECONDS
for address in "${targets[@]}"; do drop_stale_ids; done
# A full import needs the images' blobs and their snapshots at once (about twice their size) in every node
# importing them. Where the disk holding containerd's roots is short of that, the old versions of the
# images to import go first (their shared layers are then imported again: slower, but it fits); where it is
# short even then, say so.
# The bytes of the images to import, a layer shared between them counted once (the step images share the
# step base's ~5.5 GB): a layer is named by its place in its image's history (the rows up to it).
stream_bytes() {
  local tag
  for tag in "$@"; do
    echo "#image"
    dk history --no-trunc --human=false --format '{{.Size}} {{.CreatedBy}}' "$tag" | tac
  done | python3 -c '
import sys
seen, total, chain = set(), 0, ()
for line in sys.stdin:
    line = line.rstrip("\n")
    if line == "#image":
        chain = ()
        continue
    chain = chain + (line,)
    if chain not in seen:
        seen.add(chain)
        total += int(line.split(" ", 1)[0])
print(total)
'
}
bytes="$(stream_bytes "${todo[@]}")"
free_gib() { df --output=avail -BG "${FTC_CACHE:-$HOME/.cache/ftc}" 2>/dev/null | tail -1 | tr -dc 0-9; }
per_node_gib=$((2 * bytes / 1073741824 + 1))
need_gib=$((per_node_gib * ${#targets[@]}))
# All nodes at once where the disk holds that; one node after the other where it holds only one import.
together=1
if (($(free_gib) < need_gib && ${#targets[@]} > 1 && $(free_gib) >= per_node_gib)); then
  together=0
  log "$(free_gib) GiB free: importing into one node after the other (all at once may need up to $need_gib GiB)"
  need_gib=$per_node_gib
fi
if (($(free_gib) < need_gib)); then
  for address in "${targets[@]}"; do
    for tag in "${todo[@]}"; do
      if c images rm "$tag" >/dev/null 2>&1; then log "removed the old $tag from $address first ($(free_gib) GiB free, up to $need_gib GiB needed)"; fi
    done
    collect_garbage
  done
  if (($(free_gib) < need_gib)); then
    log "warning: $(free_gib) GiB free under ${FTC_CACHE:-$HOME/.cache/ftc}, importing ${todo[*]} may need up to $need_gib GiB"
  fi
fi
# The version being replaced keeps a name until the import is done: an import re-points the tag before it
# unpacks, and a garbage collection in between would take the old version's snapshots that the unpacker
# already counted on as the new one's lower layers ("parent snapshot ... does not exist").
kept=()
for address in "${targets[@]}"; do
  for keep in $(c images ls -q | grep '^ftc.local/importing:' || true); do c images rm "$keep" >/dev/null; done  # a failed run's
  for tag in "${todo[@]}"; do
    keep="ftc.local/importing:$(printf '%s' "$tag" | tr -c 'A-Za-z0-9_.-' '-' | cut -c1-120)"
    if c images tag --force "$tag" "$keep" >/dev/null 2>&1; then kept+=("$address=$keep"); fi
  done
done
# One stream: `docker save` of every image to import (shared layers once), tee'd into one `ctr images import`
# per node (FIFOs), which unpack side by side; ctr unpacks the images of one archive one after the other
# (containerd 1.6 unpacking two images that share layers at once in ONE containerd can fail with "parent
# snapshot ... does not exist"). An import that fails anyway is tried again for the nodes that lack it.
fifo_dir="$(mktemp -d)"
trap 'rm -rf "$fifo_dir"; ftc_docker_stop' EXIT
import_into() {
  local targets=("$@") attempt i fifo pids fifos failed ticker
  for attempt in 1 2 3; do
    log "importing ${todo[*]} (~$((bytes / 1000000)) MB) into ${#targets[@]} node(s): ${targets[*]} (namespace k8s.io, $SNAPSHOTTER; attempt $attempt)"
    pids=()
    fifos=()
    for i in "${!targets[@]}"; do
      fifo="$(mktemp -u "$fifo_dir/node.XXXXXX")"
      mkfifo "$fifo"
      fifos+=("$fifo")
      ctr --address "${targets[$i]}" -n k8s.io images import --snapshotter "$SNAPSHOTTER" - <"$fifo" >/dev/null &
      pids+=($!)
    done
    # A progress line every 30 s while the stream runs (an import of several GB is minutes of silence otherwise).
    ( while sleep 30; do log "  still importing ($((SECONDS - t)) s; $(free_gib) GiB free)"; done ) &
    ticker=$!
    dk save "${todo[@]}" | tee -p "${fifos[@]}" >/dev/null || true
    failed=()
    for i in "${!targets[@]}"; do
      wait "${pids[$i]}" || true
      address="${targets[$i]}"
      for tag in "${todo[@]}"; do
        if ! is_loaded "$tag" "${ids[$tag]}"; then failed+=("$address"); break; fi
      done
    done
    kill "$ticker" 2>/dev/null || true
    wait "$ticker" 2>/dev/null || true
    if ((${#failed[@]} == 0)); then
      break
    fi
    if ((attempt == 3)); then
      echo "error: ${todo[*]} could not be imported into ${failed[*]}, unpacked in $SNAPSHOTTER ($(free_gib) GiB free under ${FTC_CACHE:-$HOME/.cache/ftc})" >&2
      exit 1
    fi
    log "not imported into ${failed[*]} (attempt $attempt); trying again"
    targets=("${failed[@]}")
  done
}
if ((together)); then
  import_into "${targets[@]}"
else
  for address in "${targets[@]}"; do import_into "$address"; done
fi
log "imported ${#todo[@]} image(s) into ${#addresses[@]} node(s) in $((SECONDS - t)) s"
for entry in "${kept[@]}"; do
  address="${entry%%=*}"
  c images rm "${entry#*=}" >/dev/null 2>&1 || true
done
tidy_all "$@"
log "$(free_gib) GiB free under ${FTC_CACHE:-$HOME/.cache/ftc}"
