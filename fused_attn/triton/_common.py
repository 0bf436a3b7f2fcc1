"""Triton helpers shared by the kernels: float32-accurate dots, the dropout rule and the
autotuner's candidate list."""

import os

import triton
import triton.language as tl

from .. import dispatch

if dispatch.triton_interpreting():
    # the interpreter computes on bfloat16 bit patterns as integers unless patched
    from . import interpreter_bf16

    interpreter_bf16.install()


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """a @ b, accumulated in float32; IEEE float32 products for float32 inputs (no tf32)."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def tanh(x):
    """tanh in float32 from one exponential (absolute error ~1e-7; neither interpreter nor
    GPU needs libdevice)."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def dropout_keep(seed, stream, rows, cols, ld, threshold):
    """True where element (rows, cols) survives dropout (rows, cols broadcast): the first
    32-bit Philox-4x32-10 draw for key seed + stream and counter rows * ld + cols is
    >= threshold = p * 2^32. The CPU and CUDA kernels draw the same numbers."""
    counter = (rows * ld + cols).to(tl.uint32)
    r = tl.randint(seed + stream, counter).to(tl.uint32, bitcast=True)
    return r >= threshold.to(tl.uint32)


def dropout_args(dropout_p: float):
    """(threshold, 1 / (1 - p)) for a dropout probability."""
    threshold = min(int(dropout_p * 2 ** 32), 2 ** 32 - 1)
    scale = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0
    return threshold, scale


def tuning_candidates(configs: list) -> list:
    """The autotuner's candidates: all of them, or only the first (largest) when
    FUSED_ATTN_AUTOTUNE=0 (the test suite sets it: one compile per kernel variant instead
    of one per candidate, and no timing runs)."""
    return configs if os.environ.get("FUSED_ATTN_AUTOTUNE", "1") != "0" else configs[:1]
