"""The `fused-attn` command: check, bench, train and demo.

  fused-attn check   correctness sweep against the float64 reference (exit 1 on failure)
  fused-attn bench   benchmarks: tables, CSV/markdown and PNG plots, --compare with an earlier run
  fused-attn train   train the encoder-decoder on a synthetic task (torchrun: DistributedDataParallel)
  fused-attn demo    the README's main job: a short check, bench and train on this device
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

import torch

import fused_attn

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class UserError(Exception):
    """A mistake in the command line: printed as one line, exit code 2."""


def _console():
    import shutil

    from rich.console import Console

    # piped output (CI logs, `| tee`) gets a wide table instead of rich's 80 columns
    return Console() if sys.stdout.isatty() else Console(width=max(160, shutil.get_terminal_size().columns))


def _device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no GPU here (torch.cuda.is_available() is False)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device (cpu, cuda, cuda:1)") from None


def _dtypes(names, device) -> list[torch.dtype]:
    from . import check

    if not names:
        return check.default_dtypes(device)
    out = []
    for n in names:
        if n not in DTYPES:
            raise UserError(f"--dtype {n!r}: expected one of {', '.join(sorted(DTYPES))}")
        out.append(DTYPES[n])
    return out


def _backends(names, allow_custom: bool = False) -> Optional[list[str]]:
    if not names:
        return None
    for n in names:
        if n in fused_attn.BACKENDS or (allow_custom and ":" in n):
            continue
        extra = " or module:function (an attention callable with the SDPA signature)" if allow_custom else ""
        raise UserError(f"--backend {n!r}: expected one of {', '.join(fused_attn.BACKENDS)}{extra}")
    return list(names)


def load_callable(spec: str):
    """'package.module:function' -> the function (the check's custom backend)."""
    import importlib

    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError(f"--backend {spec!r}: cannot load it ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise UserError(f"--backend {spec!r} is not callable")
    return fn


def _ops(names) -> Optional[list[str]]:
    from . import check

    if not names:
        return None
    for n in names:
        if n not in check.CASE_BUILDERS:
            raise UserError(f"--op {n!r}: expected one of {', '.join(check.CASE_BUILDERS)}")
    return list(names)


def _backend_table(console) -> None:
    from rich.table import Table

    t = Table(title="backends")
    t.add_column("backend")
    t.add_column("usable here")
    for name, why in fused_attn.available_backends().items():
        t.add_row(name, "yes" if why is None else f"no: {why}")
    console.print(t)


def run_check(device, *, ops=None, backends=None, dtypes=None, quick=False, console=None):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from . import check

    console = console or _console()
    with Progress(TextColumn("[bold]check"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TextColumn("{task.description}"), console=console, transient=True) as bar:
        task = bar.add_task("", total=None)

        def progress(i, n, what):
            bar.update(task, completed=i, total=n, description=what)

        rows = check.run(device, ops=ops, backends=backends, dtypes=dtypes, quick=quick, progress=progress)
    return rows


def _print_check(rows, console) -> None:
    from rich.table import Table

    from . import check

    t = Table(title="correctness vs float64 reference (2x rule)")
    for c in ("op", "backend", "dtype", "cases", "tensors", "max error", "allowed", "error/allowed", "worst at",
              "result"):
        t.add_column(c)
    for s in check.summarize(rows):
        t.add_row(s["op"], s["backend"], s["dtype"], str(s["cases"]), str(s["checked"]), f"{s['worst_error']:.2e}",
                  f"{s['worst_allowed']:.2e}", f"{s['worst_ratio']:.2f}", s["worst"],
                  "[green]pass" if not s["failed"] else f"[red]{s['failed']} FAILED")
    console.print(t)
    for r in rows:
        if not r.ok:
            console.print(f"[red]FAIL[/red] {r.op} {r.backend} {r.dtype} {r.case} {r.tensor}: error {r.error:.3e} > "
                          f"allowed {r.allowed:.3e}")


def cmd_check(args) -> int:
    from . import check

    console = _console()
    device = _device(args.device)
    backends = _backends(args.backend, allow_custom=True)
    custom = {b: load_callable(b) for b in backends or () if ":" in b}
    ops = _ops(args.op)
    if custom:
        if ops and ops != ["attention"]:
            raise UserError("a module:function backend is an attention callable: use it with --op attention")
        ops = ["attention"]
        check.CUSTOM_BACKENDS.update(custom)
    rows = run_check(device, ops=ops, backends=backends, dtypes=_dtypes(args.dtype, device), quick=args.quick,
                     console=console)
    _print_check(rows, console)
    if args.json:
        _write_json(args.json, [r.__dict__ for r in rows])
    failed = sum(not r.ok for r in rows)
    console.print(f"{len(rows) - failed}/{len(rows)} checks pass on {device}")
    return 1 if failed or not rows else 0


def _write_json(path, data) -> None:
    try:
        with open(path, "w") as f:
            json.dump(data, f, indent=1, default=str)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None


def _bench_registry():
    from . import bench

    return bench.REGISTRY


def run_bench(device, *, ops=None, quick=False, out_dir=None, console=None, dtype=None):
    """The registered benchmarks `ops` (default: those marked default) -> (rows, environment,
    written paths); results are named as the benchmarks/ scripts name them."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from . import bench

    console = console or _console()
    registry = _bench_registry()
    ops = list(ops or [name for name, entry in registry.items() if entry.default])
    for op in ops:
        if op not in registry:
            raise UserError(f"--op {op!r}: expected one of {', '.join(registry)}")
    dtype = dtype or bench.default_dtype(device)
    env = bench.environment(device)
    written, all_rows = [], []
    problem = bench.output_dir_problem(out_dir) if out_dir else None
    if problem:
        raise UserError(problem)
    with Progress(SpinnerColumn(), TextColumn("[bold]bench"), TimeElapsedColumn(), TextColumn("{task.description}"),
                  console=console, transient=True) as bar:
        task = bar.add_task("", total=None)
        for op in ops:
            rows = registry[op].run(device, dtype, quick, lambda s: bar.update(task, description=s))
            all_rows.extend(rows)
            if out_dir:
                written.append(bench.write_results(rows, out_dir, bench.results_name(op, device, dtype), env,
                                                   title=registry[op].title))
    return all_rows, env, written


def _print_bench(rows, env, console) -> None:
    from rich.table import Table

    console.print(", ".join(f"{k}: {v}" for k, v in env.items()))
    t = Table(title="benchmark (ratio = torch time / backend time, same run)")
    for c in ("op", "case", "dtype", "dir", "backend", "ms", "TFLOP/s", "GB/s", "vs torch"):
        t.add_column(c)
    for r in rows:
        t.add_row(r.op, r.case, r.dtype, r.direction, r.backend, f"{r.ms:.4g}",
                  f"{r.tflops:.3g}" if r.tflops else "", f"{r.gbps:.4g}" if r.gbps else "",
                  f"{r.ratio_to_torch:.2f}x" if r.ratio_to_torch else "")
    console.print(t)


def _read_csv(path: str) -> dict:
    import csv

    try:
        with open(path, newline="") as f:
            return {(r["op"], r["case"], r["dtype"], r["backend"], r["direction"]): float(r["ms"])
                    for r in csv.DictReader(f)}
    except OSError as e:
        raise UserError(f"--compare {path}: {e.strerror}") from None
    except (KeyError, ValueError):
        raise UserError(f"--compare {path}: not a CSV written by fused-attn bench") from None


def _print_compare(rows, old: dict, console) -> None:
    from rich.table import Table

    t = Table(title="against the earlier run (speed-up = old time / new time)")
    for c in ("op", "case", "dtype", "dir", "backend", "old ms", "new ms", "speed-up"):
        t.add_column(c)
    matched = 0
    for r in rows:
        before = old.get((r.op, r.case, r.dtype, r.backend, r.direction))
        if before is None:
            continue
        matched += 1
        t.add_row(r.op, r.case, r.dtype, r.direction, r.backend, f"{before:.4g}", f"{r.ms:.4g}",
                  f"{before / r.ms:.2f}x")
    console.print(t if matched else "no row of this run matches the earlier run (other sizes or device?)")


def cmd_bench(args) -> int:
    console = _console()
    device = _device(args.device)
    dtype = _dtypes(args.dtype, device)[0] if args.dtype else None
    registry = _bench_registry()
    for op in args.op or ():
        if op not in registry:
            raise UserError(f"--op {op!r}: expected one of {', '.join(registry)}")
    old = _read_csv(args.compare) if args.compare else None
    rows, env, written = run_bench(device, ops=args.op, quick=args.quick, out_dir=args.out, console=console,
                                   dtype=dtype)
    _print_bench(rows, env, console)
    if old is not None:
        _print_compare(rows, old, console)
    for paths in written:
        console.print("wrote " + ", ".join(paths.values()))
    return 0


def run_train(cfg, console, *, checkpoint=None, resume=None, save_every=0, out_dir=None):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from . import train as tr

    with Progress(TextColumn(f"[bold]train {cfg.task}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tokens/s"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("", total=cfg.steps, loss=float("nan"), tps=0.0)

        def progress(step, info):
            bar.update(task, completed=step, loss=info["loss"], tps=info["tokens_per_s"])

        try:
            return tr.train(cfg, checkpoint=checkpoint, resume=resume, save_every=save_every, out_dir=out_dir,
                            progress=progress)
        except tr.TrainError as e:
            raise UserError(str(e)) from None


def cmd_train(args) -> int:
    from . import train as tr

    console = _console()
    if args.backend not in ("auto",) + tuple(fused_attn.BACKENDS):
        raise UserError(f"--backend {args.backend!r}: expected auto or one of {', '.join(fused_attn.BACKENDS)}")
    cfg = tr.TrainConfig(task=args.task, vocab=args.vocab, min_len=args.min_len, max_len=args.max_len, N=args.layers,
                         d_model=args.d_model, d_ff=args.d_ff, h=args.heads, dropout=args.dropout,
                         batch_size=args.batch_size, steps=args.steps, lr=args.lr, warmup=args.warmup, seed=args.seed,
                         backend=args.backend, context_parallel=args.context_parallel, packed=args.packed)
    summary = run_train(cfg, console, checkpoint=args.checkpoint, resume=args.resume, save_every=args.save_every,
                        out_dir=args.out)
    if summary["rank"] != 0:
        return 0
    console.print(f"trained {summary['steps']} steps in {summary['seconds']:.0f} s on {summary['world_size']} "
                  f"process(es): final loss {summary['final_loss']:.4f}, {summary['tokens_per_s']:,.0f} tokens/s")
    if "accuracy" in summary:
        console.print(f"greedy decoding: {summary['accuracy']:.1%} exact-sequence accuracy on {cfg.eval_size} fresh "
                      f"{cfg.task} examples")
    console.print(f"parameters digest {summary['digest'][:16]}")
    if args.out:
        console.print(f"wrote {os.path.join(args.out, 'train_summary.json')} and train_loss.png")
    return 0


def speed_summary(rows) -> list[str]:
    """One line per (op, direction): the range of this package's kernels' speed ratios to
    torch (torch's other SDPA kernels and the bare-GEMM row are left out)."""
    ours = {}
    for r in rows:
        if r.backend in ("cuda", "triton", "cpu") and r.ratio_to_torch:
            ours.setdefault((r.op, r.direction), []).append((r.ratio_to_torch, r.backend))
    lines = []
    for (op, direction), ratios in sorted(ours.items()):
        names = ", ".join(sorted({b for _, b in ratios}))
        lo, hi = min(x for x, _ in ratios), max(x for x, _ in ratios)
        lines.append(f"{op} {direction} ({names}): {lo:.2f}x to {hi:.2f}x of torch's speed over {len(ratios)} sizes")
    return lines


def cmd_demo(args) -> int:
    console = _console()
    device = _device(args.device)
    t0 = time.time()
    console.rule(f"fused_attn {fused_attn.__version__} demo on {device}")
    _backend_table(console)
    rows = run_check(device, quick=True, console=console)
    _print_check(rows, console)
    failed = sum(not r.ok for r in rows)
    brows, env, _ = run_bench(device, ops=["layer_norm", "attention", "feed_forward"], quick=True, console=console)
    _print_bench(brows, env, console)
    from . import train as tr

    summary = run_train(tr.TrainConfig(steps=1500 if device.type == "cpu" else 3000), console)
    console.rule("summary")
    console.print(f"correctness: {len(rows) - failed}/{len(rows)} checks pass against the float64 reference")
    for line in speed_summary(brows):
        console.print(line)
    console.print(f"training: copy task, {summary['steps']} steps in {summary['seconds']:.0f} s "
                  f"({summary['tokens_per_s']:,.0f} tokens/s), final loss {summary['final_loss']:.4f}, "
                  f"greedy decoding {summary['accuracy']:.1%} exact-sequence accuracy")
    console.print(f"finished in {time.time() - t0:.0f} s")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fused-attn", description="fused Transformer kernels: check, bench, demo")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="correctness sweep against the float64 reference")
    c.add_argument("--op", action="append", help="op to check (repeatable; default all)")
    c.add_argument("--backend", action="append", help="backend to check (repeatable; default all usable)")
    c.add_argument("--dtype", action="append", help="float32, float16, bfloat16 (repeatable)")
    c.add_argument("--device", help="cpu or cuda (default: cuda if present)")
    c.add_argument("--quick", action="store_true", help="fewer, smaller cases")
    c.add_argument("--json", help="write every checked tensor as JSON to this file")
    c.set_defaults(func=cmd_check)
    b = sub.add_parser("bench", help="benchmarks with CSV/markdown/PNG output")
    registry = _bench_registry()
    b.add_argument("--op", action="append",
                   help=f"benchmark to run, repeatable ({', '.join(registry)}; default: "
                        f"{', '.join(n for n, e in registry.items() if e.default)})")
    b.add_argument("--device", help="cpu or cuda (default: cuda if present)")
    b.add_argument("--dtype", action="append", help="float32, float16 or bfloat16")
    b.add_argument("--quick", action="store_true", help="fewer sizes, shorter timing")
    b.add_argument("--out", default=None, help="folder for CSV, markdown and PNG results")
    b.add_argument("--compare", metavar="OLD_CSV", help="show the speed-up against a CSV of an earlier run")
    b.set_defaults(func=cmd_bench)
    from .train import TASKS, TrainConfig

    dflt = TrainConfig()
    t = sub.add_parser("train", help="train the encoder-decoder on a synthetic task (torchrun for several processes)")
    t.add_argument("--task", default=dflt.task, help=f"one of {', '.join(TASKS)}")
    t.add_argument("--steps", type=int, default=dflt.steps)
    t.add_argument("--batch-size", type=int, default=dflt.batch_size)
    t.add_argument("--lr", type=float, default=dflt.lr)
    t.add_argument("--warmup", type=int, default=dflt.warmup)
    t.add_argument("--vocab", type=int, default=dflt.vocab)
    t.add_argument("--min-len", type=int, default=dflt.min_len)
    t.add_argument("--max-len", type=int, default=dflt.max_len)
    t.add_argument("--layers", type=int, default=dflt.N)
    t.add_argument("--d-model", type=int, default=dflt.d_model)
    t.add_argument("--d-ff", type=int, default=dflt.d_ff)
    t.add_argument("--heads", type=int, default=dflt.h)
    t.add_argument("--dropout", type=float, default=dflt.dropout)
    t.add_argument("--seed", type=int, default=dflt.seed)
    t.add_argument("--backend", default="auto")
    t.add_argument("--context-parallel", type=int, default=dflt.context_parallel, metavar="N",
                   help="split every sequence over N processes (torchrun --nproc-per-node N): ring attention")
    t.add_argument("--packed", action="store_true",
                   help="no padding: each batch's sequences end to end, attention per sequence (varlen)")
    t.add_argument("--checkpoint", help="save the model, optimizer and RNG state here (at the end and every "
                                        "--save-every steps)")
    t.add_argument("--save-every", type=int, default=0)
    t.add_argument("--resume", help="continue from this checkpoint (same loss curve as an uninterrupted run)")
    t.add_argument("--out", help="folder for train_summary.json and the loss plot")
    t.set_defaults(func=cmd_train)
    d = sub.add_parser("demo", help="short check + short bench on this device")
    d.add_argument("--device", help="cpu or cuda (default: cuda if present)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"fused-attn: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fused-attn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
