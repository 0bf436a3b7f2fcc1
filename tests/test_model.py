"""The encoder-decoder Transformer and friends on the fused ops: backends agree by the 2x
rule (outputs and every parameter gradient), cached decoding equals uncached decoding,
padding never leaks, torch.compile captures the whole model, the drop-in modules match
torch's, patching keeps outputs, and Hugging Face models run on fused_attn."""

import copy

import pytest
import torch
from torch import nn

import fused_attn as fa
from fused_attn import dispatch, testing
from fused_attn.models import EncoderClassifier, VisionTransformer

from conftest import backend_device, kernel_backend_params, kernel_dtype, usable

PAD, BOS, EOS = 0, 1, 2


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    return model


def _batch(B=3, Ls=9, Lt=7, vocab=23, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, vocab, (B, Ls), generator=g)
    tgt = torch.randint(3, vocab, (B, Lt), generator=g)
    src[1, Ls - 3:] = PAD  # right padding
    src[2, Ls - 1:] = PAD
    tgt[1, Lt - 2:] = PAD
    return src.to(device), tgt.to(device)


def _model(norm="pre", seed=0, **kw):
    torch.manual_seed(seed)
    sizes = dict(N=2, d_model=32, d_ff=64, h=4) | kw
    return fa.models.make_model(23, 29, dropout=0.0, norm=norm, **sizes).eval()


def _compare_model(model, backend, device, run, dtype=torch.float32):
    """2x rule for a model: the reference backend in float64 is the truth, in `dtype` the
    honest low-precision run; `run(model)` returns the output whose sum is backpropagated."""
    results = []
    low = dtype
    for name, dtype in ((backend, low), ("reference", low), ("reference", torch.float64)):
        m = set_backend(copy.deepcopy(model), name).to(device=device, dtype=dtype)
        out = run(m)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (out * weight.to(out.device, out.dtype)).sum().backward()
        results.append((out, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (a, ga), (lo, glo), (t, gt) = results
    comps = [testing.check_2x("output", a, lo, t)]
    scale = float(t.abs().max())
    comps += [testing.check_2x(f"grad {n}", ga[n], glo[n], gt[n], scale=scale) for n in gt]
    testing.assert_all_ok(comps)


@pytest.mark.parametrize("backend", kernel_backend_params())
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_backends_agree_with_the_reference(backend, norm):
    device, dtype = backend_device(backend), kernel_dtype(backend)
    src, tgt = _batch(device=device)
    # the cuda kernels' head dims start at 32. GELU, not the default relu: at relu's kink the
    # gradient jumps, and a pre-activation within the 16-bit rounding of the layers below it
    # (4e-4 here) takes a different side in each low-precision run, moving a whole term of the
    # weight gradient; the 2x rule needs a smooth model (test_feed_forward.py holds relu to it off the kink)
    sizes = dict(d_model=64, d_ff=128, h=2) if backend in dispatch.CUDA_KERNEL_BACKENDS else {}
    _compare_model(_model(norm, activation="gelu", **sizes), backend, device, lambda m: m(src, tgt), dtype=dtype)


DECODE_CACHES = {"cpu-contiguous": ("cpu", None), "cpu-pages of 4": ("cpu", 4), "cpu-pages of 16": ("cpu", 16),
                 "triton-contiguous": ("triton", None), "triton-pages of 4": ("triton", 4)}


@pytest.mark.parametrize("backend, page_size", list(DECODE_CACHES.values()), ids=list(DECODE_CACHES))
def test_cached_decoding_equals_uncached(backend, page_size):
    if not usable(backend):
        pytest.skip(fa.available_backends()[backend])
    device = backend_device(backend)
    model = set_backend(_model(), backend).to(device)
    src, _ = _batch(device=device)
    before = dispatch.calls[("decode_attention", backend)]
    cached = model.greedy_decode(src, 8, BOS, EOS, use_cache=True, page_size=page_size)
    assert (dispatch.calls[("decode_attention", backend)] > before) == (page_size is not None)
    uncached = model.greedy_decode(src, 8, BOS, EOS, use_cache=False)
    assert torch.equal(cached, uncached)
    # the decoder's last-position output agrees too, step by step (a paged cache is for inference)
    with torch.no_grad():
        src_mask = model.src_mask(src)
        memory = model.encode(src, src_mask)
        cache = model.new_cache(src.size(0), page_size)
        for t in range(1, cached.size(1)):
            step = model.decode(memory, src_mask, cached[:, t - 1:t], cache=cache)[:, -1]
            full = model.decode(memory, src_mask, cached[:, :t])[:, -1]
            torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


def test_prefill_then_steps_on_a_paged_cache():
    """Several new tokens at once (Lq > 1, causal among themselves, bottom-right aligned against the
    cache), then single steps: every position's output equals decoding the whole prefix."""
    model = _model()
    src, tgt = _batch()
    with torch.no_grad():
        src_mask = model.src_mask(src)
        memory = model.encode(src, src_mask)
        full = model.decode(memory, src_mask, tgt)
        cache = model.new_cache(src.size(0), page_size=4)
        parts = [model.decode(memory, src_mask, tgt[:, :5], cache=cache)]
        parts += [model.decode(memory, src_mask, tgt[:, t:t + 1], cache=cache) for t in range(5, tgt.size(1))]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == tgt.size(1)


def test_paged_beams_share_pages_and_copy_on_write():
    """Beam search on pages gives the contiguous cache's hypotheses; the cache shares a prefix's
    full pages among beams and copies a shared page before a beam writes into it."""
    model = _model()
    src, _ = _batch()
    contiguous = model.beam_search(src, 10, BOS, EOS, beam_size=4, page_size=None)
    paged = model.beam_search(src, 10, BOS, EOS, beam_size=4, page_size=2)
    assert torch.equal(paged, contiguous)
    # the cache itself: two beams from one, then each writes into the shared last page
    cache = fa.models.transformer.PagedKVCache(1, page_size=4, layers=1)
    k = torch.arange(6.0).view(1, 1, 6, 1)
    cache.reserve(6, "cpu")
    cache.append(0, k, k)
    cache.reorder(torch.tensor([0, 0]))  # both beams share pages 0 (full) and 1 (half full)
    assert cache.refs[:2] == [2, 2]
    cache.reserve(1, "cpu")
    k_pool, _ = cache.append(0, torch.tensor([10.0, 20.0]).view(2, 1, 1, 1), torch.zeros(2, 1, 1, 1))
    assert cache.rows[0][0] == cache.rows[1][0]  # the full page stays shared
    assert cache.rows[0][1] != cache.rows[1][1]  # the written one was copied
    for beam, new in ((0, 10.0), (1, 20.0)):
        tokens = k_pool[cache.rows[beam]].flatten()[:7]
        assert tokens.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, new]


def test_paged_cache_refuses_what_it_cannot_do():
    model = _model()
    src, tgt = _batch()
    with pytest.raises(ValueError, match="needs the batch size"):
        model.new_cache(page_size=8)
    cache = model.new_cache(src.size(0), page_size=8)
    memory = model.encode(src)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="explicit self-attention mask"):
        model.decode(memory, model.src_mask(src), tgt[:, :2], tgt_mask=torch.ones(2, 2, dtype=torch.bool),
                     cache=cache)


def test_beam_search():
    model = _model()
    src, _ = _batch()
    greedy = model.greedy_decode(src, 8, BOS, EOS)
    assert torch.equal(model.beam_search(src, 8, BOS, EOS, beam_size=1, length_penalty=0.0)[:, :greedy.size(1)],
                       greedy[:, :8])
    beams = model.beam_search(src, 8, BOS, EOS, beam_size=4)
    assert beams.shape[0] == src.shape[0] and (beams[:, 0] == BOS).all()


def test_padding_never_changes_real_positions():
    model = _model()
    src, tgt = _batch()
    out = model(src, tgt)
    src2, tgt2 = src.clone(), tgt.clone()
    src2[src == PAD] = 17  # garbage in every padded source position...
    out_src = model(src2 * 0 + src2, tgt)  # ...while the mask still marks them as padding
    src_mask = model.src_mask(src)
    out_masked = model(src2, tgt, src_mask=src_mask)
    torch.testing.assert_close(out_masked, out)
    tgt2[tgt == PAD] = 11  # garbage in padded target positions (at the end: causal keeps them out)
    out_tgt = model(src, tgt2)
    real = tgt != PAD
    torch.testing.assert_close(out_tgt[real], out[real])
    assert out_src.shape == out.shape


def test_explicit_masks_match_built_ones():
    model = _model()
    src, tgt = _batch()
    Lt = tgt.size(1)
    tgt_mask = fa.models.subsequent_mask(Lt)[None]  # (1, 1, Lt, Lt)
    torch.testing.assert_close(model(src, tgt, src_mask=model.src_mask(src), tgt_mask=tgt_mask), model(src, tgt))


def test_options_learned_positions_tied_weights_activation():
    model = _model(positional="learned", tie_weights=True, activation="gelu")
    assert model.generator.proj.weight is model.tgt_embed.lut.weight
    src, tgt = _batch()
    model(src, tgt).sum().backward()
    with pytest.raises(ValueError, match="norm must be"):
        fa.models.make_model(5, 5, N=1, d_model=8, d_ff=8, h=2, norm="sandwich")
    with pytest.raises(ValueError, match="multiple of the number of heads"):
        fa.models.make_model(5, 5, N=1, d_model=10, d_ff=8, h=4)


def test_encoder_classifier_and_vit():
    torch.manual_seed(0)
    clf = EncoderClassifier(50, 3, N=2, d_model=32, d_ff=64, h=4, dropout=0.0).eval()
    ids = torch.randint(1, 50, (4, 11))
    ids[0, 7:] = PAD
    _compare_model(clf, "cpu" if usable("cpu") else "torch", "cpu", lambda m: m(ids))
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=16, patch_size=4, num_classes=5, N=2, d_model=32, d_ff=64, h=4).eval()
    images = torch.randn(2, 3, 16, 16)
    _compare_model(vit, "cpu" if usable("cpu") else "torch", "cpu",
                   lambda m: m(images.to(next(m.parameters()).dtype)))


def test_torch_compile_fullgraph_encoder_decoder():
    backend = "cpu" if usable("cpu") else "torch"
    model = set_backend(_model(), backend)
    src, tgt = _batch()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(src, tgt)
    torch.testing.assert_close(out, model(src, tgt))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- drop-in modules


def _mha_pair(embed=32, heads=4, batch_first=False, kdim=None, vdim=None, bias=True):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(embed, heads, batch_first=batch_first, kdim=kdim, vdim=vdim, bias=bias).eval()
    ours = fa.nn.MultiheadAttention(embed, heads, batch_first=batch_first, kdim=kdim, vdim=vdim, bias=bias).eval()
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("masks", ["none", "key_padding", "attn_bool_2d", "attn_float_3d", "both", "causal_hint"])
def test_multihead_attention_matches_torch(batch_first, masks):
    ref, ours = _mha_pair(batch_first=batch_first)
    B, L, E, H = 3, 7, 32, 4
    x = torch.randn(B, L, E) if batch_first else torch.randn(L, B, E)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1, 5:] = True  # True = ignore, torch's convention
    causal = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
    kw = {}
    if masks in ("key_padding", "both"):
        kw["key_padding_mask"] = kpm
    if masks in ("attn_bool_2d", "both", "causal_hint"):
        kw["attn_mask"] = causal
    if masks == "attn_float_3d":
        kw["attn_mask"] = torch.randn(B * H, L, L)
    if masks == "causal_hint":
        kw["is_causal"] = True
    want, _ = ref(x, x, x, need_weights=False, **kw)
    got, weights = ours(x, x, x, need_weights=False, **kw)
    assert weights is None
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_multihead_attention_cross_kdim_unbatched_and_weights():
    ref, ours = _mha_pair(kdim=24, vdim=20, batch_first=True)
    q, k, v = torch.randn(2, 5, 32), torch.randn(2, 9, 24), torch.randn(2, 9, 20)
    torch.testing.assert_close(ours(q, k, v, need_weights=False)[0], ref(q, k, v, need_weights=False)[0],
                               atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ours(q[0], k[0], v[0], need_weights=False)[0],
                               ref(q[0], k[0], v[0], need_weights=False)[0], atol=2e-5, rtol=2e-5)
    out, w = ours(q, k, v)  # need_weights=True: torch's implementation, weights included
    want, want_w = ref(q, k, v)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(w, want_w)


def test_multihead_attention_fully_masked_row_is_zero_not_nan():
    _, ours = _mha_pair(batch_first=True)
    x = torch.randn(1, 4, 32)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[2] = True  # query 2 may see nothing
    out, _ = ours(x, x, x, attn_mask=mask, need_weights=False)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 2], ours.out_proj.bias)  # attention output 0 -> only the bias remains


def test_feed_forward_module():
    torch.manual_seed(0)
    feed_forward = fa.nn.FeedForward(16, 48, activation="silu")
    x = torch.randn(2, 5, 16)
    want = feed_forward.w_2(torch.nn.functional.silu(feed_forward.w_1(x)))
    torch.testing.assert_close(feed_forward(x), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="activation must be one of"):
        fa.nn.FeedForward(16, 48, activation="tanh")


# --------------------------------------------------------------------------- patching


@pytest.mark.parametrize("kind", ["transformer", "encoder", "decoder"])
def test_patch_keeps_outputs(kind):
    torch.manual_seed(0)
    d, h = 32, 4
    if kind == "transformer":
        model = nn.Transformer(d, h, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64, dropout=0.0,
                               batch_first=True)
    elif kind == "encoder":
        model = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, h, 64, 0.0, batch_first=True), 2,
                                      enable_nested_tensor=False)
    else:
        model = nn.TransformerDecoder(nn.TransformerDecoderLayer(d, h, 64, 0.0, batch_first=True, norm_first=True), 2)
    model.eval()
    src, tgt = torch.randn(2, 9, d), torch.randn(2, 6, d)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, 7:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(6)

    def run(m):
        if kind == "transformer":
            return m(src, tgt, tgt_mask=causal, src_key_padding_mask=kpm, memory_key_padding_mask=kpm)
        if kind == "encoder":
            return m(src, src_key_padding_mask=kpm)
        return m(tgt, src, tgt_mask=causal, memory_key_padding_mask=kpm)

    before = run(model)
    replaced = fa.patch(model)
    assert replaced and all(isinstance(v, (nn.MultiheadAttention, nn.LayerNorm)) for v in replaced.values())
    assert any(isinstance(m, fa.nn.MultiheadAttention) for m in model.modules())
    torch.testing.assert_close(run(model), before, atol=5e-5, rtol=5e-5)


def test_patch_rejects_non_modules():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fa.patch("not a model")


@pytest.mark.skipif(not usable("cpu"), reason="the cpu kernels are not built")
def test_patched_encoder_leaves_torchs_inference_fast_path():
    """In eval under no_grad, nn.TransformerEncoder(Layer) takes torch's fast path, which reads
    the attention and norm weights itself: patched, it must call the fused modules instead
    (counted), with the same output; unpatch restores the fast path."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x = torch.randn(3, 6, 32)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:] = True
    with torch.no_grad():
        expected = enc(x, src_key_padding_mask=pad)
        replaced = fa.patch(enc, backend="cpu")
        dispatch.calls.clear()
        got = enc(x, src_key_padding_mask=pad)
        assert dispatch.calls[("scaled_dot_product_attention", "cpu")] == 2
        assert dispatch.calls[("layer_norm", "cpu")] == 4
        fa._patching.unpatch(enc, replaced)
        assert type(enc) is nn.TransformerEncoder and type(enc.layers[0]) is nn.TransformerEncoderLayer
        dispatch.calls.clear()
        enc(x, src_key_padding_mask=pad)
        assert not dispatch.calls
    torch.testing.assert_close(got[~pad], expected[~pad], atol=2e-6, rtol=1e-5)


def test_multihead_attention_behaves_as_torchs_for_every_argument_combination():
    """fa.nn.MultiheadAttention against torch.nn.MultiheadAttention over every combination
    of batch_first, kdim/vdim, add_bias_kv, add_zero_attn, batched or not, the mask forms
    (key padding bool/float, 2-D bool, 3-D float, both, is_causal with its mask),
    need_weights and average_attn_weights: outputs, weights and input gradients. Masks
    leave every query a key (a fully masked query is the documented difference: 0, not NaN)."""
    import itertools

    E, H, B, Lq, Lk = 16, 2, 2, 5, 6
    failures, n = [], 0
    for batch_first, cross, bias_kv, zero_attn, batched, masks, weights in itertools.product(
            (False, True), (False, True), (False, True), (False, True), (True, False),
            ("none", "kpm_bool", "kpm_float", "attn_2d", "attn_3d_float", "both", "causal"),
            ("no", "averaged", "per_head")):
        if (masks == "causal" and cross) or (batch_first and not batched):
            continue  # a causal mask needs Lq == Lk; batch_first means nothing unbatched
        lk = Lq if masks == "causal" else Lk
        kdim, vdim = (12, 10) if cross else (None, None)
        torch.manual_seed(n)
        ref = nn.MultiheadAttention(E, H, add_bias_kv=bias_kv, add_zero_attn=zero_attn, kdim=kdim, vdim=vdim,
                                    batch_first=batch_first)
        ours = fa.nn.MultiheadAttention(E, H, add_bias_kv=bias_kv, add_zero_attn=zero_attn, kdim=kdim, vdim=vdim,
                                        batch_first=batch_first)
        ours.load_state_dict(ref.state_dict())
        shape = (lambda L, d: (B, L, d) if batch_first else (L, B, d)) if batched else (lambda L, d: (L, d))
        q = torch.randn(shape(Lq, E))
        k, v = torch.randn(shape(lk, kdim or E)), torch.randn(shape(lk, vdim or E))
        kw = {}
        kpm = torch.zeros(B, lk, dtype=torch.bool)
        kpm[1, lk - 2:] = True
        kpm = kpm if batched else kpm[1]
        if masks in ("kpm_bool", "both"):
            kw["key_padding_mask"] = kpm
        if masks == "kpm_float":
            kw["key_padding_mask"] = torch.zeros(kpm.shape).masked_fill(kpm, float("-inf"))
        if masks in ("attn_2d", "both"):
            kw["attn_mask"] = torch.rand(Lq, lk) > 0.7
            kw["attn_mask"][:, 0] = False
        if masks == "attn_3d_float":
            kw["attn_mask"] = torch.randn((B if batched else 1) * H, Lq, lk)
        if masks == "causal":
            kw["attn_mask"], kw["is_causal"] = torch.triu(torch.ones(Lq, lk, dtype=torch.bool), 1), True
        kw["need_weights"] = weights != "no"
        kw["average_attn_weights"] = weights == "averaged"
        results = []
        for module in (ref, ours):
            inputs = [t.clone().requires_grad_() for t in (q, k, v)]
            out, w = module(*inputs, **kw)
            grads = torch.autograd.grad(out.square().sum(), inputs)
            results.append((out, w, grads))
        n += 1
        (o1, w1, g1), (o2, w2, g2) = results
        try:
            torch.testing.assert_close(o2, o1, atol=3e-6, rtol=1e-5)
            assert (w1 is None) == (w2 is None)
            if w1 is not None:
                torch.testing.assert_close(w2, w1, atol=3e-6, rtol=1e-5)
            for a, b in zip(g2, g1):
                torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
        except AssertionError as e:
            failures.append(f"batch_first={batch_first} cross={cross} add_bias_kv={bias_kv} add_zero_attn={zero_attn} "
                            f"batched={batched} masks={masks} weights={weights}: {str(e).splitlines()[0]}")
    assert not failures, f"{len(failures)} of {n} combinations differ:\n" + "\n".join(failures[:20])


def test_packed_sequences_give_the_padded_batchs_log_probabilities_and_gradients():
    """forward with src_lengths/tgt_lengths (every attention a varlen_attention over the packed
    tokens, no padding) equals the padded batch at its real positions, and so do the parameter
    gradients of the loss over real targets."""
    from fused_attn.tools import train as tr

    cfg = tr.TrainConfig(d_model=32, d_ff=64, h=4, max_len=9)
    torch.manual_seed(0)
    model = fa.models.make_model(cfg.vocab, cfg.vocab, 2, 32, 64, 4, 0.0, pad_id=tr.PAD, backend="cpu",
                                 max_len=12).double()
    src, tgt = tr.make_batch(cfg, 6, torch.Generator().manual_seed(3), "cpu")
    padded = model(src, tgt[:, :-1])
    padded_loss = tr._loss_sum(cfg, padded, tgt[:, 1:]) / (tgt[:, 1:] != tr.PAD).sum()
    grads = torch.autograd.grad(padded_loss, list(model.parameters()))
    packed, target = tr._packed_forward(model, src, tgt)
    real = tgt[:, 1:] != tr.PAD
    torch.testing.assert_close(packed, padded[real])
    packed_loss = tr._loss_sum(cfg, packed, target) / target.numel()
    torch.testing.assert_close(packed_loss, padded_loss)
    for g_packed, g_padded in zip(torch.autograd.grad(packed_loss, list(model.parameters())), grads):
        torch.testing.assert_close(g_packed, g_padded)


def test_fused_attn_train_packed_follows_the_padded_loss_curve():
    from fused_attn.tools import train as tr

    args = dict(steps=4, batch_size=8, d_model=32, d_ff=64, max_len=9, backend="cpu")
    packed = tr.train(tr.TrainConfig(**args, packed=True), evaluate=False)
    padded = tr.train(tr.TrainConfig(**args), evaluate=False)
    torch.testing.assert_close(torch.tensor(packed["losses"]), torch.tensor(padded["losses"]), rtol=1e-4, atol=1e-5)
    with pytest.raises(tr.TrainError, match="--packed runs every attention"):
        tr.TrainConfig(packed=True, dropout=0.1).check()
