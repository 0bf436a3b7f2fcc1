"""Attention: every kernel backend against the float64 reference by the 2x rule, forward
and all gradients (q, k, v, float mask), over every mask kind, odd shapes, Lq != Lk,
causal variants, GQA and dtypes; plus fully masked rows, garbage in masked-out keys,
dropout, strides, memory and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import fused_attn as fa
from fused_attn import dispatch, testing
from fused_attn.ops import attention as op

from conftest import (HAS_GPU, backend_device, interpreted_triton, kernel_backend_params, kernel_dtype, stable_seed,
                      sixteen_bit_at_small_sizes_only)

# (B, H, Lq, Lk, D)
SHAPES = [(1, 1, 1, 1, 16), (2, 3, 17, 17, 40), (2, 4, 97, 97, 64), (1, 2, 129, 129, 80),
          (1, 2, 1, 239, 64), (2, 2, 113, 203, 40)]
MASKS = ["none", "is_causal", "causal_upper_left", "causal_lower_right", "bool_keypad", "bool_shared",
         "bool_per_head", "float_keypad", "float_shared", "float_per_head"]


def _dtypes():
    # every dtype on every backend: the capability records skip what a backend does not take
    # (float64 runs on the cpu kernels only)
    return [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _ids(v):
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, tuple):
        return "x".join(map(str, v))
    return str(v)


def make_mask(kind, B, H, Lq, Lk, dtype, device, gen):
    """The attn_mask (and is_causal) for a mask kind; random bool masks keep ~75%."""
    if kind == "none":
        return None, False
    if kind == "is_causal":
        return None, True
    if kind == "causal_upper_left":
        return causal_upper_left(Lq, Lk), False
    if kind == "causal_lower_right":
        return causal_lower_right(Lq, Lk), False
    shape = {"keypad": (B, 1, 1, Lk), "shared": (Lq, Lk), "per_head": (B, H, Lq, Lk)}[kind.split("_", 1)[1]]
    if kind.startswith("bool"):
        return (torch.rand(shape, generator=gen) > 0.25).to(device), False
    m = torch.randn(shape, generator=gen) * 2
    m = m.masked_fill(torch.rand(shape, generator=gen) < 0.1, float("-inf"))  # some -inf entries too
    return m.to(dtype).to(device), False


def _inputs(B, H, Lq, Lk, D, dtype, device, seed, *, gqa=False, dv=None):
    gen = torch.Generator().manual_seed(seed)
    hk = 1 if gqa else H
    rnd = lambda *s: torch.randn(*s, generator=gen).to(dtype).to(device)  # noqa: E731
    return rnd(B, H, Lq, D), rnd(B, hk, Lk, D), rnd(B, hk, Lk, dv or D), gen


def _skip_if_unsupported(backend, device, q, k, v, mask, dropout_p=0.0, is_causal=False, enable_gqa=None):
    enable_gqa = q.size(-3) != k.size(-3) if enable_gqa is None else enable_gqa
    why = op.reasons(backend, q, k, v, mask, dropout_p, is_causal, enable_gqa)
    if why:
        pytest.skip("; ".join(why))


def _check(backend, q, k, v, mask, is_causal, *, enable_gqa=False, scale=None, mask_grad=False):
    inputs = dict(query=q, key=k, value=v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    grads = ["query", "key", "value"] + (["attn_mask"] if mask_grad else [])
    return testing.compare(lambda **kw: fa.scaled_dot_product_attention(**kw, backend=backend),
                           fa.reference.scaled_dot_product_attention, inputs, grad_names=grads)


@pytest.mark.parametrize("backend", kernel_backend_params(op.OP))
@pytest.mark.parametrize("dtype", _dtypes(), ids=_ids)
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_matches_reference(backend, dtype, gqa, mask_kind, shape):
    B, H, Lq, Lk, D = shape
    if gqa and H == 1:
        pytest.skip("GQA needs more than one query head")
    if Lq * Lk > 2000 and sixteen_bit_at_small_sizes_only(backend, dtype):
        pytest.skip("16-bit types under the Triton interpreter (bfloat16 on the warp emulator) at the small shapes "
                    "only: they cover every kernel path; float32 (float16 on the emulator) runs every shape "
                    "(make test's time "
                    "budget); a GPU runs them all")
    if interpreted_triton(backend) and B * H > 2 and Lq * Lk > 2000:
        B, H = 1, 2  # one (batch, head) pair per KV group: batch and head strides are covered at 2x3x17x17
    device = backend_device(backend)
    seed = stable_seed(shape, mask_kind, gqa)
    q, k, v, gen = _inputs(B, H, Lq, Lk, D, dtype, device, seed, gqa=gqa)
    mask, is_causal = make_mask(mask_kind, B, H, Lq, Lk, dtype, device, gen)
    _skip_if_unsupported(backend, device, q, k, v, mask, is_causal=is_causal)
    mask_grad = mask_kind.startswith("float")
    testing.assert_all_ok(_check(backend, q, k, v, mask, is_causal, enable_gqa=gqa, mask_grad=mask_grad))


@pytest.mark.parametrize("backend", kernel_backend_params(op.OP))
@pytest.mark.parametrize("d, dv", [(16, 16), (32, 32), (96, 96), (128, 128), (160, 160), (256, 256), (64, 40),
                                   (40, 128)])
def test_head_dims(backend, d, dv):
    device = backend_device(backend)
    q, k, v, gen = _inputs(1, 2, 33, 47, d, torch.float16, device, d * 1000 + dv, dv=dv)
    _skip_if_unsupported(backend, device, q, k, v, None)
    testing.assert_all_ok(_check(backend, q, k, v, None, True))


@pytest.mark.parametrize("backend", kernel_backend_params(op.OP))
def test_explicit_scale_and_rank3_rank5_inputs(backend):
    device, dtype = backend_device(backend), kernel_dtype(backend)
    gen = torch.Generator().manual_seed(4)
    for shape_q, shape_k in (((3, 19, 32), (3, 23, 32)), ((2, 2, 3, 19, 32), (2, 2, 3, 23, 32)), ((19, 32), (23, 32))):
        q = torch.randn(*shape_q, generator=gen).to(device, dtype)
        k = torch.randn(*shape_k, generator=gen).to(device, dtype)
        v = torch.randn(*shape_k, generator=gen).to(device, dtype)
        mask = torch.rand(shape_q[:-1] + (shape_k[-2],), generator=gen).to(device) > 0.2
        testing.assert_all_ok(_check(backend, q, k, v, mask, False, scale=0.3))


@pytest.mark.parametrize("backend", kernel_backend_params(op.OP))
def test_fully_masked_rows_are_exactly_zero(backend):
    device, dtype = backend_device(backend), kernel_dtype(backend)
    q, k, v, _ = _inputs(2, 2, 24, 31, 32, dtype, device, 1)
    mask = torch.ones(2, 2, 24, 31, dtype=torch.bool)
    mask[0, 1, 5] = False
    mask[1, :, 17:] = False
    mask = mask.to(device)
    for m in (mask, torch.zeros(mask.shape).masked_fill(~mask.cpu(), float("-inf")).to(device, dtype)):
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        out = fa.scaled_dot_product_attention(qg, kg, vg, attn_mask=m, backend=backend)
        out.backward(torch.randn_like(out))
        for t in (out, qg.grad, kg.grad, vg.grad):
            assert torch.isfinite(t).all()
        assert torch.equal(out[0, 1, 5], torch.zeros_like(out[0, 1, 5]))
        assert torch.equal(out[1, :, 17:], torch.zeros_like(out[1, :, 17:]))
        assert torch.equal(qg.grad[0, 1, 5], torch.zeros_like(qg.grad[0, 1, 5]))
        assert torch.equal(qg.grad[1, :, 17:], torch.zeros_like(qg.grad[1, :, 17:]))
    # lower-right causal with Lq > Lk: the first Lq - Lk queries see no key
    q2, k2, v2, _ = _inputs(1, 1, 9, 4, 32, dtype, device, 2)
    out = fa.scaled_dot_product_attention(q2, k2, v2, attn_mask=causal_lower_right(9, 4), backend=backend)
    assert torch.equal(out[0, 0, :5], torch.zeros_like(out[0, 0, :5]))


@pytest.mark.parametrize("backend", kernel_backend_params(op.OP))
def test_float_mask_at_the_dtype_minimum(backend):
    """Float masks at torch.finfo(dtype).min (Hugging Face's padding value): a row masked
    that way entirely is the uniform average, as in torch (the Triton kernel once turned
    finfo(float32).min into -inf in log2 units and gave 0); partly masked rows ignore
    those keys. -inf entries stay -inf."""
    device, dtype = backend_device(backend), kernel_dtype(backend)
    q, k, v, gen = _inputs(2, 2, 9, 13, 32, dtype, device, 31)
    mask = torch.randn(2, 1, 9, 13, generator=gen)
    low = torch.finfo(dtype).min
    mask[0, :, 2] = low  # the whole row
    mask[1, :, 4, 5:] = low
    mask[1, :, 6, :3] = float("-inf")
    mask = mask.to(dtype).to(device)
    testing.assert_all_ok(_check(backend, q, k, v, mask, False))
    if dtype == torch.float32:  # scores vanish next to -3.4e38 in float32: a uniform row
        out = fa.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
        torch.testing.assert_close(out[0, :, 2], v[0].mean(dim=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", kernel_backend_params(op.OP))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_ids)
def test_garbage_in_masked_keys_changes_nothing(backend, dtype):
    """Keys/values that every query masks out may hold anything (here large values):
    neither the output nor any gradient moves, and their dK/dV rows are 0."""
    device = backend_device(backend)
    B, H, Lq, Lk, D = 2, 2, 21, 37, 32
    q, k, v, gen = _inputs(B, H, Lq, Lk, D, dtype, device, 3)
    valid = torch.tensor([30, 19])
    keypad = (torch.arange(Lk)[None, :] < valid[:, None]).view(B, 1, 1, Lk).to(device)
    _skip_if_unsupported(backend, device, q, k, v, keypad)
    dout = torch.randn(B, H, Lq, D, generator=gen).to(dtype).to(device)

    def run(k_, v_):
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k_, v_))
        out = fa.scaled_dot_product_attention(qg, kg, vg, attn_mask=keypad, backend=backend)
        out.backward(dout)
        return out, qg.grad, kg.grad, vg.grad

    clean = run(k, v)
    k_bad, v_bad = k.clone(), v.clone()
    big = 300.0 if dtype == torch.float16 else 1e4
    for b in range(B):
        k_bad[b, :, valid[b]:] = big
        v_bad[b, :, valid[b]:] = -big
    dirty = run(k_bad, v_bad)
    for a, b_ in zip(clean, dirty):
        assert torch.equal(a, b_)
    for b in range(B):
        assert torch.equal(dirty[2][b, :, valid[b]:], torch.zeros_like(dirty[2][b, :, valid[b]:]))
        assert torch.equal(dirty[3][b, :, valid[b]:], torch.zeros_like(dirty[3][b, :, valid[b]:]))


@pytest.mark.parametrize("backend", kernel_backend_params(op.OP))
@pytest.mark.parametrize("mask_kind", ["none", "is_causal", "float_keypad"])
def test_dropout_matches_reference_with_the_same_keep_mask(backend, mask_kind):
    device, dtype = backend_device(backend), kernel_dtype(backend)
    B, H, Lq, Lk, D, p = 2, 2, 33, 45, 32, 0.2
    q, k, v, gen = _inputs(B, H, Lq, Lk, D, dtype, device, 8)
    mask, is_causal = make_mask(mask_kind, B, H, Lq, Lk, dtype, device, gen)
    torch.manual_seed(1234)
    seed = op.draw_seed()
    keep = op.dropout_keep_mask(backend, seed, B, H, Lq, Lk, p, device)
    assert 0.7 < keep.float().mean().item() < 0.9
    inputs = dict(query=q, key=k, value=v, attn_mask=mask, is_causal=is_causal, dropout_p=p)

    def run(**kw):
        torch.manual_seed(1234)  # the op draws the same seed
        return fa.scaled_dot_product_attention(**kw, backend=backend)

    def ref(**kw):
        return fa.reference.scaled_dot_product_attention(**kw, dropout_mask=keep.to(kw["query"].device))

    testing.assert_all_ok(testing.compare(run, ref, inputs, grad_names=["query", "key", "value"]))
    # reproducible from torch's seed, different for another seed
    torch.manual_seed(7)
    a = fa.scaled_dot_product_attention(q, k, v, dropout_p=p, backend=backend)
    torch.manual_seed(7)
    b = fa.scaled_dot_product_attention(q, k, v, dropout_p=p, backend=backend)
    c = fa.scaled_dot_product_attention(q, k, v, dropout_p=p, backend=backend)
    assert torch.equal(a, b) and not torch.equal(a, c)


LSE_BACKENDS = kernel_backend_params(op.OP) + ["torch", "reference"]


def _native_window(backend):
    return op.CAPABILITIES[backend].sliding_window


@pytest.mark.parametrize("backend", LSE_BACKENDS)
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("mask_kind", ["none", "is_causal", "causal_lower_right", "bool_keypad", "float_per_head"])
def test_return_lse_matches_reference(backend, gqa, mask_kind):
    """return_lse=True: the output and the log-sum-exp by the 2x rule, and every gradient with
    both outputs weighted (the log-sum-exp's gradient reaches the kernels as grad_lse)."""
    device, dtype = backend_device(backend), kernel_dtype(backend)
    B, H, Lq, Lk, D = 2, 2, 19, 27, 32
    q, k, v, gen = _inputs(B, H, Lq, Lk, D, dtype, device, stable_seed("lse", mask_kind, gqa), gqa=gqa)
    mask, is_causal = make_mask(mask_kind, B, H, Lq, Lk, dtype, device, gen)
    if mask_kind == "bool_keypad":
        mask[1] = False  # batch row 1 sees no key: output 0, lse -inf, zero gradients
    if backend not in ("torch", "reference"):
        _skip_if_unsupported(backend, device, q, k, v, mask, is_causal=is_causal)
    inputs = dict(query=q, key=k, value=v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa, return_lse=True)
    grads = ["query", "key", "value"] + (["attn_mask"] if mask_kind.startswith("float") else [])
    result = testing.compare(lambda **kw: fa.scaled_dot_product_attention(**kw, backend=backend),
                             fa.reference.scaled_dot_product_attention, inputs, grad_names=grads,
                             output_names=["output", "lse"])
    testing.assert_all_ok(result)
    out, lse = fa.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa,
                                               return_lse=True, backend=backend)
    assert lse.shape == (B, H, Lq) and lse.dtype == torch.float32
    if mask_kind == "bool_keypad":
        assert torch.equal(lse[1], torch.full_like(lse[1], float("-inf")))


@pytest.mark.parametrize("backend", kernel_backend_params(op.OP))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_over_split_keys_merges_to_the_whole(backend, causal):
    """Two calls over disjoint halves of the keys (return_lse=True), merged with
    merge_attention, are attention over all keys: forward and every gradient by the 2x rule,
    the gradients flowing through both partial log-sum-exps into the kernels."""
    device, dtype = backend_device(backend), kernel_dtype(backend)
    B, H, Lq, Lk, D = 1, 2, 21, 40, 32
    q, k, v, _ = _inputs(B, H, Lq, Lk, D, dtype, device, stable_seed("split", causal))
    split = 17
    keep = torch.ones(Lq, Lk, dtype=torch.bool, device=device)
    if causal:  # bottom-right causal over all keys; the first block holds keys 0..16 of every row
        keep = torch.ones(Lq, Lk, dtype=torch.bool, device=device).tril(Lk - Lq)
    _skip_if_unsupported(backend, device, q, k, v, keep)

    def split_attention(query, key, value):
        parts = [fa.scaled_dot_product_attention(query, key[:, :, cols], value[:, :, cols], attn_mask=keep[:, cols],
                                                 return_lse=True, backend=backend)
                 for cols in (slice(0, split), slice(split, None))]
        out, _ = fa.merge_attention([p[0] for p in parts], [p[1] for p in parts])
        return out

    def whole(query, key, value):
        return fa.reference.scaled_dot_product_attention(query, key, value, attn_mask=keep)

    testing.assert_all_ok(testing.compare(split_attention, whole, dict(query=q, key=k, value=v),
                                          grad_names=["query", "key", "value"]))


@pytest.mark.parametrize("backend", kernel_backend_params(op.OP))
def test_non_contiguous_inputs_use_strides(backend):
    """(B, L, H, D) tensors transposed to (B, H, L, D) go to the kernels as views."""
    device, dtype = backend_device(backend), kernel_dtype(backend)
    dv = 32 if backend in dispatch.CUDA_KERNEL_BACKENDS else 40  # the cuda kernels need Dv == D
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 29, 3, 32, generator=gen).to(device, dtype).transpose(1, 2)
    k = torch.randn(2, 41, 3, 32, generator=gen).to(device, dtype).transpose(1, 2)
    v = torch.randn(2, 41, 3, 48, generator=gen).to(device, dtype)[..., :dv].transpose(1, 2)  # sliced last dim too
    assert not q.is_contiguous() and op._to_4d(q).data_ptr() == q.data_ptr()
    testing.assert_all_ok(_check(backend, q, k, v, None, False))


@pytest.mark.parametrize("backend", kernel_backend_params(op.OP))
def test_expanded_and_overlapping_rows(backend):
    """q/k/v whose rows overlap (a row stride below the head dim: expanded along L, or a
    strided window) are read correctly (the cpu kernels once passed the stride to the BLAS
    as an illegal leading dimension: MKL printed an error and computed nothing)."""
    device, dtype = backend_device(backend), kernel_dtype(backend)
    gen = torch.Generator().manual_seed(33)
    q = torch.randn(1, 2, 1, 32, generator=gen).to(device, dtype).expand(1, 2, 29, 32)
    k = torch.randn(1, 2, 1, 32, generator=gen).to(device, dtype).expand(1, 2, 37, 32)
    base = torch.randn(2 * 37 * 8 + 32, generator=gen).to(device, dtype)
    v = base.as_strided((1, 2, 37, 32), (0, 37 * 8, 8, 1))  # rows overlapping by 24 elements
    testing.assert_all_ok(_check(backend, q, k, v, None, False))
    testing.assert_all_ok(_check(backend, k[:, :, :29], q[:, :, :1].expand(1, 2, 37, 32), v, None, True))


@pytest.mark.parametrize("backend", kernel_backend_params(op.OP))
def test_extra_memory_is_linear_in_length(backend):
    """No allocation of Lq*Lk elements in forward+backward (by construction: every buffer
    the launchers allocate is recorded); a float mask's gradient is the one exception."""
    from fused_attn import _alloc

    device = backend_device(backend)
    B, H, L, D = 1, 2, 200, 32
    q, k, v, _ = _inputs(B, H, L, L, D, torch.float16, device, 9)
    sizes = []
    real_empty = _alloc.empty

    def recording_empty(shape, dtype, dev):
        sizes.append(math.prod(shape))
        return real_empty(shape, dtype, dev)

    _alloc.empty = recording_empty
    try:
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        out = fa.scaled_dot_product_attention(qg, kg, vg, is_causal=True, backend=backend)
        out.sum().backward()
    finally:
        _alloc.empty = real_empty
    if backend == "triton":
        assert sizes, "the Triton launchers allocate through fused_attn._alloc"
    assert all(s < L * L for s in sizes), sizes
    if HAS_GPU and device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        L2 = 8192
        q, k, v, _ = _inputs(1, 1, L2, L2, 64, torch.float16, device, 9)
        base = torch.cuda.memory_allocated()
        fa.scaled_dot_product_attention(q, k, v, backend=backend)
        assert torch.cuda.max_memory_allocated() - base < 4 * L2 * 64 * 2 + 64 * L2  # O(L), not L^2 (128 MB)


@pytest.mark.parametrize("mask_kind", ["none", "is_causal", "causal_lower_right", "bool_keypad", "float_shared",
                                       "float_per_head"])
def test_cpu_kernel_many_blocks(mask_kind):
    """Sizes past the cpu kernel's tiles (forward 256 queries x 512 keys, backward 128 x 256):
    several query and key blocks, so the online softmax carries its state across key blocks."""
    if fa.available_backends()["cpu"] is not None:
        pytest.skip(fa.available_backends()["cpu"])
    B, H, Lq, Lk, D = 1, 2, 300, 1100, 24
    q, k, v, gen = _inputs(B, H, Lq, Lk, D, torch.float32, "cpu", 22)
    mask, is_causal = make_mask(mask_kind, B, H, Lq, Lk, torch.float32, "cpu", gen)
    testing.assert_all_ok(_check("cpu", q, k, v, mask, is_causal, mask_grad=mask_kind.startswith("float")))


def test_cpu_kernel_scores_rising_across_key_blocks():
    """Scores that grow along the keys by far more than e^16 (the forward's lazy rescaling
    threshold) within and across key blocks: the running max is raised many times."""
    if fa.available_backends()["cpu"] is not None:
        pytest.skip(fa.available_backends()["cpu"])
    gen = torch.Generator().manual_seed(23)
    Lq, Lk, D = 70, 1300, 16
    q = torch.randn(1, 1, Lq, D, generator=gen) * 0.1
    q[..., 0] = 4.0
    k = torch.randn(1, 1, Lk, D, generator=gen) * 0.1
    k[..., 0] = torch.linspace(-30, 30, Lk)  # scores from about -30 to +30 (scale 1/4)
    v = torch.randn(1, 1, Lk, D, generator=gen)
    for is_causal in (False, True):
        testing.assert_all_ok(_check("cpu", q, k, v, None, is_causal))


def test_cpu_thread_count_independent():
    """1 and 2 threads both meet the 2x rule. The cpu kernels split work by problem size,
    never by thread count; the BLAS underneath (MKL) may still round differently per thread
    count unless MKL_CBWR=AUTO,STRICT is set, in which case they are bit-identical."""
    if fa.available_backends()["cpu"] is not None:
        pytest.skip(fa.available_backends()["cpu"])
    q, k, v, _ = _inputs(1, 2, 300, 300, 32, torch.float32, "cpu", 21, gqa=True)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            testing.assert_all_ok(_check("cpu", q, k, v, None, True, enable_gqa=True))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("backend", kernel_backend_params(op.OP))
def test_deterministic(backend):
    device = backend_device(backend)
    q, k, v, _ = _inputs(2, 4, 65, 65, 32, torch.float16, device, 10, gqa=True)
    results = []
    for _ in range(50 if device == "cuda" else 3):  # the GPU suite repeats 50 times
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        out = fa.scaled_dot_product_attention(qg, kg, vg, is_causal=True, enable_gqa=True, backend=backend)
        out.backward(torch.ones_like(out))
        results.append((out, qg.grad, kg.grad, vg.grad))
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", kernel_backend_params(op.OP))
def test_attention_custom_op_opcheck(backend):
    device, dtype = backend_device(backend), kernel_dtype(backend)
    q, k, v, gen = _inputs(1, 2, 19, 23, 32, dtype, device, 11)
    mask = torch.randn(1, 1, 19, 23, generator=gen).to(device, dtype)
    args = (q, k, v, mask.expand(1, 2, 19, 23), 2, 0, 0.25, 0.0, None, -1, -1, 0.0, None, backend)
    torch.library.opcheck(op.attention_fwd, args, test_utils=("test_schema", "test_faketensor",
                                                              "test_autograd_registration"))
    if _native_window(backend):  # with a sliding window, softcap and ALiBi the kernels apply themselves
        softcap = 1.5 if op.CAPABILITIES[backend].softcap else 0.0
        slopes = torch.tensor([0.25, 0.5], device=device).expand(1, 2) if op.CAPABILITIES[backend].alibi else None
        args = (q, k, v, mask.expand(1, 2, 19, 23), 2, 0, 0.25, 0.0, None, 5, 2, softcap, slopes, backend)
        torch.library.opcheck(op.attention_fwd, args, test_utils=("test_schema", "test_faketensor",
                                                                  "test_autograd_registration"))


def test_torch_compile_fullgraph_attention():
    backend = "triton" if fa.available_backends()["triton"] is None else "torch"
    device = backend_device(backend) if backend == "triton" else "cpu"
    q, k, v, _ = _inputs(1, 2, 17, 17, 16, torch.float32, device, 12)
    mask = torch.randn(17, 17).to(device)

    def f(q, k, v, m):
        return fa.scaled_dot_product_attention(q, k, v, attn_mask=m, backend=backend) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    qg = q.clone().requires_grad_()
    out = compiled(qg, k, v, mask)
    torch.testing.assert_close(out, f(q, k, v, mask))
    out.sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()


@pytest.mark.parametrize("mask_kind", ["none", "is_causal", "bool_keypad", "float_per_head", "causal_lower_right"])
def test_reference_agrees_with_torch(mask_kind):
    B, H, Lq, Lk, D = 2, 4, 13, 13, 16
    q, k, v, gen = _inputs(B, H, Lq, Lk, D, torch.float64, "cpu", 13)
    mask, is_causal = make_mask(mask_kind, B, H, Lq, Lk, torch.float64, "cpu", gen)
    if mask is not None and mask_kind.startswith("float"):
        mask = mask.clamp_min(-1e4)  # torch's math path turns fully -inf rows into NaN
    if mask is not None and mask_kind.startswith("bool"):
        mask[..., 0] = True  # no fully masked row: torch and the reference define those differently
    ours = fa.reference.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    torch.testing.assert_close(ours, theirs)
    kv = k[:, :2], v[:, :2]
    torch.testing.assert_close(fa.reference.scaled_dot_product_attention(q, *kv, enable_gqa=True),
                               F.scaled_dot_product_attention(q, *kv, enable_gqa=True))


def test_torch_backend_runs_every_mask_kind():
    q, k, v, gen = _inputs(1, 2, 9, 9, 16, torch.float32, "cpu", 14)
    for kind in MASKS:
        mask, is_causal = make_mask(kind, 1, 2, 9, 9, torch.float32, "cpu", gen)
        if mask is not None and not isinstance(mask, torch.Tensor) or (mask is not None and mask.dtype == torch.bool):
            pass
        out = fa.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, backend="torch")
        assert out.shape == (1, 2, 9, 16)


@pytest.mark.parametrize("backend", ["auto", "cpu", "triton", "torch", "reference"])
def test_head_dim_zero_gives_the_mean_of_the_values(backend):
    """Head dim 0: every score is 0, so each query averages the values (torch's answer);
    the default scale 1/sqrt(0) once raised ZeroDivisionError in every backend."""
    if backend in ("cpu", "triton") and fa.available_backends()[backend] is not None:
        pytest.skip(fa.available_backends()[backend])
    q = torch.randn(2, 3, 4, 0, requires_grad=True)
    k, v = torch.randn(2, 3, 5, 0), torch.randn(2, 3, 5, 7, requires_grad=True)
    out = fa.scaled_dot_product_attention(q, k, v, backend=backend)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(out, v.mean(dim=2, keepdim=True).expand(2, 3, 4, 7))
    out.sum().backward()
    torch.testing.assert_close(v.grad, torch.full_like(v, 4 / 5))


def test_numpy_scalars_are_numbers():
    """dropout_p and scale as numpy scalars, as torch accepts them (they raised TypeError)."""
    import numpy as np

    q = torch.randn(1, 2, 5, 8)
    out = fa.scaled_dot_product_attention(q, q, q, scale=np.float32(0.5), backend="reference")
    torch.testing.assert_close(out, fa.scaled_dot_product_attention(q, q, q, scale=0.5, backend="reference"))
    torch.manual_seed(0)
    a = fa.scaled_dot_product_attention(q, q, q, dropout_p=np.float32(0.25))
    torch.manual_seed(0)
    torch.testing.assert_close(a, fa.scaled_dot_product_attention(q, q, q, dropout_p=float(np.float32(0.25))))


def test_empty_and_keyless_inputs():
    q = torch.randn(2, 3, 0, 16)
    k = torch.randn(2, 3, 5, 16)
    assert fa.scaled_dot_product_attention(q, k, k).shape == (2, 3, 0, 16)
    q = torch.randn(2, 3, 4, 16, requires_grad=True)
    k = torch.randn(2, 3, 0, 16)
    out = fa.scaled_dot_product_attention(q, k, k, backend="triton" if fa.available_backends()["triton"] is None
                                          else "auto")
    assert torch.equal(out, torch.zeros(2, 3, 4, 16))


# --------------------------------------------------------------------------- bad input

Q = torch.randn(2, 3, 5, 8)
K = torch.randn(2, 3, 7, 8)


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(query=torch.randn(8)), ValueError, "query must have at least 2 dimensions"),
    (dict(query=[1.0]), TypeError, "query must be a torch.Tensor"),
    (dict(key=torch.randn(3, 3, 7, 8)), ValueError, "batch dims must broadcast"),
    (dict(key=torch.randn(2, 3, 7, 9)), ValueError, "key's head dim must equal query's"),
    (dict(value=torch.randn(2, 3, 6, 8)), ValueError, "value must have key's sequence length"),
    (dict(key=torch.randn(2, 2, 7, 8), value=torch.randn(2, 2, 7, 8)), ValueError, "pass enable_gqa=True"),
    (dict(key=torch.randn(2, 2, 7, 8), value=torch.randn(2, 2, 7, 8), enable_gqa=True), ValueError,
     "multiple of key/value's"),
    (dict(key=torch.randn(3, 7, 8)), ValueError, "same number of dimensions"),
    (dict(value=torch.randn(2, 3, 7, 8, dtype=torch.float64)), TypeError, "value must have the same dtype as query"),
    (dict(attn_mask=torch.ones(4, 5, 7, dtype=torch.bool)), ValueError, "attn_mask must broadcast"),
    (dict(attn_mask=torch.ones(5, 6)), ValueError, "attn_mask must broadcast"),
    (dict(attn_mask=torch.ones(5, 7, dtype=torch.int32)), TypeError, "attn_mask must be bool or floating point"),
    (dict(attn_mask=[[True]]), TypeError, "attn_mask must be a bool or float tensor"),
    (dict(attn_mask=torch.ones(5, 7, dtype=torch.bool), is_causal=True), ValueError, "cannot be used together"),
    (dict(attn_mask=causal_lower_right(4, 7)), ValueError, "causal attn_mask was made for"),
    (dict(dropout_p=1.0), ValueError, "dropout_p must be in \\[0, 1\\)"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p must be in"),
    (dict(scale=float("nan")), ValueError, "scale must be finite"),
    (dict(scale="0.1"), TypeError, "scale must be a number"),
    (dict(is_causal=1), TypeError, "is_causal must be a bool"),
    (dict(backend="flash"), ValueError, "backend must be 'auto' or one of"),
])
def test_bad_input_raises_clear_error(kwargs, exc, words):
    args = dict(query=Q, key=K, value=K)
    args.update(kwargs)
    with pytest.raises(exc, match=words):
        fa.scaled_dot_product_attention(**args)


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU to place a tensor on another device")
def test_query_on_another_device_than_key():
    with pytest.raises(ValueError, match="key must be on the same device as query"):
        fa.scaled_dot_product_attention(Q.cuda(), K, K)


def test_device_mismatch_message_without_gpu():
    q = torch.randn(1, 1, 2, 4, device="meta")
    with pytest.raises(ValueError, match="key must be on the same device as query"):
        fa.scaled_dot_product_attention(q, torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4))


def test_named_backend_that_cannot_run_lists_every_reason():
    q = torch.randn(1, 1, 4, 300, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="backend 'triton' cannot run"):
        fa.scaled_dot_product_attention(q, q, q, backend="triton")


def test_dropout_keep_mask_is_the_same_in_every_backend():
    """One Philox convention: the same seed drops the same elements in cpu, triton and cuda."""
    backends = [b for b in ("cpu", "triton", "cuda") if fa.available_backends()[b] is None]
    if len(backends) < 2:
        pytest.skip(f"only {backends} usable here")
    seed = torch.tensor(123456789012345)
    masks = [op.dropout_keep_mask(b, seed, 2, 3, 37, 53, 0.3, backend_device(b)).cpu() for b in backends]
    assert 0.6 < masks[0].float().mean() < 0.8
    for m in masks[1:]:
        assert torch.equal(masks[0], m)


def test_cuda_attention_op_is_registered_and_declines_what_it_cannot_run():
    """Without a GPU the CUDA kernels cannot run, but they are built and registered: the
    operator has a CUDA kernel with the shared schema, and the backend states its limits."""
    import fused_attn._ext as ext

    if ext.load_error is not None or not ext.C.has_cuda():
        pytest.skip("fused_attn._C was built without the CUDA kernels")
    for name in ("attention_fwd", "attention_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_attn_C::{name}", "CUDA")
    schema = str(torch.ops.fused_attn_C.attention_fwd.default._schema)
    assert "Tensor? mask, int mask_kind, int causal, float scale, float dropout_p, int seed" in schema
    supports = op.OP.entries["cuda"].supports
    q = torch.empty(1, 1, 4, 64)
    assert "is not one of torch.float16, torch.bfloat16" in " ".join(
        supports(query=q, key=q, value=q, attn_mask=None, dropout_p=0.0, mask_kind="none"))
    q16 = torch.empty(1, 1, 4, 40, dtype=torch.float16)
    assert "head dims 32, 64, 96, 128, 256" in " ".join(supports(query=q16, key=q16, value=q16, attn_mask=None,
                                                                   dropout_p=0.0, mask_kind="none"))
    if not HAS_GPU:
        with pytest.raises(NotImplementedError, match="backend 'cuda' cannot run.*no GPU"):
            fa.scaled_dot_product_attention(q16, q16, q16, backend="cuda")
