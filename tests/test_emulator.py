"""The warp emulator (csrc/emu) itself: its fragment layouts against NVIDIA CuTe, the faults
it must catch, the kernels under the warp schedule and under AddressSanitizer/UBSan, their
bank conflicts, and mutation tests: a kernel broken on purpose must fail here.

The parity suites (test_attention, test_feed_forward, test_layer_norm, test_model) run the emulated
kernels through the `cuda_emu` backend; this file uses the torch-free driver
(fused_attn.emu.build_driver) where a separate build is needed.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.nn.attention.bias import causal_lower_right

import fused_attn as fa
from fused_attn import emu, testing

from conftest import usable

ROOT = Path(__file__).resolve().parent.parent
CUTLASS_INCLUDE = ROOT / "build" / "cutlass-4.2.0.0" / "cutlass_library" / "source" / "include"
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"

needs_cxx = pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to build the emulator driver")


@pytest.fixture(scope="module")
def driver():
    return emu.build_driver()


def _attention_inputs(B=1, H=2, HK=2, Lq=45, Lk=70, D=64, dtype=torch.float16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    return rnd(B, H, Lq, D), rnd(B, HK, Lk, D), rnd(B, HK, Lk, D), rnd(B, H, Lq, D)


def _attention_errors(result, q, k, v, dout, *, causal=0, window=(-1, -1), softcap=0.0):
    """2x-rule comparisons of the driver's outputs (causal 0 none, 1 upper-left, 2
    lower-right; a window and softcap) with the float64 reference."""
    gqa = q.shape[1] != k.shape[1]
    mask = causal_lower_right(q.shape[2], k.shape[2]) if causal == 2 else None

    def reference(dtype):
        qs, ks, vs = (t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v))
        out = fa.reference.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=causal == 1,
                                                        enable_gqa=gqa, window_size=window, softcap=softcap)
        out.backward(dout.to(dtype))
        return out, qs.grad, ks.grad, vs.grad

    low, truth = reference(q.dtype), reference(torch.float64)
    ours = (result["out"], result["dq"], result["dk"], result["dv"])
    scale = float(truth[0].abs().max())
    return [testing.check_2x(n, a, lo, t, scale=None if n == "out" else scale)
            for n, a, lo, t in zip(("out", "dq", "dk", "dv"), ours, low, truth)]


# ---------------------------------------------------------------- layouts

@pytest.mark.skipif(not CUTLASS_INCLUDE.exists(), reason="nvidia-cutlass headers not installed (make test does)")
@pytest.mark.skipif(not (CUDA_INCLUDE / "cuda_runtime_api.h").exists(), reason="CuTe needs the CUDA toolkit headers")
@needs_cxx
def test_fragment_layouts_match_cute_and_a_wrong_one_does_not(tmp_path):
    """Every (lane, register, half) of mma.m16n8k16 A/B/C (f16 and bf16) and ldmatrix
    .x1/.x2/.x4 (plain and .trans) maps to the element CuTe's traits say; a layout with two
    index terms swapped is caught."""
    def check(src: Path) -> subprocess.CompletedProcess:
        exe = tmp_path / f"check_{src.name}"
        cmd = ["g++", "-std=c++17", "-O0", "-w", "-I", str(src), "-I", str(CUTLASS_INCLUDE), "-I", str(CUDA_INCLUDE),
               "-I", str(CUDA_INCLUDE / "cccl"), str(ROOT / "tests" / "emu" / "layouts_vs_cute.cpp"), "-o", str(exe)]
        subprocess.run(cmd, check=True, capture_output=True)
        return subprocess.run([str(exe)], capture_output=True, text=True)

    good = check(ROOT / "csrc")
    assert good.returncode == 0 and "0 disagreements" in good.stdout, good.stdout
    wrong = tmp_path / "wrong"
    (wrong / "emu").mkdir(parents=True)
    text = (ROOT / "csrc" / "emu" / "layouts.h").read_text()
    right_a = "(lane >> 2) + 8 * (r & 1), 2 * (lane & 3) + h + 8 * (r >> 1)"
    assert right_a in text
    wrong_a = "(lane >> 2) + 8 * (r >> 1), 2 * (lane & 3) + h + 8 * (r & 1)"
    (wrong / "emu" / "layouts.h").write_text(text.replace(right_a, wrong_a))
    bad = check(wrong)
    assert bad.returncode == 1 and "mma f16" in bad.stdout, bad.stdout


# ---------------------------------------------------------------- faults the emulator catches

@needs_cxx
@pytest.mark.parametrize("name, words", [
    ("deadlock", "deadlock: no thread can run.*warp collective with missing lanes"),
    ("barrier_skip", "__syncthreads not reached by every thread: 32 of 64 threads returned"),
    ("smem_out_of_bounds", "ldmatrix: shared address .* is outside the block's shared memory"),
    ("divergent_collective", "lanes wait at different warp collectives"),
])
def test_rule_breaking_kernels_fail_with_a_message(driver, name, words):
    with pytest.raises(emu.DriverError, match=words):
        emu.run_driver(driver, "selftest", {}, {"name": name}, {})


@needs_cxx
def test_cp_async_destination_is_nan_until_the_wait(driver):
    out, _ = emu.run_driver(driver, "selftest", {}, {"name": "cp_async_wait"},
                            {"before": ((128,), torch.float32), "after": ((128,), torch.float32)})
    assert torch.isnan(out["before"]).all()
    assert torch.equal(out["after"], torch.arange(128, dtype=torch.float32))


# ---------------------------------------------------------------- schedules, sanitizers, bank conflicts

@pytest.mark.skipif(not usable("cuda_emu"), reason="the cuda_emu backend is not built")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_warp_schedule_attention_feed_forward_layer_norm(dtype):
    """Each warp runs to its next barrier before the next warp starts: a missing barrier
    would let a warp read tiles other warps have not loaded (NaN until their wait)."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 37, 64, generator=gen).to(dtype) for _ in range(3))
    mask = torch.rand(1, 1, 37, 37, generator=gen) > 0.3
    x = torch.randn(67, 64, generator=gen).to(dtype)
    w1, w2 = torch.randn(96, 64, generator=gen).to(dtype) / 8, torch.randn(64, 96, generator=gen).to(dtype) / 8
    with emu.schedule("warp"):
        attn = testing.compare(lambda **kw: fa.scaled_dot_product_attention(**kw, backend="cuda_emu"),
                               fa.reference.scaled_dot_product_attention,
                               dict(query=q, key=k, value=v, attn_mask=mask), grad_names=["query", "key", "value"])
        ff = testing.compare(lambda **kw: fa.feed_forward(**kw, backend="cuda_emu"), fa.reference.feed_forward,
                             dict(input=x, w1=w1, b1=None, w2=w2, b2=None, activation="gelu", residual=x),
                             grad_names=["input", "w1", "w2"])
        ln = testing.compare(lambda **kw: fa.layer_norm(**kw, backend="cuda_emu"), fa.reference.layer_norm,
                             dict(input=x, normalized_shape=(64,), weight=torch.rand(64, generator=gen).to(dtype),
                                  bias=torch.randn(64, generator=gen).to(dtype), residual=x),
                             grad_names=["input", "weight", "bias", "residual"])
    testing.assert_all_ok(attn + ff + ln)


@pytest.mark.skipif(not usable("cuda_emu"), reason="the cuda_emu backend is not built")
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 256])
def test_ldmatrix_reads_are_bank_conflict_free(head_dim):
    """The padded tiles (rows of HEAD + 8 elements: an odd number of 16-byte units) claim
    conflict-free ldmatrix reads: counted for attention forward and backward at every head
    dim and for the FFN GEMMs. The cp.async writes are counted and reported too: where 8
    lanes' 16-byte chunks span two rows narrower than 128 bytes (head dims 32 and 96, the
    FFN's 32-deep K-major tiles), the odd pitch that keeps ldmatrix conflict-free makes
    2-way write conflicts (no padding satisfies both; a swizzle would)."""
    gen = torch.Generator().manual_seed(head_dim)
    q, k, v = (torch.randn(1, 2, 40, head_dim, generator=gen).half().requires_grad_() for _ in range(3))
    emu.reset_stats()
    fa.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cuda_emu").sum().backward()
    s = emu.stats()
    print(f"attention head dim {head_dim}: ldmatrix {s['ldmatrix_phases']} phases, {s['ldmatrix_conflicts']} "
          f"conflicts; cp.async {s['cp_async_phases']} phases, {s['cp_async_conflicts']} conflicts")
    assert s["ldmatrix_phases"] > 0 and s["ldmatrix_conflicts"] == 0
    if head_dim % 64 == 0:  # whole 128-byte rows per quarter-warp
        assert s["cp_async_conflicts"] == 0
    x = torch.randn(40, 64, generator=gen).half().requires_grad_()
    w1, w2 = (torch.randn(*s_, generator=gen).half().requires_grad_() for s_ in ((128, 64), (64, 128)))
    emu.reset_stats()
    fa.feed_forward(x, w1, None, w2, None, backend="cuda_emu").sum().backward()
    s = emu.stats()
    print(f"feed-forward: ldmatrix {s['ldmatrix_phases']} phases, {s['ldmatrix_conflicts']} conflicts; "
          f"cp.async {s['cp_async_phases']} phases, {s['cp_async_conflicts']} conflicts")
    assert s["ldmatrix_phases"] > 0 and s["ldmatrix_conflicts"] == 0


@needs_cxx
@pytest.mark.slow
def test_kernels_under_address_and_undefined_behaviour_sanitizers():
    """The driver built with -fsanitize=address,undefined runs attention (masked, GQA, odd
    sizes, head dims 32 and 128), the FFN and LayerNorm + residual: no report, and the
    results still meet the 2x rule."""
    exe = emu.build_driver(sanitize=True)
    env = {"ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:halt_on_error=1", "UBSAN_OPTIONS": "halt_on_error=1"}
    comps = []
    for D, HK, causal in ((32, 1, 2), (128, 2, 0)):
        q, k, v, dout = _attention_inputs(H=2, HK=HK, Lq=19, Lk=33, D=D, dtype=torch.bfloat16, seed=D)
        res, _ = emu.run_attention(exe, q, k, v, dout, causal=causal, env=env)
        comps += _attention_errors(res, q, k, v, dout, causal=causal)
    testing.assert_all_ok(comps)
    gen = torch.Generator().manual_seed(1)
    x, dout = torch.randn(21, 32, generator=gen).half(), torch.randn(21, 32, generator=gen).half()
    w1, w2 = torch.randn(40, 32, generator=gen).half() / 4, torch.randn(32, 40, generator=gen).half() / 4
    b1, b2 = torch.randn(40, generator=gen).half(), torch.randn(32, generator=gen).half()
    res, _ = emu.run_feed_forward(exe, x, w1, b1, w2, b2, dout, residual=x, env=env)
    ref = fa.reference.feed_forward(x.double(), w1.double(), b1.double(), w2.double(), b2.double(), activation="gelu",
                                    residual=x.double())
    torch.testing.assert_close(res["out"].double(), ref, atol=2e-2, rtol=2e-2)
    w, b = torch.rand(48, generator=gen).half(), torch.randn(48, generator=gen).half()
    xl, dy = torch.randn(9, 48, generator=gen).half(), torch.randn(9, 48, generator=gen).half()
    res, _ = emu.run_layer_norm(exe, xl, w, b, dy, residual=xl, env=env)
    ref = fa.reference.layer_norm(xl.double(), (48,), w.double(), b.double(), residual=xl.double())
    torch.testing.assert_close(res["y"].double(), ref, atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------- mutation tests

MUTATIONS = {
    # (file, text, replacement, schedule, the attention's window / softcap)
    "missing __syncthreads": ("cuda/mma.cuh", "      cp_async_wait<0>();\n    }\n    __syncthreads();\n",
                              "      cp_async_wait<0>();\n    }\n", "warp", {}),
    "weaker cp.async wait": ("cuda/mma.cuh", "      cp_async_wait<1>();", "      cp_async_wait<2>();",
                             "round_robin", {}),
    "wrong ldmatrix lane address": ("cuda/mma.cuh", "ldmatrix_x4(a, tile + (row0 + (lane & 15)) * PITCH",
                                    "ldmatrix_x4(a, tile + (row0 + (lane & 7)) * PITCH", "round_robin", {}),
    "wrong shuffle partner": ("cuda/attention_fwd.cu", "sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 1);",
                              "sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 4);", "round_robin", {}),
    "window one key narrower (forward, dQ)": ("cuda/attention_common.cuh",
                                              "if (m.left >= 0) lo = imax(lo, pos - m.left);",
                                              "if (m.left >= 0) lo = imax(lo, pos - m.left + 1);", "round_robin",
                                              dict(window=(40, 10))),
    "a key's last query left out (dK, dV)": ("cuda/attention_common.cuh",
                                             "if (m.left >= 0) hi = imin(hi, k - off + m.left + 1);",
                                             "if (m.left >= 0) hi = imin(hi, k - off + m.left);", "round_robin",
                                             dict(window=(40, 10))),
    "wrong softcap derivative": ("cuda/attention_common.cuh", "slope = 1.f - th * th;", "slope = 1.f - th;",
                                 "round_robin", dict(softcap=2.0)),
}


def _mutated_tree(tmp_path: Path, file: str, text: str, replacement: str) -> Path:
    tree = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", tree)
    path = tree / file
    source = path.read_text()
    assert source.count(text) == 1, f"the mutation site in {file} is gone: update the test"
    path.write_text(source.replace(text, replacement))
    return tree


@needs_cxx
@pytest.mark.slow
@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_broken_kernel_is_caught(tmp_path, driver, mutation):
    file, text, replacement, schedule, features = MUTATIONS[mutation]
    q, k, v, dout = _attention_inputs(Lq=45, Lk=150, seed=7)
    good, _ = emu.run_attention(driver, q, k, v, dout, schedule=schedule, **features)
    testing.assert_all_ok(_attention_errors(good, q, k, v, dout, **features))
    broken = emu.build_driver(_mutated_tree(tmp_path, file, text, replacement))
    bad, _ = emu.run_attention(broken, q, k, v, dout, schedule=schedule, **features)
    assert not all(c.ok for c in _attention_errors(bad, q, k, v, dout, **features)), f"{mutation} went unnoticed"


@needs_cxx
@pytest.mark.slow
def test_removing_the_shared_memory_padding_raises_bank_conflicts(tmp_path, driver):
    q, k, v, dout = _attention_inputs(Lq=33, Lk=40, seed=8)
    _, padded = emu.run_attention(driver, q, k, v, dout)
    tree = _mutated_tree(tmp_path, "cuda/attention_fwd.cu", "static constexpr int kPitch = HEAD + 8;",
                         "static constexpr int kPitch = HEAD;")
    # the tile loader and the backward kernels' tiles too: one pitch for every tile
    for file, text in (("cuda/mma.cuh", "constexpr int kPitch = HEAD + 8;"),
                       ("cuda/attention_bwd.cu", "static constexpr int kPitch = HEAD + 8;")):
        path = tree / file
        source = path.read_text()
        assert text in source
        path.write_text(source.replace(text, text.replace(" + 8", "")))
    res, unpadded = emu.run_attention(emu.build_driver(tree), q, k, v, dout)
    testing.assert_all_ok(_attention_errors(res, q, k, v, dout))  # still right, only slower
    assert padded["ldmatrix_conflicts"] == 0
    assert unpadded["ldmatrix_conflicts"] > unpadded["ldmatrix_phases"] // 4, unpadded


@pytest.mark.skipif(not usable("cuda_emu"), reason="the cuda_emu backend is not built")
def test_instruction_probe_in_the_emulator_means_what_the_gpu_probe_checks():
    """The probe the GPU suite compares bit for bit with the GPU: in the emulator its words
    are the PTX ISA's fragments of known tiles (lane = 4 g + t): ldmatrix gives row g,
    columns 2t, 2t+1 of each 8x8 block (.trans: rows 2t, 2t+1 of column g); the mma
    accumulators C[g (+8)][2t (+1)] of A A^T + C."""
    words = emu.run_probe("cpu")
    tile = (torch.arange(256, dtype=torch.float64).reshape(16, 16) * 7 % 9) - 4
    product = tile @ tile.T

    def f16(bits):
        return float(torch.tensor([bits], dtype=torch.int32).to(torch.int16).view(torch.float16))

    for lane in range(32):
        g, t, w = lane >> 2, lane & 3, words[lane]
        for m in range(4):  # matrix m: rows 8 * (m % 2).., columns 8 * (m // 2)..
            r0, c0 = 8 * (m % 2), 8 * (m // 2)
            plain, trans = int(w[m]) & 0xFFFFFFFF, int(w[4 + m]) & 0xFFFFFFFF
            for h in range(2):
                assert f16((plain >> (16 * h)) & 0xFFFF) == tile[r0 + g, c0 + 2 * t + h]
                assert f16((trans >> (16 * h)) & 0xFFFF) == tile[r0 + 2 * t + h, c0 + g]
        for base in (8, 16):  # float16, bfloat16
            got = w[base:base + 8].view(torch.float32).double()
            init = (1.0, 2.0, 3.0, float(lane))
            for i in range(4):
                r, c = g + 8 * (i >> 1), 2 * t + (i & 1)
                assert got[i] == product[r, c] + init[i] and got[4 + i] == product[r, c + 8]
        assert float(w[24].view(torch.float32)) == float((lane ^ 5) * 3 + 1)
        assert float(w[25].view(torch.float32)) == float(sum(range(32)))
        assert (w[26:30] == 0).all()
