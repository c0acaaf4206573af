"""ConvTransposeToConv: structure (Before/Expected) and numerics against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from tvm_compress.loader import prepare_onnx
from tvm_compress.passes import ConvTransposeToConv

CONV2D_TRANSPOSE = tvm.ir.Op.get("relax.nn.conv2d_transpose")


def _module(w, x_shape=(1, 4, 5, 6), **attrs):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d_transpose(x, relax.const(w), **attrs))
            gv = bb.emit_output(relax.op.nn.relu(y))
        bb.emit_func_output(gv)
    return bb.get()


def test_stride_sized_kernel_becomes_1x1_conv_and_depth_to_space():
    w = np.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype("float32")  # IOHW
    before = _module(w, strides=2)

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 5, 6), "float32"))
    # Channel o * 4 + i * 2 + j of the 1x1 conv is tap (i, j) of output channel o.
    w1x1 = w.reshape(4, 12).T.reshape(12, 4, 1, 1)
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w1x1)))
            y = bb.emit(relax.op.nn.relu(y))  # element-wise: moved before depth-to-space
            y = bb.emit(relax.op.reshape(y, [1, 3, 2, 2, 5, 6]))
            y = bb.emit(relax.op.permute_dims(y, [0, 1, 4, 2, 5, 3]))
            gv = bb.emit_output(relax.op.reshape(y, [1, 3, 10, 12]))
        bb.emit_func_output(gv)
    expected = bb.get()

    tvm.ir.assert_structural_equal(ConvTransposeToConv()(before), expected)


@pytest.mark.parametrize("attrs", [
    dict(strides=1),  # kernel 2x2, stride 1: outputs overlap
    dict(strides=2, padding=(1, 1)),
    dict(strides=2, output_padding=1),
])
def test_other_transposed_convolutions_are_left_alone(attrs):
    w = np.random.default_rng(1).standard_normal((4, 3, 2, 2)).astype("float32")
    before = _module(w, **attrs)
    tvm.ir.assert_structural_equal(ConvTransposeToConv()(before), before)


def test_bias_and_batch_norm_fold_into_the_1x1_conv():
    """conv_transpose -> bias add -> batch norm -> relu: one conv2d with folded weights and
    bias, the relu, then depth-to-space; same values as before the rewrite."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 3, 2, 2)).astype("float32")
    bias = rng.standard_normal((1, 3, 1, 1)).astype("float32")
    gamma, beta, mean = (rng.standard_normal(3).astype("float32") for _ in range(3))
    var = rng.uniform(0.5, 2.0, 3).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 5, 6), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d_transpose(x, relax.const(w), strides=2))
            y = bb.emit(relax.op.add(y, relax.const(bias)))
            bn = bb.emit(relax.op.nn.batch_norm(y, *(relax.const(v) for v in (gamma, beta, mean, var)),
                                                axis=1, epsilon=1e-5))
            y = bb.emit(relax.TupleGetItem(bn, 0))
            gv = bb.emit_output(relax.op.nn.relu(y))
        bb.emit_func_output(gv)
    before = bb.get()
    after = ConvTransposeToConv()(before)
    ops = []
    relax.analysis.post_order_visit(after["main"], lambda e: ops.append(e.op.name) if isinstance(e, relax.Call) else None)
    assert ops == ["relax.nn.conv2d", "relax.add", "relax.nn.relu", "relax.reshape", "relax.permute_dims",
                   "relax.reshape"]
    xv = tvm.runtime.tensor(rng.standard_normal((1, 4, 5, 6)).astype("float32"))
    run = lambda m: relax.VirtualMachine(tvm.compile(relax.transform.DecomposeOpsForInference()(m), "llvm"),
                                         tvm.cpu())["main"](xv).numpy()
    np.testing.assert_allclose(run(after), run(before), rtol=1e-5, atol=1e-5)


def _conv_transpose_model(path, ic, oc, kernel, bias, rng):
    w = rng.standard_normal((ic, oc, *kernel)).astype("float32")
    inits = [numpy_helper.from_array(w, "W")]
    inputs = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(oc).astype("float32"), "B"))
        inputs.append("B")
    node = helper.make_node("ConvTranspose", inputs, ["y"], kernel_shape=list(kernel), strides=list(kernel))
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, ic, 7, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, oc, 7 * kernel[0], 9 * kernel[1]])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize("ic, oc, kernel, bias", [(8, 6, (2, 2), True), (5, 1, (2, 3), False)])
def test_imported_conv_transpose_matches_onnxruntime(tmp_path, ic, oc, kernel, bias):
    rng = np.random.default_rng(2)
    path = tmp_path / "ct.onnx"
    _conv_transpose_model(path, ic, oc, kernel, bias, rng)
    mod = prepare_onnx(path, {"x": (1, ic, 7, 9)}).to_relax()
    ops = []
    relax.analysis.post_order_visit(mod["main"], lambda e: ops.append(e.op) if isinstance(e, relax.Call) else None)
    assert not any(op.same_as(CONV2D_TRANSPOSE) for op in ops), "import did not rewrite it"
    x = rng.standard_normal((1, ic, 7, 9)).astype("float32")
    (ref,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())["main"](tvm.runtime.tensor(x))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-5)
