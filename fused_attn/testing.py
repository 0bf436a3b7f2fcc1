"""The correctness rule every kernel is held to, for our tests and for yours.

The 2x rule: run the reference on float64 copies of the inputs (the truth)
and on the inputs in their own dtype (what an honest implementation in that dtype
achieves). A backend passes when, for the output and every gradient,

    max|backend - ref64| <= factor * max|ref_lowp - ref64| + atol,
    atol = atol_ulps * eps(dtype) * scale,    atol_ulps = 2 (fp16, bf16) or 8 (fp32),

scale = max(1, max|ref64|) for outputs; for gradients also max|output| * max|grad_output|,
because fused backward passes legitimately carry a few ulps of the forward's magnitude
(attention's delta = rowsum(dO * O) against dP) where the reference can cancel exactly
(a single key). In float32 the reference's own error is about one ulp, the size of the
summation-order noise any blocked algorithm (an online softmax over key tiles) adds, so
the atol there is 8 ulps; in 16-bit types the reference error dominates and 2 ulps
suffice. For float64 inputs the same-dtype reference is the truth (no error to double),
so the atol carries it: 16 ulps. Nothing may be NaN where the truth is finite. `compare`
runs the three, forward and backward, and returns one `Comparison` per checked tensor.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch

from . import _alloc, _ext


@dataclass
class Comparison:
    name: str
    error: float  # max |actual - truth|
    reference_error: float  # max |reference in the same dtype - truth|
    allowed: float
    dtype: torch.dtype

    @property
    def ok(self) -> bool:
        # an infinite allowance means the same-dtype reference disagrees with the float64 one
        # on which entries are finite: such a comparison proves nothing, so it fails
        return self.error <= self.allowed and math.isfinite(self.allowed)

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return (f"{self.name}: max error {self.error:.3e}, allowed {self.allowed:.3e} "
                f"(reference in {str(self.dtype).replace('torch.', '')}: {self.reference_error:.3e}) {verdict}")


def max_error(actual: torch.Tensor, truth: torch.Tensor) -> float:
    """max |actual - truth| in float64; inf if actual is NaN/inf where truth is finite."""
    a = actual.detach().to(torch.float64).cpu()
    t = truth.detach().to(torch.float64).cpu()
    if a.shape != t.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != expected {tuple(t.shape)}")
    if a.numel() == 0:
        return 0.0
    finite = torch.isfinite(t)
    if not torch.isfinite(a[finite]).all():
        return float("inf")
    # where the truth itself is +-inf, the answer must match it exactly
    if not torch.equal(a[~finite], t[~finite]):
        return float("inf")
    return float((a[finite] - t[finite]).abs().max()) if finite.any() else 0.0


def _absmax(t: torch.Tensor) -> float:
    """max |t| over the finite entries (an output may hold -inf exactly, as a log-sum-exp of a
    fully masked row does; max_error demands those match exactly)."""
    t = t.detach()
    t = t[torch.isfinite(t)]
    return float(t.abs().max()) if t.numel() else 0.0


def default_atol_ulps(dtype: torch.dtype) -> float:
    if dtype == torch.float64:
        # the same-dtype reference is the truth itself, so the rule's 2x term is 0: its ulp or so
        # of rounding per operation chain, which float32 gets through that term, is in here
        return 16.0
    return 8.0 if dtype == torch.float32 else 2.0


def check_2x(name: str, actual: torch.Tensor, ref_lowp: torch.Tensor, ref64: torch.Tensor, *, factor: float = 2.0,
             atol_ulps: Optional[float] = None, scale: Optional[float] = None) -> Comparison:
    if atol_ulps is None:
        atol_ulps = default_atol_ulps(actual.dtype)
    err = max_error(actual, ref64)
    ref_err = max_error(ref_lowp, ref64)
    scale = max(1.0, _absmax(ref64), scale or 0.0)
    allowed = factor * ref_err + atol_ulps * torch.finfo(actual.dtype).eps * scale
    return Comparison(name, err, ref_err, allowed, actual.dtype)


def assert_2x(name: str, actual, ref_lowp, ref64, **kw) -> Comparison:
    """check_2x that raises AssertionError when the rule fails."""
    c = check_2x(name, actual, ref_lowp, ref64, **kw)
    if not c.ok:
        raise AssertionError(str(c))
    return c


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def compare(fn: Callable, ref_fn: Callable, inputs: dict, *, grad_names: Iterable[str] = (), factor: float = 2.0,
            atol_ulps: Optional[float] = None, seed: int = 0,
            output_names: Optional[Sequence[str]] = None) -> list[Comparison]:
    """Check fn(**inputs) against ref_fn, forward and backward, by the 2x rule.

    inputs: tensors (and other arguments) for both functions. Tensors named in grad_names
    get gradients from a random weighting of every floating-point output.
    Returns the comparisons: each output, then each gradient.
    """
    grad_names = list(grad_names)

    def prepared(cast: Optional[torch.dtype]):
        out = {}
        for k, v in inputs.items():
            if type(v) is torch.Tensor:  # not subclasses such as torch's CausalBias
                v = v.detach().clone()
                if cast is not None and v.is_floating_point():
                    v = v.to(cast)
                v.requires_grad_(k in grad_names)
            out[k] = v
        return out

    runs = []
    for f, cast in ((fn, None), (ref_fn, None), (ref_fn, torch.float64)):
        args = prepared(cast)
        outs = _as_tuple(f(**args))
        runs.append((args, outs))
    (args_a, outs_a), (args_l, outs_l), (args_t, outs_t) = runs
    names = list(output_names) if output_names else [f"output{i}" if len(outs_a) > 1 else "output"
                                                     for i in range(len(outs_a))]
    result = [check_2x(n, a, low, t, factor=factor, atol_ulps=atol_ulps)
              for n, a, low, t in zip(names, outs_a, outs_l, outs_t)]
    if grad_names:
        gen = torch.Generator().manual_seed(seed)
        weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs_t]
        grads = []
        for args, outs in runs:
            diff = [o for o in outs if o.requires_grad]
            gouts = [w.to(o.dtype).to(o.device) for o, w in zip(outs, weights) if o.requires_grad]
            wrt = [args[k] for k in grad_names]
            g = torch.autograd.grad(diff, wrt, gouts, allow_unused=True) if diff else [None] * len(wrt)
            grads.append([torch.zeros_like(x) if gi is None else gi for x, gi in zip(wrt, g)])
        forward_scale = max((_absmax(o) * _absmax(w) for o, w in zip(outs_t, weights)), default=0.0)
        for k, a, low, t in zip(grad_names, *grads):
            result.append(check_2x(f"grad {k}", a, low, t, factor=factor, atol_ulps=atol_ulps, scale=forward_scale))
    return result


def assert_all_ok(comparisons: Sequence[Comparison]) -> None:
    bad = [str(c) for c in comparisons if not c.ok]
    if bad:
        raise AssertionError("; ".join(bad))


@contextlib.contextmanager
def poisoned_outputs():
    """Kernel outputs start NaN-filled inside this block (Python and C++ launchers)."""
    _alloc.set_poison(True)
    _ext.set_poison(True)
    try:
        yield
    finally:
        _alloc.set_poison(False)
        _ext.set_poison(False)
