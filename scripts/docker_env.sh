# shellcheck shell=bash
# Shared by scripts/container_test.sh and scripts/cluster_test.sh (sourced, not run): the Docker client and daemon,
# Debian packages when missing, and debootstrap base images, all offline-friendly (see docs/container.md).
#
# The sourcing script sets `cache` (a folder for logs and root file systems) and calls `stop_started_dockerd` in
# its cleanup. After `docker_ready`, $DOCKER is the client that talks to a running daemon.
#
# Environment: DOCKER (the docker CLI; default: the first client that can build with BuildKit, see choose_docker);
# JSD_ENGINE_DOCKER (the engine's own client, default /usr/bin/docker, Debian's docker.io);
# JSD_DOCKER_STORAGE_DRIVER (for a dockerd started here, default vfs).

started_dockerd=""
# This folder, absolute: the sourcing script may change directory later.
scripts_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() { printf '==> %s\n' "$*" >&2; }
fail() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}
since() { echo $(($(date +%s) - $1)); }
show_log() { tail -n "${2:-30}" "$1" | sed 's/^/    /' >&2; }

# Whether the docker client $1 can run `DOCKER_BUILDKIT=1 docker build`. The Dockerfile needs BuildKit (RUN
# --mount). Clients before Docker 23 (Debian bookworm's docker.io: 20.10) run BuildKit themselves; from 23 on,
# `docker build` with DOCKER_BUILDKIT=1 is handed to the buildx plugin, and without it stops at once with
# "BuildKit is enabled but the buildx component is missing or broken" (docker/cli, cmd/docker/builder.go,
# processBuilder). Neither test needs a daemon.
can_buildkit() {
    "$1" buildx version > /dev/null 2>&1 && return 0
    local version
    version="$("$1" --version 2> /dev/null | sed -n 's/^Docker version \([0-9][0-9]*\)\..*/\1/p')"
    [ -n "$version" ] && [ "$version" -lt 23 ]
}

# Print the docker client to use: $DOCKER when set (and able), else the first able one of the engine's own
# client ($JSD_ENGINE_DOCKER, default /usr/bin/docker) and each `docker` on PATH. Status 1, with the reason on
# stderr, when none is able: run it again after installing the engine, never keep an earlier answer.
choose_docker() {
    local candidates=() candidate
    if [ -n "${DOCKER:-}" ]; then
        candidates=("$DOCKER")
    else
        candidates=("${JSD_ENGINE_DOCKER:-/usr/bin/docker}")
        while IFS= read -r candidate; do candidates+=("$candidate"); done < <(type -ap docker)
    fi
    for candidate in "${candidates[@]}"; do
        if [ -x "$candidate" ] && can_buildkit "$candidate"; then
            echo "$candidate"
            return 0
        fi
    done
    printf 'no docker client here can build with BuildKit (tried: %s): Docker 23+ needs the buildx plugin,' \
        "${candidates[*]}" >&2
    printf ' or install Debian'"'"'s docker.io (its 20.10 client needs none)%s\n' \
        "${DOCKER:+; or unset DOCKER}" >&2
    return 1
}

# Debian packages for the commands named, when missing (needs root: scripts/apt_install.sh).
install_missing() {
    local packages=()
    for cmd in "$@"; do
        if ! command -v "$cmd" > /dev/null; then
            case "$cmd" in dockerd) packages+=(docker.io) ;; *) packages+=("$cmd") ;; esac
        fi
    done
    [ ${#packages[@]} -gt 0 ] || return 0
    [ "$(id -u)" = 0 ] || fail "${packages[*]} missing, and installing them needs root: apt-get install ${packages[*]}"
    log "installing ${packages[*]} (apt-get)"
    if ! "$scripts_dir/apt_install.sh" "${packages[@]}" > "$cache/apt.log" 2>&1; then
        show_log "$cache/apt.log"
        fail "apt-get install ${packages[*]} failed (log: $cache/apt.log)"
    fi
}

# Start dockerd in the background (vfs: works inside a container; no bridge: builds and checks need no NAT) and
# wait for it to answer; stop_started_dockerd stops it.
start_dockerd() {
    local driver="${JSD_DOCKER_STORAGE_DRIVER:-vfs}" root=/var/lib/docker
    # BuildKit's cache (ROOT/buildkit) outlives a change of storage driver and then names layers the new
    # driver lacks ("failed to prepare ...: stat /var/lib/docker/vfs/dir/...: no such file"): one root each.
    if [ "$driver" != vfs ]; then root="/var/lib/docker-$driver"; fi
    log "starting dockerd ($driver storage in $root, no bridge network; log: $cache/dockerd.log)"
    dockerd --storage-driver="$driver" --data-root="$root" --iptables=false --ip-masq=false --bridge=none \
        > "$cache/dockerd.log" 2>&1 &
    started_dockerd=$!
    for _ in $(seq 120); do
        "$DOCKER" info > /dev/null 2>&1 && return 0
        if ! kill -0 "$started_dockerd" 2> /dev/null; then
            started_dockerd=""
            show_log "$cache/dockerd.log" 15
            fail "dockerd exited before it answered (log above, in full: $cache/dockerd.log)"
        fi
        sleep 0.5
    done
    show_log "$cache/dockerd.log" 15
    fail "dockerd did not answer within 60 s (log: $cache/dockerd.log)"
}

stop_started_dockerd() {
    [ -n "$started_dockerd" ] || return 0
    log "stopping the dockerd this script started (pid $started_dockerd)"
    kill "$started_dockerd" 2> /dev/null || true
    for _ in $(seq 60); do
        kill -0 "$started_dockerd" 2> /dev/null || break
        sleep 0.5
    done
    if kill -0 "$started_dockerd" 2> /dev/null; then
        log "dockerd (pid $started_dockerd) did not stop within 30 s: killing it"
        kill -9 "$started_dockerd" 2> /dev/null || true
    fi
    started_dockerd=""
}

# Set DOCKER to a client talking to a daemon: the running one, or one started here (Debian's docker.io installed
# first when missing). The client is chosen again once the engine is installed: a bare machine may hold only a
# client that cannot build (Docker 28 without buildx), and docker.io brings its own.
docker_ready() {
    local client
    client="$(choose_docker 2> /dev/null || true)"
    if [ -n "$client" ] && "$client" info > /dev/null 2>&1; then
        DOCKER="$client"
        log "using the running Docker daemon ($DOCKER)"
    else
        install_missing dockerd
        DOCKER="$(choose_docker)" || fail "no docker client that can build this Dockerfile (reason above)"
        if "$DOCKER" info > /dev/null 2>&1; then
            log "using the running Docker daemon ($DOCKER)"
        else
            start_dockerd
        fi
    fi
    export DOCKER
}

# Import a Debian bookworm minbase root file system with the packages $1 (comma-separated, debootstrap's
# --include) as the image $2. The root file system is made once and kept in $cache as a tar (about 1.5 min and
# 275 MB with Python); later runs only import it. $3: a scratch folder for debootstrap.
debootstrap_image() {
    local packages="$1" image="$2" scratch="$3" tarball logfile
    tarball="$cache/base-bookworm-minbase-$(echo "$packages" | sha256sum | cut -c1-12).tar"
    logfile="${tarball%.tar}.debootstrap.log"
    if [ ! -f "$tarball" ]; then
        install_missing debootstrap
        log "debootstrap bookworm minbase with $packages (about 1.5 min; log: $logfile)"
        rm -rf "$scratch/rootfs"
        if ! debootstrap --variant=minbase --include="$packages" bookworm "$scratch/rootfs" > "$logfile" 2>&1; then
            show_log "$logfile"
            fail "debootstrap failed (log: $logfile)"
        fi
        tar -C "$scratch/rootfs" -cf "$tarball.tmp" .
        mv "$tarball.tmp" "$tarball"
        rm -rf "$scratch/rootfs"
    fi
    "$DOCKER" import "$tarball" "$image" > /dev/null
    log "image $image from $tarball"
}
