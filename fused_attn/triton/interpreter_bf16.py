"""bfloat16 in Triton's CPU interpreter (TRITON_INTERPRET=1).

The interpreter keeps bfloat16 tensors as their uint16 bit patterns and hands those to
numpy: `+`, `*`, `tl.dot`, `tl.sum`, exp and friends then compute on integers (errors of
1e10), and float32 -> bfloat16 casts truncate instead of rounding to nearest even
(upstream declined a fix, triton issue 11584). `install()` patches the interpreter's
builder so that every arithmetic operation on bfloat16 widens its operands to float32
exactly (the bits shifted left by 16), computes in float32, and narrows the result with
round-to-nearest-even, which is what a GPU's bf16 arithmetic and conversions do. Loads,
stores, selects, bitcasts and comparisons already work on the bits and are left alone.

fused_attn installs it when its Triton kernels are imported under the interpreter, so
every Triton kernel runs (and is tested) in bfloat16 on the CPU too. It changes nothing
for other dtypes and nothing outside the interpreter.
"""

from __future__ import annotations

import numpy as np

_installed = False


def widen(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def narrow(values) -> np.ndarray:
    """float32 (or float64, rounded to float32 first) -> bfloat16 bits, round to nearest even;
    NaN stays a (quiet) NaN."""
    f = np.asarray(values, dtype=np.float32)
    u = f.view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    quiet_nan = ((u >> 16) | np.uint32(0x40)).astype(np.uint16)
    return np.where(np.isnan(f), quiet_nan, rounded)


def install() -> bool:
    """Patch triton.runtime.interpreter for bfloat16 (idempotent). Returns False when this
    Triton's interpreter does not have the expected shape (nothing is patched then)."""
    global _installed
    if _installed:
        return True
    try:
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except ImportError:
        return False
    builder = getattr(interp, "InterpreterBuilder", None)
    reduce_ops = getattr(interp, "ReduceOps", None)
    if builder is None or reduce_ops is None or not hasattr(interp, "TensorHandle"):
        return False
    TensorHandle = interp.TensorHandle
    bf16 = tl.bfloat16

    def is_bf16(handle) -> bool:
        return getattr(handle.dtype, "scalar", handle.dtype) == bf16

    def result(data, dtype):
        data = np.asarray(data)
        return TensorHandle(narrow(data) if data.dtype.kind == "f" else data, dtype)

    orig_binary, orig_unary, orig_ternary = builder.binary_op, builder.unary_op, builder.ternary_op
    orig_fma, orig_dot = builder.create_fma, builder.create_dot
    orig_cast, orig_fp_to_fp = builder.cast_impl, builder.create_fp_to_fp

    def binary_op(self, lhs, rhs, op):
        if is_bf16(lhs) and is_bf16(rhs) and op not in (np.bitwise_and, np.bitwise_or, np.bitwise_xor):
            return result(op(widen(lhs.data), widen(rhs.data)), lhs.dtype.scalar)
        return orig_binary(self, lhs, rhs, op)

    def unary_op(self, arg, op):
        if is_bf16(arg):
            return result(op(widen(arg.data)), arg.dtype.scalar)
        return orig_unary(self, arg, op)

    def ternary_op(self, lhs, rhs, other, op):
        if is_bf16(other) and op is not np.where:  # where selects bits: fine as it is
            return result(op(widen(lhs.data), widen(rhs.data), widen(other.data)), other.dtype.scalar)
        return orig_ternary(self, lhs, rhs, other, op)

    def create_fma(self, x, y, z):
        if is_bf16(z):
            return result(widen(x.data) * widen(y.data) + widen(z.data), z.dtype.scalar)
        return orig_fma(self, x, y, z)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if is_bf16(a) or is_bf16(b):
            a_data = widen(a.data) if is_bf16(a) else a.data.astype(np.float32)
            b_data = widen(b.data) if is_bf16(b) else b.data.astype(np.float32)
            acc = widen(d.data) if is_bf16(d) else d.data
            out = np.matmul(a_data, b_data, dtype=np.float32) + acc
            return result(out, d.dtype.scalar) if is_bf16(d) else TensorHandle(out.astype(d.data.dtype), d.dtype.scalar)
        return orig_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def convert(src, dst_type):
        src_scalar, dst_scalar = src.dtype.scalar, dst_type.scalar
        values = widen(src.data) if src_scalar == bf16 else src.data
        if dst_scalar == bf16:
            return TensorHandle(narrow(values.astype(np.float32)), dst_scalar)
        return TensorHandle(values.astype(interp._get_np_dtype(dst_type)), dst_scalar)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == bf16 or dst_type.scalar == bf16:
            return convert(src, dst_type)
        return orig_cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if (src.dtype.scalar == bf16 and dst_type.scalar in (tl.float32, tl.float16, tl.float64)) or \
                (dst_type.scalar == bf16 and src.dtype.scalar in (tl.float32, tl.float16, tl.float64)):
            return convert(src, dst_type)
        return orig_fp_to_fp(self, src, dst_type, rounding_mode)

    orig_sum, orig_min_max = reduce_ops.sum, reduce_ops.min_max

    def reduce_sum(self, input):
        if input.dtype.scalar == bf16:
            total = np.sum(widen(input.handle.data), axis=self.axis, keepdims=self.keep_dims, dtype=np.float32)
            return self.to_tensor(narrow(total), input.dtype)
        return orig_sum(self, input)

    def min_max(self, input, val_reduce_op, idx_reduce_op=None):
        x = input[0] if isinstance(input, tuple) else input
        if x.dtype.scalar != bf16:
            return orig_min_max(self, input, val_reduce_op, idx_reduce_op)
        data = widen(x.handle.data)
        val = idx = None
        if val_reduce_op:
            val = self.to_tensor(narrow(val_reduce_op(data, axis=self.axis, keepdims=self.keep_dims)), x.dtype)
        if idx_reduce_op:
            idx = self.to_tensor(idx_reduce_op(data, axis=self.axis, keepdims=self.keep_dims), tl.int32)
        return (val, idx) if val is not None and idx is not None else (val if val is not None else idx)

    builder.binary_op, builder.unary_op, builder.ternary_op = binary_op, unary_op, ternary_op
    builder.create_fma, builder.create_dot = create_fma, create_dot
    builder.cast_impl, builder.create_fp_to_fp = cast_impl, create_fp_to_fp
    reduce_ops.sum, reduce_ops.min_max = reduce_sum, min_max
    _installed = True
    return True
