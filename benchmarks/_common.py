"""Shared by the benchmark scripts: the command line (device, dtype, output folder, quick),
the progress spinner, and one main that runs a benchmark and writes its results."""

import argparse
import os

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--out", default=RESULTS, help="folder for CSV, markdown and PNG")
    p.add_argument("--quick", action="store_true", help="fewer sizes, shorter timing")
    return p


def resolve(args):
    from fused_attn.tools import bench

    device = torch.device(args.device)
    return device, DTYPES[args.dtype] if args.dtype else bench.default_dtype(device)


def progress_printer(total_hint: str = ""):
    """A rich progress spinner as a context manager yielding an update(text) function."""
    from contextlib import contextmanager

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    @contextmanager
    def cm():
        with Progress(SpinnerColumn(), TextColumn("[bold]" + total_hint), TimeElapsedColumn(),
                      TextColumn("{task.description}"), transient=True) as bar:
            task = bar.add_task("", total=None)
            yield lambda s: bar.update(task, description=s)

    return cm()


def main(doc: str, name: str, title: str = "", run=None, report=None):
    """The body of every bench_<name>.py: parse the command line, run the registered benchmark
    `name` (fused_attn.tools.bench.REGISTRY, which `fused-attn bench --op` runs too; or the
    script's own run(device, dtype, quick, progress) -> rows, for the multi-process ones) with a
    progress spinner, write bench.results_name(name, device, dtype).{csv,md,png} and print the
    table (then the benchmark's report(rows), if any)."""
    from fused_attn.tools import bench

    if run is None:
        entry = bench.REGISTRY[name]
        title, run, report = entry.title, entry.run, entry.report
    args = parser(doc.split("\n\n")[0]).parse_args()
    device, dtype = resolve(args)
    env = bench.environment(device)
    with progress_printer(name) as update:
        rows = run(device, dtype, args.quick, update)
    paths = bench.write_results(rows, args.out, bench.results_name(name, device, dtype), env, title=title)
    print(bench.markdown(rows, env, title=title))
    if report:
        report(rows)
    print("wrote", ", ".join(paths.values()))
