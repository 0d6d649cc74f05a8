# Two commands do all the setup on a fresh machine (see README):
#   make serve   build .venv if needed, then serve the embedded default base with the examples
#   make test    build .venv if needed, then lint and run the test suite
# .venv holds the exact versions of requirements/$(TARGET).txt (cpu by default; TARGET=cuda);
# `make lock` regenerates the lock files from pyproject.toml's ranges (pip-tools).
VENV ?= .venv
TARGET ?= cpu
PY := $(VENV)/bin/python

.PHONY: setup serve test lint lock
setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml requirements/$(TARGET).txt requirements/no-deps.txt scripts/setup.sh
	TARGET=$(TARGET) scripts/setup.sh $(VENV)
	touch $@

serve: setup
	$(VENV)/bin/moka-serve

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

lock:
	scripts/lock.sh
