"""Decode-step attention: a few new queries per sequence against a long KV cache, the
memory-bound case. Reports GB/s of K and V read against the machine's memory bandwidth,
measured in the same run (a large tensor summed, read-only, on every core).

Cache lengths 1k..32k, batch 1..64 (pairs whose K + V stay under 1 GB), H=8 KV heads, 8 query
heads, D=64, one query per sequence, in the same interleaved rounds: decode_attention on a
contiguous cache and on a paged one (pages of 64 tokens in shuffled order), the attention
kernels through scaled_dot_product_attention, and torch's SDPA.

    python benchmarks/bench_decode.py [--device cpu] [--quick]

Writes benchmarks/results/decode_<device>_<dtype>.{csv,md,png}.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

if __name__ == "__main__":
    _common.main(__doc__, "decode")
