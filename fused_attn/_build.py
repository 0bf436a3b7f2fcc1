"""Compiler flags shared by setup.py (the build) and gate.py (the GPU compile gate), so
the gate checks exactly what gets built. Plain Python, importable without torch."""

NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
DEFAULT_CUDA_ARCHS = "8.0;9.0"
