"""The correctness sweep behind `fused-attn check`: every usable backend x op x dtype x
case against the float64 reference by the 2x rule (fused_attn.testing), forward and
backward, on this device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch

import fused_attn

from .. import testing


@dataclass
class Case:
    op: str
    label: str
    inputs: dict
    grad_names: list
    run: Callable[[str], Callable]  # backend -> fn(**inputs)
    reference: Callable
    declined: Callable[[str, torch.device], list]  # (backend, device) -> why it cannot run the case ([]: it can)


@dataclass
class CheckRow:
    op: str
    backend: str
    dtype: str
    case: str
    tensor: str
    error: float
    allowed: float
    ok: bool


def _layer_norm_cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    shapes = [(3, 17), (7, 97), (4, 1000)] if quick else [(1, 1), (3, 17), (7, 97), (2, 3, 129), (4, 1000),
                                                           (2, 4097), (1, 65536)]
    out = []
    for i, shape in enumerate(shapes):
        for residual in (False, True):
            g = torch.Generator().manual_seed(100 + i)
            n = shape[-1]
            mk = lambda *s: torch.randn(*s, generator=g).to(dtype).to(device)  # noqa: E731
            inputs = dict(input=mk(*shape) * 2 + 0.5, normalized_shape=(n,), weight=mk(n) + 1, bias=mk(n), eps=1e-5,
                          residual=mk(*shape) if residual else None, return_residual=residual)
            grads = ["input", "weight", "bias"] + (["residual"] if residual else [])
            label = "x".join(map(str, shape)) + (" +residual" if residual else "")
            out.append(Case("layer_norm", label, inputs, grads,
                            lambda backend: (lambda **kw: fused_attn.layer_norm(**kw, backend=backend)),
                            fused_attn.reference.layer_norm,
                            _op_reasons("layer_norm", input=inputs["input"], weight=inputs["weight"],
                                        bias=inputs["bias"], residual=inputs["residual"])))
    return out


def _attention_cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    from torch.nn.attention.bias import causal_lower_right


    shapes = [(2, 3, 17, 17, 40), (1, 2, 1, 37, 64)] if quick else [
        (1, 1, 1, 1, 16), (2, 3, 17, 17, 40), (2, 4, 97, 97, 64), (1, 2, 129, 129, 80), (1, 2, 1, 239, 64),
        (2, 2, 113, 203, 40)]
    masks = ["none", "causal", "lower_right", "keypad", "float"] if not quick else ["none", "causal", "keypad"]
    out = []
    for i, (B, H, Lq, Lk, D) in enumerate(shapes):
        for mask_kind in masks:
            g = torch.Generator().manual_seed(200 + i)
            mk = lambda *s: torch.randn(*s, generator=g).to(dtype).to(device)  # noqa: E731
            q, k, v = mk(B, H, Lq, D), mk(B, H, Lk, D), mk(B, H, Lk, D)
            mask, is_causal = None, mask_kind == "causal"
            if mask_kind == "lower_right":
                mask = causal_lower_right(Lq, Lk)
            elif mask_kind == "keypad":
                mask = (torch.rand(B, 1, 1, Lk, generator=g) > 0.25).to(device)
            elif mask_kind == "float":
                mask = mk(Lq, Lk)
            inputs = dict(query=q, key=k, value=v, attn_mask=mask, is_causal=is_causal)
            out.append(Case("attention", f"{B}x{H}x{Lq}x{Lk}x{D} {mask_kind}", inputs, ["query", "key", "value"],
                            lambda backend: (lambda **kw: fused_attn.scaled_dot_product_attention(**kw,
                                                                                                   backend=backend)),
                            fused_attn.reference.scaled_dot_product_attention,
                            lambda backend, _device, a=inputs: _op_module("attention").reasons(backend, **a)))
    return out


def _feed_forward_cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    sizes = [(7, 64, 256)] if quick else [(1, 40, 96), (7, 64, 256), (129, 200, 1000)]
    activations = ["gelu", "silu"] if quick else ["relu", "gelu", "gelu_tanh", "silu"]
    out = []
    for i, (tokens, d_model, d_ff) in enumerate(sizes):
        for activation in activations:
            g = torch.Generator().manual_seed(300 + i)
            mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype).to(device)  # noqa: E731
            inputs = dict(input=mk(tokens, d_model), w1=mk(d_ff, d_model, scale=d_model ** -0.5), b1=mk(d_ff),
                          w2=mk(d_model, d_ff, scale=d_ff ** -0.5), b2=mk(d_model), residual=mk(tokens, d_model))
            out.append(Case("feed_forward", f"{tokens}x{d_model}x{d_ff} {activation}", inputs,
                            ["input", "w1", "b1", "w2", "b2", "residual"],
                            lambda backend, a=activation: (
                                lambda **kw: fused_attn.feed_forward(**kw, activation=a, backend=backend)),
                            lambda a=activation, **kw: fused_attn.reference.feed_forward(**kw, activation=a),
                            _op_reasons("feed_forward", input=inputs["input"], w1=inputs["w1"], dropout_p=0.0)))
    return out


CASE_BUILDERS: dict[str, Callable[[torch.device, torch.dtype, bool], list[Case]]] = {
    "layer_norm": _layer_norm_cases,
    "attention": _attention_cases,
    "feed_forward": _feed_forward_cases,
}
OP_MODULES = {"layer_norm": "layer_norm", "attention": "attention", "feed_forward": "feed_forward"}
# name ("module:function") -> an attention callable with F.scaled_dot_product_attention's
# signature, checked like a backend (fused-attn check --backend module:function)
CUSTOM_BACKENDS: dict[str, Callable] = {}


def _op_module(name: str):
    import importlib

    return importlib.import_module(f"fused_attn.ops.{OP_MODULES[name]}")


def _op(name: str):
    return _op_module(name).OP


def _op_reasons(name: str, **probe) -> Callable[[str, torch.device], list]:
    """(backend, device) -> why dispatch's backend cannot run an op on kernel inputs like probe."""
    return lambda backend, device: _op(name).reasons(backend, device, **probe)


def default_dtypes(device: torch.device) -> list[torch.dtype]:
    return [torch.float32, torch.float16, torch.bfloat16]


def run(device: torch.device, *, ops: Optional[Sequence[str]] = None, backends: Optional[Sequence[str]] = None,
        dtypes: Optional[Sequence[torch.dtype]] = None, quick: bool = False,
        progress: Optional[Callable[[int, int, str], None]] = None) -> list[CheckRow]:
    """Check every (op, backend, dtype, case) that can run here; one row per checked tensor."""
    ops = list(ops or CASE_BUILDERS)
    dtypes = list(dtypes or default_dtypes(device))
    names = list(backends or [b for b in fused_attn.BACKENDS if b != "reference"])
    work = []
    for op_name in ops:
        for dtype in dtypes:
            for case in CASE_BUILDERS[op_name](device, dtype, quick):
                for backend in names:
                    if backend in CUSTOM_BACKENDS or not case.declined(backend, device):
                        work.append((op_name, backend, dtype, case))
    rows: list[CheckRow] = []
    for i, (op_name, backend, dtype, case) in enumerate(work):
        if progress:
            progress(i, len(work), f"{op_name} {backend} {str(dtype).replace('torch.', '')} {case.label}")
        dt = str(dtype).replace("torch.", "")
        try:
            fn = (lambda f=CUSTOM_BACKENDS[backend]: lambda **kw: f(**kw))() if backend in CUSTOM_BACKENDS \
                else case.run(backend)
            with testing.poisoned_outputs():
                comps = testing.compare(fn, case.reference, case.inputs, grad_names=case.grad_names)
        except Exception as e:  # a crash is a failure of that case, reported, not fatal to the sweep
            rows.append(CheckRow(op_name, backend, dt, case.label, f"error: {type(e).__name__}: {e}", float("inf"),
                                 0.0, False))
            continue
        rows.extend(CheckRow(op_name, backend, dt, case.label, c.name, c.error, c.allowed, c.ok) for c in comps)
    if progress:
        progress(len(work), len(work), "done")
    return rows


def summarize(rows: Iterable[CheckRow]) -> list[dict]:
    """One line per (op, backend, dtype): cases, tensors checked, worst error/allowed ratio, failures."""
    groups: dict = {}
    for r in rows:
        g = groups.setdefault((r.op, r.backend, r.dtype), {"cases": set(), "checked": 0, "failed": 0, "worst": 0.0,
                                                           "worst_case": "", "error": 0.0, "allowed": 0.0})
        g["cases"].add(r.case)
        g["checked"] += 1
        g["failed"] += 0 if r.ok else 1
        ratio = r.error / r.allowed if r.allowed > 0 else (0.0 if r.error == 0 else float("inf"))
        if ratio >= g["worst"]:
            g["worst"], g["worst_case"], g["error"], g["allowed"] = ratio, f"{r.case} {r.tensor}", r.error, r.allowed
    return [dict(op=k[0], backend=k[1], dtype=k[2], cases=len(v["cases"]), checked=v["checked"], failed=v["failed"],
                 worst_ratio=v["worst"], worst=v["worst_case"], worst_error=v["error"], worst_allowed=v["allowed"])
            for k, v in sorted(groups.items())]
