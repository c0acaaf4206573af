"""``tvm-compress demo``: the bundled Fashion-MNIST model compiled, verified and measured."""

from __future__ import annotations

from pathlib import Path

from . import Command, register_command
from ._common import log_fn


def add_arguments(d) -> None:
    d.add_argument("--tune-trials", type=int, default=None, metavar="N",
                   help="tuning budget per variant (default: the demo's own)")
    d.add_argument("--out-dir", default="demo-out", metavar="DIR", help="where artifacts go")
    d.add_argument("--quiet", action="store_true", help="no progress output")


def run(args) -> int:
    from tvm_compress.demo import run_demo

    run_demo(out_dir=Path(args.out_dir), tune_trials=args.tune_trials, log=log_fn(args.quiet))
    return 0


register_command(Command("demo", "compile the bundled Fashion-MNIST model and report accuracy/speed",
                         add_arguments, run))
