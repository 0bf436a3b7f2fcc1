"""Scaled-dot-product attention: autograd over the kernel backends and the dispatch
entries of every backend.

Kernels see (B, H, L, D) tensors of any strides (leading dims flattened into B), a mask
as a (B, Hq, Lq, Lk) broadcast view (stride 0 on broadcast dims: never materialised), a
mask kind (0 none, 1 bool, 2 float) and a causal variant (0 none, 1 upper-left,
2 lower-right). Dropout uses a seed drawn from torch's default generator, so
torch.manual_seed reproduces a run; the seed travels as a 0-d int64 tensor so that
torch.compile keeps it in the graph.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext, codes, dispatch, reference
from ._autograd import apply, call, kernel_op, twin_function

MASK_KINDS = codes.names(codes.MaskKind)
CAUSAL_KINDS = codes.names(codes.CausalKind)
_FLOAT32_MAX = torch.finfo(torch.float32).max


def _kernels(backend: str):
    if backend == "triton":
        from ..triton import attention as k

        return k.attention_fwd, k.attention_bwd
    ops = _ext.backend_ops(backend)
    return ops.attention_fwd, ops.attention_bwd


def _seed_int(seed: Optional[Tensor]) -> int:
    return int(seed.item()) if seed is not None else 0


def _feature_args(window_left: int, window_right: int, softcap: float, alibi: Optional[Tensor]) -> tuple:
    # only kernels whose capability declares a window, softcap or ALiBi receive one (the kernels
    # called without features never see these arguments)
    if (window_left, window_right, softcap) == (-1, -1, 0.0) and alibi is None:
        return ()
    return (window_left, window_right, softcap) + ((alibi,) if alibi is not None else ())


def _kernel_fwd(backend, q, k, v, mask, mask_kind, causal, scale, dropout_p, seed, window_left, window_right,
                softcap, alibi=None):
    return _kernels(backend)[0](q, k, v, mask, mask_kind, causal, scale, dropout_p, _seed_int(seed),
                                *_feature_args(window_left, window_right, softcap, alibi))


def _kernel_bwd(backend, do, q, k, v, out, stats, grad_lse, mask, mask_kind, causal, scale, dropout_p, seed, mask_grad,
                window_left, window_right, softcap, alibi=None):
    return _kernels(backend)[1](do, q, k, v, out, stats, grad_lse, mask, mask_kind, causal, scale, dropout_p,
                                _seed_int(seed), mask_grad, *_feature_args(window_left, window_right, softcap, alibi))


@kernel_op("fused_attn::attention_fwd")
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], mask_kind: int, causal: int,
                  scale: float, dropout_p: float, seed: Optional[Tensor], window_left: int, window_right: int,
                  softcap: float, alibi: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    """q (B, Hq, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv) -> out (B, Hq, Lq, Dv),
    stats (2, B, Hq, Lq) float32 (float64 for float64 inputs): per row the max score (units: STATS_MAX_LOG2) and 1/l
    (0, 0 when fully masked). window_left/right: a sliding window the kernels apply (-1, -1: none);
    softcap > 0: the kernels cap the scores; alibi: None or (B, Hq) float32 ALiBi slopes the kernels
    add (CAPABILITIES)."""
    out, stats = _kernel_fwd(backend, q, k, v, mask, mask_kind, causal, scale, dropout_p, seed, window_left,
                             window_right, softcap, alibi)
    return out, stats


@attention_fwd.register_fake
def _(q, k, v, mask, mask_kind, causal, scale, dropout_p, seed, window_left, window_right, softcap, alibi, backend):
    B, H, Lq, _ = q.shape
    return q.new_empty(B, H, Lq, v.shape[-1]), q.new_empty(2, B, H, Lq, dtype=codes.stats_dtype(q.dtype))


@kernel_op("fused_attn::attention_bwd")
def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, stats: Tensor,
                  grad_lse: Optional[Tensor], mask: Optional[Tensor], mask_kind: int, causal: int, scale: float,
                  dropout_p: float, seed: Optional[Tensor], mask_grad: bool, window_left: int, window_right: int,
                  softcap: float, alibi: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> dq, dk, dv, and dS (B, Hq, Lq, Lk) for a float mask's gradient (empty unless mask_grad).
    grad_lse: None or (B, Hq, Lq) in the stats' dtype, the gradient of each row's log-sum-exp."""
    return tuple(_kernel_bwd(backend, do, q, k, v, out, stats, grad_lse, mask, mask_kind, causal, scale, dropout_p,
                             seed, mask_grad, window_left, window_right, softcap, alibi))


@attention_bwd.register_fake
def _(do, q, k, v, out, stats, grad_lse, mask, mask_kind, causal, scale, dropout_p, seed, mask_grad, window_left,
      window_right, softcap, alibi, backend):
    B, H, Lq, _ = q.shape
    dmask = q.new_empty(B, H, Lq, k.shape[2], dtype=mask.dtype) if mask_grad else q.new_empty(0)
    # every kernel returns contiguous gradients, whatever q/k/v's strides (empty_like would
    # copy a strided view's layout, which the compiled graph then asserts and fails on)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


def _setup_context(ctx, inputs, output):
    (q, k, v, mask, mask_kind, causal, scale, dropout_p, seed, window_left, window_right, softcap, alibi,
     backend) = inputs
    out, stats = output
    # the statistics are differentiable through the row max only: lse_from_stats's log-sum-exp
    # (return_lse=True) is m (in the backend's units) minus log(1/l) taken as a constant
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, out, stats, mask, seed, alibi)
    ctx.args = (mask_kind, causal, scale, dropout_p)
    ctx.features = (window_left, window_right, softcap)
    ctx.backend = backend


def _backward(ctx, dout, dstats):
    q, k, v, out, stats, mask, seed, alibi = ctx.saved_tensors
    mask_kind, causal, scale, dropout_p = ctx.args
    mask_grad = mask is not None and mask_kind == MASK_KINDS["float"] and ctx.needs_input_grad[3]
    grad_lse = None if dstats is None else (dstats[0] / _lse_per_max_unit(ctx.backend)).contiguous()
    dout = torch.zeros_like(out) if dout is None else dout.contiguous()
    args = (dout, q, k, v, out, stats, grad_lse, mask, mask_kind, causal, scale, dropout_p)
    dq, dk, dv, dmask = call(attention_bwd, *args, seed, mask_grad, *ctx.features, alibi, ctx.backend)
    # the slopes reach the kernels only when they need no gradient (_plan)
    return dq, dk, dv, (dmask if mask_grad else None), None, None, None, None, None, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)

_Attention = twin_function(
    "_Attention",
    lambda q, k, v, mask, mask_kind, causal, scale, dropout_p, seed, window_left, window_right, softcap, alibi,
    backend: tuple(_kernel_fwd(backend, q, k, v, mask, mask_kind, causal, scale, dropout_p, seed, window_left,
                               window_right, softcap, alibi)),
    _setup_context, _backward)


# the row max in the kernels' statistics is in log2 units (scaled score * log2(e)) in the
# Triton and CUDA kernels, which use exp2, and in natural units in the CPU kernel
STATS_MAX_LOG2 = {"triton": True, "cuda": True, "cuda_emu": True, "cpu": False}


def _lse_per_max_unit(backend: str) -> float:
    return math.log(2.0) if STATS_MAX_LOG2[backend] else 1.0


def lse_from_stats(stats: Tensor, backend: str, fully_masked: float = 0.0) -> Tensor:
    """A kernel's row statistics (2, B, H, Lq) -> the natural-log log-sum-exp of each row's
    scaled, masked scores (B, H, Lq) in the statistics' dtype; `fully_masked` on a row with no
    key (0: torch's convention; -inf: the log of an empty sum, what merging and return_lse
    need). Differentiable through the row max alone (log(1/l) is taken as a constant), which
    _backward turns back into the log-sum-exp's gradient."""
    m, inv_l = stats[0], stats[1].detach()
    lse = m * _lse_per_max_unit(backend) - torch.log(inv_l)
    return torch.where(inv_l > 0, lse, torch.full_like(lse, fully_masked))


def stats_from_lse(lse: Tensor, backend: str) -> Tensor:
    """The log-sum-exp (B, H, Lq) -> row statistics a backward kernel takes: the row max set
    to the log-sum-exp itself and 1/l = 1, so that exp(s - m) * (1/l) is the probability. A
    fully masked row has every score -inf, so its probabilities are 0 whatever lse holds.
    float64 stays float64 (the cpu kernels' statistics for float64 inputs), the rest float32."""
    lse = lse.to(codes.stats_dtype(lse.dtype))
    m = lse * (1.0 / math.log(2.0)) if STATS_MAX_LOG2[backend] else lse
    return torch.stack((m, torch.ones_like(lse))).contiguous()


# ------------------------------------------------------------------ attention over part of the keys
# Attention over disjoint key sets, each with its log-sum-exp, combines exactly
# (merge_attention): the building block of split-key decoding and of context parallelism
# (fused_attn.distributed). The block functions run without autograd; their backward takes the
# *whole* row's output and log-sum-exp, so each block's gradient is its share of the total.

KERNEL_BACKENDS = ("cpu", "triton", "cuda", "cuda_emu")


def _math_scores(q: Tensor, k: Tensor, mask: Optional[Tensor], mask_kind: int, causal: int,
                 scale: float) -> Tensor:
    """Scaled, masked scores (B, Hq, Lq, Lk) in the statistics dtype (the torch path of the block functions)."""
    ct = codes.stats_dtype(q.dtype)
    if k.size(1) != q.size(1):
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    s = (q.to(ct) @ k.to(ct).transpose(-2, -1)) * scale
    if causal:
        variant = "upper_left" if causal == codes.CausalKind.UPPER_LEFT else "lower_right"
        s = s.masked_fill(~reference.causal_allowed(q.size(2), k.size(2), variant, s.device), float("-inf"))
    if mask_kind == codes.MaskKind.BOOL:
        s = s.masked_fill(~mask, float("-inf"))
    elif mask_kind == codes.MaskKind.FLOAT:
        s = s + mask.to(ct)
    return s


def _finite_or_zero(lse: Tensor) -> Tensor:
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def block_forward(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], mask_kind: int, causal: int,
                  scale: float, backend: str) -> tuple[Tensor, Tensor]:
    """Attention of q over this block of keys, with each row's log-sum-exp.

    q (B, Hq, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv), mask None or a (B, Hq, Lq, Lk) view
    (kind codes.MaskKind), causal a codes.CausalKind -> out (B, Hq, Lq, Dv) in q's dtype, lse
    (B, Hq, Lq) natural log in codes.stats_dtype: -inf where the row has no key in the block.
    A kernel backend runs its forward kernel; any other name computes with torch ops."""
    if backend in KERNEL_BACKENDS:
        out, stats = _kernel_fwd(backend, q, k, v, mask, mask_kind, causal, scale, 0.0, None, -1, -1, 0.0, None)
        return out, lse_from_stats(stats, backend, fully_masked=float("-inf"))
    s = _math_scores(q, k, mask, mask_kind, causal, scale)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - _finite_or_zero(lse)[..., None])
    if v.size(1) != q.size(1):
        v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    return (p @ v.to(p.dtype)).to(q.dtype), lse


def block_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Optional[Tensor],
                   mask_kind: int, causal: int, scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """This block's share of the gradients: do, out (B, Hq, Lq, Dv) and lse (B, Hq, Lq) are the
    whole rows' (over every block of keys), so P = exp(s - lse) is the block's part of the
    softmax -> dq (B, Hq, Lq, D), dk (B, Hk, Lk, D), dv (B, Hk, Lk, Dv) in q's dtype."""
    if backend in KERNEL_BACKENDS:
        # a row with no key anywhere (lse -inf) has every score -inf: any finite lse gives P = 0
        stats = stats_from_lse(_finite_or_zero(lse), backend)
        dq, dk, dv, _ = _kernel_bwd(backend, do.contiguous(), q, k, v, out, stats, None, mask, mask_kind, causal,
                                    scale, 0.0, None, False, -1, -1, 0.0, None)
        return dq, dk, dv
    ct = codes.stats_dtype(q.dtype)
    groups = q.size(1) // k.size(1)
    kr = k.repeat_interleave(groups, dim=1).to(ct) if groups > 1 else k.to(ct)
    vr = v.repeat_interleave(groups, dim=1).to(ct) if groups > 1 else v.to(ct)
    s = _math_scores(q, kr, mask, mask_kind, causal, scale)  # kr has q's heads: no second repeat
    p = torch.exp(s - _finite_or_zero(lse.to(ct))[..., None])
    do_c = do.to(ct)
    dv = p.transpose(-2, -1) @ do_c
    dp = do_c @ vr.transpose(-2, -1)
    ds = p * (dp - (do_c * out.to(ct)).sum(-1, keepdim=True))
    dq = (ds @ kr) * scale
    dk = (ds.transpose(-2, -1) @ q.to(ct)) * scale
    if groups > 1:
        dk = dk.unflatten(1, (k.size(1), groups)).sum(2)
        dv = dv.unflatten(1, (k.size(1), groups)).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def merge_partials(outs: list, lses: list) -> tuple[Tensor, Tensor]:
    """out = sum_i exp(lse_i - lse) out_i, lse = log sum_i exp(lse_i), in float32 (float64 for
    float64 parts); rows empty in every part give 0 and -inf. Differentiable."""
    ct = torch.float64 if any(t.dtype == torch.float64 for t in (*outs, *lses)) else torch.float32
    stacked = torch.stack([x.to(ct) for x in lses])
    # log-sum-exp written out so that no inf - inf or log(0) appears, not even in a branch
    # torch.where does not select (its NaN would still reach the gradient): an empty row
    # (every part -inf) gets lse -inf, weights exp(-inf) = 0 and zero gradients
    m = _finite_or_zero(stacked.detach().amax(dim=0))
    total = torch.exp(stacked - m).sum(dim=0)
    nonempty = total > 0
    lse = torch.where(nonempty, m + torch.log(torch.where(nonempty, total, torch.ones_like(total))),
                      torch.full_like(total, float("-inf")))
    weights = torch.exp(stacked - _finite_or_zero(lse))
    out = sum(w[..., None] * o.to(ct) for w, o in zip(weights, outs))
    return out.to(outs[0].dtype), lse


def draw_seed() -> Tensor:
    """A dropout seed from torch's default generator (torch.manual_seed reproduces it)."""
    return torch.randint(0, 2 ** 62, (), dtype=torch.int64)


def _to_4d(t: Tensor) -> Tensor:
    """(..., L, D) -> (B, H, L, D) as a view where the strides allow."""
    nd = t.dim()
    if nd == 4:
        return t
    if nd == 2:
        return t.unsqueeze(0).unsqueeze(0)
    if nd == 3:
        return t.unsqueeze(0)
    return t.reshape(-1, *t.shape[-3:])


def _mask_4d(mask: Tensor, full: tuple) -> Tensor:
    """mask broadcast to full = (*batch, H, Lq, Lk) as a (B, H, Lq, Lk) view with stride 0
    on broadcast dims. Leading batch dims that cannot merge into one (a (B1, 1, 1, 1, Lk)
    padding mask under (B1, B2, ...) inputs) are copied at the mask's own size, never at
    full size."""
    if len(full) <= 4:
        m = mask.expand(full)  # a view: broadcast dims get stride 0
        return m if len(full) == 4 else m.reshape(1, -1, *full[-2:])
    m = mask.reshape((1,) * (len(full) - mask.dim()) + tuple(mask.shape))
    try:
        return m.expand(full).view(-1, *full[-3:])
    except RuntimeError:  # the batch dims' strides do not merge
        inner = tuple(m.shape[-3:])
        m = m.expand(*full[:-3], *inner).reshape(-1, *inner)  # batch * the mask's own (H, Lq, Lk) sizes
        return m.expand(m.shape[0], *full[-3:])


def kernel_slopes(alibi_slopes: Tensor, batch: int, heads: int) -> Tensor:
    """ALiBi slopes (Hq,) or (B, Hq) as the kernels take them: (B, Hq) float32 with a unit head
    stride, a view (batch stride 0) when the batch shares them."""
    slopes = alibi_slopes.to(torch.float32).expand(batch, heads)
    return slopes if slopes.stride(1) == 1 else slopes.contiguous()


def _run_kernels(backend: str):
    def run(query, key, value, attn_mask, dropout_p, scale, enable_gqa, mask_kind, causal, return_lse=False,
            softcap=0.0, window=(-1, -1), alibi=None):
        """window, softcap, alibi (slopes (Hq,) or (B, Hq)): applied by the kernels themselves
        (CAPABILITIES[backend])."""
        qs = query.shape
        lk = key.shape[-2]
        if query.numel() == 0 or lk == 0 or value.shape[-1] == 0:
            # nothing to compute, or every row fully masked (no keys): the reference is exact and cheap here
            return _run_reference(query, key, value, attn_mask, dropout_p, scale, enable_gqa, mask_kind, causal,
                                  return_lse, softcap, window=window, alibi=alibi)
        q4, k4, v4 = _to_4d(query), _to_4d(key), _to_4d(value)
        mask4 = _mask_4d(attn_mask, (*qs[:-1], lk)) if mask_kind in ("bool", "float") else None
        kind = MASK_KINDS.get(mask_kind, 0)
        scale = reference.default_scale(qs[-1]) if scale is None else float(scale)
        while abs(scale) > _FLOAT32_MAX:  # the kernels take a float32 scale: move powers of two into q
            q4, scale = q4 * 2.0 ** 64, scale / 2.0 ** 64
        seed = draw_seed() if dropout_p > 0 else None
        if alibi is not None:
            alibi = kernel_slopes(alibi, q4.size(0), q4.size(1))
        out, stats = apply(attention_fwd, _Attention, q4, k4, v4, mask4, kind, CAUSAL_KINDS[causal], scale,
                           float(dropout_p), seed, int(window[0]), int(window[1]), float(softcap), alibi, backend)
        out = out if len(qs) == 4 else out.reshape(*qs[:-1], value.shape[-1])
        if not return_lse:
            return out
        lse = lse_from_stats(stats, backend, fully_masked=float("-inf"))
        return out, (lse if len(qs) == 4 else lse.reshape(qs[:-1]))

    return run


def _run_torch(query, key, value, attn_mask, dropout_p, scale, enable_gqa, mask_kind, causal, return_lse=False,
               softcap=0.0):
    if return_lse or softcap:  # torch's SDPA has neither: plain torch ops (the reference) compute them
        return _run_reference(query, key, value, attn_mask, dropout_p, scale, enable_gqa, mask_kind, causal,
                              return_lse, softcap)
    kwargs = {"enable_gqa": True} if enable_gqa else {}
    if attn_mask is not None and attn_mask.dim() < 2:
        # torch's math path (float64, ...) indexes dim -2 of the mask: broadcast it (a view)
        attn_mask = attn_mask.expand(query.size(-2), key.size(-2))
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=(causal == "upper_left" and mask_kind != "causal"), scale=scale,
                                          **kwargs)


def _run_reference(query, key, value, attn_mask, dropout_p, scale, enable_gqa, mask_kind, causal, return_lse=False,
                   softcap=0.0, window=(-1, -1), alibi=None):
    keep = None
    if dropout_p > 0:
        shape = (*query.shape[:-1], key.size(-2))
        keep = torch.rand(shape, device=query.device) >= dropout_p
    return reference.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
        is_causal=(causal == "upper_left" and mask_kind != "causal"), scale=scale, enable_gqa=enable_gqa,
        dropout_mask=keep, return_lse=return_lse, softcap=softcap, window_size=window, alibi_slopes=alibi)


# what each kernel backend takes (the torch and reference backends take everything)
_CUDA_CAPABILITY = dispatch.Capability(codes.KERNEL_DTYPES["cuda"], head_dims=_ext.cuda_head_dims,
                                       sliding_window=True, softcap=True, alibi=True)
CAPABILITIES = {
    "cpu": dispatch.Capability(codes.KERNEL_DTYPES["cpu"], sliding_window=True, softcap=True, alibi=True),
    "triton": dispatch.Capability(codes.KERNEL_DTYPES["triton"], max_head_dim=256, sliding_window=True,
                                  softcap=True, alibi=True),
    "cuda": _CUDA_CAPABILITY,
    "cuda_emu": _CUDA_CAPABILITY,
}


def _supports_kernels(backend: str):
    def supports(query, key, value, attn_mask, dropout_p, mask_kind, softcap=0.0, alibi=False, **_):
        out = CAPABILITIES[backend].problems(query.dtype, head_dims=(query.size(-1), value.size(-1)))
        out += dispatch.softcap_problems(CAPABILITIES, backend, softcap)
        if backend == "triton" and not dispatch.triton_interpreting() and not out:
            from ..triton import attention as k

            why = k.unsupported(k.head_size(max(query.size(-1), value.size(-1))), query.dtype,
                                MASK_KINDS.get(mask_kind, 0), dropout_p > 0, bool(softcap) or alibi)
            if why:
                out.append(why)
        if dropout_p > 0:
            out += dropout_counter_problems(query.size(-2), key.size(-2), "Lq * Lk")
        return out

    return supports


# the kernels' dropout draws element (row, col) of a (rows, cols) matrix from the Philox
# stream at counter row * cols + col, a 32-bit number: past 2**32 the keep-mask would repeat
DROPOUT_COUNTER_LIMIT = 2 ** 32


def dropout_counter_problems(rows: int, cols: int, what: str) -> list[str]:
    """Why the kernels' dropout cannot cover a (rows, cols) matrix ([] when it can)."""
    if rows * cols >= DROPOUT_COUNTER_LIMIT:
        return [f"dropout needs {what} < 2**32 (32-bit Philox counters), got {rows} * {cols}"]
    return []


def _supports_anything(**_inputs):
    return []


def lower_features(query: Tensor, key: Tensor, attn_mask, is_causal: bool, window_size, alibi_slopes):
    """A sliding window and ALiBi as the mask every backend reads: -> (attn_mask, is_causal).

    The window (and any causal mask or bool mask) becomes one bool mask; with ALiBi, a float
    mask holding the bias (+ a float attn_mask), -inf where not allowed. Semantics:
    reference.window_allowed, reference.alibi_bias. The mask is materialised at
    (Lq, Lk) per head (ALiBi) or shared (window): no key block is skipped yet."""
    if tuple(window_size) == (-1, -1) and alibi_slopes is None:
        return attn_mask, is_causal
    lq, lk, dev = query.size(-2), key.size(-2), query.device
    allowed = None
    variant = "upper_left" if is_causal else reference.causal_variant(attn_mask)
    if variant is not None:
        allowed, attn_mask = reference.causal_allowed(lq, lk, variant, dev), None
    if tuple(window_size) != (-1, -1):
        window = reference.window_allowed(lq, lk, window_size, dev)
        allowed = window if allowed is None else allowed & window
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed, attn_mask = (attn_mask if allowed is None else attn_mask & allowed), None
    if alibi_slopes is None:
        if attn_mask is None:
            return allowed, False
        return (attn_mask if allowed is None else attn_mask.masked_fill(~allowed, float("-inf"))), False
    bias = reference.alibi_bias(alibi_slopes.to(query.dtype), lq, lk)
    if attn_mask is not None:
        bias = bias + attn_mask
    if allowed is not None:
        bias = bias.masked_fill(~allowed, float("-inf"))
    return bias, False


def _native_alibi(query, alibi_slopes) -> bool:
    """Whether slopes may reach a kernel that adds ALiBi itself: the kernels take float32 slopes
    and return no gradient for them, so slopes that need one, or float64 slopes with float64
    inputs (float32 would round them), go into the float mask instead."""
    if alibi_slopes is None or (alibi_slopes.requires_grad and torch.is_grad_enabled()):
        return False
    return not (alibi_slopes.dtype == torch.float64 and query.dtype == torch.float64)


def _plan(backend, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size, softcap,
          alibi_slopes):
    """How the public arguments reach a backend -> (inputs for OP.select / OP.reasons, the
    lowered mask, the causal variant, the features the kernels apply themselves). A window or
    ALiBi goes to a backend that applies it itself (key blocks outside a window skipped, no
    (Lq, Lk) bias), else into the mask."""
    from .. import _checks

    window = tuple(window_size)
    # the features a kernel may apply itself, with the Capability field that says it does
    native = {name: field for name, field, wanted in (("window", "sliding_window", window != (-1, -1)),
                                                      ("alibi", "alibi", _native_alibi(query, alibi_slopes)))
              if wanted}
    while True:
        lowered, lowered_causal = lower_features(query, key, attn_mask, is_causal,
                                                 (-1, -1) if "window" in native else window,
                                                 None if "alibi" in native else alibi_slopes)
        mask_kind, causal = _checks.attention(query, key, value, lowered, dropout_p, lowered_causal, scale,
                                              enable_gqa)
        inputs = dict(query=query, key=key, value=value, attn_mask=lowered, dropout_p=dropout_p,
                      mask_kind=mask_kind, softcap=softcap, alibi="alibi" in native)
        if not native:
            return inputs, lowered, causal, ({"softcap": softcap} if softcap else {})
        try:
            capability = CAPABILITIES.get(OP.choose(backend, query.device, **inputs))
        except NotImplementedError:
            capability = None
        kept = {name: field for name, field in native.items() if getattr(capability, field, False)}
        if kept == native:
            extra = {"softcap": softcap} if softcap else {}
            if "window" in native:
                extra["window"] = window
            if "alibi" in native:
                extra["alibi"] = alibi_slopes
            return inputs, lowered, causal, extra
        native = kept  # lower what the chosen backend does not apply, and choose again


def reasons(backend: str, query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
            enable_gqa: bool = False, *, window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None) -> list:
    """Every reason `backend` cannot run scaled_dot_product_attention on these public arguments
    here ([]: it can), deciding mask kinds and features as the public function does."""
    inputs, *_ = _plan(backend, query, key, value, attn_mask, dropout_p, is_causal, None, enable_gqa, window_size,
                       softcap, alibi_slopes)
    return OP.reasons(backend, query.device, **inputs)


def attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, *, window_size=(-1, -1),
              softcap=0.0, alibi_slopes=None, sinks=None, return_lse=False, backend="auto"):
    """The public function's body after validation: features lowered, a backend selected and
    run; sinks join each row's softmax as a part with output 0 and log-sum-exp sink[h]
    (merge_partials: exact, and its gradient is the sink's)."""
    inputs, attn_mask, causal, extra = _plan(backend, query, key, value, attn_mask, dropout_p, is_causal, scale,
                                             enable_gqa, window_size, softcap, alibi_slopes)
    _, impl = OP.select(backend, query.device, **inputs)
    need_lse = return_lse or sinks is not None
    result = impl(query, key, value, attn_mask, dropout_p, scale, enable_gqa, inputs["mask_kind"], causal,
                  **({"return_lse": True} if need_lse else {}), **extra)
    if sinks is None:
        return result
    out, lse = result
    sink_lse = sinks.to(lse.dtype)[:, None].expand(lse.shape)
    out, lse = merge_partials([out, torch.zeros_like(out)], [lse, sink_lse])
    return (out, lse) if return_lse else out


OP = dispatch.Op("scaled_dot_product_attention",
                 auto_order={"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")})
for _name in ("cuda", "triton", "cpu", "cuda_emu"):
    OP.register(_name, _supports_kernels(_name), _run_kernels(_name))
OP.register("torch", _supports_anything, _run_torch)
OP.register("reference", _supports_anything, _run_reference)


def dropout_keep_mask(backend: str, seed: Tensor, B: int, H: int, Lq: int, Lk: int, dropout_p: float,
                      device) -> Tensor:
    """The (B, H, Lq, Lk) keep-mask backend `backend` applies for `seed` (test-only path)."""
    if backend == "triton":
        from ..triton import attention as k

        return k.dropout_keep_mask(_seed_int(seed), B, H, Lq, Lk, dropout_p, device)
    return _ext.ops().attention_dropout_mask(_seed_int(seed), B, H, Lq, Lk, dropout_p).to(device)
