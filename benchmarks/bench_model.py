"""Model benchmark: training-step tokens/s and greedy-decoding tokens/s of the encoder-
decoder Transformer per backend, against torch.nn.Transformer of the same size in eager
mode (the 'vs torch' column is the ratio to that baseline, measured in the same run).

    python benchmarks/bench_model.py [--device cuda] [--dtype bfloat16] [--quick]

Writes benchmarks/results/model_<device>_<dtype>.{csv,md,png}.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

from fused_attn.tools import bench  # noqa: E402


def run(device, dtype, quick, progress):
    return bench.bench_model(device, dtype=dtype, quick=quick, progress=progress)


def report(rows):
    for r in rows:
        print(f"{r.case} {r.direction:6s} {r.backend:22s} {r.extra['tokens_per_s']:10.0f} tokens/s")


if __name__ == "__main__":
    _common.main(__doc__, "model", "Encoder-decoder model", run, report)
