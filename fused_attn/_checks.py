"""Input validation for every public function: one place, one set of messages.

Each check raises TypeError (wrong kind of argument or dtype) or ValueError (wrong
shape, device or value) naming the argument, what it got and what was expected.
Backends never re-validate; they only say what they do not support (dispatch.py).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def describe(t: torch.Tensor) -> str:
    """'shape (2, 3), dtype torch.float16, device cpu' for error messages."""
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _fail_type(msg: str):
    raise TypeError(msg)


def _fail_value(msg: str):
    raise ValueError(msg)


def tensor(name: str, t, *, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        _fail_type(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def floating(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        _fail_type(f"{name} must be a floating-point tensor (float32, float16, bfloat16 or float64), "
                   f"got {describe(t)}")


def same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        _fail_value(f"{name} must be on the same device as {ref_name} ({ref.device}), got {describe(t)}")


def same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        _fail_type(f"{name} must have the same dtype as {ref_name} ({ref.dtype}), got {describe(t)}")


def finite_number(name: str, value, *, positive: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail_type(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        _fail_value(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        _fail_value(f"{name} must be > 0, got {value}")


def probability(name: str, value) -> None:
    finite_number(name, value)
    if not 0.0 <= value < 1.0:
        _fail_value(f"{name} must be in [0, 1), got {value}")


def backend_name(value) -> None:
    if not isinstance(value, str):
        _fail_type(f"backend must be a string, got {type(value).__name__}")


# --------------------------------------------------------------------------- LayerNorm


def normalized_shape(value) -> tuple[int, ...]:
    """Normalise an int or a sequence of ints to a tuple, rejecting anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        value = tuple(value)
    else:
        _fail_type(f"normalized_shape must be an int or a sequence of ints, got {type(value).__name__}")
    if len(value) == 0:
        _fail_value("normalized_shape must not be empty")
    for d in value:
        if isinstance(d, bool) or not isinstance(d, int):
            _fail_type(f"normalized_shape must contain ints, got {value!r}")
        if d <= 0:
            _fail_value(f"normalized_shape must contain sizes >= 1, got {value!r}")
    return value


def layer_norm(input, normalized_shape_, weight, bias, eps, residual, return_residual) -> tuple[int, ...]:
    """Validate layer_norm's arguments; returns normalized_shape as a tuple."""
    tensor("input", input)
    floating("input", input)
    shape = normalized_shape(normalized_shape_)
    k = len(shape)
    if input.dim() < k or tuple(input.shape[input.dim() - k:]) != shape:
        _fail_value(f"normalized_shape {shape} must match the trailing dimensions of input, got input {describe(input)}")
    for name, p in (("weight", weight), ("bias", bias)):
        tensor(name, p, optional=True)
        if p is None:
            continue
        floating(name, p)
        same_device(name, p, "input", input)
        if tuple(p.shape) != shape:
            _fail_value(f"{name} must have shape normalized_shape {shape}, got {describe(p)}")
        if p.dtype not in (input.dtype, torch.float32):
            _fail_type(f"{name} must have input's dtype ({input.dtype}) or float32, got {describe(p)}")
    tensor("residual", residual, optional=True)
    if residual is not None:
        same_device("residual", residual, "input", input)
        same_dtype("residual", residual, "input", input)
        if residual.shape != input.shape:
            _fail_value(f"residual must have input's shape {tuple(input.shape)}, got {describe(residual)}")
    if not isinstance(return_residual, bool):
        _fail_type(f"return_residual must be a bool, got {type(return_residual).__name__}")
    finite_number("eps", eps, positive=True)
    return shape
