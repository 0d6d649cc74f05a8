# Two commands do all the setup on a fresh machine (see README):
#   make serve   build .venv if needed, then serve the embedded default base with the examples
#   make test    build .venv if needed, then lint and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup serve test lint
setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml scripts/setup.sh
	scripts/setup.sh $(VENV)
	touch $@

serve: setup
	$(VENV)/bin/moka-serve

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q
