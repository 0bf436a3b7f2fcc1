"""The feed-forward block: autograd over the kernel backends and the dispatch entries.

Kernels see x as (M, d_model) rows (leading dims flattened), nn.Linear weights, the
activation as an int (relu 0, gelu 1, gelu_tanh 2, silu 3) and a dropout seed drawn from
torch's generator (0-d int64 tensor, so torch.compile keeps it in the graph).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext, codes, dispatch, reference
from ._autograd import apply, call, kernel_op, twin_function
from .attention import _seed_int, draw_seed, dropout_counter_problems

ACTIVATIONS = codes.names(codes.Activation)


def _kernels(backend: str):
    if backend == "triton":
        from ..triton import feed_forward as k

        return k.feed_forward_fwd, k.feed_forward_bwd
    ops = _ext.backend_ops(backend)
    return ops.feed_forward_fwd, ops.feed_forward_bwd


@kernel_op("fused_attn::feed_forward_fwd")
def feed_forward_fwd(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
            residual: Optional[Tensor], activation: int, dropout_p: float, seed: Optional[Tensor], save_pre: bool,
            backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """x (M, d_model) -> out (M, d_model), hidden (M, d_ff) = dropout(act(pre)), pre (M, d_ff) or empty.
    The cpu backend returns hidden empty: it keeps it in per-block scratch and its backward
    recomputes it from pre."""
    return tuple(_kernels(backend)[0](x, w1, b1, w2, b2, residual, activation, dropout_p, _seed_int(seed),
                                      save_pre))


@feed_forward_fwd.register_fake
def _(x, w1, b1, w2, b2, residual, activation, dropout_p, seed, save_pre, backend):
    M, d_ff = x.shape[0], w1.shape[0]
    hidden = x.new_empty(0) if backend == "cpu" else x.new_empty(M, d_ff)
    return x.new_empty(M, x.shape[1]), hidden, x.new_empty(M, d_ff) if save_pre else x.new_empty(0)


@kernel_op("fused_attn::feed_forward_bwd")
def feed_forward_bwd(dout: Tensor, x: Tensor, w1: Tensor, w2: Tensor, pre: Tensor, hidden: Tensor, activation: int,
            dropout_p: float, seed: Optional[Tensor], need_b1: bool, need_b2: bool,
            backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> dx, dw1, db1 (empty unless need_b1), dw2, db2 (empty unless need_b2); db in float32 (float64 for
    float64 input)."""
    return tuple(_kernels(backend)[1](dout, x, w1, w2, pre, hidden, activation, dropout_p, _seed_int(seed),
                                      need_b1, need_b2))


@feed_forward_bwd.register_fake
def _(dout, x, w1, w2, pre, hidden, activation, dropout_p, seed, need_b1, need_b2, backend):
    sums = codes.stats_dtype(x.dtype)
    return (x.new_empty(x.shape), w1.new_empty(w1.shape), x.new_empty(w1.shape[0] if need_b1 else 0, dtype=sums),
            w2.new_empty(w2.shape), x.new_empty(w2.shape[0] if need_b2 else 0, dtype=sums))


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, residual, activation, dropout_p, seed, save_pre, backend = inputs
    _, hidden, pre = output
    ctx.mark_non_differentiable(hidden, pre)
    # hidden and pre never get a gradient: without this autograd would hand backward two
    # zero-filled (M, d_ff) tensors (~10% of a CPU backward at M=4096)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, w1, w2, pre, hidden, seed)
    ctx.args = (activation, dropout_p)
    ctx.bias_dtypes = (b1.dtype if b1 is not None else None, b2.dtype if b2 is not None else None)
    ctx.has_residual = residual is not None
    ctx.backend = backend


def _backward(ctx, dout, _dhidden, _dpre):
    x, w1, w2, pre, hidden, seed = ctx.saved_tensors
    activation, dropout_p = ctx.args
    if dout is None:  # the output was not used
        return (None,) * 11
    need_b1 = ctx.bias_dtypes[0] is not None and ctx.needs_input_grad[2]
    need_b2 = ctx.bias_dtypes[1] is not None and ctx.needs_input_grad[4]
    dout = dout.contiguous()
    args = (dout, x, w1, w2, pre, hidden, activation, dropout_p)
    dx, dw1, db1, dw2, db2 = call(feed_forward_bwd, *args, seed, need_b1, need_b2, ctx.backend)
    return (dx, dw1, db1.to(ctx.bias_dtypes[0]) if need_b1 else None, dw2,
            db2.to(ctx.bias_dtypes[1]) if need_b2 else None, dout if ctx.has_residual else None,
            None, None, None, None, None)


feed_forward_fwd.register_autograd(_backward, setup_context=_setup_context)

_FeedForward = twin_function(
    "_FeedForward",
    lambda x, w1, b1, w2, b2, residual, activation, dropout_p, seed, save_pre, backend: tuple(
        _kernels(backend)[0](x, w1, b1, w2, b2, residual, activation, dropout_p, _seed_int(seed), save_pre)),
    _setup_context, _backward)


def _run_kernels(backend: str):
    def run(input, w1, b1, w2, b2, activation, dropout_p, residual):
        if input.shape[-1] == 0 or w1.shape[0] == 0:
            # no d_model or no d_ff: no product to compute, the block is b2 (+ residual); torch's
            # ops give it exactly, with exact zero gradients
            return _run_torch(input, w1, b1, w2, b2, activation, dropout_p, residual)
        shape = input.shape
        x = input.reshape(-1, shape[-1]).contiguous()
        res = residual.reshape(-1, shape[-1]).contiguous() if residual is not None else None
        wants_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (input, w1, b1, w2, b2, residual))
        seed = draw_seed() if dropout_p > 0 else None
        out, _, _ = apply(feed_forward_fwd, _FeedForward, x, w1.contiguous(), b1, w2.contiguous(), b2, res,
                          ACTIVATIONS[activation], float(dropout_p), seed, wants_grad, backend)
        return out.view(shape)

    return run


_TORCH_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
                      "silu": F.silu}


def _run_torch(input, w1, b1, w2, b2, activation, dropout_p, residual):
    """torch eager: F.linear + activation + dropout + F.linear + add (the baseline)."""
    h = F.dropout(_TORCH_ACTIVATIONS[activation](F.linear(input, w1, b1)), dropout_p, training=dropout_p > 0)
    out = F.linear(h, w2, b2)
    return out if residual is None else out + residual


def _run_reference(input, w1, b1, w2, b2, activation, dropout_p, residual):
    keep = None
    if dropout_p > 0:
        keep = torch.rand((*input.shape[:-1], w1.shape[0]), device=input.device) >= dropout_p
    return reference.feed_forward(input, w1, b1, w2, b2, activation=activation, dropout_p=dropout_p,
                                  residual=residual, dropout_mask=keep)


_CUDA_CAPABILITY = dispatch.Capability(codes.KERNEL_DTYPES["cuda"], width_multiple=8)
CAPABILITIES = {
    "cpu": dispatch.Capability(codes.KERNEL_DTYPES["cpu"]),
    "triton": dispatch.Capability(codes.KERNEL_DTYPES["triton"]),
    "cuda": _CUDA_CAPABILITY,
    "cuda_emu": _CUDA_CAPABILITY,
}


def _supports_kernels(backend: str):
    def supports(input, w1, dropout_p, **_):
        d_model, d_ff = input.shape[-1], w1.shape[0]
        out = CAPABILITIES[backend].problems(input.dtype, widths=(d_model, d_ff))
        if dropout_p > 0:
            out += dropout_counter_problems(input.numel() // max(d_model, 1), d_ff, "rows * d_ff")
        return out

    return supports


def _supports_anything(**_inputs):
    return []


OP = dispatch.Op("feed_forward", auto_order={"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")})
for _name in ("cuda", "triton", "cpu", "cuda_emu"):
    OP.register(_name, _supports_kernels(_name), _run_kernels(_name))
OP.register("torch", _supports_anything, _run_torch)
OP.register("reference", _supports_anything, _run_reference)


def dropout_keep_mask(backend: str, seed: Tensor, rows: int, cols: int, dropout_p: float, device) -> Tensor:
    """The (rows, d_ff) keep-mask backend `backend` applies to the hidden activation (tests)."""
    from .attention import dropout_keep_mask as attention_mask

    return attention_mask(backend, seed, 1, 1, rows, cols, dropout_p, device)[0, 0]
