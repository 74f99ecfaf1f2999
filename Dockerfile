# The image `cog build --separate-weights` makes from cog.yaml, for people without the Cog CLI (docs/container.md).
#
#   GPU (default: CUDA base, CUDA torch, packages from PyPI; needs the served checkpoint in weights/):
#     DOCKER_BUILDKIT=1 docker build -t jsd .
#     docker run --gpus all -p 5000:5000 jsd
#   CPU, offline (any base with Python 3.11; a folder of wheels with the CPU torch; see docs/container.md):
#     DOCKER_BUILDKIT=1 docker build --network none --build-arg BASE_IMAGE=jsd-base:bookworm \
#         --build-arg WHEELHOUSE=jsd-wheelhouse -t jsd:cpu .
#
# What `cog build` generates (replicate/cog, pkg/dockerfile/standard_generator.go and pkg/image/build.go at
# 6110c91, Cog 0.22+) and how this file matches it:
#   - FROM the CUDA base for cog.yaml's `cuda: "13.0"` (pkg/config/cuda_compatibility.json: the newest 13.0.x
#     cudnn-devel on Ubuntu 24.04); Python from `uv python install` when the base has none (installPythonCUDA);
#   - tini as the entrypoint (installTini; here Debian/Ubuntu's package instead of a download from GitHub, and
#     with -g, see ENTRYPOINT);
#   - requirements.txt with cog/coglet removed, then cog at build.sdk_version (pipInstalls, installCog); cog
#     pulls coglet, the Rust server;
#   - the weights in their own layer below the code (GenerateModelBaseWithSeparateWeights);
#   - WORKDIR /src, EXPOSE 5000, ENV COG_PREDICT_TYPE_STUB (and COG_TRAIN_TYPE_STUB when cog.yaml has `train:`),
#     CMD ["python", "-m", "cog.server.http"], then COPY . /src through .dockerignore (cogEnvVars, GenerateModelBase);
#   - the OpenAPI schema at /src/.cog/openapi_schema.json (bundleDockerfile); coglet reads only that file:
#     without it, it validates no input and GET /openapi.json answers 503;
#   - no USER: the container runs as root.
# Differences: packages go into a venv (/opt/venv) with pip rather than the system Python with uv; no
# `#syntax=` line (it would pull the docker/dockerfile image, so offline builds could not start): the
# builder's own Dockerfile frontend is used, which must be BuildKit (DOCKER_BUILDKIT=1 on Docker < 23).
# tests/test_dockerfile.py keeps the Python version, the pins and the predictor reference in step with
# cog.yaml, requirements.txt and pyproject.toml.

# Build arguments. BASE_IMAGE: any glibc Linux with apt, or one that already has python${PYTHON_VERSION}
# and tini (then nothing is downloaded). TORCH_INDEX_URL: where torch comes from, e.g.
# https://download.pytorch.org/whl/cpu for the CPU build (empty: PyPI's default torch, built for CUDA 13.0).
# WHEELHOUSE: an image holding wheels in / (see docs/container.md); when it holds any, pip installs from it
# alone, offline. With buildx, `--build-context wheelhouse=DIR` replaces the stage below by a folder instead.
ARG BASE_IMAGE=nvidia/cuda:13.0.3-cudnn-devel-ubuntu24.04
ARG WHEELHOUSE=scratch

FROM ${WHEELHOUSE} AS wheelhouse

# ---- Python, tini, the pinned packages and cog: only requirements.txt or cog.yaml changes rebuild this -----
FROM ${BASE_IMAGE} AS runtime
ARG PYTHON_VERSION=3.11
ARG TORCH_INDEX_URL=
ARG UV_VERSION=0.9.26
# cog's preamble, less its LD_LIBRARY_PATH (the CUDA base sets the driver's folders; torch brings its CUDA libraries).
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    NVIDIA_DRIVER_CAPABILITIES=all \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# 1. tini and Python, from the base when it has them (the offline CPU base does), else apt and uv as cog does.
RUN set -eu; \
    base_python="$(command -v "python${PYTHON_VERSION}" || true)"; \
    if [ -z "$base_python" ] || ! command -v tini > /dev/null; then \
        apt-get update -qq; \
        apt-get install -qqy --no-install-recommends ca-certificates curl tini; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    if [ -z "$base_python" ]; then \
        curl -LsSf "https://github.com/astral-sh/uv/releases/download/${UV_VERSION}/uv-$(uname -m)-unknown-linux-gnu.tar.gz" \
            | tar -xzf - --strip-components=1 -C /usr/local/bin; \
        UV_PYTHON_INSTALL_DIR=/opt/python uv python install "${PYTHON_VERSION}"; \
        base_python="$(UV_PYTHON_INSTALL_DIR=/opt/python uv python find "${PYTHON_VERSION}")"; \
        rm -f /usr/local/bin/uv /usr/local/bin/uvx; \
    fi; \
    "$base_python" -m venv /opt/venv; \
    found="$(python -c 'import sys; print("%d.%d" % sys.version_info[:2])')"; \
    if [ "$found" != "${PYTHON_VERSION}" ]; then \
        echo "error: PYTHON_VERSION is ${PYTHON_VERSION} (cog.yaml build.python_version) but $base_python is Python $found" >&2; \
        exit 1; \
    fi
# 2. requirements.txt (the exact pins; cog/coglet lines dropped as cog build does), then cog at cog.yaml's
#    build.sdk_version. A wheelhouse with wheels in it makes this offline: --no-index, wheels only.
RUN --mount=type=bind,from=wheelhouse,target=/tmp/wheelhouse \
    --mount=type=bind,source=requirements.txt,target=/tmp/jsd/requirements.txt \
    --mount=type=bind,source=cog.yaml,target=/tmp/jsd/cog.yaml \
    --mount=type=cache,target=/root/.cache/pip \
    set -eu; \
    cog_version="$(sed -n 's/^ *sdk_version: *"\{0,1\}\([^"# ]*\)"\{0,1\}.*$/\1/p' /tmp/jsd/cog.yaml)"; \
    if [ -z "$cog_version" ]; then \
        echo "error: cog.yaml has no build.sdk_version: pin the cog SDK there (pyproject.toml's cog pin)" >&2; \
        exit 1; \
    fi; \
    grep -v -i -E '^[[:space:]]*(cog|coglet)[[:space:]]*([=<>!~;[]|$)' /tmp/jsd/requirements.txt > /tmp/requirements.txt; \
    set -- --disable-pip-version-check --no-input; \
    if [ -n "$(ls -A /tmp/wheelhouse)" ]; then set -- "$@" --no-index --only-binary=:all: --find-links /tmp/wheelhouse; fi; \
    if [ -n "${TORCH_INDEX_URL}" ]; then \
        pip install "$@" --index-url "${TORCH_INDEX_URL}" "$(grep -i -E '^torch==' /tmp/requirements.txt)"; \
    fi; \
    pip install "$@" -r /tmp/requirements.txt; \
    pip install "$@" "cog==${cog_version}"; \
    rm /tmp/requirements.txt
# tini as PID 1 (cog: ["/sbin/tini", "--"]), plus -g: a stop signal goes to the whole process group, coglet's
# worker included. Without it, `docker stop` during a prediction waits for the prediction to finish (the worker
# only leaves once its running predict() returns) and Docker kills the container after 10 s (exit 137).
ENTRYPOINT ["/usr/bin/tini", "-g", "--"]

# ---- The build context: the weights apart from the code, and the schema -------------------------------------
FROM runtime AS context
COPY . /src
# The schema comes from the predictor in the image, with scripts/cog_local.py (the same file its `schema`
# command prints); a .cog/ left in the context by a local server is replaced, and scripts/ stays out of the image.
RUN set -eu; \
    if [ ! -f /src/weights/model_index.json ]; then \
        echo "error: weights/ holds no checkpoint: put the served checkpoint there first" \
            "(scripts/download_weights.py, or scripts/make_tiny_weights.py weights/ to try the image)" >&2; \
        exit 1; \
    fi; \
    mv /src/weights /weights; \
    rm -rf /src/.cog; \
    mkdir /src/.cog; \
    cd /src; \
    PYTHONPATH=/src PYTHONDONTWRITEBYTECODE=1 python scripts/cog_local.py schema > .cog/openapi_schema.json; \
    rm -rf /src/scripts

# ---- The image: weights layer, then what cog build sets, then the code -----------------------------------
FROM runtime
COPY --from=context /weights /src/weights
WORKDIR /src
EXPOSE 5000
ENV COG_PREDICT_TYPE_STUB="predict.py:Predictor" \
    COG_TRAIN_TYPE_STUB="train.py:train"
CMD ["python", "-m", "cog.server.http"]
COPY --from=context /src /src
