"""bfloat16 under Triton's interpreter (fused_attn.triton.interpreter_bf16): arithmetic,
dots, sums and casts round like the GPU's bfloat16 (float32 math, round to nearest even).
Without the patch the interpreter computes on the uint16 bit patterns (errors of 1e10)
and truncates casts."""

import pytest
import torch

from fused_attn import dispatch

pytestmark = pytest.mark.skipif(not dispatch.triton_interpreting(), reason="checks the Triton interpreter")


def test_bf16_arithmetic_dot_sum_and_rounding():
    import triton
    import triton.language as tl

    from fused_attn.triton import interpreter_bf16

    assert interpreter_bf16.install()

    @triton.jit
    def kernel(a_ptr, b_ptr, f_ptr, sum_ptr, mul_ptr, dot_ptr, rowsum_ptr, cast_ptr, exp_ptr, N: tl.constexpr):
        r = tl.arange(0, N)
        idx = r[:, None] * N + r[None, :]
        a = tl.load(a_ptr + idx)
        b = tl.load(b_ptr + idx)
        tl.store(sum_ptr + idx, a + b)
        tl.store(mul_ptr + idx, a * b - b)
        tl.store(dot_ptr + idx, tl.dot(a, b))
        tl.store(rowsum_ptr + r, tl.sum(a, axis=1))
        tl.store(cast_ptr + idx, tl.load(f_ptr + idx).to(tl.bfloat16))
        tl.store(exp_ptr + idx, tl.exp(a.to(tl.float32)).to(tl.bfloat16))

    N = 16
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(N, N, generator=gen).bfloat16() for _ in range(2))
    f = torch.randn(N, N, generator=gen) * 3
    outs = [torch.empty(N, N, dtype=torch.bfloat16) for _ in range(3)]
    dot = torch.empty(N, N, dtype=torch.float32)
    rowsum = torch.empty(N, dtype=torch.bfloat16)
    cast, exp = torch.empty(N, N, dtype=torch.bfloat16), torch.empty(N, N, dtype=torch.bfloat16)
    kernel[(1,)](a, b, f, *outs[:2], dot, rowsum, cast, exp, N=N)
    assert torch.equal(outs[0], (a.float() + b.float()).bfloat16())
    assert torch.equal(outs[1], ((a.float() * b.float()).bfloat16().float() - b.float()).bfloat16())
    torch.testing.assert_close(dot, a.float() @ b.float(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(rowsum.float(), a.float().sum(1), rtol=1e-2, atol=1e-2)
    assert torch.equal(cast, f.bfloat16())  # round to nearest even, as torch's cast
    assert torch.equal(exp, torch.exp(a.float()).bfloat16())
