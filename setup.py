"""Builds fused_attn and its C++/CUDA extensions: fused_attn._C (CPU kernels, and the CUDA
kernels when nvcc is found) and fused_attn._C_emu (the CUDA kernels on the warp emulator).

Environment knobs:
  FUSED_ATTN_CUDA=auto|0|1   build the CUDA sources: auto (default) when nvcc and a CUDA
                             build of torch are found; 1 fails loudly if they are not.
  CUDA_HOME                  the CUDA toolkit (default /usr/local/cuda).
  TORCH_CUDA_ARCH_LIST       GPU targets (default "8.0;9.0").
  FUSED_ATTN_CPU_CAPABILITY  DEFAULT|AVX2|AVX512 for the CPU kernels (default: what torch
                             detects on the build machine; the extension is built where it runs).
  MAX_JOBS                   parallel compile jobs (ninja).
"""

import glob
import os
import platform
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_flags():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_fused_attn_build", os.path.join(ROOT, "fused_attn", "_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BUILD = _load_build_flags()


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return home if os.path.exists(os.path.join(home, "bin", "nvcc")) else None


# torch.utils.cpp_extension reads CUDA_HOME when it is imported; the nvcc on PATH may be
# a wrapper script from which it would derive a toolkit root without libcudart.
_CUDA_HOME = _cuda_home()
if _CUDA_HOME:
    os.environ["CUDA_HOME"] = _CUDA_HOME
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", BUILD.DEFAULT_CUDA_ARCHS)
# ninja installed into the same environment as this Python (a venv) is not always on PATH.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

CPU_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
    "DEFAULT": [],
}


def _want_cuda():
    mode = os.environ.get("FUSED_ATTN_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"FUSED_ATTN_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False, "FUSED_ATTN_CUDA=0"
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    if _CUDA_HOME is None:
        problems.append("no nvcc under $CUDA_HOME/bin or /usr/local/cuda/bin")
    if problems:
        if mode == "1":
            sys.exit("FUSED_ATTN_CUDA=1 but the CUDA sources cannot be built: " + "; ".join(problems))
        return False, "; ".join(problems)
    return True, ""


def _cpu_capability():
    cap = os.environ.get("FUSED_ATTN_CPU_CAPABILITY")
    if cap is None:
        cap = torch.backends.cpu.get_cpu_capability() if platform.machine() in ("x86_64", "AMD64") else "DEFAULT"
    cap = cap.upper()
    if cap not in CPU_CAPABILITY_FLAGS:
        cap = "DEFAULT"
    return cap


def _extension():
    with_cuda, why_not = _want_cuda()
    cpu_cap = _cpu_capability()
    sources = ["csrc/ops.cpp", "csrc/ops_cpu.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp", "-Wno-maybe-uninitialized", "-Wno-unknown-pragmas",
           f'-DFUSED_ATTN_CPU_CAPABILITY="{cpu_cap}"'] + CPU_CAPABILITY_FLAGS[cpu_cap]
    define_macros = []
    if with_cuda:
        sources += ["csrc/ops_cuda.cpp"] + sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("FUSED_ATTN_WITH_CUDA", "1"))
        nvcc = list(BUILD.NVCC_FLAGS)
        print(f"fused_attn: building CPU ({cpu_cap}) and CUDA ({os.environ['TORCH_CUDA_ARCH_LIST']}) kernels")
        return CUDAExtension(
            "fused_attn._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"])
    print(f"fused_attn: building CPU ({cpu_cap}) kernels only ({why_not})")
    return CppExtension(
        "fused_attn._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


def _emu_extension():
    """fused_attn._C_emu: the CUDA kernels of csrc/cuda compiled by the host compiler for the
    warp emulator (csrc/emu), on every machine, with or without nvcc."""
    sources = ["csrc/ops_emu.cpp"] + sorted(glob.glob("csrc/emu/*.cpp"))
    sources.remove("csrc/emu/driver.cpp")  # the torch-free command-line front end (fused_attn.emu builds it)
    return CppExtension(
        "fused_attn._C_emu", sources, include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=[("FUSED_ATTN_EMU", "1")], extra_compile_args={"cxx": list(BUILD.EMU_CXX_FLAGS)})


# metadata, dependencies and the `fused-attn` command: pyproject.toml
setup(
    # FUSED_ATTN_SKIP_EXT=1: register the package only; the Makefile then builds the
    # extension in place with `setup.py build_ext --inplace`, incrementally (ninja).
    ext_modules=[] if os.environ.get("FUSED_ATTN_SKIP_EXT") == "1" else [_extension(), _emu_extension()],
    cmdclass={"build_ext": BuildExtension},
)
