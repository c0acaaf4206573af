#!/usr/bin/env python
"""Float builds with dense weights as stored (``[K, N]``) against packed in column panels
(``targets/packed_dense.py``).

For each model: two float libraries, identical but for the preset feature ``pack_dense``
(default schedules), each verified against onnxruntime by ``compile``; then ``bench_libs.py``
times both next to onnxruntime fp32, each engine in its own process, in interleaved rounds.

    python scripts/bench_packed_dense.py --out out/packed --target x86 --models mm1,mm2,gemv,vit,rec,demo

Models: ``mm1``/``mm2``, one MatMul + Add of a ViT-S MLP (197 tokens, 384 -> 1536 and
1536 -> 384; random weights, seed 0); ``gemv``, a batch-1 Gemm (transB) 2048 -> 512 + Relu;
``vit``, two ViT-S blocks (``bench_fast_math.py``'s); ``rec``, ``demo`` and the others of
``bench_cpu.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))


def _dense_model(path: Path, rows: int, inner: int, columns: int, gemm: bool = False) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((inner, columns)).astype(np.float32) * inner ** -0.5
    b = rng.standard_normal(columns).astype(np.float32)
    if gemm:  # nn.Linear as exported for 2-D inputs: the weight transposed
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["t"], transB=1), helper.make_node("Relu", ["t"], ["y"])]
        inits = [numpy_helper.from_array(np.ascontiguousarray(w.T), "w"), numpy_helper.from_array(b, "b")]
        shape_in, shape_out = [rows, inner], [rows, columns]
    else:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["t"]), helper.make_node("Add", ["t", "b"], ["y"])]
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
        shape_in, shape_out = [1, rows, inner], [1, rows, columns]
    graph = helper.make_graph(nodes, path.stem, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape_in)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape_out)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/packed")
    ap.add_argument("--target", default="x86")
    ap.add_argument("--models", default="mm1,mm2,gemv,vit,rec,demo")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args(argv)

    import tvm_compress
    from bench_cpu import MODELS
    from bench_fast_math import _vit_model
    from tvm_compress.targets import get_target

    made = {
        "mm1": lambda out: (_dense_model(out / "mm1.onnx", 197, 384, 1536), {"x": (1, 197, 384)}),
        "mm2": lambda out: (_dense_model(out / "mm2.onnx", 197, 1536, 384), {"x": (1, 197, 1536)}),
        "gemv": lambda out: (_dense_model(out / "gemv.onnx", 1, 2048, 512, gemm=True), {"x": (1, 2048)}),
        "vit": lambda out: (_vit_model(out / "vit.onnx"), {"x": (1, 197, 384)}),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    profile = get_target(args.target)
    for key in args.models.split(","):
        if key in made:
            path, shapes = made[key](out)
        else:
            get_path, shapes = MODELS[key]
            path = get_path()
        libs = {}
        for name, on in (("as_stored", False), ("packed", True)):
            variant = dataclasses.replace(profile, features={**profile.features, "pack_dense": on})
            lib = out / f"{key}_{name}.so"
            rep = tvm_compress.compile(path, lib, target=variant, input_shapes=shapes, bench_runs=0,
                                       log=lambda m: None)
            err = rep.get("max_rel_err")
            print(f"{key} {name}: {lib}, max rel err vs onnxruntime {err if err is None else f'{err:.2e}'}",
                  flush=True)
            libs[name] = lib
        shape = ",".join(str(d) for d in next(iter(shapes.values())))
        cmd = [sys.executable, str(REPO / "scripts" / "bench_libs.py"), "--target", args.target,
               "--rounds", str(args.rounds), "--runs", str(args.runs), "--shape", shape,
               *(["--onnx", str(path)] if key in made else ["--model", key]),
               *(f"{n}={p}" for n, p in libs.items())]
        subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
