"""Scripts that need a CUDA GPU: the Triton kernels' compile check, calibration, ghost benchmark and engine check."""
