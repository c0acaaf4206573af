"""HardSwishAsHardSigmoid (passes/hard_swish.py): hard-swish spelled with a division -> the ONNX
definition's multiply-add form; structure, what stays, and numbers against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from onnx import TensorProto, helper
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from tvm_compress.loader import load_onnx
from tvm_compress.passes import HardSwishAsHardSigmoid


def _spelled(form: str, offset=3.0, divisor=6.0):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            z = bb.emit(relax.op.add(x, relax.const(np.float32(offset))))
            if form == "paddle":  # Add, Clip(min, max inputs), Mul, Div as Paddle exports it
                gate = bb.emit(relax.op.minimum(bb.emit(relax.op.maximum(z, relax.const(np.float32(0)))),
                                                relax.const(np.float32(6))))
                y = bb.emit(relax.op.divide(bb.emit(relax.op.multiply(x, gate)), relax.const(np.float32(divisor))))
            else:  # the Relax importer's HardSwish
                gate = bb.emit(relax.op.clip(z, 0, 6))
                y = bb.emit(relax.op.multiply(x, bb.emit(relax.op.divide(gate, relax.const(np.float32(divisor))))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((2, 8), "float32")) -> R.Tensor((2, 8), "float32"):
        with R.dataflow():
            lv = R.multiply(x, R.const(1.0 / 6.0, "float32"))
            lv1 = R.add(lv, R.const(0.5, "float32"))
            lv2 = R.clip(lv1, 0, 1)
            gv = R.multiply(x, lv2)
            R.output(gv)
        return gv


@pytest.mark.parametrize("form", ["paddle", "importer"])
def test_division_form_becomes_the_onnx_definition(form):
    after = relax.transform.DeadCodeElimination()(HardSwishAsHardSigmoid()(_spelled(form)))
    tvm.ir.assert_structural_equal(relax.transform.CanonicalizeBindings()(after), Expected)


@pytest.mark.parametrize("offset, divisor", [(2.0, 6.0), (3.0, 5.0)])
def test_other_constants_stay(offset, divisor):
    before = _spelled("paddle", offset, divisor)
    tvm.ir.assert_structural_equal(HardSwishAsHardSigmoid()(before), before)


def test_imported_model_matches_onnxruntime(tmp_path):
    """Add -> Clip(0, 6) -> Mul -> Div(6) after a conv, as exported: imported without a division,
    the compiled model within float32 rounding of onnxruntime."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, (8, 3, 3, 3), rng.standard_normal((8, 3, 3, 3)).astype("float32").ravel())
    consts = [helper.make_tensor(n, TensorProto.FLOAT, (), [v]) for n, v in
              (("three", 3.0), ("zero", 0.0), ("six", 6.0))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "three"], ["a"]),
             helper.make_node("Clip", ["a", "zero", "six"], ["r"]),
             helper.make_node("Mul", ["c", "r"], ["m"]),
             helper.make_node("Div", ["m", "six"], ["y"])]
    graph = helper.make_graph(nodes, "hs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, 3, 12, 12))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, (1, 8, 12, 12))], [w, *consts])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "hs.onnx"
    onnx.save(model, str(path))

    mod = load_onnx(path)
    calls = [b.value.op.name for blk in mod["main"].body.blocks for b in blk.bindings
             if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op)]
    assert "relax.divide" not in calls and "relax.clip" in calls
    x = (rng.standard_normal((1, 3, 12, 12)) * 3).astype("float32")
    ex = tvm.compile(mod, tvm.target.Target({"kind": "llvm"}))
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
