"""Package plumbing: import, backend availability, nn drop-ins, custom-op registration,
torch.compile, and the GPU compile gate."""

import os
import subprocess
import sys

import pytest
import torch

import fused_attn as fa
from fused_attn.tools import gate

from conftest import backend_device, kernel_backend_params, usable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_does_not_initialise_cuda():
    code = ("import torch, fused_attn, fused_attn.nn, fused_attn.ops.layer_norm; "
            "print(torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_available_backends_reports_every_backend():
    av = fa.available_backends()
    assert set(av) == set(fa.BACKENDS)
    assert av["torch"] is None and av["reference"] is None
    for name, why in av.items():
        assert why is None or (isinstance(why, str) and why), name


def test_missing_extension_is_reported_not_raised():
    code = ("import sys; sys.modules['fused_attn._C'] = None; import fused_attn; "
            "av = fused_attn.available_backends(); print(av['cpu']); print(av['cuda'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "cannot be loaded" in out.stdout


def test_nn_layer_norm_is_a_drop_in():
    torch.manual_seed(0)
    ref = torch.nn.LayerNorm(48)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    ours = fa.nn.LayerNorm(48)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 48)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    assert isinstance(ours, torch.nn.LayerNorm)
    plain = fa.nn.LayerNorm((4, 6), elementwise_affine=False)
    assert plain.weight is None and len(plain.state_dict()) == 0
    nobias = fa.nn.LayerNorm(6, bias=False)
    assert nobias.bias is None and list(nobias.state_dict()) == ["weight"]
    y, s = ours(x, residual=x, return_residual=True)
    torch.testing.assert_close(s, 2 * x)
    torch.testing.assert_close(y, ref(2 * x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", kernel_backend_params())
def test_layer_norm_custom_op_opcheck(backend):
    """torch.library.opcheck: schema, fake (meta) implementation and autograd registration agree."""
    from fused_attn.ops import layer_norm as op

    device = backend_device(backend)
    x = torch.randn(5, 24, device=device, requires_grad=True)
    r = torch.randn(5, 24, device=device, requires_grad=True)
    w = torch.randn(24, device=device, requires_grad=True)
    b = torch.randn(24, device=device, requires_grad=True)
    torch.library.opcheck(op.layer_norm_fwd, (x, r, w, b, 1e-5, True, backend),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_fullgraph_layer_norm():
    backend = "cpu" if usable("cpu") else "torch"
    mod = fa.nn.LayerNorm(32, backend=backend)

    def block(x, r):
        y, s = mod(x, residual=r, return_residual=True)
        return y * 2 + s

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 32, requires_grad=True)
    r = torch.randn(4, 32)
    out = compiled(x, r)
    torch.testing.assert_close(out, block(x, r))
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_ptxas_parser_flags_spills():
    text = """ptxas info    : Compiling entry function '_Z3foov' for 'sm_80'
ptxas info    : Function properties for _Z3foov
    24 bytes stack frame, 20 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 49200 bytes smem, 360 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barv' for 'sm_80'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 360 bytes cmem[0]
"""
    foo, bar = gate.parse_ptxas(text, 80, "x.cu")
    assert not foo.ok and "spills" in foo.problems[0] and "shared memory" in foo.problems[1]
    assert foo.registers == 255 and bar.ok and bar.shared == 0


def test_sass_check_flags_local_memory_and_missing_tensor_core_instructions():
    listing = """
        /*0000*/                   LDSM.16.M88.4 R4, [R2] ;
        /*0010*/                   HMMA.16816.F32 R8, R4, R6, R8 ;
        /*0020*/              @!P0 LDGSTS.E.BYPASS.128 [R3], desc[UR4][R10.64] ;
        /*0030*/                   STL [R1], R8 ;
"""
    r = gate.GateResult("cuda", "k", 80)
    gate.judge_sass(r, listing, require_tensor_cores=True)
    assert r.mma == "HMMA" and r.problems == ["local-memory instructions in the SASS: STL"]
    r = gate.GateResult("cuda", "k", 90)
    gate.judge_sass(r, listing.replace("LDSM", "LDS").replace("STL", "STS"), require_tensor_cores=True)
    assert r.problems == ["SASS lacks LDSM (expected mma.sync, ldmatrix and cp.async)"]


@pytest.mark.skipif(gate.nvcc_path() is None, reason="needs nvcc")
def test_cuda_gate_reads_the_built_object_as_nvcc_reports_it(monkeypatch):
    """The gate's CUDA half reads the cubins setup.py built when they are current; on the
    probe kernel that gives exactly what nvcc -Xptxas -v reports when compiling afresh."""
    source = [s for s in gate.cuda_sources() if s.endswith("probe.cu")][0]
    if gate.built_object(source) is None:
        pytest.skip("no current build of csrc/cuda/probe.cu (make setup builds it)")
    from_object = {arch: gate.compile_cuda(source, arch) for arch in gate.ARCHS}
    monkeypatch.setattr(gate, "built_object", lambda source: None)
    from_nvcc = {arch: gate.compile_cuda(source, arch) for arch in gate.ARCHS}
    assert from_object == from_nvcc and all(r.ok and r.registers > 0 for rs in from_nvcc.values() for r in rs)


@pytest.mark.gate
def test_triton_attention_uses_wgmma_on_sm90_and_mma_sync_on_sm80():
    """Which tensor-core instructions the Triton attention forward compiles to (the CUDA C++
    kernels use mma.sync on both; the gate checks their SASS for HMMA)."""
    code = r"""
from fused_attn.tools import gate
idx = [i for i, (m, _) in enumerate(gate.triton_configs()) if m.endswith("attention")][0]
mod, index = gate.triton_configs()[idx]
print(gate.triton_mma_kind(mod, index, 80), gate.triton_mma_kind(mod, index, 90))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.stdout.split() == ["HMMA", "HGMMA"], out.stdout + out.stderr[-2000:]


@pytest.mark.gate
def test_triton_gate_detects_a_spilling_configuration():
    """A configuration known to spill (a whole 8192-wide fp32 row in the backward kernel)
    must fail the gate: proves the gate can fail."""
    code = r"""
import sys
from fused_attn.tools import gate
from fused_attn.triton import layer_norm as L
cfg = [c for c in L.gate_configs() if c.name.endswith("bwd")][0]
cfg.constexprs = dict(cfg.constexprs, BLOCK_N=8192, SINGLE_TILE=True)
cfg.num_warps = 16
L.gate_configs = lambda: [cfg]
r = gate.compile_triton("fused_attn.triton.layer_norm", 0, 80)
print("FAILS" if not r.ok else "PASSES", r.problems)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert "FAILS" in out.stdout and "spills" in out.stdout, out.stdout + out.stderr


@pytest.mark.gate
@pytest.mark.parametrize("half", ["cuda", "triton"])
def test_gpu_compile_gate(half):
    """Every .cu for sm_80 and sm_90, and every Triton configuration with our triton for
    sm_80, compiles without spills and within shared memory (no GPU needed). sm_90's Triton
    builds are checked with the GPU machine's triton 3.6 (the next test): make test builds
    each configuration once per arch, with the triton that runs it; `make gate` builds all
    four combinations."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, "-m", "fused_attn.tools.gate", "--jobs", str(max(2, os.cpu_count() or 2))]
    if half == "cuda":
        if gate.nvcc_path() is None:
            pytest.skip("no CUDA toolkit on this machine: the .cu half cannot run")
        args.append("--cuda")
    else:
        args += ["--triton", "--arch", "80"]
    out = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert "kernel builds pass" in out.stdout


@pytest.mark.gate
def test_triton_gate_with_the_gpu_machines_triton():
    """The GPU machine (sm_90) runs triton 3.6, whose register allocation differs from 3.8's:
    every Triton configuration the launchers can choose there compiles for sm_90 without
    spills too. `make test` installs that triton beside ours (build/triton-3.6.0) and this
    runs the gate on it for sm_90, the GPU machine's arch (`make gate` checks sm_80 with it too)."""
    path = os.path.join(ROOT, "build", "triton-3.6.0")
    if not os.path.isdir(os.path.join(path, "triton")):
        pytest.skip(f"{path} missing: `make test` installs triton 3.6.0 there")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = path
    check = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"], capture_output=True,
                           text=True, env=env, cwd=ROOT)
    assert check.stdout.strip() == "3.6.0", check.stdout + check.stderr
    args = [sys.executable, "-m", "fused_attn.tools.gate", "--triton", "--arch", "90",
            "--jobs", str(max(2, os.cpu_count() or 2))]
    out = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert "kernel builds pass" in out.stdout


def test_kernel_codes_agree_between_cpp_and_python():
    """The kernels' integer codes and activation constants are written once per language:
    csrc/kernel_params.h and fused_attn/codes.py must say the same."""
    import re

    from fused_attn import codes

    header = open(os.path.join(ROOT, "csrc", "kernel_params.h")).read()
    for enum, prefix, py in (("MaskKind", "kMask", codes.MaskKind), ("CausalKind", "kCausal", codes.CausalKind),
                             ("Activation", "k", codes.Activation)):
        body = re.search(rf"enum {enum} : int32_t {{([^}}]*)}}", header).group(1)
        cpp = {name: int(value) for name, value in re.findall(r"(k\w+) = (\d+)", body)}
        expected = {prefix + "".join(w.title() for w in c.name.split("_")): int(c) for c in py}
        assert cpp == expected, (enum, cpp, expected)
    for cpp_name, value in (("kSqrtHalf", codes.SQRT_HALF), ("kInvSqrt2Pi", codes.INV_SQRT_2PI),
                            ("kSqrt2OverPi", codes.SQRT_2_OVER_PI), ("kGeluTanhCubic", codes.GELU_TANH_CUBIC)):
        literal = float(re.search(rf"constexpr double {cpp_name} = ([0-9.]+);", header).group(1))
        assert abs(literal - value) < 1e-15, (cpp_name, literal, value)
