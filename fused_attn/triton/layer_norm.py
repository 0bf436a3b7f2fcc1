"""LayerNorm (+ residual) forward and backward in Triton, and their launchers.

Forward: one program per row. A row of up to MAX_TILE elements lives in registers
(one read of x, one write of y); longer rows are streamed in chunks over three passes
(mean, variance, output), the re-reads hitting L2.

Backward: program p handles a contiguous group of rows and sums dy*xhat and dy for them
into its own float32 row of partial dW/dB (registers for a single tile, its private
global row otherwise); a second kernel adds the partial rows in order. No atomics, so
results are identical from run to run.

Launchers take and return the same tensors as torch.ops.fused_attn_C.layer_norm_fwd/bwd.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import _alloc

MAX_TILE = {"fwd": 8192, "bwd": 4096}  # longest row kept whole in registers (bwd holds 6 row-sized values)
CHUNK = 4096  # chunk of a longer row


@triton.jit
def _load_row_sum(X, R, offs, mask, HAS_RES: tl.constexpr):
    """x (+ r) in float32, the sum rounded to x's dtype first, as the returned sum is."""
    x = tl.load(X + offs, mask=mask, other=0.0)
    if HAS_RES:
        x = x + tl.load(R + offs, mask=mask, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _ln_fwd_kernel(X, R, W, B, Y, S, Mean, Rstd, stride_row, N, eps,
                   HAS_RES: tl.constexpr, STORE_SUM: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   BLOCK_N: tl.constexpr, SINGLE_TILE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_row
    R += row * stride_row
    Y += row * stride_row
    S += row * stride_row
    if SINGLE_TILE:
        offs = tl.arange(0, BLOCK_N)
        mask = offs < N
        s = _load_row_sum(X, R, offs, mask, HAS_RES)
        if STORE_SUM:
            tl.store(S + offs, s.to(S.dtype.element_ty), mask=mask)
        mean = tl.sum(s, axis=0) / N
        d = tl.where(mask, s - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / N + eps)
        y = d * rstd
        if HAS_W:
            y = y * tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            mask = offs < N
            s = _load_row_sum(X, R, offs, mask, HAS_RES)
            if STORE_SUM:
                tl.store(S + offs, s.to(S.dtype.element_ty), mask=mask)
            acc += s
        mean = tl.sum(acc, axis=0) / N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            mask = offs < N
            d = tl.where(mask, _load_row_sum(X, R, offs, mask, HAS_RES) - mean, 0.0)
            acc += d * d
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
        for start in range(0, N, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            mask = offs < N
            y = (_load_row_sum(X, R, offs, mask, HAS_RES) - mean) * rstd
            if HAS_W:
                y = y * tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_B:
                y = y + tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _ln_bwd_row_terms(DY, X, W, offs, mask, mean, rstd, HAS_W: tl.constexpr):
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    g = dy
    if HAS_W:
        g = dy * tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    return dy, xhat, g


@triton.jit
def _ln_bwd_kernel(DY, DS, X, W, Mean, Rstd, DX, DWp, DBp, stride_row, N, rows, rows_per_prog,
                   HAS_DS: tl.constexpr, HAS_W: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
                   BLOCK_N: tl.constexpr, SINGLE_TILE: tl.constexpr):
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_prog
    num_rows = tl.minimum(rows_per_prog, rows - row_start)
    DWp += pid.to(tl.int64) * N
    DBp += pid.to(tl.int64) * N
    if SINGLE_TILE:
        offs = tl.arange(0, BLOCK_N)
        mask = offs < N
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for i in range(0, num_rows):
            row = row_start + i
            base = row * stride_row
            mean = tl.load(Mean + row)
            rstd = tl.load(Rstd + row)
            dy, xhat, g = _ln_bwd_row_terms(DY + base, X + base, W, offs, mask, mean, rstd, HAS_W)
            c1 = tl.sum(g * xhat, axis=0) / N
            c2 = tl.sum(g, axis=0) / N
            dx = (g - (xhat * c1 + c2)) * rstd
            if HAS_DS:
                dx += tl.load(DS + base + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + base + offs, dx.to(DX.dtype.element_ty), mask=mask)
            dw_acc += dy * xhat
            db_acc += dy
        if COMPUTE_DW:
            tl.store(DWp + offs, dw_acc, mask=mask)
        if COMPUTE_DB:
            tl.store(DBp + offs, db_acc, mask=mask)
    else:
        for i in range(0, num_rows):
            row = row_start + i
            base = row * stride_row
            mean = tl.load(Mean + row)
            rstd = tl.load(Rstd + row)
            acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                offs = start + tl.arange(0, BLOCK_N)
                mask = offs < N
                dy, xhat, g = _ln_bwd_row_terms(DY + base, X + base, W, offs, mask, mean, rstd, HAS_W)
                acc1 += g * xhat
                acc2 += g
            c1 = tl.sum(acc1, axis=0) / N
            c2 = tl.sum(acc2, axis=0) / N
            for start in range(0, N, BLOCK_N):
                offs = start + tl.arange(0, BLOCK_N)
                mask = offs < N
                dy, xhat, g = _ln_bwd_row_terms(DY + base, X + base, W, offs, mask, mean, rstd, HAS_W)
                dx = (g - (xhat * c1 + c2)) * rstd
                if HAS_DS:
                    dx += tl.load(DS + base + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + base + offs, dx.to(DX.dtype.element_ty), mask=mask)
                # this program's own partial row: read-modify-write without races
                if COMPUTE_DW:
                    tl.store(DWp + offs, tl.load(DWp + offs, mask=mask, other=0.0) + dy * xhat, mask=mask)
                if COMPUTE_DB:
                    tl.store(DBp + offs, tl.load(DBp + offs, mask=mask, other=0.0) + dy, mask=mask)


@triton.jit
def _column_sum_kernel(P, OUT, num_partials, N, BLOCK_N: tl.constexpr):
    """OUT[c] = sum_p P[p, c], adding the partial rows in order."""
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    ptrs = P + offs
    for _ in range(0, num_partials):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += N
    tl.store(OUT + offs, acc, mask=mask)


# ----------------------------------------------------------------------------- launch heuristics


def row_config(n: int, direction: str) -> tuple[int, bool, int]:
    """(BLOCK_N, SINGLE_TILE, num_warps) for rows of n elements; direction 'fwd' or 'bwd'."""
    block = triton.next_power_of_2(n)
    if block <= MAX_TILE[direction]:
        return block, True, max(1, min(16, block // 256))
    return CHUNK, False, 16  # 8 warps: the bwd chunk loop keeps a stack frame with triton 3.6 on sm_80


COLUMN_SUM_BLOCK = 1024


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def bwd_programs(rows: int, device: torch.device) -> int:
    """How many programs (= partial dW/dB rows) the backward kernel runs."""
    if device.type != "cuda":
        target = 4
    else:
        target = 4 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(rows, target))


def layer_norm_fwd(x, residual, weight, bias, eps: float, store_sum: bool):
    """x, residual (rows, N) contiguous; weight, bias (N,) -> y, sum (or empty), mean, rstd."""
    rows, n = x.shape
    y = _alloc.empty((rows, n), x.dtype, x.device)
    has_res = residual is not None
    store = bool(store_sum and has_res)
    s = _alloc.empty((rows, n), x.dtype, x.device) if store else x.new_empty(0)
    mean = _alloc.empty((rows,), torch.float32, x.device)
    rstd = _alloc.empty((rows,), torch.float32, x.device)
    if rows == 0:
        return y, s, mean, rstd
    block, single, warps = row_config(n, "fwd")
    # a disabled optional input gets x as its (never read) pointer
    _ln_fwd_kernel[(rows,)](
        x, residual if has_res else x, weight if weight is not None else x,
        bias if bias is not None else x, y, s if store else y, mean, rstd, n, n, float(eps),
        HAS_RES=has_res, STORE_SUM=store, HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_N=block, SINGLE_TILE=single, num_warps=warps)
    return y, s, mean, rstd


def layer_norm_bwd(dy, dsum, x, weight, mean, rstd, weight_grad: bool, bias_grad: bool):
    """-> dx (rows, N) in x's dtype, float32 dweight and dbias (N,) (empty when not asked for)."""
    rows, n = x.shape
    dev = x.device
    dx = _alloc.empty((rows, n), x.dtype, dev)
    dw = _alloc.empty((n,), torch.float32, dev) if weight_grad else x.new_empty(0, dtype=torch.float32)
    db = _alloc.empty((n,), torch.float32, dev) if bias_grad else x.new_empty(0, dtype=torch.float32)
    if rows == 0:
        dw.zero_()
        db.zero_()
        return dx, dw, db
    programs = bwd_programs(rows, dev)
    rows_per_prog = triton.cdiv(rows, programs)
    programs = triton.cdiv(rows, rows_per_prog)
    block, single, warps = row_config(n, "bwd")
    # the looped variant accumulates into its partial rows in place, so they start at 0
    alloc_partial = (lambda: torch.zeros((programs, n), dtype=torch.float32, device=dev)) if not single else \
        (lambda: _alloc.empty((programs, n), torch.float32, dev))
    dwp = alloc_partial() if weight_grad else dx
    dbp = alloc_partial() if bias_grad else dx
    _ln_bwd_kernel[(programs,)](
        dy, dsum if dsum is not None else dy, x, weight if weight is not None else x, mean, rstd,
        dx, dwp, dbp, n, n, rows, rows_per_prog,
        HAS_DS=dsum is not None, HAS_W=weight is not None, COMPUTE_DW=weight_grad, COMPUTE_DB=bias_grad,
        BLOCK_N=block, SINGLE_TILE=single, num_warps=warps)
    for partial, out in ((dwp, dw), (dbp, db)):
        if out.numel():
            _column_sum_kernel[(triton.cdiv(n, COLUMN_SUM_BLOCK),)](partial, out, programs, n,
                                                                     BLOCK_N=COLUMN_SUM_BLOCK, num_warps=4)
    return dx, dw, db


# ----------------------------------------------------------------------------- GPU compile gate


def gate_configs():
    """Every kernel configuration the launchers above can choose, for the compile gate."""
    from ..tools.gate import TritonConfig

    out = []
    for dtype in ("fp32", "fp16", "bf16"):
        for block, single, warps in sorted({row_config(1 << k, "fwd") for k in range(0, 17)}):
            label = f"layer_norm dtype={dtype} BLOCK_N={block} single_tile={single} warps={warps}"
            out.append(TritonConfig(
                f"{label} fwd", _ln_fwd_kernel,
                {"X": f"*{dtype}", "R": f"*{dtype}", "W": "*fp32", "B": "*fp32", "Y": f"*{dtype}", "S": f"*{dtype}",
                 "Mean": "*fp32", "Rstd": "*fp32", "stride_row": "i32", "N": "i32", "eps": "fp32"},
                {"HAS_RES": True, "STORE_SUM": True, "HAS_W": True, "HAS_B": True, "BLOCK_N": block,
                 "SINGLE_TILE": single}, warps, 1))
        for block, single, warps in sorted({row_config(1 << k, "bwd") for k in range(0, 17)}):
            label = f"layer_norm dtype={dtype} BLOCK_N={block} single_tile={single} warps={warps}"
            out.append(TritonConfig(
                f"{label} bwd", _ln_bwd_kernel,
                {"DY": f"*{dtype}", "DS": f"*{dtype}", "X": f"*{dtype}", "W": "*fp32", "Mean": "*fp32",
                 "Rstd": "*fp32", "DX": f"*{dtype}", "DWp": "*fp32", "DBp": "*fp32", "stride_row": "i32",
                 "N": "i32", "rows": "i32", "rows_per_prog": "i32"},
                {"HAS_DS": True, "HAS_W": True, "COMPUTE_DW": True, "COMPUTE_DB": True, "BLOCK_N": block,
                 "SINGLE_TILE": single}, warps, 1))
    out.append(TritonConfig("layer_norm column_sum", _column_sum_kernel,
                            {"P": "*fp32", "OUT": "*fp32", "num_partials": "i32", "N": "i32"},
                            {"BLOCK_N": COLUMN_SUM_BLOCK}, 4, 1))
    return out
