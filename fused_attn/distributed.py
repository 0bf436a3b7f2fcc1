"""Context parallelism: attention over a sequence split across the processes of a
torch.distributed group (ring attention).

Each rank holds a slice of the sequence, q, k, v (B, H, L / world, D). The K/V slices travel
once around the ring with batched ``isend``/``irecv`` (the next slice is in flight while this
one is computed); every rank's queries attend to every slice with the kernels' block functions
(``ops.attention.block_forward``), and the partial results are merged exactly with their
log-sum-exp. Backward sends K/V around again, each with its dK/dV accumulator, which is back
at the slice's owner after a full turn; every block's backward is given the whole rows' output
and log-sum-exp, so it computes its share of the gradients.

Layouts: non-causal attention takes any split of the sequence (attention does not care in
which order keys come). Causal attention needs the zigzag layout: the sequence, padded at its
end to a multiple of 2 * world, is cut into 2 * world chunks and rank r holds chunks r and
2 * world - 1 - r, so every rank does the same work (`zigzag_shard`, `zigzag_unshard`,
`zigzag_positions`). Padding: the padded positions come last, so under causal attention no
real query sees them; for non-causal attention mask them with `zigzag_valid` as (part of) the
key-padding mask. Padded queries' outputs are dropped by `zigzag_unshard(..., length=L)`.

Not supported: dropout (a rank-independent Philox offset per (query, key) pair would be
needed; it raises NotImplementedError), masks other than key padding.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import _checks, codes, reference
from .ops import attention as op

__all__ = ["ring_attention", "zigzag_shard", "zigzag_unshard", "zigzag_positions", "zigzag_valid", "padded_length"]


def _rank_world(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context parallelism needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    return dist.get_rank(group), dist.get_world_size(group)


# ------------------------------------------------------------------------- the zigzag layout

def padded_length(length: int, world: int) -> int:
    """The smallest multiple of 2 * world that holds `length` positions."""
    return -(-length // (2 * world)) * (2 * world)


def _zigzag_chunks(length: int, rank: int, world: int) -> tuple[int, int, int]:
    c = padded_length(length, world) // (2 * world)
    return c, rank * c, (2 * world - 1 - rank) * c


def zigzag_shard(x: Tensor, dim: int = -2, *, group=None, pad_value: float = 0) -> Tensor:
    """This rank's slice of a whole sequence: x padded along `dim` with pad_value to a multiple
    of 2 * world, chunks r and 2 * world - 1 - r concatenated. (..., L, ...) -> (..., Lp / world, ...)."""
    rank, world = _rank_world(group)
    length = x.size(dim)
    c, first, second = _zigzag_chunks(length, rank, world)
    pad = padded_length(length, world) - length
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat((x, x.new_full(shape, pad_value)), dim)
    return torch.cat((x.narrow(dim, first, c), x.narrow(dim, second, c)), dim)


def zigzag_unshard(local: Tensor, dim: int = -2, *, length: Optional[int] = None, group=None) -> Tensor:
    """The whole sequence from every rank's slice (an all_gather; no autograd), cut to `length`."""
    _, world = _rank_world(group)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local.contiguous(), group=group)
    chunks: list = [None] * (2 * world)
    for r, t in enumerate(gathered):
        chunks[r], chunks[2 * world - 1 - r] = t.chunk(2, dim)
    full = torch.cat(chunks, dim)
    return full if length is None else full.narrow(dim, 0, length)


def zigzag_positions(length: int, *, group=None, device=None) -> Tensor:
    """(Lp / world,) int64: the position in the whole (padded) sequence of each element of this rank's slice."""
    rank, world = _rank_world(group)
    c, first, second = _zigzag_chunks(length, rank, world)
    return torch.cat((torch.arange(first, first + c, device=device), torch.arange(second, second + c, device=device)))


def zigzag_valid(length: int, *, group=None, device=None) -> Tensor:
    """(Lp / world,) bool: True where this rank's slice holds a real position (not padding)."""
    return zigzag_positions(length, group=group, device=device) < length


# ------------------------------------------------------------------------- the ring

class _Ring:
    """Neighbours in the group's ring and one step of passing tensors to the next rank."""

    def __init__(self, group):
        self.group = group
        self.rank, self.world = _rank_world(group)
        whole = group if group is not None else dist.group.WORLD
        self.next = dist.get_global_rank(whole, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(whole, (self.rank - 1) % self.world)

    def start(self, tensors: list) -> tuple[list, list]:
        """Send tensors to the next rank and receive the previous rank's (same shapes) -> (received, requests)."""
        received = [torch.empty_like(t) for t in tensors]  # the senders keep theirs alive until the wait
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group) for r in received]
        return received, dist.batch_isend_irecv(ops)

    def pass_on(self, tensors: list) -> list:
        received, requests = self.start(tensors)
        for r in requests:
            r.wait()
        return received


def _steps(rank: int, world: int, lq: int, lk: int, causal: bool):
    """For each ring step: (query rows, key columns, causal kind) of the K/V slice that then
    arrives (from rank - step).

    Zigzag causal: the own slice is causal as a whole (both halves keep their order); an
    earlier rank's slice is seen entirely by both local chunks through its first chunk only
    (its second chunk comes after both); a later rank's slice is seen entirely, by the second
    local chunk only."""
    everything = slice(0, None)
    for step in range(world):
        src = (rank - step) % world
        if not causal:
            yield everything, everything, codes.CausalKind.NONE
        elif step == 0:
            yield everything, everything, codes.CausalKind.UPPER_LEFT
        elif src < rank:
            yield everything, slice(0, lk // 2), codes.CausalKind.NONE
        else:
            yield slice(lq // 2, None), everything, codes.CausalKind.NONE


def _block_mask(key_mask: Optional[Tensor], kind: int, hq: int, rows: int, cols: slice) -> Optional[Tensor]:
    """The travelling (B, Lk) key mask -> the kernels' (B, Hq, rows, cols) broadcast view."""
    if key_mask is None:
        return None
    m = key_mask.view(torch.bool) if kind == codes.MaskKind.BOOL else key_mask
    m = m[:, cols]
    return m[:, None, None, :].expand(m.size(0), hq, rows, m.size(1))


def _ring_blocks(q, k, v, key_mask, kind, causal, ring):
    """One turn of the ring, the pass forward and backward share: yields, for every K/V slice
    in the order it arrives, (query rows, key columns, causal kind, k, v, mask) of this rank's
    block of work on it; the next slice is in flight while the caller computes on this one."""
    H, lq = q.size(1), q.size(2)
    travelling = [k.contiguous(), v.contiguous()] + ([key_mask] if key_mask is not None else [])
    for step, (rows, cols, causal_kind) in enumerate(_steps(ring.rank, ring.world, lq, k.size(2), causal)):
        last = step + 1 == ring.world
        if not last:
            incoming, requests = ring.start(travelling)
        mask = _block_mask(travelling[2] if key_mask is not None else None, kind, H, len(range(lq)[rows]), cols)
        yield rows, cols, causal_kind, travelling[0][:, :, cols], travelling[1][:, :, cols], mask
        if not last:
            for r in requests:
                r.wait()
            travelling = incoming


def _ring_forward(q, k, v, key_mask, kind, causal, scale, backend, ring):
    B, H, lq, _ = q.shape
    out = torch.zeros(B, H, lq, v.size(-1), dtype=codes.stats_dtype(q.dtype), device=q.device)
    lse = torch.full((B, H, lq), float("-inf"), dtype=out.dtype, device=q.device)
    for rows, _, causal_kind, kb, vb, mb in _ring_blocks(q, k, v, key_mask, kind, causal, ring):
        ob, lb = op.block_forward(q[:, :, rows], kb, vb, mb, kind, causal_kind, scale, backend)
        out[:, :, rows], lse[:, :, rows] = op.merge_partials([out[:, :, rows], ob], [lse[:, :, rows], lb])
    return out.to(q.dtype), lse


def _ring_backward(dout, q, k, v, out, lse, key_mask, kind, causal, scale, backend, ring):
    acc = codes.stats_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    # each K/V slice travels with the sum of the gradients every rank so far computed for it
    dkv = [torch.zeros(k.shape, dtype=acc, device=k.device), torch.zeros(v.shape, dtype=acc, device=v.device)]
    for rows, cols, causal_kind, kb, vb, mb in _ring_blocks(q, k, v, key_mask, kind, causal, ring):
        dqb, dkb, dvb = op.block_backward(dout[:, :, rows], q[:, :, rows], kb, vb, out[:, :, rows], lse[:, :, rows],
                                          mb, kind, causal_kind, scale, backend)
        dq[:, :, rows] += dqb
        dkv[0][:, :, cols] += dkb
        dkv[1][:, :, cols] += dvb
        if ring.world > 1:  # after the last step this delivers each slice's total to its owner
            dkv = ring.pass_on(dkv)
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_mask, kind, causal, scale, backend, ring):
        out, lse = _ring_forward(q, k, v, key_mask, kind, causal, scale, backend, ring)
        ctx.save_for_backward(q, k, v, key_mask, out, lse)
        ctx.args = (kind, causal, scale, backend, ring)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, key_mask, out, lse = ctx.saved_tensors
        kind, causal, scale, backend, ring = ctx.args
        dq, dk, dv = _ring_backward(dout, q, k, v, out, lse, key_mask, kind, causal, scale, backend, ring)
        return dq, dk, dv, None, None, None, None, None, None


def _key_padding(attn_mask, query: Tensor, key: Tensor) -> tuple[Optional[Tensor], int]:
    """attn_mask broadcastable to (B, 1, 1, Lk) -> the (B, Lk) tensor that travels with the keys
    (bool as uint8: what every backend of torch.distributed sends) and its codes.MaskKind."""
    if attn_mask is None:
        return None, codes.MaskKind.NONE
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a bool or float key-padding tensor or None, got {type(attn_mask).__name__}")
    B, lk = query.size(0), key.size(2)
    if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
        raise TypeError(f"attn_mask must be bool or query's dtype ({query.dtype}), got {_checks.describe(attn_mask)}")
    _checks.same_device("attn_mask", attn_mask, "query", query)
    m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)) if attn_mask.dim() <= 4 else None
    if m is None or m.size(1) != 1 or m.size(2) != 1 or m.size(0) not in (1, B) or m.size(3) != lk:
        raise ValueError(f"ring_attention takes key-padding masks only: attn_mask must broadcast to (B, 1, 1, Lk) = "
                         f"({B}, 1, 1, {lk}) with no head or query dim, got {_checks.describe(attn_mask)}")
    m = m.reshape(m.size(0), lk).expand(B, lk).contiguous()
    if m.dtype == torch.bool:
        return m.view(torch.uint8), codes.MaskKind.BOOL
    return m, codes.MaskKind.FLOAT


def ring_attention(query: Tensor, key: Tensor, value: Tensor, *, group=None, is_causal: bool = False,
                   attn_mask: Optional[Tensor] = None, scale: Optional[float] = None, enable_gqa: bool = False,
                   dropout_p: float = 0.0, backend: str = "auto", return_lse: bool = False):
    """Attention over a sequence split across the ranks of `group` (default: the whole world).

    Each rank passes its slice: query (B, Hq, Lq, D), key (B, Hk, Lk, D), value (B, Hk, Lk, Dv),
    the same shapes on every rank -> its queries' output (B, Hq, Lq, Dv) over every rank's keys,
    and with return_lse=True also their log-sum-exp (B, Hq, Lq) float32 (no gradient).
    is_causal: causal over the whole sequence in the zigzag layout (Lq == Lk, even). attn_mask:
    this rank's key-padding mask, bool (True takes part) or float, broadcastable to (B, 1, 1, Lk);
    it travels with the keys. Backend: any attention backend name; the kernel backends run their
    kernels per block, "torch" and "reference" compute blocks with torch ops. Differentiable in
    query, key and value. Works with the gloo (CPU) and NCCL (GPU) backends of torch.distributed.
    """
    mask_kind, _ = _checks.attention(query, key, value, None, dropout_p, is_causal, scale, enable_gqa)
    if query.dim() != 4:
        raise ValueError(f"ring_attention takes (B, H, L, D) tensors, got query {_checks.describe(query)}")
    if dropout_p != 0.0:
        raise NotImplementedError("ring_attention does not support dropout: each rank would need the Philox "
                                  "offset of every (query, key) pair of the whole sequence; pass dropout_p=0")
    _checks.flag("return_lse", return_lse)
    key_mask, kind = _key_padding(attn_mask, query, key)
    if is_causal and (query.size(2) != key.size(2) or query.size(2) % 2):
        raise ValueError(f"causal ring_attention takes zigzag slices (zigzag_shard): Lq == Lk and even, got query "
                         f"{_checks.describe(query)}, key {_checks.describe(key)}")
    ring = _Ring(group)
    if ring.world > 1:  # every rank must pass the same shapes, or the ring would hang or mix slices
        shape = torch.tensor([*query.shape, *key.shape, value.size(-1), int(kind)], dtype=torch.int64)
        if query.is_cuda:
            shape = shape.to(query.device)
        shapes = [torch.empty_like(shape) for _ in range(ring.world)]
        dist.all_gather(shapes, shape, group=group)
        if any(not torch.equal(s, shape) for s in shapes):
            raise ValueError("ring_attention needs the same query/key/value shapes and mask kind on every rank, got "
                             + "; ".join(f"rank {r}: {s.tolist()}" for r, s in enumerate(shapes)))
    scale = reference.default_scale(query.size(-1)) if scale is None else float(scale)
    mask4 = None if key_mask is None else _block_mask(key_mask, kind, query.size(1), query.size(2), slice(0, None))
    name, _ = op.OP.select(backend, query.device, query=query, key=key, value=value, attn_mask=mask4, dropout_p=0.0,
                           mask_kind={codes.MaskKind.BOOL: "bool", codes.MaskKind.FLOAT: "float"}.get(kind, mask_kind))
    out, lse = _RingAttention.apply(query, key, value, key_mask, int(kind), bool(is_causal), scale, name, ring)
    return (out, lse.float()) if return_lse else out
