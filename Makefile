# Tandem developer targets. `make setup` once, then the others.
PYTHON ?= python

.PHONY: setup test lint run bench

setup:
	bash scripts/setup.sh

test:
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check .

run:
	tandem generate --prompt "Hello, my name is" --max-new-tokens 16

# ISA-simulator decode speed: gpt2 (124M, random weights) on the u55c geometry.
bench:
	$(PYTHON) -m tandem.host.cli bench --model gpt2 --geometry u55c
