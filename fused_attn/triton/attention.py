"""Masked scaled-dot-product attention in Triton (FlashAttention-2 style), forward and
backward, and their launchers.

Forward: one program per (Q tile, batch*head). The Q tile stays in registers while K/V
tiles stream past; the softmax is computed online in float32, in the log2 domain (the
scale is folded into one multiply by scale*log2(e), exp2 everywhere), and the
row statistics (the max score m and 1/l, l the softmax denominator) are kept for
backward, which recomputes P = exp2(qk - m) / l: as accurate as a plain softmax (a
single log-sum-exp in float32 would cost P a few ulps, ~|lse| * eps). No (Lq, Lk) matrix is ever written.

Masking, all applied to the scores of one tile:
- bounds (keys past Lk), a band of allowed key - query offsets j - i in [diag_lo, diag_hi]
  (upper-left causal: diag_hi = 0; lower-right: Lk - Lq; a sliding window (left, right):
  Lk - Lq - left .. Lk - Lq + right; key tiles outside the band are never loaded), ALiBi
  (ALIBI: -slope * |i + Lk - Lq - j| added, the head's slope from (B, Hq) slopes), a bool
  mask (MASK_KIND=1, False masks out) or a float mask (MASK_KIND=2, added to the scores),
  read through the mask's strides (0 on broadcast dimensions) so a (B,1,1,Lk) key-padding
  mask costs one vector per batch;
- a row whose every score is masked ends with l = 0: its output is 0 and it stores
  1/l = 0, so backward recomputes P = 0 there and its dQ is exactly 0.

Dropout keeps an element when the first 32-bit Philox-4x32-10 output for key
(seed + batch*head) and counter (query*Lk + key) is >= p * 2^32: an integer rule any
backend can reproduce bit for bit (the CPU kernels do).

Backward: a preprocess pass computes delta = rowsum(dO * O); one kernel accumulates dK
and dV per K/V tile over the query tiles (and, for GQA, over the query heads sharing the
K/V head: no atomics, deterministic); another computes dQ per Q tile, and writes dS
into the float mask's gradient when that is wanted.

The launchers take (B, H, L, D) tensors of any strides.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .. import _alloc, codes
from ..dispatch import triton_interpreting
from ._common import dot as _dot
from ._common import dropout_args as _dropout_args
from ._common import dropout_keep as _dropout_keep
from ._common import tanh as _tanh
from ._common import tuning_candidates

LOG2E = 1.4426950408889634

MASK_NONE, MASK_BOOL, MASK_FLOAT = (int(c) for c in codes.MaskKind)  # the MASK_KIND codes


# ----------------------------------------------------------------------------- shared pieces


@triton.jit
def _mask_scores(qk, om, on, Mask_bh, stride_mm, stride_mn, Lq, Lk, diag_lo, diag_hi, alibi,
                 MASK_KIND: tl.constexpr, BAND_LO: tl.constexpr, BAND_HI: tl.constexpr, ALIBI: tl.constexpr):
    """Apply bounds, the band of allowed key - query offsets, ALiBi (alibi: the head's slope in
    log2 units, -slope * |i + Lk - Lq - j| added) and the attention mask to a tile of scores
    (log2 units).

    om / on: query / key indices of the tile, broadcastable against it ([M,1] and [1,N],
    or [1,M] and [N,1] for a transposed tile). Key j is allowed for query i when
    diag_lo <= j - i (BAND_LO) and j - i <= diag_hi (BAND_HI). Returns (scores with -inf
    where masked, allowed). Rows past Lq are left unmasked: they are computed but never stored."""
    allowed = on < Lk  # rows past Lq are computed but never stored
    # compared as key index against a per-query bound (a vector), never as a 2D difference
    if BAND_LO:
        allowed = allowed & (on >= om + diag_lo)
    if BAND_HI:
        allowed = allowed & (on <= om + diag_hi)
    if ALIBI:
        qk = qk - alibi * tl.abs((om + (Lk - Lq) - on).to(tl.float32))
    if MASK_KIND != 0:
        mptrs = Mask_bh + om * stride_mm + on * stride_mn
        in_bounds = (om < Lq) & (on < Lk)
        if MASK_KIND == 1:
            allowed = allowed & (tl.load(mptrs, mask=in_bounds, other=0) != 0)
        else:
            bias = tl.load(mptrs, mask=in_bounds, other=0.0).to(tl.float32)
            # finite values below -FLT_MAX / log2(e) (torch.finfo(float32).min, Hugging Face's
            # padding value) would overflow to -inf in log2 units: clamp them, keep -inf as is
            bias = tl.where(bias == float("-inf"), bias, tl.maximum(bias, -2.3e38))
            qk = qk + bias * 1.4426950408889634
    return tl.where(allowed, qk, float("-inf")), allowed


@triton.jit
def _alibi_slope(Alibi, b, h, stride_ab, ALIBI: tl.constexpr):
    """The ALiBi slope of (b, h) in log2 units (0 without ALiBi)."""
    if ALIBI:
        return tl.load(Alibi + b * stride_ab + h) * 1.4426950408889634
    return 0.0


@triton.jit
def _score(dot, qk_scale, cap_in, cap_out, SOFTCAP: tl.constexpr):
    """Dot products as scores in log2 units, before masking: scale * dot, or with a softcap c
    c * tanh(scale * dot / c) (cap_in = scale / c, cap_out = c * log2(e))."""
    if SOFTCAP:
        return _tanh(dot * cap_in) * cap_out
    return dot * qk_scale


@triton.jit
def _key_range(start_m, Lk, diag_lo, diag_hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BAND_LO: tl.constexpr, BAND_HI: tl.constexpr):
    """[lo, hi): the keys any query of this Q tile may see, lo a multiple of BLOCK_N (the key
    tiles entirely outside the band are never loaded)."""
    lo = 0
    hi = Lk
    if BAND_LO:
        lo = tl.maximum(start_m * BLOCK_M + diag_lo, 0) // BLOCK_N * BLOCK_N
    if BAND_HI:
        hi = tl.minimum(Lk, (start_m + 1) * BLOCK_M + diag_hi)
    return lo, hi


@triton.jit
def _query_range(start_n, Lq, diag_lo, diag_hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BAND_LO: tl.constexpr, BAND_HI: tl.constexpr):
    """[lo, hi): the queries that may see some key of this K/V tile, lo a multiple of BLOCK_M."""
    lo = 0
    hi = Lq
    if BAND_HI:
        lo = tl.maximum(start_n * BLOCK_N - diag_hi, 0) // BLOCK_M * BLOCK_M
    if BAND_LO:
        hi = tl.minimum(Lq, (start_n + 1) * BLOCK_N - diag_lo)
    return lo, hi


@triton.jit
def _sequence(SeqQ, SeqK, b, Lq, Lk, diag_lo, diag_hi, VARLEN: tl.constexpr):
    """Batch entry b's rows -> (q_off, k_off, Lq, Lk, diag_lo, diag_hi).

    Padded batches: b is a batch row (offsets 0, the lengths and band as given). VARLEN: b is a
    packed sequence, queries SeqQ[b]..SeqQ[b + 1] and keys SeqK[2b] .. + SeqK[2b + 1] of the
    packed tensors (the kernels move their pointers there); diag_lo / diag_hi come relative to
    the sequence's Lk - Lq and are clamped here; its statistics (2, H, T) rows h * T + q_off."""
    q_off = 0
    k_off = 0
    if VARLEN:  # one return for both forms (Triton unifies the types of a function's returns)
        q_off = tl.load(SeqQ + b).to(tl.int64)
        Lq = tl.load(SeqQ + b + 1) - q_off.to(tl.int32)
        k_off = tl.load(SeqK + 2 * b).to(tl.int64)
        Lk = tl.load(SeqK + 2 * b + 1)
        diag_lo = tl.minimum(tl.maximum(Lk - Lq + diag_lo, -Lq), Lk)
        diag_hi = tl.minimum(tl.maximum(Lk - Lq + diag_hi, -Lq), Lk)
    return q_off, k_off, Lq, Lk, diag_lo, diag_hi


@triton.jit
def _load_tile(base, rows, cols, stride_r, stride_c, n_rows, n_cols):
    return tl.load(base + rows[:, None] * stride_r + cols[None, :] * stride_c,
                   mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :], other=0.0)


# ----------------------------------------------------------------------------- forward


@triton.jit
def _pow2_below_inverse(x):
    """2^-(e + 1) for x in [2^e, 2^(e + 1)) (so x * c is in [0.5, 1)), exactly, from the
    exponent bits; 1 where x is 0."""
    biased = (x.to(tl.int32, bitcast=True) >> 23) & 0xFF
    c = ((253 - biased) << 23).to(tl.float32, bitcast=True)
    return tl.where(x == 0.0, 1.0, c)


@triton.jit
def _pow2_ratio(a, b):
    """a / b for powers of two a and b, exactly, from the exponent bits (no division)."""
    ea = (a.to(tl.int32, bitcast=True) >> 23) & 0xFF
    eb = (b.to(tl.int32, bitcast=True) >> 23) & 0xFF
    return ((ea - eb + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _attn_fwd_kernel(
        Q, K, V, Mask, Alibi, SeqQ, SeqK, Out, Stats,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_mb, stride_mh, stride_mm, stride_mn,
        stride_ob, stride_oh, stride_om, stride_od,
        H, GROUP, Lq, Lk, D, DV, qk_scale, dropout_scale, seed, threshold, stats_stride,
        diag_lo, diag_hi, cap_in, cap_out, stride_ab, LQ_BUCKET, LK_BUCKET,
        MASK_KIND: tl.constexpr, BAND_LO: tl.constexpr, BAND_HI: tl.constexpr, SOFTCAP: tl.constexpr,
        ALIBI: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr, VARLEN: tl.constexpr,
        HEAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(Lq, BLOCK_M)
    bh = pid // num_m_blocks
    start_m = num_m_blocks - 1 - pid % num_m_blocks  # the longest causal tiles start first
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    q_off, k_off, Lq, Lk, diag_lo, diag_hi = _sequence(SeqQ, SeqK, b, Lq, Lk, diag_lo, diag_hi, VARLEN)
    if VARLEN:
        if start_m * BLOCK_M >= Lq:  # a query tile past this sequence's end
            return
        Q += q_off * stride_qm
        Out += q_off * stride_om
        K += k_off * stride_kn
        V += k_off * stride_vn
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD)
    q = _load_tile(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qm, stride_qd, Lq, D)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m_base = Mask + b * stride_mb + h * stride_mh
    alibi = _alibi_slope(Alibi, b, h, stride_ab, ALIBI)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD], dtype=tl.float32)
    c_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    lo, hi = _key_range(start_m, Lk, diag_lo, diag_hi, BLOCK_M, BLOCK_N, BAND_LO, BAND_HI)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kT = _load_tile(k_base, offs_d, cols, stride_kd, stride_kn, D, Lk)  # (HEAD, N)
        qk, _ = _mask_scores(_score(_dot(q, kT, IEEE), qk_scale, cap_in, cap_out, SOFTCAP), offs_m[:, None],
                             cols[None, :], m_base, stride_mm, stride_mn, Lq, Lk, diag_lo, diag_hi, alibi, MASK_KIND,
                             BAND_LO, BAND_HI, ALIBI)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # rows with nothing allowed yet keep m = -inf; exponentiate against 0 instead
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        # acc holds sum(P V) * c with c a power of two and l * c in [0.5, 1): P * c <= 1, so acc
        # never exceeds max |v| (an unnormalised sum overflows float32 long before the result
        # does: 64 keys with |v| = 1e37), and scaling by powers of two rounds nothing
        c_new = _pow2_below_inverse(l_i)
        p = p * c_new[:, None]
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, bh, offs_m[:, None], cols[None, :], Lk, threshold), p, 0.0)
        v = _load_tile(v_base, cols, offs_d, stride_vn, stride_vd, Lk, DV)
        acc = acc * (alpha * _pow2_ratio(c_new, c_i))[:, None] + _dot(p.to(v.dtype), v, IEEE)
        c_i = c_new
        m_i = m_new
    fully_masked = l_i == 0.0
    l_safe = tl.where(fully_masked, 1.0, l_i)
    inv_l = tl.where(fully_masked, 0.0, 1.0 / l_safe)
    out = tl.where(fully_masked[:, None], 0.0, acc / (l_safe * c_i)[:, None])
    if DROPOUT:
        out = out * dropout_scale
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m < Lq)[:, None] & (offs_d < DV)[None, :])
    # row statistics for backward: P = exp2(qk - m) * (1/l); a fully masked row stores m = 0, 1/l = 0
    s_row0 = bh.to(tl.int64) * Lq  # this row's statistics (computed here: nothing extra live in the loop)
    if VARLEN:
        s_row0 = h * (stats_stride // H) + q_off
    tl.store(Stats + s_row0 + offs_m, tl.where(fully_masked, 0.0, m_i), mask=offs_m < Lq)
    tl.store(Stats + stats_stride + s_row0 + offs_m, inv_l, mask=offs_m < Lq)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _attn_bwd_preprocess_kernel(Out, DO, Delta,
                                stride_ob, stride_oh, stride_om, stride_od,
                                stride_db, stride_dh, stride_dm, stride_dd,
                                H, Lq, DV, HEAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) in float32."""
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(Lq, BLOCK_M)
    bh = pid // num_m_blocks
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = (pid % num_m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD)
    o = _load_tile(Out + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_om, stride_od, Lq, DV)
    do = _load_tile(DO + b * stride_db + h * stride_dh, offs_m, offs_d, stride_dm, stride_dd, Lq, DV)
    tl.store(Delta + bh.to(tl.int64) * Lq + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1),
             mask=offs_m < Lq)


@triton.jit
def _attn_bwd_dkdv_kernel(
        Q, K, V, Mask, Alibi, SeqQ, SeqK, DO, Stats, Delta, DK, DV_,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_mb, stride_mh, stride_mm, stride_mn,
        stride_db, stride_dh, stride_dm, stride_dd,
        stride_dkb, stride_dkh, stride_dkn, stride_dkd,
        stride_dvb, stride_dvh, stride_dvn, stride_dvd,
        H, HK, GROUP, Lq, Lk, D, DV, qk_scale, sm_scale, dropout_scale, seed, threshold, stats_stride,
        diag_lo, diag_hi, cap_in, cap_out, stride_ab, LQ_BUCKET, LK_BUCKET,
        MASK_KIND: tl.constexpr, BAND_LO: tl.constexpr, BAND_HI: tl.constexpr, SOFTCAP: tl.constexpr,
        ALIBI: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr, VARLEN: tl.constexpr,
        HEAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of one K/V tile, over every query tile (and every query head of a GQA group).
    Works on transposed (key x query) score tiles so no tile needs transposing."""
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(Lk, BLOCK_N)
    bhk = pid // num_n_blocks
    start_n = pid % num_n_blocks
    b = (bhk // HK).to(tl.int64)
    hk = (bhk % HK).to(tl.int64)
    q_off, k_off, Lq, Lk, diag_lo, diag_hi = _sequence(SeqQ, SeqK, b, Lq, Lk, diag_lo, diag_hi, VARLEN)
    if VARLEN:
        if start_n * BLOCK_N >= Lk:  # a key tile past this sequence's end
            return
        Q += q_off * stride_qm
        DO += q_off * stride_dm
        K += k_off * stride_kn
        V += k_off * stride_vn
        DK += k_off * stride_dkn
        DV_ += k_off * stride_dvn
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD)
    k = _load_tile(K + b * stride_kb + hk * stride_kh, offs_n, offs_d, stride_kn, stride_kd, Lk, D)
    v = _load_tile(V + b * stride_vb + hk * stride_vh, offs_n, offs_d, stride_vn, stride_vd, Lk, DV)
    dk = tl.zeros([BLOCK_N, HEAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD], dtype=tl.float32)
    lo, hi = _query_range(start_n, Lq, diag_lo, diag_hi, BLOCK_M, BLOCK_N, BAND_LO, BAND_HI)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_db + h * stride_dh
        s_row0 = bh * Lq  # this head's statistics
        if VARLEN:
            s_row0 = h * (stats_stride // H) + q_off
        m_base = Mask + b * stride_mb + h * stride_mh
        alibi = _alibi_slope(Alibi, b, h, stride_ab, ALIBI)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            qT = _load_tile(q_base, offs_d, offs_m, stride_qd, stride_qm, D, Lq)  # (HEAD, M)
            do = _load_tile(do_base, offs_m, offs_d, stride_dm, stride_dd, Lq, DV)  # (M, HEAD)
            m_row = tl.load(Stats + s_row0 + offs_m, mask=offs_m < Lq, other=0.0)
            inv_l = tl.load(Stats + stats_stride + s_row0 + offs_m, mask=offs_m < Lq, other=0.0)
            delta = tl.load(Delta + s_row0 + offs_m, mask=offs_m < Lq, other=0.0)
            dotT = _dot(k, qT, IEEE)
            qkT, _ = _mask_scores(_score(dotT, qk_scale, cap_in, cap_out, SOFTCAP), offs_m[None, :], offs_n[:, None],
                                  m_base, stride_mm, stride_mn, Lq, Lk, diag_lo, diag_hi, alibi, MASK_KIND, BAND_LO,
                                  BAND_HI, ALIBI)
            # masked scores are -inf, so P (and dS below) are exactly 0 there
            pT = tl.math.exp2(qkT - m_row[None, :]) * inv_l[None, :]
            dpT = _dot(v, tl.trans(do), IEEE)
            if DROPOUT:
                keep = _dropout_keep(seed, bh, offs_m[None, :], offs_n[:, None], Lk, threshold)
                pT_drop = tl.where(keep, pT * dropout_scale, 0.0)
                dpT = tl.where(keep, dpT * dropout_scale, 0.0)
            else:
                pT_drop = pT
            dsT = pT * (dpT - delta[None, :])
            if SOFTCAP:  # d(c tanh(x / c)) / dx = 1 - tanh^2
                capT = _tanh(dotT * cap_in)
                dsT = dsT * (1.0 - capT * capT)
            dv += _dot(pT_drop.to(do.dtype), do, IEEE)
            dk += _dot(dsT.to(qT.dtype), tl.trans(qT), IEEE)
    dk = dk * sm_scale
    dk_ptrs = DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=(offs_n < Lk)[:, None] & (offs_d < D)[None, :])
    dv_ptrs = DV_ + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd
    tl.store(dv_ptrs, dv.to(DV_.dtype.element_ty), mask=(offs_n < Lk)[:, None] & (offs_d < DV)[None, :])


@triton.jit
def _attn_bwd_dq_kernel(
        Q, K, V, Mask, Alibi, SeqQ, SeqK, DO, Stats, Delta, DQ, DMask,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_mb, stride_mh, stride_mm, stride_mn,
        stride_db, stride_dh, stride_dm, stride_dd,
        stride_dqb, stride_dqh, stride_dqm, stride_dqd,
        stride_gb, stride_gh, stride_gm, stride_gn,
        H, GROUP, Lq, Lk, D, DV, qk_scale, sm_scale, dropout_scale, seed, threshold, stats_stride,
        diag_lo, diag_hi, cap_in, cap_out, stride_ab, LQ_BUCKET, LK_BUCKET,
        MASK_KIND: tl.constexpr, BAND_LO: tl.constexpr, BAND_HI: tl.constexpr, SOFTCAP: tl.constexpr,
        ALIBI: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr, VARLEN: tl.constexpr,
        MASK_GRAD: tl.constexpr, HEAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of one Q tile over the key tiles; with MASK_GRAD also writes dS, the float mask's gradient."""
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(Lq, BLOCK_M)
    bh = pid // num_m_blocks
    start_m = num_m_blocks - 1 - pid % num_m_blocks
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    q_off, k_off, Lq, Lk, diag_lo, diag_hi = _sequence(SeqQ, SeqK, b, Lq, Lk, diag_lo, diag_hi, VARLEN)
    s_row0 = bh.to(tl.int64) * Lq  # this row's statistics
    if VARLEN:
        if start_m * BLOCK_M >= Lq:  # a query tile past this sequence's end
            return
        Q += q_off * stride_qm
        DO += q_off * stride_dm
        DQ += q_off * stride_dqm
        K += k_off * stride_kn
        V += k_off * stride_vn
        s_row0 = h * (stats_stride // H) + q_off
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD)
    row_ok = offs_m < Lq
    q = _load_tile(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qm, stride_qd, Lq, D)
    do = _load_tile(DO + b * stride_db + h * stride_dh, offs_m, offs_d, stride_dm, stride_dd, Lq, DV)
    m_row = tl.load(Stats + s_row0 + offs_m, mask=row_ok, other=0.0)
    inv_l = tl.load(Stats + stats_stride + s_row0 + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(Delta + s_row0 + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m_base = Mask + b * stride_mb + h * stride_mh
    g_base = DMask + b * stride_gb + h * stride_gh
    alibi = _alibi_slope(Alibi, b, h, stride_ab, ALIBI)
    dq = tl.zeros([BLOCK_M, HEAD], dtype=tl.float32)
    # with a mask gradient every key tile is visited: dS is 0 (and must be written) outside the band
    if MASK_GRAD:
        lo = 0
        hi = Lk
    else:
        lo, hi = _key_range(start_m, Lk, diag_lo, diag_hi, BLOCK_M, BLOCK_N, BAND_LO, BAND_HI)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kT = _load_tile(k_base, offs_d, offs_n, stride_kd, stride_kn, D, Lk)  # (HEAD, N), as forward loads it
        vT = _load_tile(v_base, offs_d, offs_n, stride_vd, stride_vn, DV, Lk)
        dot_qk = _dot(q, kT, IEEE)
        qk, _ = _mask_scores(_score(dot_qk, qk_scale, cap_in, cap_out, SOFTCAP), offs_m[:, None], offs_n[None, :],
                             m_base, stride_mm, stride_mn, Lq, Lk, diag_lo, diag_hi, alibi, MASK_KIND, BAND_LO,
                             BAND_HI, ALIBI)
        p = tl.math.exp2(qk - m_row[:, None]) * inv_l[:, None]  # exactly 0 where masked
        dp = _dot(do, vT, IEEE)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], Lk, threshold)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if MASK_GRAD:
            tl.store(g_base + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                     ds.to(DMask.dtype.element_ty), mask=row_ok[:, None] & (offs_n < Lk)[None, :])
        if SOFTCAP:  # the mask and ALiBi are added after the cap: the mask's gradient is dS, q's carries 1 - tanh^2
            cap = _tanh(dot_qk * cap_in)
            ds = ds * (1.0 - cap * cap)
        dq += _dot(ds.to(kT.dtype), tl.trans(kT), IEEE)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d < D)[None, :])


@triton.jit
def _dropout_mask_kernel(Out, seed, threshold, Lq, Lk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes the keep-mask (B, H, Lq, Lk) the attention kernels use: for tests."""
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(Lq, BLOCK_M)
    num_n_blocks = tl.cdiv(Lk, BLOCK_N)
    bh = pid // (num_m_blocks * num_n_blocks)
    rest = pid % (num_m_blocks * num_n_blocks)
    offs_m = (rest // num_n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (rest % num_n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], Lk, threshold)
    ptrs = Out + bh.to(tl.int64) * Lq * Lk + offs_m[:, None] * Lk + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m < Lq)[:, None] & (offs_n < Lk)[None, :])


# ----------------------------------------------------------------------------- configurations

# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per kernel, dtype class, variant
# and head size. On a GPU triton.autotune picks among them, keyed on head size, mask kind,
# band bounds, softcap, ALiBi, dropout and power-of-two length buckets. Each candidate compiles for
# sm_80 and sm_90 without a register spill in the variant's heaviest form (GATE_VARIANTS)
# with triton 3.8 and 3.6 (the GPU machine's; `make gate` checks every one with both;
# _BEFORE_TRITON_3_8 holds the few lists that differ for 3.6); they were found by compiling
# candidates from large to small tiles and keeping the first two that pass (float32 keeps
# one), and a spilling one was replaced by the first that passes all four builds when the
# band, softcap and ALiBi joined the heaviest forms. An empty list: no spill-free configuration
# exists, and the triton backend declines those inputs.
_CONFIGS = {
    ("fwd", "16bit"): {
        "plain": {16: [(128, 64, 4, 3), (128, 64, 8, 3)], 32: [(128, 64, 4, 3), (128, 128, 8, 3)], 64: [(128, 64, 8, 3), (128, 128, 8, 3)], 128: [(64, 64, 8, 2), (64, 32, 4, 2)], 256: [(64, 16, 8, 3), (32, 16, 4, 1)]},
        "masked": {16: [(64, 64, 8, 2), (64, 32, 4, 2)], 32: [(64, 32, 4, 2), (32, 32, 4, 2)], 64: [(64, 32, 8, 2), (128, 16, 8, 2)], 128: [(32, 32, 4, 2), (32, 16, 4, 1)], 256: [(32, 16, 4, 1), (16, 16, 4, 1)]},
        "dropout": {16: [(64, 32, 4, 2), (128, 16, 8, 3)], 32: [(64, 32, 4, 2), (32, 32, 4, 2)], 64: [(32, 64, 8, 2), (32, 32, 4, 2)], 128: [(32, 32, 4, 2), (32, 16, 4, 1)], 256: [(32, 16, 8, 3), (16, 16, 4, 1)]},
        "features": {16: [(64, 32, 4, 2), (64, 32, 8, 3)], 32: [(64, 32, 4, 2), (32, 32, 4, 2)], 64: [(32, 64, 8, 2), (32, 32, 4, 2)], 128: [(32, 32, 4, 2), (32, 16, 4, 1)], 256: [(32, 16, 8, 3), (16, 16, 8, 3)]},
    },
    ("fwd", "fp32"): {
        "plain": {16: [(64, 32, 8, 2)], 32: [(128, 16, 8, 3)], 64: [(64, 32, 8, 2)], 128: [(16, 16, 4, 1)], 256: [(16, 16, 4, 1)]},
        "masked": {16: [(64, 32, 4, 2)], 32: [(32, 64, 8, 2)], 64: [(64, 32, 8, 2)], 128: [(32, 32, 8, 1)], 256: [(64, 16, 8, 1)]},
        "dropout": {16: [(128, 16, 8, 3)], 32: [(32, 32, 4, 2)], 64: [(64, 32, 8, 2)], 128: [(32, 32, 8, 1)], 256: [(32, 32, 8, 1)]},
        "features": {16: [(128, 16, 8, 3)], 32: [(64, 16, 4, 3)], 64: [(64, 32, 8, 2)], 128: [(64, 16, 8, 2)], 256: [(32, 16, 8, 1)]},
    },
    ("dkdv", "16bit"): {
        "plain": {16: [(32, 128, 8, 2), (32, 128, 4, 2)], 32: [(32, 128, 8, 2), (32, 64, 4, 2)], 64: [(64, 16, 4, 2), (32, 32, 4, 2)], 128: [(32, 32, 4, 1), (16, 32, 4, 1)], 256: [(32, 16, 8, 3)]},
        "masked": {16: [(32, 128, 8, 2), (32, 128, 8, 1)], 32: [(32, 128, 8, 1), (128, 16, 8, 2)], 64: [(32, 32, 4, 1), (16, 32, 4, 1)], 128: [(128, 16, 8, 2)], 256: [(16, 16, 4, 1)]},
        "dropout": {16: [(32, 128, 8, 2), (32, 64, 4, 2)], 32: [(16, 128, 8, 2), (16, 64, 4, 2)], 64: [(32, 32, 4, 1), (64, 16, 8, 3)], 128: [(32, 16, 8, 1), (32, 16, 4, 1)], 256: [(16, 16, 4, 1)]},
        "features": {16: [(32, 128, 8, 2), (32, 64, 8, 1)], 32: [(16, 128, 8, 2), (16, 64, 4, 2)], 64: [(32, 32, 4, 1), (64, 16, 8, 3)], 128: [(32, 16, 8, 1), (32, 16, 4, 1)], 256: [(16, 16, 8, 1)]},
    },
    ("dkdv", "fp32"): {
        "plain": {16: [(16, 64, 4, 3)], 32: [(32, 16, 4, 2)], 64: [(32, 32, 8, 1)], 128: [(16, 16, 4, 1)], 256: [(16, 16, 4, 1)]},
        "masked": {16: [(16, 32, 4, 1)], 32: [(32, 32, 4, 1)], 64: [], 128: [(16, 32, 4, 1)], 256: []},
        "dropout": {16: [(16, 16, 4, 1)], 32: [(32, 32, 8, 3)], 64: [(16, 16, 4, 1)], 128: [], 256: [(16, 32, 8, 1)]},
        "features": {16: [(16, 16, 4, 1)], 32: [(32, 32, 8, 3)], 64: [(16, 16, 4, 1)], 128: [], 256: [(16, 16, 8, 1)]},
    },
    ("dq", "16bit"): {
        "plain": {16: [(128, 32, 8, 2), (64, 64, 8, 2)], 32: [(128, 32, 8, 2), (64, 64, 8, 2)], 64: [(128, 32, 8, 2), (32, 128, 8, 3)], 128: [(32, 64, 4, 2), (32, 32, 4, 1)], 256: [(16, 32, 4, 1), (16, 16, 4, 1)]},
        "masked": {16: [(128, 32, 8, 2), (64, 64, 8, 2)], 32: [(128, 32, 8, 2), (32, 64, 8, 2)], 64: [(32, 64, 4, 2), (32, 32, 4, 1)], 128: [(32, 32, 4, 2), (16, 64, 4, 2)], 256: [(16, 32, 4, 1), (16, 16, 4, 1)]},
        "dropout": {16: [(128, 32, 8, 2), (64, 64, 8, 2)], 32: [(128, 32, 8, 2), (64, 32, 4, 2)], 64: [(32, 64, 8, 2), (32, 32, 4, 1)], 128: [(32, 32, 4, 1), (16, 32, 4, 1)], 256: [(16, 32, 4, 1), (16, 16, 4, 1)]},
        "features": {16: [(128, 32, 8, 2), (64, 32, 8, 2)], 32: [(128, 32, 8, 2), (64, 32, 4, 2)], 64: [(32, 64, 8, 2), (32, 32, 4, 1)], 128: [(32, 32, 8, 2), (16, 32, 4, 1)], 256: [(16, 32, 4, 1), (16, 16, 8, 3)]},
    },
    ("dq", "fp32"): {
        "plain": {16: [(32, 32, 4, 1)], 32: [(32, 32, 4, 1)], 64: [(32, 32, 4, 1)], 128: [(64, 16, 8, 3)], 256: [(16, 16, 4, 1)]},
        "masked": {16: [(32, 32, 4, 1)], 32: [(64, 16, 8, 3)], 64: [(32, 32, 4, 2)], 128: [(16, 32, 4, 1)], 256: [(16, 32, 4, 1)]},
        "dropout": {16: [(128, 16, 8, 3)], 32: [(64, 16, 8, 3)], 64: [(32, 32, 4, 1)], 128: [(16, 32, 4, 1)], 256: [(16, 16, 4, 1)]},
        "features": {16: [(128, 16, 8, 3)], 32: [(64, 16, 8, 3)], 64: [(16, 32, 4, 1)], 128: [(16, 32, 4, 1)], 256: [(16, 16, 4, 1)]},
    },
}

VARIANTS = ("plain", "masked", "dropout", "features")
# The Triton interpreter (tests on a CPU): one small configuration, fast to interpret.
_INTERPRETER_CONFIG = (32, 32, 4, 1)
PREPROCESS_BLOCK_M = 16


def head_size(d: int) -> int:
    """The padded head dimension (a power of two >= 16) the kernels are compiled for."""
    return max(16, triton.next_power_of_2(d))


MAX_HEAD = 256


def _dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def variant(mask_kind: int, dropout: bool, softcap: bool = False, alibi: bool = False) -> str:
    """Which configuration list serves these inputs: a softcap or ALiBi ("features"), dropout and
    masks cost registers."""
    if softcap or alibi:
        return "features"
    return "dropout" if dropout else ("masked" if mask_kind != MASK_NONE else "plain")


# Entries whose lists differ with triton older than 3.8 (the GPU machine's 3.6 allocates
# registers differently): [] where every tile keeps a stack frame (spills) there, and the
# backend declines those inputs ("auto" falls back) rather than run a spilling kernel.
_BEFORE_TRITON_3_8 = {("dkdv", "16bit", "dropout", 256): [], ("dq", "fp32", "dropout", 256): [],
                      ("dkdv", "fp32", "features", 256): [(16, 16, 4, 1)]}
_TRITON_BEFORE_3_8 = tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 8)


# Configurations whose VARLEN form (packed sequences: offsets read per program) keeps a stack
# frame in some build (sm_80 / sm_90 x triton 3.8 / 3.6): packed sequences do not use them, and
# where none is left they run one call per sequence instead of one launch.
_VARLEN_SPILLS = {
    ("fwd", "16bit", "plain", 128): [(64, 32, 4, 2)], ("fwd", "16bit", "features", 32): [(64, 32, 4, 2)],
    ("fwd", "fp32", "features", 16): [(128, 16, 8, 3)], ("fwd", "fp32", "features", 128): [(64, 16, 8, 2)],
    ("fwd", "16bit", "features", 256): [(32, 16, 8, 3)], ("fwd", "fp32", "features", 256): [(32, 16, 8, 1)],
    ("dkdv", "16bit", "features", 128): [(32, 16, 4, 1)], ("dkdv", "16bit", "features", 256): [(16, 16, 8, 1)],
    ("dkdv", "fp32", "plain", 16): [(16, 64, 4, 3)], ("dkdv", "fp32", "plain", 32): [(32, 16, 4, 2)],
    ("dkdv", "fp32", "plain", 128): [(16, 16, 4, 1)], ("dkdv", "fp32", "plain", 256): [(16, 16, 4, 1)],
    ("dkdv", "fp32", "features", 16): [(16, 16, 4, 1)], ("dkdv", "fp32", "features", 32): [(32, 32, 8, 3)],
    ("dkdv", "fp32", "features", 64): [(16, 16, 4, 1)],
    ("dkdv", "fp32", "features", 256): [(16, 16, 8, 1), (16, 16, 4, 1)],
}


def configs(kernel: str, head: int, dtype: torch.dtype, variant: str,
            varlen: bool = False) -> list[tuple[int, int, int, int]]:
    key = (kernel, _dtype_class(dtype), variant, head)
    if _TRITON_BEFORE_3_8 and key in _BEFORE_TRITON_3_8:
        out = _BEFORE_TRITON_3_8[key]
    else:
        out = _CONFIGS[(kernel, key[1])][variant][head]
    return [c for c in out if c not in _VARLEN_SPILLS.get(key, ())] if varlen else out


def unsupported(head: int, dtype: torch.dtype, mask_kind: int, dropout: bool, features: bool = False,
                varlen: bool = False) -> str:
    """Why the kernels cannot take these inputs on a GPU ('' when they can); features: a softcap or
    ALiBi; varlen: packed sequences in one launch."""
    v = variant(mask_kind, dropout, features)
    missing = [k for k in ("fwd", "dkdv", "dq") if not configs(k, head, dtype, v, varlen)]
    if missing:
        newer = " with this triton (3.8 has one)" if _TRITON_BEFORE_3_8 and any(
            _BEFORE_TRITON_3_8.get((k, _dtype_class(dtype), v, head)) == [] for k in missing) else ""
        return (f"no spill-free Triton configuration for {', '.join(missing)} at head size {head}, "
                f"{str(dtype).replace('torch.', '')}, {v}{' packed' if varlen else ''} inputs{newer}")
    return ""


def band(causal: int, window_left: int, window_right: int, Lq: int, Lk: int) -> tuple[bool, bool, int, int]:
    """The causal variant and sliding window as the band of allowed key - query offsets
    diag_lo <= j - i <= diag_hi (window bottom-right aligned: query i sits at i + Lk - Lq)
    -> (BAND_LO, BAND_HI, diag_lo, diag_hi), the bounds clamped to [-Lq, Lk] (int32)."""
    shift = Lk - Lq
    highs = [bound for on, bound in ((causal == codes.CausalKind.UPPER_LEFT, 0),
                                     (causal == codes.CausalKind.LOWER_RIGHT, shift),
                                     (window_right >= 0, shift + window_right)) if on]
    diag_hi = min(max(min(highs), -Lq), Lk) if highs else Lk
    diag_lo = min(max(shift - window_left, -Lq), Lk) if window_left >= 0 else -Lq
    return window_left >= 0, bool(highs), diag_lo, diag_hi


def _cap_args(scale: float, softcap: float) -> tuple[float, float]:
    """(cap_in, cap_out) of _score: scale / c and c * log2(e) (unused without a softcap)."""
    return (scale / softcap, softcap * LOG2E) if softcap > 0 else (0.0, 0.0)


def _alibi_stride(alibi) -> int:
    """The batch stride of (B, Hq) slopes (0 when shared, or without ALiBi)."""
    return alibi.stride(0) if alibi is not None else 0


def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


_autotuned: dict = {}


def _kernel_for(name: str, fn, head: int, dtype: torch.dtype, var: str, varlen: bool = False):
    """A launcher (grid_fn, *args, **constexprs) with explicit (interpreter) or autotuned block sizes."""
    if triton_interpreting():
        bm, bn, warps, stages = _INTERPRETER_CONFIG
        return lambda grid_fn, *args, **kw: fn[grid_fn({"BLOCK_M": bm, "BLOCK_N": bn})](
            *args, **kw, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    key = (name, head, _dtype_class(dtype), var, varlen)
    if key not in _autotuned:
        cfgs = tuning_candidates([triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                                  for bm, bn, w, s in configs(name, head, dtype, var, varlen)])
        _autotuned[key] = triton.autotune(
            configs=cfgs, key=["HEAD", "MASK_KIND", "BAND_LO", "BAND_HI", "SOFTCAP", "ALIBI", "DROPOUT", "VARLEN",
                                         "LQ_BUCKET", "LK_BUCKET"])(fn)
    tuned = _autotuned[key]
    return lambda grid_fn, *args, **kw: tuned[grid_fn](*args, **kw)


# innermost strides the launchers guarantee to be 1 (head dims) or that are 1 for masks
# laid out normally; the compile gate compiles them as the constant Triton specialises to
UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_dd", "stride_dkd", "stride_dvd",
                "stride_dqd", "stride_mn", "stride_gn")


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """t with a contiguous last dimension (a copy only in the rare case it is not)."""
    return t if t.stride(-1) == 1 or t.size(-1) == 1 else t.contiguous()


def _strides4(t: torch.Tensor):
    return (t.stride(0), t.stride(1), t.stride(2), t.stride(3))


def _mask_args(mask):
    if mask is None:
        return None, (0, 0, 0, 0)
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # same bytes, a pointer type Triton loads plainly
    return mask, _strides4(mask)


# ----------------------------------------------------------------------------- launchers


class Packed(NamedTuple):
    """Packed variable-length sequences for one launch (VARLEN): q/k/v are (1, H, T, D) views of
    the packed (T, H, D) tensors; sequence b has queries seq_q[b]..seq_q[b + 1] and keys
    seq_k[b, 0] .. + seq_k[b, 1] (int32, on the device)."""
    seq_q: torch.Tensor  # (N + 1,) int32
    seq_k: torch.Tensor  # (N, 2) int32: first key, key count
    max_q: int
    max_k: int

    @property
    def count(self) -> int:
        return self.seq_k.size(0)


def _launch_shape(q, k, causal, window_left, window_right, packed):
    """-> (grid batch, Lq, Lk as the kernels take them, band (BAND_LO, BAND_HI, diag_lo, diag_hi),
    stride function, SeqQ, SeqK, allocator of outputs). Packed: one program row per sequence,
    lengths the longest, batch strides 0 (sequences are found by offsets), the band relative to
    each sequence's Lk - Lq, outputs zeroed (rows and keys of no sequence stay 0)."""
    B, Lq, Lk = q.size(0), q.size(2), k.size(2)
    if packed is None:
        return (B, Lq, Lk, band(causal, window_left, window_right, Lq, Lk), _strides4, q, q,
                lambda shape, dtype: _alloc.empty(shape, dtype, q.device))
    assert causal == codes.CausalKind.NONE, "packed sequences take causal as window_right = 0"
    rel = (window_left >= 0, window_right >= 0, -window_left if window_left >= 0 else 0, max(window_right, 0))
    return (packed.count, packed.max_q, packed.max_k, rel, lambda t: (0, *_strides4(t)[1:]), packed.seq_q,
            packed.seq_k, lambda shape, dtype: torch.zeros(shape, dtype=dtype, device=q.device))


def attention_fwd(q, k, v, mask, mask_kind: int, causal: int, scale: float, dropout_p: float, seed: int,
                  window_left: int = -1, window_right: int = -1, softcap: float = 0.0, alibi=None,
                  packed: Optional[Packed] = None):
    """q (B, Hq, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv), mask (B, Hq, Lq, Lk) view or None
    -> out (B, Hq, Lq, Dv), stats (2, B, Hq, Lq) float32: per row the max score m (log2
    units) and 1/l, the inverse softmax denominator (both 0 on fully masked rows).
    window_left/right: a sliding window (-1: unbounded on that side), key tiles outside it skipped;
    softcap > 0: scores become softcap * tanh(score / softcap); alibi: None or (B, Hq) float32
    slopes (unit head stride), -slope * |i + Lk - Lq - j| added to the scores (packed: (N, Hq)).
    packed: sequences of packed tensors in one launch (Packed; B = 1, L = T)."""
    B, H, Lq, D = q.shape
    HK, DV = k.shape[1], v.shape[3]
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    grid_b, lq, lk, (band_lo, band_hi, diag_lo, diag_hi), st, seq_q, seq_k, alloc = _launch_shape(
        q, k, causal, window_left, window_right, packed)
    out = alloc((B, H, Lq, DV), q.dtype)
    stats = alloc((2, B, H, Lq), torch.float32)
    head = head_size(max(D, DV))
    mask_t, mstr = _mask_args(mask)
    threshold, dscale = _dropout_args(dropout_p)
    launch = _kernel_for("fwd", _attn_fwd_kernel, head, q.dtype,
                         variant(mask_kind, dropout_p > 0, softcap > 0, alibi is not None), packed is not None)
    launch(lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]) * grid_b * H,),
           q, k, v, mask_t if mask_t is not None else q, alibi if alibi is not None else stats, seq_q, seq_k,
           out, stats, *st(q), *st(k), *st(v), *mstr, *st(out),
           H, H // HK, lq, lk, D, DV, scale * LOG2E, dscale, seed, threshold, B * H * Lq, diag_lo, diag_hi,
           *_cap_args(scale, softcap), _alibi_stride(alibi), _bucket(lq), _bucket(lk), MASK_KIND=mask_kind,
           BAND_LO=band_lo, BAND_HI=band_hi, SOFTCAP=softcap > 0, ALIBI=alibi is not None, DROPOUT=dropout_p > 0,
           IEEE=q.dtype == torch.float32, VARLEN=packed is not None, HEAD=head)
    return out, stats


def attention_bwd(do, q, k, v, out, stats, grad_lse, mask, mask_kind: int, causal: int, scale: float,
                  dropout_p: float, seed: int, mask_grad: bool, window_left: int = -1, window_right: int = -1,
                  softcap: float = 0.0, alibi=None, packed: Optional[Packed] = None):
    """-> dq, dk, dv (shapes of q, k, v) and dS (B, Hq, Lq, Lk) in the mask's dtype when
    mask_grad (the gradient of a float mask before broadcasting is undone), else empty.
    grad_lse: None or (B, Hq, Lq) float32, the gradient of each row's log-sum-exp (d lse / d s
    = P, so it enters dS = P (dP - delta + grad_lse) through delta)."""
    B, H, Lq, D = q.shape
    HK, Lk, DV = k.shape[1], k.shape[2], v.shape[3]
    do, q, k, v = _unit_last(do), _unit_last(q), _unit_last(k), _unit_last(v)
    dev = q.device
    head = head_size(max(D, DV))
    grid_b, lq, lk, (band_lo, band_hi, diag_lo, diag_hi), st, seq_q, seq_k, alloc = _launch_shape(
        q, k, causal, window_left, window_right, packed)
    dq = alloc(q.shape, q.dtype)
    dk = alloc(k.shape, k.dtype)
    dv = alloc(v.shape, v.dtype)
    dmask = _alloc.empty((B, H, Lq, Lk), mask.dtype, dev) if mask_grad else q.new_empty(0)
    delta = _alloc.empty((B, H, Lq), torch.float32, dev)
    mask_t, mstr = _mask_args(mask)
    mask_t = mask_t if mask_t is not None else q
    threshold, dscale = _dropout_args(dropout_p)
    _attn_bwd_preprocess_kernel[(triton.cdiv(Lq, PREPROCESS_BLOCK_M) * B * H,)](
        out, do, delta, *_strides4(out), *_strides4(do), H, Lq, DV, HEAD=head, BLOCK_M=PREPROCESS_BLOCK_M)
    if grad_lse is not None:
        delta -= grad_lse
    common = dict(MASK_KIND=mask_kind, BAND_LO=band_lo, BAND_HI=band_hi, SOFTCAP=softcap > 0,
                  ALIBI=alibi is not None, DROPOUT=dropout_p > 0, IEEE=q.dtype == torch.float32,
                  VARLEN=packed is not None, HEAD=head)
    var = variant(mask_kind, dropout_p > 0, softcap > 0, alibi is not None)
    alibi_t = alibi if alibi is not None else stats
    _kernel_for("dkdv", _attn_bwd_dkdv_kernel, head, q.dtype, var, packed is not None)(
        lambda meta: (triton.cdiv(lk, meta["BLOCK_N"]) * grid_b * HK,),
        q, k, v, mask_t, alibi_t, seq_q, seq_k, do, stats, delta, dk, dv,
        *st(q), *st(k), *st(v), *mstr, *st(do), *st(dk), *st(dv),
        H, HK, H // HK, lq, lk, D, DV, scale * LOG2E, scale, dscale, seed, threshold, B * H * Lq,
        diag_lo, diag_hi, *_cap_args(scale, softcap), _alibi_stride(alibi), _bucket(lq), _bucket(lk),
        **common)
    gstr = _strides4(dmask) if mask_grad else (0, 0, 0, 0)
    _kernel_for("dq", _attn_bwd_dq_kernel, head, q.dtype, var, packed is not None)(
        lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]) * grid_b * H,),
        q, k, v, mask_t, alibi_t, seq_q, seq_k, do, stats, delta, dq, dmask if mask_grad else dq,
        *st(q), *st(k), *st(v), *mstr, *st(do), *st(dq), *gstr,
        H, H // HK, lq, lk, D, DV, scale * LOG2E, scale, dscale, seed, threshold, B * H * Lq,
        diag_lo, diag_hi, *_cap_args(scale, softcap), _alibi_stride(alibi), _bucket(lq), _bucket(lk),
        MASK_GRAD=mask_grad, **common)
    return dq, dk, dv, dmask


def dropout_keep_mask(seed: int, B: int, H: int, Lq: int, Lk: int, dropout_p: float, device) -> torch.Tensor:
    """The (B, H, Lq, Lk) bool keep-mask the kernels apply for this seed (test-only path)."""
    out = torch.empty((B, H, Lq, Lk), dtype=torch.int8, device=device)
    threshold, _ = _dropout_args(dropout_p)
    bm, bn = 32, 32
    _dropout_mask_kernel[(B * H * triton.cdiv(Lq, bm) * triton.cdiv(Lk, bn),)](
        out, seed, threshold, Lq, Lk, BLOCK_M=bm, BLOCK_N=bn)
    return out.bool()


# ----------------------------------------------------------------------------- GPU compile gate


_BOTH_BOUNDS = dict(BAND_LO=True, BAND_HI=True)  # a sliding window, maybe causal: both band tests
_NO_FEATURES = dict(SOFTCAP=False, ALIBI=False, VARLEN=False)
GATE_VARIANTS = {"plain": dict(MASK_KIND=MASK_NONE, DROPOUT=False, **_NO_FEATURES, **_BOTH_BOUNDS),
                 "masked": dict(MASK_KIND=MASK_FLOAT, DROPOUT=False, **_NO_FEATURES, **_BOTH_BOUNDS),
                 "dropout": dict(MASK_KIND=MASK_FLOAT, DROPOUT=True, **_NO_FEATURES, **_BOTH_BOUNDS),
                 "features": dict(MASK_KIND=MASK_FLOAT, DROPOUT=True, SOFTCAP=True, ALIBI=True, VARLEN=False,
                                  **_BOTH_BOUNDS)}
# the forms packed sequences (VARLEN) compile in: no mask, no dropout, offsets read per program
GATE_VARLEN_FORMS = {"plain": dict(GATE_VARIANTS["plain"], VARLEN=True),
                     "features": dict(GATE_VARIANTS["features"], MASK_KIND=MASK_NONE, DROPOUT=False, VARLEN=True)}
_GATE_INTS = ("H", "HK", "GROUP", "Lq", "Lk", "D", "DV", "threshold", "stats_stride", "diag_lo", "diag_hi",
              "LQ_BUCKET", "LK_BUCKET")
_GATE_FLOATS = ("qk_scale", "sm_scale", "dropout_scale", "cap_in", "cap_out")
_GATE_POINTERS = ("Q", "K", "V", "Out", "DO", "DK", "DV_", "DQ", "DMask")


def _gate_config(kernel_name, fn, dtype_name, head, cfg, vname, variant):

    bm, bn, warps, stages = cfg
    const = dict(variant, IEEE=dtype_name == "fp32", HEAD=head, BLOCK_M=bm, BLOCK_N=bn)
    if kernel_name == "dq":
        const["MASK_GRAD"] = variant["MASK_KIND"] == MASK_FLOAT
    # the launchers make every head dimension contiguous (stride 1), and a mask's key
    # stride is 1 when it is laid out normally (Triton specialises arguments equal to 1)
    const.update({a: 1 for a in fn.arg_names if a in UNIT_STRIDES})
    sig = {}
    for a in fn.arg_names:
        if a in const:
            continue
        if a == "Mask":
            sig[a] = f"*{dtype_name}" if variant["MASK_KIND"] == MASK_FLOAT else "*u8"
        elif a in ("Stats", "Delta", "Alibi"):
            sig[a] = "*fp32"
        elif a in ("SeqQ", "SeqK"):
            sig[a] = "*i32"
        elif a in _GATE_POINTERS:
            sig[a] = f"*{dtype_name}"
        elif a == "seed":
            sig[a] = "i64"
        elif a in _GATE_INTS or a.startswith("stride"):
            sig[a] = "i32"
        elif a in _GATE_FLOATS:
            sig[a] = "fp32"
        else:
            raise KeyError(f"no gate type for argument {a} of {kernel_name}")
    return TritonConfig(f"attention {kernel_name} {dtype_name} head={head} BLOCK_M={bm} BLOCK_N={bn} "
                        f"warps={warps} stages={stages} {vname}", fn, sig, const, warps, stages)


from ..tools.gate import TritonConfig  # noqa: E402  (gate imports no kernels at module level)


def gate_configs():
    """Every (kernel, head size, dtype, variant, block configuration) a launcher can choose,
    each variant compiled in its heaviest form (a two-sided band; a float mask; dropout; softcap + ALiBi)
    and, for the variants packed sequences use, in its VARLEN form,
    for the compile gate."""
    out = []
    for dtype_name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        for kernel_name, fn in (("fwd", _attn_fwd_kernel), ("dkdv", _attn_bwd_dkdv_kernel),
                                ("dq", _attn_bwd_dq_kernel)):
            for head in (16, 32, 64, 128, 256):
                for vname, heaviest in GATE_VARIANTS.items():
                    for cfg in configs(kernel_name, head, dtype, vname):
                        out.append(_gate_config(kernel_name, fn, dtype_name, head, cfg, vname, heaviest))
                for vname, form in GATE_VARLEN_FORMS.items():
                    for cfg in configs(kernel_name, head, dtype, vname, varlen=True):
                        out.append(_gate_config(kernel_name, fn, dtype_name, head, cfg, f"{vname} varlen", form))
        for head in (16, 32, 64, 128, 256):
            sig = {"Out": f"*{dtype_name}", "DO": f"*{dtype_name}", "Delta": "*fp32"}
            sig.update({a: "i32" for a in _attn_bwd_preprocess_kernel.arg_names if a.startswith("stride")})
            sig.update({"H": "i32", "Lq": "i32", "DV": "i32"})
            const = {"HEAD": head, "BLOCK_M": PREPROCESS_BLOCK_M, "stride_od": 1, "stride_dd": 1}
            out.append(TritonConfig(f"attention preprocess {dtype_name} head={head}", _attn_bwd_preprocess_kernel,
                                    sig, const, 4, 1))
    out.append(TritonConfig("attention dropout_mask", _dropout_mask_kernel,
                            {"Out": "*i8", "seed": "i64", "threshold": "i32", "Lq": "i32", "Lk": "i32"},
                            {"BLOCK_M": 32, "BLOCK_N": 32}, 4, 1))
    return out
