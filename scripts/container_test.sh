#!/usr/bin/env bash
# `make container-test`: build the image from the root Dockerfile, CPU variant, offline, with a tiny seeded
# checkpoint baked in, tag it jsd:cpu, and check the running container (scripts/container_checks.py).
# `make container-test-cuda`: the same with PyPI's own torch (the CUDA build, its nvidia-* wheels and all),
# tagged jsd:cuda, and the checks that need no GPU (torch's CUDA and cuDNN versions, READY, a prediction).
#
#   scripts/container_test.sh            # jsd:cpu
#   scripts/container_test.sh --cuda     # jsd:cuda (about 9 GB; not run in CI)
#
# 1. Docker: the running daemon, or else `dockerd --storage-driver=vfs --iptables=false --ip-masq=false
#    --bridge=none` started here (Debian's docker.io installed first when missing) and stopped at the end;
#    JSD_DOCKER_STORAGE_DRIVER=overlay2 where the host file system allows it (vfs copies every layer whole:
#    the CUDA image would take several times its 5.7 GB), with its data in /var/lib/docker-overlay2.
#    A daemon that cannot start is a failure, with its log; never a skip.
# 2. Base image: Debian bookworm minbase with Python 3.11, venv and tini, from debootstrap (its root file
#    system is cached in $JSD_CONTAINER_CACHE, so later runs skip it), imported as a temporary image.
# 3. Wheelhouse: `pip download` on this host of requirements.txt and cog (cog.yaml's build.sdk_version), the
#    CPU torch included, imported as a temporary image: the build runs with --network none. With --cuda, pip
#    reads no configuration file and no find-links, extra index or constraints from the environment (they may
#    point at a local CPU wheel), so torch is PyPI's CUDA build; its 2.7 GB of wheels are kept in
#    $JSD_CONTAINER_CACHE/wheelhouse-cuda (later runs download only what changed).
# 4. Build context: the repository's files (git ls-files) plus a checkpoint in weights/: the committed toy one
#    (toy/weights, a toy model of shapes), else a tiny one (rinna's tokenizer from $JSD_SHARED when it is there). The weights/ of this checkout is never read or touched.
# 5. `docker build` → jsd:cpu (jsd:cuda); a previous image of that tag is replaced; its layers are logged.
# 6. The container checks, one PASS/FAIL line each; the exit status is theirs.
# It leaves one image, jsd:cpu (jsd:cuda): the temporary images, the check containers and dangling build cache go.
#
#   scripts/container_test.sh --build-only    # jsd:cpu without the checks (scripts/cluster_test.sh builds with it)
#   scripts/container_test.sh --pick-docker   # only print the docker client it would use (exit 1: none fits)
#
# Environment: PYTHON (default .venv/bin/python); DOCKER (the docker CLI; default: the first client that can
# build with BuildKit, see choose_docker); JSD_ENGINE_DOCKER (the engine's own client, default /usr/bin/docker,
# Debian's docker.io); JSD_SHARED (default ../shared); JSD_CONTAINER_CACHE (default build/container: logs, the
# base root file system); JSD_SETUP_TIMEOUT (seconds each container may take to set up, default 300);
# JSD_DOCKER_STORAGE_DRIVER (for a dockerd started here, default vfs).
set -euo pipefail

cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
cache="${JSD_CONTAINER_CACHE:-build/container}"
shared="${JSD_SHARED:-../shared}"
variant=cpu
base_image="jsd-container-test/base:bookworm"
wheelhouse_image="jsd-container-test/wheelhouse:latest"
base_packages="python3,python3-venv,ca-certificates,tini"
build_only=""

# shellcheck source=scripts/docker_env.sh
source scripts/docker_env.sh

case "${1:-}" in
    --pick-docker)
        choose_docker
        exit
        ;;
    --cuda) variant=cuda ;;
    --build-only) build_only=1 ;;
    "") ;;
    *) fail "unknown argument $1 (usage: scripts/container_test.sh [--cuda | --build-only | --pick-docker])" ;;
esac
image="jsd:$variant"

started=$(date +%s)
workdir=""

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [ -n "${DOCKER:-}" ] && "$DOCKER" info > /dev/null 2>&1; then
        "$DOCKER" rmi "$base_image" "$wheelhouse_image" > /dev/null 2>&1 || true
        "$DOCKER" builder prune --force > /dev/null 2>&1 || true
    fi
    if [ -n "$workdir" ]; then rm -rf "$workdir"; fi
    stop_started_dockerd
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$cache"
workdir="$(mktemp -d "${TMPDIR:-/tmp}/jsd-container-test.XXXXXX")"
[ -x "$python" ] || fail "no Python at $python: run 'make venv' (or set PYTHON)"
git rev-parse --show-toplevel > /dev/null 2>&1 || fail "the build context comes from git ls-files: run this in a git checkout"

# ---- 1. the Docker daemon ---------------------------------------------------------------------------------
step=$(date +%s)
docker_ready
# Leftovers of an interrupted earlier run.
leftovers="$("$DOCKER" ps --all --quiet --filter name=jsd-check-)"
if [ -n "$leftovers" ]; then
    # shellcheck disable=SC2086  # one id per word
    "$DOCKER" rm --force $leftovers > /dev/null
fi
"$DOCKER" rmi "$base_image" "$wheelhouse_image" > /dev/null 2>&1 || true
log "docker ready in $(since "$step") s: $("$DOCKER" version --format 'client {{.Client.Version}}, server {{.Server.Version}}')"

# ---- 2. the base image -------------------------------------------------------------------------------------
step=$(date +%s)
debootstrap_image "$base_packages" "$base_image" "$workdir"
log "base image $base_image in $(since "$step") s"

# ---- 3. the wheelhouse -------------------------------------------------------------------------------------
step=$(date +%s)
# The same expression the Dockerfile reads cog's version with.
cog_version="$(sed -n 's/^ *sdk_version: *"\{0,1\}\([^"# ]*\)"\{0,1\}.*$/\1/p' cog.yaml)"
[ -n "$cog_version" ] || fail "cog.yaml has no build.sdk_version (the cog version the image installs)"
wheelhouse="$workdir/wheelhouse"
pip_env=()
if [ "$variant" = cuda ]; then
    # PyPI's torch==X is the CUDA build (PyPI takes no +cpu/+cuXXX local versions); this host's pip settings
    # (pip.conf, PIP_FIND_LINKS...) may offer a CPU wheel of the same version instead.
    wheelhouse="$cache/wheelhouse-cuda"
    pip_env=(env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT -u PIP_NO_INDEX PIP_CONFIG_FILE=/dev/null)
fi
log "pip download → $wheelhouse (log: $cache/pip-download.log)"
if ! ${pip_env[@]+"${pip_env[@]}"} "$python" -m pip download --disable-pip-version-check --only-binary=:all: \
    -d "$wheelhouse" -r requirements.txt "cog==$cog_version" > "$cache/pip-download.log" 2>&1; then
    show_log "$cache/pip-download.log"
    fail "pip download failed (log: $cache/pip-download.log)"
fi
torch_version="$(sed -n 's/^torch==//p' requirements.txt)"
torch_wheel="$(cd "$wheelhouse" && ls torch-"$torch_version"-*.whl torch-"$torch_version"+*.whl 2> /dev/null || true)"
[ -n "$torch_wheel" ] || fail "pip downloaded no torch $torch_version wheel into $wheelhouse"
# The CUDA version torch was built for (torch/version.py's `cuda`: None for the CPU build).
torch_cuda="$("$python" -c 'import re, sys, zipfile
text = zipfile.ZipFile(sys.argv[1]).read("torch/version.py").decode()
print(re.search(r"^cuda\b.*= *(.*)$", text, re.M).group(1).strip("\x27\x22").replace("None", ""))' \
    "$wheelhouse/$torch_wheel")"
case "$variant:$torch_cuda" in
    cpu:) ;;
    cpu:*) fail "pip downloaded $torch_wheel (CUDA $torch_cuda), not torch's CPU build (it would pull GBs of CUDA" \
        "wheels): let pip see https://download.pytorch.org/whl/cpu (PIP_EXTRA_INDEX_URL) or a folder holding the" \
        "CPU wheel (PIP_FIND_LINKS)" ;;
    cuda:) fail "pip downloaded $torch_wheel, a build without CUDA: a PIP_INDEX_URL that is not PyPI?" ;;
    cuda:*) ;;
esac
tar -C "$wheelhouse" -c . | "$DOCKER" import - "$wheelhouse_image" > /dev/null
log "wheelhouse $wheelhouse_image in $(since "$step") s: $(find "$wheelhouse" -name '*.whl' | wc -l) wheels" \
    "($(du -sh "$wheelhouse" | cut -f1)), $torch_wheel (CUDA ${torch_cuda:-none}), cog $cog_version"

# ---- 4. the build context with a tiny checkpoint -----------------------------------------------------------
step=$(date +%s)
mkdir "$workdir/context"
git ls-files -z --cached --others --exclude-standard \
    | tar --null --ignore-failed-read -T - -cf - 2> /dev/null | tar -xf - -C "$workdir/context"
if [ -f toy/weights/manifest.json ]; then
    # the committed toy checkpoint (a toy model of shapes, docs/toy-world.md): the container draws something
    weights_command=("$python" scripts/download_weights.py --toy --dest "$workdir/context/weights")
else
    tokenizer="$shared/data/tokenizer/google_sp.model"
    weights_command=("$python" scripts/make_tiny_weights.py "$workdir/context/weights")
    if [ -f "$tokenizer" ]; then
        weights_command+=(--tokenizer "$tokenizer")
    else
        log "rinna's tokenizer is not at $tokenizer: the tiny checkpoint trains its own"
    fi
fi
if ! "${weights_command[@]}" > "$cache/tiny-weights.log" 2>&1; then
    show_log "$cache/tiny-weights.log"
    fail "${weights_command[1]} failed (log: $cache/tiny-weights.log)"
fi
log "build context with a ${weights_command[1]##*/} checkpoint in $(since "$step") s"

# ---- 5. the image ------------------------------------------------------------------------------------------
step=$(date +%s)
previous="$("$DOCKER" image inspect --format '{{.Id}}' "$image" 2> /dev/null || true)"
log "docker build → $image (debootstrap base, offline; log: $cache/build.log)"
if ! DOCKER_BUILDKIT=1 "$DOCKER" build --network none --progress plain \
    --build-arg BASE_IMAGE="$base_image" --build-arg WHEELHOUSE="$wheelhouse_image" \
    --tag "$image" "$workdir/context" > "$cache/build.log" 2>&1; then
    show_log "$cache/build.log" 40
    fail "docker build failed (log: $cache/build.log)"
fi
build_seconds=$(since "$step")
current="$("$DOCKER" image inspect --format '{{.Id}}' "$image")"
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
    "$DOCKER" rmi "$previous" > /dev/null 2>&1 || log "could not remove the previous $image ($previous): still in use?"
fi
"$DOCKER" rmi "$base_image" "$wheelhouse_image" > /dev/null
"$DOCKER" builder prune --force > /dev/null
size="$("$DOCKER" image inspect --format '{{.Size}}' "$image")"
log "built $image in $build_seconds s: $((size / 1000000)) MB; its layers, newest first:"
"$DOCKER" history --format '{{.Size}}\t{{.CreatedBy}}' "$image" | cut -c1-150 | sed 's/^/    /' >&2

if [ -n "$build_only" ]; then
    log "--build-only: no checks; container-test in total $(since "$started") s"
    exit 0
fi

# ---- 6. the checks -----------------------------------------------------------------------------------------
step=$(date +%s)
checks=0
check_args=()
if [ "$variant" = cuda ]; then check_args=(--cuda); fi
"$python" scripts/container_checks.py --image "$image" --docker "$DOCKER" \
    --setup-timeout "${JSD_SETUP_TIMEOUT:-300}" ${check_args[@]+"${check_args[@]}"} || checks=$?
log "checks in $(since "$step") s; docker build $build_seconds s; container-test in total $(since "$started") s"
exit "$checks"
