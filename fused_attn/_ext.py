"""Loads the compiled extension fused_attn._C, recording why when it cannot.

Loading it registers the ``torch.ops.fused_attn_C`` operators (CPU kernels always,
CUDA kernels when it was built with them). It never initialises CUDA.
"""

from __future__ import annotations

from typing import Optional

C = None
load_error: Optional[str] = None

try:
    from . import _C as C  # noqa: F401
except Exception as e:  # ImportError, undefined symbols from a mismatched torch, ...
    load_error = (f"the compiled extension fused_attn._C cannot be loaded ({type(e).__name__}: {e}); "
                  "build it with `pip install --no-build-isolation -e .` (or `make setup`)")


def ops():
    """torch.ops.fused_attn_C, raising the load error if the extension is missing."""
    if load_error is not None:
        raise RuntimeError(load_error)
    import torch

    return torch.ops.fused_attn_C


def set_poison(enabled: bool) -> None:
    """Make the C++ kernels' output allocations NaN-filled (tests: catches unwritten elements)."""
    if C is not None:
        C.set_poison(enabled)
