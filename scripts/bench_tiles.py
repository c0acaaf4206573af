#!/usr/bin/env python
"""Default-schedule kernels of this tree against those of another commit's
``targets/cpu_schedule.py``: channels-last convs (+ bias + SiLU), packed dense products and
softmaxes along an axis, each built both ways, timed interleaved in one process (fastest of
``--rounds`` x 3 batches of 10 calls each, TVM's time evaluator), outputs checked equal.

    python scripts/bench_tiles.py --base 8cf5e6f [--target x86] [--rounds 5]

Shapes: the 3x3 convs and flattened 1x1 convs (dense) of YOLOv8n at 320x320 and ddddocr's
YOLOX detector at 416x416, two of the PP-OCRv4 detector's, and YOLOv8's box-head softmax.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# (map height, width, in channels, out channels, kernel, stride)
CONVS = [
    (52, 52, 96, 96, 3, 1), (26, 26, 96, 96, 3, 1), (13, 13, 192, 192, 3, 1),
    (26, 26, 192, 384, 3, 2), (208, 208, 12, 24, 3, 1), (52, 52, 48, 48, 3, 1),
    (40, 40, 64, 64, 3, 1), (20, 20, 64, 64, 3, 1), (10, 10, 128, 128, 3, 1),
    (80, 80, 96, 24, 3, 1), (20, 20, 96, 24, 3, 1),
]
# (rows = pixels of the flattened map, in channels, out channels)
DENSE = [(2704, 96, 96), (676, 192, 192), (169, 384, 384), (170, 384, 384), (197, 384, 1536)]
SOFTMAX = [((1, 16, 4, 2100), 1), ((1, 80, 8400), 1)]


def _base_module(commit: str):
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:targets/cpu_schedule.py"],
                            check=True, capture_output=True, text=True).stdout
    # the module's one relative import, made absolute so that it loads from a temp file
    source = source.replace("from .default_schedule", "from tvm_compress.targets.default_schedule")
    path = Path(tempfile.mkdtemp()) / "cpu_schedule_base.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("cpu_schedule_base", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _conv(h, w, ci, co, k, s):
    import tvm
    from tvm import te, topi

    x = te.placeholder((1, h, w, ci), "float32", name="x")
    wt = te.placeholder((k, k, ci, co), "float32", name="w")
    b = te.placeholder((1, 1, 1, co), "float32", name="b")
    c = topi.nn.conv2d_nhwc(x, wt, s, k // 2, 1)
    y = te.compute(c.shape, lambda *i: (c(*i) + b[0, 0, 0, i[3]]) * tvm.tirx.sigmoid(c(*i) + b[0, 0, 0, i[3]]),
                   name="act")
    macs = int(np.prod([int(v) for v in y.shape])) * ci * k * k
    return f"conv {k}x{k} s{s} {ci}->{co} @{h}x{w}", [x, wt, b, y], macs


def _dense(m, k, n):
    import tvm
    from tvm import te

    from tvm_compress.targets.packed_dense import packed_dense, panel_width

    panel = panel_width(n, 8) or n
    x = te.placeholder((1, m, k), "float32", name="x")
    wt = te.placeholder((n // panel, k, panel), "float32", name="w")
    b = te.placeholder((n,), "float32", name="b")
    c = packed_dense(x, wt)
    y = te.compute(c.shape, lambda *i: (c(*i) + b[i[-1]]) * tvm.tirx.sigmoid(c(*i) + b[i[-1]]), name="act")
    return f"dense {m}x{k}->{n}", [x, wt, b, y], m * k * n


def _softmax(shape, axis):
    from tvm import te, topi

    a = te.placeholder(shape, "float32", name="a")
    return f"softmax {'x'.join(map(str, shape))} axis {axis}", [a, topi.nn.softmax(a, axis=axis)], None


def fastest_interleaved(libs, args_per_lib, rounds: int) -> list:
    """Seconds per call of each compiled ``main``: the fastest of ``rounds`` x 3 batches of 10
    calls, the libraries taking turns round by round (both see the same machine state)."""
    import tvm

    best = [float("inf")] * len(libs)
    for _ in range(rounds):
        for i, lib in enumerate(libs):
            timer = lib.mod.time_evaluator("main", tvm.cpu(), number=10, repeat=3)
            best[i] = min(best[i], min(timer(*args_per_lib[i]).results))
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="commit whose targets/cpu_schedule.py is the baseline")
    ap.add_argument("--target", default="x86")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)

    import tvm
    from tvm import te

    import tvm_compress  # noqa: F401  (thread pool set-up before TVM runs anything)
    from tvm_compress.targets import get_family, get_target
    from tvm_compress.targets.cpu_schedule import CPUFallback

    profile = get_target(args.target)
    target = profile.tvm_target()
    lanes = get_family(profile.family).vector_lanes(profile)
    base = _base_module(args.base)
    cases = [_conv(*c) for c in CONVS] + [_dense(*d) for d in DENSE] + [_softmax(*s) for s in SOFTMAX]
    rng = np.random.default_rng(0)
    print(f"| kernel | {args.base} us | this tree us | speed-up | GMAC/s (this tree) |")
    print("|---|---:|---:|---:|---:|")
    for name, tensors, macs in cases:
        func = te.create_prim_func(tensors)
        libs = []
        for rule in (base.CPUFallback(lanes=lanes), CPUFallback(lanes=lanes)):
            sch = rule.apply(func, target, False)
            libs.append(tvm.compile(sch.mod if sch is not None else tvm.IRModule({"main": func}), target))
        ins = [tvm.runtime.tensor(rng.standard_normal([int(v) for v in t.shape]).astype("float32"))
               for t in tensors[:-1]]
        outs = [tvm.runtime.tensor(np.zeros([int(v) for v in tensors[-1].shape], "float32")) for _ in libs]
        best = fastest_interleaved(libs, [[*ins, out] for out in outs], args.rounds)
        np.testing.assert_allclose(outs[1].numpy(), outs[0].numpy(), rtol=1e-4, atol=1e-4)
        rate = f"{macs / best[1] / 1e9:.1f}" if macs else ""
        print(f"| {name} | {best[0] * 1e6:.1f} | {best[1] * 1e6:.1f} | {best[0] / best[1]:.2f}x | {rate} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
