"""``tvm-compress demo``: the bundled Fashion-MNIST model compiled, verified and measured."""

from __future__ import annotations

from pathlib import Path

from . import Command, register_command
from ._common import log_fn


def add_arguments(d) -> None:
    d.add_argument("--tune-trials", type=int, default=None, metavar="N",
                   help="tuning budget per variant (default: the demo's own)")
    d.add_argument("--out-dir", default="demo-out", metavar="DIR", help="where artifacts go")
    d.add_argument("--targets", default="x86,aarch64", metavar="LIST",
                   help="targets to build for (default x86,aarch64)")
    d.add_argument("--quiet", action="store_true", help="no progress output")


def run(args) -> int:
    from tvm_compress.bench_report import summary
    from tvm_compress.demo import run_demo

    log = log_fn(args.quiet)
    report = run_demo(out_dir=Path(args.out_dir), tune_trials=args.tune_trials,
                      targets=[t for t in args.targets.split(",") if t], verbose=args.verbose, log=log)
    log.done()
    if not args.quiet:
        print(summary(report))
        print(f"\nreport: {Path(args.out_dir) / 'report.md'} (data: report.json; plots: "
              f"{', '.join(report.get('plots', [])) or 'none'})")
    return 0


register_command(Command("demo", "bench the bundled Fashion-MNIST model: x86 and aarch64, int8, pruning and low-rank",
                         add_arguments, run))
