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
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

import torch  # noqa: E402

import fused_attn as fa  # noqa: E402
from fused_attn.tools import bench  # noqa: E402

H, D, PAGE = 8, 64, 64
LIMIT_BYTES = 1 << 30


def memory_bandwidth_gbs(device, dtype, n_bytes=1 << 30, rounds=5) -> float:
    """Read bandwidth: the fastest of `rounds` sums of an n_bytes tensor (GB/s)."""
    x = torch.ones(n_bytes // torch.finfo(dtype).bits * 8, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(rounds + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x.sum()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * x.element_size() / best / 1e9


def run(device, dtype, quick, progress):
    backend = "cpu" if device.type == "cpu" else "auto"
    label = backend if backend != "auto" else "fused_attn"
    progress("memory bandwidth")
    bandwidth = memory_bandwidth_gbs(device, dtype)
    lengths = (1024, 8192, 32768) if quick else (1024, 4096, 16384, 32768)
    batches = (1, 8) if quick else (1, 8, 64)
    rows = []
    esize = torch.finfo(dtype).bits // 8
    for n in lengths:
        for b in batches:
            kv_bytes = 2 * b * H * n * D * esize
            if kv_bytes > LIMIT_BYTES:
                continue
            progress(f"cache {n}, batch {b}")
            gen = torch.Generator().manual_seed(n + b)
            q = torch.randn(b, H, 1, D, generator=gen).to(device, dtype)
            k, v = (torch.randn(b, H, n, D, generator=gen).to(device, dtype) for _ in range(2))
            # the same keys as decode_attention's (B, L, Hk, D) cache, and scattered over shuffled pages
            k_cache, v_cache = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
            pages = b * n // PAGE
            order = torch.randperm(pages, generator=gen).to(device)
            pool_k, pool_v = (torch.empty(pages, PAGE, H, D, device=device, dtype=dtype) for _ in range(2))
            pool_k[order], pool_v[order] = k_cache.view(pages, PAGE, H, D), v_cache.view(pages, PAGE, H, D)
            table = order.view(b, n // PAGE).to(torch.int32)
            lens = torch.full((b,), n, dtype=torch.int32, device=device)
            qd = q.transpose(1, 2)  # (B, 1, H, D)
            fns = {f"decode_attention ({label})": lambda: fa.decode_attention(qd, k_cache, v_cache, lens,
                                                                               backend=backend),
                   f"decode_attention paged ({label})": lambda: fa.decode_attention(
                       qd, pool_k, pool_v, lens, block_table=table, backend=backend),
                   f"sdpa ({label})": lambda: fa.scaled_dot_product_attention(q, k, v, backend=backend),
                   "torch": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)}
            with torch.no_grad():
                times = bench.time_candidates(fns, device, budget_s=1.0, rounds=5)
            for name, ms in times.items():
                rows.append(bench.Row("decode", f"cache={n} batch={b}", n * b, str(dtype).replace("torch.", ""),
                                      name, "fwd", ms, flops=4.0 * b * H * n * D, bytes=kv_bytes,
                                      extra={"cache": n, "batch": b, "memory_gbs": round(bandwidth, 1),
                                             "fraction_of_bandwidth": round(kv_bytes / ms / 1e6 / bandwidth, 3)}))
    bench.fill_ratios(rows)
    return rows


def report(rows):
    print(f"\nmemory read bandwidth (measured in this run): {rows[0].extra['memory_gbs']} GB/s")
    print("| case | backend | ms | GB/s of K+V | fraction of the bandwidth |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.case} | {r.backend} | {r.ms:.4g} | {r.gbps:.1f} | {r.extra['fraction_of_bandwidth']} |")


if __name__ == "__main__":
    _common.main(__doc__, "decode", "Decode attention against a KV cache", run, report)
