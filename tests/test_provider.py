"""fused_attn as torch's SDPA provider: unmodified F.scaled_dot_product_attention calls run
our kernels once activated (issue "Drop-in everywhere", part 1). Every case counts the
kernel calls, so a test cannot pass on torch's own kernels."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_attn
from fused_attn import provider, reference, testing

from conftest import backend_device, stable_seed, usable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the kernel backends that take CPU tensors here, and so torch's CPU flash op
CPU_PROVIDER_BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not usable(b) or backend_device(b) != "cpu",
                                                                   reason=f"{b} does not run on CPU tensors here"))
                         for b in ("cpu", "cuda_emu", "triton")]


@pytest.fixture(autouse=True)
def _inactive_and_counted():
    provider.deactivate()
    provider.reset()
    yield
    provider.deactivate()


def _dtype(backend):
    return torch.float16 if backend == "cuda_emu" else torch.float32


def _masks(kind, B, Lq, Lk, dtype):
    g = torch.Generator().manual_seed(stable_seed(kind, B, Lq, Lk))
    if kind == "bool":  # 2-D, one row with every key masked (torch and we give 0 there)
        m = torch.rand(Lq, Lk, generator=g) > 0.3
        m[:, 0] = True
        m[1] = False
        return m
    if kind == "float":  # (B, 1, Lq, Lk): padding as -inf, plus an additive bias
        m = torch.randn(B, 1, Lq, Lk, generator=g).to(dtype)
        m[:, :, :, -2:] = float("-inf")
        return m
    return None


@pytest.mark.parametrize("backend", CPU_PROVIDER_BACKENDS)
@pytest.mark.parametrize("case", ["plain", "causal", "causal_wide", "causal_tall", "bool", "float", "gqa_bool",
                                  "scale"])
def test_unmodified_sdpa_runs_our_kernels_forward_and_backward(backend, case):
    """F.scaled_dot_product_attention under fused_attn.activated(backend): our kernel runs
    forward and backward (counted), and the result holds the 2x rule against the float64
    reference with torch's semantics (mask conversion, GQA, causal, fully masked rows)."""
    B, Hq, Hk, Lq, Lk, D = 2, 4, 4, 7, 7, 32
    kw = {}
    if case == "causal":
        kw["is_causal"] = True
    elif case == "causal_wide":
        Lk, kw["is_causal"] = 11, True
    elif case == "causal_tall":
        Lq, Lk, kw["is_causal"] = 9, 5, True
    elif case == "gqa_bool":
        Hk, kw["enable_gqa"] = 2, True
    elif case == "scale":
        kw["scale"] = 0.3
    dtype = _dtype(backend)
    mask = _masks(case.split("_")[-1], B, Lq, Lk, dtype)
    g = torch.Generator().manual_seed(stable_seed(backend, case))
    inputs = {"query": torch.randn(B, Hq, Lq, D, generator=g).to(dtype),
              "key": torch.randn(B, Hk, Lk, D, generator=g).to(dtype),
              "value": torch.randn(B, Hk, Lk, D, generator=g).to(dtype)}
    if mask is not None:
        inputs["attn_mask"] = mask

    with fused_attn.activated(backend):  # forward and backward (the reference is plain float64 math)
        comparisons = testing.compare(lambda **t: F.scaled_dot_product_attention(**t, **kw),
                                      lambda **t: reference.scaled_dot_product_attention(**t, **kw),
                                      inputs, grad_names=["query", "key", "value"])
    testing.assert_all_ok(comparisons)
    assert provider.calls[backend] == 2 and provider.calls["fallback"] == 0, (dict(provider.calls),
                                                                               dict(provider.fallback_reasons))


def test_logsumexp_and_layouts_match_torchs_kernel():
    """The overridden CPU op returns what torch's returns: the output, torch's logsumexp
    convention and layout ((B, Lq, H) memory), and the gradient layouts of its meta function."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 6, 16, generator=g) for _ in range(3))
    mask = torch.zeros(6, 6)
    mask[2] = float("-inf")  # a fully masked row
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out0, lse0 = op(q, k, v, attn_mask=mask)
    go = torch.randn(out0.shape, generator=g)
    grads0 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(go, q, k, v, out0, lse0, 0.0, False,
                                                                                  attn_mask=mask)
    with fused_attn.activated("cpu"):
        out1, lse1 = op(q, k, v, attn_mask=mask)
        grads1 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(go, q, k, v, out1, lse1, 0.0,
                                                                                      False, attn_mask=mask)
    assert provider.calls["cpu"] == 2
    torch.testing.assert_close(out1, out0)
    torch.testing.assert_close(lse1, lse0)
    assert lse1.stride() == lse0.stride() and out1.stride() == out0.stride()
    assert torch.equal(out1[:, :, 2], torch.zeros_like(out1[:, :, 2]))
    for a, b in zip(grads1, grads0):
        torch.testing.assert_close(a, b)
        assert a.stride() == b.stride()


def test_a_backward_takes_the_other_paths_forward():
    """Our backward from torch's forward (its logsumexp) and torch's backward from ours: the
    logsumexp convention is shared, so mixing them (a forward that fell back) stays right."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(3))
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    out0, lse0 = op(q, k, v, is_causal=True)
    go = torch.randn(out0.shape, generator=g)
    torch_grads = bwd(go, q, k, v, out0, lse0, 0.0, True)
    with fused_attn.activated("cpu"):
        ours_from_torch = bwd(go, q, k, v, out0, lse0, 0.0, True)
        out1, lse1 = op(q, k, v, is_causal=True)
    torch_from_ours = bwd(go, q, k, v, out1, lse1, 0.0, True)
    for a, b, c in zip(ours_from_torch, torch_from_ours, torch_grads):
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(b, c)


def test_inputs_we_would_treat_differently_run_torchs_kernel():
    """Dropout (torch's random stream, which its CPU flash kernel refuses anyway) goes to
    torch's own kernel, counted with the reason: its error, exactly."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(3))
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    with pytest.raises(RuntimeError) as torchs:
        op(q, k, v, 0.25)
    with fused_attn.activated():
        with pytest.raises(RuntimeError) as ours:
            op(q, k, v, 0.25)
    assert str(ours.value) == str(torchs.value)
    assert provider.calls["fallback"] == 1 and provider.calls["cpu"] == 0
    assert "dropout" in " ".join(provider.fallback_reasons)


def test_float64_runs_our_cpu_kernels_and_passes_gradcheck():
    """float64 (what torch's CPU flash kernel takes and gradcheck needs, issue 16 item 15)
    runs our cpu kernels through the provider: torch's result to float64 precision, its
    logsumexp dtype and layout, and torch.autograd.gradcheck with a float mask and causal."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.randn(5, 5, generator=g, dtype=torch.float64)
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    expected, expected_lse = op(q, k, v, attn_mask=mask)
    with fused_attn.activated():
        got, lse = op(q, k, v, attn_mask=mask)
        for kw in (dict(attn_mask=mask), dict(is_causal=True)):
            assert torch.autograd.gradcheck(lambda *t: F.scaled_dot_product_attention(*t, **kw), (q, k, v))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert lse.dtype == expected_lse.dtype == torch.float64 and lse.stride() == expected_lse.stride()
    torch.testing.assert_close(lse, expected_lse, rtol=1e-12, atol=1e-12)
    assert provider.calls["cpu"] > 0 and provider.calls["fallback"] == 0


@pytest.mark.skipif(not usable("cuda_emu"), reason="the warp emulator is not built")
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_flash_op_overrides_on_the_emulated_kernels(monkeypatch, causal):
    """The CUDA op overrides (aten::_scaled_dot_product_flash_attention, _flash_attention_forward
    and their backwards) called directly on CPU tensors with the emulated CUDA kernels: output,
    logsumexp and gradients by the 2x rule, in each op's own layout."""
    monkeypatch.setitem(provider._state, "backend", "cuda_emu")
    g = torch.Generator().manual_seed(stable_seed("cuda-ops", causal))
    B, H, L, D = 2, 2, 9, 32
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float16) for _ in range(3))
    go = torch.randn(B, H, L, D, generator=g, dtype=torch.float16)

    def ref(dtype):
        t = [x.detach().to(dtype).clone().requires_grad_() for x in (q, k, v)]
        out = reference.scaled_dot_product_attention(*t, is_causal=causal)
        s = (t[0] @ t[1].transpose(-1, -2)) * D ** -0.5
        if causal:
            s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
        out.backward(go.to(dtype))
        return out.detach(), torch.logsumexp(s.float() if dtype != torch.float64 else s, -1).detach(), \
            [x.grad for x in t]

    (o16, l16, g16), (o64, l64, g64) = ref(torch.float16), ref(torch.float64)
    out, lse, *_ = provider.sdpa_flash_forward(None, q, k, v, 0.0, causal, False)
    grads = provider.sdpa_flash_backward(None, go, q, k, v, out, lse, None, None, L, L, 0.0, causal, None, None)
    t = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731
    out2, lse2, *_ = provider.flash_forward(None, t(q), t(k), t(v), None, None, L, L, 0.0, causal, False)
    grads2 = provider.flash_backward(None, t(go), t(q), t(k), t(v), out2, lse2, None, None, L, L, 0.0, causal, None,
                                     None)
    checks = [testing.check_2x("out", out, o16, o64),
              testing.check_2x("out (B, L, H, D)", out2.transpose(1, 2), o16, o64),
              testing.check_2x("lse", lse, l16, l64.float()), testing.check_2x("lse 2", lse2, l16, l64.float())]
    for name, a, b, lo, hi in zip("qkv", grads, grads2, g16, g64):
        checks += [testing.check_2x(f"d{name}", a, lo, hi), testing.check_2x(f"d{name} 2", b.transpose(1, 2), lo, hi)]
    testing.assert_all_ok(checks)
    assert provider.calls["cuda_emu"] == 4


def test_cuda_fallback_decisions():
    """What the CUDA overrides leave to torch's kernels: causal with Lq != Lk (torch's flash
    kernel aligns it bottom-right), packed sequences, windows, ALiBi and unknown options."""
    assert provider._cuda_causal(True, 4, 4) == (1, "")
    assert provider._cuda_causal(False, 3, 8) == (0, "")
    assert provider._cuda_causal(True, 3, 8)[0] is None
    assert "packed" in provider._dense_flash_problem(torch.zeros(2), None, None, {})
    assert "window" in provider._dense_flash_problem(None, 16, -1, {})
    assert provider._dense_flash_problem(None, -1, -1, {"alibi_slopes": torch.zeros(2)}) == "alibi_slopes"
    assert provider._dense_flash_problem(None, None, None, {"num_splits": None}) == ""


def test_torch_registry_activation_and_restore():
    """torch.nn.attention.activate_flash_attention_impl("fused_attn") turns it on and
    restore_flash_attention_impl() off; fused_attn.activate/deactivate do the same."""
    attn = torch.nn.attention
    if not hasattr(attn, "activate_flash_attention_impl"):
        pytest.skip(f"torch {torch.__version__} has no SDPA provider registry")
    q = torch.randn(1, 2, 4, 8)
    assert "fused_attn" in attn.list_flash_attention_impls()
    attn.activate_flash_attention_impl("fused_attn")
    try:
        assert attn.current_flash_attention_impl() == "fused_attn" and provider.is_active()
        F.scaled_dot_product_attention(q, q, q)
    finally:
        attn.restore_flash_attention_impl()
    assert not provider.is_active() and attn.current_flash_attention_impl() is None
    F.scaled_dot_product_attention(q, q, q)
    assert provider.calls["cpu"] == 1
    fused_attn.activate()
    F.scaled_dot_product_attention(q, q, q)
    fused_attn.deactivate()
    F.scaled_dot_product_attention(q, q, q)
    assert provider.calls["cpu"] == 2 and not provider.is_active()
    with pytest.raises(ValueError, match="backend"):
        fused_attn.activate("torch")


def test_environment_variable_activates_on_import_and_nothing_else_does():
    code = ("import torch, fused_attn\nfrom fused_attn import provider\nq = torch.randn(1, 1, 3, 8)\n"
            "torch.nn.functional.scaled_dot_product_attention(q, q, q)\n"
            "print(provider.is_active(), provider.calls['cpu'])")
    results = []
    for value in ("1", None):
        env = {k: v for k, v in os.environ.items() if k != provider.ENV_VAR}
        if value:
            env[provider.ENV_VAR] = value
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
        results.append(out.stdout.split()[-2:])
    assert results == [["True", "1"], ["False", "0"]]


def test_torch_modules_train_and_eval():
    """nn.MultiheadAttention (need_weights=False: torch's SDPA path) and nn.TransformerEncoder
    in training run our kernel, outputs and gradients equal to torch's kernel's; in eval
    torch's CPU fast path (torch._transformer_encoder_layer_fwd) never calls SDPA, so it is
    torch's, unchanged (fused_attn.patch swaps the modules instead)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    x = torch.randn(3, 6, 32)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:] = True

    def run(active, train):
        enc.train(train)
        enc.zero_grad()
        with fused_attn.activated() if active else torch.enable_grad(), torch.set_grad_enabled(train):
            y = enc(x, src_key_padding_mask=pad)  # eval under no_grad: torch's fast path
            if train:
                y.square().sum().backward()
        return y.detach(), [p.grad.clone() for p in enc.parameters()] if train else []

    for train in (True, False):
        provider.reset()
        (y0, g0), (y1, g1) = run(False, train), run(True, train)
        torch.testing.assert_close(y1, y0, atol=2e-6, rtol=1e-5)
        for a, b in zip(g1, g0):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
        assert provider.calls["cpu"] == (4 if train else 0), dict(provider.calls)  # 2 layers, forward + backward
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    y0 = mha(x, x, x, key_padding_mask=pad, need_weights=False)[0]
    provider.reset()
    with fused_attn.activated():
        y1 = mha(x, x, x, key_padding_mask=pad, need_weights=False)[0]
    torch.testing.assert_close(y1, y0, atol=2e-6, rtol=1e-5)
    assert provider.calls["cpu"] == 1


def test_torch_compile_through_the_provider():
    """A compiled function calling F.scaled_dot_product_attention runs our kernels forward
    and backward (Inductor calls the overridden op at run time)."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 4, 8, 16, generator=g, requires_grad=True)
    expected = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    (expected_grad,) = torch.autograd.grad(expected.sum(), q)
    torch._dynamo.reset()
    with fused_attn.activated():
        fn = torch.compile(lambda t: F.scaled_dot_product_attention(t, t, t, is_causal=True))
        got = fn(q)
        (grad,) = torch.autograd.grad(got.sum(), q)
    torch._dynamo.reset()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(grad, expected_grad)
    assert provider.calls["cpu"] == 2, dict(provider.calls)
