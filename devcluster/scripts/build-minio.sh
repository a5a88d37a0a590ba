#!/usr/bin/env bash
# Build the local S3 server, MinIO, from the Go module proxy and cache the binary:
#   ${FTC_CACHE:-~/.cache/ftc}/minio-$MINIO_VERSION/bin/minio. The version comes from devcluster/scripts/versions.env.
#
# MinIO is AGPL-3.0. It is built unmodified from its published module (its go.mod has no replace directives, so a
# plain `go install module@version` works) and only ever runs as its own process (devcluster/servers/s3.py);
# nothing of it is linked into or shipped with ftc. The version ldflags are the ones MinIO's own
# buildscripts/gen-ldflags.go sets, derived from the pseudo-version's commit and time.
#
# A warm call (binary present and the stamp matches versions.env) returns at once.
# Usage: devcluster/scripts/build-minio.sh [--force]     prints the binary's path on the last line.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache_root="${FTC_CACHE:-$HOME/.cache/ftc}"
root="$cache_root/minio-$MINIO_VERSION"
bin="$root/bin"
stamp="$bin/.stamp"
want_stamp="MINIO_VERSION=$MINIO_VERSION"

up_to_date() { [[ -x "$bin/minio" && -f "$stamp" && "$(cat "$stamp")" == "$want_stamp" ]]; }

if [[ "${1:-}" != "--force" ]] && up_to_date; then
  echo "minio up to date ($want_stamp)"
  echo "$bin/minio"
  exit 0
fi

# One build at a time (a test session and `make minio-build` may race); re-check after waiting.
mkdir -p "$root"
exec 9>"$root/.lock"
flock 9
if [[ "${1:-}" != "--force" ]] && up_to_date; then
  echo "minio up to date ($want_stamp)"
  echo "$bin/minio"
  exit 0
fi

# shellcheck source=lib-go.sh
source "$here/lib-go.sh"
# (GOTOOLCHAIN=local there: MinIO's go.mod asks for go1.24.x; the local, newer Go builds it.)
export GOFLAGS=-mod=mod GOBIN="$bin"
start=$SECONDS
# shellcheck source=lib-progress.sh
source "$here/lib-progress.sh"   # log, ticking

mkdir -p "$bin"
rm -f "$stamp"

# The pseudo-version is v0.0.0-YYYYMMDDhhmmss-<12-hex commit>: MinIO's release tag is that time.
ts="${MINIO_VERSION#v0.0.0-}"; ts="${ts%%-*}"
commit="${MINIO_VERSION##*-}"
version="${ts:0:4}-${ts:4:2}-${ts:6:2}T${ts:8:2}:${ts:10:2}:${ts:12:2}Z"
tag="RELEASE.${ts:0:4}-${ts:4:2}-${ts:6:2}T${ts:8:2}-${ts:10:2}-${ts:12:2}Z"
pkg=github.com/minio/minio/cmd
ldflags="-s -w -X $pkg.Version=$version -X $pkg.ReleaseTag=$tag -X $pkg.CommitID=$commit"
ldflags+=" -X $pkg.ShortCommitID=$commit -X $pkg.CopyrightYear=${ts:0:4}"

log "fetching github.com/minio/minio@$MINIO_VERSION and its module graph"
go mod download "github.com/minio/minio@$MINIO_VERSION"
log "go install github.com/minio/minio (the slow part, about 5 CPU-minutes cold)"
ticking "building minio" go install -trimpath -tags kqueue -ldflags "$ldflags" "github.com/minio/minio@$MINIO_VERSION"
"$bin/minio" --version | head -1
echo "$want_stamp" >"$stamp"
log "minio built in $((SECONDS - start))s"
echo "$bin/minio"
