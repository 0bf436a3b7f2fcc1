"""The correctness rule every kernel is held to, for our tests and for yours.

The 2x rule (DESIGN.md): run the reference on float64 copies of the inputs (the truth)
and on the inputs in their own dtype (what an honest implementation in that dtype
achieves). A backend passes when, for the output and every gradient,

    max|backend - ref64| <= factor * max|ref_lowp - ref64| + atol,
    atol = atol_ulps * eps(dtype) * max(1, max|ref64|),

and nothing is NaN where the truth is finite. `compare` runs the three, forward and
backward, and returns one `Comparison` per checked tensor.
"""

from __future__ import annotations

import contextlib
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
        return self.error <= self.allowed

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


def check_2x(name: str, actual: torch.Tensor, ref_lowp: torch.Tensor, ref64: torch.Tensor, *, factor: float = 2.0,
             atol_ulps: float = 2.0) -> Comparison:
    err = max_error(actual, ref64)
    ref_err = max_error(ref_lowp, ref64)
    scale = max(1.0, float(ref64.detach().abs().max())) if ref64.numel() else 1.0
    allowed = factor * ref_err + atol_ulps * torch.finfo(actual.dtype).eps * scale
    return Comparison(name, err, ref_err, allowed, actual.dtype)


def assert_2x(name: str, actual, ref_lowp, ref64, **kw) -> Comparison:
    c = check_2x(name, actual, ref_lowp, ref64, **kw)
    if not c.ok:
        raise AssertionError(str(c))
    return c


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def compare(fn: Callable, ref_fn: Callable, inputs: dict, *, grad_names: Iterable[str] = (), factor: float = 2.0,
            atol_ulps: float = 2.0, seed: int = 0, output_names: Optional[Sequence[str]] = None) -> list[Comparison]:
    """Check fn(**inputs) against ref_fn, forward and backward, by the 2x rule.

    inputs: tensors (and other arguments) for both functions. Tensors named in grad_names
    get gradients from a random weighting of every floating-point output.
    Returns the comparisons: each output, then each gradient.
    """
    grad_names = list(grad_names)

    def prepared(cast: Optional[torch.dtype]):
        out = {}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor):
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
    result = [check_2x(n, a, l, t, factor=factor, atol_ulps=atol_ulps)
              for n, a, l, t in zip(names, outs_a, outs_l, outs_t)]
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
        for k, a, l, t in zip(grad_names, *grads):
            result.append(check_2x(f"grad {k}", a, l, t, factor=factor, atol_ulps=atol_ulps))
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
