"""Model benchmark: training-step tokens/s and greedy-decoding tokens/s of the encoder-
decoder Transformer per backend, against torch.nn.Transformer of the same size in eager
mode (the 'vs torch' column is the ratio to that baseline, measured in the same run).

    python benchmarks/bench_model.py [--device cuda] [--dtype bfloat16] [--quick]

Writes benchmarks/results/model_<device>_<dtype>.{csv,md,png}.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import parser, progress_printer, resolve  # noqa: E402

from fused_attn import bench  # noqa: E402


def main():
    args = parser(__doc__.split("\n\n")[0]).parse_args()
    device, dtype = resolve(args)
    env = bench.environment(device)
    with progress_printer("model") as update:
        rows = bench.bench_model(device, dtype=dtype, quick=args.quick, progress=update)
    name = f"model_{device.type}_{str(dtype).replace('torch.', '')}"
    paths = bench.write_results(rows, args.out, name, env, title="Encoder-decoder model")
    print(bench.markdown(rows, env, title="Encoder-decoder model"))
    for r in rows:
        print(f"{r.case} {r.direction:6s} {r.backend:22s} {r.extra['tokens_per_s']:10.0f} tokens/s")
    print("wrote", ", ".join(paths.values()))


if __name__ == "__main__":
    main()
