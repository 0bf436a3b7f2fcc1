"""Edge cases across the ops that a skeptical user hits: second-order gradients, the
feed-forward dropout counter's range, masks that reach the torch backend in float64."""

import itertools

import pytest
import torch

import fused_attn as fa
from fused_attn import testing
from fused_attn.ops import attention as attention_op
from fused_attn.ops import feed_forward as feed_forward_op
from fused_attn.ops import layer_norm as layer_norm_op

from conftest import backend_device, emulated, kernel_backend_params, kernel_dtype


def _attention_loss(backend, q, k, v):
    return fa.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend).square().sum()


def _layer_norm_loss(backend, x, w, b):
    return fa.layer_norm(x, (x.shape[-1],), w, b, backend=backend).square().sum()


def _feed_forward_loss(backend, x, w1, b1, w2, b2):
    return fa.feed_forward(x, w1, b1, w2, b2, activation="gelu", backend=backend).square().sum()


def _inputs(op_name, device, dtype):
    gen = torch.Generator().manual_seed(7)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(device, dtype).requires_grad_()  # noqa: E731
    if op_name == "attention":
        return _attention_loss, (rnd(1, 2, 9, 32), rnd(1, 2, 9, 32), rnd(1, 2, 9, 32))
    if op_name == "layer_norm":
        return _layer_norm_loss, (rnd(5, 32), rnd(32), rnd(32))
    return _feed_forward_loss, (rnd(5, 32), rnd(64, 32), rnd(64), rnd(32, 64), rnd(32))


OPS = {"attention": attention_op.OP, "layer_norm": layer_norm_op.OP, "feed_forward": feed_forward_op.OP}


@pytest.mark.parametrize("op_name", list(OPS))
@pytest.mark.parametrize("backend", kernel_backend_params())
def test_double_backward_raises_instead_of_dropping_terms(op_name, backend):
    """create_graph=True through a kernel: an error naming the op, never gradients whose
    second-order terms are silently zero (issue: attention returned 0 for a true ~2.8)."""
    if backend not in OPS[op_name].entries:
        pytest.skip(f"no {op_name} on {backend}")
    device, dtype = backend_device(backend), kernel_dtype(backend)
    loss_fn, inputs = _inputs(op_name, device, dtype)
    loss = loss_fn(backend, *inputs)
    with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True\) is not supported"):
        torch.autograd.grad(loss, inputs, create_graph=True)
    # first-order gradients still work on the same graph shape
    grads = torch.autograd.grad(loss_fn(backend, *inputs), inputs)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("op_name", list(OPS))
def test_double_backward_works_on_the_reference_backend(op_name):
    """The error points at backend='reference' (torch math ops): it has second derivatives."""
    loss_fn, inputs = _inputs(op_name, "cpu", torch.float64)
    (g,) = torch.autograd.grad(loss_fn("reference", *inputs), inputs[:1], create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), inputs[:1])
    assert gg.abs().sum() > 0


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda_emu", "cuda"])
def test_dropout_past_the_philox_counter_range_is_declined(backend):
    """Dropout counters are 32-bit (row * cols + col): a feed-forward hidden activation of
    rows * d_ff >= 2**32 would repeat its keep-mask, so the kernels decline it (auto falls
    back to torch) like attention with Lq * Lk >= 2**32. Expanded inputs: no memory."""
    x = torch.zeros(1, 16, dtype=torch.float16).expand(2 ** 25, 16)  # 2**25 rows * d_ff 128 = 2**32
    w1 = torch.zeros(128, 16, dtype=torch.float16)
    supports = feed_forward_op.OP.entries[backend].supports
    why = supports(input=x, w1=w1, dropout_p=0.1)
    assert any("dropout needs rows * d_ff < 2**32" in r for r in why), why
    assert not any("dropout" in r for r in supports(input=x[:-1], w1=w1, dropout_p=0.1))
    assert not any("dropout" in r for r in supports(input=x, w1=w1, dropout_p=0.0))
    q = torch.zeros(1, 1, 1, 16, dtype=torch.float16).expand(1, 1, 2 ** 16, 16)
    why = attention_op.OP.entries[backend].supports(query=q, key=q, value=q, attn_mask=None, dropout_p=0.1,
                                                    mask_kind="none")
    assert any("dropout needs Lq * Lk < 2**32" in r for r in why), why


@pytest.mark.parametrize("mask", ["float_1d", "float_0d", "bool_1d"])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_low_rank_masks_in_float64(backend, mask):
    """float64 goes to torch's math path, which indexed dim -2 of a 1-D / 0-d mask
    (IndexError); the mask broadcasts like any other (our checks accept it)."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 5, 8, generator=gen, dtype=torch.float64)
    m = {"float_1d": torch.randn(5, generator=gen, dtype=torch.float64),
         "float_0d": torch.tensor(-0.5, dtype=torch.float64),
         "bool_1d": torch.tensor([True, False, True, True, False])}[mask]
    out = fa.scaled_dot_product_attention(q, q, q, attn_mask=m, backend=backend)
    expected = fa.reference.scaled_dot_product_attention(q, q, q, attn_mask=m.expand(5, 5))
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", kernel_backend_params(attention_op.OP))
def test_nan_query_row_propagates(backend):
    """A NaN in one query row makes that output row NaN (torch's math path, the reference),
    never 0: hiding a NaN hides a diverging run. The other rows are unaffected."""
    device, dtype = backend_device(backend), kernel_dtype(backend)
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 7, 32, generator=gen).to(device, dtype) for _ in range(3))
    q[0, 1, 3, 5] = float("nan")
    q[0, 0, 2] = float("nan")  # a whole row
    out = fa.scaled_dot_product_attention(q, k, v, backend=backend).float().cpu()
    assert out[0, 1, 3].isnan().all() and out[0, 0, 2].isnan().all()
    nan_rows = torch.zeros(1, 2, 7, dtype=torch.bool)
    nan_rows[0, 1, 3] = nan_rows[0, 0, 2] = True
    expected = fa.reference.scaled_dot_product_attention(q.double().cpu(), k.double().cpu(), v.double().cpu())
    torch.testing.assert_close(out[~nan_rows], expected[~nan_rows].float(), atol=2e-2, rtol=2e-2)


def test_inductor_training_step_with_strided_attention_inputs():
    """torch.compile(fullgraph=True) with Inductor, forward and backward, through
    fa.nn.MultiheadAttention, whose q/k/v reach the op as strided views of one projection:
    the fake kernels must describe the (contiguous) gradients the kernels return, or the
    compiled graph's stride assertions fail."""
    torch.manual_seed(0)
    mha = fa.nn.MultiheadAttention(32, 4, batch_first=True, backend="cpu")
    x = torch.randn(2, 9, 32, requires_grad=True)
    eager = mha(x, x, x, need_weights=False)[0]
    (gx_eager,) = torch.autograd.grad(eager.square().sum(), x)
    compiled = torch.compile(lambda t: mha(t, t, t, need_weights=False)[0], fullgraph=True)
    # no cached graph from an earlier run (with other fakes) may stand in for this compile
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        out = compiled(x)
        (gx,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_eager, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_rejects_bad_shapes_naming_the_argument(batch_first, need_weights):
    """Inputs torch's MultiheadAttention rejects get a ValueError naming the argument and
    its shape, on the fused path and the need_weights path alike (they failed deep inside
    with 'mat1 and mat2 shapes cannot be multiplied' or a view error)."""
    mha = fa.nn.MultiheadAttention(8, 2, batch_first=batch_first, backend="cpu")
    B, L, S = 3, 4, 5
    x = torch.randn(B, L, 8) if batch_first else torch.randn(L, B, 8)
    kv = torch.randn(B, S, 8) if batch_first else torch.randn(S, B, 8)
    bad = {
        "key": dict(key=torch.randn(S, 8)),
        "value": dict(value=kv[..., :6]),
        "query": dict(query=torch.randn(2, 3, 4, 8)),
        "key_padding_mask": dict(key_padding_mask=torch.zeros(S, dtype=torch.bool)),
        "attn_mask": dict(attn_mask=torch.zeros(S, dtype=torch.bool)),
    }
    bad_batch = dict(attn_mask=torch.zeros(B * 2 + 1, L, S, dtype=torch.bool))
    for name, override in list(bad.items()) + [("attn_mask", bad_batch)]:
        args = dict(query=x, key=kv, value=kv) | override
        with pytest.raises(ValueError, match=rf"^{name} .*shape \("):
            mha(**args, need_weights=need_weights)
    # what torch accepts still works: (L, S) and (B*H, L, S) masks, a (B, S) padding mask
    out, _ = mha(x, kv, kv, key_padding_mask=torch.zeros(B, S, dtype=torch.bool),
                 attn_mask=torch.zeros(B * 2, L, S, dtype=torch.bool), need_weights=need_weights)
    assert out.shape == x.shape


@pytest.mark.parametrize("mask_shape", [(3, 1, 1, 1, 40), (1, 4, 1, 1, 40), (40,), (3, 4, 1, 1, 40), (3, 1, 1, 9, 40),
                                        (3, 1, 2, 9, 40)])
def test_five_d_masks_are_not_materialised(mask_shape):
    """5-D inputs (B1, B2, H, L, D) with a mask broadcast over an inner batch dim: the
    kernels get a stride-0 view, or a copy at the mask's own size, never (B1*B2, H, Lq, Lk)
    (+256 MB at L = 4096); the output matches the reference."""
    full = (3, 4, 2, 9, 40)
    mask = torch.randn(mask_shape).masked_fill(torch.rand(mask_shape) < 0.2, float("-inf"))
    mask4 = attention_op._mask_4d(mask, full)
    assert mask4.shape == (12, 2, 9, 40)
    inner = (1, 1, 1, *mask_shape)[-3:]
    assert mask4.untyped_storage().nbytes() <= max(mask.numel(), 12 * inner[0] * inner[1] * inner[2]) * 4
    torch.testing.assert_close(mask4, mask.expand(full).reshape(12, 2, 9, 40))
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(3, 4, 2, 9, 16, generator=gen)
    k, v = torch.randn(3, 4, 2, 40, 16, generator=gen), torch.randn(3, 4, 2, 40, 16, generator=gen)
    out = fa.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="cpu")
    expected = fa.reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask.double())
    torch.testing.assert_close(out, expected.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", kernel_backend_params(feed_forward_op.OP))
def test_feed_forward_bias_gradients_at_many_rows_are_as_accurate_as_torch(backend):
    """db1/db2 are column sums over every row: a float32 running sum lost ~2 digits at 1M
    rows (relative error 2e-5 vs torch's 1e-7). 200k rows with a positive mean make the
    running-sum error visible (8k rows under emulation, which times every row's GEMM step);
    ours must be within 4x of torch's error in the same dtype."""
    device, dtype = backend_device(backend), kernel_dtype(backend)
    gen = torch.Generator().manual_seed(2)
    M, dm, dff = 8192 if emulated(backend) else 200_000, 8, 16
    x = torch.randn(M, dm, generator=gen)
    w1, b1 = torch.randn(dff, dm, generator=gen) * 0.3, torch.randn(dff, generator=gen)
    w2, b2 = torch.randn(dm, dff, generator=gen) * 0.3, torch.randn(dm, generator=gen)
    dout = torch.rand(M, dm, generator=gen) + 0.5

    def bias_grads(fn, dtype, device="cpu"):
        args = [t.detach().to(device, dtype).clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
        fn(*args).backward(dout.to(device, dtype))
        return args[2].grad.double().cpu(), args[4].grad.double().cpu()

    ours = bias_grads(lambda *a: fa.feed_forward(*a, activation="relu", backend=backend), dtype, device)
    ref = bias_grads(lambda *a: fa.reference.feed_forward(*a, activation="relu"), dtype)
    truth = bias_grads(lambda *a: fa.reference.feed_forward(*a, activation="relu"), torch.float64)
    for name, o, r, t in zip(("b1", "b2"), ours, ref, truth):
        err, ref_err = ((o - t).abs().max() / t.abs().max()).item(), ((r - t).abs().max() / t.abs().max()).item()
        assert err <= max(4 * ref_err, 1e-7), f"grad {name}: relative error {err:.2e}, torch {dtype} {ref_err:.2e}"


@pytest.mark.parametrize("layout", ["offset", "strided"])
@pytest.mark.parametrize("backend", kernel_backend_params(attention_op.OP))
def test_one_d_float_masks_sliced_from_a_longer_tensor(backend, layout):
    """(Lk,) float masks that are views into a longer tensor (a storage offset, a stride),
    with float32-min entries (Hugging Face's padding value): forward and every gradient
    by the 2x rule (wrong outputs were seen with such masks)."""
    device, dtype = backend_device(backend), kernel_dtype(backend)
    gen = torch.Generator().manual_seed(21)
    q, k, v = (torch.randn(2, 2, n, 32, generator=gen).to(device, dtype) for n in (7, 13, 13))
    long = torch.randn(60, generator=gen)
    long[long > 1.2] = torch.finfo(torch.float32).min
    long = long.to(device, dtype)
    mask = long[5:18] if layout == "offset" else long[::4][:13]
    assert mask.shape == (13,) and (mask.storage_offset() > 0 or mask.stride(0) > 1)
    # testing.compare clones its inputs (losing the view's layout): the view itself first,
    # against its contiguous copy, then the values by the 2x rule
    out = fa.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
    torch.testing.assert_close(out, fa.scaled_dot_product_attention(q, k, v, attn_mask=mask.contiguous(),
                                                                    backend=backend), atol=0, rtol=0)
    inputs = dict(query=q, key=k, value=v, attn_mask=mask)
    testing.assert_all_ok(testing.compare(lambda **kw: fa.scaled_dot_product_attention(**kw, backend=backend),
                                          fa.reference.scaled_dot_product_attention, inputs,
                                          grad_names=["query", "key", "value"]))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_modules_calling_our_functions_can_be_scripted():
    """Issue 16 item 18: torch.jit.script of a module calling the three public functions (and
    holding fa.nn.LayerNorm / FeedForward) compiles them to fused_attn:: ops; the scripted
    module gives the same output and gradients; the one thing TorchScript cannot express
    (layer_norm's return_residual) raises a clear error."""
    from typing import Optional

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = fa.nn.LayerNorm(8, backend="cpu")
            self.feed_forward = fa.nn.FeedForward(8, 16, activation="gelu", backend="cpu")

        def forward(self, q, mask: Optional[torch.Tensor] = None):
            a = fa.scaled_dot_product_attention(q, q, q, attn_mask=mask, is_causal=mask is None, backend="cpu")
            return self.feed_forward(self.norm(a)) + fa.layer_norm(a, 8, residual=q, backend="cpu")

    class Residual(torch.nn.Module):
        def forward(self, x):
            return fa.layer_norm(x, [8], residual=x, return_residual=True, backend="cpu")

    block = Block()
    scripted = torch.jit.script(block)
    assert "fused_attn::scaled_dot_product_attention" in str(scripted.graph)
    g = torch.Generator().manual_seed(0)
    for mask in (None, torch.rand(5, 5, generator=g) > 0.3):
        q = torch.randn(2, 2, 5, 8, generator=g)
        results = []
        for module in (block, scripted):
            x = q.clone().requires_grad_()
            out = module(x, mask)
            results.append((out, torch.autograd.grad(out.square().sum(), [x] + list(block.parameters()))))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
        for a, b in zip(results[1][1], results[0][1]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"return_residual=True\) is not available under TorchScript"):
        torch.jit.script(Residual())(torch.randn(3, 8))


def test_what_torch_accepts_we_accept():
    """Issue 16: broadcasting batch dims of query/key/value, a float32 mask with 16-bit
    inputs (autocast) and a NumPy dropout probability work as in torch: the same result as
    the explicitly expanded / cast call, gradients summed back over broadcast dims."""
    import numpy as np

    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 3, 2, 5, 8, generator=g, requires_grad=True)
    k = torch.randn(1, 3, 2, 7, 8, generator=g, requires_grad=True)
    v = torch.randn(2, 1, 2, 7, 8, generator=g, requires_grad=True)
    out = fa.scaled_dot_product_attention(q, k, v, backend="cpu")
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ke, ve = k.expand(2, 3, 2, 7, 8), v.expand(2, 3, 2, 7, 8)
    want = fa.scaled_dot_product_attention(q, ke, ve, backend="cpu")
    want_grads = torch.autograd.grad(want.sum(), (q, k, v))
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    for a, b in zip(grads, want_grads):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)
    qb = torch.randn(2, 2, 5, 8, generator=g).bfloat16()
    mask = torch.randn(5, 5, generator=g, requires_grad=True)
    got = fa.scaled_dot_product_attention(qb, qb, qb, attn_mask=mask, backend="cpu")
    want = fa.scaled_dot_product_attention(qb, qb, qb, attn_mask=mask.bfloat16(), backend="cpu")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    (dmask,) = torch.autograd.grad(got.float().sum(), mask)
    assert dmask.dtype == torch.float32 and dmask.shape == mask.shape
    p = fa.scaled_dot_product_attention(q, k, v, dropout_p=np.float32(0.1), backend="cpu")
    assert torch.isfinite(p).all()


@pytest.mark.parametrize("backend", kernel_backend_params(attention_op.OP))
def test_scale_beyond_float32_stays_finite(backend):
    """A scale over float32's range (the kernels take a float32 scale) with small q and k:
    powers of two move into q, so output and gradients are finite and match the float64
    reference (a float32 reference overflows here, so the 2x rule has no baseline)."""
    if kernel_dtype(backend) != torch.float32:
        pytest.skip("16-bit inputs cannot hold 1e-21")
    device = backend_device(backend)
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 2, 5, 32, generator=g, dtype=torch.float64) for _ in range(3))
    q, k = q * 1e-21, k * 1e-21  # scale * q.k ~ 1: moderate scores
    results = []
    for dtype, run in ((torch.float32, lambda *t: fa.scaled_dot_product_attention(*t, scale=1e40, backend=backend)),
                       (torch.float64, lambda *t: fa.reference.scaled_dot_product_attention(*t, scale=1e40))):
        t = [x.to(dtype).to(device).requires_grad_() for x in (q, k, v)]
        out = run(*t)
        results.append([out, *torch.autograd.grad(out.sum(), t)])
    for a, b in zip(*results):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double().cpu(), b.cpu(), rtol=1e-4, atol=1e-6 * float(b.abs().max()))


@pytest.mark.parametrize("backend", kernel_backend_params(attention_op.OP))
def test_values_near_the_dtype_maximum_stay_finite(backend):
    """Issue 16 item 6: 67 keys whose values are half the dtype's maximum (1.7e38 in float32
    and bf16): the output is a weighted average of them, so finite, and equal to the float64
    reference to the dtype's precision. An accumulator of unnormalised P V overflowed. Also
    under a sliding window (the cpu kernels' one-tile window path scales P on its own)."""
    device = backend_device(backend)
    g = torch.Generator().manual_seed(13)
    q, k = torch.randn(1, 2, 9, 32, generator=g), torch.randn(1, 2, 67, 32, generator=g)
    signs = torch.where(torch.rand(1, 2, 67, 32, generator=g) > 0.3, 1.0, -1.0)
    for dtype, is_causal, window in itertools.product(dict.fromkeys([kernel_dtype(backend), torch.bfloat16]),
                                                      (False, True), ((-1, -1), (40, 2))):
        big = torch.finfo(dtype).max / 2
        v = signs * big
        out = fa.scaled_dot_product_attention(*(t.to(device, dtype) for t in (q, k, v)), is_causal=is_causal,
                                              window_size=window, backend=backend)
        want = fa.reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=is_causal,
                                                         window_size=window)
        case = f"{dtype}, is_causal={is_causal}, window_size={window}"
        assert torch.isfinite(out).all(), f"non-finite output ({case})"
        err = ((out.double().cpu() - want).abs().max() / big).item()
        assert err <= 4 * torch.finfo(dtype).eps, f"relative error {err:.2e} ({case})"
