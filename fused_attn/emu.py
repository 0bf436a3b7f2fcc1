"""The warp emulator from Python: its in-process controls (the ``cuda_emu`` backend's
extension) and its torch-free command-line driver (csrc/emu/driver.cpp).

The driver is built here, on demand, with the host compiler: from the repository's csrc/
or from a modified copy of it (the mutation tests), optionally with sanitizers. Built
objects are cached under build/emu/ by a hash of their sources and flags.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from . import _build, _ext, reference

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CACHE = ROOT / "build" / "emu"
KERNEL_UNITS = ("attention_fwd", "attention_bwd", "feed_forward", "layer_norm")
SANITIZE_FLAGS = ("-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                  "-fno-sanitize-recover=undefined")
SCHEDULES = ("round_robin", "warp")
_DTYPE_NAMES = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}


# ---------------------------------------------------------------- in process (fused_attn._C_emu)

def _module():
    m = _ext.emu_module()
    if m is None:
        raise RuntimeError(_ext.emu_load_error())
    return m


def stats() -> dict:
    """The emulator's counters (launches, blocks, barriers, mma, ldmatrix and cp.async phases
    and bank conflicts, ...) since the last reset_stats()."""
    return dict(_module().stats())


def reset_stats() -> None:
    _module().reset_stats()


class schedule:
    """Context manager: run the cuda_emu backend's kernels under `name` ('round_robin' or 'warp')."""

    def __init__(self, name: str):
        if name not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")
        self.name = name

    def __enter__(self):
        self.before = _module().schedule()
        _module().set_schedule(self.name)
        return self

    def __exit__(self, *exc):
        _module().set_schedule(self.before)


# ---------------------------------------------------------------- the command-line driver

def _cxx() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) to build the emulator driver")
    return cxx


def _digest(parts: Sequence[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()[:20]


def _headers(src: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted([*src.glob("*.h"), *src.glob("cuda/*.cuh"), *src.glob("emu/*.h")])]


def build_driver(src: Path = CSRC, *, sanitize: bool = False) -> Path:
    """The driver built from the C++ tree `src` (csrc/ or a modified copy), cached."""
    src = Path(src)
    flags = [*(SANITIZE_FLAGS if sanitize else _build.EMU_CXX_FLAGS), "-std=c++17", "-DFUSED_ATTN_EMU",
             "-I", str(src)]
    headers = _headers(src)
    units = [src / "emu" / "driver.cpp"] + [src / "cuda" / f"{u}.cu" for u in KERNEL_UNITS]
    CACHE.mkdir(parents=True, exist_ok=True)

    def compile_unit(unit: Path) -> Path:
        key = _digest([unit.read_bytes(), *headers, " ".join(flags[:-2]).encode()])
        obj = CACHE / f"{unit.stem}-{key}.o"
        if not obj.exists():
            tmp = obj.with_suffix(f".{os.getpid()}.tmp")
            cmd = [_cxx(), *flags, "-x", "c++", "-c", str(unit), "-o", str(tmp)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"building {unit} for the emulator failed:\n{r.stderr[-4000:]}")
            os.replace(tmp, obj)
        return obj

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        objs = list(pool.map(compile_unit, units))
    exe = CACHE / f"emu_driver-{_digest([o.name.encode() for o in objs])}"
    if not exe.exists():
        tmp = exe.with_suffix(f".{os.getpid()}.tmp")
        link = [_cxx(), *(f for f in flags if f.startswith("-f")), *map(str, objs), "-o", str(tmp)]
        r = subprocess.run(link, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"linking the emulator driver failed:\n{r.stderr[-4000:]}")
        os.replace(tmp, exe)
    return exe


class DriverError(RuntimeError):
    """The driver failed: a kernel fault the emulator caught (deadlock, shared memory out of
    bounds, ...) or a sanitizer report. The message holds its stderr."""


def run_driver(exe: Path, op: str, inputs: dict[str, torch.Tensor], params: dict, outputs: dict[str, tuple],
               *, schedule: str = "round_robin", env: Optional[dict] = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Runs `op` on `inputs` (contiguous CPU tensors written as raw files). `outputs` maps each
    output name to (shape, dtype). Returns the output tensors and the emulator's counters."""
    with tempfile.TemporaryDirectory(prefix="fused_attn_emu_") as d:
        for name, t in inputs.items():
            t.detach().contiguous().view(torch.uint8).numpy().tofile(os.path.join(d, f"{name}.bin"))
        cmd = [str(exe), "--schedule", schedule, op, d, *(f"{k}={v}" for k, v in params.items())]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
        if r.returncode != 0:
            raise DriverError(f"{' '.join(cmd[:4])} ... exited with {r.returncode}:\n{r.stderr[-6000:]}")
        out = {}
        for name, (shape, dtype) in outputs.items():
            raw = np.fromfile(os.path.join(d, f"{name}.bin"), dtype=np.uint8)
            out[name] = torch.from_numpy(raw).view(dtype).reshape(shape).clone()
        return out, json.loads(r.stdout.strip().splitlines()[-1])


def run_attention(exe: Path, q, k, v, dout, *, mask=None, causal: int = 0, scale: Optional[float] = None,
                  dropout_p: float = 0.0, seed: int = 0, window=(-1, -1), softcap: float = 0.0,
                  schedule: str = "round_robin", env=None):
    """Attention forward and backward through the driver. q, dout (B, H, Lq, D); k, v (B, HK, Lk, D);
    mask None, bool or q.dtype (B, H, Lq, Lk); window (left, right) and softcap as in
    scaled_dot_product_attention. -> ({out, stats, dq, dk, dv[, dmask]}, counters)."""
    B, H, Lq, D = q.shape
    HK, Lk = k.shape[1], k.shape[2]
    kind = 0 if mask is None else (1 if mask.dtype == torch.bool else 2)
    inputs = dict(q=q, k=k, v=v, dout=dout)
    if mask is not None:
        inputs["mask"] = mask.to(torch.uint8) if kind == 1 else mask
    params = dict(B=B, H=H, HK=HK, Lq=Lq, Lk=Lk, D=D, dtype=_DTYPE_NAMES[q.dtype], causal=causal, mask_kind=kind,
                  scale=repr(reference.default_scale(D) if scale is None else scale), dropout_p=repr(dropout_p),
                  seed=seed, window_left=int(window[0]), window_right=int(window[1]), softcap=repr(float(softcap)))
    outputs = dict(out=((B, H, Lq, D), q.dtype), stats=((2, B, H, Lq), torch.float32), dq=(q.shape, q.dtype),
                   dk=(k.shape, q.dtype), dv=(v.shape, q.dtype))
    if kind == 2:
        outputs["dmask"] = ((B, H, Lq, Lk), torch.float32)
    return run_driver(exe, "attention", inputs, params, outputs, schedule=schedule, env=env)


def run_feed_forward(exe: Path, x, w1, b1, w2, b2, dout, *, activation: int = 1, residual=None, dropout_p: float = 0.0,
            seed: int = 0, schedule: str = "round_robin", env=None):
    """The feed-forward block forward and backward through the driver (nn.Linear weight layout).
    -> ({out, hidden, pre, dx, dw1, dw2, db1, db2}, counters)."""
    M, dm = x.shape
    dff = w1.shape[0]
    inputs = dict(x=x, w1=w1, b1=b1, w2=w2, b2=b2, dout=dout)
    if residual is not None:
        inputs["residual"] = residual
    params = dict(M=M, d_model=dm, d_ff=dff, activation=activation, dtype=_DTYPE_NAMES[x.dtype],
                  dropout_p=repr(dropout_p), seed=seed, has_b1=1, has_b2=1, has_residual=int(residual is not None))
    outputs = dict(out=((M, dm), x.dtype), hidden=((M, dff), x.dtype), pre=((M, dff), x.dtype), dx=((M, dm), x.dtype),
                   dw1=(w1.shape, x.dtype), dw2=(w2.shape, x.dtype), db1=((dff,), torch.float32),
                   db2=((dm,), torch.float32))
    return run_driver(exe, "feed_forward", inputs, params, outputs, schedule=schedule, env=env)


def run_layer_norm(exe: Path, x, weight, bias, dy, *, residual=None, eps: float = 1e-5,
                   schedule: str = "round_robin", env=None):
    """LayerNorm (+ residual) forward and backward through the driver.
    -> ({y, mean, rstd, dx, dw, db[, sum]}, counters)."""
    rows, cols = x.shape
    inputs = dict(x=x, weight=weight, bias=bias, dy=dy)
    if residual is not None:
        inputs["residual"] = residual
    params = dict(rows=rows, cols=cols, dtype=_DTYPE_NAMES[x.dtype], wdtype=_DTYPE_NAMES[weight.dtype], eps=repr(eps),
                  has_residual=int(residual is not None), has_weight=1, has_bias=1)
    outputs = dict(y=(x.shape, x.dtype), mean=((rows,), torch.float32), rstd=((rows,), torch.float32),
                   dx=(x.shape, x.dtype), dw=((cols,), torch.float32), db=((cols,), torch.float32))
    if residual is not None:
        outputs["sum"] = (x.shape, x.dtype)
    return run_driver(exe, "layer_norm", inputs, params, outputs, schedule=schedule, env=env)


# ---------------------------------------------------------------- the instruction probe

PROBE_WORDS = 30  # per lane: ldmatrix x4, x4.trans, mma f16 (2 x 4), mma bf16 (2 x 4), shuffle, warp sum, zero-fill


def probe_tiles() -> torch.Tensor:
    """The probe's input: a float16 and a bfloat16 16x16 tile of small integers (every
    product and sum the probe forms is exact), as 512 int16 words."""
    values = (torch.arange(256, dtype=torch.float32).reshape(16, 16) * 7 % 9) - 4
    return torch.cat([values.half().view(torch.int16).flatten(), values.bfloat16().view(torch.int16).flatten()])


def run_probe(device: str) -> torch.Tensor:
    """The probe's (32, PROBE_WORDS) int32 words: on the GPU ('cuda') or the emulator ('cpu')."""
    tiles = probe_tiles().to(device)
    if device == "cpu":
        words = _ext.emu_ops().instruction_probe(tiles)
    else:
        words = _ext.ops().instruction_probe(tiles)
    return words.cpu().reshape(32, PROBE_WORDS)


def compare_probe() -> list[str]:
    """Runs the probe on the GPU and in the emulator; one line per word that differs."""
    gpu, emulated = run_probe("cuda"), run_probe("cpu")
    names = ([f"ldmatrix.x4 r{i}" for i in range(4)] + [f"ldmatrix.x4.trans r{i}" for i in range(4)] +
             [f"mma.f16 c{i}" for i in range(8)] + [f"mma.bf16 c{i}" for i in range(8)] +
             ["shfl.xor", "warp sum"] + [f"zero-filled word {i}" for i in range(4)])
    return [f"lane {lane} {names[w]}: GPU {int(gpu[lane, w]) & 0xffffffff:#010x}, "
            f"emulator {int(emulated[lane, w]) & 0xffffffff:#010x}"
            for lane in range(32) for w in range(PROBE_WORDS) if gpu[lane, w] != emulated[lane, w]]


def main(argv=None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m fused_attn.emu",
                                 description="Compare the warp emulator with the GPU, instruction by instruction.")
    ap.add_argument("command", choices=["probe"])
    ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no GPU (torch.cuda.is_available() is False): the probe compares the GPU with the emulator",
              file=sys.stderr)
        return 2
    diffs = compare_probe()
    for line in diffs[:50]:
        print(line)
    print(f"instruction probe: {32 * PROBE_WORDS - len(diffs)}/{32 * PROBE_WORDS} words equal "
          f"on {torch.cuda.get_device_name()} and in the emulator")
    return 1 if diffs else 0


if __name__ == "__main__":
    raise SystemExit(main())
