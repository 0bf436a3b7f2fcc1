"""fused_attn as a provider of torch's scaled-dot-product-attention kernels: unmodified code
calling ``F.scaled_dot_product_attention`` (``nn.MultiheadAttention``,
``nn.TransformerEncoder``, Hugging Face models in ``"sdpa"`` mode) runs fused_attn's kernels.

    fused_attn.activate()        # or torch.nn.attention.activate_flash_attention_impl("fused_attn")
    ...                          # F.scaled_dot_product_attention now runs our kernels
    fused_attn.deactivate()      # or torch.nn.attention.restore_flash_attention_impl()
    with fused_attn.activated(): ...

``FUSED_ATTN_SDPA=1`` (or a backend name) activates it when fused_attn is imported; nothing
else does. Activation overrides, in torch's dispatcher, the flash-attention ops torch's SDPA
routes to:

- CPU: ``aten::_scaled_dot_product_flash_attention_for_cpu`` and its backward (float masks,
  GQA, causal, scale);
- CUDA: ``aten::_scaled_dot_product_flash_attention`` and its backward, and the dense form of
  ``aten::_flash_attention_forward`` / ``_flash_attention_backward``.

Inputs our kernels would treat differently from torch's kernel run torch's own kernel
instead, never an error: dropout (a different random stream), dtypes a backend lacks
(float64 on CUDA), causal with Lq != Lk on CUDA (the flash kernel aligns it bottom-right), packed
sequences, windows, ALiBi, debug masks. ``calls`` counts each path: ``calls["cpu"]`` kernel
calls by backend, ``calls["fallback"]`` and ``fallback_reasons`` the rest. torch's logsumexp
convention is kept (natural log per query row, (B, H, Lq) float32 (float64 for float64 inputs); 0 on a row with every
key masked, whose output is 0), so a backward can take a forward from either path.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections import Counter
from typing import Optional

import torch
from torch import Tensor

from . import reference

NAME = "fused_attn"
ENV_VAR = "FUSED_ATTN_SDPA"
KERNEL_BACKENDS = ("cpu", "cuda", "triton", "cuda_emu")
calls: Counter = Counter()  # backend name or "fallback" -> calls since the last reset()
fallback_reasons: Counter = Counter()  # why torch's kernel ran -> count

def reset() -> None:
    """Zero the call counters."""
    calls.clear()
    fallback_reasons.clear()


# --- the kernels, below autograd ------------------------------------------------------------

def _select(query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor],
            dropout_p: float) -> tuple[Optional[str], str]:
    """(kernel backend, '') when one of ours takes these inputs, else (None, why not)."""
    from .ops import attention as op

    if dropout_p > 0:
        return None, "dropout (our kernels draw a different random stream than torch's)"
    if query.numel() == 0 or key.size(-2) == 0:
        return None, "empty inputs"
    if mask is not None and (mask.dtype != query.dtype or mask.requires_grad):
        return None, f"attn_mask of dtype {mask.dtype} (float masks of the query's dtype only)"
    mask_kind = "none" if mask is None else "float"
    try:
        name, _ = op.OP.select(_state["backend"], query.device, query=query, key=key, value=value, attn_mask=mask,
                               dropout_p=dropout_p, mask_kind=mask_kind)
    except NotImplementedError as e:
        return None, str(e)
    if name not in KERNEL_BACKENDS:  # auto found none of ours: say why each declined
        tried = [b for b in op.OP.auto_order.get(query.device.type, ()) if b in KERNEL_BACKENDS]
        return None, " | ".join(f"{b}: " + "; ".join(op.OP.reasons(b, query.device, query=query, key=key, value=value,
                                                                    attn_mask=mask, dropout_p=dropout_p,
                                                                    mask_kind=mask_kind)) for b in tried)
    return name, ""


def _fallback(why: str) -> None:
    calls["fallback"] += 1
    fallback_reasons[why] += 1


def _kernel_args(q: Tensor, k: Tensor, mask: Optional[Tensor], scale: Optional[float]):
    """(mask as a (B, Hq, Lq, Lk) broadcast view or None, its kind code, the float scale)."""
    from .ops import attention as op

    B, H, Lq, D = q.shape
    mask4 = op._mask_4d(mask, (B, H, Lq, k.size(2))) if mask is not None else None
    kind = op.MASK_KINDS["float" if mask is not None else "none"]
    return mask4, kind, reference.default_scale(D) if scale is None else float(scale)


def _forward(backend: str, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: int,
             scale: Optional[float]) -> tuple[Tensor, Tensor]:
    """q (B, Hq, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv), mask broadcastable to
    (B, Hq, Lq, Lk) -> out (B, Hq, Lq, Dv), logsumexp (B, Hq, Lq) float32."""
    from .ops import attention as op

    mask4, kind, scale = _kernel_args(q, k, mask, scale)
    out, stats = op._kernels(backend)[0](q, k, v, mask4, kind, causal, scale, 0.0, 0)
    calls[backend] += 1
    return out, op.lse_from_stats(stats, backend)


def _backward(backend: str, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              mask: Optional[Tensor], causal: int, scale: Optional[float]) -> tuple[Tensor, Tensor, Tensor]:
    """-> dq, dk, dv (contiguous), from the forward's out and torch-convention logsumexp."""
    from .ops import attention as op

    if grad_out is None:  # autograd passes no output gradient (gradcheck tries it): zero gradients
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    mask4, kind, scale = _kernel_args(q, k, mask, scale)
    stats = op.stats_from_lse(lse, backend)
    dq, dk, dv, _ = op._kernels(backend)[1](grad_out.contiguous(), q, k, v, out, stats, None, mask4, kind, causal,
                                            scale, 0.0, 0, False)
    calls[backend] += 1
    return dq, dk, dv


def _into(like: Tensor, src: Tensor, permutation: Optional[tuple] = None) -> Tensor:
    """src copied into a tensor with the layout torch's kernel (and its meta function) gives."""
    dst = torch.empty_permuted(like.shape, permutation, dtype=like.dtype, device=like.device) if permutation \
        else torch.empty_like(like)
    return dst.copy_(src)


# --- CPU: aten::_scaled_dot_product_flash_attention_for_cpu ---------------------------------

def _cpu_decision(query, key, value, mask, dropout_p) -> tuple[Optional[str], str]:
    if value.size(-1) != query.size(-1):  # torch's CPU flash op returns out like query
        return None, "value head dim differs from the query's"
    return _select(query, key, value, mask, dropout_p)


def cpu_forward(keyset, query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    """aten::_scaled_dot_product_flash_attention_for_cpu -> (out like query, logsumexp (B, H, Lq)
    laid out as torch's (B, Lq, H) transposed)."""
    backend, why = _cpu_decision(query, key, value, attn_mask, dropout_p)
    if backend is None:
        _fallback(why)
        return _original["cpu_fwd"].call_boxed(keyset, query, key, value, dropout_p, is_causal,
                                               attn_mask=attn_mask, scale=scale)
    out, lse = _forward(backend, query, key, value, attn_mask, int(bool(is_causal)), scale)
    B, H, Lq = lse.shape
    # torch's accumulation type: float32, float64 for float64 inputs (our stats' dtype too)
    lse_out = torch.empty(B, Lq, H, dtype=lse.dtype, device=lse.device).transpose(1, 2).copy_(lse)
    return _into(query, out), lse_out


def cpu_backward(keyset, grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *, attn_mask=None,
                 scale=None):
    """aten::_scaled_dot_product_flash_attention_for_cpu_backward -> dq, dk, dv in torch's
    CPU gradient layout ((B, L, H, D) memory)."""
    backend, why = _cpu_decision(query, key, value, attn_mask, dropout_p)
    if backend is None:
        _fallback(why)
        return _original["cpu_bwd"].call_boxed(keyset, grad_out, query, key, value, out, logsumexp, dropout_p,
                                               is_causal, attn_mask=attn_mask, scale=scale)
    dq, dk, dv = _backward(backend, grad_out, query, key, value, out, logsumexp, attn_mask, int(bool(is_causal)), scale)
    perm = (0, 2, 1, 3)
    return _into(query, dq, perm), _into(key, dk, perm), _into(value, dv, perm)


# --- CUDA: aten::_scaled_dot_product_flash_attention, aten::_flash_attention_* ---------------

def _cuda_causal(is_causal: bool, lq: int, lk: int) -> tuple[Optional[int], str]:
    """Our causal code, or None: torch's flash kernel aligns causal bottom-right when Lq != Lk,
    which torch's SDPA never asks of it (it picks another kernel), so those run torch's."""
    if is_causal and lq != lk:
        return None, "causal with Lq != Lk (torch's flash kernel aligns it bottom-right)"
    return int(bool(is_causal)), ""


def _cuda_decision(problem: str, is_causal: bool, q: Tensor, k: Tensor, v: Tensor,
                   dropout_p: float) -> tuple[Optional[str], Optional[int], str]:
    """(kernel backend, causal code, '') for a CUDA override's (B, H, L, D) inputs, or
    (None, None, why torch's kernel runs) given the op's own problem ('' when none)."""
    if problem:
        return None, None, problem
    causal, why = _cuda_causal(is_causal, q.size(2), k.size(2))
    if causal is None:
        return None, None, why
    backend, why = _select(q, k, v, None, dropout_p)
    return backend, causal, why


def _rng_state(device) -> tuple[Tensor, Tensor]:
    return torch.zeros(2, dtype=torch.uint64, device=device), torch.zeros((), dtype=torch.uint64, device=device)


def sdpa_flash_forward(keyset, query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *,
                       scale=None):
    """aten::_scaled_dot_product_flash_attention: (B, H, L, D) inputs -> (out, logsumexp (B, H, Lq),
    None, None, max_q, max_k, rng_state, offset, debug_mask)."""
    backend, causal, why = _cuda_decision("return_debug_mask" if return_debug_mask else "", is_causal, query, key,
                                          value, dropout_p)
    if backend is None:
        _fallback(why)
        return _original["sdpa_flash_fwd"].call_boxed(keyset, query, key, value, dropout_p, is_causal,
                                                      return_debug_mask, scale=scale)
    out, lse = _forward(backend, query, key, value, None, causal, scale)
    seed, offset = _rng_state(query.device)
    return (_into(query, out), lse.contiguous(), None, None, query.size(2), key.size(2), seed, offset,
            query.new_empty(0))


def sdpa_flash_backward(keyset, grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k,
                        dropout_p, is_causal, philox_seed, philox_offset, *, scale=None):
    """aten::_scaled_dot_product_flash_attention_backward -> dq, dk, dv like q, k, v."""
    backend, causal, why = _cuda_decision("", is_causal, query, key, value, dropout_p)
    if backend is None:
        _fallback(why)
        return _original["sdpa_flash_bwd"].call_boxed(keyset, grad_out, query, key, value, out, logsumexp, cum_seq_q,
                                                      cum_seq_k, max_q, max_k, dropout_p, is_causal, philox_seed,
                                                      philox_offset, scale=scale)
    dq, dk, dv = _backward(backend, grad_out, query, key, value, out, logsumexp, None, causal, scale)
    return _into(query, dq), _into(key, dk), _into(value, dv)


def _dense_flash_problem(cum_seq_q, window_size_left, window_size_right, extra: dict) -> str:
    if cum_seq_q is not None:
        return "packed variable-length sequences (cum_seq_q)"
    if window_size_left not in (None, -1) or window_size_right not in (None, -1):
        return "sliding windows"
    for name, value in extra.items():
        if value is not None:
            return name
    return ""


def flash_forward(keyset, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                  return_debug_mask, *, scale=None, window_size_left=None, window_size_right=None, seqused_k=None,
                  alibi_slopes=None, **more):
    """aten::_flash_attention_forward, dense (B, L, H, D) inputs -> (out (B, Lq, H, Dv),
    logsumexp (B, H, Lq), rng_state, unused, debug_mask)."""
    why = _dense_flash_problem(cum_seq_q, window_size_left, window_size_right,
                               {"seqused_k": seqused_k, "alibi_slopes": alibi_slopes, **more})
    why = why or ("return_debug_mask" if return_debug_mask else "")
    backend, causal, why = _cuda_decision(why, is_causal, query.transpose(1, 2), key.transpose(1, 2),
                                          value.transpose(1, 2), dropout_p)
    if backend is None:
        _fallback(why)
        return _original["flash_fwd"].call_boxed(keyset, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k,
                                                 dropout_p, is_causal, return_debug_mask, scale=scale,
                                                 window_size_left=window_size_left,
                                                 window_size_right=window_size_right, seqused_k=seqused_k,
                                                 alibi_slopes=alibi_slopes, **more)
    out, lse = _forward(backend, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), None, causal,
                        scale)
    seed, offset = _rng_state(query.device)
    return out.transpose(1, 2).contiguous(), lse.contiguous(), seed, offset, query.new_empty(0)


def flash_backward(keyset, grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k,
                   dropout_p, is_causal, rng_state, unused, *, scale=None, window_size_left=None,
                   window_size_right=None):
    """aten::_flash_attention_backward, dense (B, L, H, D) -> dq, dk, dv like q, k, v."""
    backend, causal, why = _cuda_decision(_dense_flash_problem(cum_seq_q, window_size_left, window_size_right, {}),
                                          is_causal, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                          dropout_p)
    if backend is None:
        _fallback(why)
        return _original["flash_bwd"].call_boxed(keyset, grad_out, query, key, value, out, logsumexp, cum_seq_q,
                                                 cum_seq_k, max_q, max_k, dropout_p, is_causal, rng_state, unused,
                                                 scale=scale, window_size_left=window_size_left,
                                                 window_size_right=window_size_right)
    t = lambda x: x.transpose(1, 2)  # noqa: E731  (B, L, H, D) <-> (B, H, L, D) views
    dq, dk, dv = _backward(backend, t(grad_out), t(query), t(key), t(value), t(out), logsumexp, None, causal, scale)
    return _into(query, t(dq)), _into(key, t(dk)), _into(value, t(dv))


# --- activation -----------------------------------------------------------------------------

# (name in _original, aten op, dispatch key, implementation)
OVERRIDES = (
    ("cpu_fwd", "aten::_scaled_dot_product_flash_attention_for_cpu", "CPU", cpu_forward),
    ("cpu_bwd", "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "CPU", cpu_backward),
    ("sdpa_flash_fwd", "aten::_scaled_dot_product_flash_attention", "CUDA", sdpa_flash_forward),
    ("sdpa_flash_bwd", "aten::_scaled_dot_product_flash_attention_backward", "CUDA", sdpa_flash_backward),
    ("flash_fwd", "aten::_flash_attention_forward", "CUDA", flash_forward),
    ("flash_bwd", "aten::_flash_attention_backward", "CUDA", flash_backward),
)
_original: dict = {}
_state: dict = {"backend": "auto", "handle": None}


class _Handle:
    """What activation installed (torch's registry keeps it and calls remove() to restore)."""

    def __init__(self, libraries: list):
        self.libraries = libraries

    def remove(self) -> None:
        for lib in self.libraries:
            lib._destroy()
        self.libraries = []
        _original.clear()
        if _state["handle"] is self:
            _state["handle"] = None


def _install() -> _Handle:
    """Override the ops in torch's dispatcher, keeping each original kernel for the fallback."""
    if not hasattr(torch.library, "get_kernel"):
        raise RuntimeError(f"torch {torch.__version__} lacks torch.library.get_kernel, which the fallback to "
                           "torch's own kernels needs (torch >= 2.9)")
    if _state["handle"] is not None:
        _state["handle"].remove()
    libraries = {}
    for name, op, key, impl in OVERRIDES:
        _original[name] = torch.library.get_kernel(op, key)
        if key not in libraries:
            libraries[key] = torch.library.Library("aten", "IMPL", key)
        with warnings.catch_warnings():  # "overriding a previously registered kernel": that is the point
            warnings.simplefilter("ignore")
            libraries[key].impl(op.split("::")[1], impl, key, with_keyset=True)
    handle = _Handle(list(libraries.values()))
    _state["handle"] = handle
    return handle


def _registry():
    try:
        from torch.nn.attention import _registry as registry
    except ImportError:  # torch without the provider registry: activate() still works
        return None
    return registry


def register() -> None:
    """Make "fused_attn" known to torch.nn.attention.activate_flash_attention_impl (done on import)."""
    registry = _registry()
    if registry is not None and NAME not in registry.list_flash_attention_impls():
        registry.register_flash_attention_impl(NAME, register_fn=_install)


def activate(backend: str = "auto") -> None:
    """Run torch's SDPA on fused_attn's kernels from now on. backend: "auto" (cpu kernels on
    CPU tensors; cuda, then triton, on GPU tensors) or a kernel backend's name."""
    if backend != "auto" and backend not in KERNEL_BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(KERNEL_BACKENDS)}, got {backend!r}")
    _state["backend"] = backend
    registry = _registry()
    if registry is not None:
        register()
        registry.activate_flash_attention_impl(NAME)
    else:
        _install()


def deactivate() -> None:
    """Give torch's SDPA its own kernels back (no-op when not active)."""
    registry = _registry()
    if registry is not None and registry.current_flash_attention_impl() == NAME:
        registry.restore_flash_attention_impl()
    elif _state["handle"] is not None:
        _state["handle"].remove()
    _state["backend"] = "auto"


def is_active() -> bool:
    return _state["handle"] is not None


@contextlib.contextmanager
def activated(backend: str = "auto"):
    """with fused_attn.activated(): ... runs torch's SDPA on our kernels inside the block."""
    was_active, old_backend = is_active(), _state["backend"]
    activate(backend)
    try:
        yield
    finally:
        deactivate()
        if was_active:
            activate(old_backend)


def activate_from_environment() -> None:
    """FUSED_ATTN_SDPA=1 (or =auto, or a kernel backend's name) activates on import."""
    value = os.environ.get(ENV_VAR, "").strip()
    if value in ("", "0"):
        return
    activate("auto" if value in ("1", "auto") else value)

