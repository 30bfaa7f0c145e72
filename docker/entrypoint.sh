#!/bin/sh
# deltaserve's container entrypoint: check what the server needs, then exec it.
#   deltaserve-entrypoint serve [FLAGS...]      (the default CMD)
#   deltaserve-entrypoint loadtest --url ...     (any other deltaserve subcommand)
#   deltaserve-entrypoint sh                     (anything else runs as given)
set -eu

DELTASERVE_STORE="${DELTASERVE_STORE:-/data/deltas}"
DELTASERVE_CACHE="${DELTASERVE_CACHE:-/data/cache}"
export DELTASERVE_STORE DELTASERVE_CACHE

fail() { echo "deltaserve-entrypoint: $*" >&2; exit 64; }

case "${1:-serve}" in
  serve)
    for dir in "$DELTASERVE_STORE" "$DELTASERVE_CACHE"; do
      mkdir -p "$dir" 2>/dev/null || fail "cannot create $dir (mount a writable volume there)"
      [ -w "$dir" ] || fail "$dir is not writable by uid $(id -u) (chown the volume to it)"
    done
    if [ -n "${DELTASERVE_ADMIN_TOKEN_FILE:-}" ]; then
      [ -r "$DELTASERVE_ADMIN_TOKEN_FILE" ] || fail "cannot read $DELTASERVE_ADMIN_TOKEN_FILE"
    elif [ -z "${DELTASERVE_ADMIN_TOKEN:-}" ]; then
      echo "deltaserve-entrypoint: DELTASERVE_ADMIN_TOKEN is not set: the admin API is off" >&2
    elif [ "${#DELTASERVE_ADMIN_TOKEN}" -lt 8 ]; then
      fail "DELTASERVE_ADMIN_TOKEN must be at least 8 characters"
    fi
    [ "$#" -gt 0 ] && shift
    exec deltaserve serve "$@"
    ;;
  compress|inspect|recommend|materialize|loadtest)
    exec deltaserve "$@"
    ;;
  *)
    exec "$@"
    ;;
esac
