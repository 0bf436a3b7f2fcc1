"""The oracle: plain, readable PyTorch for the three ops, written for clarity.

Every function computes in the dtype of its inputs; the tests run it on float64 copies
of the inputs to get the "true" answer and on the low-precision inputs to measure how
far an honest implementation in that dtype lands from it (the 2x rule, fused_attn.testing).
Autograd through these functions gives the reference gradients.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import codes

ACTIVATIONS = codes.ACTIVATION_NAMES


def causal_variant(mask) -> Optional[str]:
    """'upper_left' / 'lower_right' for torch's CausalBias objects, else None."""
    try:
        from torch.nn.attention.bias import CausalBias, CausalVariant
    except ImportError:  # pragma: no cover - torch without CausalBias
        return None
    if isinstance(mask, CausalBias):
        return "upper_left" if mask.variant == CausalVariant.UPPER_LEFT else "lower_right"
    return None


def causal_allowed(lq: int, lk: int, variant: str, device=None) -> torch.Tensor:
    """(lq, lk) bool: upper-left lets query i see keys j <= i; lower-right aligns the last
    query with the last key (query i sees keys j <= i + lk - lq), as cached decoding needs."""
    offset = 0 if variant == "upper_left" else lk - lq
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return j <= i + offset


def window_allowed(lq: int, lk: int, window_size, device=None) -> torch.Tensor:
    """(lq, lk) bool: the sliding window (left, right), bottom-right aligned (FlashAttention's
    convention): query i, at position p = i + lk - lq, sees keys p - left <= j <= p + right;
    -1 leaves that side unbounded."""
    left, right = window_size
    p = torch.arange(lq, device=device)[:, None] + (lk - lq)
    j = torch.arange(lk, device=device)[None, :]
    ok = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if left >= 0:
        ok &= j >= p - left
    if right >= 0:
        ok &= j <= p + right
    return ok


def alibi_bias(slopes: torch.Tensor, lq: int, lk: int) -> torch.Tensor:
    """ALiBi: slopes (H,) or (B, H) -> the bias -slope[h] * |i + lk - lq - j| added to the
    scores, (H, lq, lk) or (B, H, lq, lk) (bottom-right aligned, as the window)."""
    i = torch.arange(lq, device=slopes.device)[:, None] + (lk - lq)
    j = torch.arange(lk, device=slopes.device)[None, :]
    return -slopes[..., None, None] * (i - j).abs().to(slopes.dtype)


def default_scale(head_dim: int) -> float:
    """1 / sqrt(head_dim); 1 for head dim 0, whose scores are all 0 whatever the scale (torch
    then returns the mean of the values)."""
    return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, dropout_mask: Optional[torch.Tensor] = None,
                                 return_lse: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                                 alibi_slopes: Optional[torch.Tensor] = None, sinks: Optional[torch.Tensor] = None):
    """softmax(Q K^T * scale + mask) V over (..., L, D) tensors.

    query (..., Hq, Lq, D), key (..., Hk, Lk, D), value (..., Hk, Lk, Dv) -> (..., Hq, Lq, Dv).
    attn_mask: bool (True takes part), float (added to the scores) or a torch CausalBias.
    A row whose every score is masked gives 0. With dropout_p > 0 a keep-mask broadcastable
    to (..., Hq, Lq, Lk) must be given (True keeps); kept probabilities are scaled by 1/(1-p).
    return_lse=True also returns each row's log-sum-exp of the scaled, masked scores
    (..., Hq, Lq), before dropout; -inf on a fully masked row.

    The FlashAttention features, in this order: softcap c > 0 makes the scores c * tanh(s / c);
    ALiBi adds alibi_bias(alibi_slopes); then the masks, and window_size's window_allowed;
    sinks (Hq,) is one logit per head that joins every row's softmax denominator without a
    value (so a row whose keys are all masked gives 0 and lse = its sink).
    """
    lq, lk, d = query.size(-2), key.size(-2), query.size(-1)
    scale = default_scale(d) if scale is None else scale
    if enable_gqa and query.dim() >= 3 and key.size(-3) != query.size(-3):
        rep = query.size(-3) // key.size(-3)
        key = key.repeat_interleave(rep, dim=-3)
        value = value.repeat_interleave(rep, dim=-3)
    scores = (query @ key.transpose(-2, -1)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes.to(scores.dtype), lq, lk)
    variant = causal_variant(attn_mask)
    if is_causal:
        variant = "upper_left"
    if variant is not None:
        scores = scores.masked_fill(~causal_allowed(lq, lk, variant, scores.device), float("-inf"))
    elif attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        scores = scores + attn_mask
    if tuple(window_size) != (-1, -1):
        scores = scores.masked_fill(~window_allowed(lq, lk, window_size, scores.device), float("-inf"))
    if sinks is not None:  # one more column: the sink's logit, with no value
        sink_column = sinks.to(scores.dtype)[:, None, None].expand(*scores.shape[:-1], 1)
        scores = torch.cat((scores, sink_column), dim=-1)
    fully_masked = (scores == float("-inf")).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(fully_masked, 0.0), dim=-1).masked_fill(fully_masked, 0.0)
    if sinks is not None:
        probs = probs[..., :lk]
    if dropout_p > 0.0:
        if dropout_mask is None:
            raise ValueError("the reference needs dropout_mask (the keep-mask) when dropout_p > 0")
        probs = probs * dropout_mask / (1.0 - dropout_p)
    if not return_lse:
        return probs @ value
    # a fully masked row's scores are filled with 0 first, so its (discarded) log-sum-exp and gradient stay finite
    lse = torch.logsumexp(scores.masked_fill(fully_masked, 0.0), dim=-1).masked_fill(fully_masked[..., 0],
                                                                                       float("-inf"))
    return probs @ value, lse


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, residual=None, return_residual=False):
    """LayerNorm over the trailing `normalized_shape` dims of input (+ residual).

    With residual, normalises s = input + residual (in input's dtype); with
    return_residual=True returns (y, s), s being input itself when there is no residual.
    """
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    s = input if residual is None else input + residual
    dims = tuple(range(s.dim() - len(normalized_shape), s.dim()))
    mean = s.mean(dim=dims, keepdim=True)
    var = ((s - mean) ** 2).mean(dim=dims, keepdim=True)
    y = (s - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return (y, s) if return_residual else y


def apply_activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """relu, gelu (exact, erf), gelu_tanh (the tanh approximation) or silu."""
    if name == "relu":
        return torch.relu(x)
    if name == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    if name == "silu":
        return x * torch.sigmoid(x)
    raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {name!r}")


def feed_forward(input, w1, b1, w2, b2, *, activation="relu", dropout_p=0.0, residual=None,
                 dropout_mask: Optional[torch.Tensor] = None):
    """act(input @ w1^T + b1) @ w2^T + b2 (+ residual), nn.Linear weight layout.

    input (..., d_model), w1 (d_ff, d_model), b1 (d_ff,) or None, w2 (d_model, d_ff),
    b2 (d_model,) or None. Dropout acts on the hidden activation with the given keep-mask.
    """
    h = apply_activation(F.linear(input, w1, b1), activation)
    if dropout_p > 0.0:
        if dropout_mask is None:
            raise ValueError("the reference needs dropout_mask (the keep-mask) when dropout_p > 0")
        h = h * dropout_mask / (1.0 - dropout_p)
    out = F.linear(h, w2, b2)
    return out if residual is None else out + residual


def varlen_attention(query, key, value, cu_seqlens_q, cu_seqlens_k, max_q=None, max_k=None, *, scale=None,
                     is_causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, sinks=None,
                     enable_gqa=False, seqused_k=None, block_table=None, return_lse=False):
    """Attention over packed sequences, one sequence at a time.

    query (Tq, Hq, D), key/value (Tk, Hk, D) packed along the tokens: sequence i's queries are
    rows cu_seqlens_q[i]:cu_seqlens_q[i+1], its keys cu_seqlens_k[i]:cu_seqlens_k[i+1] (the first
    seqused_k[i] of them when given). With block_table (N, pages) key/value are a pool of pages
    (num_pages, page_size, Hk, D) and sequence i's keys are its pages in order, seqused_k[i] of
    them. is_causal aligns bottom-right (window (-1, 0)). alibi_slopes (Hq,) or (N, Hq).
    -> out (Tq, Hq, Dv) (rows outside every sequence: 0) and, with return_lse, lse (Hq, Tq)."""
    cq = [int(x) for x in cu_seqlens_q]
    outs = query.new_zeros(query.size(0), query.size(1), value.size(-1))
    lses = torch.full((query.size(1), query.size(0)), float("-inf"), dtype=query.dtype, device=query.device)
    left, right = window_size
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    for i in range(len(cq) - 1):
        q = query[cq[i]:cq[i + 1]]
        if block_table is not None:
            page = key.size(1)
            n = int(seqused_k[i])
            pages = block_table[i, :-(-n // page)].long()
            k = key[pages].reshape(-1, *key.shape[2:])[:n]
            v = value[pages].reshape(-1, *value.shape[2:])[:n]
        else:
            k = key[int(cu_seqlens_k[i]):int(cu_seqlens_k[i + 1])]
            v = value[int(cu_seqlens_k[i]):int(cu_seqlens_k[i + 1])]
            if seqused_k is not None:
                k, v = k[:int(seqused_k[i])], v[:int(seqused_k[i])]
        slopes = alibi_slopes[i] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        out, lse = scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=scale,
                                                enable_gqa=enable_gqa, window_size=(left, right), softcap=softcap,
                                                alibi_slopes=slopes, sinks=sinks, return_lse=True)
        outs = outs.index_copy(0, torch.arange(cq[i], cq[i + 1], device=query.device), out.transpose(0, 1))
        lses = lses.index_copy(1, torch.arange(cq[i], cq[i + 1], device=query.device), lse)
    return (outs, lses) if return_lse else outs


def decode_attention(query, k_cache, v_cache, cache_seqlens, *, block_table=None, scale=None, is_causal=False,
                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, sinks=None, return_lse=False):
    """Decode attention as packed sequences (varlen_attention above).

    query (B, Lq, Hq, D) against sequence b's first cache_seqlens[b] keys: k_cache/v_cache
    (B, L, Hk, D) contiguous, or pages (num_pages, page_size, Hk, D) with block_table (B, pages).
    Query i sits at position cache_seqlens[b] - Lq + i: causal and windows align there
    (bottom-right), and ALiBi's distances are measured from there (slopes (Hq,) or (B, Hq)). GQA
    when Hq is a multiple of Hk. -> out (B, Lq, Hq, Dv) and, with return_lse, lse (B, Hq, Lq)."""
    B, Lq, Hq, _ = query.shape
    if block_table is None:
        block_table = torch.arange(B, device=query.device)[:, None]
    cu_q = torch.arange(B + 1, device=query.device) * Lq
    out, lse = varlen_attention(query.flatten(0, 1), k_cache, v_cache, cu_q, None, scale=scale, is_causal=is_causal,
                                window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
                                enable_gqa=True,
                                seqused_k=cache_seqlens, block_table=block_table, return_lse=True)
    out, lse = out.view(B, Lq, Hq, -1), lse.view(Hq, B, Lq).transpose(0, 1)
    return (out, lse) if return_lse else out
