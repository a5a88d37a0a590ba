#!/usr/bin/env bash
# Build the local control plane from the Go module proxy and cache the binaries:
#   etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kubelet, kube-proxy, helm
# into ${FTC_CACHE:-~/.cache/ftc}/k8s-$K8S_VERSION/bin/. Versions come from devcluster/scripts/versions.env.
#
# k8s.io/kubernetes cannot be `go install`ed (its go.mod replaces the k8s.io/* staging modules with
# local paths), so the k8s commands are built from a generated wrapper module that requires it and
# replaces every staging module with its published v0.<minor>.<patch>; the list is read from the
# published go.mod. etcd and helm get their own wrapper modules so minimal version selection cannot
# bump the apiserver's dependencies. Wrapper modules live in the cache dir, never in the repo.
#
# A warm call (binaries present and the stamp matches versions.env) returns at once.
# Usage: devcluster/scripts/build-control-plane.sh [--force]     prints the bin dir on the last line.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache_root="${FTC_CACHE:-$HOME/.cache/ftc}"
root="$cache_root/k8s-$K8S_VERSION"
bin="$root/bin"
work="$root/build"
stamp="$bin/.stamp"
binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy helm)
want_stamp="K8S_VERSION=$K8S_VERSION ETCD_VERSION=$ETCD_VERSION HELM_VERSION=$HELM_VERSION"

all_present() {
  for b in "${binaries[@]}"; do [[ -x "$bin/$b" ]] || return 1; done
  [[ -f "$stamp" && "$(cat "$stamp")" == "$want_stamp" ]]
}

if [[ "${1:-}" != "--force" ]] && all_present; then
  echo "control plane binaries up to date ($want_stamp)"
  echo "$bin"
  exit 0
fi

# One build at a time (a test session and `make cluster-build` may race); re-check after waiting.
mkdir -p "$root"
exec 9>"$root/.lock"
flock 9
if [[ "${1:-}" != "--force" ]] && all_present; then
  echo "control plane binaries up to date ($want_stamp)"
  echo "$bin"
  exit 0
fi

# shellcheck source=lib-go.sh
source "$here/lib-go.sh"
export GOFLAGS=-mod=mod
start=$SECONDS
# shellcheck source=lib-progress.sh
source "$here/lib-progress.sh"   # log, ticking
# Run a command quietly in a dir; on failure show its output and stop.
quiet() {
  local dir="$1"; shift
  if ! (cd "$dir" && "$@") >"$dir/output.log" 2>&1; then
    cat "$dir/output.log" >&2
    echo "error: '$*' failed in $dir" >&2
    exit 1
  fi
}

mkdir -p "$bin" "$work"
rm -f "$stamp"

# --- Kubernetes: apiserver, controller-manager, scheduler, kubectl ---------------------------
log "resolving k8s.io/kubernetes@$K8S_VERSION"
k8s_mod="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^\s*"GoMod": "\(.*\)",$/\1/p')"
[[ -f "$k8s_mod" ]] || { echo "error: could not download k8s.io/kubernetes@$K8S_VERSION" >&2; exit 1; }
minor="${K8S_VERSION#v1.}"                 # 34.4
staging_version="v0.$minor"                # v0.34.4
go_directive="$(sed -n 's/^go \(.*\)$/\1/p' "$k8s_mod")"
godebug="$(sed -n 's/^godebug \(.*\)$/\1/p' "$k8s_mod")"
mapfile -t staging < <(sed -n 's#^\s*\(k8s.io/[^ ]*\) => ./staging/src/.*#\1#p' "$k8s_mod")
((${#staging[@]} > 0)) || { echo "error: no staging replaces found in $k8s_mod" >&2; exit 1; }
log "${#staging[@]} staging modules -> $staging_version"

kw="$work/kubernetes"
rm -rf "$kw" && mkdir -p "$kw"
{
  echo "module ftc.local/k8s-wrapper"
  echo
  echo "go $go_directive"
  [[ -n "$godebug" ]] && echo && echo "godebug $godebug"
  echo
  echo "require k8s.io/kubernetes $K8S_VERSION"
  echo
  echo "replace ("
  for m in "${staging[@]}"; do echo "	$m => $m $staging_version"; done
  echo ")"
} >"$kw/go.mod"

k8s_cmds=(k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager
          k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl
          k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy)
log "fetching module graph for ${#k8s_cmds[@]} commands"
quiet "$kw" go get "${k8s_cmds[@]/%/@$K8S_VERSION}"

build_date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
major="${K8S_VERSION#v}"; major="${major%%.*}"
minor_only="${minor%%.*}"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor_only"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
done
# --- etcd and helm: their own wrapper modules, their module graphs fetched first ------------------
ew="$work/etcd"
rm -rf "$ew" && mkdir -p "$ew"
printf 'module ftc.local/etcd-wrapper\n\ngo %s\n' "$go_directive" >"$ew/go.mod"
log "fetching go.etcd.io/etcd/server/v3@$ETCD_VERSION"
quiet "$ew" go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
hw="$work/helm"
rm -rf "$hw" && mkdir -p "$hw"
printf 'module ftc.local/helm-wrapper\n\ngo %s\n' "$go_directive" >"$hw/go.mod"
log "fetching helm.sh/helm/v3@$HELM_VERSION"
quiet "$hw" go get "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"

# --- the three builds side by side: etcd and helm fill the cores the Kubernetes build leaves idle (its links) --
log "go build ${k8s_cmds[*]##*/} (one invocation; the slow part), etcd and helm beside it"
(cd "$ew" && ticking "building etcd" go build -trimpath -ldflags "-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3 \
  && log "etcd built") &
etcd_build=$!
(cd "$hw" && ticking "building helm" go build -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
  -o "$bin/helm" helm.sh/helm/v3/cmd/helm && log "helm built") &
helm_build=$!
k8s_ok=0
(cd "$kw" && ticking "building kubernetes" go build -trimpath -tags selinux,notest -ldflags "$ldflags" -o "$bin/" "${k8s_cmds[@]}") \
  || k8s_ok=$?
etcd_ok=0; wait "$etcd_build" || etcd_ok=$?
helm_ok=0; wait "$helm_build" || helm_ok=$?
if ((k8s_ok || etcd_ok || helm_ok)); then
  echo "error: go build failed (kubernetes: exit $k8s_ok, etcd: exit $etcd_ok, helm: exit $helm_ok); output above" >&2
  exit 1
fi
log "kubernetes commands built"

"$bin/kube-apiserver" --version
"$bin/etcd" --version | head -1
"$bin/helm" version --short
echo "$want_stamp" >"$stamp"
log "control plane built in $((SECONDS - start))s"
echo "$bin"
