"""Attention benchmark: forward, backward and forward+backward TFLOP/s of every usable
backend against every torch SDPA kernel that accepts the inputs (flash, efficient,
cuDNN, math; torch's own choice as 'torch'), in the same run.

GPU: seqlen 512..16k at B*L = 16k tokens, head dim 64 and 128 (H*D = 2048), no mask /
causal / key-padding bool mask. CPU: B=4, H=8, D=64, L in {128, 512, 1024, 2048}, no
mask / causal / key-padding bool / arbitrary float mask.

    python benchmarks/bench_attention.py [--device cuda] [--dtype bfloat16] [--quick]

Writes benchmarks/results/attention_<device>_<dtype>.{csv,md,png}.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

if __name__ == "__main__":
    _common.main(__doc__, "attention")
