"""The GPU compile gate: proves, without a GPU, that every kernel builds for sm_80 and
sm_90 without register spills and within the chip's shared memory.

- Triton: every configuration the launchers can choose (each kernel module's
  ``gate_configs()``) is compiled ahead of time with ``triton.compile`` for
  ``GPUTarget("cuda", 80|90, 32)``; the cubin's resource usage (cuobjdump) must show
  no stack (spills) and no local memory, and ``metadata.shared`` must fit the chip.
- CUDA C++: every ``csrc/cuda/*.cu`` for sm_80 and sm_90: the cubins inside the object
  setup.py built (when it is newer than every source), else nvcc ``-cubin -Xptxas -v``;
  every kernel must have a 0-byte stack frame, no spills or local memory, and static
  shared memory within the per-block limit. Its SASS (cuobjdump) must have
  no local-memory loads or stores (LDL/STL), and the tensor-core kernels (attention
  forward, dK/dV, dQ and the FFN GEMM) must contain HMMA (mma.sync), LDSM (ldmatrix) and
  LDGSTS (cp.async): proof that the instructions the emulator runs are the ones built.
- Each CUDA result records which matrix instructions its SASS uses (HMMA = mma.sync, also
  on sm_90); ``triton_mma_kind`` tells it for a Triton configuration (HGMMA = wgmma on
  sm_90, HMMA on sm_80; a test checks the attention forward).

Kernels of new modules join by adding the module to TRITON_MODULES and defining
``gate_configs()``. Run: ``python -m fused_attn.tools.gate [--triton] [--cuda] [--jobs N]``.
It must run in a process where TRITON_INTERPRET is not set (the tests start it so).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import glob
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

ARCHS = (80, 90)
# Shared memory one block may use (opt-in maximum), bytes.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
STATIC_SMEM_LIMIT = 48 * 1024
# shared memory the driver reserves per block, which a cubin's resource usage counts in
RESERVED_SMEM = {80: 0, 90: 1024}
TRITON_MODULES = ["fused_attn.triton.layer_norm", "fused_attn.triton.attention", "fused_attn.triton.feed_forward",
                  "fused_attn.triton.decode"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class TritonConfig:
    """One compilable configuration of a Triton kernel."""

    name: str
    fn: Any  # triton.JITFunction
    signature: dict  # argument -> type ("*fp16", "i32", "fp32", ...), constexprs excluded
    constexprs: dict  # constexpr argument -> value (including int arguments Triton specialises to 1)
    num_warps: int
    num_stages: int
    # arguments Triton would see as multiples of 16 at run time (by default every pointer:
    # torch's allocations are aligned), as it specialises them when launching
    divisible: Optional[set] = None


@dataclass
class GateResult:
    kind: str  # "triton" or "cuda"
    name: str
    arch: int
    registers: int = -1
    stack: int = 0
    spills: int = 0
    local: int = 0
    shared: int = 0
    mma: str = ""  # the SASS's matrix instructions: "HGMMA" (wgmma), "HMMA" (mma.sync), both or none
    problems: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _tool(name: str) -> Optional[str]:
    """A CUDA binary tool: Triton's bundled copy first, then CUDA_HOME, then PATH."""
    try:
        import triton

        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(p):
            return p
    except ImportError:
        pass
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    p = os.path.join(home, "bin", name)
    return p if os.path.exists(p) else shutil.which(name)


def triton_configs() -> list[tuple[str, int]]:
    """(module, index) of every registered Triton configuration."""
    out = []
    for mod in TRITON_MODULES:
        n = len(importlib.import_module(mod).gate_configs())
        out.extend((mod, i) for i in range(n))
    return out


# kernels built on mma.sync + ldmatrix + cp.async, whose SASS must show all three
TENSOR_CORE_KERNELS = ("attention_fwd_kernel", "attention_dkdv_kernel", "attention_dq_kernel",
                       "feed_forward_gemm_kernel")
SASS_REQUIRED = ("HMMA", "LDSM", "LDGSTS")


def sass_functions(cubin_path: str) -> dict[str, str]:
    """mangled kernel name -> its SASS text (cuobjdump --dump-sass)."""
    cuobjdump = _tool("cuobjdump")
    if cuobjdump is None:
        raise RuntimeError("cuobjdump not found (it ships with triton and the CUDA toolkit)")
    text = subprocess.run([cuobjdump, "--dump-sass", cubin_path], capture_output=True, text=True, check=True).stdout
    out: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            out[name] = ""
        elif name is not None:
            out[name] += line + "\n"
    return out


def _opcodes(sass: str) -> set[str]:
    """The opcodes (without modifiers) of a SASS listing."""
    return set(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass))


def _mma_kind(ops: set[str]) -> str:
    return "+".join(k for k in ("HGMMA", "HMMA") if k in ops)


def judge_sass(res: GateResult, sass: str, require_tensor_cores: bool) -> None:
    ops = _opcodes(sass)
    res.mma = _mma_kind(ops)
    local = sorted(ops & {"LDL", "STL"})
    if local:
        res.problems.append(f"local-memory instructions in the SASS: {', '.join(local)}")
    if require_tensor_cores:
        missing = [op for op in SASS_REQUIRED if op not in ops]
        if missing:
            res.problems.append(f"SASS lacks {', '.join(missing)} (expected mma.sync, ldmatrix and cp.async)")


def _resource_usage(cubin: bytes) -> dict:
    cuobjdump = _tool("cuobjdump")
    if cuobjdump is None:
        raise RuntimeError("cuobjdump not found (it ships with triton and the CUDA toolkit)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", text)
        usage[key] = int(m.group(1)) if m else 0
    return usage


def compile_triton(module: str, index: int, arch: int) -> GateResult:
    return compile_triton_config(importlib.import_module(module).gate_configs()[index], arch)


def compile_triton_config(cfg: TritonConfig, arch: int) -> GateResult:
    """Compile one Triton configuration for sm_{arch} and judge its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = GateResult("triton", cfg.name, arch)
    try:
        signature = {k: v for k, v in cfg.signature.items() if k not in cfg.constexprs}
        signature.update({k: "constexpr" for k in cfg.constexprs})
        divisible = cfg.divisible if cfg.divisible is not None else {
            k for k, v in signature.items() if v.startswith("*")}
        attrs = {(cfg.fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in divisible}
        src = ASTSource(fn=cfg.fn, signature=signature, constexprs=dict(cfg.constexprs), attrs=attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    except Exception as e:  # a compile error is a gate failure, reported with the config
        res.problems.append(f"does not compile: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return res
    usage = _resource_usage(kernel.asm["cubin"])
    res.registers, res.stack, res.local = usage["REG"], usage["STACK"], usage["LOCAL"]
    res.shared = int(kernel.metadata.shared)
    _judge(res)
    return res


def triton_mma_kind(module: str, index: int, arch: int) -> str:
    """The matrix instructions in one Triton configuration's SASS: 'HGMMA' (wgmma) or 'HMMA'
    (mma.sync). Not part of every gate run (the SASS dump costs more than the compile)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = importlib.import_module(module).gate_configs()[index]
    signature = {k: v for k, v in cfg.signature.items() if k not in cfg.constexprs}
    signature.update({k: "constexpr" for k in cfg.constexprs})
    kernel = triton.compile(ASTSource(fn=cfg.fn, signature=signature, constexprs=dict(cfg.constexprs)),
                            target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return _mma_kind(_opcodes("".join(sass_functions(f.name).values())))


def _judge(res: GateResult, smem_limit: Optional[int] = None) -> None:
    if res.stack > 0 or res.spills > 0:
        res.problems.append(f"register spills: stack frame {res.stack} B, spill bytes {res.spills}")
    if res.local > 0:
        res.problems.append(f"local memory {res.local} B")
    limit = smem_limit if smem_limit is not None else SMEM_LIMIT[res.arch]
    if res.shared > limit:
        res.problems.append(f"shared memory {res.shared} B over the sm_{res.arch} limit of {limit} B")


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers.*?(?:(\d+) bytes smem)?(?:,|$)")


def parse_ptxas(text: str, arch: int, source: str) -> list[GateResult]:
    """Per-kernel results from nvcc -Xptxas -v output."""
    results: list[GateResult] = []
    current: Optional[GateResult] = None
    for line in text.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            current = GateResult("cuda", f"{os.path.basename(source)}:{_demangle(m.group(1))}", arch)
            results.append(current)
            continue
        if current is None:
            continue
        m = _PTXAS_FRAME.search(line)
        if m:
            current.stack = int(m.group(1))
            current.spills = int(m.group(2)) + int(m.group(3))
            continue
        if "Used" in line and "registers" in line:
            current.registers = int(re.search(r"Used (\d+) registers", line).group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            current.shared = int(sm.group(1)) if sm else 0
    for r in results:
        _judge(r, smem_limit=STATIC_SMEM_LIMIT)
    return results


def _demangle(name: str) -> str:
    filt = shutil.which("c++filt")
    if not filt:
        return name
    out = subprocess.run([filt, name], capture_output=True, text=True).stdout.strip()
    return out or name


def cuda_sources() -> list[str]:
    return sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def nvcc_path() -> Optional[str]:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    p = os.path.join(home, "bin", "nvcc")
    return p if os.path.exists(p) else shutil.which("nvcc")


def built_object(source: str) -> Optional[str]:
    """The object file setup.py built from source (build/temp.*/csrc/cuda/NAME.o) if it is
    newer than source and every header under csrc/; None otherwise. (ninja rebuilds it
    when the compile command changes, so its flags are the build's.)"""
    name = os.path.splitext(os.path.basename(source))[0] + ".o"
    objects = glob.glob(os.path.join(ROOT, "build", "temp.*", "csrc", "cuda", name))
    if len(objects) != 1:
        return None
    inputs = [source] + [os.path.join(d, f) for d, _, files in os.walk(os.path.join(ROOT, "csrc"))
                         for f in files if f.endswith((".h", ".cuh", ".hpp"))]
    built = os.path.getmtime(objects[0])
    return objects[0] if all(os.path.getmtime(p) <= built for p in inputs) else None


def _cubin_results(cubin: str, source: str, arch: int) -> list[GateResult]:
    """Per-kernel results from a cubin's resource usage (cuobjdump)."""
    text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True,
                          text=True, check=True).stdout
    results = []
    for name, usage in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", text):
        r = GateResult("cuda", f"{os.path.basename(source)}:{_demangle(name)}", arch)
        fields = dict(re.findall(r"(\w+):(\d+)", usage))
        r.registers, r.stack = int(fields.get("REG", -1)), int(fields.get("STACK", 0))
        r.local = int(fields.get("LOCAL", 0))
        r.shared = max(0, int(fields.get("SHARED", 0)) - RESERVED_SMEM[arch])
        _judge(r, smem_limit=STATIC_SMEM_LIMIT)
        results.append(r)
    return results


def compile_cuda(source: str, arch: int) -> list[GateResult]:
    """Gate one .cu for sm_{arch}: the cubin setup.py built (when current), else nvcc -cubin."""
    from .. import _build

    with tempfile.TemporaryDirectory() as tmp:
        obj = built_object(source)
        cubin = None
        if obj is not None:  # the fat object holds one cubin per arch: NAME.sm_ARCH.cubin
            subprocess.run([_tool("cuobjdump"), "-xelf", "all", obj], cwd=tmp, capture_output=True, check=True)
            found = glob.glob(os.path.join(tmp, f"*.sm_{arch}.cubin"))
            cubin = found[0] if len(found) == 1 else None
        if cubin is not None:
            results = _cubin_results(cubin, source, arch)
        else:
            cubin = os.path.join(tmp, "out.cubin")
            cmd = [nvcc_path(), "-cubin", f"-arch=sm_{arch}", "-Xptxas", "-v", *_build.NVCC_FLAGS,
                   "-I", os.path.join(ROOT, "csrc"), source, "-o", cubin]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                r = GateResult("cuda", os.path.basename(source), arch)
                r.problems.append("nvcc failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1])
                return [r]
            results = parse_ptxas(proc.stdout + proc.stderr, arch, source)
        sass = {f"{os.path.basename(source)}:{_demangle(k)}": v for k, v in sass_functions(cubin).items()}
    if not results:
        r = GateResult("cuda", os.path.basename(source), arch)
        r.problems.append("no kernels found (was -Xptxas -v honoured?)")
        return [r]
    for r in results:
        if r.name not in sass:
            r.problems.append("no SASS found for this kernel in the cubin")
            continue
        judge_sass(r, sass[r.name], require_tensor_cores=any(k in r.name for k in TENSOR_CORE_KERNELS))
    return results


def run(triton: bool = True, cuda: bool = True, jobs: int = 2, progress=None,
        archs: tuple = ARCHS) -> list[GateResult]:
    """Compile everything for each of archs; returns one GateResult per kernel and arch."""
    tasks = []
    if triton:
        tasks += [("triton", (mod, idx, arch)) for mod, idx in triton_configs() for arch in archs]
    if cuda:
        if nvcc_path() is None:
            raise RuntimeError("nvcc not found: set CUDA_HOME to the CUDA toolkit")
        tasks += [("cuda", (src, arch)) for src in cuda_sources() for arch in archs]
    results: list[GateResult] = []
    ctx = __import__("multiprocessing").get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = [pool.submit(compile_triton, *a) if kind == "triton" else pool.submit(compile_cuda, *a)
                   for kind, a in tasks]
        for fut in cf.as_completed(futures):
            r = fut.result()
            results.extend(r if isinstance(r, list) else [r])
            if progress:
                progress(len(tasks))
    results.sort(key=lambda r: (r.kind, r.name, r.arch))
    return results


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("the compile gate needs TRITON_INTERPRET unset (it compiles real GPU code)", file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser(prog="python -m fused_attn.tools.gate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--triton", action="store_true", help="only the Triton kernels")
    ap.add_argument("--cuda", action="store_true", help="only the CUDA C++ kernels")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--arch", type=int, action="append", choices=ARCHS,
                    help="only this compute capability (repeatable; default: all of them)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args(argv)
    both = not (args.triton or args.cuda)
    results = run(triton=both or args.triton, cuda=both or args.cuda, jobs=args.jobs,
                  archs=tuple(args.arch) if args.arch else ARCHS)
    bad = [r for r in results if not r.ok]
    for r in results:
        status = "ok" if r.ok else "FAIL: " + "; ".join(r.problems)
        print(f"{r.kind:6} sm_{r.arch} regs={r.registers:4d} smem={r.shared:7d} stack={r.stack:4d} "
              f"mma={r.mma or '-':10} {r.name}  {status}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"ok": r.ok} for r in results], f, indent=1)
    for r in bad:  # again at the end, where a truncated log still shows them
        print(f"FAILED {r.kind} sm_{r.arch} {r.name}: {'; '.join(r.problems)}")
    print(f"compile gate: {len(results) - len(bad)}/{len(results)} kernel builds pass")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
