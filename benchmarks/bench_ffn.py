"""Feed-forward benchmark: tokens x (d_model, d_ff), forward and forward+backward TFLOP/s of
every usable backend, the ratio to torch eager (F.linear + activation + F.linear + add)
and, forward, to the two bare GEMMs alone ('gemm_only'), measured in the same run.

    python benchmarks/bench_ffn.py [--device cuda] [--dtype bfloat16] [--quick]

Writes benchmarks/results/ffn_<device>_<dtype>.{csv,md,png}.
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
    with progress_printer("ffn") as update:
        rows = bench.bench_ffn(device, dtype=dtype, quick=args.quick, progress=update)
    name = f"ffn_{device.type}_{str(dtype).replace('torch.', '')}"
    paths = bench.write_results(rows, args.out, name, env, title="Feed-forward")
    print(bench.markdown(rows, env, title="Feed-forward"))
    print("wrote", ", ".join(paths.values()))


if __name__ == "__main__":
    main()
