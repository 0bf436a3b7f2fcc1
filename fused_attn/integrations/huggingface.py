"""Hugging Face transformers: ``attn_implementation="fused_attn"``.

    from fused_attn.integrations import huggingface
    huggingface.register()                      # once
    model = AutoModel.from_config(cfg, attn_implementation="fused_attn")

The attention function follows transformers' own SDPA integration
(``transformers.integrations.sdpa_attention``) point by point, with
fused_attn.scaled_dot_product_attention underneath: the masks are built by transformers'
``sdpa_mask`` (registered for this name), so sliding windows and packed sequences arrive
inside the mask as they do for "sdpa"; ``is_causal`` is inferred the same way; GQA runs
natively (no repeated K/V); ``position_bias`` (T5's relative bias) is combined with the mask
and causality as transformers combines it; attention sinks (``s_aux``, gpt-oss) join every
row's softmax denominator exactly (the ``sinks`` of our attention); ``softcap`` (Gemma-2's
logit softcapping) caps the scores before the mask. A keyword it does not know, with a value that is not
None, raises instead of being ignored.

Models whose attention classes predate transformers' attention registry (BERT, RoBERTa and
DistilBERT in transformers 4.x; the tests pin 5.24, where every family uses it) cannot take
a registered implementation: run them in their "sdpa" mode under fused_attn.activate()
(torch's SDPA provider) instead.
"""

from __future__ import annotations

from typing import Optional

import torch

import fused_attn

NAME = "fused_attn"
_backend = "auto"

# keywords transformers passes to attention functions that carry nothing the mask built by
# sdpa_mask does not already (sliding windows, packed sequences) or no attention semantics
# at all; transformers' own SDPA function ignores them too
MASK_CARRIES = ("sliding_window", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
                "seq_idx", "cache_position", "query_length", "key_length")
NO_ATTENTION_MEANING = ("use_cache", "output_hidden_states", "output_router_logits", "num_items_in_batch",
                        "past_key_values", "past_key_value", "layer_idx", "return_dict", "token_type_ids")


def _additive_mask(attention_mask: Optional[torch.Tensor], is_causal: bool, lq: int, lk: int,
                   bias: Optional[torch.Tensor], dtype: torch.dtype, device) -> torch.Tensor:
    """transformers' create_position_bias_mask: bias (0 when None) where a key is visible,
    finfo(dtype).min where it is not; a float attention_mask is added to the bias."""
    min_value = torch.finfo(dtype).min
    bias = torch.zeros((), dtype=dtype, device=device) if bias is None else bias
    if attention_mask is None:
        if not is_causal:
            return bias.expand(*bias.shape[:-2], lq, lk) if bias.dim() >= 2 else bias.expand(lq, lk)
        visible = torch.arange(lq, device=device)[:, None] >= torch.arange(lk, device=device)[None, :]
        return torch.where(visible, bias, min_value)
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, bias, min_value)
    return bias + attention_mask


def fused_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                            scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                            position_bias: Optional[torch.Tensor] = None, s_aux: Optional[torch.Tensor] = None,
                            **kwargs):
    """transformers' attention-interface signature: query (B, H, Lq, D), key/value
    (B, Hkv, Lk, D), attention_mask bool (True attends) or additive float, broadcastable to
    (B, H, Lq, Lk); position_bias additive (B or 1, H, Lq, Lk); s_aux (H,) sink logits
    -> (attn_output (B, Lq, H, Dv), None)."""
    if kwargs.get("output_attentions", False):
        raise NotImplementedError("fused_attn does not return attention weights; use attn_implementation='eager'")
    unknown = sorted(k for k, v in kwargs.items() if v is not None and v is not False
                     and k not in MASK_CARRIES + NO_ATTENTION_MEANING + ("output_attentions", "softcap"))
    if unknown:
        raise TypeError(f"fused_attn's attention function does not know the keyword(s) {', '.join(unknown)} "
                        f"(from {type(module).__name__}); refusing to ignore them")
    q_len = query.shape[2]
    enable_gqa = key.shape[1] != query.shape[1]
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if is_causal and key.shape[2] > q_len:  # prefill into a longer (static) cache: the rest is unseen
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        if position_bias is not None:
            position_bias = position_bias[..., :q_len]
    if position_bias is not None:
        attention_mask = _additive_mask(attention_mask, is_causal, q_len, key.shape[2], position_bias, query.dtype,
                                        query.device)
        is_causal = False
    if attention_mask is not None and attention_mask.dtype != torch.bool and attention_mask.dtype != query.dtype:
        attention_mask = attention_mask.to(query.dtype)
    out = fused_attn.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal, scale=scaling,
        enable_gqa=enable_gqa, softcap=kwargs.get("softcap") or 0.0, sinks=s_aux, backend=_backend)
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
