# Tandem developer targets. `make setup` once, then the others.
PYTHON ?= python

.PHONY: setup test test-fast mutants lint run bench verilog bitstream hw_emu estimate timing

setup:
	bash scripts/setup.sh

# The full suite, as CI runs it (README).
test:
	$(PYTHON) -m pytest -q

# The fast tier: everything but the whole kernel (`core`), long unit cases (`long`) and
# benchmark-size cases (`slow`); RTL units on Verilator only (the full suite also runs them on
# Icarus); two pytest workers, as every run (pyproject.toml addopts).
test-fast:
	SIM=verilator $(PYTHON) -m pytest -q -m "not slow and not pending and not core and not long"

# Plant known KV-cache bugs in a copy of HEAD and show the tests fail on each (scripts/mutants.py;
# about 2 minutes; MUTANTS_ARGS="--suite fast" runs the whole fast tier per mutant).
mutants:
	$(PYTHON) scripts/mutants.py $(MUTANTS_ARGS)

lint:
	$(PYTHON) -m ruff check .

run:
	tandem generate --prompt "ROMEO:" --max-new-tokens 40

# ISA-simulator decode speed: gpt2 (124M, random weights) on the u55c geometry.
bench:
	$(PYTHON) -m tandem.host.cli bench --model gpt2 --geometry u55c

# Decode-core cycles per token from RTL simulation: gpt2 on the u55c core in Verilator over the
# simulated HBM, the calibrated model by default (scripts/bench_rtl.py; BENCH_RTL_ARGS="--hbm
# ideal" for the ideal one, "--sweep" adds the HBM sensitivity table). Prints a table and writes
# build/bench-rtl.json; BENCH_RTL_ARGS="--record" also copies it to docs/bench-rtl.json. The
# first run builds the u55c core in Verilator (long; cached under build/sim afterwards).
# Quantized weights (issue 17): BENCH_RTL_ARGS="--weights int8" (per channel) or "--weights int4"
# (groups of 128; "--group 64") quantizes gpt2 by round to nearest; its result goes to
# build/bench-rtl-int4.json (--record: docs/bench-rtl-int4.json, not the FP16 package data).
# "--dry-run" checks it all on the ISA simulator in seconds; "--summary" prints the recorded
# formats side by side.
.PHONY: bench-rtl
bench-rtl:
	$(PYTHON) scripts/bench_rtl.py $(BENCH_RTL_ARGS)

# Verilog of the kernel top level tandem_decode_core: build/<geometry>/tandem_decode_core.v
# (GEOMETRY=u55c|tiny|small for one geometry; default tiny and u55c).
verilog:
	$(PYTHON) scripts/make_verilog.py $(or $(GEOMETRY),tiny u55c)

# The Vitis flow (docs/build.md): writes every input under build/<geometry>/, then runs vivado
# and v++ if they are on PATH; without them it stops with exit code 3 and says what to source.
PLATFORM ?= xilinx_u55c_gen3x16_xdma_3_202210_1
bitstream:
	$(PYTHON) scripts/bitstream.py --geometry $(or $(GEOMETRY),u55c) --platform $(PLATFORM) --target hw

hw_emu:
	$(PYTHON) scripts/bitstream.py --geometry $(or $(GEOMETRY),u55c) --platform $(PLATFORM) --target hw_emu

# Open-source resource estimate: the whole core synthesized in one pyosys synth_xilinx run
# (u55c: 1-2 hours, 7 GB), per block and per SLR against the U55C and the floorplan's budgets;
# prints the tables, writes build/estimate.json and the netlist `make timing` reads.
estimate:
	$(PYTHON) scripts/estimate.py --geometry $(or $(GEOMETRY),u55c) $(ESTIMATE_ARGS)

# Logic depth of that netlist: worst register-to-register path per block in LUT levels, carry
# chains, DSP cascades, against the 250 MHz budget (docs/build.md); writes build/timing.json.
# Synthesizes first if `make estimate` has not.
timing:
	$(PYTHON) scripts/timing.py --geometry $(or $(GEOMETRY),u55c) $(TIMING_ARGS)
