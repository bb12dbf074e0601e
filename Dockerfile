# conference-worker: `docker build -t conference-worker .`, then `docker run conference-worker run`.
#
# Two stages on the same pinned base (tag and multi-arch index digest): the build stage installs
# the project and its dependencies (all of them ship binary wheels for linux/amd64 and arm64) into
# a virtualenv; the final stage copies only that virtualenv, runs as an unprivileged user and has
# no compiler, no pip in the virtualenv and no source tree.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker ./worker
RUN /opt/venv/bin/pip install --only-binary=:all: --no-binary=conference-worker . \
 && /opt/venv/bin/pip uninstall --yes pip setuptools \
 && /opt/venv/bin/python -m compileall -q /opt/venv/lib

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="conference-worker" \
      org.opencontainers.image.description="RabbitMQ worker carrying out telephony conference commands against Vinix and Telnyx"
RUN groupadd --system --gid 10001 worker \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/worker --create-home \
      --shell /usr/sbin/nologin worker
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CW_HTTP_HOST=0.0.0.0 \
    CW_HTTP_PORT=8080 \
    CW_DEDUP_URL=sqlite:////home/worker/dedup.sqlite3
USER 10001:10001
WORKDIR /home/worker
EXPOSE 8080
# Liveness of the worker (GET /healthz on CW_HTTP_PORT); compose gives the sandbox its own check.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CW_HTTP_PORT', '8080'), timeout=2)"]
# SIGTERM stops consuming and finishes in-flight commands within --grace-s, then exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["conference-worker"]
CMD ["run", "--grace-s", "30"]
