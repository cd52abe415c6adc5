# Tandem developer targets. `make setup` once, then the others.
PYTHON ?= python

.PHONY: setup test lint run bench verilog

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

# Verilog of the kernel top level tandem_decode_core: build/<geometry>/tandem_decode_core.v
verilog:
	$(PYTHON) scripts/make_verilog.py tiny u55c
