"""The command line and training: check, bench --compare, train (convergence, checkpoint
resume, DistributedDataParallel), and one-line errors."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from fused_attn.tools import cli
from fused_attn.tools import train as tr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "fused_attn.tools.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def test_check_json_and_exit_code(tmp_path):
    out = tmp_path / "check.json"
    code = cli.main(["check", "--op", "layer_norm", "--backend", "torch", "--dtype", "float32", "--quick",
                     "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())
    assert rows and all(r["ok"] for r in rows) and {r["backend"] for r in rows} == {"torch"}


def test_check_custom_callable_backend_can_fail(tmp_path):
    """A user's kernel is checked like ours: a wrong one fails with exit code 1."""
    mod = tmp_path / "my_kernels.py"
    mod.write_text("import torch.nn.functional as F\n"
                   "def good(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, "
                   "enable_gqa=False):\n"
                   "    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, "
                   "is_causal=is_causal, scale=scale)\n"
                   "def bad(query, key, value, **kw):\n"
                   "    return good(query, key, value, **kw) * 1.001\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("TRITON_INTERPRET", None)
    good = _run("check", "--backend", "my_kernels:good", "--quick", "--dtype", "float32", env=env)
    bad = _run("check", "--backend", "my_kernels:bad", "--quick", "--dtype", "float32", env=env)
    assert "checks pass" in good.stdout
    assert bad.returncode == 1 and "FAIL" in bad.stdout


@pytest.mark.parametrize("argv, words", [
    (["check", "--backend", "fastest"], "--backend 'fastest': expected one of"),
    (["check", "--backend", "no_such_module:fn"], "cannot load it"),
    (["check", "--dtype", "float8"], "--dtype 'float8'"),
    (["bench", "--op", "conv"], "--op 'conv'"),
    (["bench", "--compare", "/no/such.csv", "--op", "layer_norm", "--quick"], "--compare /no/such.csv"),
    (["train", "--task", "translate"], "--task must be one of"),
    (["train", "--d-model", "30", "--heads", "4"], "must be a multiple of --heads"),
    (["train", "--steps", "1", "--out", "/proc/forbidden"], "cannot create output folder"),
])
def test_user_errors_are_one_line(argv, words):
    res = _run(*argv)
    assert res.returncode == 2, res.stdout + res.stderr
    assert words in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_bench_writes_results_and_compares(tmp_path):
    assert cli.main(["bench", "--op", "layer_norm", "--quick", "--out", str(tmp_path)]) == 0
    files = sorted(os.listdir(tmp_path))
    assert any(f.endswith(".csv") for f in files) and any(f.endswith(".png") for f in files)
    old = tmp_path / [f for f in files if f.endswith(".csv")][0]
    with open(old, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and {"ms", "gbps", "ratio_to_torch"} <= set(rows[0])
    res = _run("bench", "--op", "layer_norm", "--quick", "--compare", str(old))
    assert res.returncode == 0 and "speed-up" in res.stdout


def test_the_scripts_and_the_command_run_one_registry(tmp_path):
    """benchmarks/bench_NAME.py runs bench.REGISTRY[NAME], the entry `fused-attn bench --op NAME`
    runs, and both name their results bench.results_name(NAME, device, dtype)."""
    from fused_attn.tools import bench

    scripts = {f[len("bench_"):-len(".py")]: f for f in os.listdir(os.path.join(ROOT, "benchmarks"))
               if f.startswith("bench_") and f.endswith(".py")}
    assert set(bench.REGISTRY) <= set(scripts)
    for name, file in scripts.items():
        with open(os.path.join(ROOT, "benchmarks", file)) as f:
            text = f.read()
        # the multi-process benchmarks keep their own run; every other script is its registry entry
        assert (f'_common.main(__doc__, "{name}")' in text) == (name in bench.REGISTRY), file
    by_script, by_command = tmp_path / "script", tmp_path / "command"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_layer_norm.py"), "--quick",
                          "--out", str(by_script)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr
    assert cli.main(["bench", "--op", "layer_norm", "--quick", "--out", str(by_command)]) == 0
    name = bench.results_name("layer_norm", torch.device("cpu"), torch.float32)
    assert sorted(os.listdir(by_script)) == sorted(os.listdir(by_command)) == [f"{name}.{e}" for e in ("csv", "md",
                                                                                                       "png")]


def test_batches_are_well_formed():
    cfg = tr.TrainConfig(task="reverse", max_len=6, min_len=2, vocab=9)
    src, tgt = tr.make_batch(cfg, 32, torch.Generator().manual_seed(0), "cpu")
    for s, t in zip(src.tolist(), tgt.tolist()):
        n = sum(x != tr.PAD for x in s)
        assert t[0] == tr.BOS and t[n + 1] == tr.EOS and t[1:n + 1] == s[:n][::-1]
    cfg.task = "sort"
    src, tgt = tr.make_batch(cfg, 8, torch.Generator().manual_seed(0), "cpu")
    for s, t in zip(src.tolist(), tgt.tolist()):
        n = sum(x != tr.PAD for x in s)
        assert t[1:n + 1] == sorted(s[:n])


def test_checkpoint_resume_gives_the_same_loss_curve(tmp_path):
    cfg = tr.TrainConfig(steps=24, dropout=0.1, batch_size=16, d_model=32, d_ff=64, eval_size=8)
    straight = tr.train(cfg, evaluate=False)
    ckpt = str(tmp_path / "model.pt")
    first = tr.TrainConfig(**{**cfg.__dict__, "steps": 10})
    tr.train(first, checkpoint=ckpt, evaluate=False)
    resumed = tr.train(cfg, resume=ckpt, evaluate=False)
    assert resumed["losses"] == straight["losses"]
    assert resumed["digest"] == straight["digest"]
    other = tr.TrainConfig(**{**cfg.__dict__, "d_model": 64})
    with pytest.raises(tr.TrainError, match="belongs to another model: d_model=32"):
        tr.train(other, resume=ckpt)
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(tr.TrainError, match="is not a fused-attn checkpoint"):
        tr.train(cfg, resume=str(tmp_path / "junk.pt"))


@pytest.mark.slow
@pytest.mark.timed
def test_copy_task_reaches_99_percent_with_the_defaults(tmp_path):
    """fused-attn train's defaults: >= 99% exact-sequence accuracy on the copy task, well
    within 10 minutes on this CPU."""
    summary = tr.train(tr.TrainConfig(), out_dir=str(tmp_path))
    assert summary["accuracy"] >= 0.99, summary["accuracy"]
    assert summary["seconds"] < 600
    assert (tmp_path / "train_loss.png").exists() and (tmp_path / "train_summary.json").exists()


@pytest.mark.slow
def test_distributed_data_parallel_keeps_replicas_identical(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                          "-m", "fused_attn.tools.cli", "train", "--steps", "6", "--batch-size", "8", "--d-model", "32",
                          "--d-ff", "64", "--dropout", "0.1", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    digests = [(tmp_path / f"digest_rank{r}.txt").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["world_size"] == 2
    single = tr.train(tr.TrainConfig(steps=6, batch_size=8, d_model=32, d_ff=64, dropout=0.1), evaluate=False)
    assert single["digest"] != digests[0].strip()  # two replicas saw twice the data: a different model


def test_demo_speed_summary_counts_only_our_kernels():
    from fused_attn.tools.bench import Row
    from fused_attn.tools.cli import speed_summary

    rows = [Row("attention", "L=1", 1, "float32", name, "fwd", 1.0, ratio_to_torch=r)
            for name, r in (("cpu", 1.2), ("torch", 1.0), ("torch_math", 0.2), ("torch_flash", 1.5))]
    rows += [Row("feed_forward", "t=1", 1, "float32", name, "fwd", 1.0, ratio_to_torch=r)
             for name, r in (("cpu", 1.05), ("cpu", 0.98), ("gemm_only", 1.3))]
    assert speed_summary(rows) == ["attention fwd (cpu): 1.20x to 1.20x of torch's speed over 1 sizes",
                                   "feed_forward fwd (cpu): 0.98x to 1.05x of torch's speed over 2 sizes"]
