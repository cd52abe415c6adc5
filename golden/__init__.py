"""Golden models, NumPy only: the float reference GPT-2, the hardware-faithful model of the
numeric contract, and the ISA simulator. Importable without amaranth, cocotb or torch."""
