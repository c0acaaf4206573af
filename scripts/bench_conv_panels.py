#!/usr/bin/env python
"""Channels-last convs (+ bias + SiLU) on the default CPU schedule with their weight as HWIO
against the same conv reading it in column panels ``[O / P, KH, KW, I, P]``
(``targets/packed_dense.py``): each built both ways, timed interleaved in one process (fastest
of ``--rounds`` x 3 batches of 10 calls, TVM's time evaluator), outputs checked equal.

    python scripts/bench_conv_panels.py [--target x86] [--rounds 5]

Shapes: 3x3 convs of ddddocr's YOLOX detector at 416x416, YOLOv8n at 320x320 and ResNet-18/50
at 224x224.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from bench_tiles import fastest_interleaved

# (map height = width, in channels, out channels, kernel, stride)
CONVS = [
    (26, 192, 384, 3, 2), (13, 192, 192, 3, 1), (52, 96, 96, 3, 1), (26, 96, 96, 3, 1),
    (208, 12, 24, 3, 1), (104, 48, 96, 3, 2), (80, 96, 24, 3, 1), (20, 128, 128, 3, 1),
    (56, 64, 64, 3, 1), (28, 128, 128, 3, 1), (14, 256, 256, 3, 1), (7, 512, 512, 3, 1),
    (28, 256, 512, 3, 2),
]


def _case(size, ci, co, k, s, lanes):
    import tvm
    from tvm import te, topi

    from tvm_compress.targets.packed_dense import packed_conv2d_nhwc, panel_width

    panel = panel_width(co, lanes)
    x = te.placeholder((1, size, size, ci), "float32", name="x")
    b = te.placeholder((1, 1, 1, co), "float32", name="b")

    def silu(c):
        return te.compute(c.shape, lambda *i: (c(*i) + b[0, 0, 0, i[3]]) * tvm.tirx.sigmoid(c(*i) + b[0, 0, 0, i[3]]),
                          name="act")

    hwio = te.placeholder((k, k, ci, co), "float32", name="w")
    panels = te.placeholder((co // panel, k, k, ci, panel), "float32", name="w")
    pad = [k // 2] * 4
    funcs = [te.create_prim_func([x, hwio, b, silu(topi.nn.conv2d_nhwc(x, hwio, s, k // 2, 1))]),
             te.create_prim_func([x, panels, b, silu(packed_conv2d_nhwc(x, panels, [s, s], pad, [1, 1]))])]
    out = (size + 2 * (k // 2) - k) // s + 1
    return f"conv {k}x{k} s{s} {ci}->{co} @{size}x{size}", funcs, panel, (1, out, out, co)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="x86")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)

    import tvm

    import tvm_compress  # noqa: F401  (thread pool set-up before TVM runs anything)
    from tvm_compress.targets import get_family, get_target
    from tvm_compress.targets.cpu_schedule import CPUFallback
    from tvm_compress.targets.packed_dense import pack_conv_weight

    profile = get_target(args.target)
    target = profile.tvm_target()
    lanes = get_family(profile.family).vector_lanes(profile)
    rng = np.random.default_rng(0)
    print("| conv + bias + SiLU | HWIO us | panels us | speed-up | GMAC/s (panels) |")
    print("|---|---:|---:|---:|---:|")
    for size, ci, co, k, s in CONVS:
        name, funcs, panel, out_shape = _case(size, ci, co, k, s, lanes)
        macs = int(np.prod(out_shape)) * ci * k * k
        libs = []
        for func in funcs:
            sch = CPUFallback(lanes=lanes).apply(func, target, False)
            libs.append(tvm.compile(sch.mod if sch is not None else tvm.IRModule({"main": func}), target))
        x, w, b = (rng.standard_normal(shape).astype("float32")
                   for shape in ((1, size, size, ci), (k, k, ci, co), (1, 1, 1, co)))
        wp = pack_conv_weight(w, panel)
        args_ = [[tvm.runtime.tensor(v) for v in (x, weight, b)] + [tvm.runtime.tensor(np.zeros(out_shape, "float32"))]
                 for weight in (w, wp)]
        best = fastest_interleaved(libs, args_, args.rounds)
        np.testing.assert_allclose(args_[1][-1].numpy(), args_[0][-1].numpy(), rtol=1e-4, atol=1e-4)
        print(f"| {name} | {best[0] * 1e6:.1f} | {best[1] * 1e6:.1f} | {best[0] / best[1]:.2f}x | "
              f"{macs / best[1] / 1e9:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
