"""GPU prefill in PyTorch (runs on the CPU where there is no CUDA)."""
