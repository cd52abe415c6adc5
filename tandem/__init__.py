"""Tandem: GPT-2 inference with prefill on a GPU and decode on an FPGA core; core definitions."""
