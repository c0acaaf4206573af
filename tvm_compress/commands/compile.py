"""``tvm-compress compile``: ONNX in, verified library + manifest (+ report) out."""

from __future__ import annotations

import argparse

from . import Command, register_command
from ._common import add_model_args, add_rpc_args, add_target_args, log_fn, rpc_spec, shapes, values


def add_arguments(c: argparse.ArgumentParser) -> None:
    from tvm_compress.calib_data import add_calib_arguments
    from tvm_compress.pass_registry import get_preset, pass_names

    add_model_args(c)
    c.add_argument("-o", "--output", required=True, metavar="OUT.so", help="library to write")
    add_target_args(c)
    c.add_argument(
        "--passes",
        default="",
        metavar="LIST",
        help=f"comma-separated compression passes, in order; available: {', '.join(pass_names()) or 'none'}",
    )
    c.add_argument("--fold", action=argparse.BooleanOptionalAction, default=True,
                   help="fold constant per-channel mul/add/sub/div and batch norm into the conv/matmul "
                   "next to them before the other passes (exact; default: on)")
    c.add_argument("--verify-input", metavar="FILE.npz", help="arrays named after the inputs")
    c.add_argument("--tune-trials", type=int, default=0, metavar="N",
                   help="MetaSchedule trials spread over all tasks (0: default schedules)")
    c.add_argument("--check-kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="run every scheduled kernel alone, outputs pre-filled with NaN/sentinels, "
                   "against its unscheduled form before writing the library (default: on)")
    c.add_argument("--report", metavar="REPORT.json", help="write the report here")
    c.add_argument("--bench-runs", type=int, default=50, metavar="N", help="timed runs (default 50)")
    c.add_argument("--quiet", action="store_true", help="no progress output")
    add_rpc_args(c)
    readers = [n for n in pass_names() if get_preset(n).reads_calibration]
    if readers:
        add_calib_arguments(c.add_argument_group(f"calibration data (for {', '.join(readers)})"))
    for name in pass_names():
        preset = get_preset(name)
        if preset.add_arguments is not None:
            preset.add_arguments(c.add_argument_group(f"pass {name}", preset.help))


def run(args) -> int:
    from tvm_compress.build import compile as compile_model
    from tvm_compress.errors import PassOptionError
    from tvm_compress.pass_registry import config_from_args, get_preset, parse_pass_list
    from tvm_compress.targets import load_target_files

    if args.targets_file:
        load_target_files(args.targets_file)
    names = parse_pass_list(args.passes)
    if "fold" in names and not args.fold:
        raise PassOptionError("--no-fold contradicts --passes fold")
    if args.fold and "fold" not in names:
        names = parse_pass_list(["fold", *names])
    configs = {n: config_from_args(get_preset(n), args) for n in names}
    rep = compile_model(
        args.model,
        args.output,
        target=args.target,
        passes=names,
        pass_configs=configs,
        input_shapes=shapes(args), input_values=values(args),
        verify_input=args.verify_input,
        tune_trials=args.tune_trials,
        report=args.report,
        bench_runs=args.bench_runs,
        rpc=rpc_spec(args),
        check_kernels=args.check_kernels,
        fold=args.fold,
        log=log_fn(args.quiet),
    )
    if not args.quiet:
        print(summary_line(rep))
    return 0


def _fmt_err(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def summary_line(rep: dict) -> str:
    lat = rep.get("latency_ms")
    ort = rep.get("onnxruntime_latency_ms")
    speed = (
        f", {lat['median']:.3f} ms (onnxruntime {ort['median']:.3f} ms)" if lat and ort else
        f", latency: {rep.get('latency_note') or rep.get('verify_status')}"
    )
    return (
        f"wrote {rep['artifact']} ({rep['artifact_bytes']} bytes) for {rep['target']}: "
        f"weights {rep['weight_bytes_before']} -> {rep['weight_bytes_after']} bytes, "
        f"max rel err {_fmt_err(rep['max_rel_err'])}{speed}"
    )


register_command(Command("compile", "compile an ONNX model into a verified .so", add_arguments, run))
