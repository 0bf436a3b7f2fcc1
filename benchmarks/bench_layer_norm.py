"""LayerNorm (+ residual) benchmark: rows x hidden sweep, forward and backward, GB/s of
the fewest bytes each direction must move, and the ratio to torch (F.layer_norm) in
the same run, for every backend usable on the device.

    python benchmarks/bench_layer_norm.py [--device cuda] [--dtype bfloat16] [--quick]

Writes benchmarks/results/layer_norm_<device>_<dtype>.{csv,md,png}.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

if __name__ == "__main__":
    _common.main(__doc__, "layer_norm")
