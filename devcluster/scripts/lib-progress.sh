# shellcheck shell=bash
# Timestamped progress for the dev platform's long scripts (sourced, not run): every step of a cold first run prints
# what it does, and a long quiet one (a Go build, an import) says every minute that it is still going.
#
#   source devcluster/scripts/lib-progress.sh
#   log "message"                          # [HH:MM:SS +  12s] message   (seconds since the script started)
#   ticking "building kubernetes" go build ...   # runs the command; "still building kubernetes (60 s)" each minute

_ftc_t0=${_ftc_t0:-$SECONDS}

log() { printf '[%s +%4ds] %s\n' "$(date -u +%H:%M:%S)" "$((SECONDS - _ftc_t0))" "$*"; }

ticking() {
  local what="$1" t=$SECONDS ticker rc=0
  shift
  # The ticker closes the scripts' lock descriptors (8: dockerd, 9: a build's flock): it must never hold a lock.
  ( exec 8>&- 9>&-; s=""; trap 'kill "$s" 2>/dev/null; exit 0' TERM
    while :; do sleep 60 & s=$!; wait "$s"; log "  still $what ($((SECONDS - t)) s)"; done ) &
  ticker=$!
  "$@" || rc=$?
  kill "$ticker" 2>/dev/null || true
  wait "$ticker" 2>/dev/null || true
  return "$rc"
}
