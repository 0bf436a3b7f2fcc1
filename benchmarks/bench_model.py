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

if __name__ == "__main__":
    _common.main(__doc__, "model")
