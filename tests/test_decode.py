"""decode_attention (a few queries against a contiguous or paged KV cache, split over the keys)
on every backend that has it, against the float64 reference by the 2x rule: output and
log-sum-exp, GQA, empty and full caches, causal and windows at the sequence's own length,
softcap, ALiBi, sinks, forced and automatic splits; bit-identical results whatever the thread count;
argument errors."""

import pytest
import torch

import fused_attn as fa
from fused_attn import dispatch, testing
from fused_attn.ops import decode as op

from conftest import backend_device, kernel_backend_params, sixteen_bit_at_small_sizes_only, stable_seed

BACKENDS = kernel_backend_params(op.OP) + ["torch"]

# name -> B, Lq, Hq, Hk, D, Dv, page (None: contiguous cache), pages per sequence, extra arguments
CASES = {
    "one query, contiguous": (3, 1, 4, 4, 32, 32, None, 1, {}),
    "gqa, pages of 16": (4, 1, 8, 2, 64, 64, 16, 6, {"is_causal": True}),
    "mqa, odd head dims, 3 splits": (2, 3, 6, 1, 40, 24, 32, 3, {"is_causal": True, "num_splits": 3}),
    "16 queries, window": (2, 16, 4, 2, 32, 32, 16, 8, {"is_causal": True, "window_size": (20, 0)}),
    "window both sides, not causal": (3, 5, 2, 2, 16, 16, 16, 4, {"window_size": (7, 3), "num_splits": 2}),
    "pages of 256": (2, 1, 2, 1, 64, 64, 256, 2, {"num_splits": 4}),
    "softcap": (2, 2, 4, 2, 32, 32, 16, 4, {"softcap": 3.0, "is_causal": True}),
    "sinks": (2, 2, 4, 2, 32, 32, 16, 4, {"sinks": True, "is_causal": True}),
    # ALiBi per sequence (B, Hq) with GQA and a window; shared (Hq,) with softcap, not causal, over
    # splits: distances on both sides of the query's position, slopes steep enough to flush far keys
    "alibi per sequence, window": (3, 4, 6, 2, 32, 32, 16, 6, {"alibi": "batch", "is_causal": True,
                                                                "window_size": (40, 0)}),
    "alibi shared, softcap, 3 splits": (2, 3, 4, 4, 64, 48, 32, 4, {"alibi": "heads", "softcap": 5.0,
                                                                     "num_splits": 3}),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIXTEEN_BIT_CASES = ("gqa, pages of 16", "mqa, odd head dims, 3 splits", "alibi per sequence, window")


def _case(name, backend, dtype):
    B, Lq, Hq, Hk, D, Dv, page, pages, extra = CASES[name]
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(stable_seed("decode", name))
    rnd = lambda *s: torch.randn(*s, generator=gen).to(dtype).to(device)  # noqa: E731
    extra = dict(extra)
    capacity = (page or 37) * pages
    # lengths: an empty cache, a full one, one shorter than the queries, the rest in between
    lengths = [0, capacity, min(Lq - 1, capacity)] + torch.randint(1, capacity + 1, (B,), generator=gen).tolist()
    inputs = dict(query=rnd(B, Lq, Hq, D),
                  cache_seqlens=torch.tensor(lengths[:B], dtype=torch.int32, device=device))
    if page is None:
        inputs.update(k_cache=rnd(B, capacity, Hk, D), v_cache=rnd(B, capacity, Hk, Dv))
    else:
        pool = B * pages + 3  # pages in shuffled order, some unused
        inputs.update(k_cache=rnd(pool, page, Hk, D), v_cache=rnd(pool, page, Hk, Dv),
                      block_table=torch.randperm(pool, generator=gen)[:B * pages].view(B, pages).int().to(device))
    if extra.pop("sinks", False):
        extra["sinks"] = rnd(Hq)
    alibi = extra.pop("alibi", None)
    if alibi is not None:  # the geometric slopes 2^(-8 h / Hq), the last sequence's 4x steeper
        slopes = 2.0 ** (-8.0 * torch.arange(1, Hq + 1) / Hq)
        slopes = slopes if alibi == "heads" else slopes * torch.tensor([1.0] * (B - 1) + [4.0])[:, None]
        extra["alibi_slopes"] = slopes.to(device)
    return {**inputs, **extra}


def _declined(backend, inputs):
    return op.OP.reasons(backend, inputs["query"].device, query=inputs["query"], v_cache=inputs["v_cache"],
                         softcap=inputs.get("softcap", 0.0))


def _reference(**kw):
    kw.pop("num_splits", None)
    return fa.reference.decode_attention(**kw, return_lse=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_decode_matches_the_reference(name, backend, dtype):
    if sixteen_bit_at_small_sizes_only(backend, dtype) and name not in SIXTEEN_BIT_CASES:
        pytest.skip("16-bit types run three cases under the Triton interpreter (make test's time budget)")
    inputs = _case(name, backend, dtype)
    why = _declined(backend, inputs)
    assert not why, why  # every kernel takes every case (softcap and windows included)
    before = dispatch.calls[("decode_attention", backend)]
    result = testing.compare(lambda **kw: fa.decode_attention(**kw, return_lse=True, backend=backend), _reference,
                             inputs, output_names=["output", "lse"])
    testing.assert_all_ok(result)
    assert dispatch.calls[("decode_attention", backend)] > before


@pytest.mark.parametrize("backend", BACKENDS)
def test_splits_change_rounding_only(backend):
    """1, 2 and 7 splits (and the automatic choice) all hold the 2x rule; an empty split is harmless."""
    inputs = _case("gqa, pages of 16", backend, torch.float32)
    for splits in (1, 2, 7, 0):
        result = testing.compare(lambda **kw: fa.decode_attention(**kw, num_splits=splits, return_lse=True,
                                                                  backend=backend), _reference, inputs,
                                 output_names=["output", "lse"])
        testing.assert_all_ok(result)


def test_cpu_results_do_not_depend_on_the_thread_count():
    inputs = _case("gqa, pages of 16", "cpu", torch.float32)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(fa.decode_attention(**inputs, return_lse=True, backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    for o, lse in outs[1:]:
        assert torch.equal(o, outs[0][0]) and torch.equal(lse, outs[0][1])


def test_contiguous_cache_equals_its_pages():
    """A contiguous cache and the same keys scattered over pages give the same result (the cpu
    kernel's tiles end at page boundaries, so its rounding may differ in the last bits)."""
    gen = torch.Generator().manual_seed(3)
    B, L, Hk, D, page = 2, 64, 2, 32, 16
    k, v = torch.randn(B, L, Hk, D, generator=gen), torch.randn(B, L, Hk, D, generator=gen)
    q = torch.randn(B, 2, 4, D, generator=gen)
    lens = torch.tensor([50, 64], dtype=torch.int32)
    order = torch.randperm(B * L // page, generator=gen)
    table = order.view(B, L // page).int()
    pool_k, pool_v = torch.empty(B * L // page, page, Hk, D), torch.empty(B * L // page, page, Hk, D)
    pool_k[order] = k.reshape(-1, page, Hk, D)
    pool_v[order] = v.reshape(-1, page, Hk, D)
    for backend in ("cpu", "torch"):
        a = fa.decode_attention(q, k, v, lens, is_causal=True, num_splits=1, backend=backend)
        b = fa.decode_attention(q, pool_k, pool_v, lens, block_table=table, is_causal=True, num_splits=1,
                                backend=backend)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=backend)


def _good():
    q = torch.randn(2, 1, 4, 16)
    k, v = torch.randn(6, 16, 2, 16), torch.randn(6, 16, 2, 16)
    return dict(query=q, k_cache=k, v_cache=v, cache_seqlens=torch.tensor([3, 20], dtype=torch.int32),
                block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32))


BAD = {
    "query 3-D": (dict(query=torch.randn(2, 4, 16)), ValueError, "query must be (B, Lq, Hq, D)"),
    "dtype mismatch": (dict(k_cache=torch.randn(6, 16, 2, 16, dtype=torch.float64)), TypeError, "k_cache"),
    "head dim": (dict(k_cache=torch.randn(6, 16, 2, 8), v_cache=torch.randn(6, 16, 2, 8)), ValueError,
                 "head dim must equal"),
    "heads": (dict(k_cache=torch.randn(6, 16, 3, 16), v_cache=torch.randn(6, 16, 3, 16)), ValueError,
              "multiple of the cache's heads"),
    "length past capacity": (dict(cache_seqlens=torch.tensor([3, 33], dtype=torch.int32)), ValueError,
                             "cache_seqlens must lie in [0, 32]"),
    "negative length": (dict(cache_seqlens=torch.tensor([-1, 3], dtype=torch.int32)), ValueError, "cache_seqlens"),
    "float lengths": (dict(cache_seqlens=torch.tensor([1.0, 3.0])), TypeError, "cache_seqlens must be int32"),
    "page out of range": (dict(block_table=torch.tensor([[0, 1], [2, 6]], dtype=torch.int32)), ValueError,
                          "must index k_cache's 6 pages"),
    "table rows": (dict(block_table=torch.tensor([[0, 1]], dtype=torch.int32)), ValueError, "block_table must have"),
    "contiguous batch": (dict(block_table=None), ValueError, "contiguous k_cache must have query's batch"),
    "splits": (dict(num_splits=-1), ValueError, "num_splits"),
    "softcap": (dict(softcap=-1.0), ValueError, "softcap"),
    "sinks shape": (dict(sinks=torch.randn(3)), ValueError, "sinks must have shape (4,)"),
    "alibi shape": (dict(alibi_slopes=torch.rand(3, 4)), ValueError, "alibi_slopes must have shape (4,) or (2, 4)"),
    "alibi dtype": (dict(alibi_slopes=torch.ones(4, dtype=torch.int64)), TypeError, "alibi_slopes"),
    "window": (dict(window_size=(2,)), ValueError, "window_size"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_arguments_raise_naming_the_argument(name):
    change, error, words = BAD[name]
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        fa.decode_attention(**{**_good(), **change}, backend="cpu")


def test_page_entries_past_the_cached_keys_are_never_read():
    """Entries of the block table past a sequence's pages may hold anything (a free slot's -1)."""
    args = _good()
    args["block_table"] = torch.tensor([[0, -1], [2, 3]], dtype=torch.int32)
    for backend in ("cpu", "torch"):
        out = fa.decode_attention(**args, backend=backend)
        ref = fa.reference.decode_attention(**{**args, "block_table": args["block_table"].clamp(min=0)})
        torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_queries_and_zero_width_values(backend):
    device = backend_device(backend)
    args = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in _good().items()}
    out, lse = fa.decode_attention(**{**args, "query": args["query"][:, :0]}, return_lse=True, backend=backend)
    assert out.shape == (2, 0, 4, 16) and lse.shape == (2, 4, 0)
    out = fa.decode_attention(**{**args, "v_cache": args["v_cache"][..., :0]}, backend=backend)
    assert out.shape == (2, 1, 4, 0)


def test_gradients_are_refused_clearly():
    args = _good()
    args["query"].requires_grad_(True)
    with pytest.raises(NotImplementedError, match="no backward"):
        fa.decode_attention(**args)
    with torch.no_grad():
        fa.decode_attention(**args)


def test_a_backend_without_a_decode_kernel_says_so():
    with pytest.raises(NotImplementedError, match="has no decode_attention implementation"):
        fa.decode_attention(**_good(), backend="cuda_emu")
