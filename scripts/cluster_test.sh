#!/usr/bin/env bash
# `make cluster-test`: deploy/ (Compose + HAProxy) run here with 3 CPU replicas of jsd:cpu and checked through the
# proxy (scripts/cluster_checks.py; docs/self-hosting.md). Offline, like `make container-test`:
# 1. Docker: the running daemon, or one started here and stopped at the end (scripts/docker_env.sh); Debian's
#    docker-compose (1.29) installed when no Compose is there.
# 2. jsd:cpu: kept when present (`make container-test` builds it), else `scripts/container_test.sh --build-only`.
# 3. The proxy image jsd-cluster-test/haproxy:bookworm: Debian bookworm minbase with Debian's haproxy (2.6), from
#    debootstrap (root file system cached in $JSD_CONTAINER_CACHE); no registry pull. Kept for later runs.
# 4. The checks, one PASS/FAIL line each; the exit status is theirs. Their containers are removed at the end.
#
# Environment: PYTHON (default .venv/bin/python); JSD_CONTAINER_CACHE (default build/container); JSD_SETUP_TIMEOUT
# (seconds the replicas may take to set up, default 600); COMPOSE (default docker-compose); and docker_env.sh's.
set -euo pipefail

cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
cache="${JSD_CONTAINER_CACHE:-build/container}"
proxy_image="jsd-cluster-test/haproxy:bookworm"
proxy_packages="haproxy,ca-certificates"
workdir=""

# shellcheck source=scripts/docker_env.sh
source scripts/docker_env.sh

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [ -n "$workdir" ]; then rm -rf "$workdir"; fi
    stop_started_dockerd
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

started=$(date +%s)
mkdir -p "$cache"
workdir="$(mktemp -d "${TMPDIR:-/tmp}/jsd-cluster-test.XXXXXX")"
[ -x "$python" ] || fail "no Python at $python: run 'make venv' (or set PYTHON)"

# ---- 1. Docker and Compose ---------------------------------------------------------------------------------
docker_ready
compose="${COMPOSE:-docker-compose}"
if [ "$compose" = docker-compose ]; then install_missing docker-compose; fi
leftovers="$("$DOCKER" ps --all --quiet --filter label=com.docker.compose.project=jsd-cluster-test)"
if [ -n "$leftovers" ]; then
    # shellcheck disable=SC2086  # one id per word
    "$DOCKER" rm --force $leftovers > /dev/null || log "could not remove all of an earlier run's containers (see above)"
fi

# ---- 2. jsd:cpu --------------------------------------------------------------------------------------------
if "$DOCKER" image inspect jsd:cpu > /dev/null 2>&1; then
    log "jsd:cpu is there ($("$DOCKER" image inspect --format '{{.Created}}' jsd:cpu)): kept"
else
    log "no jsd:cpu: building it (scripts/container_test.sh --build-only)"
    DOCKER="$DOCKER" scripts/container_test.sh --build-only
fi

# ---- 3. the proxy image ------------------------------------------------------------------------------------
step=$(date +%s)
if ! "$DOCKER" image inspect "$proxy_image" > /dev/null 2>&1; then
    debootstrap_image "$proxy_packages" "$proxy_image" "$workdir"
fi
log "proxy image $proxy_image ready in $(since "$step") s: $("$DOCKER" run --rm --network none "$proxy_image" haproxy -v | sed -n 1p)"

# ---- 4. the checks -----------------------------------------------------------------------------------------
step=$(date +%s)
checks=0
"$python" scripts/cluster_checks.py --image jsd:cpu --proxy-image "$proxy_image" --docker "$DOCKER" \
    --compose "$compose" --python "$python" --setup-timeout "${JSD_SETUP_TIMEOUT:-600}" || checks=$?
log "checks in $(since "$step") s; cluster-test in total $(since "$started") s"
exit "$checks"
