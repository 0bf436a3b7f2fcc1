"""Drop-in nn modules backed by the fused ops.

Each keeps the constructor, parameters and state_dict keys of its torch counterpart, so
``load_state_dict`` works both ways, and adds a ``backend`` ("auto" by default).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import layer_norm as _layer_norm

__all__ = ["LayerNorm"]


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm on fused kernels, with an optional fused residual add.

    forward(input (..., *normalized_shape), residual=None, return_residual=False):
    normalises input (+ residual); returns y, or (y, input + residual) with return_residual.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, backend: str = "auto"):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias, device=device,
                         dtype=dtype)
        self.backend = backend

    def forward(self, input: Tensor, residual: Optional[Tensor] = None, return_residual: bool = False):
        return _layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, residual=residual,
                           return_residual=return_residual, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"
