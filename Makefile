# One task runner for people and CI. `make run` and `make test` install what they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install chromium run test fuzz lint format openapi migrate bench clean

# Installs exactly what requirements-dev.lock pins (every extra, pip and setuptools included), each
# file checked against its hash; the project itself goes in editable, with nothing more. A lock older
# than pyproject.toml's dependencies stops here with what to run, never installs something unpinned.
$(INSTALLED): pyproject.toml requirements-dev.lock
	@$(PYTHON) -c 'import sys; sys.exit("Python >= 3.11 is required") if sys.version_info < (3, 11) else None'
	@$(PYTHON) deploy/lock.py check requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements-dev.lock
	@# (setuptools warns on every editable install that a folder named like the package may shadow it)
	PYTHONWARNINGS=ignore::UserWarning $(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $@

install: $(INSTALLED)

## lock: remake requirements.lock and requirements-dev.lock from pyproject.toml, keeping every pin that
## still fits; LOCK_ARGS='--upgrade-package httpx' moves one package to its newest, LOCK_ARGS=--upgrade all
UV_VERSION := 0.13.8
.PHONY: lock
lock:
	@test -x $(BIN)/uv || { $(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install --quiet "uv==$(UV_VERSION)"; }
	$(PYTHON) deploy/lock.py compile --uv $(BIN)/uv $(LOCK_ARGS)

## chromium: Debian's chromium for the browser tests, from the package registry where missing (as root with apt-get;
## elsewhere the browser tests skip, naming this command). Playwright never downloads a browser here.
chromium:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; fi

# `make run` only: pages from any local port (a Vite or Next.js dev server) may call it. Production
# sets server.cors.allow_origins itself; `make run DEV_CORS_ORIGINS='[]'` turns this off.
DEV_CORS_ORIGINS ?= ["http://localhost:*", "http://127.0.0.1:*"]

## run: install, migrate the SQLite database, make a development key, serve on 127.0.0.1:8000
run: install
	$(BIN)/pacemaker migrate
	$(BIN)/pacemaker dev-key
	PACEMAKER_SERVER__CORS__ALLOW_ORIGINS='$(DEV_CORS_ORIGINS)' $(BIN)/pacemaker serve

## test: install and run the whole suite (needs PostgreSQL and Redis on 127.0.0.1)
test: install chromium
	$(BIN)/python -m pytest

## fuzz: schemathesis against a live server, longer than the suite's run (PACEMAKER_FUZZ_EXAMPLES per operation)
fuzz: install
	PACEMAKER_FUZZ_EXAMPLES=$${PACEMAKER_FUZZ_EXAMPLES:-1000} $(BIN)/python -m pytest tests/test_fuzz.py -p no:cacheprovider -o addopts="" --timeout 3600

lint: install
	$(BIN)/ruff check app tests benchmarks load migrations deploy
	$(BIN)/ruff format --check app tests benchmarks load migrations deploy
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix app tests benchmarks load migrations deploy
	$(BIN)/ruff format app tests benchmarks load migrations deploy

## openapi: regenerate the committed openapi.json from the app
openapi: install
	$(BIN)/pacemaker openapi --out openapi.json

migrate: install
	$(BIN)/pacemaker migrate

## bench: every performance target but the held streams, with verdicts (benchmarks/targets.py: chat on both
## backends against the bare proxy, idle memory, two workers; about 15 minutes; figures in the README)
bench: install
	$(BIN)/python -m benchmarks.targets $(BENCH_ARGS)

## bench-held: issue 13's held streams (1,000/5,000/9,000 at 1 event/s, 1,000 at 10 events/s) on the upstream,
## the bare proxy and Pacemaker, one worker each; about 10 minutes. HELD_ARGS='--counts 1000,5000' for fewer rows
.PHONY: bench-held
bench-held: install
	$(BIN)/python -m benchmarks.held $(HELD_ARGS)

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
