#!/usr/bin/env python
"""Time compiled libraries of one model against onnxruntime fp32, each engine in its own process.

The libraries can come from different commits (e.g. a default-schedule change: build the
"before" library at the previous commit, the "after" one at this). Every engine runs in a
process of its own (``tvm-compress bench``'s engine workers: no two thread pools share one),
and the engines take turns, ``--runs`` calls each per round, waiting for the previous one's
threads to go idle first.

    python scripts/bench_libs.py --model det before=det_before.so after=det_after.so --rounds 10
    python scripts/bench_libs.py --model det --shape 1,3,960,960 det960=det960.so
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import MODELS, prepared_model  # noqa: E402

import tvm_compress  # noqa: E402
from tvm_compress.bench import _Engine, _Worker  # noqa: E402
from tvm_compress.loader import parse_shape_arg  # noqa: E402
from tvm_compress.verify import random_inputs  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="det")
    ap.add_argument("libs", nargs="+", metavar="NAME=LIB.so")
    ap.add_argument("--target", default="x86")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runs", type=int, default=20, help="calls per engine per round")
    ap.add_argument("--shape", help="the input's shape instead of the model's usual one, e.g. 1,3,960,960")
    ap.add_argument("--onnx", help="another model file (give --shape or --input-shape if it is dynamic)")
    ap.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,...",
                    help="with --onnx: fix one input's shape (repeat per input; models with several inputs)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="then list each library's N slowest kernels (ms per run, instrumented runs)")
    ap.add_argument("--match", default="", help="with --profile: only kernels whose name contains this")
    args = ap.parse_args(argv)

    path, prepared = prepared_model(args.model, args.onnx, args.shape,
                                    dict(parse_shape_arg(a) for a in args.input_shape))
    xs = random_inputs(prepared.inputs, seed=0)
    engines = [_Engine("onnxruntime fp32 (2 threads)", "ort", str(path))]
    engines += [_Engine(n, "tvm", str(Path(p).resolve()), args.target)
                for n, p in (lib.split("=", 1) for lib in args.libs)]
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp, "inputs.npz")
        np.savez(inputs, **{spec.name: x for spec, x in zip(prepared.inputs, xs)})
        workers = [_Worker(e, inputs, Path(tmp, "engines.log")) for e in engines]
        times = {e.name: [] for e in engines}
        try:
            for _ in range(args.rounds):
                for w in workers:
                    for other in workers:
                        other.wait_idle()
                    times[w.engine.name] += w.ask({"op": "time", "runs": args.runs, "warmup": 3})["times_ms"]
            profiles = {w.engine.name: w.ask({"op": "profile", "runs": 10})["kernels_ms"]
                        for w in workers[1:] if args.profile}
        finally:
            for w in workers:
                w.close()
    ort = float(np.median(times[engines[0].name]))
    print(f"\n{Path(args.onnx).name if args.onnx else args.model}, {args.rounds} rounds x {args.runs} calls per engine\n")
    print("| engine | median ms | p90 ms | time / onnxruntime |")
    print("|---|---:|---:|---:|")
    for name, ts in times.items():
        med = float(np.median(ts))
        digits = 4 if med < 0.1 else 3  # sub-0.1 ms models: microseconds matter
        print(f"| {name} | {med:.{digits}f} | {float(np.percentile(ts, 90)):.{digits}f} | {med / ort:.2f}x |")
    for name, kernels in profiles.items():
        picked = sorted(((ms, k) for k, ms in kernels.items() if args.match in k), reverse=True)
        print(f"\n{name}: {len(kernels)} kernels, {sum(kernels.values()):.3f} ms in all; slowest:")
        for ms, k in picked[:args.profile]:
            print(f"  {1e3 * ms:9.1f} us  {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
