#!/usr/bin/env bash
# Build the local cluster's Go add-ons from the Go module proxy, cache the binaries, and make their images:
#   coredns  github.com/coredns/coredns@$COREDNS_VERSION     -> image registry.k8s.io/coredns/coredns:$COREDNS_VERSION
#   kueue    sigs.k8s.io/kueue/cmd/kueue@$KUEUE_VERSION        -> image registry.k8s.io/kueue/kueue:$KUEUE_VERSION
#   jobset   sigs.k8s.io/jobset@$JOBSET_VERSION (main.go at the module root)
#                                                              -> image registry.k8s.io/jobset/jobset:$JOBSET_VERSION
# Binaries go to ${FTC_CACHE:-~/.cache/ftc}/addons-<versions>/bin (with a .stamp); the images (FROM scratch: the static
# binary, /tmp, /etc/passwd with nonroot 65532, the host's CA bundle; USER 65532:65532 and the upstream entrypoint,
# /coredns or /manager, as the upstream distroless images have) go into the private dockerd of build-images.sh
# (lib-docker.sh), from where devcluster/kube/node.py loads them into the nodes' containerds like the project's images.
# Versions come from devcluster/scripts/versions.env.
#
# Each is built as upstream builds it: `go build` in the module's own tree (`go mod download -json` gives its
# directory in the module cache), so its own go.mod and go.sum pin every dependency (none of the three has replace
# directives). Not `go install module/pkg@version`: for a package at a module's root that looks the module's
# deprecation up in its version list, which the proxy refuses for sigs.k8s.io/jobset (403).
# CGO_ENABLED=0 (static), GOTOOLCHAIN=local (their go.mod asks for go 1.25/1.26; the local Go builds them), the
# upstream version ldflags. One build at a time (flock). A warm call (binaries present, the stamp matches
# versions.env, the images in the dockerd with the IDs recorded in images.json) returns at once without starting
# dockerd: the image check reads dockerd's repositories.json.
#
# Usage: devcluster/scripts/build-addons.sh [--force] [coredns|kueue|jobset ...]   (default: all three)
#        prints the bin dir on the last line. Naming some builds only those: `make prereqs` builds CoreDNS (every
#        cluster needs it), and `make test` builds Kueue and JobSet in the background (nice 19) while the suite runs;
#        the tests' Kueue fixture waits for that build on its lock.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
# shellcheck source=lib-docker.sh
source "$here/lib-docker.sh"   # sets FTC_CACHE, log, dk, ftc_docker_start

want_stamp="COREDNS_VERSION=$COREDNS_VERSION KUEUE_VERSION=$KUEUE_VERSION JOBSET_VERSION=$JOBSET_VERSION"
root="$FTC_CACHE/addons-coredns-$COREDNS_VERSION-kueue-$KUEUE_VERSION-jobset-$JOBSET_VERSION"
bin="$root/bin"
images_json="$root/images.json"
repositories="$FTC_DOCKER_DIR/data/image/overlay2/repositories.json"

# name -> module@version, the main package in it, ldflags, image, entrypoint
declare -A module=(
  [coredns]="github.com/coredns/coredns@$COREDNS_VERSION"
  [kueue]="sigs.k8s.io/kueue@$KUEUE_VERSION"
  [jobset]="sigs.k8s.io/jobset@$JOBSET_VERSION"
)
declare -A pkg=([coredns]=. [kueue]=./cmd/kueue [jobset]=.)
declare -A ldflags=(
  [coredns]="-s -w -X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION"
  [kueue]="-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION"
  [jobset]="-s -w -X sigs.k8s.io/jobset/pkg/version.GitVersion=$JOBSET_VERSION"
)
declare -A image=(
  [coredns]="registry.k8s.io/coredns/coredns:$COREDNS_VERSION"
  [kueue]="registry.k8s.io/kueue/kueue:$KUEUE_VERSION"
  [jobset]="registry.k8s.io/jobset/jobset:$JOBSET_VERSION"
)
declare -A entry=([coredns]=/coredns [kueue]=/manager [jobset]=/manager)
# CoreDNS is built with the plugins a Kubernetes cluster's Corefile uses (kubeadm's default: errors, health, ready,
# kubernetes, prometheus, forward, cache, loop, reload, loadbalance) and the small everyday ones, the way upstream
# documents a custom build: its plugin.cfg trimmed, then `go generate` (core/plugin/zplugin.go,
# core/dnsserver/zdirectives.go) and `go build` in a copy of its tree. Left out: the cloud backends (route53, azure,
# clouddns), etcd, nomad, geoip, dnstap, trace, the DoQ/DoH/gRPC listeners, DNSSEC signing: a third less CPU than
# every plugin (162 against 237 CPU-seconds cold, measured 2026-12-04).
COREDNS_PLUGINS="root metadata cancel timeouts reload bind debug ready health prometheus errors log any chaos
  loadbalance rewrite autopath cache header minimal template hosts k8s_external kubernetes loop forward whoami on"
COREDNS_PLUGINS="$(echo $COREDNS_PLUGINS)"  # one line, single spaces (it is part of the binary's stamp)
all_names=(coredns kueue jobset)
force=""
if [[ "${1:-}" == "--force" ]]; then force=1; shift; fi
if (($#)); then names=("$@"); else names=("${all_names[@]}"); fi
for n in "${names[@]}"; do
  [[ -n "${module[$n]:-}" ]] || { echo "error: unknown add-on '$n' (one of: ${all_names[*]})" >&2; exit 2; }
done

binaries_ok() {
  local n
  for n in "${names[@]}"; do binary_ok "$n" || return 1; done
}

# One binary is current: its stamp names what it was built from (binary_stamp).
binary_ok() {
  [[ -x "$bin/$1" && -f "$bin/$1.stamp" && "$(cat "$bin/$1.stamp")" == "$(binary_stamp "$1")" ]]
}

# What a binary was built from: the pinned module and, for CoreDNS, its plugin list.
binary_stamp() {
  if [[ "$1" == coredns ]]; then echo "${module[$1]} plugins: $COREDNS_PLUGINS"; else echo "${module[$1]}"; fi
}

# A writable copy of CoreDNS's module tree with plugin.cfg trimmed to COREDNS_PLUGINS and the plugin tables
# regenerated (upstream's `go generate coredns.go`); prints the copy's directory.
coredns_tree() {
  local src="$1" tree="$root/src-coredns"
  rm -rf "$tree"
  cp -r "$src" "$tree"
  chmod -R u+w "$tree"
  python3 - "$tree/plugin.cfg" "$COREDNS_PLUGINS" <<'PY'
import sys
path, keep = sys.argv[1], set(sys.argv[2].split())
lines = open(path).read().splitlines()
names = {line.split(":", 1)[0] for line in lines if line.strip() and not line.startswith("#")}
missing = keep - names
if missing:
    sys.exit(f"error: plugin(s) {sorted(missing)} not in CoreDNS's plugin.cfg")
kept = [line for line in lines if not line.strip() or line.startswith("#") or line.split(":", 1)[0] in keep]
open(path, "w").write("\n".join(kept) + "\n")
PY
  (cd "$tree" && go generate coredns.go) >&2
  echo "$tree"
}

# Every image tagged in dockerd with the ID this script recorded (read from dockerd's own tag file: no dockerd needed).
images_ok() {
  [[ -f "$images_json" && -f "$repositories" ]] || return 1
  local n tags=()
  for n in "${names[@]}"; do tags+=("${image[$n]}"); done
  python3 - "$images_json" "$repositories" "${tags[@]}" <<'PY'
import json, sys
recorded = json.load(open(sys.argv[1]))["images"]
tags = {t: i for repo in json.load(open(sys.argv[2])).get("Repositories", {}).values() for t, i in repo.items()}
sys.exit(0 if all(recorded.get(t, {}).get("id") and tags.get(t) == recorded[t]["id"] for t in sys.argv[3:]) else 1)
PY
}

up_to_date() { [[ -z "$force" ]] && binaries_ok && images_ok; }

if up_to_date; then
  echo "add-ons up to date (${names[*]}: $want_stamp)"
  echo "$bin"
  exit 0
fi

# One build at a time (a test session and `make addons-build` may race); re-check after waiting.
mkdir -p "$root"
exec 9>"$root/.lock"
flock 9
if up_to_date; then
  echo "add-ons up to date (${names[*]}: $want_stamp)"
  echo "$bin"
  exit 0
fi

# shellcheck source=lib-go.sh
source "$here/lib-go.sh"
unset GOFLAGS
start=$SECONDS
mkdir -p "$bin"

# --- binaries --------------------------------------------------------------------------------------
declare -A rebuilt=()
if [[ -n "$force" ]] || ! binaries_ok; then
  for n in "${names[@]}"; do
    if [[ -z "$force" ]] && binary_ok "$n"; then continue; fi
    rm -f "$bin/$n.stamp"
    t=$SECONDS
    log "fetching ${module[$n]}"
    if ! dir="$(go mod download -json "${module[$n]}" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')" || [[ ! -d "$dir" ]]; then
      echo "error: could not download ${module[$n]}" >&2
      exit 1
    fi
    tags=""
    if [[ "$n" == coredns ]]; then
      log "CoreDNS with the plugins: $COREDNS_PLUGINS"
      dir="$(coredns_tree "$dir")"
      tags=grpcnotrace  # upstream's Makefile default
    fi
    log "go build ${module[$n]%@*}${pkg[$n]#.} -> $bin/$n (CGO_ENABLED=0; in ${dir})"
    # The build's output to its log, the ticker's lines to the console.
    if ! ticking "building $n" bash -c 'cd "$1" && log="$2" && shift 2 && exec "$@" >"$log" 2>&1' _ "$dir" "$root/build-$n.log" \
        go build -trimpath -tags "$tags" -ldflags "${ldflags[$n]}" -o "$bin/$n.tmp" "${pkg[$n]}"; then
      tail -n 40 "$root/build-$n.log" >&2
      echo "error: go build of ${module[$n]} ${pkg[$n]} failed; full log: $root/build-$n.log" >&2
      exit 1
    fi
    mv "$bin/$n.tmp" "$bin/$n"
    binary_stamp "$n" >"$bin/$n.stamp"
    rebuilt[$n]=1
    log "built $n in $((SECONDS - t)) s ($(($(stat -c %s "$bin/$n") / 1000000)) MB)"
  done
  if [[ -n "${rebuilt[coredns]:-}" ]]; then "$bin/coredns" -version | head -1; fi
fi

# --- images ----------------------------------------------------------------------------------------
ftc_docker_start
work="$(mktemp -d "$root/image.XXXXXX")"
trap 'rm -rf "$work"; ftc_docker_stop' EXIT
recorded() {
  [[ -f "$images_json" ]] || return 1
  python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["images"][sys.argv[2]]["id"])' "$images_json" "$1" 2>/dev/null
}
declare -A ids=()
for n in "${names[@]}"; do
  tag="${image[$n]}"
  have="$(dk image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)"
  if [[ -z "${rebuilt[$n]:-}" && -n "$have" && "$have" == "$(recorded "$tag" || true)" ]]; then
    log "$tag present ($have)"
    ids[$tag]="$have"
    continue
  fi
  r="$work/$n"
  mkdir -p "$r/tmp" "$r/etc/ssl/certs"
  chmod 1777 "$r/tmp"
  cp "$bin/$n" "$r${entry[$n]}"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$r/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$r/etc/group"
  if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then cp /etc/ssl/certs/ca-certificates.crt "$r/etc/ssl/certs/"; fi
  tar -C "$r" --numeric-owner --owner=0 --group=0 -cf "$work/$n.tar" .
  ids[$tag]="$(dk import --change "ENTRYPOINT [\"${entry[$n]}\"]" --change 'USER 65532:65532' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' "$work/$n.tar" "$tag")"
  log "$tag imported (${ids[$tag]:0:19}, $(($(dk image inspect -f '{{.Size}}' "$tag") / 1000000)) MB)"
done
python3 - "$images_json" "${!ids[@]}" -- "${ids[@]}" <<'PY'
import json, os, sys, time
path, args = sys.argv[1], sys.argv[2:]
sep = args.index("--")
tags, ids = args[:sep], args[sep + 1:]
images = json.load(open(path))["images"] if os.path.exists(path) else {}  # the add-ons not built in this call
images.update({t: {"id": i} for t, i in zip(tags, ids)})
json.dump({"images": images, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, open(path + ".tmp", "w"), indent=2)
PY
mv "$images_json.tmp" "$images_json"
trap - EXIT
rm -rf "$work"
ftc_docker_stop
log "add-ons ready in $((SECONDS - start)) s"
echo "$bin"
