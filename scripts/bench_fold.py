#!/usr/bin/env python3
"""What ``fold`` does on real models: ops folded and removed, refusals, what is left to fold,
Relax calls and kernel launches per run (after lowering and fusion) before/after, and how far
the outputs move.

    python scripts/bench_fold.py [--target x86-avx2]

Models: the demo model, the PP-OCRv4 detector and recognizer, the PP-OCR angle classifier, and a
torch model exported with its batch norms unfused (``tests/test_fold.py`` builds the same
kind). The output change is measured on one seeded input in [-1, 1], host builds, relative to
the unfolded output's range.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from bench_data import rapidocr_models  # noqa: E402


def _models(tmp: Path):
    from test_fold import _torch_bn_model

    m = rapidocr_models()
    return [
        ("demo", REPO / "tvm_compress" / "data" / "fashion_cnn.onnx", {"input": (1, 1, 28, 28)}),
        ("PP-OCRv4 det", m / "ch_PP-OCRv4_det_infer.onnx", {"x": (1, 3, 320, 320)}),
        ("PP-OCRv4 rec", m / "ch_PP-OCRv4_rec_infer.onnx", {"x": (1, 3, 48, 320)}),
        ("PP-OCR cls", m / "ch_ppocr_mobile_v2.0_cls_infer.onnx", {"x": (1, 3, 48, 192)}),
        ("torch, unfused BN", _torch_bn_model(tmp / "bn.onnx"), {"x": (1, 3, 6, 6)}),
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="x86-avx2")
    args = ap.parse_args(argv)

    import tvm
    from tvm import relax

    import tvm_compress
    from tvm_compress.pass_registry import PassEnv
    from tvm_compress.passes import Fold
    from tvm_compress.passes.fold import foldable_left
    from tvm_compress.pipeline import lowering_passes
    from tvm_compress.targets import get_target

    profile = get_target(args.target)

    def counts(mod):
        ops = []
        relax.analysis.post_order_visit(mod["main"], lambda e: ops.append(1) if isinstance(e, relax.Call) else None)
        with profile.tvm_target():
            lowered = tvm.transform.Sequential(lowering_passes(profile))(mod)
        # Kernel launches per run (call_tir in main), not distinct kernels: fusion may dedupe
        # fewer of them after folding while the model launches fewer.
        call_tir = tvm.ir.Op.get("relax.call_tir")
        launches = []
        relax.analysis.post_order_visit(
            lowered["main"], lambda e: launches.append(1) if isinstance(e, relax.Call) and e.op == call_tir else None)
        return len(ops), len(launches)

    def run(mod, x):
        vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
        return vm["main"](tvm.runtime.tensor(x)).numpy()

    print("| model | ops folded | ops removed | refused | left to fold | Relax calls | kernel launches | output change |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, path, shapes in _models(Path(tmp)):
            base = tvm_compress.load_onnx(path, shapes)
            env = PassEnv()
            mod = Fold(env=env)(base)
            rep = env.report["fold"]
            (c0, k0), (c1, k1) = counts(base), counts(mod)
            x = np.random.default_rng(0).uniform(-1, 1, next(iter(shapes.values()))).astype("float32")
            a, b = run(base, x), run(mod, x)
            change = float(np.abs(a - b).max() / max(a.max() - a.min(), 1e-30))
            print(f"| {label} | {rep['ops_folded']} | {rep['ops_removed']} | {len(rep['refused'])} | "
                  f"{len(foldable_left(mod))} | {c0} -> {c1} | {k0} -> {k1} | {change:.1e} |", flush=True)


if __name__ == "__main__":
    main()
