"""The zero-code-change path: unmodified F.scaled_dot_product_attention, forward + backward,
through fused_attn's torch SDPA provider (fused_attn.activated("cpu")) against torch's own
CPU flash kernel, interleaved in the same run (fastest of the rounds after a warm-up).
FLOPs counted as dense 14 B H L^2 D (forward QK^T and PV, backward 5 GEMMs; halved causal).

    python benchmarks/bench_provider.py [--rounds 6]

Writes benchmarks/results/provider_cpu_float32.{csv,png}.
"""

import argparse
import csv
import os
import time

import torch
import torch.nn.functional as F

import fused_attn

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def step(q, k, v, mask, causal):
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    out.backward(torch.ones_like(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    torch.manual_seed(0)
    B, H, D = 4, 8, 64
    rows = []
    for L in (512, 1024, 2048):
        for kind in ("none", "causal", "keypad"):
            q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))
            mask = None
            if kind == "keypad":  # a quarter of the keys padded
                mask = torch.ones(B, 1, 1, L, dtype=torch.bool)
                mask[..., L * 3 // 4:] = False
            best = {"torch": float("inf"), "fused_attn": float("inf")}
            for r in range(args.rounds):
                for name in (("torch", "fused_attn") if r % 2 == 0 else ("fused_attn", "torch")):
                    with fused_attn.activated("cpu") if name == "fused_attn" else torch.enable_grad():
                        t0 = time.perf_counter()
                        step(q, k, v, mask, kind == "causal")
                        dt = time.perf_counter() - t0
                    if r > 0:  # round 0 warms up
                        best[name] = min(best[name], dt)
            flops = 14 * B * H * L * L * D * (0.5 if kind == "causal" else 1.0)
            row = dict(L=L, mask=kind, torch_ms=best["torch"] * 1e3, ours_ms=best["fused_attn"] * 1e3,
                       ratio=best["torch"] / best["fused_attn"], ours_tflops=flops / best["fused_attn"] / 1e12)
            rows.append(row)
            print(f"B={B} H={H} D={D} L={L:5d} {kind:7s} torch {row['torch_ms']:8.1f} ms  fused_attn "
                  f"{row['ours_ms']:8.1f} ms  vs torch {row['ratio']:.2f}x  {row['ours_tflops']:.3f} TFLOP/s",
                  flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "provider_cpu_float32")
    with open(path + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in ("none", "causal", "keypad"):
        pts = [r for r in rows if r["mask"] == kind]
        ax.plot([r["L"] for r in pts], [r["ratio"] for r in pts], marker="o", label=kind)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length L (B=4, H=8, D=64, float32)")
    ax.set_ylabel("torch time / fused_attn time (fwd+bwd)")
    ax.set_title("F.scaled_dot_product_attention via the provider, CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path + ".png", dpi=120)
    print(f"wrote {path}.csv and {path}.png")


if __name__ == "__main__":
    main()
