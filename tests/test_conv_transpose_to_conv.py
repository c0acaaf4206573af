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

CONV1D_TRANSPOSE = tvm.ir.Op.get("relax.nn.conv1d_transpose")
CONV2D_TRANSPOSE = tvm.ir.Op.get("relax.nn.conv2d_transpose")
CONV3D_TRANSPOSE = tvm.ir.Op.get("relax.nn.conv3d_transpose")


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


def test_overlapping_kernel_becomes_phase_conv_depth_to_space_and_crop():
    """Kernel 4, stride 2, padding 1 (the usual 2x upsampling): each output phase reads 2x2
    input pixels, so one padded 2x2 conv to OC * 4 channels, depth-to-space, and a slice
    dropping the padded border."""
    w = np.random.default_rng(4).standard_normal((4, 3, 4, 4)).astype("float32")  # IOHW
    before = _module(w, strides=2, padding=1)

    # tap m * 2 + r of the transposed kernel, flipped along m, is tap (1 - m) of phase r
    taps = w.reshape(4, 3, 2, 2, 2, 2)[:, :, ::-1, :, ::-1, :]
    w_phase = np.ascontiguousarray(taps.transpose(1, 3, 5, 0, 2, 4).reshape(12, 4, 2, 2))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 5, 6), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w_phase), padding=[1, 1, 1, 1]))
            y = bb.emit(relax.op.nn.relu(y))
            y = bb.emit(relax.op.reshape(y, [1, 3, 2, 2, 6, 7]))
            y = bb.emit(relax.op.permute_dims(y, [0, 1, 4, 2, 5, 3]))
            y = bb.emit(relax.op.reshape(y, [1, 3, 12, 14]))
            gv = bb.emit_output(relax.op.strided_slice(y, axes=[2, 3], begin=[1, 1], end=[11, 13]))
        bb.emit_func_output(gv)
    expected = bb.get()

    tvm.ir.assert_structural_equal(ConvTransposeToConv()(before), expected)


@pytest.mark.parametrize("attrs", [
    dict(strides=2, data_layout="NHWC"),  # another layout
    dict(strides=2, padding=(2, 2)),  # crops more than the 2x2 kernel reaches
    dict(strides=2, batch="n"),  # a symbolic batch
])
def test_other_transposed_convolutions_are_left_alone(attrs):
    w = np.random.default_rng(1).standard_normal((4, 3, 2, 2)).astype("float32")
    batch = tvm.tirx.Var(attrs.pop("batch"), "int64") if "batch" in attrs else 1
    shape = (batch, 5, 6, 4) if attrs.get("data_layout") == "NHWC" else (batch, 4, 5, 6)
    before = _module(w, x_shape=shape, **attrs)
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


def _conv_transpose_model(path, ic, oc, x_shape, rng, bias=True, groups=1, **attrs):
    kernel = attrs["kernel_shape"]
    w = rng.standard_normal((ic, oc // groups, *kernel)).astype("float32")
    inits = [numpy_helper.from_array(w, "W")]
    inputs = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(oc).astype("float32"), "B"))
        inputs.append("B")
    node = helper.make_node("ConvTranspose", inputs, ["y"], group=groups, **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, ic, *x_shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, oc, *(None for _ in x_shape)])], inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize("ic, oc, x_shape, options", [
    (8, 6, (7, 9), dict(kernel_shape=[2, 2], strides=[2, 2])),
    (5, 1, (7, 9), dict(kernel_shape=[2, 3], strides=[2, 3], bias=False)),
    (8, 6, (7, 9), dict(kernel_shape=[4, 4], strides=[2, 2], pads=[1, 1, 1, 1])),  # 2x upsampling
    (6, 5, (7, 9), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])),
    (6, 4, (6, 5), dict(kernel_shape=[3, 2], strides=[2, 3], pads=[0, 2, 1, 0], dilations=[2, 1], groups=2)),
    (8, 3, (9, 9), dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])),
    (16, 4, (23,), dict(kernel_shape=[16], strides=[8], pads=[4, 4])),  # HiFi-GAN's upsampling
    (16, 1, (23,), dict(kernel_shape=[16], strides=[8], bias=False)),  # Conv-TasNet's decoder
    (6, 6, (23,), dict(kernel_shape=[4], strides=[2], pads=[1, 2], groups=6)),  # depthwise
    (4, 3, (40,), dict(kernel_shape=[4], strides=[2], pads=[1, 1])),  # 41 phase rows computed as 48
    (4, 3, (3, 5, 4), dict(kernel_shape=[2, 4, 3], strides=[1, 2, 2], pads=[0, 1, 1, 0, 1, 0])),  # 3-D
])
def test_imported_conv_transpose_matches_onnxruntime(tmp_path, ic, oc, x_shape, options):
    rng = np.random.default_rng(2)
    path = tmp_path / "ct.onnx"
    _conv_transpose_model(path, ic, oc, x_shape, rng, **options)
    mod = prepare_onnx(path, {"x": (1, ic, *x_shape)}).to_relax()
    ops = []
    relax.analysis.post_order_visit(mod["main"], lambda e: ops.append(e.op) if isinstance(e, relax.Call) else None)
    assert not any(op.same_as(t) for op in ops for t in (CONV1D_TRANSPOSE, CONV2D_TRANSPOSE, CONV3D_TRANSPOSE)), \
        "import did not rewrite it"
    x = rng.standard_normal((1, ic, *x_shape)).astype("float32")
    (ref,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())["main"](tvm.runtime.tensor(x))
    assert got.numpy().shape == ref.shape
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4, atol=1e-4)
