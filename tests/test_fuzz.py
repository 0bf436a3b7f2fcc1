"""Property-based tests (hypothesis): random shapes, broadcast masks with -inf and
float32-min entries, head dims, GQA, scales, strided and expanded layouts, packed
variable-length batches with the FlashAttention features, LayerNorm over
several trailing dims, feed-forward widths down to 0. Every case is held to the 2x rule
against the float64 reference (output and every gradient), or to layout invariance.

The examples are derandomized (the same cases in every run, so a failure reproduces) and
sized to make test's budget: many on the native cpu kernels, a few under the Triton
interpreter and the warp emulator. FUSED_ATTN_FUZZ_EXAMPLES=N scales them for a long hunt."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_attn as fa
from fused_attn import testing
from fused_attn.ops import attention as attention_op
from fused_attn.ops import feed_forward as feed_forward_op
from fused_attn.ops import layer_norm as layer_norm_op
from fused_attn.ops import varlen as varlen_op

from conftest import backend_device, kernel_dtype, usable

SCALE = float(os.environ.get("FUSED_ATTN_FUZZ_EXAMPLES", "1"))
# examples per backend: the native cpu kernels are fast, the interpreter and emulator are not
EXAMPLES = {"cpu": 60, "triton": 6, "cuda_emu": 6, "cuda": 60}


CUDA_KERNEL_BACKENDS = ("cuda", "cuda_emu")  # head dims 32, 64, 96, 128, 256 only


def fuzz_settings(backend: str, factor: float = 1.0):
    return settings(max_examples=max(1, int(EXAMPLES[backend] * factor * SCALE)), deadline=None, derandomize=True,
                    database=None, suppress_health_check=list(HealthCheck), print_blob=True)


def _backends(op):
    return [pytest.param(b, marks=pytest.mark.skipif(not usable(b), reason=f"backend {b} unusable here"))
            for b in ("cpu", "triton", "cuda_emu", "cuda") if b in op.OP.entries]


@st.composite
def attention_cases(draw, backend):
    cuda_kernels = backend in CUDA_KERNEL_BACKENDS
    small = backend in ("triton", "cuda_emu")
    B, hk, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    Lq = draw(st.integers(1, 24 if small else 70))
    Lk = draw(st.integers(1, 24 if small else 70))
    if cuda_kernels:
        d = dv = draw(st.sampled_from([32, 64]))
    else:
        d = draw(st.integers(1, 72))
        dv = draw(st.sampled_from([d, draw(st.integers(1, 72))]))
    mask = draw(st.sampled_from(["none", "causal", "bool", "float"]))
    shape = draw(st.sampled_from([(Lk,), (Lq, Lk), (B, 1, 1, Lk), (1, hk * group, Lq, Lk), (B, hk * group, Lq, Lk),
                                  (B, 1, Lq, Lk), ()]))
    if mask == "bool" and shape == ():
        shape = (Lk,)
    scale = draw(st.sampled_from([None, None, 0.3, 1.7]))
    seed = draw(st.integers(0, 2 ** 16))
    return dict(B=B, H=hk * group, HK=hk, Lq=Lq, Lk=Lk, D=d, DV=dv, mask=mask, mask_shape=shape, scale=scale,
                seed=seed)


def _attention_inputs(case, dtype, device):
    g = torch.Generator().manual_seed(case["seed"])
    B, H, HK, Lq, Lk, D, DV = (case[k] for k in ("B", "H", "HK", "Lq", "Lk", "D", "DV"))
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype).to(device)  # noqa: E731
    q, k, v = rnd(B, H, Lq, D), rnd(B, HK, Lk, D), rnd(B, HK, Lk, DV)
    mask, causal = None, case["mask"] == "causal"
    shape = case["mask_shape"]
    if case["mask"] == "bool":
        mask = (torch.rand(shape, generator=g) > 0.3).to(device)
    elif case["mask"] == "float":
        m = torch.randn(shape, generator=g) * 2
        r = torch.rand(shape, generator=g)
        m = m.masked_fill(r < 0.15, float("-inf"))
        # Hugging Face's padding value: below -FLT_MAX / log2(e), where log2 units overflow
        m = m.masked_fill((r >= 0.15) & (r < 0.25), torch.finfo(torch.float32).min)
        mask = m.to(dtype).to(device)
    return dict(query=q, key=k, value=v, attn_mask=mask, is_causal=causal, scale=case["scale"],
                enable_gqa=H != HK)


def _grad_names(inputs):
    names = ["query", "key", "value"]
    m = inputs["attn_mask"]
    if m is not None and m.is_floating_point() and m.dim() >= 2:
        names.append("attn_mask")
    return names


def _check_attention(backend, case, dtype=None, atol_ulps=None):
    inputs = _attention_inputs(case, dtype or kernel_dtype(backend), backend_device(backend))
    comparisons = testing.compare(lambda **kw: fa.scaled_dot_product_attention(**kw, backend=backend),
                                  fa.reference.scaled_dot_product_attention, inputs,
                                  grad_names=_grad_names(inputs), atol_ulps=atol_ulps)
    testing.assert_all_ok(comparisons)


@pytest.mark.parametrize("backend", _backends(attention_op))
def test_attention_random_cases(backend):
    @fuzz_settings(backend)
    @given(case=attention_cases(backend))
    def run(case):
        _check_attention(backend, case)

    run()


@pytest.mark.skipif(not usable("cpu"), reason="backend cpu unusable here")
def test_attention_random_cases_in_float64_on_cpu():
    """float64 through the cpu kernels (torch's CPU kernels take it; gradcheck needs it).
    64 ulps: with one key the reference's dS cancels exactly (dP - delta = 0) where a fused
    backward's delta = rowsum(dO * O) and dP = dO v differ in the last bits, and dK sums that
    over every query row times scale * |q| (63 rows at scale 1.7: 24 ulps); float64's
    same-dtype reference is the truth, so the rule's 2x term cannot absorb it."""
    @fuzz_settings("cpu", 0.5)
    @given(case=attention_cases("cpu"))
    def run(case):
        _check_attention("cpu", case, torch.float64, atol_ulps=64)

    run()


@st.composite
def strided_layouts(draw):
    """q, k, v as views a model produces: (B, L, H, D) transposed, slices of a fused
    projection, keys/values expanded along L (row stride 0), or a padded head dim."""
    return draw(st.sampled_from(["transposed", "fused_qkv", "expanded_kv", "padded_head", "expanded_q"])), \
        draw(st.integers(1, 40)), draw(st.integers(1, 40)), draw(st.sampled_from([16, 24, 32])), \
        draw(st.integers(0, 2 ** 16))


def _strided(layout, Lq, Lk, D, seed, dtype, device):
    g = torch.Generator().manual_seed(seed)
    B, H = 2, 2
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype).to(device)  # noqa: E731
    if layout == "transposed":
        return rnd(B, Lq, H, D).transpose(1, 2), rnd(B, Lk, H, D).transpose(1, 2), rnd(B, Lk, H, D).transpose(1, 2)
    if layout == "fused_qkv":
        qkv = rnd(B, Lk, 3, H, D)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        return q, k, v
    if layout == "padded_head":
        return rnd(B, H, Lq, D + 8)[..., :D], rnd(B, H, Lk, D + 8)[..., :D], rnd(B, H, Lk, D + 8)[..., :D]
    if layout == "expanded_q":
        return rnd(B, H, 1, D).expand(B, H, Lq, D), rnd(B, H, Lk, D), rnd(B, H, Lk, D)
    return rnd(B, H, Lq, D), rnd(B, H, 1, D).expand(B, H, Lk, D), rnd(B, H, 1, D).expand(B, H, Lk, D)


@pytest.mark.parametrize("backend", _backends(attention_op))
def test_attention_layout_invariance(backend):
    """The same values in any strided layout give the same output (to float32 rounding of
    a different blocking) as their contiguous copy."""
    dtype, device = kernel_dtype(backend), backend_device(backend)

    @fuzz_settings(backend, 0.5)
    @given(spec=strided_layouts())
    def run(spec):
        layout, Lq, Lk, D, seed = spec
        if backend in CUDA_KERNEL_BACKENDS:
            D = 32
        q, k, v = _strided(layout, Lq, Lk, D, seed, dtype, device)
        mask = torch.arange(k.shape[-2], device=device) < max(1, k.shape[-2] - 3)
        out = fa.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
        ref = fa.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), attn_mask=mask,
                                              backend=backend)
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)

    run()


@st.composite
def varlen_cases(draw, backend):
    """Packed batches: up to 5 sequences (empty ones, query-only and key-only ones), rows after
    the last sequence, GQA, windows on either side, causal, softcap, per-sequence ALiBi and
    seqused_k shorter than a sequence's keys; head dims the backend's kernels take."""
    n, longest = draw(st.integers(0, 5)), 24 if backend == "triton" else 70
    lq = [draw(st.integers(0, longest)) for _ in range(n)]
    lk = [draw(st.integers(0, longest)) for _ in range(n)]
    return dict(lq=lq, lk=lk, used=[draw(st.integers(0, k)) for k in lk] if draw(st.booleans()) else None,
                tail=draw(st.integers(0, 3)), hk=draw(st.integers(1, 2)), group=draw(st.integers(1, 2)),
                D=draw(st.sampled_from([32, 64] if backend in CUDA_KERNEL_BACKENDS else [8, 24, 32, 40])),
                causal=draw(st.booleans()),
                window=(draw(st.sampled_from([-1, 0, 5, 17])), draw(st.sampled_from([-1, 0, 3]))),
                softcap=draw(st.sampled_from([0.0, 0.0, 2.5])), alibi=draw(st.booleans()),
                seed=draw(st.integers(0, 2 ** 16)))


@pytest.mark.parametrize("backend", [b for b in _backends(attention_op) if b.values[0] in varlen_op.PACKED_BACKENDS])
def test_varlen_random_cases(backend):
    """varlen_attention on the backends that take every sequence in one call, against the
    reference sequence by sequence: output, log-sum-exp and the gradients of q, k, v."""
    dtype, device = kernel_dtype(backend), backend_device(backend)

    @fuzz_settings(backend, 0.5)
    @given(case=varlen_cases(backend))
    def run(case):
        g = torch.Generator().manual_seed(case["seed"])
        rnd = lambda *s: torch.randn(*s, generator=g).to(dtype).to(device)  # noqa: E731
        cu = lambda ls: torch.tensor([0] + torch.tensor(ls, dtype=torch.long).cumsum(0).tolist(),  # noqa: E731
                                     dtype=torch.int32, device=device)
        hq, hk, D, n = case["hk"] * case["group"], case["hk"], case["D"], len(case["lq"])
        rows_q, rows_k = sum(case["lq"]) + case["tail"], sum(case["lk"]) + case["tail"]
        inputs = dict(query=rnd(rows_q, hq, D), key=rnd(rows_k, hk, D), value=rnd(rows_k, hk, D),
                      cu_seqlens_q=cu(case["lq"]), cu_seqlens_k=cu(case["lk"]), max_q=max(case["lq"], default=0),
                      max_k=max(case["lk"], default=0), is_causal=case["causal"], window_size=case["window"],
                      softcap=case["softcap"], enable_gqa=hq != hk)
        if case["used"] is not None:
            inputs["seqused_k"] = torch.tensor(case["used"], dtype=torch.int32, device=device)
        if case["alibi"]:
            inputs["alibi_slopes"] = (torch.rand(n, hq, generator=g) * 0.5).to(device)
        testing.assert_all_ok(testing.compare(lambda **kw: fa.varlen_attention(**kw, return_lse=True, backend=backend),
                                              lambda **kw: fa.reference.varlen_attention(**kw, return_lse=True),
                                              inputs, grad_names=["query", "key", "value"],
                                              output_names=["output", "lse"]))

    run()


@st.composite
def layer_norm_cases(draw, backend):
    rank = draw(st.integers(1, 3))
    small = backend in ("triton", "cuda_emu")
    shape = tuple(draw(st.integers(1, 9 if small else 40)) for _ in range(rank))
    n_norm = draw(st.integers(1, rank))
    return dict(shape=shape, n_norm=n_norm, affine=draw(st.booleans()), residual=draw(st.booleans()),
                eps=draw(st.sampled_from([1e-5, 1e-3])), seed=draw(st.integers(0, 2 ** 16)))


@pytest.mark.parametrize("backend", _backends(layer_norm_op))
def test_layer_norm_random_cases(backend):
    dtype, device = kernel_dtype(backend), backend_device(backend)

    @fuzz_settings(backend)
    @given(case=layer_norm_cases(backend))
    def run(case):
        g = torch.Generator().manual_seed(case["seed"])
        rnd = lambda *s: (torch.randn(*s, generator=g) + 0.5).to(dtype).to(device)  # noqa: E731
        norm = case["shape"][len(case["shape"]) - case["n_norm"]:]
        inputs = dict(input=rnd(*case["shape"]), normalized_shape=norm,
                      weight=rnd(*norm) if case["affine"] else None, bias=rnd(*norm) if case["affine"] else None,
                      eps=case["eps"], residual=rnd(*case["shape"]) if case["residual"] else None)
        grads = [k for k in ("input", "weight", "bias", "residual") if inputs[k] is not None]
        testing.assert_all_ok(testing.compare(lambda **kw: fa.layer_norm(**kw, backend=backend),
                                              fa.reference.layer_norm, inputs, grad_names=grads))

    run()


@st.composite
def feed_forward_cases(draw, backend):
    cuda_kernels = backend in CUDA_KERNEL_BACKENDS
    widths = st.sampled_from([0, 8, 16, 24, 40]) if cuda_kernels else st.integers(0, 40)
    return dict(rows=draw(st.integers(1, 12)), d_model=draw(widths), d_ff=draw(widths),
                activation=draw(st.sampled_from(["relu", "gelu", "gelu_tanh", "silu"])), bias=draw(st.booleans()),
                residual=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 16)))


@pytest.mark.parametrize("backend", _backends(feed_forward_op))
def test_feed_forward_random_cases(backend):
    dtype, device = kernel_dtype(backend), backend_device(backend)

    @fuzz_settings(backend)
    @given(case=feed_forward_cases(backend))
    def run(case):
        g = torch.Generator().manual_seed(case["seed"])
        rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype).to(device)  # noqa: E731
        M, dm, dff = case["rows"], case["d_model"], case["d_ff"]
        inputs = dict(input=rnd(M, dm), w1=rnd(dff, dm, scale=max(dm, 1) ** -0.5),
                      b1=rnd(dff) if case["bias"] else None, w2=rnd(dm, dff, scale=max(dff, 1) ** -0.5),
                      b2=rnd(dm) if case["bias"] else None, residual=rnd(M, dm) if case["residual"] else None)
        grads = [k for k in ("input", "w1", "b1", "w2", "b2", "residual") if inputs[k] is not None]
        act = case["activation"]
        testing.assert_all_ok(testing.compare(
            lambda **kw: fa.feed_forward(**kw, activation=act, backend=backend),
            lambda **kw: fa.reference.feed_forward(**kw, activation=act), inputs, grad_names=grads))

    run()
