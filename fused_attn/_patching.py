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


# modules with a fast path (torch._transformer_encoder_layer_fwd, nested tensors) that, in
# inference, reads their attention and norm weights directly instead of calling the modules:
# a patched one must leave it, or the swapped-in fused modules would never run
FAST_PATH_MODULES = (nn.TransformerEncoderLayer, nn.TransformerEncoder)
_ORIGINAL_CLASS = "_fused_attn_original_class"
_without_fast_path_classes: dict = {}


def _without_fast_path(cls: type) -> type:
    """cls with its forward run under torch.backends.mha.set_fastpath_enabled(False)."""
    if cls not in _without_fast_path_classes:
        def forward(self, *args, **kwargs):
            enabled = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                return cls.forward(self, *args, **kwargs)
            finally:
                torch.backends.mha.set_fastpath_enabled(enabled)

        _without_fast_path_classes[cls] = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
    return _without_fast_path_classes[cls]


def patch(model: nn.Module, backend: str = "auto") -> dict[str, nn.Module]:
    """Replace every nn.MultiheadAttention and nn.LayerNorm inside `model`, in place, by
    fused_attn.nn.MultiheadAttention / LayerNorm with the same weights and settings, and take
    nn.TransformerEncoder(Layer)s off torch's inference fast path, which would bypass them.

    Returns {qualified name: the module it replaced}; the model is modified in place.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        if isinstance(module, FAST_PATH_MODULES) and not hasattr(module, _ORIGINAL_CLASS):
            setattr(module, _ORIGINAL_CLASS, type(module))
            module.__class__ = _without_fast_path(type(module))
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
    """Put back the modules `patch` replaced (with the fused modules' current weights) and
    torch's fast path."""
    for module in model.modules():
        if hasattr(module, _ORIGINAL_CLASS):
            module.__class__ = getattr(module, _ORIGINAL_CLASS)
            delattr(module, _ORIGINAL_CLASS)
    for qualified, old in replaced.items():
        parent_name, _, child_name = qualified.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old.load_state_dict(getattr(parent, child_name).state_dict())
        setattr(parent, child_name, old)
