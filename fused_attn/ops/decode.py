"""Decode attention: a few new queries per sequence against a KV cache, contiguous or in
pages; the dispatch entries of every backend.

Backends see the cache as pages: a contiguous cache (B, L, Hk, D) is B pages of L keys with
block table [[0], [1], ...] (a view, no copy). The kernel backends split each sequence's keys
when the batch alone leaves cores (CPU) or SMs (GPU) idle, and merge the splits by their
log-sum-exp (flash-decoding). No gradient: decoding is inference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _ext, codes, dispatch, reference
from .attention import kernel_slopes, merge_partials

# splits on the CPU: enough (sequence, split) tasks to balance any core count up to 64 (chosen
# from the problem's size only, so results never depend on the thread count), and no split
# under CPU_MIN_SPLIT_KEYS keys
CPU_TARGET_TASKS = 64
CPU_MIN_SPLIT_KEYS = 512


def _visible_keys(capacity: int, lq: int, window: tuple) -> int:
    """How many keys one sequence's rows may see at most."""
    left, right = window
    return capacity if left < 0 else min(capacity, left + lq + max(right, 0))


def _cpu_splits(query, k_cache, table, window, splits) -> int:
    if splits:
        return splits
    keys = _visible_keys(table.size(1) * k_cache.size(1), query.size(1), window)
    want = math.ceil(CPU_TARGET_TASKS / max(1, query.size(0)))
    return max(1, min(want, math.ceil(keys / CPU_MIN_SPLIT_KEYS)))


def _run_cpu(query, k_cache, v_cache, seqlens, table, scale, causal, window, softcap, alibi, splits):
    splits = _cpu_splits(query, k_cache, table, window, splits)
    return _ext.ops().attention_decode(query, k_cache, v_cache, seqlens, table, scale, causal, window[0], window[1],
                                       softcap, splits, alibi)


def _run_triton(query, k_cache, v_cache, seqlens, table, scale, causal, window, softcap, alibi, splits):
    from ..triton import decode as k
    from ..triton.attention import head_size

    if not splits:
        head = head_size(max(query.size(-1), v_cache.size(-1)))
        rows = (query.size(2) // k_cache.size(2)) * query.size(1)
        row_blocks = math.ceil(rows / k.config(head, query.dtype, rows)[0])
        keys = _visible_keys(table.size(1) * k_cache.size(1), query.size(1), window)
        splits = k.auto_splits(query.size(0) * k_cache.size(2), row_blocks, keys, head, query.dtype, query.device)
    # more splits than the combine kernel merges (k.MAX_SPLITS) would only change the rounding
    return k.attention_decode(query, k_cache, v_cache, seqlens, table, scale, causal, window[0], window[1],
                              min(splits, k.MAX_SPLITS), softcap, alibi)


def _run_torch(query, k_cache, v_cache, seqlens, table, scale, causal, window, softcap, alibi, splits):
    """torch ops on any device: every page of the table gathered, masked by length, causal and window."""
    B, Lq, Hq, _ = query.shape
    ct = codes.stats_dtype(query.dtype)
    idx = table.long().clamp(0, k_cache.size(0) - 1)  # entries past a sequence's pages may be anything
    k = k_cache[idx].flatten(1, 2).transpose(1, 2).to(ct)  # (B, Hk, pages * page, D)
    v = v_cache[idx].flatten(1, 2).transpose(1, 2).to(ct)
    if k.size(1) != Hq:
        k, v = k.repeat_interleave(Hq // k.size(1), 1), v.repeat_interleave(Hq // v.size(1), 1)
    s = (query.transpose(1, 2).to(ct) @ k.transpose(-2, -1)) * scale  # (B, Hq, Lq, Lk)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    n = seqlens.long()[:, None, None]
    pos = n - Lq + torch.arange(Lq, device=query.device)[None, :, None]
    j = torch.arange(k.size(2), device=query.device)[None, None, :]
    if alibi is not None:  # (B, Hq) slopes times (B, Lq, Lk) distances
        s = s - alibi.to(ct)[:, :, None, None] * (pos - j).abs()[:, None].to(ct)
    allowed = j < n
    if causal:
        allowed = allowed & (j <= pos)
    if window[0] >= 0:
        allowed = allowed & (j >= pos - window[0])
    if window[1] >= 0:
        allowed = allowed & (j <= pos + window[1])
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    return (p @ v).transpose(1, 2).to(query.dtype), lse


def _run_reference(query, k_cache, v_cache, seqlens, table, scale, causal, window, softcap, alibi, splits):
    return reference.decode_attention(query, k_cache, v_cache, seqlens, block_table=table, scale=scale,
                                      is_causal=causal, window_size=window, softcap=softcap, alibi_slopes=alibi,
                                      return_lse=True)


CAPABILITIES = {
    "cpu": dispatch.Capability(codes.KERNEL_DTYPES["cpu"], sliding_window=True, softcap=True, alibi=True),
    "triton": dispatch.Capability(codes.KERNEL_DTYPES["triton"], max_head_dim=256, sliding_window=True,
                                  softcap=True, alibi=True),
}


def _supports_kernels(backend: str):
    def supports(query, v_cache, softcap=0.0, **_):
        out = CAPABILITIES[backend].problems(query.dtype, head_dims=(query.size(-1), v_cache.size(-1)))
        return out + dispatch.softcap_problems(CAPABILITIES, backend, softcap)

    return supports


def _supports_anything(**_inputs):
    return []


OP = dispatch.Op("decode_attention", auto_order={"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")})
OP.register("cpu", _supports_kernels("cpu"), _run_cpu)
OP.register("triton", _supports_kernels("triton"), _run_triton)
OP.register("torch", _supports_anything, _run_torch)
OP.register("reference", _supports_anything, _run_reference)


def as_pages(k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, block_table):
    """A contiguous cache (B, L, Hk, D) as B pages of L keys (a view) with table [[0], [1], ...];
    paged caches pass through. -> (k_pages, v_pages, seqlens int32, block_table int32)."""
    if block_table is None:
        block_table = torch.arange(k_cache.size(0), device=k_cache.device, dtype=torch.int32)[:, None]
    return k_cache, v_cache, cache_seqlens.to(torch.int32), block_table.to(torch.int32)


def decode_attention(query, k_cache, v_cache, cache_seqlens, *, block_table, scale, is_causal, window_size, softcap,
                     alibi_slopes, sinks, num_splits, return_lse, backend):
    """Validated arguments -> out (B, Lq, Hq, Dv) and, with return_lse, lse (B, Hq, Lq) float32."""
    k_pages, v_pages, seqlens, table = as_pages(k_cache, v_cache, cache_seqlens, block_table)
    scale = reference.default_scale(query.size(-1)) if scale is None else float(scale)
    _, impl = OP.select(backend, query.device, query=query, v_cache=v_cache, softcap=softcap)
    if query.numel() == 0 or v_cache.size(-1) == 0:  # no rows, or nothing to average: no kernel to launch
        impl = _run_torch
    alibi = None if alibi_slopes is None else kernel_slopes(alibi_slopes, query.size(0), query.size(2))
    out, lse = impl(query, k_pages, v_pages, seqlens, table, scale, bool(is_causal), tuple(window_size), softcap,
                    alibi, num_splits)
    if sinks is not None:  # a part with output 0 and log-sum-exp sink[h] in every row's softmax
        merged, lse = merge_partials([out.transpose(1, 2), torch.zeros_like(out).transpose(1, 2)],
                                     [lse, sinks.to(lse.dtype)[:, None].expand(lse.shape)])
        out = merged.transpose(1, 2).contiguous()
    return (out, lse) if return_lse else out
