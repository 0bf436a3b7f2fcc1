"""Compiler flags shared by setup.py (the build), gate.py (the GPU compile gate) and emu.py
(the emulator's command-line driver), so each checks exactly what gets built. Plain Python,
importable without torch."""

NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
DEFAULT_CUDA_ARCHS = "8.0;9.0"
# the CUDA kernels compiled by the host compiler for the warp emulator (csrc/emu): the kernels
# type-pun fragments and packs through pointers as CUDA code does, so no strict aliasing
EMU_CXX_FLAGS = ["-O2", "-fno-strict-aliasing", "-Wno-unknown-pragmas"]  # CUDA's #pragma unroll
