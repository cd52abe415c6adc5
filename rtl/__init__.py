"""The decode core in Amaranth HDL."""
