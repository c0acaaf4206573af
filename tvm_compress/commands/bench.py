"""``tvm-compress bench``: targets x pass sets, next to onnxruntime, as tables and plots."""

from __future__ import annotations

import argparse

from . import Command, register_command
from ._common import add_model_args, add_rpc_args, log_fn, rpc_spec, shapes, values


def add_arguments(b: argparse.ArgumentParser) -> None:
    from tvm_compress.calib_data import add_calib_arguments
    from tvm_compress.pass_registry import get_preset, pass_names
    from tvm_compress.targets import target_names

    add_model_args(b)
    b.add_argument("-o", "--out-dir", required=True, metavar="OUTDIR",
                   help="where libraries, report.json, report.md and the plots go (a rerun resumes)")
    b.add_argument("--targets", default="x86", metavar="LIST",
                   help=f"comma-separated target presets (default x86); known: {', '.join(target_names())}")
    b.add_argument("--targets-file", action="append", metavar="TOML", help="extra target presets")
    b.add_argument("--passes", default="none", metavar="SETS",
                   help="comma-separated pass sets, passes within a set joined by '+', 'none' for no "
                   f"compression (default none); passes: {', '.join(pass_names())}")
    b.add_argument("--fold", action=argparse.BooleanOptionalAction, default=True,
                   help="fold constant per-channel ops into the layers first in every build (default: on)")
    b.add_argument("--eval", metavar="DATA",
                   help="labelled evaluation data (.npz with the inputs' arrays and 'labels', .npy, or an "
                   "image folder): top-1, and agreement with onnxruntime fp32, per build that runs here")
    b.add_argument("--tune-trials", type=int, default=0, metavar="N",
                   help="MetaSchedule trials per build (0: default schedules); records are cached")
    b.add_argument("--rounds", type=int, default=10, metavar="N",
                   help="timing rounds, engines taking turns (default 10)")
    b.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    b.add_argument("--quiet", action="store_true", help="no progress output")
    g = add_rpc_args(b)
    g.add_argument("--rpc-targets", metavar="LIST",
                   help="targets built for, verified and timed on the boards (default: every target "
                   "that does not run natively here)")
    readers = [n for n in pass_names() if get_preset(n).reads_calibration]
    add_calib_arguments(b.add_argument_group(
        f"calibration data (for {', '.join(readers)} and onnxruntime's static int8 baseline)"))
    for name in pass_names():
        preset = get_preset(name)
        if preset.add_arguments is not None:
            preset.add_arguments(b.add_argument_group(f"pass {name}", preset.help))


def run(args) -> int:
    from tvm_compress.bench import parse_pass_sets, run_bench
    from tvm_compress.pass_registry import config_from_args, get_preset
    from tvm_compress.targets import load_target_files

    if args.targets_file:
        load_target_files(args.targets_file)
    sets = parse_pass_sets(args.passes)
    configs = {n: config_from_args(get_preset(n), args) for n in {p for s in sets for p in s.passes}}
    log = log_fn(args.quiet)
    report = run_bench(
        args.model, args.out_dir,
        targets=[t.strip() for t in args.targets.split(",") if t.strip()],
        pass_sets=sets, input_shapes=shapes(args), input_values=values(args), pass_configs=configs,
        calib=args.calib,
        eval_data=args.eval, tune_trials=args.tune_trials, rpc=rpc_spec(args),
        rpc_targets=[t for t in args.rpc_targets.split(",") if t] if args.rpc_targets else None, rounds=args.rounds,
        fold=args.fold, plots=not args.no_plots, verbose=args.verbose, log=log,
    )
    log.done()
    if not args.quiet:
        from tvm_compress.bench_report import summary

        print(summary(report))
    return 0 if all(r["status"] == "ok" for r in report["rows"]) else 4


register_command(Command("bench", "compile, verify and time a model for several targets and pass sets, "
                         "next to onnxruntime", add_arguments, run))
