"""LayerNorm (+ residual) benchmark: rows x hidden sweep, forward and backward, GB/s of
the fewest bytes each direction must move, and the ratio to torch (F.layer_norm) in
the same run, for every backend usable on the device.

    python benchmarks/bench_layer_norm.py [--device cuda] [--dtype bfloat16] [--quick]

Writes benchmarks/results/layer_norm_<device>_<dtype>.{csv,md,png}.
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
    rows = []
    with progress_printer("layer_norm") as update:
        for residual in (False, True):
            rows += bench.bench_layer_norm(device, dtype=dtype, residual=residual, quick=args.quick, progress=update)
    name = f"layer_norm_{device.type}_{str(dtype).replace('torch.', '')}"
    paths = bench.write_results(rows, args.out, name, env, title="LayerNorm")
    print(bench.markdown(rows, env, title="LayerNorm"))
    print("wrote", ", ".join(paths.values()))


if __name__ == "__main__":
    main()
