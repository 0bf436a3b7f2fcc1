"""Output allocation for the Python-launched kernels (Triton).

Tests switch on poisoning (fused_attn.testing.poisoned_outputs) so that outputs start
as NaN and an element a kernel forgets to write cannot pass for a right answer.
"""

from __future__ import annotations

import torch

_poison = False


def set_poison(enabled: bool) -> None:
    global _poison
    _poison = enabled


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if _poison and t.is_floating_point():
        t.fill_(float("nan"))
    return t
