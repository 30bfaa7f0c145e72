#!/bin/sh
# Build the image and run it for real: start it, wait for /ready, answer a
# completion and an admin upload through the published port, then bring up the
# compose stack (server + Prometheus) and see Prometheus scrape /metrics. Stops and
# removes everything it started. Needs a Docker engine with BuildKit, curl, python3.
#   docker/check.sh
# Settings (environment):
#   PYTHON_IMAGE      base image (default: the Dockerfile's python:3.11-slim-bookworm)
#   PROMETHEUS_IMAGE  Prometheus image for the compose stack (default: compose.yaml's)
#   TORCH_INDEX_URL   where pip finds torch's CPU wheel (default: the Dockerfile's)
#   TORCH_WHEELS      a directory of wheels (torch and its dependencies) served as
#                     that index from 127.0.0.1 for the build instead
#   CA_BUNDLE         a CA bundle for a TLS-intercepting proxy: a build secret, and
#                     mounted into the containers for their first-start pip download
#   DOCKER            docker client (default docker); COMPOSE (default: docker compose)
#   PORT, PROM_PORT   host ports (default 18000, 19090)
#   NO_CACHE=1        build without the build cache (the time of a first build)
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DOCKER="${DOCKER:-docker}"
COMPOSE="${COMPOSE:-docker compose}"
IMAGE="${IMAGE:-deltaserve:check}"
PORT="${PORT:-18000}"
PROM_PORT="${PROM_PORT:-19090}"
TOKEN="check-token-$$-$(date +%s)"
NAME="deltaserve-check-$$"
PROJECT="deltaserve-check-$$"
WORK=$(mktemp -d)
COMPOSE_FILES=""
INDEX_PID=""

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
fail() { log "FAIL: $*"; exit 1; }
now() { date +%s; }

compose() {
  # shellcheck disable=SC2086  # COMPOSE is a command and its leading words
  env DELTASERVE_ADMIN_TOKEN="$TOKEN" DELTASERVE_IMAGE="$IMAGE" DELTASERVE_HOST_PORT="$PORT" \
    PROMETHEUS_HOST_PORT="$PROM_PORT" ${PROMETHEUS_IMAGE:+"PROMETHEUS_IMAGE=$PROMETHEUS_IMAGE"} \
    $COMPOSE -p "$PROJECT" -f "$ROOT/docker/compose.yaml" $COMPOSE_FILES "$@"
}

cleanup() {
  set +e
  "$DOCKER" rm -f "$NAME" > /dev/null 2>&1
  "$DOCKER" volume rm "$NAME-deltas" "$NAME-cache" > /dev/null 2>&1
  [ -f "$WORK/compose-up" ] && compose down -v > /dev/null 2>&1
  [ -n "$INDEX_PID" ] && kill "$INDEX_PID" 2> /dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_for URL SECONDS: poll until URL answers 2xx
wait_for() {
  deadline=$(($(now) + $2))
  until curl -sf -o /dev/null "$1"; do
    [ "$(now)" -lt "$deadline" ] || return 1
    sleep 1
  done
}

# ---------------------------------------------------------------- build
set -- --build-arg "TORCH=cpu"
[ -n "${PYTHON_IMAGE:-}" ] && set -- "$@" --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE"
[ -n "${CA_BUNDLE:-}" ] && set -- "$@" --secret "id=ca,src=$CA_BUNDLE"
[ "${NO_CACHE:-0}" = 1 ] && set -- "$@" --no-cache
if [ -n "${TORCH_WHEELS:-}" ]; then
  # a PEP 503 index: one directory per normalized project name, served as listings
  mkdir -p "$WORK/index"
  for whl in "$TORCH_WHEELS"/*.whl; do
    project=$(basename "$whl" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')
    mkdir -p "$WORK/index/$project"
    ln -s "$(readlink -f "$whl")" "$WORK/index/$project/"
  done
  python3 -m http.server 18999 --bind 127.0.0.1 --directory "$WORK/index" > /dev/null 2>&1 &
  INDEX_PID=$!
  TORCH_INDEX_URL="http://127.0.0.1:18999/"
  set -- "$@" --network host
fi
[ -n "${TORCH_INDEX_URL:-}" ] && set -- "$@" --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL"

log "build $IMAGE (base ${PYTHON_IMAGE:-the Dockerfile default})"
t0=$(now)
DOCKER_BUILDKIT=1 "$DOCKER" build --progress plain -t "$IMAGE" "$@" "$ROOT" > "$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log"; fail "docker build"; }
size=$("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE")
log "built in $(($(now) - t0)) s; image size $((size / 1000000)) MB"

# ---------------------------------------------------------------- run
set --
if [ -n "${CA_BUNDLE:-}" ]; then  # the first start pip-downloads the embedded base
  set -- -v "$CA_BUNDLE:/etc/deltaserve/ca.crt:ro" -e PIP_CERT=/etc/deltaserve/ca.crt
fi
t0=$(now)
"$DOCKER" run -d --name "$NAME" -p "127.0.0.1:$PORT:8000" -e "DELTASERVE_ADMIN_TOKEN=$TOKEN" \
  -v "$NAME-deltas:/data/deltas" -v "$NAME-cache:/data/cache" "$@" "$IMAGE" > /dev/null
wait_for "http://127.0.0.1:$PORT/health" 120 || { "$DOCKER" logs "$NAME" | tail -30; fail "/health"; }
log "/health answers after $(($(now) - t0)) s"
wait_for "http://127.0.0.1:$PORT/ready" 900 || { "$DOCKER" logs "$NAME" | tail -30; fail "/ready"; }
log "/ready after $(($(now) - t0)) s (first start: the embedded base fetched into the cache volume)"
models() { curl -sf "http://127.0.0.1:$PORT/v1/models" | python3 -c 'import json, sys; print(" ".join(m["id"] for m in json.load(sys.stdin)["data"]))'; }
deadline=$(($(now) + 60))
until models | grep -qw topic; do  # the shipped demos join a moment after the base
  [ "$(now)" -lt "$deadline" ] || fail "the demos never joined /v1/models: $(models)"
  sleep 1
done
log "models after $(($(now) - t0)) s: $(models)"

chat() {  # chat MODEL PROMPT: print the completion's text
  curl -sf "http://127.0.0.1:$PORT/v1/chat/completions" -H 'content-type: application/json' \
    -d "{\"model\": \"$1\", \"messages\": [{\"role\": \"user\", \"content\": \"$2\"}], \"temperature\": 0, \"max_tokens\": 32}" \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"])'
}
answer=$(chat SmolLM2-135M-Instruct "What is the capital of France?") || fail "completion"
log "completion (base): $answer"

delta=$(ls "$ROOT"/deltastore/data/demos/json-extract-*.delta.safetensors)
code=$(curl -s -o "$WORK/upload.json" -w '%{http_code}' -H "Authorization: Bearer $TOKEN" \
  --data-binary "@$delta" "http://127.0.0.1:$PORT/admin/deltas?name=uploaded-extract")
[ "$code" = 201 ] || [ "$code" = 200 ] || { cat "$WORK/upload.json"; fail "admin upload: HTTP $code"; }
log "admin upload: HTTP $code, $(($(wc -c < "$delta") / 1000)) kB as uploaded-extract"
answer=$(chat uploaded-extract "Extract name, age and city as JSON: Nora is a 41-year-old pilot who lives in Oslo.") \
  || fail "completion on the uploaded variant"
log "completion (uploaded-extract): $answer"
code=$(curl -s -o /dev/null -w '%{http_code}' --data-binary "@$delta" \
  "http://127.0.0.1:$PORT/admin/deltas?name=no-token")
[ "$code" = 401 ] || fail "upload without the token: HTTP $code, not 401"
log "admin upload without the token: HTTP 401"
health=$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$NAME")
log "container user $("$DOCKER" exec "$NAME" id -u), HEALTHCHECK status: $health"
"$DOCKER" rm -f "$NAME" > /dev/null

# ---------------------------------------------------------------- compose
log "compose up (deltaserve + Prometheus)"
: > "$WORK/compose-up"
if [ -n "${CA_BUNDLE:-}" ]; then
  cat > "$WORK/ca.yaml" << YAML
services:
  deltaserve:
    environment:
      PIP_CERT: /etc/deltaserve/ca.crt
    volumes:
      - $CA_BUNDLE:/etc/deltaserve/ca.crt:ro
YAML
  COMPOSE_FILES="-f $WORK/ca.yaml"
fi
t0=$(now)
compose up -d --no-build deltaserve prometheus > "$WORK/compose.log" 2>&1 \
  || { cat "$WORK/compose.log"; fail "compose up"; }
wait_for "http://127.0.0.1:$PORT/ready" 900 || { compose logs --tail 30; fail "/ready under compose"; }
log "compose: /ready after $(($(now) - t0)) s"
curl -sf "http://127.0.0.1:$PORT/v1/chat/completions" -H 'content-type: application/json' -o /dev/null \
  -d '{"model": "topic", "messages": [{"role": "user", "content": "Sentence: It rained all day. Topic:"}], "max_tokens": 4}' \
  || fail "completion under compose"
query() {  # query PROMQL: the first sample's value, or nothing
  curl -sf -G "http://127.0.0.1:$PROM_PORT/api/v1/query" --data-urlencode "query=$1" \
    | python3 -c 'import json, sys; r = json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")'
}
deadline=$(($(now) + 120))
until [ "$(query 'up{job="deltaserve"}' 2> /dev/null)" = 1 ] \
  && [ -n "$(query 'deltaserve_requests_total' 2> /dev/null)" ]; do
  [ "$(now)" -lt "$deadline" ] || { compose logs --tail 20 prometheus; fail "Prometheus never scraped deltaserve"; }
  sleep 2
done
log "Prometheus: up{job=\"deltaserve\"} = 1; $(query 'count({__name__=~"deltaserve_.+"})') deltaserve_* series; requests_total = $(query 'sum(deltaserve_requests_total)')"
compose down -v > /dev/null 2>&1
rm -f "$WORK/compose-up"
log "compose down; all passed"
