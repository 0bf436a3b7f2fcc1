// csrc/cuda/feed_forward.cu compiled by the host compiler for the warp emulator (FUSED_ATTN_EMU).
#include "../cuda/feed_forward.cu"
