# touchstream: `make demo` sets everything up and runs the demo on the embedded
# stack; `make test` runs ruff, mypy and the test suite.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CLOCK  ?= 86400

.PHONY: demo test setup system-deps up down lint typecheck pytest bench chaos clean

$(BIN)/touchstream: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

setup: system-deps $(BIN)/touchstream

# PostgreSQL's server binaries for the embedded stack (Debian's package).
system-deps:
	@if [ -z "$$DATABASE_URL" ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		echo "installing PostgreSQL server binaries"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq postgresql >/dev/null; \
	fi

demo: setup
	$(BIN)/touchstream dev down >/dev/null
	TOUCHSTREAM_CLOCK_SPEED=$(CLOCK) $(BIN)/touchstream dev up
	$(BIN)/touchstream demo
	@echo
	@echo "The stack keeps running: explore the HTTP APIs above; \`make down\` stops it."

up: setup
	TOUCHSTREAM_CLOCK_SPEED=$(CLOCK) $(BIN)/touchstream dev up

down:
	@if [ -x $(BIN)/touchstream ]; then $(BIN)/touchstream dev down; fi

lint: $(BIN)/touchstream
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(BIN)/touchstream
	$(BIN)/mypy

# pytest exit 5 (no tests collected) is a failure here, like any other non-zero exit.
pytest: $(BIN)/touchstream
	$(BIN)/pytest -m "not slow" -p no:cacheprovider

test: setup lint typecheck pytest

bench: setup
	$(BIN)/python -m bench

chaos: setup
	$(BIN)/pytest -m slow -s -p no:cacheprovider tests/e2e

clean: down
	rm -rf $(VENV) .touchstream .mypy_cache .ruff_cache
