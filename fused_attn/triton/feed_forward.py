"""The feed-forward block act(x W1^T + b1) W2^T + b2 (+ residual) in Triton: one tiled
matmul kernel (grouped tile order for L2 reuse) whose epilogue does the element-wise
work while the tile is still in registers, and the launchers of forward and backward.

Epilogues:
  HIDDEN   h = acc + b1; stores h (the pre-activation, for backward) and
           a = dropout(act(h)), the second GEMM's input
  OUT      acc + b2 (+ residual)
  DGRAD    dA (= dOut W2) times dropout's keep-mask and act'(h): stores dh directly,
           so backward never materialises dA
  PLAIN    acc (weight gradients); with ROWSUM the programs of the first column also sum
           the rows of A over the K loop they already walk: db = colsum(dOut) or colsum(dh)
           comes out of the dW GEMM without another pass over memory.

The pre-activation is what is stored for backward: every activation's derivative is a
function of it, and the activation itself is cheap to recompute; storing only the
activation would lose gelu/silu's derivative.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _alloc, codes
from ..dispatch import triton_interpreting
from ._common import dot, dropout_args, dropout_keep, tuning_candidates
from ._common import tanh as _tanh

ACTIVATIONS = codes.names(codes.Activation)
# constexpr globals (the only globals a kernel may read); in expressions the tensor goes
# first: under the interpreter `constexpr * tensor` stays a constexpr
RELU = tl.constexpr(int(codes.Activation.RELU))
GELU = tl.constexpr(int(codes.Activation.GELU))
GELU_TANH = tl.constexpr(int(codes.Activation.GELU_TANH))
SQRT_HALF = tl.constexpr(codes.SQRT_HALF)
INV_SQRT_2PI = tl.constexpr(codes.INV_SQRT_2PI)
SQRT_2_OVER_PI = tl.constexpr(codes.SQRT_2_OVER_PI)
GELU_TANH_CUBIC = tl.constexpr(codes.GELU_TANH_CUBIC)
PLAIN, HIDDEN, OUT, DGRAD = 0, 1, 2, 3


@triton.jit
def _act(h, ACT: tl.constexpr):
    if ACT == RELU:
        return tl.maximum(h, 0.0)
    elif ACT == GELU:
        return 0.5 * h * (1.0 + tl.math.erf(h * SQRT_HALF))
    elif ACT == GELU_TANH:
        return 0.5 * h * (1.0 + _tanh((h + h * h * h * GELU_TANH_CUBIC) * SQRT_2_OVER_PI))
    else:
        return h * tl.sigmoid(h)


@triton.jit
def _act_grad(h, ACT: tl.constexpr):
    """d act(h) / dh."""
    if ACT == RELU:
        return tl.where(h > 0.0, 1.0, 0.0)
    elif ACT == GELU:
        return 0.5 * (1.0 + tl.math.erf(h * SQRT_HALF)) + h * tl.exp(-0.5 * h * h) * INV_SQRT_2PI
    elif ACT == GELU_TANH:
        t = _tanh((h + h * h * h * GELU_TANH_CUBIC) * SQRT_2_OVER_PI)
        du = (1.0 + h * h * (3.0 * GELU_TANH_CUBIC)) * SQRT_2_OVER_PI
        return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * du
    else:
        s = tl.sigmoid(h)
        return s * (1.0 + h * (1.0 - s))


@triton.jit
def _feed_forward_matmul_kernel(
        A, B, C, Bias, Pre, Res, RowSum,
        M, N, K,
        stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
        stride_pm, stride_pn, stride_rm, stride_rn,
        seed, threshold, dropout_scale,
        EPILOGUE: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
        STORE_PRE: tl.constexpr, DROPOUT: tl.constexpr, ROWSUM: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C (M, N) = A (M, K) @ B (K, N) (any strides), then the epilogue."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M row-tiles share each column of B while it is in L2
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_k[:, None] * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # bias gradients sum every row (M up to millions): block sums in float32, their running
    # total in float64, as accurate as torch's cascade sum
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float64)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=(offs_m < M)[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n < N)[None, :], other=0.0)
        acc += dot(a, b, IEEE)
        if ROWSUM:
            row_sum += tl.sum(a.to(tl.float32), 1).to(tl.float64)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if ROWSUM:
        if pid_n == 0:
            tl.store(RowSum + offs_m, row_sum.to(tl.float32), mask=offs_m < M)

    tile_ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    rows64 = offs_m[:, None].to(tl.int64)
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == 1:  # HIDDEN
        if STORE_PRE:
            tl.store(Pre + rows64 * stride_pm + offs_n[None, :] * stride_pn, acc.to(Pre.dtype.element_ty),
                     mask=tile_ok)
        acc = _act(acc, ACT)
        if DROPOUT:
            keep = dropout_keep(seed, 0, offs_m[:, None], offs_n[None, :], N, threshold)
            acc = tl.where(keep, acc * dropout_scale, 0.0)
    if EPILOGUE == 2:  # OUT
        if HAS_RES:
            acc += tl.load(Res + rows64 * stride_rm + offs_n[None, :] * stride_rn, mask=tile_ok,
                           other=0.0).to(tl.float32)
    if EPILOGUE == 3:  # DGRAD
        if DROPOUT:
            keep = dropout_keep(seed, 0, offs_m[:, None], offs_n[None, :], N, threshold)
            acc = tl.where(keep, acc * dropout_scale, 0.0)
        h = tl.load(Pre + rows64 * stride_pm + offs_n[None, :] * stride_pn, mask=tile_ok, other=0.0)
        acc = acc * _act_grad(h.to(tl.float32), ACT)
    tl.store(C + rows64 * stride_cm + offs_n[None, :] * stride_cn, acc.to(C.dtype.element_ty), mask=tile_ok)


# ----------------------------------------------------------------------------- configurations

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) candidates for triton.autotune on a
# GPU (keyed on the M bucket, N, K, epilogue and dropout), per dtype class and per call the
# launchers make. Each compiles for sm_80 and sm_90 without a register spill in the call's
# heaviest form (the compile gate checks all): found by compiling candidates from large
# to small tiles and keeping the first two that pass (float32 keeps one).
CONFIGS = {
    "16bit": {
        "hidden": [(64, 128, 64, 8, 3), (64, 64, 32, 4, 4)],
        "hidden_dropout": [(32, 64, 32, 4, 3), (32, 32, 32, 4, 2)],
        "out": [(64, 128, 64, 8, 3), (64, 64, 32, 4, 4)],
        "dgrad": [(128, 64, 64, 8, 3), (64, 128, 64, 8, 3)],
        "dgrad_dropout": [(128, 64, 64, 8, 3), (64, 128, 64, 8, 3)],
        "wgrad": [(128, 128, 32, 8, 4), (128, 64, 64, 8, 3)],
        "dx": [(128, 128, 32, 8, 4), (128, 64, 64, 8, 3)],
    },
    "fp32": {
        "hidden": [(64, 64, 32, 8, 3)],
        "hidden_dropout": [(64, 64, 32, 8, 3)],
        "out": [(64, 64, 32, 8, 3)],
        "dgrad": [(64, 64, 32, 8, 3)],
        "dgrad_dropout": [(64, 64, 16, 4, 3)],
        "wgrad": [(64, 64, 32, 8, 3)],
        "dx": [(64, 64, 16, 4, 3)],
    },
}
GROUP_M = 8
_INTERPRETER_CONFIG = (32, 32, 32, 4, 1)
_autotuned: dict = {}


def call_configs(call: str, dclass: str):
    return CONFIGS[dclass][call]


def _call_name(epilogue: int, dropout: bool, row_sum: bool) -> str:
    if epilogue == HIDDEN:
        return "hidden_dropout" if dropout else "hidden"
    if epilogue == OUT:
        return "out"
    if epilogue == DGRAD:
        return "dgrad_dropout" if dropout else "dgrad"
    return "wgrad" if row_sum else "dx"


def _dtype_class(dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def _matmul(a, b, c, *, epilogue=PLAIN, act=0, bias=None, pre=None, res=None, row_sum=None, dropout_p=0.0,
            seed=0, store_pre=False):
    """c (M, N) = a (M, K) @ b (K, N) with the epilogue; every operand by strides."""
    M, K = a.shape
    N = b.shape[1]
    threshold, dscale = dropout_args(dropout_p)
    zero = (0, 0)
    args = (a, b, c, bias if bias is not None else c, pre if pre is not None else c, res if res is not None else c,
            row_sum if row_sum is not None else c, M, N, K, *a.stride(), *b.stride(), *c.stride(),
            *(pre.stride() if pre is not None else zero), *(res.stride() if res is not None else zero),
            seed, threshold, dscale)
    const = dict(EPILOGUE=epilogue, ACT=act, HAS_BIAS=bias is not None, HAS_RES=res is not None,
                 STORE_PRE=store_pre, DROPOUT=dropout_p > 0, ROWSUM=row_sum is not None,
                 IEEE=a.dtype == torch.float32)
    if triton_interpreting():
        bm, bn, bk, warps, stages = _INTERPRETER_CONFIG
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
        _feed_forward_matmul_kernel[grid](*args, **const, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M,
                                 num_warps=warps, num_stages=stages)
        return c
    key = (_call_name(epilogue, dropout_p > 0, row_sum is not None), _dtype_class(a.dtype))
    if key not in _autotuned:
        cfgs = tuning_candidates([triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": GROUP_M},
                                                num_warps=w, num_stages=s) for bm, bn, bk, w, s in call_configs(*key)])
        _autotuned[key] = triton.autotune(cfgs, key=["M_BUCKET", "N", "K", "EPILOGUE", "DROPOUT"])(
            _autotune_entry)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _autotuned[key][grid](*args, _bucket(M), **const)
    return c


@triton.jit
def _autotune_entry(A, B, C, Bias, Pre, Res, RowSum, M, N, K,
                    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                    stride_pm, stride_pn, stride_rm, stride_rn, seed, threshold, dropout_scale, M_BUCKET,
                    EPILOGUE: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                    STORE_PRE: tl.constexpr, DROPOUT: tl.constexpr, ROWSUM: tl.constexpr, IEEE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """The matmul with an M bucket argument for the autotuner's key (token counts vary)."""
    _feed_forward_matmul_kernel(A, B, C, Bias, Pre, Res, RowSum, M, N, K,
                       stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                       stride_pm, stride_pn, stride_rm, stride_rn, seed, threshold, dropout_scale,
                       EPILOGUE, ACT, HAS_BIAS, HAS_RES, STORE_PRE, DROPOUT, ROWSUM, IEEE,
                       BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


# ----------------------------------------------------------------------------- launchers


def feed_forward_fwd(x, w1, b1, w2, b2, residual, activation: int, dropout_p: float, seed: int, save_pre: bool):
    """x (M, d_model), w1 (d_ff, d_model), w2 (d_model, d_ff) -> out (M, d_model), hidden
    (M, d_ff) = dropout(act(pre)), pre (M, d_ff) (empty unless save_pre)."""
    M = x.shape[0]
    d_ff, d_model = w1.shape
    hidden = _alloc.empty((M, d_ff), x.dtype, x.device)
    pre = _alloc.empty((M, d_ff), x.dtype, x.device) if save_pre else x.new_empty(0)
    out = _alloc.empty((M, d_model), x.dtype, x.device)
    if M == 0:
        return out, hidden, pre
    _matmul(x, w1.t(), hidden, epilogue=HIDDEN, act=activation, bias=b1, pre=pre if save_pre else None,
            dropout_p=dropout_p, seed=seed, store_pre=save_pre)
    _matmul(hidden, w2.t(), out, epilogue=OUT, bias=b2, res=residual)
    return out, hidden, pre


def feed_forward_bwd(dout, x, w1, w2, pre, hidden, activation: int, dropout_p: float, seed: int, need_b1: bool,
            need_b2: bool):
    """-> dx, dw1, db1 (or empty), dw2, db2 (or empty); bias gradients in float32."""
    M = x.shape[0]
    d_ff, d_model = w1.shape
    dev = x.device
    dh = _alloc.empty((M, d_ff), x.dtype, dev)
    dx = _alloc.empty((M, d_model), x.dtype, dev)
    dw1 = _alloc.empty((d_ff, d_model), w1.dtype, dev)
    dw2 = _alloc.empty((d_model, d_ff), w2.dtype, dev)
    db1 = _alloc.empty((d_ff,), torch.float32, dev) if need_b1 else x.new_empty(0, dtype=torch.float32)
    db2 = _alloc.empty((d_model,), torch.float32, dev) if need_b2 else x.new_empty(0, dtype=torch.float32)
    if M == 0:
        for t in (dw1, dw2, db1, db2):
            t.zero_()
        return dx, dw1, db1, dw2, db2
    # dh = (dOut @ W2) * keep * act'(pre): the activation derivative in the dgrad epilogue
    _matmul(dout, w2, dh, epilogue=DGRAD, act=activation, pre=pre, dropout_p=dropout_p, seed=seed)
    # dW2 = dOut^T @ hidden, db2 = colsum(dOut) in the same K loop
    _matmul(dout.t(), hidden, dw2, row_sum=db2 if need_b2 else None)
    # dW1 = dh^T @ x, db1 = colsum(dh)
    _matmul(dh.t(), x, dw1, row_sum=db1 if need_b1 else None)
    _matmul(dh, w1, dx)
    return dx, dw1, db1, dw2, db2


def dropout_keep_mask(seed: int, rows: int, cols: int, dropout_p: float, device) -> torch.Tensor:
    """The (rows, cols) keep-mask the hidden activation's dropout applies (tests)."""
    from .attention import dropout_keep_mask as attention_mask

    return attention_mask(seed, 1, 1, rows, cols, dropout_p, device)[0, 0]


# ----------------------------------------------------------------------------- GPU compile gate


# The launchers' calls: their epilogue (heaviest form) and the arguments that are 1 there.
_UNIT_C = {"stride_cn": 1, "stride_pn": 1, "stride_rn": 1}
GATE_CALLS = {
    "hidden": (dict(EPILOGUE=HIDDEN, ACT=1, HAS_BIAS=True, HAS_RES=False, STORE_PRE=True, DROPOUT=False,
                    ROWSUM=False), ("stride_ak", "stride_bk")),
    "hidden_dropout": (dict(EPILOGUE=HIDDEN, ACT=1, HAS_BIAS=True, HAS_RES=False, STORE_PRE=True, DROPOUT=True,
                            ROWSUM=False), ("stride_ak", "stride_bk")),
    "out": (dict(EPILOGUE=OUT, ACT=0, HAS_BIAS=True, HAS_RES=True, STORE_PRE=False, DROPOUT=False, ROWSUM=False),
            ("stride_ak", "stride_bk")),
    "dgrad": (dict(EPILOGUE=DGRAD, ACT=1, HAS_BIAS=False, HAS_RES=False, STORE_PRE=False, DROPOUT=False,
                   ROWSUM=False), ("stride_ak", "stride_bn")),
    "dgrad_dropout": (dict(EPILOGUE=DGRAD, ACT=1, HAS_BIAS=False, HAS_RES=False, STORE_PRE=False, DROPOUT=True,
                           ROWSUM=False), ("stride_ak", "stride_bn")),
    "wgrad": (dict(EPILOGUE=PLAIN, ACT=0, HAS_BIAS=False, HAS_RES=False, STORE_PRE=False, DROPOUT=False,
                   ROWSUM=True), ("stride_am", "stride_bn")),
    "dx": (dict(EPILOGUE=PLAIN, ACT=0, HAS_BIAS=False, HAS_RES=False, STORE_PRE=False, DROPOUT=False,
                ROWSUM=False), ("stride_ak", "stride_bn")),
}


def _gate_config(call: str, dtype_name: str, cfg):
    from ..tools.gate import TritonConfig

    bm, bn, bk, warps, stages = cfg
    ep, units = GATE_CALLS[call]
    const = dict(ep, IEEE=dtype_name == "fp32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M, **_UNIT_C,
                 **{u: 1 for u in units})
    sig = {a: f"*{dtype_name}" for a in ("A", "B", "C", "Bias", "Pre", "Res")}
    sig["RowSum"] = "*fp32"
    sig.update({a: "i32" for a in _feed_forward_matmul_kernel.arg_names if a.startswith("stride") and a not in const})
    sig.update({"M": "i32", "N": "i32", "K": "i32", "seed": "i64", "threshold": "i32", "dropout_scale": "fp32"})
    return TritonConfig(f"feed_forward matmul {dtype_name} {call} BLOCK={bm}x{bn}x{bk} warps={warps} stages={stages}",
                        _feed_forward_matmul_kernel, sig, const, warps, stages)


def gate_configs():
    """Every block configuration the autotuner can choose for each call the launchers make,
    per dtype, in the call's heaviest epilogue (bias, gelu, stored pre-activation, dropout,
    residual, row sums) and with the unit strides those calls have (Triton specialises
    arguments equal to 1; the launchers pass contiguous tensors and transposed views)."""
    out = []
    for dtype_name in ("fp16", "bf16", "fp32"):
        for call in GATE_CALLS:
            for cfg in call_configs(call, "fp32" if dtype_name == "fp32" else "16bit"):
                out.append(_gate_config(call, dtype_name, cfg))
    return out
