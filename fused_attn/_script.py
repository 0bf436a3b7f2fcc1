"""TorchScript: torch.jit.script compiles a call of fused_attn.scaled_dot_product_attention,
layer_norm or feed_forward to a dispatcher op (fused_attn::<name>, CompositeImplicitAutograd,
so autograd runs through our kernels) instead of trying to compile the Python function.
The ops run the Python functions: a scripted model runs from Python, not from C++ alone.
Under TorchScript layer_norm cannot return the residual (its return type must be fixed)."""

from __future__ import annotations

import torch

_SCHEMAS = {
    "scaled_dot_product_attention": "scaled_dot_product_attention(Tensor query, Tensor key, Tensor value, "
                                    "Tensor? attn_mask=None, float dropout_p=0., bool is_causal=False, "
                                    "float? scale=None, bool enable_gqa=False, *, str backend=\"auto\") -> Tensor",
    "layer_norm": "layer_norm(Tensor input, int[1] normalized_shape, Tensor? weight=None, Tensor? bias=None, "
                  "float eps=1e-05, *, Tensor? residual=None, bool return_residual=False, str backend=\"auto\") "
                  "-> Tensor",
    "feed_forward": "feed_forward(Tensor input, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, *, "
                    "str activation=\"relu\", float dropout_p=0., Tensor? residual=None, str backend=\"auto\") "
                    "-> Tensor",
}
_library = None


def register() -> None:
    """Define the ops and map the public functions to them for torch.jit.script (once)."""
    global _library
    if _library is not None:
        return
    import fused_attn

    def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, residual=None,
                   return_residual=False, backend="auto"):
        if return_residual:
            raise RuntimeError("fused_attn.layer_norm(return_residual=True) is not available under TorchScript "
                               "(its return type must be fixed): compute input + residual separately")
        return fused_attn.layer_norm(input, normalized_shape, weight, bias, eps, residual=residual, backend=backend)

    impls = {"scaled_dot_product_attention": fused_attn.scaled_dot_product_attention, "layer_norm": layer_norm,
             "feed_forward": fused_attn.feed_forward}
    _library = torch.library.Library("fused_attn", "FRAGMENT")
    for name, schema in _SCHEMAS.items():
        _library.define(schema)
        _library.impl(name, impls[name], "CompositeImplicitAutograd")
        torch.jit._builtins._register_builtin(getattr(fused_attn, name), f"fused_attn::{name}")
