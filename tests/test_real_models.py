"""Real published models: PP-OCRv4 text detector and angle classifier (rapidocr-onnxruntime 1.4.4).

Both need their input shape fixed and shape subgraphs folded before the Relax importer takes them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import tvm_compress

pytestmark = pytest.mark.slow
# Located without importing it: its __init__ needs OpenCV, which we do not install.
_SPEC = importlib.util.find_spec("rapidocr_onnxruntime")
if _SPEC is None:
    pytest.skip("pip install --no-deps rapidocr-onnxruntime==1.4.4 (make test does)", allow_module_level=True)
MODELS = Path(_SPEC.origin).parent / "models"


@pytest.mark.parametrize(
    "name, shapes",
    [
        ("ch_PP-OCRv4_det_infer.onnx", {"x": (1, 3, 320, 320)}),
        ("ch_ppocr_mobile_v2.0_cls_infer.onnx", {"x": (1, 3, 48, 192)}),
    ],
)
def test_ppocr_compiles_and_matches_onnxruntime(name, shapes, tmp_path):
    path = MODELS / name
    # Image-like input in [-1, 1], as PP-OCR's preprocessing produces.
    x = np.random.default_rng(0).uniform(-1, 1, shapes["x"]).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    rep = tvm_compress.compile(path, tmp_path / "m.so", input_shapes=shapes,
                               verify_input=tmp_path / "in.npz", bench_runs=2, log=lambda m: None)
    assert rep["verified"] and rep["max_rel_err"] < 1e-3
    assert rep["params_before"] > 100_000


def test_ppocr_detector_needs_input_shape():
    from tvm_compress import errors

    with pytest.raises(errors.ShapeError, match="pass --input-shape x="):
        tvm_compress.prepare_onnx(MODELS / "ch_PP-OCRv4_det_infer.onnx")


def test_ppocr_detector_upsampling_head_becomes_1x1_convs():
    """ConvTransposeToConv on the real DB head: both stride-2 transposed convolutions and the
    batch norm between them are gone after import (the compile test above checks the values)."""
    import tvm
    from tvm import relax

    mod = tvm_compress.prepare_onnx(MODELS / "ch_PP-OCRv4_det_infer.onnx", {"x": (1, 3, 320, 320)}).to_relax()
    ops = []
    relax.analysis.post_order_visit(mod["main"], lambda e: ops.append(e.op) if isinstance(e, relax.Call) else None)
    names = {op.name for op in ops if isinstance(op, tvm.ir.Op)}
    assert "relax.nn.conv2d_transpose" not in names
    assert "relax.nn.batch_norm" not in names  # the head's only batch norm, folded into the 1x1 conv
    assert "relax.permute_dims" in names


@pytest.mark.parametrize(
    "name, shapes",
    [
        ("ch_PP-OCRv4_det_infer.onnx", {"x": (1, 3, 320, 320)}),
        ("ch_PP-OCRv4_rec_infer.onnx", {"x": (1, 3, 48, 320)}),
        ("ch_ppocr_mobile_v2.0_cls_infer.onnx", {"x": (1, 3, 48, 192)}),
    ],
)
def test_fold_leaves_nothing_foldable_on_ppocr_and_changes_values_no_more_than_onnxruntime_fusions(name, shapes):
    """Every constant per-channel op next to a layer is folded (what stays is refused with a
    reason: shifts before zero-padded convolutions). Folded weights round differently: the
    outputs move by at most 1e-5 of their range, or, where the model amplifies rounding (the
    detector's sigmoid map), by no more than twice what onnxruntime's own Conv+BN/Mul/Add
    fusions move them (its basic optimizations against none, same input)."""
    import onnxruntime as ort
    import tvm
    from tvm import relax

    from tvm_compress.pass_registry import PassEnv
    from tvm_compress.passes import Fold
    from tvm_compress.passes.fold import foldable_left

    path = MODELS / name
    env = PassEnv()
    base = tvm_compress.load_onnx(path, shapes)
    mod = Fold(env=env)(base)
    report = env.report["fold"]
    # (hard-swish's "/ 6" is no separate op since the import's HardSwishAsHardSigmoid: the
    # classifier's count went from 27 to 18)
    assert foldable_left(mod) == [] and report["ops_removed"] >= 15
    assert all("zero-padded" in r["reason"] for r in report["refused"])
    x = _text_like(shapes["x"])
    no_opt = ort.SessionOptions()
    no_opt.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref, ref_fused = (ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
                      for o in (no_opt, ort.SessionOptions()))
    assert ref.max() - ref.min() > 0.2  # the models respond to it (the detector finds "text")

    def run(m):
        return relax.VirtualMachine(tvm.compile(m, "llvm"), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()

    def rel(a, b):
        return float(np.abs(a - b).max() / (b.max() - b.min()))

    assert rel(run(mod), run(base)) <= max(1e-5, 2 * rel(ref_fused, ref))


def _text_like(shape) -> np.ndarray:
    """Dark letter-like strokes on white, normalized as PP-OCR does: inputs the models respond to."""
    rng = np.random.default_rng(0)
    n, c, h, w = shape
    img = np.ones((h, w), np.float32)
    for r in range(h // 8, h - 20, max(h // 8, 24)):
        for col in range(8, w - 12, 14):
            if rng.random() < 0.8:
                img[r:r + 18, col:col + 3] = 0
                img[r:r + 3, col:col + 10] = 0
                img[r + 15:r + 18, col:col + 10] = 0
    return np.repeat(((img - 0.5) / 0.5)[None, None], c, 1).repeat(n, 0).astype(np.float32)
