// csrc/cuda/probe.cu compiled by the host compiler for the warp emulator (FUSED_ATTN_EMU).
#include "../cuda/probe.cu"
