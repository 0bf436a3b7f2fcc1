"""FlashAttention's features on every backend against the float64 reference by the 2x rule,
forward and every gradient: sliding windows, softcap, ALiBi, sinks (with masks, causal
variants, GQA and dropout), and varlen_attention over packed sequences (empty ones,
Lq != Lk, seqused_k, a paged cache), plus their argument errors."""

import dataclasses

import pytest
import torch

import fused_attn as fa
from fused_attn import _ext, dispatch, testing
from fused_attn.ops import attention as op
from fused_attn.ops import varlen

from conftest import backend_device, kernel_backend_params, kernel_dtype, stable_seed

BACKENDS = kernel_backend_params(op.OP) + ["torch"]

FEATURES = {
    "window": dict(window_size=(5, 3)),
    "causal window": dict(window_size=(6, 0)),
    "left only": dict(window_size=(4, -1)),
    "alibi": dict(alibi_slopes="heads"),
    "alibi per batch": dict(alibi_slopes="batch"),
    "alibi slopes' gradient": dict(alibi_slopes="batch", slopes_grad=True, mask="float"),
    "sinks": dict(sinks=True),
    "softcap": dict(softcap=1.5),
    "softcap + window + float mask, gqa": dict(softcap=2.0, window_size=(6, 2), mask="float", gqa=True),
    "all but softcap, is_causal, gqa": dict(window_size=(8, 0), alibi_slopes="heads", sinks=True, is_causal=True,
                                            gqa=True),
    "window + float mask": dict(window_size=(3, 3), mask="float"),
    "alibi + bool key padding": dict(alibi_slopes="heads", mask="bool"),
}


def _case(name, backend, B=2, H=4, Lq=19, Lk=26, D=32):
    spec = dict(FEATURES[name])
    device, dtype = backend_device(backend), kernel_dtype(backend)
    gen = torch.Generator().manual_seed(stable_seed("features", name))
    hk = 2 if spec.pop("gqa", False) else H
    rnd = lambda *s: torch.randn(*s, generator=gen).to(dtype).to(device)  # noqa: E731
    inputs = dict(query=rnd(B, H, Lq, D), key=rnd(B, hk, Lk, D), value=rnd(B, hk, Lk, D), enable_gqa=hk != H)
    mask = spec.pop("mask", None)
    if mask == "float":
        inputs["attn_mask"] = (torch.randn(B, 1, Lq, Lk, generator=gen) * 2).to(dtype).to(device)
    elif mask == "bool":
        keep = torch.rand(B, 1, 1, Lk, generator=gen) > 0.3
        keep[1] = False  # every key of batch row 1 masked
        inputs["attn_mask"] = keep.to(device)
    slopes = spec.pop("alibi_slopes", None)
    spec.pop("slopes_grad", None)
    if slopes is not None:
        shape = (H,) if slopes == "heads" else (B, H)
        inputs["alibi_slopes"] = (torch.rand(shape, generator=gen) * 0.5).to(device)
    if spec.pop("sinks", False):
        inputs["sinks"] = torch.randn(H, generator=gen).to(dtype).to(device)  # a model's parameter: its dtype
    inputs.update(spec)
    return inputs


def _declined(backend, inputs):
    """Why backend cannot run these inputs (decided as the public function decides)."""
    args = {k: v for k, v in inputs.items() if k != "sinks"}
    return op.reasons(backend, **args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_features_match_the_reference(backend, feature):
    inputs = _case(feature, backend)
    why = _declined(backend, inputs)
    if why:
        assert "softcap" in feature and not op.CAPABILITIES[backend].softcap and any("softcap" in w for w in why), why
        pytest.skip("; ".join(why))
    grads = ["query", "key", "value"] + [n for n in ("sinks", "attn_mask") if n in inputs and
                                         inputs[n].is_floating_point()]
    if FEATURES[feature].get("slopes_grad"):  # slopes needing a gradient go into the float mask
        grads.append("alibi_slopes")
    _assert_backend_matches_the_reference(backend, inputs, grads)


def _assert_backend_matches_the_reference(backend, inputs, grads):
    """Output, log-sum-exp and the gradients `grads` of backend's attention against the float64
    reference by the 2x rule, and the backend itself ran."""
    before = dispatch.calls[("scaled_dot_product_attention", backend)]
    result = testing.compare(lambda **kw: fa.scaled_dot_product_attention(**kw, return_lse=True, backend=backend),
                             lambda **kw: fa.reference.scaled_dot_product_attention(**kw, return_lse=True), inputs,
                             grad_names=grads, output_names=["output", "lse"])
    testing.assert_all_ok(result)
    assert dispatch.calls[("scaled_dot_product_attention", backend)] > before


def test_softcap_runs_in_every_kernel_and_a_kernel_without_it_declines(monkeypatch):
    """Every kernel backend caps scores itself (the case runs there, no fallback); one whose
    capability lacked softcap would decline it by name rather than ignore it."""
    assert all(c.softcap for c in op.CAPABILITIES.values())
    for backend in ("cpu", "cuda_emu", "triton"):
        if fa.available_backends()[backend] is not None:
            continue
        before = dispatch.calls[("scaled_dot_product_attention", backend)]
        fa.scaled_dot_product_attention(**_case("softcap", backend), backend=backend)
        assert dispatch.calls[("scaled_dot_product_attention", backend)] == before + 1
    monkeypatch.setitem(op.CAPABILITIES, "cpu", dataclasses.replace(op.CAPABILITIES["cpu"], softcap=False))
    with pytest.raises(NotImplementedError, match="softcap is not in these kernels"):
        fa.scaled_dot_product_attention(**_case("softcap", "cpu"), backend="cpu")


@pytest.mark.parametrize("backend", kernel_backend_params(op.OP))
def test_sinks_with_dropout_use_the_kernels_keep_mask(backend):
    """Dropout acts on the probabilities that include the sink: with the kernels' own keep-mask
    the reference agrees, output and gradients (the sink's too)."""
    inputs = _case("sinks", backend)
    q = inputs["query"]
    B, H, Lq, _ = q.shape
    Lk = inputs["key"].size(2)
    torch.manual_seed(11)
    keep = op.dropout_keep_mask(backend, op.draw_seed(), B, H, Lq, Lk, 0.25, q.device)

    def run(**kw):
        torch.manual_seed(11)
        return fa.scaled_dot_product_attention(**kw, dropout_p=0.25, backend=backend)

    def ref(**kw):
        return fa.reference.scaled_dot_product_attention(**kw, dropout_p=0.25, dropout_mask=keep.to(q.device))

    testing.assert_all_ok(testing.compare(run, ref, inputs, grad_names=["query", "key", "value", "sinks"]))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(window_size=(2,)), ValueError, "window_size must be a pair"),
    (dict(window_size=(-2, 0)), ValueError, "window_size must be a pair"),
    (dict(softcap=-1.0), ValueError, "softcap must be >= 0"),
    (dict(softcap="x"), TypeError, "softcap must be a number"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must have shape \(4,\) or \(2, 4\)"),
    (dict(alibi_slopes=torch.ones(4, dtype=torch.int64)), TypeError, "alibi_slopes must be a floating-point"),
    (dict(sinks=torch.ones(2, 4)), ValueError, r"sinks must have shape \(4,\)"),
    (dict(return_lse="yes"), TypeError, "return_lse must be a bool"),
])
def test_feature_arguments_are_checked(kwargs, error, match):
    q = torch.randn(2, 4, 5, 8)
    with pytest.raises(error, match=match):
        fa.scaled_dot_product_attention(q, q, q, **kwargs)


def test_cpu_operators_check_the_feature_arguments_they_are_given():
    """The C++ operators validate the window, softcap and slopes themselves (not only through
    fa.scaled_dot_product_attention / fa.decode_attention)."""
    if fa.available_backends()["cpu"] is not None:
        pytest.skip(fa.available_backends()["cpu"])
    ops = torch.ops.fused_attn_C
    q = torch.randn(2, 4, 5, 8)

    def fwd(**kw):
        return ops.attention_fwd(q, q, q, None, 0, 0, 0.5, 0.0, 0, **kw)

    fwd(alibi=torch.ones(4).expand(2, 4))  # shared slopes: a view with batch stride 0
    for alibi, error, match in [
            (torch.ones(4, 2), ValueError, r"alibi must be a \(B, H\) = \(2, 4\) view .* got shape \[4, 2\]"),
            (torch.ones(4, 2).t(), ValueError, "unit head stride"),
            (torch.ones(2, 4, dtype=torch.float64), TypeError, "alibi must be float32, got shape .*, dtype Double")]:
        with pytest.raises(error, match=match):
            fwd(alibi=alibi)
    with pytest.raises(ValueError, match=r"window_size must be \(left, right\), each >= 0 or -1, got \(-2, 0\)"):
        fwd(window_left=-2, window_right=0)
    with pytest.raises(ValueError, match="softcap must be finite and >= 0, got -1"):
        fwd(softcap=-1.0)
    cache = torch.randn(2, 16, 4, 8)
    lens, table = torch.tensor([3, 16], dtype=torch.int32), torch.tensor([[0], [1]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"alibi must be a \(B, H\) = \(2, 4\) view"):
        ops.attention_decode(q.transpose(1, 2), cache, cache, lens, table, 0.5, False, -1, -1, 0.0, 1, torch.ones(4))


# ----------------------------------------------------------------------------- varlen

def _packed(backend, lengths_q, lengths_k, H=4, HK=2, D=32, seed=0):
    device, dtype = backend_device(backend), kernel_dtype(backend)
    gen = torch.Generator().manual_seed(seed)
    cu = lambda ls: torch.tensor([0] + torch.tensor(ls).cumsum(0).tolist(), dtype=torch.int32,  # noqa: E731
                                 device=device)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(dtype).to(device)  # noqa: E731
    return dict(query=rnd(sum(lengths_q), H, D), key=rnd(sum(lengths_k), HK, D), value=rnd(sum(lengths_k), HK, D),
                cu_seqlens_q=cu(lengths_q), cu_seqlens_k=cu(lengths_k), max_q=max(lengths_q), max_k=max(lengths_k),
                enable_gqa=HK != H)


VARLEN = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "causal window": dict(is_causal=True, window_size=(4, -1)),
    "alibi per sequence + sinks": dict(alibi_slopes="per sequence", sinks=True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(VARLEN))
def test_varlen_matches_the_reference(backend, variant):
    """Lengths with an empty sequence, a query-only one (no keys: 0 and -inf) and Lq != Lk."""
    lq, lk = [7, 0, 12, 3, 5], [9, 4, 12, 0, 5]
    inputs = _packed(backend, lq, lk, seed=stable_seed("varlen", variant))
    spec = dict(VARLEN[variant])
    if spec.pop("alibi_slopes", None):
        inputs["alibi_slopes"] = (torch.rand(len(lq), 4, generator=torch.Generator().manual_seed(1)) * 0.5).to(
            inputs["query"].device)
    if spec.pop("sinks", False):
        inputs["sinks"] = torch.randn(4, generator=torch.Generator().manual_seed(2)).to(inputs["query"])
    inputs.update(spec)
    grads = ["query", "key", "value"] + (["sinks"] if "sinks" in inputs else [])
    before = dispatch.calls[("scaled_dot_product_attention", backend)]
    result = testing.compare(lambda **kw: fa.varlen_attention(**kw, return_lse=True, backend=backend),
                             lambda **kw: fa.reference.varlen_attention(**kw, return_lse=True), inputs,
                             grad_names=grads, output_names=["output", "lse"])
    testing.assert_all_ok(result)
    # PACKED_BACKENDS: every sequence in one call of the kernels; the others a call per sequence with queries
    assert dispatch.calls[("scaled_dot_product_attention", backend)] - before == (
        1 if backend in varlen.PACKED_BACKENDS else 4)


@pytest.mark.parametrize("backend", kernel_backend_params(op.OP))
def test_paged_cache_and_seqused_k_equal_the_contiguous_cache(backend):
    """A decode step (2 queries per sequence) against a paged cache, pages in shuffled order,
    the last page partly used, equals attention over the contiguous keys, the pool's gradient
    too; seqused_k alone (cache slots longer than their sequences) too."""
    used, page, slot = [5, 17, 9], 4, 20
    packed = _packed(backend, [2, 2, 2], used, seed=3)
    q, k, v = packed["query"], packed["key"], packed["value"]
    device = q.device
    gen = torch.Generator().manual_seed(4)
    want = fa.varlen_attention(q, k, v, packed["cu_seqlens_q"], packed["cu_seqlens_k"], 2, max(used),
                               enable_gqa=True, backend=backend)
    # the same keys in slots of 20 rows, the first `used` of each valid
    slots_k, slots_v = (torch.randn(3 * slot, *k.shape[1:], generator=gen).to(k) for _ in range(2))
    ck = packed["cu_seqlens_k"].tolist()
    for i, n in enumerate(used):
        slots_k[i * slot:i * slot + n], slots_v[i * slot:i * slot + n] = k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]]
    cu_slots = torch.arange(0, 3 * slot + 1, slot, dtype=torch.int32, device=device)
    seqused = torch.tensor(used, dtype=torch.int32, device=device)
    got = fa.varlen_attention(q, slots_k, slots_v, packed["cu_seqlens_q"], cu_slots, 2, slot, seqused_k=seqused,
                              enable_gqa=True, backend=backend)
    torch.testing.assert_close(got, want)
    # pages of 4 rows in a shuffled pool
    pages_per_seq = [-(-n // page) for n in used]
    order = torch.randperm(sum(pages_per_seq), generator=gen)
    pool_k = torch.randn(len(order), page, *k.shape[1:], generator=gen).to(k)
    pool_v = torch.randn(len(order), page, *k.shape[1:], generator=gen).to(v)
    table = torch.zeros(3, max(pages_per_seq), dtype=torch.int32)
    placements = []  # (page in the pool, the packed key rows it holds)
    for i, n in enumerate(used):
        for p in range(pages_per_seq[i]):
            rows = slice(ck[i] + p * page, min(ck[i] + (p + 1) * page, ck[i + 1]))
            phys = int(order[len(placements)])
            table[i, p] = phys
            placements.append((phys, rows))
            pool_k[phys, :rows.stop - rows.start], pool_v[phys, :rows.stop - rows.start] = k[rows], v[rows]
    before = dispatch.calls[("scaled_dot_product_attention", backend)]
    pool_k.requires_grad_(), k.requires_grad_()
    got = fa.varlen_attention(q, pool_k, pool_v, packed["cu_seqlens_q"], None, 2, max(used), seqused_k=seqused,
                              block_table=table.to(device), enable_gqa=True, backend=backend)
    calls = dispatch.calls[("scaled_dot_product_attention", backend)] - before
    torch.testing.assert_close(got, want)
    # the pool's gradient: the keys' own, in their pages (0 in the unused rows)
    grad_out = torch.randn(got.shape, generator=gen).to(got)
    (want_dk,) = torch.autograd.grad(fa.varlen_attention(q, k, v, packed["cu_seqlens_q"], packed["cu_seqlens_k"],
                                                         2, max(used), enable_gqa=True, backend=backend),
                                     k, grad_out)
    (got_dpool,) = torch.autograd.grad(got, pool_k, grad_out)
    placed = torch.zeros_like(pool_k)
    for phys, rows in placements:
        placed[phys, :rows.stop - rows.start] = want_dk[rows]
    torch.testing.assert_close(got_dpool, placed)
    # the pages of each sequence gathered for a call of its own
    assert calls == 3


def test_varlen_return_aux_and_torch_layout():
    from torch.nn.attention.varlen import AuxRequest

    packed = _packed("cpu", [3, 4], [3, 4], seed=5)
    out, lse = fa.varlen_attention(packed["query"], packed["key"], packed["value"], packed["cu_seqlens_q"],
                                   packed["cu_seqlens_k"], 4, 4, enable_gqa=True, return_aux=AuxRequest(lse=True))
    assert out.shape == (7, 4, 32) and lse.shape == (4, 7) and lse.dtype == torch.float32


@pytest.mark.parametrize("change, error, match", [
    (dict(query=torch.randn(7, 4)), ValueError, r"query must be packed \(Tq, Hq, D\)"),
    (dict(cu_seqlens_q=torch.tensor([0, 3, 9], dtype=torch.int32)), ValueError, "end within query's 7 rows"),
    (dict(cu_seqlens_q=torch.tensor([0.0, 3.0, 7.0])), TypeError, "cu_seqlens_q must be int32 or int64"),
    (dict(cu_seqlens_k=torch.tensor([0, 4, 3], dtype=torch.int32)), ValueError, "cu_seqlens_k must have"),
    (dict(cu_seqlens_k=None), ValueError, "only with block_table"),
    (dict(max_q=2), ValueError, r"max_q \(2\) is below the longest sequence \(4\)"),
    (dict(seqused_k=torch.tensor([5, 1], dtype=torch.int32)), ValueError, "seqused_k must hold"),
    (dict(block_table=torch.zeros(2, 1, dtype=torch.int32)), ValueError, "page pool"),
    (dict(enable_gqa=False), ValueError, "pass enable_gqa=True"),
])
def test_varlen_arguments_are_checked(change, error, match):
    args = _packed("cpu", [3, 4], [3, 4], seed=6)
    args.update(change)
    with pytest.raises(error, match=match):
        fa.varlen_attention(**args)


@pytest.mark.parametrize("backend", [p for p in kernel_backend_params(op.OP)
                                     if op.CAPABILITIES[p.values[0]].sliding_window])
def test_kernels_apply_the_window_and_skip_key_blocks_outside_it(backend):
    """Kernels whose capability says sliding_window (all of them) take the window themselves
    (no mask reaches them) and never read key blocks left of it, forward or backward: NaN values
    in keys 0..15 reach no query whose window starts past them (a visited block would give
    0 * NaN = NaN), and the result and gradients match the masked reference there."""
    device, dtype = backend_device(backend), kernel_dtype(backend)
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, 300, 32, generator=gen).to(dtype).to(device) for _ in range(3))
    v_bad = v.clone()
    v_bad[:, :, :16] = float("nan")
    q_, k_, v_bad = (t.clone().requires_grad_(True) for t in (q, k, v_bad))
    out = fa.scaled_dot_product_attention(q_, k_, v_bad, window_size=(24, 0), backend=backend)
    rows = slice(200, None)  # their windows start at key 176 and later; their query blocks never visit key 15
    grad_out = torch.zeros_like(out)
    grad_out[:, :, rows] = torch.randn(grad_out[:, :, rows].shape, generator=gen).to(dtype).to(device)
    out.backward(grad_out)
    q, k, v = (t.cpu().double().requires_grad_(True) for t in (q, k, v))
    want = fa.reference.scaled_dot_product_attention(q, k, v, window_size=(24, 0))
    want.backward(grad_out.cpu().double())
    assert torch.isfinite(out[:, :, rows]).all() and torch.isfinite(q_.grad[:, :, rows]).all()
    close = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=4e-3, rtol=4e-3)
    torch.testing.assert_close(out[:, :, rows].detach().cpu().double(), want[:, :, rows].detach(), **close)
    torch.testing.assert_close(q_.grad[:, :, rows].cpu().double(), q.grad[:, :, rows], **close)
    keys = slice(176, None)  # the keys those rows see; no other row's gradient reaches them
    torch.testing.assert_close(k_.grad[:, :, keys].cpu().double(), k.grad[:, :, keys], **close)
    torch.testing.assert_close(v_bad.grad[:, :, keys].cpu().double(), v.grad[:, :, keys], **close)


# windows over many key and query tiles of every native-window kernel (the feature cases above
# fit in one tile): (Lq, Lk, head dim, window, other arguments)
WINDOW_TILES = {
    "both sides": (150, 200, 32, (40, 10), {}),
    "right only, Lq > Lk": (200, 130, 64, (-1, 30), {}),
    "left only, is_causal, gqa": (170, 170, 32, (70, -1), dict(is_causal=True, gqa=True)),
    "no look-back, float mask": (90, 160, 96, (0, 20), dict(mask="float")),
    "softcap, head 128": (100, 140, 128, (33, 33), dict(softcap=3.0)),
    "bool mask, Lq < Lk": (120, 170, 64, (50, 5), dict(mask="bool")),
    "lower-right causal, Lq < Lk": (130, 190, 32, (60, -1), dict(mask="causal_lower_right")),
    "alibi and softcap, Lq > Lk, head 96": (210, 140, 96, (45, 3), dict(alibi_slopes=[0.25, 0.75], softcap=4.0)),
    "diagonal only": (140, 140, 32, (0, 0), {}),
}


@pytest.mark.parametrize("backend", [p for p in kernel_backend_params(op.OP)
                                     if op.CAPABILITIES[p.values[0]].sliding_window])
@pytest.mark.parametrize("case", list(WINDOW_TILES))
def test_native_windows_over_many_tiles_match_the_reference(backend, case, dtype=None):
    """Windows whose key range moves across tiles, with the kernels skipping the tiles outside
    each block's window forward and backward (dK/dV visiting only the query tiles that see a
    key tile): output, log-sum-exp and every gradient by the 2x rule."""
    Lq, Lk, D, window, extra = WINDOW_TILES[case]
    extra = dict(extra)
    device, dtype = backend_device(backend), dtype or kernel_dtype(backend)
    gen = torch.Generator().manual_seed(stable_seed("window tiles", case))
    hk = 1 if extra.pop("gqa", False) else 2
    rnd = lambda *s: torch.randn(*s, generator=gen).to(dtype).to(device)  # noqa: E731
    inputs = dict(query=rnd(1, 2, Lq, D), key=rnd(1, hk, Lk, D), value=rnd(1, hk, Lk, D), enable_gqa=hk != 2,
                  window_size=window)
    mask = extra.pop("mask", None)
    if "alibi_slopes" in extra:
        extra["alibi_slopes"] = torch.tensor(extra["alibi_slopes"], device=device)
    if mask == "float":
        inputs["attn_mask"] = rnd(1, 2, Lq, Lk)
    elif mask == "bool":  # one per batch, shared by the heads; ~1 in 5 keys masked out
        inputs["attn_mask"] = (torch.rand(1, 1, Lq, Lk, generator=gen) > 0.2).to(device)
    elif mask == "causal_lower_right":
        from torch.nn.attention.bias import causal_lower_right

        inputs["attn_mask"] = causal_lower_right(Lq, Lk)
    inputs.update(extra)
    _assert_backend_matches_the_reference(backend, inputs,
                                          ["query", "key", "value"] + (["attn_mask"] if mask == "float" else []))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["both sides", "softcap, head 128"])
def test_triton_windows_and_softcap_in_16_bit_types(case, dtype):
    """The Triton band and softcap in float16 and bfloat16 (the case above runs float32)."""
    if fa.available_backends()["triton"] is not None:
        pytest.skip(fa.available_backends()["triton"])
    test_native_windows_over_many_tiles_match_the_reference("triton", case, dtype)


# ALiBi over many tiles: (Lq, Lk, head dim, other arguments); slopes per batch row and head
ALIBI_TILES = {
    "is_causal, gqa": (130, 130, 32, dict(is_causal=True, gqa=True)),
    "window, float mask, Lq < Lk": (90, 160, 64, dict(window_size=(40, 10), mask="float")),
    "softcap, Lq > Lk": (150, 70, 32, dict(softcap=2.0)),
    # probabilities far below the row's max (exp(-400)): the cpu kernels flush them to 0
    "steep slopes": (120, 120, 32, dict(slope_scale=4.0)),
}


@pytest.mark.parametrize("backend", [p for p in kernel_backend_params(op.OP) if op.CAPABILITIES[p.values[0]].alibi])
@pytest.mark.parametrize("case", list(ALIBI_TILES))
def test_kernels_add_alibi_themselves(backend, case, monkeypatch, dtype=None):
    """Kernels whose capability says alibi (all of them) receive the (B, Hq) slopes, never an
    (Lq, Lk) bias mask, and match the reference over many tiles: output, log-sum-exp and every
    gradient by the 2x rule."""
    Lq, Lk, D, extra = ALIBI_TILES[case]
    extra = dict(extra)
    device, dtype = backend_device(backend), dtype or kernel_dtype(backend)
    gen = torch.Generator().manual_seed(stable_seed("alibi tiles", case))
    hk = 1 if extra.pop("gqa", False) else 2
    rnd = lambda *s: torch.randn(*s, generator=gen).to(dtype).to(device)  # noqa: E731
    slopes = torch.rand(2, 2, generator=gen) * extra.pop("slope_scale", 0.3)
    inputs = dict(query=rnd(2, 2, Lq, D), key=rnd(2, hk, Lk, D), value=rnd(2, hk, Lk, D), enable_gqa=hk != 2,
                  alibi_slopes=slopes.to(device))
    if extra.pop("mask", None) == "float":
        inputs["attn_mask"] = rnd(2, 1, Lq, Lk)
    inputs.update(extra)
    seen = []
    kernels = op._kernels

    def spying(name):
        fwd, bwd = kernels(name)
        return (lambda *a: seen.append((a[3], a[-1])) or fwd(*a)), bwd

    monkeypatch.setattr(op, "_kernels", spying)
    _assert_backend_matches_the_reference(backend, inputs, ["query", "key", "value"] +
                                          (["attn_mask"] if "attn_mask" in inputs else []))
    assert seen, "the forward kernel never ran"
    for mask, slopes in seen:
        assert isinstance(slopes, torch.Tensor) and slopes.shape == (2, 2) and slopes.dtype == torch.float32
        assert (mask is None) == ("attn_mask" not in inputs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_alibi_in_16_bit_types(dtype, monkeypatch):
    """The Triton ALiBi in float16 and bfloat16 (the case above runs float32)."""
    if fa.available_backends()["triton"] is not None:
        pytest.skip(fa.available_backends()["triton"])
    test_kernels_add_alibi_themselves("triton", "window, float mask, Lq < Lk", monkeypatch, dtype)


# packed sequences over many tiles in one call of the kernels: (query lengths, key lengths,
# arguments); the cpu kernels' backward splits each sequence's query blocks into chunks when there
# are few (sequence, kv head) tasks, and not with many ("many short sequences")
PACKED_TILES = {
    "window both sides, softcap": ([70, 0, 45, 100], [90, 30, 45, 64], dict(window_size=(20, 7), softcap=2.5)),
    "causal, alibi per sequence": ([33, 96, 1], [64, 96, 80], dict(is_causal=True, alibi_slopes=True)),
    "seqused_k, float32 head 64": ([40, 65], [100, 70], dict(seqused_k=[75, 3], D=64)),
    "many short sequences": ([5, 9, 0, 13, 2, 7, 1, 11, 4], [6, 9, 3, 13, 0, 9, 1, 11, 4], dict(is_causal=True)),
}


class _PackedOpSpy:
    """Stands in for fused_attn._ext in ops/varlen: records the packed operators called."""

    def __init__(self, ext, calls):
        self.ext, self.calls = ext, calls

    def backend_ops(self, backend):
        ops, calls = self.ext.backend_ops(backend), self.calls

        class Recording:
            def __getattr__(self, name):
                fn = getattr(ops, name)
                return lambda *a: calls.append((name, a[3:5])) or fn(*a)
        return Recording()


@pytest.mark.parametrize("backend", varlen.PACKED_BACKENDS)
@pytest.mark.parametrize("case", list(PACKED_TILES))
def test_varlen_runs_every_sequence_in_one_call_of_the_kernels(case, backend, monkeypatch):
    """Sequences longer than a tile, empty ones and Lq != Lk, packed: one forward and one
    backward call of the kernels (a Triton launch whose programs past a sequence's end exit;
    the cpu kernels' one parallel loop over every sequence's tasks; one launch of each CUDA
    kernel, its blocks past a sequence's end exiting), each sequence's window,
    ALiBi row and causal diagonal its own, matching the reference by the 2x rule, gradients too
    (rows and keys no query reads get 0)."""
    if fa.available_backends()[backend] is not None:
        pytest.skip(fa.available_backends()[backend])
    from fused_attn.triton import attention as kt

    lq, lk, extra = PACKED_TILES[case]
    extra = dict(extra)
    inputs = _packed(backend, lq, lk, D=extra.pop("D", 32), seed=stable_seed("packed tiles", case))
    if extra.pop("alibi_slopes", False):
        inputs["alibi_slopes"] = (torch.rand(len(lq), 4, generator=torch.Generator().manual_seed(3)) * 0.4).to(
            inputs["query"].device)
    if "seqused_k" in extra:
        extra["seqused_k"] = torch.tensor(extra["seqused_k"], dtype=torch.int32, device=inputs["query"].device)
    inputs.update(extra)
    launches = []
    if backend == "triton":
        for name in ("attention_fwd", "attention_bwd"):
            kernel = getattr(kt, name)
            monkeypatch.setattr(kt, name, lambda *a, _k=kernel, _n=name, **kw: launches.append((_n, a[-1])) or
                                _k(*a, **kw))
    else:
        monkeypatch.setattr(varlen, "_ext", _PackedOpSpy(varlen._ext, launches))
    result = testing.compare(lambda **kw: fa.varlen_attention(**kw, return_lse=True, backend=backend),
                             lambda **kw: fa.reference.varlen_attention(**kw, return_lse=True), inputs,
                             grad_names=["query", "key", "value"], output_names=["output", "lse"])
    testing.assert_all_ok(result)
    names = [n for n, _ in launches]
    if backend == "triton":
        assert names == ["attention_fwd", "attention_bwd"] * (len(launches) // 2) and launches
        assert all(isinstance(packed, kt.Packed) for _, packed in launches)
    else:
        assert names == ["attention_packed_fwd", "attention_packed_bwd"] * (len(launches) // 2) and launches


@pytest.mark.parametrize("backend", ["cuda_emu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_packed_kernels_at_every_head_dim(backend, dtype, monkeypatch):
    """The CUDA kernels' packed instantiations at each head dim they take (head 128's dK/dV
    kernel has query tiles of its own, head 256's backward two dK/dV passes), with GQA, a
    causal window and ALiBi per sequence: one forward and one backward call, by the 2x rule."""
    if fa.available_backends()[backend] is not None:
        pytest.skip(fa.available_backends()[backend])
    for D in _ext.cuda_head_dims():
        inputs = _packed(backend, [20, 0, 37], [33, 5, 37], D=D, seed=stable_seed("cuda packed", D))
        inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
        inputs.update(is_causal=True, window_size=(11, -1), alibi_slopes=torch.tensor(
            [[0.3, 0.1, 0.05, 0.2]] * 3, device=inputs["query"].device))
        launches = []
        monkeypatch.setattr(varlen, "_ext", _PackedOpSpy(_ext, launches))
        result = testing.compare(lambda **kw: fa.varlen_attention(**kw, return_lse=True, backend=backend),
                                 lambda **kw: fa.reference.varlen_attention(**kw, return_lse=True), inputs,
                                 grad_names=["query", "key", "value"], output_names=["output", "lse"])
        testing.assert_all_ok(result)
        assert [n for n, _ in launches] == ["attention_packed_fwd", "attention_packed_bwd"], (D, launches)


_THREADS_SCRIPT = """
import sys, torch, fused_attn as fa
sys.path.insert(0, sys.argv[1])
from test_attention_features import _packed
inputs = _packed("cpu", [70, 0, 45], [90, 30, 45], seed=7)
results = []
for n in (1, 2, 3):
    torch.set_num_threads(n)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()
              if isinstance(v, torch.Tensor) and v.is_floating_point()}
    out = fa.varlen_attention(**{**inputs, **leaves}, is_causal=True, backend="cpu")
    out.backward(torch.ones_like(out))
    results.append([out.detach()] + [t.grad for t in leaves.values()])
assert all(torch.equal(a, b) for other in results[1:] for a, b in zip(results[0], other))
"""


def test_cpu_packed_sequences_do_not_depend_on_the_thread_count():
    """The cpu kernels' tasks over packed sequences (and the backward's chunks) follow from the
    sizes alone: 1, 2 and 3 threads give bit-identical outputs and gradients (MKL's own
    rounding held fixed with MKL_CBWR, in a process of its own: MKL reads it once)."""
    if fa.available_backends()["cpu"] is not None:
        pytest.skip(fa.available_backends()["cpu"])
    import os
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, tests], capture_output=True, text=True,
                         env={**os.environ, "MKL_CBWR": "AUTO,STRICT"}, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("backend", ["cpu", "cuda_emu"])
@pytest.mark.parametrize("seq_q, seq_k, match", [
    ([0, 5, 3], [[0, 4], [4, 4]], r"seq_q must not decrease, got seq_q\[1\] = 5 > seq_q\[2\] = 3"),
    ([0, 4, 9], [[0, 4], [4, 4]], r"seq_q must lie in \[0, 8\], got 0 \.\. 9"),
    ([0, 4, 8], [[0, 5], [4, 4]], r"seq_k\[1\] = \(4, 4\) must be a run of keys in \[5, 8\]"),
    ([0, 4, 8], [[0, 4], [6, 4]], r"seq_k\[1\] = \(6, 4\) must be a run of keys in \[4, 8\]"),
    ([0, 4, 8], [[0, 4]], r"seq_k must be a contiguous \(N, 2\) = \(2, 2\) int32"),
])
def test_packed_operators_check_their_sequences(backend, seq_q, seq_k, match):
    """Offsets outside the packed tensors or key runs that overlap (two sequences would write
    the same dK rows) raise, naming the entry."""
    if fa.available_backends()[backend] is not None:
        pytest.skip(fa.available_backends()[backend])
    q = torch.randn(8, 2, 32, dtype=kernel_dtype(backend))
    with pytest.raises(ValueError, match=match):
        _ext.backend_ops(backend).attention_packed_fwd(q, q, q, torch.tensor(seq_q, dtype=torch.int32),
                                                       torch.tensor(seq_k, dtype=torch.int32), 0.25, -1, -1, 0.0,
                                                       None)


def test_packed_sequences_without_a_spill_free_packed_configuration_run_one_call_each(monkeypatch):
    """Where every packed (VARLEN) configuration of a kernel keeps a stack frame (float32 dK/dV
    with softcap at head size 256), varlen_attention on triton runs a call per sequence, as the
    GPU would (the decision the interpreter otherwise skips), and still matches the reference."""
    if fa.available_backends()["triton"] is not None:
        pytest.skip(fa.available_backends()["triton"])
    from fused_attn.triton import attention as kt

    assert kt.unsupported(256, torch.float32, 0, False, True, varlen=True)
    assert not kt.unsupported(256, torch.float32, 0, False, True)
    from fused_attn.ops import varlen

    monkeypatch.setattr(varlen, "triton_interpreting", lambda: False)  # varlen's decision as on a GPU
    inputs = _packed("triton", [5, 9], [7, 9], D=200, seed=5)
    inputs["query"] = inputs["query"].float()
    inputs.update(key=inputs["key"].float(), value=inputs["value"].float(), softcap=3.0)
    packed = []
    forward = kt.attention_fwd
    monkeypatch.setattr(kt, "attention_fwd", lambda *a, **kw: packed.append(kw.get("packed", a[13:14])) or
                        forward(*a, **kw))
    result = testing.compare(lambda **kw: fa.varlen_attention(**kw, backend="triton"), fa.reference.varlen_attention,
                             inputs, grad_names=["query", "key", "value"])
    testing.assert_all_ok(result)
    assert packed and not any(p for p in packed), packed  # every launch one sequence's, none packed
