"""The integer codes the kernels take, defined once (the C++ side: csrc/kernel_params.h's
field comments), and the constants of the activations. Plain Python, no torch."""

from __future__ import annotations

import math
from enum import IntEnum


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
