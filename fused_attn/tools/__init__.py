"""The tools around the kernels, apart from the library: the compile gate (gate.py), the
benchmark harness (bench.py), the correctness sweep (check.py), the training demo (train.py) and
the `fused-attn` command line (cli.py)."""
