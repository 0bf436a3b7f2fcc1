// csrc/cuda/attention_fwd.cu compiled by the host compiler for the warp emulator (FUSED_ATTN_EMU).
#include "../cuda/attention_fwd.cu"
