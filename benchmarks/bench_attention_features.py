"""FlashAttention-feature benchmark: sliding windows against full attention with the same
kernel, ALiBi from slopes against ALiBi as a bias mask, and packed variable-length batches
against the same batch padded to its longest sequence, interleaved in one run (the fastest of
--rounds rounds each), forward and forward+backward.

Window: B=1, H=8, D=64, L in {2048, 8192} (--quick: 2048), window (256, 0), against full
causal and full non-causal attention on the same backend (the window's ideal speed-up is
L / (2 * 256) over causal, L / 256 over non-causal). Varlen: 8 sequences with lengths
uniform in 64..2048 and 256 in 32..128 (--quick: the 8; seeded), H=8, D=64, causal:
`varlen_attention` on the packed tokens
against `scaled_dot_product_attention` on the batch right-padded to the longest sequence,
causal (which keeps real queries off the padding; the padding fraction is the ideal saving).
ALiBi: L = 2048, causal, ALiBi's geometric slopes: the kernels adding it from the (H,) slopes
against the same bias passed as an (H, L, L) float mask (how the kernels got ALiBi before)
and against causal attention without ALiBi.
float32 on the CPU (`cpu` kernels), bfloat16 on a GPU (each of `triton` and `cuda`, the
candidates' names ending in " [triton]" / " [cuda]").

    python benchmarks/bench_attention_features.py [--device cpu] [--quick]

Writes benchmarks/results/attention_features_<device>_<dtype>.{csv,md,png}.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

if __name__ == "__main__":
    _common.main(__doc__, "attention_features")
