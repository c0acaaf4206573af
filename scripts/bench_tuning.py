#!/usr/bin/env python
"""Tuning schedulers at the same trial budget: gradient (trials by latency share) vs round-robin.

For each scheduler the model is tuned from an empty database (its own work dir) in a child
process (the tuner's thread pools would keep spinning in this one and slow every timing), then
built here from those records, and every variant and onnxruntime fp32 are timed in the same
process, interleaved round by round (a block of calls per variant) on the same input. Prints
a Markdown table: tuning wall time, the tuner's model estimate after the first round of every
task and at the end, and the measured latency.

    python scripts/bench_tuning.py --model det --trials 256 --runs 30
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import tvm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import MODELS, _vm_runner  # noqa: E402

import tvm_compress  # noqa: E402
from tvm_compress.passes import Fold  # noqa: E402
from tvm_compress.pipeline import Lower, Schedule  # noqa: E402
from tvm_compress.targets import get_target  # noqa: E402
from tvm_compress.tuning import SCHEDULERS  # noqa: E402
from tvm_compress.verify import ort_session  # noqa: E402


BLOCK = 10


def _lowered(model: str, profile):
    get_path, shapes = MODELS[model]
    return Lower(profile)(Fold()(tvm_compress.prepare_onnx(get_path(), shapes).to_relax()))


def _tune(model: str, target: str, trials: int, scheduler: str, work: str) -> dict:
    """In a child process: tune from scratch into ``work``; the tuning summary and wall time."""
    profile = get_target(target)
    t0 = time.monotonic()
    mod = Schedule(profile, trials, Path(work), scheduler=scheduler,
                   log=lambda m: print("  " + str(m), flush=True) if "trials over" in str(m) else None)(
        _lowered(model, profile))
    return {**json.loads(str(mod.attrs["tvm_compress.tuning"])), "wall_s": round(time.monotonic() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="cls")
    ap.add_argument("--trials", type=int, default=128)
    ap.add_argument("--target", default="x86")
    ap.add_argument("--schedulers", default="gradient,round-robin", help=f"from {', '.join(SCHEDULERS)}")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out-dir", default="bench-out/tuning")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)

    get_path, shapes = MODELS[args.model]
    path = get_path()
    profile = get_target(args.target)
    prepared = tvm_compress.prepare_onnx(path, shapes)
    target = profile.tvm_target()
    x = np.random.default_rng(0).random(prepared.inputs[0].shape, dtype=np.float32)
    sess = ort_session(path, threads=2)
    feed = {prepared.inputs[0].name: x}
    ref = sess.run(None, feed)[0]
    runners = {"onnxruntime fp32 (2 threads)": lambda: sess.run(None, feed)}
    rows = {}
    spawn = multiprocessing.get_context("spawn")
    for scheduler in args.schedulers.split(","):
        work = Path(args.out_dir) / f"{args.model}-{args.target}-{args.trials}-{scheduler}"
        shutil.rmtree(work, ignore_errors=True)  # from an empty database, every time
        print(f"{args.model}: tuning {args.trials} trials with the {scheduler} scheduler", flush=True)
        with spawn.Pool(1) as pool:
            summary = pool.apply(_tune, (args.model, args.target, args.trials, scheduler, str(work)))
        # Here only the records are applied: the budget is in the database already.
        mod = Schedule(profile, args.trials, work)(_lowered(args.model, profile))
        vm = _vm_runner(tvm.compile(mod, target), x)
        out = vm().numpy()
        label = f"TVM, {args.trials} trials, {summary['scheduler']}"
        runners[label] = vm
        rows[label] = {"scheduler": summary["scheduler"], "tuning_s": summary["wall_s"],
                       "rel_err": float(np.abs(out - ref).max() / np.abs(ref).max()),
                       "first_estimate_ms": summary["first_estimate_ms"], "estimate_ms": summary["estimate_ms"]}

    times = {k: [] for k in runners}
    for fn in runners.values():
        fn()
    for _ in range(args.runs):
        for k, fn in runners.items():
            # A block of calls per variant: one engine's pool still spinning after its call
            # must not land on another engine's timed call (seen here: 100x on 2 cores).
            for _ in range(BLOCK):
                t = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t) * 1e3)
    ort_ms = float(np.median(times["onnxruntime fp32 (2 threads)"]))
    print(f"\n{args.model} ({args.target}), {args.trials} trials, {args.runs} interleaved rounds of {BLOCK} runs\n")
    print("| variant | tuning s | estimate after first rounds ms | final estimate ms | median ms | "
          "time / onnxruntime |")
    print("|---|---:|---:|---:|---:|---:|")
    table = []
    for k, ts in times.items():
        med = float(np.median(ts))
        r = {"variant": k, "median_ms": med, "x_vs_onnxruntime": med / ort_ms, **rows.get(k, {})}
        table.append(r)
        fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"| {k} | {r.get('tuning_s', '')} | {fmt(r.get('first_estimate_ms'))} | "
              f"{fmt(r.get('estimate_ms'))} | {med:.3f} | {med / ort_ms:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
