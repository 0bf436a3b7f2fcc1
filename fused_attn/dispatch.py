"""The one dispatch point: which backend runs an op for given inputs.

Every op registers, per backend, a ``supports(**inputs) -> list[str]`` (reasons it
cannot take these inputs; empty when it can) and an implementation. ``backend="auto"``
(or the ``FUSED_ATTN_BACKEND`` environment variable, when the argument is "auto")
walks the op's preference list for the inputs' device and takes the first backend
that is usable here and supports the inputs. A backend named explicitly that cannot
run raises NotImplementedError listing every reason.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

import torch

BACKENDS = ("cuda", "triton", "cpu", "torch", "reference", "cuda_emu")
# the backends running the CUDA C++ kernels: on a GPU, and on the warp emulator (CPU tensors,
# for tests; "auto" never picks it)
CUDA_KERNEL_BACKENDS = ("cuda", "cuda_emu")
ENV_VAR = "FUSED_ATTN_BACKEND"

_availability: Optional[dict] = None
log = logging.getLogger("fused_attn")
# (op name, backend) -> how many calls each backend has run: integration tests read it to
# prove which kernel ran
calls: Counter = Counter()


def _triton_status() -> Optional[str]:
    try:
        importlib.import_module("triton")
    except Exception as e:  # ImportError, or a broken install
        return f"triton cannot be imported ({type(e).__name__}: {e})"
    if triton_interpreting():
        return None
    if not torch.cuda.is_available():
        return ("no GPU (torch.cuda.is_available() is False); set TRITON_INTERPRET=1 before importing triton "
                "to run the Triton kernels on the CPU")
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return f"the Triton kernels need compute capability 8.0 or newer, this GPU has {major}.x"
    return None


def _cuda_status() -> Optional[str]:
    from . import _ext

    if _ext.load_error is not None:
        return _ext.load_error
    if not _ext.C.has_cuda():
        return ("fused_attn._C was built without the CUDA kernels (no nvcc or a CPU-only torch at build time; "
                "rebuild with FUSED_ATTN_CUDA=1 to see why)")
    if not torch.cuda.is_available():
        return "no GPU (torch.cuda.is_available() is False)"
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return f"the CUDA kernels need compute capability 8.0 or newer, this GPU has {major}.x"
    return None


def _cuda_emu_status() -> Optional[str]:
    from . import _ext

    return _ext.emu_load_error()


def _cpu_status() -> Optional[str]:
    from . import _ext

    return _ext.load_error


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available_backends() -> dict[str, Optional[str]]:
    """name -> None if the backend can run here, else the reason it cannot."""
    global _availability
    if _availability is None:
        _availability = {
            "cuda": _cuda_status(),
            "triton": _triton_status(),
            "cpu": _cpu_status(),
            "torch": None,
            "reference": None,
            "cuda_emu": _cuda_emu_status(),
        }
    return dict(_availability)


def backend_devices(name: str) -> tuple[str, ...]:
    """Device types a backend's kernels run on (the Triton interpreter runs on the CPU)."""
    if name == "cuda":
        return ("cuda",)
    if name in ("cpu", "cuda_emu"):
        return ("cpu",)
    if name == "triton":
        return ("cpu",) if triton_interpreting() else ("cuda",)
    return ("cpu", "cuda")


@dataclass(frozen=True)
class Capability:
    """What one backend's kernels take for one op, declared once (xformers' operator
    attributes): `problems` names every input it does not take. Facts compiled into the
    extension are read from it (head_dims: a callable returning build_info's list)."""
    dtypes: tuple
    max_head_dim: Optional[int] = None                     # attention: query and value head dims
    head_dims: Optional[Callable[[], tuple]] = None        # attention: only these, value's equal to query's
    width_multiple: int = 1                                # feed-forward: d_model and d_ff
    sliding_window: bool = False                           # attention: applies window_size itself (else: a mask)
    softcap: bool = False                                  # attention: caps the scores (else: declined)
    alibi: bool = False                                    # attention: adds ALiBi slopes itself (else: a mask)

    def problems(self, dtype: torch.dtype, head_dims: tuple = (), widths: tuple = ()) -> list[str]:
        out = []
        if dtype not in self.dtypes:
            out.append(f"dtype {dtype} is not one of {', '.join(str(d) for d in self.dtypes)}")
        if head_dims and self.head_dims is not None:
            allowed = self.head_dims()
            if head_dims[0] not in allowed or any(d != head_dims[0] for d in head_dims):
                out.append(f"the kernels take head dims {', '.join(map(str, allowed))} with the value head dim "
                           f"equal to the query's, got {' and '.join(map(str, head_dims))}")
        elif head_dims and self.max_head_dim is not None and max(head_dims) > self.max_head_dim:
            out.append(f"head dims up to {self.max_head_dim} are supported, got "
                       f"{' and '.join(map(str, head_dims))}")
        if widths and self.width_multiple > 1 and any(w % self.width_multiple for w in widths):
            out.append(f"the kernels need d_model and d_ff to be multiples of {self.width_multiple}, got "
                       f"{' and '.join(map(str, widths))}")
        return out


def softcap_problems(capabilities: dict, backend: str, softcap: float) -> list[str]:
    """Why `backend`, one of an op's `capabilities`, cannot cap scores at `softcap` ([] when it can)."""
    if not softcap or capabilities[backend].softcap:
        return []
    having = ", ".join(name for name, c in capabilities.items() if c.softcap)
    return [f"softcap is not in these kernels yet ({having}, torch and reference compute it)"]


@dataclass
class _Entry:
    supports: Callable[..., list]
    impl: Callable


class Op:
    """The backends of one op and its 'auto' preference per device type."""

    def __init__(self, name: str, auto_order: dict[str, tuple[str, ...]]):
        self.name = name
        self.auto_order = auto_order
        self.entries: dict[str, _Entry] = {}

    def register(self, backend: str, supports: Callable[..., list], impl: Callable) -> None:
        assert backend in BACKENDS, backend
        self.entries[backend] = _Entry(supports, impl)

    def reasons(self, backend: str, device: torch.device, **inputs) -> list[str]:
        """Every reason `backend` cannot run this op on these inputs here (empty: it can)."""
        if backend not in self.entries:
            return [f"backend {backend!r} has no {self.name} implementation"]
        why = available_backends()[backend]
        if why is not None:
            return [why]
        out = []
        if device.type not in backend_devices(backend):
            out.append(f"it runs on {' or '.join(backend_devices(backend))} tensors, the inputs are on {device}")
        return out + list(self.entries[backend].supports(**inputs))

    def select(self, backend: str, device: torch.device, **inputs) -> tuple[str, Callable]:
        """Resolve `backend` ('auto' or a name) for these inputs to (name, implementation),
        counting the call in `calls`."""
        name = self.choose(backend, device, **inputs)
        calls[(self.name, name)] += 1
        return name, self.entries[name].impl

    def choose(self, backend: str, device: torch.device, **inputs) -> str:
        """The backend `select` would run (nothing counted); raises as it does."""
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {type(backend).__name__}")
        if backend == "auto":
            backend = os.environ.get(ENV_VAR, "auto") or "auto"
            if backend != "auto" and backend not in BACKENDS:
                raise ValueError(f"{ENV_VAR}={backend!r} is not a backend; expected one of auto, {', '.join(BACKENDS)}")
        if backend == "auto":
            tried = []
            for name in self.auto_order.get(device.type, ("torch",)):
                why = self.reasons(name, device, **inputs)
                if not why:
                    return name
                tried.append(f"{name}: {'; '.join(why)}")
                log.debug("%s: auto skipped %s: %s", self.name, name, "; ".join(why))
            raise NotImplementedError(f"no backend can run {self.name} on these inputs: " + " | ".join(tried))
        if backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}, got {backend!r}")
        why = self.reasons(backend, device, **inputs)
        if why:
            raise NotImplementedError(f"backend {backend!r} cannot run {self.name} on these inputs: " + "; ".join(why))
        return backend
