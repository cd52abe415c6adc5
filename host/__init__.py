"""Host side: device backends, the hybrid pipeline and the command-line interface."""
