#!/usr/bin/env bash
# Ship the Cog model to Replicate: verify the weights, run the tests, then push the image.
#
#   scripts/push.sh r8.im/OWNER/MODEL             # verify weights/, make test, cog push
#   scripts/push.sh --dry-run r8.im/OWNER/MODEL   # print the commands, run nothing
#
# The weights are baked into the image (no download at setup, nothing to fail at start-up):
# `cog push --separate-weights` puts the large weights folders (weights/unet, vae, text_encoder,
# safety_checker) in their own layer, so a code change pushes a small layer, not 2.6 GB again.
# The folder checked is weights/, the one the image serves (cog.yaml sets no JSD_WEIGHTS and
# .dockerignore lets only weights/ in): push.sh refuses a JSD_WEIGHTS that names another folder.
#
# Options:
#   --dry-run      print each command instead of running it
#   --skip-tests   do not run `make test` (e.g. CI already ran it for this commit)
#   --allow-tiny   accept a tiny test checkpoint (to smoke-test a deployment; it generates noise)
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

dry_run=0
skip_tests=0
allow_tiny=()
model=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --skip-tests) skip_tests=1 ;;
        --allow-tiny) allow_tiny=(--allow-tiny) ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "error: unknown option '$1'" >&2; usage >&2; exit 2 ;;
        *)
            if [ -n "$model" ]; then echo "error: one model only, got '$model' and '$1'" >&2; exit 2; fi
            model="$1"
            ;;
    esac
    shift
done
if ! [[ "$model" =~ ^r8\.im/[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$ ]]; then
    echo "error: the model must be given as r8.im/OWNER/MODEL, got '${model}'" >&2
    exit 2
fi

cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
weights="weights"
case "${JSD_WEIGHTS:-weights}" in
    weights | weights/ | ./weights | ./weights/ | "$PWD/weights" | "$PWD/weights/") ;;
    *)
        echo "error: JSD_WEIGHTS is '${JSD_WEIGHTS}', but the image serves weights/ only (cog.yaml sets no" \
            "JSD_WEIGHTS and .dockerignore keeps every other folder out): put the checkpoint in weights/" \
            "(scripts/download_weights.py --source DIR writes it there) and unset JSD_WEIGHTS" >&2
        exit 2
        ;;
esac

run() {
    if [ "$dry_run" = 1 ]; then
        printf '%q ' "$@" | sed 's/ $//'
        echo
    else
        echo "+ $*" >&2
        "$@"
    fi
}

# 0. An interrupted conversion or export leaves these beside the weights: weights/ may then still be
#    the previous checkpoint, or be missing.
for leftover in ".$weights.staging" ".$weights.old"; do
    if [ -e "$leftover" ]; then
        echo "error: $leftover is left from an interrupted scripts/download_weights.py (or training export)" \
            "run ($weights/ may be the previous checkpoint, or missing): rerun it to finish, or delete $leftover" >&2
        exit 1
    fi
done
# 1. The weights are present and match their manifest (and are not a tiny test checkpoint).
run "$python" scripts/download_weights.py --verify-only "$weights" ${allow_tiny[@]+"${allow_tiny[@]}"}
# 2. The test suite passes (lint included).
if [ "$skip_tests" = 0 ]; then
    run make test
fi
# 3. Build and push; weights in their own layer.
if [ "$dry_run" = 0 ] && ! command -v cog > /dev/null; then
    echo "error: cog is not installed: see https://cog.run/getting-started (then run 'cog login')" >&2
    exit 1
fi
run cog push --separate-weights "$model"
