"""fused_attn: fused Triton, CUDA C++ and CPU kernels for Transformer attention,
LayerNorm and feed-forward, with a float64 reference and a benchmark harness.

Importing never initialises CUDA and never fails because a backend is missing:
``available_backends()`` says which backends can run here and why not.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from . import _checks, reference
from .dispatch import BACKENDS, available_backends
from . import _script, provider
from .provider import activate, activated, deactivate

__version__ = "0.1.0"

__all__ = ["scaled_dot_product_attention", "varlen_attention", "decode_attention", "merge_attention",
           "layer_norm", "feed_forward", "available_backends", "reference", "BACKENDS",
           "nn", "models", "patch", "activate", "deactivate", "activated"]


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *, window_size: tuple[int, int] = (-1, -1),
                                 softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                                 sinks: Optional[torch.Tensor] = None, return_lse: bool = False,
                                 backend: str = "auto"):
    """softmax(Q K^T * scale + mask) V, with torch's F.scaled_dot_product_attention semantics.

    query (..., Hq, Lq, D), key (..., Hk, Lk, D), value (..., Hk, Lk, Dv) -> (..., Hq, Lq, Dv).
    attn_mask: bool (True takes part) or float (added) tensor broadcastable to
    (..., Hq, Lq, Lk), or torch's causal_upper_left / causal_lower_right bias;
    is_causal: upper-left causal. A row with every key masked gives 0 (never NaN).
    enable_gqa: Hq a multiple of Hk. dropout_p: on the probabilities, seeded from torch's
    generator. A float mask that requires grad gets its gradient. return_lse=True returns
    (out, lse): lse (..., Hq, Lq) the natural-log log-sum-exp of each row's scaled, masked
    scores before dropout (FlashAttention's convention), float32 (float64 for float64 inputs),
    -inf on a fully masked row, differentiable; merge_attention combines such results.

    FlashAttention's features (semantics: fused_attn.reference): window_size (left, right),
    bottom-right aligned, -1 unbounded; softcap c > 0 (scores c * tanh(s / c) before masks);
    alibi_slopes (Hq,) or (B, Hq) float32 (bias -slope * |i + Lk - Lq - j|); sinks (Hq,), one
    logit per head in every row's softmax denominator (differentiable).
    """
    from .ops import attention as op

    query, key, value, attn_mask = _checks.broadcast_attention_inputs(query, key, value, attn_mask)
    mask_kind, causal = _checks.attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    _checks.flag("return_lse", return_lse)
    plain = (isinstance(window_size, (tuple, list)) and tuple(window_size) == (-1, -1) and not softcap
             and alibi_slopes is None and sinks is None and not return_lse)
    if plain:  # the SDPA contract alone: straight to the backend (the hot path of every model)
        _, impl = op.OP.select(backend, query.device, query=query, key=key, value=value, attn_mask=attn_mask,
                               dropout_p=dropout_p, mask_kind=mask_kind)
        return impl(query, key, value, attn_mask, dropout_p, scale, enable_gqa, mask_kind, causal)
    _checks.attention_features(query, window_size, softcap, alibi_slopes, sinks)
    return op.attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                        window_size=tuple(window_size), softcap=float(softcap), alibi_slopes=alibi_slopes,
                        sinks=sinks, return_lse=return_lse, backend=backend)


def varlen_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: Optional[torch.Tensor], max_q: int, max_k: int, *, scale: Optional[float] = None,
                     is_causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                     alibi_slopes: Optional[torch.Tensor] = None, sinks: Optional[torch.Tensor] = None,
                     enable_gqa: bool = False, seqused_k: Optional[torch.Tensor] = None,
                     block_table: Optional[torch.Tensor] = None, return_lse: bool = False, return_aux=None,
                     num_splits: Optional[int] = None, backend: str = "auto"):
    """Attention over packed variable-length sequences, torch.nn.attention.varlen.varlen_attn's
    contract (same positional arguments; return_aux=AuxRequest(lse=True) as return_lse=True).

    query (Tq, Hq, D), key/value (Tk, Hk, D); sequence i: queries cu_seqlens_q[i]:cu_seqlens_q[i+1],
    keys cu_seqlens_k[i]:cu_seqlens_k[i+1], of which the first seqused_k[i] when given (a cache
    slot longer than its sequence). block_table (N, pages) int: key/value are a pool of pages
    (num_pages, page_size, Hk, D), sequence i's keys its first ceil(seqused_k[i] / page_size)
    pages in order (seqused_k required; cu_seqlens_k may be None). Sequences never see each
    other; empty ones are allowed. is_causal: bottom-right aligned. The features of
    scaled_dot_product_attention, alibi_slopes also (N, Hq). Differentiable (paged too).
    -> out (Tq, Hq, Dv); with return_lse also lse (Hq, Tq) float32 (-inf: no key).
    num_splits is accepted for torch's signature: every sequence's result here is independent
    of the batch it is in, whatever it says.
    """
    from .ops import varlen as op

    if return_aux is not None:
        return_lse = return_lse or bool(getattr(return_aux, "lse", False))
    _checks.varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_q, max_k, seqused_k, block_table, enable_gqa)
    _checks.flag("is_causal", is_causal)
    _checks.flag("return_lse", return_lse)
    if scale is not None:
        _checks.finite_number("scale", scale)
    _checks.attention_features(query.transpose(0, 1), window_size, softcap, alibi_slopes, sinks,
                               batch=len(cu_seqlens_q) - 1)
    return op.varlen_attention(query, key, value, cu_seqlens_q, cu_seqlens_k, scale=scale, is_causal=is_causal,
                               window_size=tuple(window_size), softcap=float(softcap), alibi_slopes=alibi_slopes,
                               sinks=sinks, enable_gqa=enable_gqa, seqused_k=seqused_k, block_table=block_table,
                               return_lse=return_lse, backend=backend)


def decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                     *, block_table: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                     is_causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                     alibi_slopes: Optional[torch.Tensor] = None, sinks: Optional[torch.Tensor] = None,
                     num_splits: int = 0, return_lse: bool = False, backend: str = "auto"):
    """Attention of a few new queries per sequence against a KV cache (decoding), in the
    layout of FlashAttention's flash_attn_with_kvcache.

    query (B, Lq, Hq, D); k_cache/v_cache (B, L, Hk, D) / (B, L, Hk, Dv) contiguous, or pages
    (num_pages, page_size, Hk, D) with block_table (B, max_pages) int: sequence b's j-th block of
    page_size keys is page block_table[b, j]. Sequence b uses its first cache_seqlens[b] keys
    (the new tokens' included); query i sits at position cache_seqlens[b] - Lq + i, where causal
    and window_size (left, right) align (bottom-right). Hq a multiple of Hk (GQA). softcap,
    alibi_slopes ((Hq,) or (B, Hq), distances from the query's position), sinks: as
    scaled_dot_product_attention. num_splits: key splits per sequence merged by their
    log-sum-exp (0: chosen from the sizes). -> out (B, Lq, Hq, Dv); with return_lse also lse
    (B, Hq, Lq) float32 (-inf: no key). Inference only (no gradient).
    """
    from .ops import decode as op

    _checks.decode(query, k_cache, v_cache, cache_seqlens, block_table, num_splits)
    for name, flag in (("is_causal", is_causal), ("return_lse", return_lse)):
        _checks.flag(name, flag)
    if scale is not None:
        _checks.finite_number("scale", scale)
    _checks.attention_features(query.transpose(1, 2), window_size, softcap, alibi_slopes, sinks)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (query, k_cache, v_cache, alibi_slopes, sinks)):
        raise NotImplementedError("decode_attention has no backward (it is for inference): call it under "
                                  "torch.no_grad(), or use scaled_dot_product_attention / varlen_attention, which "
                                  "are differentiable")
    return op.decode_attention(query, k_cache, v_cache, cache_seqlens, block_table=block_table, scale=scale,
                               is_causal=is_causal, window_size=tuple(window_size), softcap=float(softcap),
                               alibi_slopes=alibi_slopes, sinks=sinks, num_splits=int(num_splits),
                               return_lse=return_lse, backend=backend)


def merge_attention(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention computed over disjoint sets of keys into attention over their union.

    outs[i] (..., Lq, Dv) and lses[i] (..., Lq), the natural-log log-sum-exp of each row's
    scaled, masked scores over part i's keys (-inf where a row has none there) -> (out, lse):
    out = sum_i exp(lse_i - lse) * outs[i] in outs' dtype, lse = log(sum_i exp(lse_i)) in
    float32 (float64 for float64 parts). Exact up to rounding, differentiable; a row empty in
    every part gives 0 and -inf. The building block of split-key decoding and ring attention.
    """
    from .ops import attention as op

    _checks.merge_attention(outs, lses)
    return op.merge_partials(list(outs), list(lses))


def layer_norm(input: torch.Tensor, normalized_shape: Union[int, Sequence[int]], weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5, *, residual: Optional[torch.Tensor] = None,
               return_residual: bool = False, backend: str = "auto"):
    """LayerNorm over the trailing `normalized_shape` dims, like F.layer_norm.

    input (..., *normalized_shape); weight, bias normalized_shape (input's dtype or float32).
    With residual (input's shape) it normalises input + residual, and with
    return_residual=True returns (y, input + residual) for pre-norm blocks.
    Statistics are computed in float32 whatever the input dtype.
    """
    from .ops import layer_norm as op

    shape = _checks.layer_norm(input, normalized_shape, weight, bias, eps, residual, return_residual)
    _, impl = op.OP.select(backend, input.device, input=input, weight=weight, bias=bias, residual=residual)
    return impl(input, shape, weight, bias, eps, residual, return_residual)


def feed_forward(input: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                 b2: Optional[torch.Tensor], *, activation: str = "relu", dropout_p: float = 0.0,
                 residual: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """act(input W1^T + b1) W2^T + b2 (+ residual), with nn.Linear weight layout.

    input (..., d_model), w1 (d_ff, d_model), b1 (d_ff,) or None, w2 (d_model, d_ff),
    b2 (d_model,) or None, residual (..., d_model) -> (..., d_model). activation: relu,
    gelu (erf), gelu_tanh or silu; dropout_p acts on the hidden activation (seeded from
    torch's generator).
    """
    from .ops import feed_forward as op

    _checks.feed_forward(input, w1, b1, w2, b2, activation, dropout_p, residual)
    _, impl = op.OP.select(backend, input.device, input=input, w1=w1, dropout_p=dropout_p)
    return impl(input, w1, b1, w2, b2, activation, dropout_p, residual)


def patch(model, backend: str = "auto"):
    """Replace every torch.nn.MultiheadAttention and torch.nn.LayerNorm inside `model`, in
    place, by the fused modules with the same weights; returns {name: replaced module}."""
    from ._patching import patch as _patch

    return _patch(model, backend)


def __getattr__(name):  # lazy submodules: fused_attn.nn, fused_attn.models, ...
    if name in ("nn", "models", "testing", "bench", "gate", "distributed"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fused_attn' has no attribute {name!r}")


# torch's SDPA provider registry learns the name "fused_attn"; activating it is opt-in
# (fused_attn.activate(), torch.nn.attention.activate_flash_attention_impl, or FUSED_ATTN_SDPA=1)
provider.register()
provider.activate_from_environment()
# torch.jit.script compiles calls of the three functions above to dispatcher ops
_script.register()
