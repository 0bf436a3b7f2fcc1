"""Context-parallel (ring) attention: time per forward+backward step and peak memory per
rank, N processes over gloo against one process holding the whole sequence, same machine,
same total core count (one process: every core; N processes: cores / N threads each).

Causal (zigzag) attention, B=1, H=8, D=64, float32, the cpu kernels, L in 4096..16384
(--quick: 2048, 4096); torch's SDPA in one process is timed in the same run ("vs torch").
Each configuration runs in fresh processes: a warm-up step, then the fastest of --rounds
steps (the slowest rank's time per step). Peak memory is the rise of the process's peak
resident set (ru_maxrss) over its resident set before the inputs were made (after a small
warm-up step has loaded the libraries): inputs, outputs, gradients and every buffer of the
step. Activations are what autograd keeps from forward for backward (counted with
saved-tensor hooks): q, k, v, the output and its statistics.

    python benchmarks/bench_context_parallel.py [--world 2] [--quick] [--rounds 3]

Writes benchmarks/results/context_parallel_cpu_float32.{csv,md,png}.
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from fused_attn.tools import bench  # noqa: E402

B, H, D = 1, 8, 64


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _worker(rank: int, world: int, backend: str, length: int, threads: int, rounds: int, init: str, out: str):
    torch.set_num_threads(threads)
    import fused_attn
    from fused_attn import distributed as cpd

    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)

    def inputs(n):
        g = torch.Generator().manual_seed(0)
        q, k, v, dout = (torch.randn(B, H, n, D, generator=g) for _ in range(4))
        if world > 1:
            q, k, v, dout = (cpd.zigzag_shard(t, dim=2) for t in (q, k, v, dout))
        return [t.requires_grad_() for t in (q, k, v)] + [dout]

    saved = {}

    def pack(t):  # what autograd keeps from forward for backward: the attention's activations
        saved[(t.data_ptr(), t.dtype)] = t.numel() * t.element_size()
        return t

    def step(q, k, v, dout):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if world > 1:
                out = cpd.ring_attention(q, k, v, is_causal=True, backend=backend)
            else:
                out = fused_attn.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
        out.backward(dout)
        for t in (q, k, v):
            t.grad = None

    step(*inputs(256))  # libraries, thread pools and the allocator's arenas come up before the baseline
    before = _rss_mb()
    tensors = inputs(length)

    times = []
    for i in range(rounds + 1):  # the first is the warm-up
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        step(*tensors)
        if world > 1:
            dist.barrier()  # the step ends when the slowest rank is done
        if i:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"ms": 1e3 * min(times), "peak_mb": max(0.0, peak - before),
                   "saved_mb": sum(saved.values()) / 2 ** 20}, f)
    if world > 1:
        dist.destroy_process_group()


def measure(world: int, backend: str, length: int, rounds: int) -> dict:
    threads = max(1, (os.cpu_count() or 1) // world)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        mp.spawn(_worker, args=(world, backend, length, threads, rounds, os.path.join(tmp, "init"), out), nprocs=world,
                 join=True)
        per_rank = []
        for r in range(world):
            with open(f"{out}.{r}") as f:
                per_rank.append(json.load(f))
    return {key: max(p[key] for p in per_rank) for key in ("ms", "peak_mb", "saved_mb")}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2, help="processes of the ring")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=_common.RESULTS)
    args = p.parse_args()
    lengths = (2048, 4096) if args.quick else (4096, 8192, 16384)
    env = bench.environment(torch.device("cpu"))
    rows = []
    with _common.progress_printer("context parallel") as update:
        for length in lengths:
            flops = bench.attention_flops(B, H, length, length, D, D, True, "fwd+bwd")
            single = None
            for world, backend in ((1, "cpu"), (args.world, "cpu"), (1, "torch")):
                update(f"L={length}, {world} process(es), {backend}")
                m = measure(world, backend, length, args.rounds)
                name = "torch" if backend == "torch" else "1 process" if world == 1 else f"{world} processes (ring)"
                single = single or m
                extra = {"peak_mb_per_rank": round(m["peak_mb"], 1), "saved_mb_per_rank": round(m["saved_mb"], 1),
                         "saved_vs_1_process": round(m["saved_mb"] / single["saved_mb"], 3),
                         "memory_vs_1_process": round(m["peak_mb"] / single["peak_mb"], 3),
                         "speed_vs_1_process": round(single["ms"] / m["ms"], 3)}
                rows.append(bench.Row("ring_attention", f"L={length}", length, "float32", name, "fwd+bwd", m["ms"],
                                      flops=flops, extra=extra))
    bench.fill_ratios(rows)
    title = "Ring attention (causal, zigzag) vs one process"
    paths = bench.write_results(rows, args.out, "context_parallel_cpu_float32", env, title=title)
    table = ("\n| case | processes | activations MB per rank | vs 1 process | peak MB per rank | vs 1 process | "
             "speed vs 1 process |\n|---|---|---|---|---|---|---|\n")
    table += "".join(f"| {r.case} | {r.backend} | {r.extra['saved_mb_per_rank']} | {r.extra['saved_vs_1_process']} | "
                     f"{r.extra['peak_mb_per_rank']} | {r.extra['memory_vs_1_process']} | "
                     f"{r.extra['speed_vs_1_process']} |\n" for r in rows)
    with open(paths["md"], "a") as f:
        f.write(table)
    print(bench.markdown(rows, env, title=title) + table)
    print("wrote", ", ".join(paths.values()))

if __name__ == "__main__":
    main()
