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
