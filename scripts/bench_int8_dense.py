#!/usr/bin/env python
"""Dense layers in int8 on the packed dot kernels against the float build's dense kernels.

For each shape ``[..., K] x [K, N]``: one int8 matmul (int8 x int8 -> int32, a float scale
after it) lowered for the target (``PackInt8Conv`` packs it: ``int8_conv.packed_matmul``) and
the same matmul in float32 (``packed_dense`` panels), each compiled with default schedules;
the kernels are timed alternately in one process, the fastest of several batches each, and
the int8 outputs are checked against int64 numpy.

    python scripts/bench_int8_dense.py --target x86-avx2

Shapes: the demo's 576 -> 128 dense layer, a transformer block's projection (128 tokens,
256 -> 256) and MLP (64 tokens, 512 -> 2048), a 1280 -> 1000 classifier head.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

SHAPES = {"demo-fc": ((1, 576), 128), "proj": ((1, 128, 256), 256), "mlp": ((1, 64, 512), 2048),
          "head": ((1, 1280), 1000)}


def _module(x_shape, w, dtype):
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.const(w.astype(dtype if dtype == "float32" else "int8")),
                                        out_dtype="float32" if dtype == "float32" else "int32"))
            y = bb.emit(relax.op.multiply(relax.op.astype(y, "float32"), relax.const(np.float32(0.5))))
            gv = bb.emit_output(y)
        bb.emit_func_output(gv)
    return bb.get()


def _build(mod, profile, path):
    import tvm
    from tvm_compress import pipeline

    target = profile.tvm_target()
    with target:
        lowered = tvm.transform.Sequential(pipeline.lowering_passes(profile))(mod)
    tvm.compile(pipeline.Schedule(profile)(lowered), target).export_library(str(path))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="x86-avx2")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)

    import tvm
    import tvm_compress  # noqa: F401  (registers the families)
    from tvm import relax
    from tvm_compress.targets import get_target
    from tvm_compress.targets.int8_pack import target_kernel
    from bench_int8 import _kernel_calls, _time_call

    profile = get_target(args.target)
    kernel = target_kernel(profile)
    print(f"target {args.target}: int8 kernel {kernel.name if kernel else None}")
    print("| shape | int8 us | float us | float / int8 |")
    print("|---|---:|---:|---:|")
    tmp = Path(tempfile.mkdtemp())
    for name in args.shapes.split(","):
        x_shape, n = SHAPES[name]
        rng = np.random.default_rng(0)
        x = rng.integers(-128, 128, x_shape).astype("int8")
        w = rng.integers(-64, 65, (x_shape[-1], n)).astype(np.int8)  # fits pmaddubsw's pairs
        libs = {}
        for dtype in ("int8", "float32"):
            libs[dtype] = tmp / f"{name}_{dtype}.so"
            _build(_module(x_shape, w, dtype), profile, libs[dtype])
        got = relax.VirtualMachine(tvm.runtime.load_module(str(libs["int8"])), tvm.cpu())["main"](
            tvm.runtime.tensor(x)).numpy()
        ref = (x.astype(np.int64) @ w.astype(np.int64)).astype(np.float32) * np.float32(0.5)
        assert np.array_equal(got, ref), f"{name}: int8 output differs from numpy"
        calls = {"int8": _kernel_calls(libs["int8"], x), "float32": _kernel_calls(libs["float32"], x.astype("float32"))}
        times = {k: float("inf") for k in calls}
        for _ in range(args.rounds):  # alternating, so both see the same machine state
            for k, cs in calls.items():
                times[k] = min(times[k], sum(_time_call(c) for c in cs) * 1e3)
        print(f"| {name} {x_shape} x {n} | {times['int8']:.2f} | {times['float32']:.2f} | "
              f"{times['float32'] / times['int8']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
