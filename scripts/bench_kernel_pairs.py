#!/usr/bin/env python
"""Two builds of one model, kernel by kernel: the ratio of each kernel call's time (A / B).

For a schedule change that keeps the kernel list (same fusion): every kernel call of one run
of A is timed against the same call of B, alternating, ``--rounds`` times (each time the
fastest of ``--repeat`` batches of about 1 ms, ``bench_int8._time_call``); the table lists the
median ratio per call, slowest first, and the sums of the fastest times.

    python scripts/bench_kernel_pairs.py before.so after.so --shape 1,3,320,320 --rounds 5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tvm_compress  # noqa: E402,F401  (sets up tvm before bench_int8 imports it)
from bench_int8 import _kernel_calls, _time_call  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="library A (e.g. before)")
    ap.add_argument("b", help="library B (e.g. after)")
    ap.add_argument("--shape", required=True, help="the float32 input's shape, e.g. 1,3,320,320")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=7, help="batches per timing (the fastest counts)")
    ap.add_argument("--match", default="", help="only kernels whose name contains this")
    args = ap.parse_args(argv)
    x = np.random.default_rng(0).standard_normal([int(v) for v in args.shape.split(",")]).astype("float32")
    calls_a, calls_b = _kernel_calls(args.a, x), _kernel_calls(args.b, x)
    if len(calls_a) != len(calls_b):
        print(f"error: the builds run different kernels ({len(calls_a)} and {len(calls_b)} calls)")
        return 1
    rows = []
    for a, b in zip(calls_a, calls_b):
        if args.match not in a[1]:
            continue
        ta, tb = [], []
        for _ in range(args.rounds):
            ta.append(_time_call(a, repeat=args.repeat))
            tb.append(_time_call(b, repeat=args.repeat))
        ratio = float(np.median(np.array(ta) / np.array(tb)))
        rows.append((ratio, min(ta), min(tb), a[1], tuple(a[2][0].shape)))
    print("| A / B (B faster > 1) | A us | B us | kernel (A's name) | first input |")
    print("|---:|---:|---:|---|---|")
    for ratio, ta, tb, name, shape in sorted(rows):
        print(f"| {ratio:.2f}x | {ta * 1e3:.2f} | {tb * 1e3:.2f} | {name[:60]} | {shape} |")
    sa, sb = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"\n{len(rows)} calls; sum of the fastest times: A {sa * 1e3:.1f} us, B {sb * 1e3:.1f} us ({sa / sb:.3f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
