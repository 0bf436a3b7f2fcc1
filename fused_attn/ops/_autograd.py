"""One forward/backward pair, two registrations.

Each op registers its forward as a torch.library custom op with a fake implementation
and `register_autograd` (what torch.compile traces: opaque, no graph break), and the
same functions again as a torch.autograd.Function, which eager mode runs: the custom-op
dispatcher costs ~20 us per forward and ~50 us per forward+backward in eager mode on
the CPU, an autograd.Function ~3 us.
"""

from __future__ import annotations

import functools

import torch


def first_order_only(op_name: str, backward):
    """An op's backward that refuses create_graph=True (grad mode on inside backward): the
    gradient kernels have no derivative autograd could record, and returning gradients
    whose second-order terms are silently missing (zeros) is worse than an error.
    (torch.compile refuses double backward itself.)"""

    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"fused_attn {op_name.lstrip('_')}: double backward (create_graph=True) is not supported: the gradient "
                f"kernels have no derivative. Use backend='reference' (plain torch math) where second-order "
                f"gradients are needed.")
        return backward(ctx, *grads)

    return checked


def twin_function(name: str, forward, setup_context, backward) -> type:
    """A torch.autograd.Function running forward(*inputs) -> outputs, then the op's own
    setup_context(ctx, inputs, outputs); its backward is the op's backward."""

    def fwd(ctx, *inputs):
        outputs = forward(*inputs)
        setup_context(ctx, inputs, outputs)
        return outputs

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd),
                                                   "backward": staticmethod(first_order_only(name, backward)),
                                                   "kernel": staticmethod(forward)})


def apply(custom_op, function: type, *args):
    """The custom op under torch.compile; in eager mode the autograd.Function, or, when no
    input needs a gradient, the kernel itself (the Function's bookkeeping costs ~4 us)."""
    if torch.compiler.is_compiling():
        return custom_op(*args)
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return function.apply(*args)
    return function.kernel(*args)


def kernel_op(name: str):
    """torch.library.custom_op(name) over a kernel call fn, remembering fn for `call`."""

    def wrap(fn):
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.eager = fn
        return op

    return wrap


def call(op, *args):
    """A kernel_op's call: the custom op under torch.compile (traced opaque, through its fake),
    its function itself in eager mode (no dispatcher hop). With `apply`, the only place the
    eager and compiled paths fork."""
    return op(*args) if torch.compiler.is_compiling() else op.eager(*args)
