"""FlashAttention-feature benchmark: sliding windows against full attention with the same
kernel, and packed variable-length batches against the same batch padded to its longest
sequence, interleaved in one run (the fastest of --rounds rounds each), forward and
forward+backward.

Window: B=1, H=8, D=64, L in {2048, 8192} (--quick: 2048), window (256, 0), against full
causal and full non-causal attention on the same backend (the window's ideal speed-up is
L / (2 * 256) over causal, L / 256 over non-causal). Varlen: 8 sequences with lengths
uniform in 64..2048 (seeded), H=8, D=64, causal: `varlen_attention` on the packed tokens
against `scaled_dot_product_attention` on the batch right-padded to the longest sequence,
causal (which keeps real queries off the padding; the padding fraction is the ideal saving).
float32 on the CPU (`cpu` kernels), bfloat16 on a GPU.

    python benchmarks/bench_attention_features.py [--device cpu] [--quick] [--rounds 3]

Writes benchmarks/results/attention_features_<device>_<dtype>.{csv,md,png}.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

import torch  # noqa: E402

import fused_attn as fa  # noqa: E402
from fused_attn.tools import bench  # noqa: E402

H, D, WINDOW = 8, 64, 256


def _grad_step(fn, tensors):
    def run():
        out = fn()
        out.backward(torch.ones_like(out))
        for t in tensors:
            t.grad = None
    return run


def run(device, dtype, quick, progress, rounds=3):
    backend = "cpu" if device.type == "cpu" else "auto"
    rows = []
    for L in ((2048,) if quick else (2048, 8192)):
        gen = torch.Generator().manual_seed(L)
        q, k, v = (torch.randn(1, H, L, D, generator=gen).to(device, dtype).requires_grad_() for _ in range(3))
        calls = {"window (256, 0)": lambda: fa.scaled_dot_product_attention(q, k, v, window_size=(WINDOW, 0),
                                                                           backend=backend),
                 "causal": lambda: fa.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend),
                 "full": lambda: fa.scaled_dot_product_attention(q, k, v, backend=backend)}
        work = {"window (256, 0)": L * (WINDOW + 1) - WINDOW * (WINDOW + 1) // 2, "causal": L * (L + 1) // 2,
                "full": L * L}
        for direction in ("fwd", "fwd+bwd"):
            progress(f"window L={L} {direction}")
            fns = {name: (torch.no_grad()(f) if direction == "fwd" else _grad_step(f, (q, k, v)))
                   for name, f in calls.items()}
            times = bench.time_candidates(fns, device, budget_s=2.0, rounds=rounds)
            for name, ms in times.items():
                flops = 4.0 * H * D * work[name] * (1 if direction == "fwd" else 3.5)
                rows.append(bench.Row("window", f"L={L}", L, str(dtype).replace("torch.", ""), name, direction, ms,
                                      flops=flops, extra={"speedup_vs_causal": round(times["causal"] / ms, 2),
                                                          "speedup_vs_full": round(times["full"] / ms, 2)}))
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(64, 2049, (8,), generator=gen).tolist()
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    T, Lmax = sum(lengths), max(lengths)
    qp, kp, vp = (torch.randn(T, H, D, generator=gen).to(device, dtype).requires_grad_() for _ in range(3))
    pad = lambda t: torch.stack([torch.nn.functional.pad(t[a:b], (0, 0, 0, 0, 0, Lmax - (b - a)))  # noqa: E731
                                 for a, b in zip(cu.tolist(), cu.tolist()[1:])]).transpose(1, 2)
    qb, kb, vb = (pad(t.detach()).contiguous().requires_grad_() for t in (qp, kp, vp))
    padding = 1 - T / (len(lengths) * Lmax)
    calls = {"packed (varlen)": (lambda: fa.varlen_attention(qp, kp, vp, cu, cu, Lmax, Lmax, is_causal=True,
                                                             backend=backend), (qp, kp, vp)),
             # right-padded: causal attention alone keeps every real query off the padding
             "padded": (lambda: fa.scaled_dot_product_attention(qb, kb, vb, is_causal=True, backend=backend),
                        (qb, kb, vb))}
    work = {"packed (varlen)": sum(n * (n + 1) // 2 for n in lengths),
            "padded": len(lengths) * Lmax * (Lmax + 1) // 2}
    for direction in ("fwd", "fwd+bwd"):
        progress(f"varlen {direction}")
        fns = {name: (torch.no_grad()(f) if direction == "fwd" else _grad_step(f, ts)) for name, (f, ts) in
               calls.items()}
        times = bench.time_candidates(fns, device, budget_s=2.0, rounds=rounds)
        for name, ms in times.items():
            flops = 4.0 * H * D * work[name] * (1 if direction == "fwd" else 3.5)
            rows.append(bench.Row("varlen", f"8 seqs 64..2048, padding {padding:.0%}", T, str(dtype).replace(
                "torch.", ""), name, direction, ms, flops=flops,
                extra={"speedup_vs_padded": round(times["padded"] / ms, 2), "padding_fraction": round(padding, 3)}))
    return rows


def report(rows):
    print("\n| op | case | direction | backend | ms | speed-up vs causal | vs full | vs padded |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.op} | {r.case} | {r.direction} | {r.backend} | {r.ms:.4g} | {r.extra.get('speedup_vs_causal', '')}"
              f" | {r.extra.get('speedup_vs_full', '')} | {r.extra.get('speedup_vs_padded', '')} |")


if __name__ == "__main__":
    _common.main(__doc__, "attention_features", "FlashAttention features: windows and packed batches", run, report)
