# shellcheck shell=bash
# Shared by build-images.sh and load-images.sh (sourced, not run): a private dockerd under
# ${FTC_CACHE:-~/.cache/ftc}/docker that never touches the host's iptables or forwarding (the local
# cluster's CNI and kube-proxy own those), and `dk`, the Docker CLI talking to it.
#
# /usr/bin/docker (Debian's docker.io) is always used: the /usr/local/bin/docker 28.x CLI first on PATH on
# these machines has no buildx and fails with BuildKit.
#
#   source devcluster/scripts/lib-docker.sh
#   ftc_docker_start        # starts dockerd unless ours already answers; stops it at exit if it started it
#   dk build ...            # /usr/bin/docker -H unix://$FTC_DOCKER_SOCK with DOCKER_BUILDKIT=1

FTC_CACHE="${FTC_CACHE:-$HOME/.cache/ftc}"
FTC_DOCKER_DIR="$FTC_CACHE/docker"
FTC_DOCKER_SOCK="$FTC_DOCKER_DIR/docker.sock"
FTC_DOCKER_BIN=/usr/bin/docker
FTC_DOCKERD_BIN=/usr/sbin/dockerd
_ftc_dockerd_pid=""
# shellcheck source=lib-progress.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib-progress.sh"   # log, ticking

dk() { DOCKER_BUILDKIT=1 "$FTC_DOCKER_BIN" -H "unix://$FTC_DOCKER_SOCK" "$@"; }

_ftc_docker_alive() { dk version >/dev/null 2>&1; }

# Serialise our scripts (a build and a load, or two builds) on one lock for the whole run, so one never
# stops the dockerd another is using.
ftc_docker_lock() {
  mkdir -p "$FTC_DOCKER_DIR"
  exec 8>"$FTC_DOCKER_DIR/.lock"
  if ! flock -n 8; then
    log "waiting for another build/load using $FTC_DOCKER_DIR"
    flock 8
  fi
}

ftc_docker_stop() {
  [[ -n "$_ftc_dockerd_pid" ]] || return 0
  local pid="$_ftc_dockerd_pid"
  _ftc_dockerd_pid=""
  kill -TERM "$pid" 2>/dev/null || return 0
  local i
  for i in $(seq 1 150); do
    kill -0 "$pid" 2>/dev/null || { log "dockerd stopped"; return 0; }
    sleep 0.2
  done
  log "dockerd did not stop in 30 s; killing it"
  kill -KILL "$pid" 2>/dev/null || true
}

ftc_docker_start() {
  ftc_docker_lock
  for b in "$FTC_DOCKER_BIN" "$FTC_DOCKERD_BIN"; do
    [[ -x "$b" ]] || { echo "error: $b missing (run devcluster/scripts/install-system-deps.sh: docker.io)" >&2; return 1; }
  done
  if _ftc_docker_alive; then
    log "using the running dockerd at $FTC_DOCKER_SOCK"
    return 0
  fi
  # A stale pidfile from a killed run makes dockerd refuse to start; the process it names is gone (we
  # hold the lock and the socket does not answer), but only remove it when that pid is not a dockerd.
  local pidfile="$FTC_DOCKER_DIR/docker.pid"
  if [[ -f "$pidfile" ]]; then
    local old
    old="$(cat "$pidfile" 2>/dev/null || true)"
    if [[ -n "$old" ]] && [[ "$(cat "/proc/$old/comm" 2>/dev/null || true)" == dockerd ]]; then
      echo "error: dockerd $old owns $pidfile but $FTC_DOCKER_SOCK does not answer; see $FTC_DOCKER_DIR/dockerd.log" >&2
      return 1
    fi
    rm -f "$pidfile"
  fi
  rm -f "$FTC_DOCKER_SOCK"
  mkdir -p "$FTC_DOCKER_DIR/data" "$FTC_DOCKER_DIR/exec"
  log "starting dockerd (data root $FTC_DOCKER_DIR/data)"
  "$FTC_DOCKERD_BIN" \
    --data-root "$FTC_DOCKER_DIR/data" \
    --exec-root "$FTC_DOCKER_DIR/exec" \
    --pidfile "$pidfile" \
    -H "unix://$FTC_DOCKER_SOCK" \
    --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false --bridge=none \
    8>&- >>"$FTC_DOCKER_DIR/dockerd.log" 2>&1 &
  _ftc_dockerd_pid=$!
  trap ftc_docker_stop EXIT
  local i
  for i in $(seq 1 300); do
    if _ftc_docker_alive; then
      log "dockerd ready (pid $_ftc_dockerd_pid)"
      return 0
    fi
    if ! kill -0 "$_ftc_dockerd_pid" 2>/dev/null; then
      _ftc_dockerd_pid=""
      tail -n 30 "$FTC_DOCKER_DIR/dockerd.log" >&2
      echo "error: dockerd exited during start; log: $FTC_DOCKER_DIR/dockerd.log" >&2
      return 1
    fi
    sleep 0.2
  done
  tail -n 30 "$FTC_DOCKER_DIR/dockerd.log" >&2
  echo "error: dockerd did not answer on $FTC_DOCKER_SOCK within 60 s" >&2
  return 1
}
