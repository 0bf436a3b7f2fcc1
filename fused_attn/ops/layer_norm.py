"""LayerNorm (+ residual): autograd over the kernel backends, and the dispatch entries
of every backend.

The kernels (Triton launchers, torch.ops.fused_attn_C for cpu/cuda) work on (rows, N)
matrices; this module flattens and saves what backward needs. The forward/backward pair
is registered twice over the same functions: as a torch.library custom op with fake
implementations (what torch.compile traces, opaque and graph-break free) and as a
torch.autograd.Function (what eager mode runs: a few microseconds per call instead of
the custom-op dispatcher's tens).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext, codes, dispatch, reference
from ._autograd import apply, call, kernel_op, twin_function



def _kernels(backend: str):
    if backend == "triton":
        from ..triton import layer_norm as k

        return k.layer_norm_fwd, k.layer_norm_bwd
    ops = _ext.backend_ops(backend)
    return ops.layer_norm_fwd, ops.layer_norm_bwd


@kernel_op("fused_attn::layer_norm_fwd")
def layer_norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float, store_sum: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x, residual (rows, N); weight, bias (N,) -> y (rows, N), x + residual (rows, N) or empty,
    mean (rows,), rstd (rows,) in float32 (float64 for float64 input)."""
    return tuple(_kernels(backend)[0](x, residual, weight, bias, eps, store_sum))


@layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, store_sum, backend):
    rows = x.shape[0]
    s = x.new_empty(x.shape) if (store_sum and residual is not None) else x.new_empty(0)
    return (x.new_empty(x.shape), s, x.new_empty(rows, dtype=codes.stats_dtype(x.dtype)),
            x.new_empty(rows, dtype=codes.stats_dtype(x.dtype)))


@kernel_op("fused_attn::layer_norm_bwd")
def layer_norm_bwd(grad_output: Tensor, grad_sum: Optional[Tensor], x: Tensor, weight: Optional[Tensor],
                   mean: Tensor, rstd: Tensor, weight_grad: bool, bias_grad: bool,
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """-> dx (rows, N), dweight and dbias (N,) in float32 (float64 for float64 input) (empty when not asked for)."""
    return tuple(_kernels(backend)[1](grad_output, grad_sum, x, weight, mean, rstd, weight_grad, bias_grad))


@layer_norm_bwd.register_fake
def _(grad_output, grad_sum, x, weight, mean, rstd, weight_grad, bias_grad, backend):
    n = x.shape[1]
    sums = codes.stats_dtype(x.dtype)
    return (x.new_empty(x.shape), x.new_empty(n if weight_grad else 0, dtype=sums),
            x.new_empty(n if bias_grad else 0, dtype=sums))


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, store_sum, backend = inputs
    _, s, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    # the stored sum often goes unused (kept for backward only): no zero-filled (rows, cols)
    # gradient for it, nor for mean/rstd
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(s if residual is not None else x, weight, mean, rstd)
    ctx.has_residual = residual is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.backend = backend


def _backward(ctx, dy, dsum, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    need_w = weight is not None and ctx.needs_input_grad[2]
    need_b = ctx.bias_dtype is not None and ctx.needs_input_grad[3]
    if dy is None and dsum is None:  # autograd asked for nothing (e.g. gradcheck's unused outputs)
        return None, None, None, None, None, None, None
    if dy is None:  # only the sum was used
        dy = torch.zeros_like(dsum)
    dsum = dsum.contiguous() if (dsum is not None and ctx.has_residual) else None
    args = (dy.contiguous(), dsum, x, weight, mean, rstd, need_w, need_b)
    dx, dw, db = call(layer_norm_bwd, *args, ctx.backend)
    return (dx, dx if ctx.has_residual else None, dw.to(weight.dtype) if need_w else None,
            db.to(ctx.bias_dtype) if need_b else None, None, None, None)


layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


_LayerNorm = twin_function(
    "_LayerNorm",
    lambda x, r, w, b, eps, store_sum, backend: tuple(_kernels(backend)[0](x, r, w, b, eps, store_sum)),
    _setup_context, _backward)


def _run_kernels(backend: str):
    def run(input, shape, weight, bias, eps, residual, return_residual):
        n = math.prod(shape)
        # (rows, n) for the kernels; a 2-D input is already that only when n is its last dim
        # (normalized_shape may cover both dims: then it is one row)
        def rows2d(t):
            return t if t.dim() == 2 and t.shape[1] == n and t.is_contiguous() else t.reshape(-1, n).contiguous()
        vector = lambda t: t if t.dim() == 1 and t.is_contiguous() else t.reshape(n).contiguous()  # noqa: E731
        x2 = rows2d(input)
        r2 = rows2d(residual) if residual is not None else None
        w = vector(weight) if weight is not None else None
        b = vector(bias) if bias is not None else None
        wants_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (input, residual, weight, bias))
        store_sum = residual is not None and (return_residual or wants_grad)
        y, s, _, _ = apply(layer_norm_fwd, _LayerNorm, x2, r2, w, b, float(eps), store_sum, backend)
        if y.shape != input.shape:
            y = y.view(input.shape)
        if not return_residual:
            return y
        return y, (s.view(input.shape) if residual is not None else input)

    return run


def _run_torch(input, shape, weight, bias, eps, residual, return_residual):
    s = input if residual is None else input + residual
    if weight is not None and weight.dtype != s.dtype or bias is not None and bias.dtype != s.dtype:
        y = F.layer_norm(s.float(), shape, weight.float() if weight is not None else None,
                         bias.float() if bias is not None else None, eps).to(s.dtype)
    else:
        y = F.layer_norm(s, shape, weight, bias, eps)
    return (y, s) if return_residual else y


def _run_reference(input, shape, weight, bias, eps, residual, return_residual):
    return reference.layer_norm(input, shape, weight, bias, eps, residual=residual, return_residual=return_residual)


CAPABILITIES = {name: dispatch.Capability(dtypes) for name, dtypes in codes.LAYER_NORM_KERNEL_DTYPES.items()}


def _supports_kernels(backend: str):
    def supports(input, weight, bias, residual):
        out = CAPABILITIES[backend].problems(input.dtype)
        if weight is not None and bias is not None and weight.dtype != bias.dtype:
            out.append(f"weight ({weight.dtype}) and bias ({bias.dtype}) have different dtypes")
        return out

    return supports


def _supports_anything(**_inputs):
    return []


OP = dispatch.Op("layer_norm", auto_order={"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")})
for _name in ("cuda", "triton", "cpu", "cuda_emu"):
    OP.register(_name, _supports_kernels(_name), _run_kernels(_name))
OP.register("torch", _supports_anything, _run_torch)
OP.register("reference", _supports_anything, _run_reference)
