"""Input validation for every public function: one place, one set of messages.

Each check raises TypeError (wrong kind of argument or dtype) or ValueError (wrong
shape, device or value) naming the argument, what it got and what was expected.
Backends never re-validate; they only say what they do not support (dispatch.py).
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np
import torch

from . import codes

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def describe(t: torch.Tensor) -> str:
    """'shape (2, 3), dtype torch.float16, device cpu' for error messages."""
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _fail_type(msg: str):
    raise TypeError(msg)


def _fail_value(msg: str):
    raise ValueError(msg)


def tensor(name: str, t, *, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        _fail_type(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def floating(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        _fail_type(f"{name} must be a floating-point tensor (float32, float16, bfloat16 or float64), "
                   f"got {describe(t)}")


def same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        _fail_value(f"{name} must be on the same device as {ref_name} ({ref.device}), got {describe(t)}")


def same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        _fail_type(f"{name} must have the same dtype as {ref_name} ({ref.dtype}), got {describe(t)}")


def flag(name: str, value) -> None:
    if not isinstance(value, bool):
        _fail_type(f"{name} must be a bool, got {type(value).__name__}")


def finite_number(name: str, value, *, positive: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    # any real number, numpy scalars included (np.float32(0.1) is what torch takes too)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        _fail_type(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        _fail_value(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        _fail_value(f"{name} must be > 0, got {value}")


def probability(name: str, value) -> None:
    finite_number(name, value)
    if not 0.0 <= value < 1.0:
        _fail_value(f"{name} must be in [0, 1), got {value}")


# --------------------------------------------------------------------------- LayerNorm


def normalized_shape(value) -> tuple[int, ...]:
    """Normalise an int or a sequence of ints to a tuple, rejecting anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        value = tuple(value)
    else:
        _fail_type(f"normalized_shape must be an int or a sequence of ints, got {type(value).__name__}")
    if len(value) == 0:
        _fail_value("normalized_shape must not be empty")
    for d in value:
        if isinstance(d, bool) or not isinstance(d, int):
            _fail_type(f"normalized_shape must contain ints, got {value!r}")
        if d <= 0:
            _fail_value(f"normalized_shape must contain sizes >= 1, got {value!r}")
    return value


def layer_norm(input, normalized_shape_, weight, bias, eps, residual, return_residual) -> tuple[int, ...]:
    """Validate layer_norm's arguments; returns normalized_shape as a tuple."""
    tensor("input", input)
    floating("input", input)
    shape = normalized_shape(normalized_shape_)
    k = len(shape)
    if input.dim() < k or tuple(input.shape[input.dim() - k:]) != shape:
        _fail_value(f"normalized_shape {shape} must match the trailing dimensions of input, "
                    f"got input {describe(input)}")
    for name, p in (("weight", weight), ("bias", bias)):
        tensor(name, p, optional=True)
        if p is None:
            continue
        floating(name, p)
        same_device(name, p, "input", input)
        if tuple(p.shape) != shape:
            _fail_value(f"{name} must have shape normalized_shape {shape}, got {describe(p)}")
        if p.dtype != input.dtype and (p.dtype != torch.float32 or input.dtype == torch.float64):
            # float32 parameters for 16-bit inputs (mixed precision); a float64 input takes float64
            # parameters only, as torch (computing it in float32 would lose the precision asked for)
            wanted = "input's dtype" if input.dtype == torch.float64 else "input's dtype or float32"
            _fail_type(f"{name} must have {wanted} ({input.dtype}), got {describe(p)}")
    tensor("residual", residual, optional=True)
    if residual is not None:
        same_device("residual", residual, "input", input)
        same_dtype("residual", residual, "input", input)
        if residual.shape != input.shape:
            _fail_value(f"residual must have input's shape {tuple(input.shape)}, got {describe(residual)}")
    if not isinstance(return_residual, bool):
        _fail_type(f"return_residual must be a bool, got {type(return_residual).__name__}")
    finite_number("eps", eps, positive=True)
    return shape


# --------------------------------------------------------------------------- attention


def attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> tuple[str, str]:
    """Validate scaled_dot_product_attention's arguments (torch's semantics).

    Returns (mask_kind, causal): mask_kind 'none' | 'bool' | 'float' | 'causal';
    causal 'none' | 'upper_left' | 'lower_right'.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            _fail_type(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        floating(name, t)
    qs, ks, vs = query.shape, key.shape, value.shape
    nd = len(qs)
    if nd < 2 or len(ks) < 2 or len(vs) < 2:
        bad = next((n, t) for n, t in (("query", query), ("key", key), ("value", value)) if t.dim() < 2)
        _fail_value(f"{bad[0]} must have at least 2 dimensions (..., L, D), got {describe(bad[1])}")
    for name, t in (("key", key), ("value", value)):
        same_device(name, t, "query", query)
        same_dtype(name, t, "query", query)
    if len(ks) != nd or len(vs) != nd:
        _fail_value(f"query, key and value must have the same number of dimensions, got query {describe(query)}, "
                    f"key {describe(key)}, value {describe(value)}")
    if ks[-1] != qs[-1]:
        _fail_value(f"key's head dim must equal query's ({qs[-1]}), got key {describe(key)}")
    if vs[-2] != ks[-2]:
        _fail_value(f"value must have key's sequence length ({ks[-2]}), got value {describe(value)}")
    if nd >= 3:
        if ks[:-3] != qs[:-3] or vs[:-3] != qs[:-3]:
            _fail_value(f"query, key and value batch dims must broadcast, got query {describe(query)}, "
                        f"key {describe(key)}, value {describe(value)}")
        hq, hk = qs[-3], ks[-3]
        if vs[-3] != hk:
            _fail_value(f"key and value must have the same number of heads, got key {describe(key)}, "
                        f"value {describe(value)}")
        if not isinstance(enable_gqa, bool):
            _fail_type(f"enable_gqa must be a bool, got {type(enable_gqa).__name__}")
        if hq != hk:
            if not enable_gqa:
                _fail_value(f"query has {hq} heads and key/value {hk}: pass enable_gqa=True for grouped-query "
                            f"attention, or use equal head counts (query {describe(query)}, key {describe(key)})")
            if hk == 0 or hq % hk != 0:
                _fail_value(f"enable_gqa needs query's heads ({hq}) to be a multiple of key/value's ({hk})")
    if not isinstance(is_causal, bool):
        _fail_type(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if dropout_p != 0.0:
        probability("dropout_p", dropout_p)
    if scale is not None:
        finite_number("scale", scale)

    if attn_mask is None:
        return "none", "upper_left" if is_causal else "none"
    lq, lk = qs[-2], ks[-2]
    variant = _causal_variant(attn_mask)
    if is_causal:
        _fail_value("attn_mask and is_causal=True cannot be used together: pass one of them")
    if variant is not None:
        if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (lq, lk):
            _fail_value(f"the causal attn_mask was made for (Lq, Lk) = ({attn_mask.seq_len_q}, "
                        f"{attn_mask.seq_len_kv}), the inputs have ({lq}, {lk})")
        return "causal", variant
    if not isinstance(attn_mask, torch.Tensor):
        _fail_type(f"attn_mask must be a bool or float tensor, a torch CausalBias or None, got "
                   f"{type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
        _fail_type(f"attn_mask must be bool or floating point, got {describe(attn_mask)}")
    same_device("attn_mask", attn_mask, "query", query)
    target = tuple(qs[:-1]) + (lk,)
    ms = attn_mask.shape  # broadcastable to target without growing it (torch.broadcast_shapes: ~12 us)
    if len(ms) > len(target) or any(m != 1 and m != t for m, t in zip(reversed(ms), reversed(target))):
        _fail_value(f"attn_mask must broadcast to (..., Lq, Lk) = {target}, got {describe(attn_mask)}")
    return ("bool" if attn_mask.dtype == torch.bool else "float"), "none"


def broadcast_attention_inputs(query, key, value, attn_mask):
    """torch's SDPA broadcasts the batch dims of query, key and value, and takes a float mask
    of another floating dtype (autocast): -> the inputs expanded to one batch shape (views),
    the float mask in query's dtype. Anything else is returned as is for attention() to judge."""
    tensors = (query, key, value)
    if all(isinstance(t, torch.Tensor) and t.dim() >= 4 and t.dim() == query.dim() for t in tensors):
        batches = [tuple(t.shape[:-3]) for t in tensors]
        if len(set(batches)) > 1:
            try:
                batch = torch.broadcast_shapes(*batches)
            except RuntimeError:
                batch = None
            if batch is not None:
                query, key, value = (t.expand(*batch, *t.shape[-3:]) for t in tensors)
    if (type(attn_mask) is torch.Tensor and attn_mask.is_floating_point() and isinstance(query, torch.Tensor)
            and query.is_floating_point() and attn_mask.dtype != query.dtype):
        attn_mask = attn_mask.to(query.dtype)
    return query, key, value, attn_mask


def attention_features(query, window_size, softcap, alibi_slopes, sinks, *, batch=None) -> None:
    """Validate the FlashAttention features of scaled_dot_product_attention / varlen_attention
    (query (..., H, L, D); batch: the size alibi_slopes may have before H, default B of a 4-D query)."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= -1 for w in window_size)):
        _fail_value(f"window_size must be a pair of ints (left, right), each >= 0 or -1 (unbounded), got "
                    f"{window_size!r}")
    finite_number("softcap", softcap)
    if softcap < 0:
        _fail_value(f"softcap must be >= 0 (0 turns it off), got {softcap}")
    heads = query.size(-3) if query.dim() >= 3 else None
    for name, t in (("alibi_slopes", alibi_slopes), ("sinks", sinks)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            _fail_type(f"{name} must be a tensor or None, got {type(t).__name__}")
        floating(name, t)
        same_device(name, t, "query", query)
        if heads is None:
            _fail_value(f"{name} needs query with a head dim (..., H, L, D), got query {describe(query)}")
    if alibi_slopes is not None:
        batch = (batch,) if batch is not None else (query.size(0),) if query.dim() == 4 else ()
        if alibi_slopes.shape not in ((heads,), (*batch, heads)):
            want = f"({heads},)" + (f" or ({batch[0]}, {heads})" if batch else "")
            _fail_value(f"alibi_slopes must have shape {want} (query's heads), got {describe(alibi_slopes)}")
    if sinks is not None and sinks.shape != (heads,):
        _fail_value(f"sinks must have shape ({heads},) (one logit per query head), got {describe(sinks)}")


def _index_tensor(name: str, t, shape_words: str, dims: int) -> None:
    if not isinstance(t, torch.Tensor):
        _fail_type(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        _fail_type(f"{name} must be int32 or int64, got {describe(t)}")
    if t.dim() != dims:
        _fail_value(f"{name} must be {shape_words}, got {describe(t)}")


def _keys_and_values(query, key_name: str, key, value_name: str, value) -> None:
    """Keys and values (..., Hk, D) / (..., Hk, Dv) on query's device, in its dtype, agreeing on
    all but the head dim, the keys' head dim equal to query's (varlen and decode)."""
    for name, t in ((key_name, key), (value_name, value)):
        same_device(name, t, "query", query)
        same_dtype(name, t, "query", query)
    if key.shape[:-1] != value.shape[:-1]:
        _fail_value(f"{key_name} and {value_name} must agree on all but the head dim, got {key_name} "
                    f"{describe(key)}, {value_name} {describe(value)}")
    if key.size(-1) != query.size(-1):
        _fail_value(f"{key_name}'s head dim must equal query's ({query.size(-1)}), got {key_name} {describe(key)}")


def varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_q, max_k, seqused_k, block_table, enable_gqa) -> None:
    """Validate varlen_attention's tensors and sequence boundaries (reads them on the host)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            _fail_type(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        floating(name, t)
    paged = block_table is not None
    if query.dim() != 3:
        _fail_value(f"query must be packed (Tq, Hq, D), got {describe(query)}")
    kv_dims = 4 if paged else 3
    for name, t in (("key", key), ("value", value)):
        if t.dim() != kv_dims:
            want = "a page pool (num_pages, page_size, Hk, D) with block_table" if paged else "packed (Tk, Hk, D)"
            _fail_value(f"{name} must be {want}, got {describe(t)}")
    _keys_and_values(query, "key", key, "value", value)
    hq, hk = query.size(1), key.size(-2)
    if hq != hk and (not enable_gqa or hk == 0 or hq % hk):
        _fail_value(f"query has {hq} heads and key/value {hk}: pass enable_gqa=True with Hq a multiple of Hk")
    _index_tensor("cu_seqlens_q", cu_seqlens_q, "(N + 1,)", 1)
    n = cu_seqlens_q.numel() - 1
    if n < 0:
        _fail_value("cu_seqlens_q must hold at least one entry (0)")
    cq = cu_seqlens_q.tolist()
    if cq[0] != 0 or any(b < a for a, b in zip(cq, cq[1:])) or cq[-1] > query.size(0):
        _fail_value(f"cu_seqlens_q must start at 0, never decrease and end within query's {query.size(0)} rows, "
                    f"got {cq}")
    lengths_k = None
    if cu_seqlens_k is None:
        if not paged:
            _fail_value("cu_seqlens_k may be None only with block_table (a paged cache)")
    else:
        _index_tensor("cu_seqlens_k", cu_seqlens_k, f"({n + 1},) like cu_seqlens_q", 1)
        ck = cu_seqlens_k.tolist()
        if len(ck) != n + 1 or ck[0] != 0 or any(b < a for a, b in zip(ck, ck[1:])) or (
                not paged and ck[-1] > key.size(0)):
            _fail_value(f"cu_seqlens_k must have N + 1 = {n + 1} entries, start at 0, never decrease and end within "
                        f"key's {key.size(0)} rows, got {ck}")
        lengths_k = [b - a for a, b in zip(ck, ck[1:])]
    if seqused_k is not None:
        _index_tensor("seqused_k", seqused_k, f"({n},)", 1)
        used = seqused_k.tolist()
        if len(used) != n or any(u < 0 for u in used) or (
                lengths_k is not None and not paged and any(u > lk for u, lk in zip(used, lengths_k))):
            _fail_value(f"seqused_k must hold N = {n} counts, each within its sequence's keys, got {used}")
        lengths_k = used
    if paged:
        if seqused_k is None:
            _fail_value("block_table needs seqused_k (how many keys of its pages each sequence uses)")
        _index_tensor("block_table", block_table, f"(N, max_pages) = ({n}, ...)", 2)
        if block_table.size(0) != n:
            _fail_value(f"block_table must have N = {n} rows, got {describe(block_table)}")
        page = key.size(1)
        need = max([-(-u // page) for u in lengths_k], default=0)
        if block_table.size(1) < need:
            _fail_value(f"block_table has {block_table.size(1)} pages per sequence, seqused_k needs {need} "
                        f"(page size {page})")
        if block_table.numel() and (int(block_table.min()) < 0 or int(block_table.max()) >= key.size(0)):
            _fail_value(f"block_table entries must index key's {key.size(0)} pages")
    lengths_q = [b - a for a, b in zip(cq, cq[1:])]
    for name, limit, lengths in (("max_q", max_q, lengths_q), ("max_k", max_k, lengths_k or [])):
        if not isinstance(limit, numbers.Integral) or isinstance(limit, bool):
            _fail_type(f"{name} must be an int, got {type(limit).__name__}")
        if lengths and max(lengths) > limit:
            _fail_value(f"{name} ({limit}) is below the longest sequence ({max(lengths)})")


def decode(query, k_cache, v_cache, cache_seqlens, block_table, num_splits) -> None:
    """Validate decode_attention's tensors; reads cache_seqlens and block_table (a small
    device-to-host copy on a GPU) so that no kernel reads outside the cache."""
    for name, t in (("query", query), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            _fail_type(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        floating(name, t)
        if t.dim() != 4:
            want = "(B, Lq, Hq, D)" if name == "query" else (
                "pages (num_pages, page_size, Hk, D) with block_table" if block_table is not None else "(B, L, Hk, D)")
            _fail_value(f"{name} must be {want}, got {describe(t)}")
    _keys_and_values(query, "k_cache", k_cache, "v_cache", v_cache)
    hq, hk = query.size(2), k_cache.size(2)
    if hk == 0 or hq % hk:
        _fail_value(f"query's heads ({hq}) must be a multiple of the cache's heads ({hk})")
    B = query.size(0)
    _index_tensor("cache_seqlens", cache_seqlens, f"({B},) (keys cached per sequence)", 1)
    same_device("cache_seqlens", cache_seqlens, "query", query)
    if cache_seqlens.size(0) != B:
        _fail_value(f"cache_seqlens must have shape ({B},) (query's batch), got {describe(cache_seqlens)}")
    if block_table is None:
        if k_cache.size(0) != B:
            _fail_value(f"a contiguous k_cache must have query's batch ({B}) first, got {describe(k_cache)}")
        capacity = k_cache.size(1)
    else:
        _index_tensor("block_table", block_table, f"({B}, max_pages)", 2)
        same_device("block_table", block_table, "query", query)
        if block_table.size(0) != B:
            _fail_value(f"block_table must have query's batch ({B}) rows, got {describe(block_table)}")
        capacity = block_table.size(1) * k_cache.size(1)
    lengths = cache_seqlens.tolist()
    if any(n < 0 or n > capacity for n in lengths):
        _fail_value(f"cache_seqlens must lie in [0, {capacity}] (the cache's capacity per sequence), got {lengths}")
    if block_table is not None and B:
        page = k_cache.size(1)
        used = torch.arange(block_table.size(1), device=block_table.device)[None, :] * page < cache_seqlens[:, None]
        pages = block_table[used]
        if pages.numel() and (int(pages.min()) < 0 or int(pages.max()) >= k_cache.size(0)):
            _fail_value(f"block_table's entries for cached keys must index k_cache's {k_cache.size(0)} pages, got "
                        f"entries from {int(pages.min())} to {int(pages.max())}")
    if not isinstance(num_splits, numbers.Integral) or isinstance(num_splits, bool) or num_splits < 0:
        _fail_value(f"num_splits must be an int >= 0 (0: chosen from the sizes), got {num_splits!r}")


def merge_attention(outs, lses) -> None:
    """Validate merge_attention's partial results: equal-shaped outputs (..., Lq, Dv) and
    log-sum-exps (..., Lq), one of each per part, on one device."""
    for name, parts in (("outs", outs), ("lses", lses)):
        if not isinstance(parts, (list, tuple)) or not parts:
            _fail_type(f"{name} must be a non-empty list of tensors, got {type(parts).__name__}"
                       + (" (empty)" if isinstance(parts, (list, tuple)) else ""))
        for i, t in enumerate(parts):
            if not isinstance(t, torch.Tensor):
                _fail_type(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
            floating(f"{name}[{i}]", t)
    if len(outs) != len(lses):
        _fail_value(f"outs and lses must have one entry per part, got {len(outs)} outs and {len(lses)} lses")
    first = outs[0]
    if first.dim() < 1:
        _fail_value(f"outs[0] must have at least 1 dimension (..., Lq, Dv), got {describe(first)}")
    for i, (o, lse) in enumerate(zip(outs, lses)):
        if o.shape != first.shape or o.dtype != first.dtype:
            _fail_value(f"outs[{i}] must match outs[0] ({describe(first)}), got {describe(o)}")
        if lse.shape != first.shape[:-1]:
            _fail_value(f"lses[{i}] must have shape {tuple(first.shape[:-1])} (outs' without the last dim), "
                        f"got {describe(lse)}")
        same_device(f"outs[{i}]", o, "outs[0]", first)
        same_device(f"lses[{i}]", lse, "outs[0]", first)


def _causal_variant(mask):
    from .reference import causal_variant

    return causal_variant(mask)


# --------------------------------------------------------------------------- feed-forward

ACTIVATIONS = codes.ACTIVATION_NAMES


def feed_forward(input, w1, b1, w2, b2, activation, dropout_p, residual) -> None:
    """Validate feed_forward's arguments: nn.Linear weight layout, (..., d_model) input."""
    tensor("input", input)
    floating("input", input)
    if input.dim() < 1:
        _fail_value(f"input must have a feature dimension (..., d_model), got {describe(input)}")
    d_model = input.shape[-1]
    for name, w in (("w1", w1), ("w2", w2)):
        tensor(name, w)
        same_device(name, w, "input", input)
        same_dtype(name, w, "input", input)
        if w.dim() != 2:
            _fail_value(f"{name} must be a 2-D (out_features, in_features) weight, got {describe(w)}")
    d_ff = w1.shape[0]
    if w1.shape[1] != d_model:
        _fail_value(f"w1 must have shape (d_ff, d_model) with d_model = input's last dim ({d_model}), "
                    f"got {describe(w1)}")
    if tuple(w2.shape) != (d_model, d_ff):
        _fail_value(f"w2 must have shape (d_model, d_ff) = ({d_model}, {d_ff}), got {describe(w2)}")
    for name, b, n in (("b1", b1, d_ff), ("b2", b2, d_model)):
        tensor(name, b, optional=True)
        if b is None:
            continue
        same_device(name, b, "input", input)
        same_dtype(name, b, "input", input)
        if tuple(b.shape) != (n,):
            _fail_value(f"{name} must have shape ({n},), got {describe(b)}")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        _fail_value(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    probability("dropout_p", dropout_p)
    tensor("residual", residual, optional=True)
    if residual is not None:
        same_device("residual", residual, "input", input)
        same_dtype("residual", residual, "input", input)
        if residual.shape != input.shape:
            _fail_value(f"residual must have the output's shape {tuple(input.shape)}, got {describe(residual)}")


def multihead_attention(query, key, value, key_padding_mask, attn_mask, *, embed_dim: int, kdim: int, vdim: int,
                        num_heads: int, batch_first: bool) -> None:
    """Validate MultiheadAttention.forward's inputs as torch does (rank, embedding sizes,
    batch and sequence agreement, mask shapes), naming the argument and its shape."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        tensor(name, t)
    if query.dim() not in (2, 3):
        _fail_value(f"query must be unbatched 2-D (L, E) or batched 3-D, got {describe(query)}")
    batched = query.dim() == 3
    for name, t in (("key", key), ("value", value)):
        if t.dim() != query.dim():
            _fail_value(f"{name} must be {query.dim()}-D like query ({'batched' if batched else 'unbatched'}), "
                        f"got {describe(t)}")
    for name, t, size in (("query", query, embed_dim), ("key", key, kdim), ("value", value, vdim)):
        if t.shape[-1] != size:
            _fail_value(f"{name} must have embedding size {size} in its last dim, got {describe(t)}")
    seq = 1 if (batched and batch_first) else 0
    if key.shape[seq] != value.shape[seq]:
        _fail_value(f"key and value must have the same sequence length, got key {describe(key)} and value "
                    f"{describe(value)}")
    B = query.shape[1 - seq] if batched else None
    if batched:
        for name, t in (("key", key), ("value", value)):
            if t.shape[1 - seq] != B:
                _fail_value(f"{name} must have query's batch size {B}, got {describe(t)}")
    L, S = query.shape[seq], key.shape[seq]
    if key_padding_mask is not None:
        tensor("key_padding_mask", key_padding_mask)
        expected = (B, S) if batched else (S,)
        if tuple(key_padding_mask.shape) != expected:
            _fail_value(f"key_padding_mask must have shape {expected} (batch, key length), got "
                        f"{describe(key_padding_mask)}")
    if attn_mask is not None:
        tensor("attn_mask", attn_mask)
        allowed = [(L, S), ((B * num_heads) if batched else num_heads, L, S)]
        if tuple(attn_mask.shape) not in allowed:
            _fail_value(f"attn_mask must have shape {allowed[0]} or {allowed[1]}, got {describe(attn_mask)}")
