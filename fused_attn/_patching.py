"""Swap torch's attention and LayerNorm modules inside an existing model for the fused ones."""

from __future__ import annotations

import torch
from torch import nn

from . import nn as fnn


def _replacement(module: nn.Module, backend: str):
    if isinstance(module, nn.MultiheadAttention) and not isinstance(module, fnn.MultiheadAttention):
        new = fnn.MultiheadAttention(
            module.embed_dim, module.num_heads, dropout=module.dropout, bias=module.in_proj_bias is not None,
            add_bias_kv=module.bias_k is not None, add_zero_attn=module.add_zero_attn, kdim=module.kdim,
            vdim=module.vdim, batch_first=module.batch_first, backend=backend)
    elif isinstance(module, nn.LayerNorm) and not isinstance(module, fnn.LayerNorm):
        new = fnn.LayerNorm(module.normalized_shape, eps=module.eps, elementwise_affine=module.elementwise_affine,
                            bias=module.bias is not None, backend=backend)
    else:
        return None
    ref = next(iter(module.parameters()), None)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    new.load_state_dict(module.state_dict())
    new.train(module.training)
    return new


def patch(model: nn.Module, backend: str = "auto") -> dict[str, nn.Module]:
    """Replace every nn.MultiheadAttention and nn.LayerNorm inside `model`, in place, by
    fused_attn.nn.MultiheadAttention / LayerNorm with the same weights and settings.

    Returns {qualified name: the module it replaced}; the model is modified in place.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    replaced: dict[str, nn.Module] = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            new = _replacement(child, backend)
            if new is not None:
                setattr(module, child_name, new)
                replaced[f"{name}.{child_name}" if name else child_name] = child
    root = _replacement(model, backend)
    if root is not None:
        raise ValueError("model is itself a MultiheadAttention/LayerNorm: use fused_attn.nn directly")
    return replaced


@torch.no_grad()
def unpatch(model: nn.Module, replaced: dict[str, nn.Module]) -> None:
    """Put back the modules `patch` replaced (with the fused modules' current weights)."""
    for qualified, old in replaced.items():
        parent_name, _, child_name = qualified.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old.load_state_dict(getattr(parent, child_name).state_dict())
        setattr(parent, child_name, old)
