"""Golden models: the float reference and, next to it, the hardware-faithful model."""
