"""Feed-forward benchmark: tokens x (d_model, d_ff), forward and forward+backward TFLOP/s of
every usable backend, the ratio to torch eager (F.linear + activation + F.linear + add)
and, forward, to the two bare GEMMs alone ('gemm_only'), measured in the same run.

    python benchmarks/bench_feed_forward.py [--device cuda] [--dtype bfloat16] [--quick]

Writes benchmarks/results/feed_forward_<device>_<dtype>.{csv,md,png}.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

if __name__ == "__main__":
    _common.main(__doc__, "feed_forward")
