#!/usr/bin/env python
"""Time compiled libraries against onnxruntime on an idle CPU and with other processes keeping
every core busy, with TVM's thread-pool workers spinning between kernels (TVM's default) and
sleeping (``TVM_THREAD_POOL_SPIN_COUNT=0``).

Every engine runs in a process of its own (``tvm-compress bench``'s engine workers); the busy
processes are plain Python loops, one per core unless ``--busy`` says otherwise.

    python scripts/bench_under_load.py --onnx rnet.onnx --target x86-avx2 rnet=rnet.so
    python scripts/bench_under_load.py --model demo --busy 1 demo=demo.so
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import MODELS, prepared_model  # noqa: E402

from tvm_compress._threads import physical_cores  # noqa: E402
from tvm_compress.bench import _Engine, _Worker  # noqa: E402

SPIN = "TVM_THREAD_POOL_SPIN_COUNT"


def _workers(engines, inputs: Path, log: Path):
    """One process per engine; a TVM engine's pool reads ``SPIN`` from the environment it starts in."""
    workers = []
    for engine, spin in engines:
        saved = os.environ.get(SPIN)
        if spin is not None:
            os.environ[SPIN] = spin
        try:
            workers.append(_Worker(engine, inputs, log))
        finally:
            if saved is None:
                os.environ.pop(SPIN, None)
            else:
                os.environ[SPIN] = saved
    return workers


def _time(workers, rounds: int, runs: int) -> dict:
    times = {w.engine.name: [] for w in workers}
    for _ in range(rounds):
        for w in workers:
            times[w.engine.name] += w.ask({"op": "time", "runs": runs, "warmup": 3})["times_ms"]
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("libs", nargs="+", metavar="NAME=LIB.so")
    ap.add_argument("--model", choices=sorted(MODELS), default="demo")
    ap.add_argument("--onnx", help="another model file (one input; give --shape if it is dynamic)")
    ap.add_argument("--shape", help="the input's shape, e.g. 1,3,224,224")
    ap.add_argument("--target", default="x86")
    ap.add_argument("--busy", type=int, default=0, help="busy processes (default: one per core)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=30, help="calls per engine per round")
    args = ap.parse_args(argv)

    path, prepared = prepared_model(args.model, args.onnx, args.shape)
    spec = prepared.inputs[0]
    rng = np.random.default_rng(0)
    x = rng.random(spec.shape, dtype=np.float32) if spec.dtype.startswith("float") else \
        rng.integers(0, 256, spec.shape).astype(spec.dtype)
    engines = [(_Engine("onnxruntime fp32 (2 threads)", "ort", str(path)), None)]
    for name, lib in (text.split("=", 1) for text in args.libs):
        for label, spin in (("spinning workers", None), ("sleeping workers", "0")):
            engines.append((_Engine(f"{name}, {label}", "tvm", str(Path(lib).resolve()), args.target), spin))
    busy_count = args.busy or physical_cores()
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp, "inputs.npz")
        np.savez(inputs, **{spec.name: x})
        workers = _workers(engines, inputs, Path(tmp, "engines.log"))
        try:
            idle = _time(workers, args.rounds, args.runs)
            hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy_count)]
            try:
                busy = _time(workers, args.rounds, args.runs)
            finally:
                for h in hogs:
                    h.kill()
        finally:
            for w in workers:
                w.close()
    print(f"\n{Path(path).name}, {args.rounds} rounds x {args.runs} calls per engine; busy: {busy_count} "
          f"processes spinning\n")
    print("| engine | idle median ms | busy median ms | busy p90 ms | busy / idle |")
    print("|---|---:|---:|---:|---:|")
    for name in idle:
        a, b = float(np.median(idle[name])), float(np.median(busy[name]))
        print(f"| {name} | {a:.3f} | {b:.3f} | {float(np.percentile(busy[name], 90)):.3f} | {b / a:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
