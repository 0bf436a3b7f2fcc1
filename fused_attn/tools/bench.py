"""The benchmark harness: timing that can be trusted, the work counted, results written.

Timing. GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every run),
median of the runs. CPU: timings on a shared 2-core machine are noisy (the same
function timed twice with plain medians came out 0.77x and 1.21x of itself), so the
candidates of one size are interleaved round by round and each keeps its fastest
round: identical code then compares at 1.00-1.02x. glibc's malloc returns large freed
blocks to the OS by default, so every fresh multi-MB tensor of an eager op page-faults
again, by an amount that moves with glibc's adaptive thresholds (the same torch
LayerNorm measured 0.5 ms and 5 ms): CPU timing first fixes the thresholds (32 MB mmap,
1 GB trim), as a tuned allocator would, so kernels are compared, not page faults.

Work. Every row carries the FLOPs or the fewest bytes the op must move (each input read
once, each output written once) so it reports TFLOP/s or GB/s, and the ratio to the
``torch`` backend measured in the same run.

Output. CSV + a markdown table (device, versions, date) + a PNG plot per benchmark.
"""

from __future__ import annotations

import csv
import datetime
import math
import os
import platform
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

import fused_attn
from fused_attn import dispatch, reference


@dataclass
class Row:
    op: str
    case: str  # the size, e.g. "rows=4096 hidden=1024"
    size: float  # x-axis value for plots
    dtype: str
    backend: str
    direction: str  # fwd, bwd, fwd+bwd
    ms: float
    flops: float = 0.0
    bytes: float = 0.0
    ratio_to_torch: Optional[float] = None
    extra: dict = field(default_factory=dict)

    @property
    def tflops(self) -> Optional[float]:
        return self.flops / self.ms / 1e9 if self.flops and self.ms > 0 else None

    @property
    def gbps(self) -> Optional[float]:
        return self.bytes / self.ms / 1e6 if self.bytes and self.ms > 0 else None


def environment(device: torch.device) -> dict:
    """Device, versions and date for the report header."""
    info = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
        "fused_attn": fused_attn.__version__,
        "python": platform.python_version(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device"] = f"{props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)"
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["allocator"] = steady_allocator()
    return info


_allocator_note: Optional[str] = None


def steady_allocator() -> str:
    """Fixes glibc malloc's mmap and trim thresholds for this process (once); says what it did."""
    global _allocator_note
    if _allocator_note is None:
        _allocator_note = "system default"
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            m_trim_threshold, m_mmap_threshold = -1, -3
            if libc.mallopt(m_mmap_threshold, 32 << 20) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1:
                _allocator_note = "glibc, mmap threshold 32 MB, trim threshold 1 GB"
        except (OSError, AttributeError):
            pass
    return _allocator_note


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_candidates(fns: dict[str, Callable[[], object]], device: torch.device, *, budget_s: float = 1.0,
                    rounds: int = 7) -> dict[str, float]:
    """Milliseconds per call of each candidate (median of do_bench on a GPU; fastest of
    interleaved rounds on a CPU)."""
    if device.type == "cuda":
        import triton.testing

        return {name: float(triton.testing.do_bench(fn, warmup=25, rep=max(50, int(budget_s * 1000 / len(fns))),
                                                    return_mode="median"))
                for name, fn in fns.items()}
    steady_allocator()
    # CPU: warm up (the allocator settles after a few large allocations), pick a
    # per-round repeat count, then interleave the rounds.
    per_call = {}
    for _ in range(3):
        for fn in fns.values():
            fn()
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        per_call[name] = max(time.perf_counter() - t0, 1e-6)
    best = {name: math.inf for name in fns}
    round_budget = budget_s / max(1, rounds) / max(1, len(fns))
    order = list(fns.items())
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)  # no candidate always follows the same one (cache and allocator state)
        for name, fn in order:
            n = max(1, int(round_budget / per_call[name]))
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / n)
    return {name: v * 1e3 for name, v in best.items()}


def fill_ratios(rows: list[Row]) -> None:
    """ratio_to_torch = torch's time / this row's time, for rows of the same op, case, dtype, direction."""
    torch_ms = {(r.op, r.case, r.dtype, r.direction): r.ms for r in rows if r.backend == "torch"}
    for r in rows:
        t = torch_ms.get((r.op, r.case, r.dtype, r.direction))
        r.ratio_to_torch = t / r.ms if t and r.ms > 0 else None


def usable_backends(op, device: torch.device, wanted: Optional[Sequence[str]] = None, *,
                    declined: Optional[Callable[[str], list]] = None, **probe) -> list[str]:
    """Backends that can run `op` (a dispatch.Op) on this device for inputs like `probe` (or,
    given `declined`, a backend -> reasons function on the public arguments)."""
    # by default not the reference, nor cuda_emu or triton under its interpreter: emulated
    # time says nothing of a GPU's (name them in `wanted` to time them anyway)
    emulated = ("cuda_emu", "triton") if dispatch.triton_interpreting() else ("cuda_emu",)
    names = list(wanted) if wanted else [b for b in fused_attn.BACKENDS if b != "reference" and b not in emulated]
    declined = declined or (lambda b: op.reasons(b, device, **probe))
    return [b for b in names if not declined(b)]


# --------------------------------------------------------------------------- output


def _fmt(v, digits=3) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def output_dir_problem(out_dir: str) -> Optional[str]:
    """Creates out_dir if needed; returns why it cannot be written to, or None."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        return f"cannot create output folder {out_dir}: {e.strerror}"
    if not os.access(out_dir, os.W_OK):
        return f"output folder {out_dir} is not writable"
    return None


def write_results(rows: list[Row], out_dir: str, name: str, env: dict, *, title: str) -> dict[str, str]:
    """Write name.csv, name.md and name.png into out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{name}.{ext}") for ext in ("csv", "md", "png")}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["op", "case", "size", "dtype", "backend", "direction", "ms", "tflops", "gbps", "ratio_to_torch",
                    *sorted({k for r in rows for k in r.extra})])
        extra_keys = sorted({k for r in rows for k in r.extra})
        for r in rows:
            w.writerow([r.op, r.case, r.size, r.dtype, r.backend, r.direction, f"{r.ms:.6g}", _fmt(r.tflops, 4),
                        _fmt(r.gbps, 4), _fmt(r.ratio_to_torch, 4), *[r.extra.get(k, "") for k in extra_keys]])
    with open(paths["md"], "w") as f:
        f.write(markdown(rows, env, title=title))
    plot(rows, paths["png"], title=f"{title} — {env.get('device', '')}")
    return paths


def markdown(rows: list[Row], env: dict, *, title: str) -> str:
    head = f"## {title}\n\n" + ", ".join(f"{k}: {v}" for k, v in env.items()) + "\n\n"
    lines = ["| case | dtype | direction | backend | ms | TFLOP/s | GB/s | vs torch |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r.ratio_to_torch:.2f}x" if r.ratio_to_torch else ""
        lines.append(f"| {r.case} | {r.dtype} | {r.direction} | {r.backend} | {r.ms:.4g} | {_fmt(r.tflops)} | "
                     f"{_fmt(r.gbps)} | {ratio} |")
    return head + "\n".join(lines) + "\n"


def plot(rows: list[Row], path: str, *, title: str) -> Optional[str]:
    """Throughput (TFLOP/s or GB/s) vs size, one line per backend, one panel per direction/dtype/variant."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = sorted({(r.direction, r.dtype, r.extra.get("variant", "")) for r in rows})
    if not panels:
        return None
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), squeeze=False)
    for ax, (direction, dtype, variant) in zip(axes.flat, panels):
        sub = [r for r in rows if (r.direction, r.dtype, r.extra.get("variant", "")) == (direction, dtype, variant)]
        use_flops = any(r.tflops for r in sub)
        for backend in sorted({r.backend for r in sub}):
            pts = sorted((r.size, r.tflops if use_flops else r.gbps) for r in sub if r.backend == backend)
            ax.plot([p[0] for p in pts], [p[1] or 0 for p in pts], marker="o", label=backend)
        ax.set_xscale("log", base=2)
        ax.set_title(" ".join(x for x in (direction, dtype, variant) if x), fontsize=10)
        ax.set_ylabel("TFLOP/s" if use_flops else "GB/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- LayerNorm


def layer_norm_sizes(device: torch.device, quick: bool = False) -> list[tuple[int, int]]:
    """(rows, hidden) pairs: hidden sweeps 256..16384 (plus an odd size) at ~a fixed element count."""
    if device.type == "cuda":
        hidden = [256, 512, 1024, 1536, 2048, 4096, 8192, 16384]
        total = 1 << 26
    else:
        hidden = [256, 768, 1024, 4096] if not quick else [768, 4096]
        total = 1 << 21 if not quick else 1 << 19
    return [(max(1, total // h), h) for h in hidden]


def bench_layer_norm(device: torch.device, *, dtype: torch.dtype, backends: Optional[Sequence[str]] = None,
                     sizes: Optional[Iterable[tuple[int, int]]] = None, residual: bool = False, quick: bool = False,
                     progress: Optional[Callable[[str], None]] = None) -> list[Row]:
    """LayerNorm forward and backward GB/s per backend over (rows, hidden)."""
    from ..ops import layer_norm as op

    sizes = list(sizes or layer_norm_sizes(device, quick))
    probe = torch.empty(0, dtype=dtype, device=device)
    names = usable_backends(op.OP, device, backends, input=probe, weight=None, bias=None, residual=None)
    rows: list[Row] = []
    elt = torch.tensor([], dtype=dtype).element_size()
    budget = 0.3 if quick else 1.0
    for m, n in sizes:
        if progress:
            progress(f"layer_norm {m}x{n} {str(dtype).replace('torch.', '')}")
        x = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
        b = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
        r = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True) if residual else None
        dy = torch.randn(m, n, device=device, dtype=dtype)
        fwd, bwd = {}, {}
        for name in names:
            def f(name=name):
                with torch.no_grad():
                    return fused_attn.layer_norm(x, n, w, b, residual=r, backend=name)
            y = fused_attn.layer_norm(x, n, w, b, residual=r, backend=name)
            wrt = [x, w, b] + ([r] if residual else [])

            def g(y=y, wrt=wrt):
                return torch.autograd.grad(y, wrt, dy, retain_graph=True)
            fwd[name], bwd[name] = f, g
        case = f"rows={m} hidden={n}" + (" +residual" if residual else "")
        io = (2 if residual else 1)
        fwd_bytes = (io * m * n + m * n) * elt + 2 * n * elt + 8 * m  # x (+r), y, w+b, mean+rstd
        bwd_bytes = (3 * m * n) * elt + 3 * n * elt + 8 * m  # dy, x, dx, w, dw+db, stats
        for direction, fns, nbytes in (("fwd", fwd, fwd_bytes), ("bwd", bwd, bwd_bytes)):
            for name, ms in time_candidates(fns, device, budget_s=budget).items():
                rows.append(Row("layer_norm", case, n, str(dtype).replace("torch.", ""), name, direction, ms,
                                bytes=nbytes))
        x = w = b = r = dy = fwd = bwd = None  # free this size's tensors before the next
    fill_ratios(rows)
    return rows


# --------------------------------------------------------------------------- attention


def attention_flops(B: int, H: int, Lq: int, Lk: int, D: int, Dv: int, causal: bool, direction: str) -> float:
    """4*B*H*Lq*Lk*D for the forward (2 matmuls; half when causal with Lq == Lk),
    backward 2.5x the forward."""
    fwd = 2.0 * B * H * Lq * Lk * (D + Dv)
    if causal:
        fwd /= 2
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[direction]


def torch_sdpa_variants(device: torch.device) -> dict:
    """torch's SDPA kernels to compare against: name -> SDPBackend (None = torch's own choice)."""
    from torch.nn.attention import SDPBackend

    out = {"torch": None}
    if device.type == "cuda":
        out.update({"torch_flash": SDPBackend.FLASH_ATTENTION, "torch_efficient": SDPBackend.EFFICIENT_ATTENTION,
                    "torch_cudnn": SDPBackend.CUDNN_ATTENTION, "torch_math": SDPBackend.MATH})
    else:
        out.update({"torch_flash": SDPBackend.FLASH_ATTENTION, "torch_math": SDPBackend.MATH})
    return out


def attention_cases(device: torch.device, quick: bool = False) -> list[dict]:
    """GPU: seqlen 512..16k at B*L = 16k tokens, head dim 64 and 128 (H*D = 2048), causal or
    not, with and without a key-padding mask. CPU: B=4, H=8, D=64, L 128..2048, no mask /
    causal / key-padding bool / arbitrary float mask."""
    cases = []
    if device.type == "cuda":
        lengths = [512, 1024, 2048, 4096, 8192, 16384] if not quick else [1024, 4096]
        for d in (64, 128):
            for L in lengths:
                for mask in ("none", "causal", "keypad"):
                    cases.append(dict(B=max(1, 16384 // L), H=2048 // d, L=L, D=d, mask=mask))
    else:
        lengths = [128, 512, 1024, 2048] if not quick else [256, 1024]
        for L in lengths:
            for mask in ("none", "causal", "keypad", "float"):
                cases.append(dict(B=4, H=8, L=L, D=64, mask=mask))
    return cases


def _attention_inputs(case: dict, dtype, device):
    B, H, L, D = case["B"], case["H"], case["L"], case["D"]
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(dtype).to(device).requires_grad_() for _ in range(3))
    mask, causal = None, False
    if case["mask"] == "causal":
        causal = True
    elif case["mask"] == "keypad":
        lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
        mask = (torch.arange(L)[None, :] < lengths[:, None]).view(B, 1, 1, L).to(device)
    elif case["mask"] == "float":
        mask = (torch.randn(B, 1, L, L, generator=g) * 2).to(dtype).to(device)
    return q, k, v, mask, causal


def bench_attention(device: torch.device, *, dtype: torch.dtype, backends: Optional[Sequence[str]] = None,
                    cases: Optional[list] = None, quick: bool = False, directions=("fwd", "bwd", "fwd+bwd"),
                    progress: Optional[Callable[[str], None]] = None) -> list[Row]:
    """Attention TFLOP/s per backend (ours and every torch SDPA kernel that accepts the inputs)."""
    from torch.nn.attention import sdpa_kernel

    from ..ops import attention as op

    rows: list[Row] = []
    budget = 0.3 if quick else 1.0
    for case in cases or attention_cases(device, quick):
        q, k, v, mask, causal = _attention_inputs(case, dtype, device)
        ours = usable_backends(op.OP, device, [b for b in (backends or ("cuda", "triton", "cpu"))],
                               declined=lambda b: op.reasons(b, q, k, v, mask, 0.0, causal))
        candidates = {}
        for name in ours:
            candidates[name] = lambda name=name: fused_attn.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, backend=name)
        for name, sdp in torch_sdpa_variants(device).items():
            def run(sdp=sdp):
                if sdp is None:
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
                with sdpa_kernel(sdp):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
            try:  # a torch kernel that does not accept these inputs raises: leave it out
                with torch.no_grad():
                    run()
            except RuntimeError:
                continue
            candidates[name] = run
        label = f"B={case['B']} H={case['H']} L={case['L']} D={case['D']} mask={case['mask']}"
        for direction in directions:
            if progress:
                progress(f"attention {label} {direction}")
            fns = {}
            for name, f in candidates.items():
                if direction == "fwd":
                    fns[name] = _no_grad(f)
                else:
                    out = f()
                    dout = torch.randn_like(out)
                    if direction == "bwd":
                        fns[name] = lambda out=out, dout=dout: torch.autograd.grad(out, (q, k, v), dout,
                                                                                     retain_graph=True)
                    else:
                        fns[name] = lambda f=f, dout=dout: torch.autograd.grad(f(), (q, k, v), dout)
            flops = attention_flops(case["B"], case["H"], case["L"], case["L"], case["D"], case["D"], causal,
                                    direction)
            for name, ms in time_candidates(fns, device, budget_s=budget).items():
                rows.append(Row("attention", label, case["L"], str(dtype).replace("torch.", ""), name, direction, ms,
                                flops=flops, extra={"variant": f"D={case['D']} mask={case['mask']}"}))
    fill_ratios(rows)
    return rows


def _no_grad(f):
    def run():
        with torch.no_grad():
            return f()
    return run


# --------------------------------------------------------------------------- feed-forward


def feed_forward_cases(device: torch.device, quick: bool = False) -> list[dict]:
    """tokens x (d_model, d_ff): GPU up to 16k tokens at (1024, 4096); CPU up to 4096 tokens."""
    if device.type == "cuda":
        sizes = [(4096, 1024, 4096), (16384, 1024, 4096), (8192, 2048, 8192), (16384, 768, 3072)]
    else:
        sizes = [(512, 512, 2048), (2048, 512, 2048), (1024, 1024, 4096), (4096, 1024, 4096)]
    if quick:
        sizes = sizes[:1] if device.type == "cpu" else sizes[:2]
    return [dict(tokens=t, d_model=dm, d_ff=dff) for t, dm, dff in sizes]


def bench_feed_forward(device: torch.device, *, dtype: torch.dtype, backends: Optional[Sequence[str]] = None,
              cases: Optional[list] = None, quick: bool = False, activation: str = "gelu",
              directions=("fwd", "fwd+bwd"), progress: Optional[Callable[[str], None]] = None) -> list[Row]:
    """Feed-forward (with residual) TFLOP/s per backend vs torch eager (F.linear + activation +
    F.linear + add) and vs the two bare GEMMs ('gemm_only': the time fusion cannot go below)."""
    from ..ops import feed_forward as op

    rows: list[Row] = []
    budget = 0.3 if quick else 1.0
    for case in cases or feed_forward_cases(device, quick):
        M, dm, dff = case["tokens"], case["d_model"], case["d_ff"]
        g = torch.Generator().manual_seed(0)
        mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype).to(device)  # noqa: E731
        x, res = mk(M, dm).requires_grad_(), mk(M, dm)
        w1, w2 = mk(dff, dm, scale=dm ** -0.5).requires_grad_(), mk(dm, dff, scale=dff ** -0.5).requires_grad_()
        b1, b2 = mk(dff).requires_grad_(), mk(dm).requires_grad_()
        names = usable_backends(op.OP, device, backends, input=x, w1=w1, dropout_p=0.0)
        label = f"tokens={M} d_model={dm} d_ff={dff}"
        h_plain = torch.empty(M, dff, dtype=dtype, device=device)
        for direction in directions:
            if progress:
                progress(f"feed_forward {label} {direction}")
            fns = {}
            for name in names:
                def f(name=name):
                    return fused_attn.feed_forward(x, w1, b1, w2, b2, activation=activation, residual=res,
                                                   backend=name)
                if direction == "fwd":
                    fns[name] = _no_grad(f)
                else:
                    wrt = (x, w1, b1, w2, b2)
                    fns[name] = lambda f=f, wrt=wrt: torch.autograd.grad(f().sum(), wrt)
            if direction == "fwd":
                fns["gemm_only"] = _no_grad(lambda: torch.mm(torch.mm(x, w1.t(), out=h_plain), w2.t()))
            flops = (4.0 if direction == "fwd" else 12.0) * M * dm * dff
            for name, ms in time_candidates(fns, device, budget_s=budget).items():
                rows.append(Row("feed_forward", label, M * dm * dff, str(dtype).replace("torch.", ""), name, direction,
                                ms, flops=flops, extra={"variant": activation}))
    fill_ratios(rows)
    return rows


# --------------------------------------------------------------------------- the model


class TorchTransformerBaseline(torch.nn.Module):
    """torch.nn.Transformer with the same embeddings, sizes and generator as make_model:
    the eager baseline of the model benchmark (it has no K/V cache: decoding re-runs the
    decoder over the prefix, as nn.Transformer users do)."""

    def __init__(self, src_vocab, tgt_vocab, N, d_model, d_ff, h, pad_id=0):
        super().__init__()
        import math as _math

        from ..models.transformer import PositionalEncoding

        self.pad_id, self.scale = pad_id, _math.sqrt(d_model)
        self.src_embed = torch.nn.Embedding(src_vocab, d_model)
        self.tgt_embed = torch.nn.Embedding(tgt_vocab, d_model)
        self.pos = PositionalEncoding(d_model, 0.0)
        self.core = torch.nn.Transformer(d_model, h, N, N, d_ff, dropout=0.0, batch_first=True, norm_first=True)
        self.proj = torch.nn.Linear(d_model, tgt_vocab)

    def encode(self, src):
        return self.core.encoder(self.pos(self.src_embed(src) * self.scale), src_key_padding_mask=src == self.pad_id)

    def decode(self, memory, src, tgt):
        causal = torch.nn.Transformer.generate_square_subsequent_mask(tgt.size(1), device=tgt.device)
        return self.core.decoder(self.pos(self.tgt_embed(tgt) * self.scale), memory, tgt_mask=causal,
                                 tgt_is_causal=True, memory_key_padding_mask=src == self.pad_id)

    def forward(self, src, tgt):
        return F.log_softmax(self.proj(self.decode(self.encode(src), src, tgt)).float(), dim=-1)

    @torch.no_grad()
    def greedy_decode(self, src, max_len, start_id, end_id=None, use_cache=True):
        memory = self.encode(src)
        ys = torch.full((src.size(0), 1), start_id, dtype=torch.long, device=src.device)
        for _ in range(max_len - 1):
            nxt = self.proj(self.decode(memory, src, ys)[:, -1]).argmax(-1)
            ys = torch.cat([ys, nxt[:, None]], 1)
        return ys


def model_cases(device: torch.device, quick: bool = False) -> list[dict]:
    if device.type == "cuda":
        return [dict(N=6, d_model=512, d_ff=2048, h=8, B=32, L=512, vocab=32000, decode_steps=64)]
    if quick:
        return [dict(N=2, d_model=128, d_ff=512, h=4, B=8, L=64, vocab=1000, decode_steps=16)]
    return [dict(N=2, d_model=256, d_ff=1024, h=4, B=16, L=128, vocab=8000, decode_steps=32)]


def bench_model(device: torch.device, *, dtype: torch.dtype, backends: Optional[Sequence[str]] = None,
                cases: Optional[list] = None, quick: bool = False,
                progress: Optional[Callable[[str], None]] = None) -> list[Row]:
    """Training-step and greedy-decoding tokens/s of the encoder-decoder per backend, and of
    torch.nn.Transformer of the same size in eager mode ('torch.nn.Transformer')."""
    from ..models import make_model

    rows: list[Row] = []
    budget = 1.0 if quick else 3.0
    names = list(backends or [b for b in ("cuda", "triton", "cpu", "torch")
                              if fused_attn.available_backends()[b] is None
                              and device.type in fused_attn.dispatch.backend_devices(b)])
    for case in cases or model_cases(device, quick):
        N, dm, dff, h, B, L, V = (case[k] for k in ("N", "d_model", "d_ff", "h", "B", "L", "vocab"))
        g = torch.Generator().manual_seed(0)
        src = torch.randint(3, V, (B, L), generator=g).to(device)
        tgt = torch.randint(3, V, (B, L), generator=g).to(device)
        models = {}
        for name in names:
            torch.manual_seed(0)
            models[name] = make_model(V, V, N, dm, dff, h, dropout=0.0, backend=name).to(device, dtype)
        torch.manual_seed(0)
        models["torch.nn.Transformer"] = TorchTransformerBaseline(V, V, N, dm, dff, h).to(device, dtype)
        label = f"N={N} d_model={dm} h={h} B={B} L={L}"
        train, decode = {}, {}
        for name, m in models.items():
            opt = torch.optim.Adam(m.parameters(), lr=1e-4)

            def step(m=m, opt=opt):
                opt.zero_grad(set_to_none=True)
                loss = F.nll_loss(m(src, tgt[:, :-1]).reshape(-1, V), tgt[:, 1:].reshape(-1))
                loss.backward()
                opt.step()
            train[name] = step
            decode[name] = lambda m=m: m.eval().greedy_decode(src[:, : L // 2], case["decode_steps"], 1)
        for direction, fns, tokens in (("train", train, B * (L - 1)), ("decode", decode, B * case["decode_steps"])):
            if progress:
                progress(f"model {label} {direction}")
            for name, ms in time_candidates(fns, device, budget_s=budget, rounds=3).items():
                rows.append(Row("model", label, L, str(dtype).replace("torch.", ""), name, direction, ms,
                                extra={"tokens_per_s": tokens / ms * 1e3}))
    # ratio to the nn.Transformer baseline (tokens/s, same run)
    base = {(r.case, r.direction): r.ms for r in rows if r.backend == "torch.nn.Transformer"}
    for r in rows:
        b = base.get((r.case, r.direction))
        r.ratio_to_torch = b / r.ms if b and r.ms > 0 else None
    return rows


# ---------------------------------------------------------------- the registry
#
# Every benchmark runs through one entry: `fused-attn bench --op NAME` and
# `python benchmarks/bench_NAME.py` both call its run and both write
# results_name(NAME, device, dtype).{csv,md,png}.


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    run: Callable[..., list[Row]]  # run(device, dtype, quick, progress) -> rows
    report: Optional[Callable[[list[Row]], None]] = None  # printed after the table by the scripts
    default: bool = True  # in `fused-attn bench` without --op


REGISTRY: dict[str, Benchmark] = {}


def register(name: str, title: str, *, report: Optional[Callable[[list[Row]], None]] = None, default: bool = True):
    """Decorator: run(device, dtype, quick, progress) -> rows becomes the benchmark `name`."""
    def add(run):
        REGISTRY[name] = Benchmark(name, title, run, report, default)
        return run
    return add


def results_name(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The file stem of a benchmark's results: <name>_<device type>_<dtype>."""
    return f"{name}_{device.type}_{str(dtype).replace('torch.', '')}"


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@register("layer_norm", "LayerNorm")
def _layer_norm(device, dtype, quick, progress):
    return [row for residual in (False, True)
            for row in bench_layer_norm(device, dtype=dtype, residual=residual, quick=quick, progress=progress)]


@register("attention", "Attention")
def _attention(device, dtype, quick, progress):
    directions = ("fwd", "fwd+bwd") if device.type == "cpu" else ("fwd", "bwd", "fwd+bwd")
    cases = attention_cases(device, quick)
    if quick:  # a few representative sizes (the demo)
        cases = [c for c in cases if c["mask"] in ("none", "keypad")][:4]
    return bench_attention(device, dtype=dtype, quick=quick, cases=cases, directions=directions, progress=progress)


@register("feed_forward", "Feed-forward")
def _feed_forward(device, dtype, quick, progress):
    return bench_feed_forward(device, dtype=dtype, quick=quick, progress=progress)


def _model_report(rows):
    for r in rows:
        print(f"{r.case} {r.direction:6s} {r.backend:22s} {r.extra['tokens_per_s']:10.0f} tokens/s")


@register("model", "Encoder-decoder model", report=_model_report)
def _model(device, dtype, quick, progress):
    return bench_model(device, dtype=dtype, quick=quick, progress=progress)


# FlashAttention features: windows and packed batches (B=1, H=8, D=64, window (256, 0))
FEATURE_HEADS, FEATURE_HEAD_DIM, FEATURE_WINDOW = 8, 64, 256


def _grad_step(fn, tensors):
    def run():
        out = fn()
        out.backward(torch.ones_like(out))
        for t in tensors:
            t.grad = None
    return run


def _time_both_directions(calls, device, rounds, progress, label):
    """{name: (fn, tensors needing grads)} -> {direction: {name: ms}}: forward under no_grad and
    forward+backward, each direction's candidates interleaved."""
    out = {}
    for direction in ("fwd", "fwd+bwd"):
        progress(f"{label} {direction}")
        fns = {name: (torch.no_grad()(f) if direction == "fwd" else _grad_step(f, ts))
               for name, (f, ts) in calls.items()}
        out[direction] = time_candidates(fns, device, budget_s=2.0, rounds=rounds)
    return out


def _attention_flops(H, D, pairs, direction):
    """Matmul FLOPs of attention over `pairs` (query, key) pairs; backward counted as 2.5x forward."""
    return 4.0 * H * D * pairs * (1 if direction == "fwd" else 3.5)


def _features_report(rows):
    print("\n| op | case | direction | backend | ms | speed-up vs causal | vs full | vs padded | vs bias mask |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.op} | {r.case} | {r.direction} | {r.backend} | {r.ms:.4g} | {r.extra.get('speedup_vs_causal', '')}"
              f" | {r.extra.get('speedup_vs_full', '')} | {r.extra.get('speedup_vs_padded', '')}"
              f" | {r.extra.get('speedup_vs_bias_mask', '')} |")


@register("attention_features", "FlashAttention features: windows, ALiBi and packed batches",
          report=_features_report, default=False)
def _attention_features(device, dtype, quick, progress, rounds=3):
    """Sliding window (256, 0) against full causal and full attention with the same backend, at
    L in {2048, 8192} (quick: 2048); causal ALiBi at L = 2048, the kernels adding it from the
    slopes against the same bias passed as an (H, L, L) float mask and against no ALiBi;
    varlen_attention over 8 sequences of 64..2048 tokens and 256 of 32..128 (quick: the 8)
    against the batch right-padded to the longest, causal. fwd and fwd+bwd. On a GPU, each of
    its kernel backends (the candidates' names end in " [triton]", " [cuda]")."""
    if device.type == "cpu":
        return _feature_rows(device, dtype, quick, progress, rounds, "cpu", "")
    from ..ops import attention as op

    probe = torch.zeros(1, FEATURE_HEADS, 64, FEATURE_HEAD_DIM, dtype=dtype, device=device)
    rows = []
    for backend in usable_backends(op.OP, device, ("triton", "cuda"),
                                   declined=lambda b: op.reasons(b, probe, probe, probe, None, 0.0, False)):
        rows += _feature_rows(device, dtype, quick, progress, rounds, backend, f" [{backend}]")
    return rows


def _feature_rows(device, dtype, quick, progress, rounds, backend, suffix):
    """_attention_features on one backend; suffix ends each candidate's name."""
    H, D, W = FEATURE_HEADS, FEATURE_HEAD_DIM, FEATURE_WINDOW
    name_of = str(dtype).replace("torch.", "")
    rows = []
    for L in ((2048,) if quick else (2048, 8192)):
        gen = torch.Generator().manual_seed(L)
        q, k, v = (torch.randn(1, H, L, D, generator=gen).to(device, dtype).requires_grad_() for _ in range(3))
        window = f"window ({W}, 0)"
        calls = {window: lambda: fused_attn.scaled_dot_product_attention(q, k, v, window_size=(W, 0), backend=backend),
                 "causal": lambda: fused_attn.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend),
                 "full": lambda: fused_attn.scaled_dot_product_attention(q, k, v, backend=backend)}
        work = {window: L * (W + 1) - W * (W + 1) // 2, "causal": L * (L + 1) // 2, "full": L * L}
        timed = _time_both_directions({name: (f, (q, k, v)) for name, f in calls.items()}, device, rounds, progress,
                                      f"window L={L}")
        for direction, times in timed.items():
            for name, ms in times.items():
                flops = _attention_flops(H, D, work[name], direction)
                rows.append(Row("window", f"L={L}", L, name_of, name + suffix, direction, ms, flops=flops,
                                extra={"speedup_vs_causal": round(times["causal"] / ms, 2),
                                       "speedup_vs_full": round(times["full"] / ms, 2)}))
    rows += _alibi_rows(device, dtype, backend, rounds, progress, suffix)
    for count, shortest, longest in ((8, 64, 2048),) if quick else ((8, 64, 2048), (256, 32, 128)):
        rows += _varlen_rows(device, dtype, backend, rounds, progress, count, shortest, longest, suffix)
    return rows


def _varlen_rows(device, dtype, backend, rounds, progress, count, shortest, longest, suffix):
    """varlen_attention over `count` sequences of shortest..longest tokens (uniform, seeded)
    against the batch right-padded to the longest, causal (see _attention_features)."""
    H, D = FEATURE_HEADS, FEATURE_HEAD_DIM
    name_of = str(dtype).replace("torch.", "")
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(shortest, longest + 1, (count,), generator=gen).tolist()
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    T, Lmax = sum(lengths), max(lengths)
    qp, kp, vp = (torch.randn(T, H, D, generator=gen).to(device, dtype).requires_grad_() for _ in range(3))
    pad = lambda t: torch.stack([F.pad(t[a:b], (0, 0, 0, 0, 0, Lmax - (b - a)))  # noqa: E731
                                 for a, b in zip(cu.tolist(), cu.tolist()[1:])]).transpose(1, 2)
    qb, kb, vb = (pad(t.detach()).contiguous().requires_grad_() for t in (qp, kp, vp))
    padding = 1 - T / (len(lengths) * Lmax)
    calls = {"packed (varlen)": (lambda: fused_attn.varlen_attention(qp, kp, vp, cu, cu, Lmax, Lmax, is_causal=True,
                                                                     backend=backend), (qp, kp, vp)),
             # right-padded: causal attention alone keeps every real query off the padding
             "padded": (lambda: fused_attn.scaled_dot_product_attention(qb, kb, vb, is_causal=True, backend=backend),
                        (qb, kb, vb))}
    work = {"packed (varlen)": sum(n * (n + 1) // 2 for n in lengths),
            "padded": len(lengths) * Lmax * (Lmax + 1) // 2}
    rows = []
    case = f"{count} seqs {shortest}..{longest}, padding {padding:.0%}"
    for direction, times in _time_both_directions(calls, device, rounds, progress, f"varlen {count} seqs").items():
        for name, ms in times.items():
            flops = _attention_flops(H, D, work[name], direction)
            rows.append(Row("varlen", case, T, name_of, name + suffix, direction, ms, flops=flops,
                            extra={"speedup_vs_padded": round(times["padded"] / ms, 2),
                                   "padding_fraction": round(padding, 3)}))
    return rows


def _alibi_rows(device, dtype, backend, rounds, progress, suffix, L=2048):
    """Causal attention with ALiBi from the slopes, as a bias mask, and without (see _attention_features)."""
    H, D = FEATURE_HEADS, FEATURE_HEAD_DIM
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, H, L, D, generator=gen).to(device, dtype).requires_grad_() for _ in range(3))
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)], device=device)  # ALiBi's geometric slopes
    bias = reference.alibi_bias(slopes, L, L).to(dtype)  # (H, L, L), what the kernels read before
    causal = dict(is_causal=True, backend=backend)
    calls = {"alibi (slopes)": lambda: fused_attn.scaled_dot_product_attention(q, k, v, alibi_slopes=slopes, **causal),
             "alibi (bias mask)": lambda: fused_attn.scaled_dot_product_attention(
                 q, k, v, attn_mask=bias.masked_fill(~reference.causal_allowed(L, L, "upper_left", device),
                                                     float("-inf")), backend=backend),
             "no alibi": lambda: fused_attn.scaled_dot_product_attention(q, k, v, **causal)}
    rows = []
    timed = _time_both_directions({name: (f, (q, k, v)) for name, f in calls.items()}, device, rounds, progress,
                                  f"alibi L={L}")
    for direction, times in timed.items():
        for name, ms in times.items():
            flops = _attention_flops(H, D, L * (L + 1) // 2, direction)
            rows.append(Row("alibi", f"L={L}, causal", L, str(dtype).replace("torch.", ""), name + suffix, direction,
                            ms, flops=flops, extra={"speedup_vs_bias_mask": round(times["alibi (bias mask)"] / ms, 2)}))
    return rows


# Decode: one query per sequence against a KV cache (H=8 kv heads, D=64, pages of 64 tokens)
DECODE_HEADS, DECODE_HEAD_DIM, DECODE_PAGE = 8, 64, 64
DECODE_LIMIT_BYTES = 1 << 30  # K + V of one case


def memory_bandwidth_gbs(device: torch.device, dtype: torch.dtype, n_bytes: int = 1 << 30, rounds: int = 5) -> float:
    """Read bandwidth: the fastest of `rounds` sums of an n_bytes tensor (GB/s)."""
    x = torch.ones(n_bytes // torch.finfo(dtype).bits * 8, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(rounds + 1):
        _sync(device)
        t0 = time.perf_counter()
        x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return x.numel() * x.element_size() / best / 1e9


def _decode_report(rows):
    print(f"\nmemory read bandwidth (measured in this run): {rows[0].extra['memory_gbs']} GB/s")
    print("| case | backend | ms | GB/s of K+V | fraction of the bandwidth |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.case} | {r.backend} | {r.ms:.4g} | {r.gbps:.1f} | {r.extra['fraction_of_bandwidth']} |")


@register("decode", "Decode attention against a KV cache", report=_decode_report, default=False)
def _decode(device, dtype, quick, progress):
    """Cache lengths 1k..32k, batch 1..64 (K + V under 1 GB), one query per sequence, in the
    same interleaved rounds: decode_attention on a contiguous and on a paged cache (shuffled
    pages), the attention kernels through scaled_dot_product_attention, and torch's SDPA; GB/s
    of K and V read against the memory bandwidth measured in the same run."""
    H, D, PAGE = DECODE_HEADS, DECODE_HEAD_DIM, DECODE_PAGE
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
            if kv_bytes > DECODE_LIMIT_BYTES:
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
            fns = {f"decode_attention ({label})": lambda: fused_attn.decode_attention(qd, k_cache, v_cache, lens,
                                                                                       backend=backend),
                   f"decode_attention paged ({label})": lambda: fused_attn.decode_attention(
                       qd, pool_k, pool_v, lens, block_table=table, backend=backend),
                   f"sdpa ({label})": lambda: fused_attn.scaled_dot_product_attention(q, k, v, backend=backend),
                   "torch": lambda: F.scaled_dot_product_attention(q, k, v)}
            with torch.no_grad():
                times = time_candidates(fns, device, budget_s=1.0, rounds=5)
            for name, ms in times.items():
                rows.append(Row("decode", f"cache={n} batch={b}", n * b, str(dtype).replace("torch.", ""), name, "fwd",
                                ms, flops=4.0 * b * H * n * D, bytes=kv_bytes,
                                extra={"cache": n, "batch": b, "memory_gbs": round(bandwidth, 1),
                                       "fraction_of_bandwidth": round(kv_bytes / ms / 1e6 / bandwidth, 3)}))
    fill_ratios(rows)
    return rows
