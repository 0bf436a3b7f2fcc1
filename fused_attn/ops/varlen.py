"""Attention over packed variable-length sequences (torch.nn.attention.varlen's contract).

When the backend chosen for the sequences has packed kernels (PACKED_BACKENDS) that apply
every feature asked for, all sequences run in one call of the kernels, forward and backward:
one launch of the Triton kernels (VARLEN: each program finds its sequence by offsets; programs
past a sequence's end exit), one call of the C++ operators `attention_packed_fwd/bwd` (`cpu`:
one parallel loop over every sequence's (head, query block) tasks; `cuda` and `cuda_emu`: one
launch per kernel, over blocks of the longest sequence for each (sequence, head), those past
their sequence's end exiting). Otherwise each sequence runs
as its own attention call on the selected backend's kernels, over views of the packed tensors
(no padding, no copy of q/k/v for contiguous packing). A paged cache's pages are gathered per
sequence. Work is the sum of the sequences' own, never the padded batch's.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _ext, codes
from ..dispatch import triton_interpreting
from . import attention as op
from ._autograd import apply, call, kernel_op, twin_function


def _pieces(t: Tensor, offsets: list) -> list:
    """t's rows offsets[i]:offsets[i + 1] for each i, as views from one split, whose backward
    concatenates the pieces' gradients once (a slice per sequence would write a zero tensor of
    t's full size per sequence: quadratic in the number of sequences)."""
    sizes = [offsets[0]] + [b - a for a, b in zip(offsets, offsets[1:])] + [t.size(0) - offsets[-1]]
    return list(t.split(sizes))[1:-1]


def _keys(key: Tensor, value: Tensor, i: int, ck: Optional[list], used: Optional[list],
          block_table: Optional[Tensor], pieces: Optional[tuple] = None) -> tuple[Tensor, Tensor]:
    """Sequence i's keys and values (Lk_i, Hk, D); pieces: key's and value's _pieces."""
    if block_table is not None:
        page, n = key.size(1), used[i]
        pages = block_table[i, :-(-n // page)].long()
        return key[pages].flatten(0, 1)[:n], value[pages].flatten(0, 1)[:n]
    k, v = (pieces[0][i], pieces[1][i]) if pieces else (key[ck[i]:ck[i + 1]], value[ck[i]:ck[i + 1]])
    if used is not None:
        k, v = k[:used[i]], v[:used[i]]
    return k, v


def varlen_attention(query, key, value, cu_seqlens_q, cu_seqlens_k, *, scale, is_causal, window_size, softcap,
                     alibi_slopes, sinks, enable_gqa, seqused_k, block_table, return_lse, backend):
    """Validated arguments -> out (Tq, Hq, Dv) and, with return_lse, lse (Hq, Tq) float32."""
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist() if cu_seqlens_k is not None else None
    used = seqused_k.tolist() if seqused_k is not None else None
    left, right = window_size
    if is_causal:  # bottom-right aligned, as FlashAttention's varlen kernels
        right = 0 if right < 0 else min(right, 0)
    packed_backend = None if block_table is not None else _packed_backend(
        query, key, value, cq, ck, used, scale, enable_gqa, (left, right), softcap, alibi_slopes, backend)
    if packed_backend is not None:
        out, lse = _packed_attention(query, key, value, cq, ck, used, scale, (left, right), softcap, alibi_slopes,
                                     packed_backend)
        if sinks is not None:
            by_head = out.transpose(0, 1)  # (Hq, Tq, Dv), lse's layout
            by_head, lse = op.merge_partials([by_head, torch.zeros_like(by_head)],
                                             [lse, sinks.to(lse.dtype)[:, None].expand(lse.shape)])
            out = by_head.transpose(0, 1)
        return (out, lse) if return_lse else out
    hq, dv = query.size(1), value.size(-1)
    outs, lses = [], []
    queries = _pieces(query, cq)
    key_pieces = (_pieces(key, ck), _pieces(value, ck)) if block_table is None else None
    for i in range(len(cq) - 1):
        if cq[i + 1] == cq[i]:
            continue  # an empty sequence: no rows
        k, v = _keys(key, value, i, ck, used, block_table, key_pieces)
        slopes = alibi_slopes[i] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        q4 = queries[i].transpose(0, 1).unsqueeze(0)  # (1, Hq, Lq_i, D), a view
        k4, v4 = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        out, lse = op.attention(q4, k4, v4, None, 0.0, False, scale, enable_gqa, window_size=(left, right),
                                softcap=softcap, alibi_slopes=slopes, sinks=sinks, return_lse=True, backend=backend)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0].float())
    tail = query.size(0) - cq[-1]  # rows after the last sequence belong to none: 0, lse -inf
    outs.append(query.new_zeros(tail, hq, dv))
    lses.append(torch.full((hq, tail), float("-inf"), dtype=torch.float32, device=query.device))
    out, lse = torch.cat(outs, 0), torch.cat(lses, 1)
    return (out, lse) if return_lse else out


# ------------------------------------------------------------------ every sequence in one call


# whose kernels take every packed sequence in one call: Triton's launchers, or the others' C++
# operators attention_packed_fwd/bwd
PACKED_BACKENDS = ("triton", "cpu", "cuda", "cuda_emu")


def _packed_backend(query, key, value, cq, ck, used, scale, enable_gqa, window, softcap, alibi_slopes,
                    backend) -> Optional[str]:
    """The backend running the sequences in one call, or None: the backend chosen for a
    sequence of these inputs has packed kernels (PACKED_BACKENDS) and applies the window,
    softcap and ALiBi itself (the call is counted as one scaled_dot_product_attention call of
    that backend)."""
    n = len(cq) - 1
    if n == 0 or query.size(0) == 0 or key.size(0) == 0 or value.size(-1) == 0:
        return None
    first = next((i for i in range(n) if cq[i + 1] > cq[i]), 0)
    k, v = _keys(key, value, first, ck, used, None)
    q4 = query[cq[first]:cq[first + 1]].transpose(0, 1).unsqueeze(0)
    slopes = alibi_slopes[first] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
    k4, v4 = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
    try:
        inputs, _, _, extra = op._plan(backend, q4, k4, v4, None, 0.0, False, scale, enable_gqa, window, softcap,
                                       slopes)
        chosen = op.OP.choose(backend, query.device, **inputs)
    except NotImplementedError:
        return None
    if chosen not in PACKED_BACKENDS:
        return None
    if inputs["mask_kind"] != "none" or (alibi_slopes is not None and "alibi" not in extra):
        return None  # something went into a mask
    if chosen == "triton" and not triton_interpreting():
        from ..triton import attention as kt

        if kt.unsupported(kt.head_size(max(query.size(-1), value.size(-1))), query.dtype, 0, False,
                          bool(softcap) or "alibi" in extra, varlen=True):
            return None  # no spill-free packed configuration: a call per sequence
    op.OP.select(backend, query.device, **inputs)  # counted: one call, one launch
    return chosen


def _packed_attention(query, key, value, cq, ck, used, scale, window, softcap, alibi_slopes, backend):
    """All sequences in one call of `backend`'s kernels -> out (Tq, Hq, Dv), lse (Hq, Tq)
    float32 (natural log, -inf on rows with no key)."""
    from .. import reference

    n, dev = len(cq) - 1, query.device
    k_len = [ck[i + 1] - ck[i] for i in range(n)]
    if used is not None:
        k_len = [min(a, b) for a, b in zip(k_len, used)]
    seq_q = torch.tensor(cq, dtype=torch.int32, device=dev)
    seq_k = torch.tensor([[ck[i], k_len[i]] for i in range(n)], dtype=torch.int32, device=dev)
    max_q = max(cq[i + 1] - cq[i] for i in range(n))
    max_k = max(max(k_len), 1)
    scale = reference.default_scale(query.size(-1)) if scale is None else float(scale)
    alibi = op.kernel_slopes(alibi_slopes, n, query.size(1)) if alibi_slopes is not None else None
    out, stats = apply(packed_attention_fwd, _PackedAttention, query, key, value, seq_q, seq_k, max_q, max_k, scale,
                       int(window[0]), int(window[1]), float(softcap), alibi, backend)
    return out, op.lse_from_stats(stats[:, 0], backend, fully_masked=float("-inf")).float()


def _as_packed_4d(t: Tensor) -> Tensor:
    """(T, H, D) -> the (1, H, T, D) view the kernels take."""
    return t.transpose(0, 1).unsqueeze(0)


def _packing(seq_q, seq_k, max_q, max_k):
    from ..triton import attention as k

    return k.Packed(seq_q, seq_k, max_q, max_k)


@kernel_op("fused_attn::packed_attention_fwd")
def packed_attention_fwd(q: Tensor, k: Tensor, v: Tensor, seq_q: Tensor, seq_k: Tensor, max_q: int, max_k: int,
                         scale: float, window_left: int, window_right: int, softcap: float,
                         alibi: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    """Packed q (Tq, Hq, D), k (Tk, Hk, D), v (Tk, Hk, Dv); seq_q (N + 1,) query offsets and
    seq_k (N, 2) key (start, count) int32; backend one of PACKED_BACKENDS -> out (Tq, Hq, Dv),
    stats (2, 1, Hq, Tq) in the backend's units (rows of no sequence 0, 0)."""
    if backend != "triton":
        return _ext.backend_ops(backend).attention_packed_fwd(q, k, v, seq_q, seq_k, scale, window_left,
                                                              window_right, softcap, alibi)
    from ..triton import attention as kt

    out, stats = kt.attention_fwd(_as_packed_4d(q), _as_packed_4d(k), _as_packed_4d(v), None, 0, 0, scale, 0.0, 0,
                                  window_left, window_right, softcap, alibi, _packing(seq_q, seq_k, max_q, max_k))
    return out[0].transpose(0, 1).contiguous(), stats


@packed_attention_fwd.register_fake
def _(q, k, v, seq_q, seq_k, max_q, max_k, scale, window_left, window_right, softcap, alibi, backend):
    return (q.new_empty(q.size(0), q.size(1), v.size(2)),
            q.new_empty(2, 1, q.size(1), q.size(0), dtype=codes.stats_dtype(q.dtype)))


@kernel_op("fused_attn::packed_attention_bwd")
def packed_attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, stats: Tensor,
                         grad_lse: Optional[Tensor], seq_q: Tensor, seq_k: Tensor, max_q: int, max_k: int,
                         scale: float, window_left: int, window_right: int, softcap: float,
                         alibi: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """-> dq, dk, dv in the packed layouts of q, k, v. grad_lse: None or (1, Hq, Tq) in stats' dtype."""
    if backend != "triton":
        return _ext.backend_ops(backend).attention_packed_bwd(do, q, k, v, out, stats, grad_lse, seq_q, seq_k,
                                                              scale, window_left, window_right, softcap, alibi)
    from ..triton import attention as kt

    dq, dk, dv, _ = kt.attention_bwd(_as_packed_4d(do), _as_packed_4d(q), _as_packed_4d(k), _as_packed_4d(v),
                                     _as_packed_4d(out), stats, grad_lse, None, 0, 0, scale, 0.0, 0, False,
                                     window_left, window_right, softcap, alibi, _packing(seq_q, seq_k, max_q, max_k))
    return tuple(t[0].transpose(0, 1).contiguous() for t in (dq, dk, dv))


@packed_attention_bwd.register_fake
def _(do, q, k, v, out, stats, grad_lse, seq_q, seq_k, max_q, max_k, scale, window_left, window_right, softcap,
      alibi, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, seq_q, seq_k, max_q, max_k, scale, window_left, window_right, softcap, alibi, backend = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, output[0], output[1], seq_q, seq_k, alibi)
    ctx.args = (max_q, max_k, scale, window_left, window_right, softcap, backend)


def _backward(ctx, dout, dstats):
    q, k, v, out, stats, seq_q, seq_k, alibi = ctx.saved_tensors
    max_q, max_k, scale, window_left, window_right, softcap, backend = ctx.args
    grad_lse = None if dstats is None else (dstats[0] / op._lse_per_max_unit(backend)).contiguous()
    dout = torch.zeros_like(out) if dout is None else dout.contiguous()
    dq, dk, dv = call(packed_attention_bwd, dout, q, k, v, out, stats, grad_lse, seq_q, seq_k, max_q, max_k, scale,
                      window_left, window_right, softcap, alibi, backend)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


packed_attention_fwd.register_autograd(_backward, setup_context=_setup_context)

_PackedAttention = twin_function("_PackedAttention", packed_attention_fwd.eager, _setup_context, _backward)
