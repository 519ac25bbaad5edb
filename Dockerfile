# Pacemaker image: a builder stage makes the virtualenv, the runtime stage runs it as a non-root user.
#
#   docker build -t pacemaker .
#   docker run --rm -p 8000:8000 -e PACEMAKER_DATABASE__URL=postgresql+asyncpg://... pacemaker
#   docker run --rm -e PACEMAKER_DATABASE__URL=... pacemaker keys create --name me   # any other `pacemaker` command
#
# On a database not migrated yet, a command that needs its tables says so in one line (exit 3):
# run `pacemaker migrate` first (the default command does, before serving). Without
# PACEMAKER_DATABASE__URL the database is SQLite in var/: mount a volume there to keep it.
#
# Layout. app/db.py finds the Alembic scripts at MIGRATIONS_DIR = <dir of app/>/../migrations, so
# app/ and migrations/ must sit side by side. A regular (wheel) install would put app/ in
# site-packages, away from migrations/. Instead the project is installed *editable* from
# /srv/pacemaker: the venv then holds the dependencies, the `pacemaker` console script and the
# package metadata (for app.__version__), plus a path hook that imports `app` from
# /srv/pacemaker/app. Both /opt/venv and /srv/pacemaker keep the same absolute paths in the
# runtime stage, which is what the hook records, so this resolves to
# /srv/pacemaker/app + /srv/pacemaker/migrations.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

WORKDIR /srv/pacemaker

# The dependencies first, in their own layer, so that editing the code does not reinstall them:
# exactly what requirements.lock pins (pip and setuptools too), every file checked against its hash
# (`make lock` makes it from pyproject.toml). The compiled ones (uvloop, httptools, asyncpg, aiohttp,
# orjson, pydantic-core, ...) have manylinux wheels for CPython 3.11 on amd64 and arm64, so no
# compiler is installed; add build-essential here if one is missing.
COPY requirements.lock ./
RUN python -m venv /opt/venv && pip install --require-hashes -r requirements.lock

# A lock older than pyproject.toml's dependencies would leave one out: stop the build, saying what to run.
COPY pyproject.toml README.md ./
COPY deploy/lock.py ./deploy/lock.py
RUN python deploy/lock.py check requirements.lock

# Then the project itself, editable (see the top of this file), with nothing more: no dependency,
# and the locked setuptools rather than whatever an isolated build would fetch.
COPY app ./app
RUN pip install --no-deps --no-build-isolation --editable .


FROM ${PYTHON_IMAGE} AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PACEMAKER_LOG_JSON=true

RUN groupadd --system --gid 10001 pacemaker \
    && useradd --system --uid 10001 --gid pacemaker --home-dir /srv/pacemaker --no-create-home \
        --shell /usr/sbin/nologin pacemaker

COPY --from=builder /opt/venv /opt/venv

WORKDIR /srv/pacemaker
# The code stays owned by root (read-only to the service); only var/ is writable, for the default
# SQLite database (./var/pacemaker.db) and dev-key file when no PACEMAKER_DATABASE__URL is given.
# Mount a volume on /srv/pacemaker/var to keep such a database.
COPY alembic.ini ./
COPY migrations ./migrations
COPY app ./app
RUN python -m compileall -q app migrations \
    && python -c "import app.db; assert (app.db.MIGRATIONS_DIR / 'env.py').is_file(), app.db.MIGRATIONS_DIR" \
    && mkdir var && chown pacemaker:pacemaker var

USER 10001:10001

EXPOSE 8000

# /health/live answers while the process serves; readiness (database) is /health/ready.
# No curl in the slim image: the standard library does it. urlopen raises on a non-2xx answer.
# It probes port 8000, the port the entrypoint serves on: change both together.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/live', timeout=4)"]

# No arguments, or only options (e.g. `--workers 4`): migrate the database, then serve on 0.0.0.0:8000
# with those options appended. Anything else is a `pacemaker` command (`keys create --name me`,
# `check-config`, ...). `exec` makes the server PID 1, so it gets the SIGTERM from `docker stop` and
# shuts down gracefully. With several replicas, run `pacemaker migrate` once as its own job instead.
ENTRYPOINT ["/bin/sh", "-c", "set -e; if [ \"$#\" -eq 0 ] || [ \"${1#-}\" != \"$1\" ]; then pacemaker migrate; exec pacemaker serve --host 0.0.0.0 --port 8000 \"$@\"; fi; exec pacemaker \"$@\"", "pacemaker-entrypoint"]
CMD []
