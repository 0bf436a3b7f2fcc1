// csrc/cuda/layer_norm.cu compiled by the host compiler for the warp emulator (FUSED_ATTN_EMU).
#include "../cuda/layer_norm.cu"
