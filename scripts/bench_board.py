#!/usr/bin/env python
"""Board benchmark over TVM RPC: float vs compressed variants, timed on the board in one run.

    python scripts/bench_board.py --rpc-tracker HOST:9190 --rpc-key rpi4 --target rpi4 \
        --trials 256 [--model m.onnx --input-shape x=1,3,224,224] [--calib calib.npz]

Each variant is compiled (tuned on the board through the tracker when --trials > 0, records
cached), verified on the board against onnxruntime, and timed there; the table gives each
variant's median and its ratio to the float build. Default model: the bundled demo CNN.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import tvm_compress
from tvm_compress.demo import INPUT_SHAPE, demo_files
from tvm_compress.errors import TvmCompressError
from tvm_compress.loader import parse_shape_arg
from tvm_compress.remote import parse_tracker


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rpc-tracker", required=True, metavar="HOST:PORT")
    ap.add_argument("--rpc-key", required=True, metavar="KEY")
    ap.add_argument("--target", required=True, help="target preset of the boards, e.g. rpi4")
    ap.add_argument("--model", help="ONNX model (default: the bundled demo CNN)")
    ap.add_argument("--input-shape", action="append", metavar="NAME=D0,...")
    ap.add_argument("--calib", help="calibration data for the int8 variant (default: the demo's)")
    ap.add_argument("--trials", type=int, default=0)
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args(argv)
    files = demo_files()
    model = Path(args.model) if args.model else files["model"]
    shapes = dict(parse_shape_arg(t) for t in args.input_shape or []) or (
        {} if args.model else {"input": INPUT_SHAPE})
    calib = args.calib or (None if args.model else str(files["data"]))
    try:
        spec = parse_tracker(args.rpc_tracker, args.rpc_key)
        variants = [("float32", [], {})]
        if calib:
            variants.append(("int8", ["quantize"], {"quantize": {"calib": calib}}))
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for label, passes, configs in variants:
                rep = tvm_compress.compile(
                    model, Path(tmp) / f"{label}.so", target=args.target, passes=passes,
                    pass_configs=configs, input_shapes=shapes, tune_trials=args.trials,
                    bench_runs=args.runs, rpc=spec, log=lambda m: print(m, file=sys.stderr),
                )
                rows.append((label, rep))
    except TvmCompressError as err:
        print(f"bench_board: error: {err}", file=sys.stderr)
        return 2
    base = rows[0][1]["latency_ms"]["median"]
    print(f"\n{model.name} on {args.rpc_key} ({args.target}), {args.trials} trials per variant")
    print("| variant | board median ms | p90 ms | time / float | max rel err vs onnxruntime | weight bytes |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, rep in rows:
        lat = rep["latency_ms"]
        print(f"| {label} | {lat['median']:.3f} | {lat['p90']:.3f} | {lat['median'] / base:.2f}x | "
              f"{rep['max_rel_err']:.3g} | {rep['weight_bytes_after']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
