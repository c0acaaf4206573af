"""``tvm-compress``: a thin argparse layer over the Python API.

Every user error ends as one line on stderr and a non-zero exit; set TVM_COMPRESS_DEBUG=1 to
see tracebacks of internal errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .errors import TvmCompressError

PROG = "tvm-compress"


def _log_fn(quiet: bool):
    if quiet:
        return lambda msg: None
    return lambda msg: print(msg, file=sys.stderr, flush=True)


def _shapes(args) -> dict:
    from .loader import parse_shape_arg

    shapes = {}
    for text in args.input_shape or []:
        name, shape = parse_shape_arg(text)
        shapes[name] = shape
    return shapes


def _add_common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX model file")
    p.add_argument(
        "--input-shape",
        action="append",
        metavar="NAME=D0,D1,...",
        help="fix an input's shape (repeat once per input); needed for dynamic dims",
    )


def _add_target_args(p: argparse.ArgumentParser) -> None:
    from .targets import target_names

    p.add_argument(
        "--target",
        default="x86",
        metavar="NAME",
        help=f"target preset (default x86); one of: {', '.join(target_names())}",
    )
    p.add_argument("--targets-file", action="append", metavar="TOML", help="extra target presets")


def _add_rpc_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("boards over TVM RPC")
    g.add_argument("--rpc-tracker", metavar="HOST:PORT", help="TVM RPC tracker the boards registered with")
    g.add_argument("--rpc-key", metavar="KEY", help="device key of the boards (with --rpc-tracker)")


def _rpc_spec(args):
    from .remote import parse_tracker

    if not args.rpc_tracker:
        if args.rpc_key:
            from .errors import RemoteError

            raise RemoteError("--rpc-key needs --rpc-tracker HOST:PORT")
        return None
    return parse_tracker(args.rpc_tracker, args.rpc_key)


def _build_parser() -> argparse.ArgumentParser:
    from tvm_compress.passes import get_pass, pass_names

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Compress ONNX models with TVM passes and compile verified libraries "
        "for x86, ARM and CUDA.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    c = sub.add_parser("compile", help="compile an ONNX model into a verified .so")
    _add_common_model_args(c)
    c.add_argument("-o", "--output", required=True, metavar="OUT.so", help="library to write")
    _add_target_args(c)
    c.add_argument(
        "--passes",
        default="",
        metavar="LIST",
        help=f"comma-separated compression passes, in order; available: {', '.join(pass_names()) or 'none'}",
    )
    c.add_argument("--verify-input", metavar="FILE.npz", help="arrays named after the inputs")
    c.add_argument("--tune-trials", type=int, default=0, metavar="N",
                   help="MetaSchedule trials spread over all tasks (0: default schedules)")
    c.add_argument("--check-kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="run every scheduled kernel alone, outputs pre-filled with NaN/sentinels, "
                   "against its unscheduled form before writing the library (default: on)")
    c.add_argument("--report", metavar="REPORT.json", help="write the report here")
    c.add_argument("--bench-runs", type=int, default=50, metavar="N", help="timed runs (default 50)")
    c.add_argument("--quiet", action="store_true", help="no progress output")
    _add_rpc_args(c)
    for name in pass_names():
        preset = get_pass(name)
        if preset.add_arguments is not None:
            preset.add_arguments(c.add_argument_group(f"pass {name}", preset.help))

    r = sub.add_parser("run", help="run a compiled library on an input file")
    r.add_argument("library", help="library written by 'compile' (its .json manifest beside it)")
    r.add_argument("--input", required=True, metavar="FILE", help=".npy (one input) or .npz by input name")
    r.add_argument("--output", metavar="OUT.npz", help="save the outputs here")
    r.add_argument("--repeat", type=int, default=0, metavar="N", help="also time N runs")
    _add_rpc_args(r)

    i = sub.add_parser("inspect", help="inputs, outputs, op histogram, params and MACs per layer")
    _add_common_model_args(i)
    i.add_argument("--json", action="store_true", help="print JSON")

    t = sub.add_parser("targets", help="list target presets")
    t.add_argument("--targets-file", action="append", metavar="TOML", help="extra target presets")
    t.add_argument("--json", action="store_true", help="print JSON")

    d = sub.add_parser("demo", help="compile the bundled Fashion-MNIST model and report accuracy/speed")
    d.add_argument("--tune-trials", type=int, default=None, metavar="N",
                   help="tuning budget per variant (default: the demo's own)")
    d.add_argument("--out-dir", default="demo-out", metavar="DIR", help="where artifacts go")
    d.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def _cmd_compile(args) -> int:
    from tvm_compress.passes.registry import config_from_args, get_pass, parse_pass_list

    from .build import compile as compile_model
    from .targets import load_target_files

    if args.targets_file:
        load_target_files(args.targets_file)
    names = parse_pass_list(args.passes)
    configs = {n: config_from_args(get_pass(n), args) for n in names}
    rep = compile_model(
        args.model,
        args.output,
        target=args.target,
        passes=names,
        pass_configs=configs,
        input_shapes=_shapes(args),
        verify_input=args.verify_input,
        tune_trials=args.tune_trials,
        report=args.report,
        bench_runs=args.bench_runs,
        rpc=_rpc_spec(args),
        check_kernels=args.check_kernels,
        log=_log_fn(args.quiet),
    )
    if not args.quiet:
        print(_summary_line(rep))
    return 0


def _fmt_err(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _summary_line(rep: dict) -> str:
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


def _cmd_run(args) -> int:
    from . import artifact
    from .fileutil import atomic_path, check_writable

    if args.output:
        check_writable(args.output)
    manifest = artifact.load_manifest(args.library)
    result = artifact.run(args.library, args.input, repeat=args.repeat, rpc=_rpc_spec(args))
    names = [o["name"] for o in manifest["outputs"]]
    if len(names) != len(result.outputs):
        names = [f"output_{k}" for k in range(len(result.outputs))]
    for name, out in zip(names, result.outputs):
        preview = np.array2string(out.reshape(-1)[:8], precision=4, separator=", ")
        line = f"{name}: shape {list(out.shape)} {out.dtype} {preview}"
        if out.ndim == 2 and out.shape[0] == 1 and out.shape[1] > 1:
            line += f" argmax {int(out.argmax())}"
        print(line)
    if result.times_ms:
        from .verify import latency_stats

        s = latency_stats(result.times_ms)
        print(f"latency: median {s['median']:.3f} ms, p90 {s['p90']:.3f} ms over {s['runs']} runs ({result.where})")
    if args.output:
        with atomic_path(args.output) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **{n: o for n, o in zip(names, result.outputs)})
    return 0


def _cmd_inspect(args) -> int:
    from .errors import ShapeError
    from .loader import layer_table, op_histogram, prepare_onnx, read_onnx

    shapes = _shapes(args)
    note = ""
    try:
        prepared = prepare_onnx(args.model, shapes)
    except ShapeError:
        if shapes:
            raise
        # Inspection without shapes: assume 1 for every dynamic dim, and say so.
        model = read_onnx(args.model)
        inits = {t.name for t in model.graph.initializer}
        for inp in model.graph.input:
            if inp.name in inits:
                continue
            dims = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
            shapes[inp.name] = tuple(dims)
        note = "dynamic dims assumed 1 (pass --input-shape for real sizes)"
        prepared = prepare_onnx(args.model, shapes)
    layers = layer_table(prepared)
    info = {
        "model": str(prepared.path),
        "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in prepared.inputs],
        "outputs": [{"name": o.name, "shape": list(o.shape) if o.shape else None, "dtype": o.dtype}
                    for o in prepared.outputs],
        "ops": op_histogram(prepared.original),
        "params": sum(r["params"] for r in layers),
        "macs": sum(r["macs"] for r in layers),
        "layers": layers,
    }
    if note:
        info["note"] = note
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model: {info['model']}")
    if note:
        print(f"note: {note}")
    for s in info["inputs"]:
        print(f"input  {s['name']}: {s['shape']} {s['dtype']}")
    for o in info["outputs"]:
        print(f"output {o['name']}: {o['shape']} {o['dtype']}")
    print("ops: " + ", ".join(f"{k} x{v}" for k, v in info["ops"].items()))
    print(f"{'layer':40s} {'op':14s} {'params':>10s} {'MACs':>14s}")
    for r in layers:
        print(f"{r['name'][:40]:40s} {r['op']:14s} {r['params']:>10d} {r['macs']:>14d}")
    print(f"{'total':40s} {'':14s} {info['params']:>10d} {info['macs']:>14d}")
    return 0


def _cmd_targets(args) -> int:
    from .targets import list_targets, load_target_files

    if args.targets_file:
        load_target_files(args.targets_file)
    profiles = list_targets()
    if args.json:
        print(json.dumps([{"name": p.name, "family": p.family, "description": p.description,
                           "target": p.target, "features": p.features} for p in profiles], indent=2))
        return 0
    for p in profiles:
        print(f"{p.name:16s} {p.family:8s} {p.description}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out_dir=Path(args.out_dir), tune_trials=args.tune_trials, log=_log_fn(args.quiet))
    return 0


_COMMANDS = {
    "compile": _cmd_compile,
    "run": _cmd_run,
    "inspect": _cmd_inspect,
    "targets": _cmd_targets,
    "demo": _cmd_demo,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except TvmCompressError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (one line, never a traceback, unless asked)
        if os.environ.get("TVM_COMPRESS_DEBUG"):
            raise
        first = str(err).strip().splitlines()
        print(
            f"{PROG}: internal error: {type(err).__name__}: {first[-1] if first else ''} "
            "(set TVM_COMPRESS_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
