"""The integer codes the kernels take, defined once (the C++ side: csrc/kernel_params.h's
field comments), and the constants of the activations. Plain Python, no torch."""

from __future__ import annotations

import math
from enum import IntEnum

import torch


class MaskKind(IntEnum):
    NONE = 0
    BOOL = 1  # True takes part
    FLOAT = 2  # added to the scores


class CausalKind(IntEnum):
    NONE = 0
    UPPER_LEFT = 1  # query i sees keys j <= i
    LOWER_RIGHT = 2  # query i sees keys j <= i + Lk - Lq


class Activation(IntEnum):
    RELU = 0
    GELU = 1  # exact (erf)
    GELU_TANH = 2
    SILU = 3


def names(codes: type[IntEnum]) -> dict[str, int]:
    """{"upper_left": 1, ...}: the lower-case names the Python API uses -> the kernels' codes."""
    return {c.name.lower(): int(c) for c in codes}


ACTIVATION_NAMES = tuple(names(Activation))

# GELU: erf form 0.5 h (1 + erf(h / sqrt 2)), tanh form 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3)))
SQRT_HALF = math.sqrt(0.5)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_TANH_CUBIC = 0.044715


# element types each kernel backend takes (csrc/kernel_params.h DType): the CUDA C++ kernels
# are written for 16-bit types (LayerNorm also float32), the CPU kernels also compute in
# float64 (torch's CPU kernels and gradcheck use it)
_SIXTEEN_BIT = (torch.float16, torch.bfloat16)
KERNEL_DTYPES = {
    "cpu": (torch.float32, *_SIXTEEN_BIT, torch.float64),
    "triton": (torch.float32, *_SIXTEEN_BIT),
    "cuda": _SIXTEEN_BIT,
    "cuda_emu": _SIXTEEN_BIT,
}
LAYER_NORM_KERNEL_DTYPES = {**KERNEL_DTYPES, "cuda": (torch.float32, *_SIXTEEN_BIT),
                            "cuda_emu": (torch.float32, *_SIXTEEN_BIT)}


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' row statistics and parameter-gradient sums: float32, float64 for float64
    inputs (csrc/ops_common.h stats_type)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
