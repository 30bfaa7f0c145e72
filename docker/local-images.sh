#!/bin/sh
# Local stand-ins for the two registry images the image check needs, for a machine
# that reaches Debian's archive but no image registry:
#   deltaserve-python:bookworm      Debian bookworm's python3 in a venv on PATH (as
#                                   python:3.11-slim has pip and python on PATH)
#   deltaserve-prometheus:bookworm  Debian's prometheus package on that base
# Run as root (debootstrap). ROOTFS is a scratch directory outside the repository.
#   sudo docker/local-images.sh && PYTHON_IMAGE=deltaserve-python:bookworm \
#       PROMETHEUS_IMAGE=deltaserve-prometheus:bookworm docker/check.sh
set -eu

DOCKER="${DOCKER:-docker}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
ROOTFS="${ROOTFS:-/var/tmp/deltaserve-rootfs}"
PYTHON_IMAGE="${PYTHON_IMAGE:-deltaserve-python:bookworm}"
PROMETHEUS_IMAGE="${PROMETHEUS_IMAGE:-deltaserve-prometheus:bookworm}"

if ! "$DOCKER" image inspect "$PYTHON_IMAGE" > /dev/null 2>&1; then
  if [ ! -x "$ROOTFS/usr/bin/python3" ]; then
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      bookworm "$ROOTFS" "$MIRROR"
  fi
  chroot "$ROOTFS" python3 -m venv /opt/python
  chroot "$ROOTFS" sh -c 'apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin'
  tar -C "$ROOTFS" -c . | "$DOCKER" import \
    --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$PYTHON_IMAGE"
fi

if ! "$DOCKER" image inspect "$PROMETHEUS_IMAGE" > /dev/null 2>&1; then
  DOCKER_BUILDKIT=1 "$DOCKER" build -t "$PROMETHEUS_IMAGE" --build-arg BASE="$PYTHON_IMAGE" - <<'DOCKERFILE'
ARG BASE
FROM ${BASE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus && chown prometheus:prometheus /prometheus
USER prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
DOCKERFILE
fi
"$DOCKER" image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "^($PYTHON_IMAGE|$PROMETHEUS_IMAGE) "
