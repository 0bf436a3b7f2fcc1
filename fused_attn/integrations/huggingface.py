"""Hugging Face transformers: ``attn_implementation="fused_attn"``.

    from fused_attn.integrations import huggingface
    huggingface.register()                      # once
    model = AutoModel.from_config(cfg, attn_implementation="fused_attn")

The attention function follows transformers' SDPA integration (same masks, GQA,
causality and scaling) with fused_attn.scaled_dot_product_attention underneath.
"""

from __future__ import annotations

from typing import Optional

import torch

import fused_attn

NAME = "fused_attn"
_backend = "auto"


def fused_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                            scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers' attention-interface signature: query (B, H, Lq, D), key/value
    (B, Hkv, Lk, D) -> (attn_output (B, Lq, H, D), None)."""
    if kwargs.get("output_attentions", False):
        raise NotImplementedError("fused_attn does not return attention weights; use attn_implementation='eager'")
    enable_gqa = key.shape[1] != query.shape[1]
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
        if attention_mask.dtype != torch.bool and attention_mask.dtype != query.dtype:
            attention_mask = attention_mask.to(query.dtype)
    if is_causal is None:
        is_causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    out = fused_attn.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=bool(is_causal), scale=scaling,
        enable_gqa=enable_gqa, backend=_backend)
    return out.transpose(1, 2).contiguous(), None


def register(backend: str = "auto") -> str:
    """Register the attention implementation with transformers; returns its name."""
    global _backend
    try:
        from transformers import AttentionInterface
    except ImportError as e:
        raise ImportError("transformers is not installed: pip install 'fused_attn[hf]'") from e
    _backend = backend
    AttentionInterface.register(NAME, fused_attention_forward)
    try:  # newer transformers also keep a mask-interface registry keyed by implementation name
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    except ImportError:
        pass
    return NAME
