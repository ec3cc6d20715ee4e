# syntax=docker/dockerfile:1
# tokenhub-sidecar: slim, non-root, read-only-root-filesystem friendly.
#   docker build -t tokenhub-sidecar .
#   docker run --rm --read-only -p 127.0.0.1:8700:8700 tokenhub-sidecar demo --listen 0.0.0.0:8700
# Real use: mount the config at /etc/tokenhub-sidecar/config.toml, keys as secret files,
# and a volume at /var/lib/tokenhub-sidecar for the ledger (see deploy/ and README.md).

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/tokenhub-sidecar
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
# pip compiles the bytecode now, since the running container cannot write it.
RUN /opt/tokenhub-sidecar/bin/pip install .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="tokenhub-sidecar" \
      org.opencontainers.image.description="Local OpenAI-compatible sidecar with failover and a cost ledger" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/tokenhub-sidecar /opt/tokenhub-sidecar
# The only writable place the sidecar needs: the ledger (mount a volume here).
RUN install -d -m 0700 -o 65532 -g 65532 /var/lib/tokenhub-sidecar \
    && install -d -m 0755 /etc/tokenhub-sidecar
ENV PATH=/opt/tokenhub-sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TOKENHUB_SIDECAR_CONFIG=/etc/tokenhub-sidecar/config.toml
USER 65532:65532
WORKDIR /var/lib/tokenhub-sidecar
VOLUME ["/var/lib/tokenhub-sidecar"]
# No EXPOSE: the sidecar listens on the pod's / container's loopback by design (127.0.0.1:8700).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8700/-/health', timeout=2)"]
ENTRYPOINT ["tokenhub-sidecar"]
CMD ["serve"]
