"""Loads the compiled extensions, recording why when one cannot be loaded.

fused_attn._C registers the ``torch.ops.fused_attn_C`` operators (CPU kernels always,
CUDA kernels when it was built with them); it never initialises CUDA. fused_attn._C_emu
(the CUDA kernels on the warp emulator, ``torch.ops.fused_attn_emu``) is loaded on first
use by the ``cuda_emu`` backend.
"""

from __future__ import annotations

from typing import Optional

C = None
load_error: Optional[str] = None

try:
    from . import _C as C  # noqa: F401
except Exception as e:  # ImportError, undefined symbols from a mismatched torch, ...
    load_error = (f"the compiled extension fused_attn._C cannot be loaded ({type(e).__name__}: {e}); "
                  "build it with `pip install --no-build-isolation -e .` (or `make setup`)")


def ops():
    """torch.ops.fused_attn_C, raising the load error if the extension is missing."""
    if load_error is not None:
        raise RuntimeError(load_error)
    import torch

    return torch.ops.fused_attn_C


_emu = None
_emu_error: Optional[str] = None
_poison = False


def emu_module():
    """fused_attn._C_emu, or None (emu_load_error() says why)."""
    global _emu, _emu_error
    if _emu is None and _emu_error is None:
        try:
            from . import _C_emu as module

            module.set_poison(_poison)
            _emu = module
        except Exception as e:
            _emu_error = (f"the emulator extension fused_attn._C_emu cannot be loaded ({type(e).__name__}: {e}); "
                          "build it with `pip install --no-build-isolation -e .` (or `make setup`)")
    return _emu


def emu_load_error() -> Optional[str]:
    emu_module()
    return _emu_error


def emu_ops():
    """torch.ops.fused_attn_emu, raising the load error if the emulator extension is missing."""
    if emu_module() is None:
        raise RuntimeError(_emu_error)
    import torch

    return torch.ops.fused_attn_emu


def backend_ops(backend: str):
    """The kernel operators of a C++ kernel backend: torch.ops.fused_attn_C for `cpu` and `cuda`
    (one schema, the kernels chosen by the tensors' device), torch.ops.fused_attn_emu for
    `cuda_emu` (the CUDA kernels on the warp emulator)."""
    return emu_ops() if backend == "cuda_emu" else ops()


def cuda_head_dims() -> tuple:
    """The head dims the CUDA attention kernels were instantiated for (csrc/kernel_params.h
    kCudaHeadDims), from whichever extension is built; () when neither is."""
    for module in (C, emu_module()):
        if module is not None and hasattr(module, "build_info"):
            return tuple(module.build_info().get("cuda_head_dims", ()))
    return ()


def set_poison(enabled: bool) -> None:
    """Make the C++ kernels' output allocations NaN-filled (tests: catches unwritten elements)."""
    global _poison
    _poison = enabled
    if C is not None:
        C.set_poison(enabled)
    if _emu is not None:
        _emu.set_poison(enabled)
