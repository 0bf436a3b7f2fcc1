"""LayerNorm (+ residual): every kernel backend against the float64 reference by the 2x
rule, forward and every gradient, over odd sizes, dtypes and options."""

import pytest
import torch
import torch.nn.functional as F

import fused_attn as fa
from fused_attn import testing

from conftest import backend_device, kernel_backend_params, stable_seed

SHAPES = [(1, 1), (3, 17), (7, 97), (2, 3, 129), (5, 1000), (2, 4097), (1, 65536)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]  # float64: cpu only


def _skip_unsupported(backend, dtype, device):
    from fused_attn.ops import layer_norm as op

    reasons = op.OP.reasons(backend, torch.device(device), input=torch.empty(0, dtype=dtype), weight=None,
                            bias=None, residual=None)
    if reasons:
        pytest.skip("; ".join(reasons))


def _inputs(shape, dtype, device, *, residual, affine, seed, weight_dtype=None):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    wdt = weight_dtype or dtype

    def rnd(*s, dt=dtype, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g, dtype=torch.float32) * scale + shift).to(dt).to(device)

    return dict(
        input=rnd(*shape, scale=2.0, shift=0.5),
        normalized_shape=(n,),
        weight=rnd(n, dt=wdt, shift=1.0) if affine else None,
        bias=rnd(n, dt=wdt) if affine else None,
        eps=1e-5,
        residual=rnd(*shape) if residual else None,
        return_residual=residual,
    )


@pytest.mark.parametrize("backend", kernel_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_matches_reference(backend, dtype, shape, residual):
    device = backend_device(backend)
    _skip_unsupported(backend, dtype, device)
    inputs = _inputs(shape, dtype, device, residual=residual, affine=True, seed=stable_seed(shape, residual))
    grads = ["input", "weight", "bias"] + (["residual"] if residual else [])
    result = testing.compare(lambda **kw: fa.layer_norm(**kw, backend=backend), fa.reference.layer_norm, inputs,
                             grad_names=grads, output_names=["y", "sum"] if residual else ["y"])
    testing.assert_all_ok(result)


@pytest.mark.parametrize("backend", kernel_backend_params())
def test_hard_statistics(backend):
    """Rows whose variance a one-pass E[x^2] - E[x]^2 would lose: a large common offset
    (mean 3000, std 0.1) and a massive outlier channel (1e4 among N(0, 1) values), at a
    width past the kernels' chunking (4097) and a short one (33)."""
    device = backend_device(backend)
    _skip_unsupported(backend, torch.float32, device)
    g = torch.Generator().manual_seed(31)
    for n in (33, 4097):
        x = torch.randn(4, n, generator=g)
        x[0] = x[0] * 0.1 + 3000.0
        x[1, 0] = 1e4
        x[2, n // 2] = -1e4
        x[3] = x[3] * 1e-3 - 50.0
        inputs = dict(input=x.to(device), normalized_shape=(n,), weight=torch.randn(n, generator=g).to(device),
                      bias=torch.randn(n, generator=g).to(device), eps=1e-5)
        testing.assert_all_ok(testing.compare(lambda **kw: fa.layer_norm(**kw, backend=backend),
                                              fa.reference.layer_norm, inputs, grad_names=["input", "weight", "bias"]))


@pytest.mark.parametrize("backend", kernel_backend_params())
@pytest.mark.parametrize("variant", ["no_affine", "weight_only", "bias_only", "fp32_params"])
def test_parameter_variants(backend, variant):
    device = backend_device(backend)
    dtype = torch.float16
    _skip_unsupported(backend, dtype, device)
    inputs = _inputs((6, 203), dtype, device, residual=True, affine=variant != "no_affine", seed=7,
                     weight_dtype=torch.float32 if variant == "fp32_params" else None)
    if variant == "weight_only":
        inputs["bias"] = None
    if variant == "bias_only":
        inputs["weight"] = None
    grads = ["input", "residual"] + [k for k in ("weight", "bias") if inputs[k] is not None]
    result = testing.compare(lambda **kw: fa.layer_norm(**kw, backend=backend), fa.reference.layer_norm, inputs,
                             grad_names=grads)
    testing.assert_all_ok(result)
    out = fa.layer_norm(**{k: v for k, v in inputs.items()}, backend=backend)
    if inputs["weight"] is not None:
        assert out[0].dtype == dtype


@pytest.mark.parametrize("backend", kernel_backend_params())
def test_multi_dim_normalized_shape_and_sum_gradient_only(backend):
    """normalized_shape over two dims, and a loss that uses only the returned sum."""
    device = backend_device(backend)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 6, generator=g).to(device).requires_grad_()
    r = torch.randn(4, 5, 6, generator=g).to(device).requires_grad_()
    w = torch.randn(5, 6, generator=g).to(device).requires_grad_()
    y, s = fa.layer_norm(x, (5, 6), w, None, residual=r, return_residual=True, backend=backend)
    y_ref, s_ref = fa.reference.layer_norm(x.double(), (5, 6), w.double(), residual=r.double(), return_residual=True)
    torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.double(), s_ref, atol=1e-6, rtol=0)
    (s * 3).sum().backward()  # y unused: its gradient arrives as None/zeros
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))
    torch.testing.assert_close(r.grad, torch.full_like(r, 3.0))


@pytest.mark.parametrize("backend", kernel_backend_params())
def test_normalized_shape_covering_a_whole_2d_input(backend):
    """normalized_shape equal to a 2-D input's whole shape is one row of 24, not 4 rows of
    6 (this once normalised each row: error 0.63 against F.layer_norm), weights (4, 6)."""
    device = backend_device(backend)
    g = torch.Generator().manual_seed(5)
    x, w, b = (torch.randn(4, 6, generator=g).to(device) for _ in range(3))
    comps = testing.compare(lambda **kw: fa.layer_norm(**kw, backend=backend), fa.reference.layer_norm,
                            dict(input=x, normalized_shape=(4, 6), weight=w, bias=b),
                            grad_names=["input", "weight", "bias"])
    testing.assert_all_ok(comps)
    torch.testing.assert_close(fa.layer_norm(x, (4, 6), w, b, backend=backend), F.layer_norm(x, (4, 6), w, b),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", kernel_backend_params())
def test_backward_without_any_output_gradient(backend):
    """autograd may call backward with no gradient for any output (gradcheck does): every
    input gradient is None then, not a TypeError."""
    from fused_attn.ops import layer_norm as op

    device = backend_device(backend)
    x = torch.randn(3, 8).to(device).requires_grad_()
    ctx = type("Ctx", (), {})()
    ctx.saved_tensors = (x.detach(), None, torch.zeros(3), torch.ones(3))
    ctx.needs_input_grad = (True,) * 7
    ctx.bias_dtype, ctx.has_residual, ctx.backend = None, False, backend
    assert op._backward(ctx, None, None, None, None) == (None,) * 7


@pytest.mark.parametrize("backend", kernel_backend_params())
def test_empty_rows(backend):
    device = backend_device(backend)
    x = torch.randn(0, 3, 8, device=device, requires_grad=True)
    w = torch.randn(8, device=device, requires_grad=True)
    b = torch.randn(8, device=device, requires_grad=True)
    y = fa.layer_norm(x, 8, w, b, backend=backend)
    assert y.shape == (0, 3, 8)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("backend", kernel_backend_params())
def test_deterministic(backend):
    """Same inputs, same outputs and gradients, bit for bit (no atomics in dW/dB)."""
    device = backend_device(backend)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(301, 257, generator=g).to(device)
    w = torch.randn(257, generator=g).to(device)
    dy = torch.randn(301, 257, generator=g).to(device)
    outs = []
    for _ in range(3):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fa.layer_norm(xi, 257, wi, backend=backend)
        y.backward(dy)
        outs.append((y.detach(), xi.grad, wi.grad))
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert torch.equal(a, b)


def test_cpu_thread_count_independent():
    """The cpu kernels give bit-identical results with 1 and 2 threads."""
    if fa.available_backends()["cpu"] is not None:
        pytest.skip(fa.available_backends()["cpu"])
    g = torch.Generator().manual_seed(5)
    x = torch.randn(513, 300, generator=g)
    w = torch.randn(300, generator=g)
    dy = torch.randn(513, 300, generator=g)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
            fa.layer_norm(xi, 300, wi, backend="cpu").backward(dy)
            results.append((xi.grad, wi.grad))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_reference_agrees_with_torch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 33, dtype=torch.float64, generator=g)
    w = torch.randn(33, dtype=torch.float64, generator=g)
    b = torch.randn(33, dtype=torch.float64, generator=g)
    r = torch.randn(6, 33, dtype=torch.float64, generator=g)
    torch.testing.assert_close(fa.reference.layer_norm(x, 33, w, b, 1e-5), F.layer_norm(x, (33,), w, b, 1e-5))
    torch.testing.assert_close(fa.reference.layer_norm(x, 33, w, b, residual=r), F.layer_norm(x + r, (33,), w, b))


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_baseline_backends(backend):
    inputs = _inputs((5, 77), torch.float32, "cpu", residual=True, affine=True, seed=1)
    result = testing.compare(lambda **kw: fa.layer_norm(**kw, backend=backend), fa.reference.layer_norm, inputs,
                             grad_names=["input", "residual", "weight", "bias"])
    testing.assert_all_ok(result)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(input=[1.0, 2.0]), TypeError, "input must be a torch.Tensor"),
    (dict(input=torch.ones(2, 4, dtype=torch.int32)), TypeError, "input must be a floating-point"),
    (dict(normalized_shape=5), ValueError, "trailing dimensions of input"),
    (dict(normalized_shape=(3, 4)), ValueError, "trailing dimensions of input"),
    (dict(normalized_shape=()), ValueError, "normalized_shape must not be empty"),
    (dict(normalized_shape="4"), TypeError, "normalized_shape must be an int"),
    (dict(normalized_shape=(0,)), ValueError, "sizes >= 1"),
    (dict(weight=torch.ones(5)), ValueError, "weight must have shape normalized_shape"),
    (dict(bias=torch.ones(4, 1)), ValueError, "bias must have shape normalized_shape"),
    (dict(weight=torch.ones(4, dtype=torch.float64)), TypeError, "weight must have input's dtype"),
    (dict(eps=0.0), ValueError, "eps must be > 0"),
    (dict(eps=-1e-5), ValueError, "eps must be > 0"),
    (dict(eps=float("nan")), ValueError, "eps must be finite"),
    (dict(eps=float("inf")), ValueError, "eps must be finite"),
    (dict(residual=torch.ones(3, 4)), ValueError, "residual must have input's shape"),
    (dict(residual=torch.ones(2, 4, dtype=torch.float16)), TypeError, "residual must have the same dtype"),
    (dict(backend="fastest"), ValueError, "backend must be 'auto' or one of"),
    (dict(backend=3), TypeError, "backend must be a string"),
    (dict(input=torch.randn(2, 4, dtype=torch.float64), weight=torch.ones(4)), TypeError,
     "weight must have input's dtype \\(torch.float64\\)"),
])
def test_bad_input_raises_clear_error(kwargs, exc, words):
    args = dict(input=torch.ones(2, 4), normalized_shape=(4,), weight=None, bias=None, eps=1e-5)
    args.update(kwargs)
    with pytest.raises(exc, match=words):
        fa.layer_norm(**args)


def test_named_backend_that_cannot_run_lists_reasons():
    x = torch.randn(2, 8, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="backend 'triton' cannot run layer_norm.*float64"):
        fa.layer_norm(x, 8, backend="triton")
    why = fa.available_backends()["cuda"]
    if why is not None:
        with pytest.raises(NotImplementedError, match="backend 'cuda' cannot run layer_norm"):
            fa.layer_norm(torch.randn(2, 8), 8, backend="cuda")


def test_auto_falls_back_for_unsupported_inputs(monkeypatch):
    x = torch.randn(2, 8, dtype=torch.float64)
    torch.testing.assert_close(fa.layer_norm(x, 8), F.layer_norm(x, (8,)))  # float64: the cpu kernel
    monkeypatch.setattr(fa.dispatch, "_availability", dict(fa.available_backends(), cpu="disabled for the test"))
    torch.testing.assert_close(fa.layer_norm(x, 8), F.layer_norm(x, (8,)))  # no kernel: torch
    monkeypatch.setenv("FUSED_ATTN_BACKEND", "reference")
    torch.testing.assert_close(fa.layer_norm(x, 8), F.layer_norm(x, (8,)))
    monkeypatch.setenv("FUSED_ATTN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FUSED_ATTN_BACKEND='nonsense' is not a backend"):
        fa.layer_norm(x, 8)


def test_cpu_op_checks_its_arguments():
    """The C++ operator validates what it is given directly (not through fa.layer_norm)."""
    if fa.available_backends()["cpu"] is not None:
        pytest.skip(fa.available_backends()["cpu"])
    ops = torch.ops.fused_attn_C
    with pytest.raises(ValueError, match="input must be a \\(rows, cols\\) matrix"):
        ops.layer_norm_fwd(torch.ones(2, 3, 4), None, None, None, 1e-5, False)
    with pytest.raises(ValueError, match="weight must have shape \\(4,\\)"):
        ops.layer_norm_fwd(torch.ones(2, 4), None, torch.ones(3), None, 1e-5, False)
    with pytest.raises(ValueError, match="eps must be finite and > 0"):
        ops.layer_norm_fwd(torch.ones(2, 4), None, None, None, -1.0, False)
    with pytest.raises(NotImplementedError, match="float32, float16, bfloat16 or \\(CPU\\) float64"):
        ops.layer_norm_fwd(torch.ones(2, 4, dtype=torch.int32), None, None, None, 1e-5, False)
    with pytest.raises(TypeError, match="weight must have input's dtype \\(Double\\), got"):
        ops.layer_norm_fwd(torch.ones(2, 4, dtype=torch.float64), None, torch.ones(4), None, 1e-5, False)
