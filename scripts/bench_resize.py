#!/usr/bin/env python
"""Bilinear NCHW upsampling: the legalized resize (TOPI's, four gathered pixels per output)
against the two-pass kernel of ``targets/separable_resize.py``, each kernel alone under the
default CPU schedule, timed with TVM's time evaluator (median of ``--repeat`` batches). Also
checks that both give the same bits.

    python scripts/bench_resize.py --target x86-avx2

Shapes: a segmentation head's 8x upsampling of 21 classes to 320x320 (LR-ASPP, DeepLabV3),
an FPN-style 2x of 128 channels on a 20x20 map, and a 2x of 64 channels to 160x160.
"""

from __future__ import annotations

import argparse

import numpy as np

import tvm_compress  # noqa: F401  (TVM with the project's setup)
import tvm
from tvm import te, topi
from tvm_compress.targets import get_family, get_target
from tvm_compress.targets.cpu_schedule import CPUFallback
from tvm_compress.targets.separable_resize import separable_resize2d

SHAPES = (((1, 21, 40, 40), (320, 320)), ((1, 128, 20, 20), (40, 40)), ((1, 64, 80, 80), (160, 160)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="x86-avx2", help="an x86 preset that runs here")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args(argv)
    profile = get_target(args.target)
    target = profile.tvm_target()
    lanes = get_family(profile.family).vector_lanes(profile)
    print(f"| resize ({args.target}) | legalized ms | two-pass ms | speed-up |\n|---|---:|---:|---:|")
    for shape, size in SHAPES:
        x = te.placeholder(shape, "float32", name="x")
        xv = tvm.runtime.tensor(np.random.default_rng(0).standard_normal(shape).astype("float32"))
        ms, outs = {}, {}
        for name, y in (("legalized", topi.image.resize2d(x, [0.0] * 4, size, "NCHW", "linear", "half_pixel")),
                        ("two-pass", separable_resize2d(x, *size, "half_pixel"))):
            sch = CPUFallback(lanes=lanes).apply(te.create_prim_func([x, y]), target, False)
            lib = tvm.compile(sch.mod, target)
            out = tvm.runtime.tensor(np.zeros((*shape[:2], *size), "float32"))
            timer = lib.mod.time_evaluator("main", tvm.cpu(), number=10, repeat=args.repeat)
            ms[name] = float(np.median(timer(xv, out).results)) * 1e3
            outs[name] = out.numpy()
        same = "" if np.array_equal(outs["legalized"], outs["two-pass"]) else " (OUTPUTS DIFFER)"
        print(f"| {'x'.join(map(str, shape[1:]))} -> {size[0]}x{size[1]} | {ms['legalized']:.3f} | "
              f"{ms['two-pass']:.3f} | {ms['legalized'] / ms['two-pass']:.2f}x{same} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
