# deltaserve: serve many fine-tunes of one base as sparse deltas.
#
#   docker build -t deltaserve .                                   # slim CPU image
#   docker build -t deltaserve:cuda --build-arg TORCH=cuda .       # CUDA (torch wheel bundles CUDA)
#   docker build -t deltaserve --build-arg FETCH_BASE=1 .          # embedded base baked in: starts offline
#   docker run -p 8000:8000 -e DELTASERVE_ADMIN_TOKEN=... -v deltas:/data/deltas -v cache:/data/cache deltaserve
#
# Behind a TLS-intercepting proxy or a private mirror (BuildKit: DOCKER_BUILDKIT=1):
#   docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt \
#       --build-arg TORCH_INDEX_URL=https://mirror.example/torch-cpu/simple .
# The CA bundle (one that holds the proxy's CA) is used by pip and apt during the
# build and is not left in any layer. docker/check.sh builds and runs the image.
#
# Needs BuildKit (RUN --mount): the default builder since Docker 23; DOCKER_BUILDKIT=1
# before that. No `# syntax=` line: the Dockerfile frontend built into the engine
# is used, so a build pulls nothing from a registry but the base image.
#
# No secrets are baked in: the admin token comes from the environment at run time.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DELTASERVE_HOST=0.0.0.0 \
    DELTASERVE_PORT=8000 \
    DELTASERVE_STORE=/data/deltas \
    DELTASERVE_CACHE=/data/cache \
    HF_HUB_OFFLINE=1

RUN groupadd --system --gid 10001 deltaserve \
    && useradd --system --uid 10001 --gid deltaserve --home-dir /home/deltaserve --create-home deltaserve \
    && mkdir -p /data/deltas /data/cache /opt/deltaserve \
    && chown -R deltaserve:deltaserve /data /opt/deltaserve

WORKDIR /opt/deltaserve

# A C compiler for engine v2's sparse delta kernel: built once, at first use, for the
# CPU it runs on (server/engine/sparse.py), into the cache volume. Without one the
# engine falls back to torch ops (correct, slower). bookworm's gcc, not pinned: it
# follows the distribution's point releases.
# hadolint ignore=DL3008
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then set -- -o Acquire::https::CAInfo=/run/secrets/ca; fi \
    && apt-get "$@" update \
    && apt-get "$@" install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# Each ARG is declared just before the steps that read it: a build argument is in the
# environment of every later RUN, so changing one rebuilds only the layers after it.
# cpu: torch's CPU wheel (no CUDA libraries: ~190 MB to download, ~870 MB installed);
# cuda: the PyPI wheel with CUDA
ARG TORCH=cpu
ARG TORCH_VERSION=2.13.0
# where pip finds torch's CPU wheel and its dependencies (TORCH=cpu only)
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    if [ "$TORCH" = "cpu" ]; then \
        pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"; \
    elif [ "$TORCH" = "cuda" ]; then \
        pip install "torch==${TORCH_VERSION}"; \
    else \
        echo "TORCH must be cpu or cuda, got '${TORCH}'" >&2; exit 1; \
    fi

COPY --chown=deltaserve:deltaserve pyproject.toml README.md ./
COPY --chown=deltaserve:deltaserve deltastore ./deltastore
COPY --chown=deltaserve:deltaserve server ./server
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    pip install .
COPY --chmod=755 docker/entrypoint.sh /usr/local/bin/deltaserve-entrypoint

USER 10001:10001
# 1: fetch and convert the embedded base at build time (the container then needs no network)
ARG FETCH_BASE=0
RUN --mount=type=secret,id=ca,uid=10001 \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    if [ "$FETCH_BASE" = "1" ]; then python -m deltastore.embedded; fi

VOLUME ["/data/deltas", "/data/cache"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('DELTASERVE_PORT', '8000')}/health\", timeout=4)"]
ENTRYPOINT ["deltaserve-entrypoint"]
CMD ["serve"]
