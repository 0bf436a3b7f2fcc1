"""Context parallelism (fused_attn.distributed) on the CPU with gloo: ring attention with 2 and
3 processes against the float64 reference by the 2x rule, forward and every gradient, causal
(zigzag) and not, lengths that do not divide evenly, key padding, GQA, float32, bfloat16 and
float64; merge_attention; the errors; and context-parallel training equal to one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fused_attn
from fused_attn import distributed as cpd
from fused_attn import reference, testing
from fused_attn.tools import train as tr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name, causal, Lq, Lk, heads (q, kv), head dim, dtype, key padding, backend
CASES = [
    dict(name="causal float32, odd length", causal=True, lq=37, lk=37, hq=2, hk=2, d=16, dtype="float32",
         padding=False, backend="cpu"),
    dict(name="causal bfloat16, GQA", causal=True, lq=45, lk=45, hq=4, hk=2, d=32, dtype="bfloat16", padding=False,
         backend="cpu"),
    dict(name="causal float32 with key padding", causal=True, lq=30, lk=30, hq=2, hk=1, d=8, dtype="float32",
         padding=True, backend="cpu"),
    dict(name="full float32, key padding, a fully masked batch row", causal=False, lq=37, lk=37, hq=2, hk=2, d=16,
         dtype="float32", padding=True, backend="cpu"),
    dict(name="full bfloat16", causal=False, lq=30, lk=30, hq=2, hk=2, d=16, dtype="bfloat16", padding=False,
         backend="cpu"),
    dict(name="cross-attention (Lq != Lk) float32", causal=False, lq=29, lk=19, hq=2, hk=2, d=16, dtype="float32",
         padding=True, backend="cpu"),
    dict(name="causal float64", causal=True, lq=26, lk=26, hq=2, hk=2, d=8, dtype="float64", padding=False,
         backend="cpu"),
    dict(name="causal float32, torch backend blocks", causal=True, lq=33, lk=33, hq=2, hk=2, d=16, dtype="float32",
         padding=True, backend="torch"),
]


def _inputs(case: dict, seed: int):
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case["dtype"])
    B = 2
    q = torch.randn(B, case["hq"], case["lq"], case["d"], generator=g).to(dtype)
    k = torch.randn(B, case["hk"], case["lk"], case["d"], generator=g).to(dtype)
    v = torch.randn(B, case["hk"], case["lk"], case["d"], generator=g).to(dtype)
    dout = torch.randn(B, case["hq"], case["lq"], case["d"], generator=g).to(dtype)
    keep = None
    if case["padding"]:
        keep = torch.rand(B, case["lk"], generator=g) > 0.3
        keep[0, 0] = True
        if not case["causal"]:
            keep[1] = False  # every key of batch row 1 masked: its rows give 0 on every rank
    return q, k, v, dout, keep


def _reference(case: dict, q, k, v, dout, keep, cast):
    qq, kk, vv = (t.detach().to(cast).requires_grad_() for t in (q, k, v))
    mask = None if keep is None else keep[:, None, None, :]
    if case["causal"]:
        causal = reference.causal_allowed(case["lq"], case["lk"], "upper_left")
        mask = causal if mask is None else mask & causal
    out = reference.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, enable_gqa=case["hq"] != case["hk"])
    out.backward(dout.to(cast))
    return [out, qq.grad, kk.grad, vv.grad]


def _run_case(case: dict, rank: int, seed: int):
    q, k, v, dout, keep = _inputs(case, seed)
    lq, lk = case["lq"], case["lk"]
    ql, kl, vl = (cpd.zigzag_shard(t, dim=2).requires_grad_() for t in (q, k, v))
    mask = None
    if keep is not None or cpd.padded_length(lk, dist.get_world_size()) != lk and not case["causal"]:
        valid = cpd.zigzag_valid(lk)
        mask = valid if keep is None else cpd.zigzag_shard(keep, dim=1, pad_value=False) & valid
        mask = mask.expand(q.size(0), -1)[:, None, None, :]
    before = fused_attn.dispatch.calls[("scaled_dot_product_attention", case["backend"])]
    with testing.poisoned_outputs():
        out = cpd.ring_attention(ql, kl, vl, is_causal=case["causal"], attn_mask=mask,
                                 enable_gqa=case["hq"] != case["hk"], backend=case["backend"])
        out.backward(cpd.zigzag_shard(dout, dim=2))
    ran = fused_attn.dispatch.calls[("scaled_dot_product_attention", case["backend"])] - before
    ours = [cpd.zigzag_unshard(out.detach(), dim=2, length=lq)] + [
        cpd.zigzag_unshard(t.grad, dim=2, length=n) for t, n in ((ql, lq), (kl, lk), (vl, lk))]
    if rank != 0:
        return None
    low = _reference(case, q, k, v, dout, keep, q.dtype)
    truth = _reference(case, q, k, v, dout, keep, torch.float64)
    grad_scale = float(truth[0].abs().max() * dout.double().abs().max())
    comparisons = [testing.check_2x(name, a, lo, t, scale=None if name == "output" else grad_scale)
                   for name, a, lo, t in zip(("output", "grad q", "grad k", "grad v"), ours, low, truth)]
    return {"case": case["name"], "ok": all(c.ok for c in comparisons), "calls": ran,
            "comparisons": [str(c) for c in comparisons]}


def _worker(rank: int, world: int, init_file: str, out_file: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = [_run_case(case, rank, seed=_seed(case["name"])) for case in CASES]
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def _seed(name: str) -> int:
    import zlib

    return zlib.crc32(name.encode())


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"{w} processes")
def ring_results(request, tmp_path_factory):
    world = request.param
    folder = tmp_path_factory.mktemp(f"ring{world}")
    out_file = str(folder / "results.json")
    env_before = os.environ.pop("TRITON_INTERPRET", None)
    try:
        mp.spawn(_worker, args=(world, str(folder / "init"), out_file), nprocs=world, join=True)
    finally:
        if env_before is not None:
            os.environ["TRITON_INTERPRET"] = env_before
    with open(out_file) as f:
        return {r["case"]: r for r in json.load(f)}


@pytest.mark.parametrize("case", [c["name"] for c in CASES])
def test_ring_attention_matches_the_reference_by_the_2x_rule(ring_results, case):
    result = ring_results[case]
    assert result["ok"], "; ".join(result["comparisons"])
    assert result["calls"] == 1  # the requested backend's blocks ran (one dispatch per ring_attention call)


# ----------------------------------------------------------------------- one process

@pytest.fixture(scope="module")
def single_process_group(tmp_path_factory):
    init = tmp_path_factory.mktemp("pg") / "init"
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ring_attention_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        cpd.ring_attention(q, q, q)


def test_ring_attention_on_one_process_is_attention(single_process_group):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 12, 16, generator=g, requires_grad=True) for _ in range(3))
    out, lse = cpd.ring_attention(q, k, v, is_causal=True, return_lse=True)
    want = fused_attn.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, want)
    scores = (q @ k.transpose(-2, -1)) / 4.0
    scores = scores.masked_fill(~reference.causal_allowed(12, 12, "upper_left"), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1).detach())
    assert lse.dtype == torch.float32 and not lse.requires_grad


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dropout_p=0.1), NotImplementedError, "does not support dropout"),
    (dict(attn_mask=torch.ones(1, 2, 12, 12, dtype=torch.bool)), ValueError,
     r"key-padding masks only.*\(1, 2, 12, 12\)"),
    (dict(attn_mask=torch.ones(12, dtype=torch.int32)), TypeError, "attn_mask must be bool"),
    (dict(return_lse=1), TypeError, "return_lse must be a bool"),
])
def test_ring_attention_rejects_what_it_does_not_take(single_process_group, kwargs, error, match):
    q = torch.randn(1, 2, 12, 8)
    with pytest.raises(error, match=match):
        cpd.ring_attention(q, q, q, **kwargs)


def test_causal_ring_attention_needs_zigzag_slices(single_process_group):
    q = torch.randn(1, 2, 11, 8)
    with pytest.raises(ValueError, match="Lq == Lk and even"):
        cpd.ring_attention(q, q, q, is_causal=True)
    with pytest.raises(ValueError, match=r"\(B, H, L, D\)"):
        cpd.ring_attention(q[0], q[0], q[0])


def test_zigzag_shard_and_positions(single_process_group):
    x = torch.arange(5.0)[None, :, None]
    assert cpd.padded_length(5, 1) == 6
    assert cpd.zigzag_shard(x, dim=1, pad_value=-1).flatten().tolist() == [0, 1, 2, 3, 4, -1]
    assert cpd.zigzag_positions(5).tolist() == [0, 1, 2, 3, 4, 5]
    assert cpd.zigzag_valid(5).tolist() == [True] * 5 + [False]
    assert torch.equal(cpd.zigzag_unshard(cpd.zigzag_shard(x, dim=1), dim=1, length=5), x)


# ----------------------------------------------------------------------- merge_attention

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_attention_of_disjoint_key_sets_is_attention_over_their_union(dtype):
    """Split the keys in three parts (one fully masked for some rows) with the block function
    of the cpu kernels; the merged output, log-sum-exp and gradients obey the 2x rule."""
    from fused_attn.ops import attention as op

    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 2, 9, 16, generator=g).to(dtype) for _ in range(3))
    keep = torch.rand(2, 1, 9, 9, generator=g) > 0.4
    keep[:, :, :4, 6:] = False  # the last part has no key for the first four queries

    def merged(q, k, v):
        outs, lses = [], []
        for cols in (slice(0, 3), slice(3, 6), slice(6, 9)):
            m = keep[..., cols].expand(2, 2, 9, 3)
            out, lse = op.block_forward(q, k[:, :, cols], v[:, :, cols], m, 1, 0, 0.25, "cpu")
            outs.append(out)
            lses.append(lse)
        return fused_attn.merge_attention(outs, lses)

    def whole(q, k, v):
        s = (q @ k.transpose(-2, -1)) * 0.25
        s = s.masked_fill(~keep, float("-inf"))
        return reference.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.25), torch.logsumexp(s, -1)

    out, lse = merged(q, k, v)
    ref_out, ref_lse = whole(q.double(), k.double(), v.double())
    low_out, low_lse = whole(q, k, v)
    testing.assert_2x("output", out, low_out, ref_out)
    testing.assert_2x("lse", lse, low_lse.float(), ref_lse)
    # differentiable in the parts (the block function itself is not: its outputs are leaves here)
    outs = [torch.randn(2, 3, 4, requires_grad=True) for _ in range(2)]
    lses = [torch.tensor([[0.0, 1.0, float("-inf")]] * 2, requires_grad=True),
            torch.tensor([[1.0, 0.0, float("-inf")]] * 2, requires_grad=True)]
    o, l_ = fused_attn.merge_attention(outs, lses)
    assert torch.equal(o[:, 2], torch.zeros(2, 4)) and l_[0, 2] == float("-inf")
    (o.sum() + l_[:, :2].sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in outs + lses)
    # row 0: lses 0 and 1, so outs[0] weighs exp(0) / (exp(0) + exp(1))
    torch.testing.assert_close(outs[0].grad[:, 0], torch.full((2, 4), 1 / (1 + torch.e)))


@pytest.mark.parametrize("outs, lses, error, match", [
    ([], [], TypeError, "outs must be a non-empty list"),
    ([torch.zeros(2, 3)], [torch.zeros(3)], ValueError, r"lses\[0\] must have shape \(2,\)"),
    ([torch.zeros(2, 3), torch.zeros(2, 4)], [torch.zeros(2)] * 2, ValueError, r"outs\[1\] must match"),
    ([torch.zeros(2, 3)], [torch.zeros(2), torch.zeros(2)], ValueError, "one entry per part"),
    ([torch.zeros(2, 3, dtype=torch.int64)], [torch.zeros(2)], TypeError, r"outs\[0\] must be a floating-point"),
])
def test_merge_attention_names_the_bad_argument(outs, lses, error, match):
    with pytest.raises(error, match=match):
        fused_attn.merge_attention(outs, lses)


# ----------------------------------------------------------------------- training

@pytest.mark.slow
def test_context_parallel_training_follows_the_single_process_loss_curve(tmp_path):
    """fused-attn train --context-parallel 2 under torchrun (gloo): the same batches, every
    attention a ring over two processes; the losses equal one process's within float rounding."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    args = ["--steps", "5", "--batch-size", "8", "--d-model", "32", "--d-ff", "64", "--max-len", "9",
            "--dropout", "0", "--backend", "cpu"]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519",
                          "-m", "fused_attn.tools.cli", "train", *args, "--context-parallel", "2", "--out",
                          str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["config"]["context_parallel"] == 2
    single = tr.train(tr.TrainConfig(steps=5, batch_size=8, d_model=32, d_ff=64, max_len=9, dropout=0.0,
                                     backend="cpu"), evaluate=False)
    torch.testing.assert_close(torch.tensor(summary["losses"]), torch.tensor(single["losses"]), rtol=1e-4, atol=1e-5)
    assert summary["losses"][-1] < summary["losses"][0]


def test_context_parallel_training_refuses_dropout_and_a_wrong_process_count():
    with pytest.raises(tr.TrainError, match="needs --dropout 0"):
        tr.TrainConfig(context_parallel=2, dropout=0.1).check()
    with pytest.raises(tr.TrainError, match="needs exactly 2 processes"):
        tr.TrainConfig(context_parallel=2, dropout=0.0).check()
