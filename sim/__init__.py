"""Simulation of the RTL: the cocotb runner and stream drivers, the simulated HBM, and the
whole-core job harness. Sits above ``tandem.rtl``; nothing below imports it."""
