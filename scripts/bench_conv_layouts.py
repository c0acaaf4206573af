#!/usr/bin/env python
"""One conv (+ bias + relu) at a time, NCHW against NHWC, both on the default CPU schedule.

What ``targets/channels_last.py`` decides per model comes from a lane-use estimate; this
measures the two layouts per conv shape (the PP-OCRv4 detector's and the demo model's shapes by
default), interleaved in one process, each kernel timed by TVM's time evaluator, outputs
checked equal.

    python scripts/bench_conv_layouts.py [--target x86-avx2] [--rounds 15]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import tvm
from tvm import relax

from tvm_compress.pipeline import lowering_passes
from tvm_compress.targets import get_family, get_target
from tvm_compress.targets.channels_last import channels_last_gain
from tvm_compress.targets.cpu_schedule import cpu_default_schedule

# name, in channels, out channels, map size, kernel, stride, groups
SHAPES = [
    ("det 1x1 16->32 @160", 16, 32, 160, 1, 1, 1),
    ("det 1x1 96->96 @40", 96, 96, 40, 1, 1, 1),
    ("det 1x1 192->192 @20", 192, 192, 20, 1, 1, 1),
    ("det 1x1 384->384 @10", 384, 384, 10, 1, 1, 1),
    ("det dw 3x3 s2 32 @160", 32, 32, 160, 3, 2, 32),
    ("det dw 3x3 48 @80", 48, 48, 80, 3, 1, 48),
    ("det dw 5x5 192 @20", 192, 192, 20, 5, 1, 192),
    ("det 3x3 96->24 @80", 96, 24, 80, 3, 1, 1),
    ("det 3x3 s2 3->16 @320", 3, 16, 320, 3, 2, 1),
    ("demo 3x3 16->32 @14", 16, 32, 14, 3, 1, 1),
    ("demo 3x3 32->64 @7", 32, 64, 7, 3, 1, 1),
]


def conv_module(cin, cout, hw, k, stride, groups, nhwc: bool):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((cout, cin // groups, k, k)).astype("float32")
    b = rng.standard_normal((1, cout, 1, 1)).astype("float32")
    shape = (1, hw, hw, cin) if nhwc else (1, cin, hw, hw)
    if nhwc:
        w, b = w.transpose(2, 3, 1, 0).copy(), b.reshape(1, 1, 1, cout)
    layout = dict(data_layout="NHWC", kernel_layout="HWIO") if nhwc else {}
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), strides=stride, padding=k // 2, groups=groups,
                                           **layout))
            y = bb.emit(relax.op.nn.relu(relax.op.add(y, relax.const(b))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="x86")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    profile = get_target(args.target)
    target = profile.tvm_target()
    lanes = get_family(profile.family).vector_lanes(profile)
    print(f"{args.target}: {lanes} float32 lanes, {args.rounds} rounds of 10 calls per kernel\n")
    print("| conv | NCHW ms | NHWC ms | NHWC / NCHW | estimated gain of the rewrite |")
    print("|---|---:|---:|---:|---:|")
    for name, cin, cout, hw, k, stride, groups in SHAPES:
        x = np.random.default_rng(1).standard_normal((1, cin, hw, hw)).astype("float32")
        feeds = [tvm.runtime.tensor(x), tvm.runtime.tensor(x.transpose(0, 2, 3, 1).copy())]
        timers, outs = [], []
        for nhwc, feed in zip((False, True), feeds):
            with target:
                mod = tvm.transform.Sequential(lowering_passes())(conv_module(cin, cout, hw, k, stride, groups, nhwc))
                mod = tvm.transform.Sequential(cpu_default_schedule(lanes))(mod)
            vm = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
            out = vm["main"](feed).numpy()
            outs.append(out.transpose(0, 3, 1, 2) if nhwc else out)
            timers.append(vm.time_evaluator("main", tvm.cpu(), number=10, repeat=1))
        np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4, atol=1e-3)
        times = [[], []]
        for _ in range(args.rounds):
            for i, timer in enumerate(timers):
                times[i].append(timer(feeds[i]).mean * 1e3)
        a, b = (float(np.median(t)) for t in times)
        estimate = channels_last_gain(conv_module(cin, cout, hw, k, stride, groups, False)["main"], lanes)
        print(f"| {name} | {a:.3f} | {b:.3f} | {b / a:.2f} | {estimate:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
