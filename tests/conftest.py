"""Test set-up: Triton runs under its interpreter on the CPU when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at
collection, before any test module imports fused_attn's Triton kernels.
"""

import os
import zlib

import torch

HAS_GPU = torch.cuda.is_available()
# one Triton configuration per kernel variant: no autotuning runs inside the tests
os.environ.setdefault("FUSED_ATTN_AUTOTUNE", "0")
if os.environ.get("PYTEST_XDIST_WORKER") and not HAS_GPU:
    # the workers already use every core: a thread pool each would oversubscribe them
    # (OpenMP's spinning threads make that ~10x slower on 2 cores)
    torch.set_num_threads(1)
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fused_attn  # noqa: E402
from fused_attn import dispatch  # noqa: E402

KERNEL_BACKENDS = ("cuda", "triton", "cpu", "cuda_emu")


def backend_device(name: str) -> str:
    """The device whose tensors a backend's kernels take here."""
    return dispatch.backend_devices(name)[0]


def stable_seed(*parts) -> int:
    """A seed from test parameters that is the same in every process and run (hash() of a
    string is salted per process): a failing case reproduces."""
    return zlib.crc32(repr(parts).encode()) % 10_000


def kernel_dtype(backend: str) -> torch.dtype:
    """float32 where the backend takes it; the CUDA C++ kernels (cuda, cuda_emu) take 16-bit types only."""
    return torch.float16 if backend in dispatch.CUDA_KERNEL_BACKENDS else torch.float32


def sixteen_bit_at_small_sizes_only(backend: str, dtype: torch.dtype) -> bool:
    """Whether the parity suites run this (backend, dtype) at their small sizes only (make
    test's time budget): 16-bit types under the Triton interpreter, bfloat16 on the warp
    emulator (float16 is its main type). The small sizes reach every kernel path; a GPU
    runs every size."""
    if backend == "triton" and dispatch.triton_interpreting():
        return dtype in (torch.float16, torch.bfloat16)
    return backend == "cuda_emu" and dtype == torch.bfloat16


def interpreted_triton(backend: str) -> bool:
    """The Triton kernels running under the interpreter, which runs the grid's programs one
    after another: the parity suites keep its largest cases to the fewest programs that
    still reach every kernel path (make test's time budget; a GPU runs every case)."""
    return backend == "triton" and dispatch.triton_interpreting()


def emulated(backend: str) -> bool:
    """A GPU kernel backend running on the CPU (the warp emulator, the Triton interpreter):
    orders of magnitude slower per step, so large problems are cut down there."""
    return backend == "cuda_emu" or interpreted_triton(backend)


def usable(name: str) -> bool:
    return fused_attn.available_backends()[name] is None


def kernel_backend_params(op=None):
    """pytest params for every kernel backend, skipped (with the reason) where unusable
    or, given a dispatch.Op, where the backend has no implementation of it yet."""
    out = []
    for name in KERNEL_BACKENDS:
        why = fused_attn.available_backends()[name]
        if why is None and op is not None and name not in op.entries:
            why = f"backend {name!r} has no {op.name} implementation"
        out.append(pytest.param(name, id=name, marks=pytest.mark.skip(reason=why) if why else ()))
    return out


def pytest_collection_modifyitems(config, items):
    """The compile-gate tests first: each runs for minutes in its own processes, so under
    xdist they overlap the many short tests instead of finishing the run alone. `make test`
    schedules with `--dist worksteal`: the first worker starts on the gates while the other
    runs the short tests and then takes the first worker's remaining ones (xdist's default
    scheduling also handed the first worker ~470 short tests up front, and the run waited on
    them: 24.5 of its 34 minutes were the parallel run, its first worker busy throughout)."""
    items.sort(key=lambda item: item.get_closest_marker("gate") is None)


@pytest.fixture(autouse=True)
def _poisoned_outputs():
    """Every test runs with kernel outputs NaN-filled before the kernels write them."""
    from fused_attn.testing import poisoned_outputs

    with poisoned_outputs():
        yield
