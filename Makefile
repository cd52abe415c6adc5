# Tandem developer targets. `make setup` once, then the others.
PYTHON ?= python

.PHONY: setup test lint run

setup:
	bash scripts/setup.sh

test:
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check .

run:
	tandem generate --prompt "Hello, my name is" --max-new-tokens 16
