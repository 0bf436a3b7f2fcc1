"""Attention over packed variable-length sequences (torch.nn.attention.varlen's contract).

Each sequence runs as its own attention call on the selected backend's kernels, over views
of the packed tensors (no padding, no copy of q/k/v for contiguous packing; a paged cache's
pages are gathered per sequence). Work is the sum of the sequences' own, never the padded
batch's. One kernel launch per sequence: fine on a CPU, costly on a GPU with many short
sequences (a single-launch varlen kernel is not written yet).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import attention as op


def _keys(key: Tensor, value: Tensor, i: int, ck: Optional[list], used: Optional[list],
          block_table: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Sequence i's keys and values (Lk_i, Hk, D)."""
    if block_table is not None:
        page, n = key.size(1), used[i]
        pages = block_table[i, :-(-n // page)].long()
        return key[pages].flatten(0, 1)[:n], value[pages].flatten(0, 1)[:n]
    k, v = key[ck[i]:ck[i + 1]], value[ck[i]:ck[i + 1]]
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
    hq, dv = query.size(1), value.size(-1)
    outs, lses = [], []
    for i in range(len(cq) - 1):
        if cq[i + 1] == cq[i]:
            continue  # an empty sequence: no rows
        k, v = _keys(key, value, i, ck, used, block_table)
        slopes = alibi_slopes[i] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        q4 = query[cq[i]:cq[i + 1]].transpose(0, 1).unsqueeze(0)  # (1, Hq, Lq_i, D), a view
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
