"""Decode attention in Triton (flash-decoding): a few queries per sequence against a KV
cache in pages, split over the keys when the batch alone cannot fill the GPU.

Split kernel: one program per (sequence * kv head, split, block of rows). Its rows are the
queries of every query head of the GQA group (row r: head hk * G + r // Lq, query r % Lq),
so each cached key and value is loaded once for the whole group. The keys any row may see
(causal and the window, bottom-right aligned at the sequence's own length, as ALiBi's distances
are) are divided evenly among the splits; a program gathers its keys through the block table (page of key j:
block_table[b, j // page]) BLOCK_N at a time and keeps FlashAttention's online softmax
(log2 units, the accumulator kept at the output's scale by powers of two, as the forward
kernel does). It writes its rows' normalised partial output and log-sum-exp.

Combine kernel: one program per output row merges the splits exactly by their
log-sum-exp (empty splits have -inf and weigh nothing; a row with no key gives 0, -inf).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import _alloc
from ..dispatch import triton_interpreting
from ._common import dot as _dot
from .attention import LOG2E, _alibi_stride, _cap_args, _pow2_below_inverse, _pow2_ratio, _score, head_size


@triton.jit
def _row_ranges(n, rows, Lq, CAUSAL: tl.constexpr, window_left, window_right):
    """Keys [lo, hi) each row may see: query rows % Lq sits at position n - Lq + rows % Lq."""
    pos = n - Lq + rows % Lq
    hi = tl.zeros_like(rows) + n
    if CAUSAL:
        hi = tl.minimum(hi, pos + 1)
    hi = tl.where(window_right >= 0, tl.minimum(hi, pos + window_right + 1), hi)
    lo = tl.where(window_left >= 0, tl.maximum(pos - window_left, 0), 0)
    return tl.minimum(lo, n), tl.maximum(hi, 0)


@triton.jit
def _decode_split_kernel(
        Q, K, V, Seqlens, Table, Alibi, PartOut, PartLse,
        stride_qb, stride_qi, stride_qh, stride_qd,
        stride_kp, stride_ks, stride_kh, stride_kd,
        stride_vp, stride_vs, stride_vh, stride_vd,
        stride_tb, stride_ab,
        Hk, GROUP, Lq, D, DV, page_size, splits, qk_scale, cap_in, cap_out, window_left, window_right,
        CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, IEEE: tl.constexpr, HEAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bhk = tl.program_id(0)
    split = tl.program_id(1)
    row_block = tl.program_id(2)
    b = (bhk // Hk).to(tl.int64)
    hk = (bhk % Hk).to(tl.int64)
    n_rows = GROUP * Lq
    n = tl.load(Seqlens + b)
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    lo_r, hi_r = _row_ranges(n, rows, Lq, CAUSAL, window_left, window_right)
    seen = row_ok & (lo_r < hi_r)
    lo = tl.min(tl.where(seen, lo_r, n), 0)
    hi = tl.max(tl.where(seen, hi_r, 0), 0)
    chunk = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), splits), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    stop = tl.minimum(hi, start + chunk)

    offs_d = tl.arange(0, HEAD)
    heads = hk * GROUP + rows // Lq
    q = tl.load(Q + b * stride_qb + (rows % Lq)[:, None] * stride_qi + heads[:, None] * stride_qh
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    if ALIBI:  # each row's slope (log2 units) and position, where its distances are measured from
        slope = tl.load(Alibi + b * stride_ab + heads, mask=row_ok, other=0.0) * 1.4426950408889634
        pos = n - Lq + rows % Lq
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    c_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for j0 in range(start, stop, BLOCK_N):
        cols = j0 + offs_n
        key_ok = cols < stop
        page = tl.load(Table + b * stride_tb + cols // page_size, mask=key_ok, other=0).to(tl.int64)
        slot = (cols % page_size).to(tl.int64)
        kT = tl.load(K + page[None, :] * stride_kp + slot[None, :] * stride_ks + hk * stride_kh
                     + offs_d[:, None] * stride_kd, mask=key_ok[None, :] & (offs_d < D)[:, None], other=0.0)
        qk = _score(_dot(q, kT, IEEE), qk_scale, cap_in, cap_out, SOFTCAP)
        if ALIBI:
            qk = qk - slope[:, None] * tl.abs((pos[:, None] - cols[None, :]).to(tl.float32))
        allowed = key_ok[None, :] & (cols[None, :] >= lo_r[:, None]) & (cols[None, :] < hi_r[:, None])
        qk = tl.where(allowed, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        c_new = _pow2_below_inverse(l_i)
        v = tl.load(V + page[:, None] * stride_vp + slot[:, None] * stride_vs + hk * stride_vh
                    + offs_d[None, :] * stride_vd, mask=key_ok[:, None] & (offs_d < DV)[None, :], other=0.0)
        acc = acc * (alpha * _pow2_ratio(c_new, c_i))[:, None] + _dot((p * c_new[:, None]).to(v.dtype), v, IEEE)
        c_i = c_new
        m_i = m_new
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(empty[:, None], 0.0, acc / (l_safe * c_i)[:, None])
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    part = (bhk.to(tl.int64) * splits + split) * n_rows + rows
    tl.store(PartOut + part[:, None] * DV + offs_d[None, :], out, mask=row_ok[:, None] & (offs_d < DV)[None, :])
    tl.store(PartLse + part, lse, mask=row_ok)


@triton.jit
def _decode_combine_kernel(PartOut, PartLse, Out, Lse, Hq, Hk, GROUP, Lq, DV, splits,
                           HEAD: tl.constexpr, BLOCK_S: tl.constexpr):
    """Output row (b, query i, head h) from its splits; Out (B, Lq, Hq, DV), Lse (B, Hq, Lq)."""
    pid = tl.program_id(0).to(tl.int64)  # (b * Lq + i) * Hq + h
    h = pid % Hq
    i = (pid // Hq) % Lq
    b = pid // (Hq * Lq)
    n_rows = GROUP * Lq
    row = (h % GROUP) * Lq + i
    first = (b * Hk + h // GROUP) * splits
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD)
    lse_s = tl.load(PartLse + (first + offs_s) * n_rows + row, mask=offs_s < splits, other=float("-inf"))
    top = tl.max(lse_s, 0)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(tl.math.exp2((lse_s - top_safe) * 1.4426950408889634), 0)
    inv_total = 1.0 / tl.where(total == 0.0, 1.0, total)
    out = tl.zeros([HEAD], dtype=tl.float32)
    for s in range(0, splits):  # in split order; empty splits (lse -inf) weigh 0 and hold 0
        w = tl.math.exp2((tl.load(PartLse + (first + s) * n_rows + row) - top_safe) * 1.4426950408889634)
        part = tl.load(PartOut + ((first + s) * n_rows + row) * DV + offs_d, mask=offs_d < DV, other=0.0)
        out += part * (w * inv_total)
    tl.store(Out + pid * DV + offs_d, out.to(Out.dtype.element_ty), mask=offs_d < DV)
    lse = tl.where(total == 0.0, float("-inf"), top_safe + tl.math.log2(tl.where(total == 0.0, 1.0, total))
                   * 0.6931471805599453)
    tl.store(Lse + (b * Hq + h) * Lq + i, lse)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per dtype class and head size for the split
# kernel: found by compiling candidates from large to small tiles and keeping the first whose
# every row block from 16 up to BLOCK_M compiles without a spill for sm_80 and sm_90 (the
# compile gate checks each of them, with triton 3.8 and 3.6).
_CONFIGS = {
    "16bit": {16: (64, 32, 8, 2), 32: (64, 64, 4, 2), 64: (64, 64, 8, 2), 128: (64, 16, 8, 2), 256: (32, 16, 4, 2)},
    "fp32": {16: (64, 32, 8, 2), 32: (64, 32, 8, 2), 64: (64, 32, 8, 2), 128: (16, 32, 8, 2), 256: (16, 16, 4, 1)},
}
_INTERPRETER_CONFIG = (16, 16, 4, 1)
MAX_SPLITS = 128


def config(head: int, dtype: torch.dtype, rows: int) -> tuple[int, int, int, int]:
    """The split kernel's (BLOCK_M, BLOCK_N, warps, stages): rows of a group never padded far past 16."""
    if triton_interpreting():
        bm, bn, warps, stages = _INTERPRETER_CONFIG
    else:
        bm, bn, warps, stages = _CONFIGS["fp32" if dtype == torch.float32 else "16bit"][head]
    return min(bm, max(16, triton.next_power_of_2(rows))), bn, warps, stages


def attention_decode(q, k_cache, v_cache, seqlens, block_table, scale: float, causal: bool, window_left: int,
                     window_right: int, splits: int, softcap: float = 0.0, alibi=None):
    """q (B, Lq, Hq, D); k_cache (P, page, Hk, D), v_cache (P, page, Hk, Dv); seqlens (B,) int32;
    block_table (B, max_pages) int32 -> out (B, Lq, Hq, Dv) in q's dtype, lse (B, Hq, Lq) float32.
    softcap > 0: scores become softcap * tanh(score / softcap); alibi: None or (B, Hq) float32
    slopes with a unit head stride (-slope * |position - j| added after the softcap)."""
    B, Lq, Hq, D = q.shape
    Hk, DV = k_cache.shape[2], v_cache.shape[3]
    group = Hq // Hk
    head = head_size(max(D, DV))
    bm, bn, warps, stages = config(head, q.dtype, group * Lq)
    dev = q.device
    part_out = torch.empty((B * Hk, splits, group * Lq, DV), dtype=torch.float32, device=dev)
    part_lse = torch.empty((B * Hk, splits, group * Lq), dtype=torch.float32, device=dev)
    _decode_split_kernel[(B * Hk, splits, triton.cdiv(group * Lq, bm))](
        q, k_cache, v_cache, seqlens, block_table, alibi if alibi is not None else part_lse, part_out, part_lse,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), block_table.stride(0), _alibi_stride(alibi),
        Hk, group, Lq, D, DV, k_cache.size(1), splits, scale * LOG2E, *_cap_args(scale, softcap), window_left,
        window_right, CAUSAL=causal, SOFTCAP=softcap > 0, ALIBI=alibi is not None, IEEE=q.dtype == torch.float32,
        HEAD=head, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    out = _alloc.empty((B, Lq, Hq, DV), q.dtype, dev)
    lse = _alloc.empty((B, Hq, Lq), torch.float32, dev)
    _decode_combine_kernel[(B * Lq * Hq,)](part_out, part_lse, out, lse, Hq, Hk, group, Lq, DV, splits,
                                           HEAD=triton.next_power_of_2(max(DV, 16)),
                                           BLOCK_S=triton.next_power_of_2(splits), num_warps=4)
    return out, lse


def block_keys(head: int, dtype: torch.dtype) -> int:
    """Keys per step of the split kernel (a split's length is a multiple of it)."""
    return config(head, dtype, 16)[1]


# ----------------------------------------------------------------------------- GPU compile gate

UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd")


def gate_configs():
    """The split kernel at every head size, dtype and row block the launcher may choose (causal,
    softcap and ALiBi, its heaviest form), and the combine kernel, for the compile gate."""
    from ..tools.gate import TritonConfig

    out = []
    ints = ("Hk", "GROUP", "Lq", "D", "DV", "page_size", "splits", "window_left", "window_right", "stride_tb")
    for dtype_name in ("fp16", "bf16", "fp32"):
        for head, (bm, bn, warps, stages) in _CONFIGS["fp32" if dtype_name == "fp32" else "16bit"].items():
            sig = {a: f"*{dtype_name}" for a in ("Q", "K", "V")}
            sig.update({"Seqlens": "*i32", "Table": "*i32", "Alibi": "*fp32", "PartOut": "*fp32", "PartLse": "*fp32",
                        "qk_scale": "fp32", "cap_in": "fp32", "cap_out": "fp32"})
            sig.update({a: "i32" for a in _decode_split_kernel.arg_names
                        if (a.startswith("stride") and a not in UNIT_STRIDES) or a in ints})
            for rows in (16, 32, 64):
                if rows > bm:
                    break
                const = dict(CAUSAL=True, SOFTCAP=True, ALIBI=True, IEEE=dtype_name == "fp32", HEAD=head,
                             BLOCK_M=rows, BLOCK_N=bn)
                const.update({a: 1 for a in UNIT_STRIDES})
                out.append(TritonConfig(f"decode split {dtype_name} head={head} BLOCK_M={rows} BLOCK_N={bn} "
                                        f"warps={warps} stages={stages}", _decode_split_kernel, sig, const, warps,
                                        stages))
        for head in (16, 32, 64, 128, 256):
            sig = {"PartOut": "*fp32", "PartLse": "*fp32", "Out": f"*{dtype_name}", "Lse": "*fp32"}
            sig.update({a: "i32" for a in ("Hq", "Hk", "GROUP", "Lq", "DV", "splits")})
            out.append(TritonConfig(f"decode combine {dtype_name} head={head}", _decode_combine_kernel, sig,
                                    {"HEAD": head, "BLOCK_S": MAX_SPLITS}, 4, 1))
    return out


def auto_splits(batch_kv_heads: int, row_blocks: int, keys: int, head: int, dtype: torch.dtype, device) -> int:
    """Splits per (sequence, kv head): enough programs for two waves over the GPU's SMs,
    no split shorter than four key steps, at most MAX_SPLITS."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = math.ceil(2 * sms / max(1, batch_kv_heads * row_blocks))
    return max(1, min(want, math.ceil(keys / (4 * block_keys(head, dtype))), MAX_SPLITS))
