"""ONNX import: shapes, folding, unsupported ops, bad files."""

from __future__ import annotations

import onnx
import pytest
import tvm

from tvm_compress import errors, load_onnx, prepare_onnx
from tvm_compress.loader import layer_table, op_histogram, parse_shape_arg


def test_static_model_imports_with_weights(conv_model):
    mod = load_onnx(conv_model)
    assert isinstance(mod, tvm.IRModule)
    main = mod["main"]
    assert len(main.params) == 1  # weights are constants, not parameters
    assert [int(d) for d in main.params[0].ty.shape] == [1, 3, 8, 8]


def test_shape_subgraph_is_folded(conv_model_dynamic):
    """x.view(x.size(0), -1) exports Shape->Gather->...->Reshape; it must be folded away."""
    raw = onnx.load(str(conv_model_dynamic))
    assert "Shape" in op_histogram(raw)
    prepared = prepare_onnx(conv_model_dynamic, {"x": (2, 3, 8, 8)})
    assert prepared.folded
    assert "Shape" not in op_histogram(prepared.model)
    mod = prepared.to_relax()
    assert [int(d) for d in mod["main"].params[0].ty.shape] == [2, 3, 8, 8]


def test_dynamic_input_without_shape_names_the_input(conv_model_dynamic):
    with pytest.raises(errors.ShapeError, match=r"input 'x' has a dynamic shape \[batch,3,8,8\].*--input-shape x=1,3,8,8"):
        prepare_onnx(conv_model_dynamic)


@pytest.mark.parametrize(
    "shapes, pattern",
    [
        ({"y": (1, 3, 8, 8)}, "model's inputs are: x"),
        ({"x": (1, 3, 8)}, "rank 3 does not match"),
        ({"x": (1, 4, 8, 8)}, "dim 1 is 4, but the model fixes it to 3"),
    ],
)
def test_bad_input_shapes(conv_model_dynamic, shapes, pattern):
    with pytest.raises(errors.ShapeError, match=pattern):
        prepare_onnx(conv_model_dynamic, shapes)


@pytest.mark.parametrize("text", ["x", "x=", "x=1,a,3", "x=0,3", "=1,2"])
def test_bad_shape_argument(text):
    with pytest.raises(errors.ShapeError):
        parse_shape_arg(text)


def test_shape_argument():
    assert parse_shape_arg("input.1=1,3,224,224") == ("input.1", (1, 3, 224, 224))


def test_unsupported_ops_listed_with_node_names(unsupported_model):
    with pytest.raises(errors.UnsupportedOpError) as info:
        prepare_onnx(unsupported_model)
    msg = str(info.value)
    assert "LSTM (e.g. node 'encoder_lstm': not unrolled, clip and input_forget are not supported)" in msg
    assert "QLinearConv (e.g. node 'qconv_1')" in msg
    assert "\n" not in msg


def test_missing_file(tmp_path):
    with pytest.raises(errors.ModelError, match="model file not found"):
        prepare_onnx(tmp_path / "nope.onnx")


def test_not_onnx(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a protobuf\n" * 10)
    with pytest.raises(errors.ModelError, match="not a valid ONNX model"):
        prepare_onnx(bad)


def test_truncated_onnx(conv_model, tmp_path):
    data = conv_model.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(errors.ModelError):
        prepare_onnx(cut)


def test_layer_table_counts_params_and_macs(conv_model):
    rows = {r["op"]: r for r in layer_table(prepare_onnx(conv_model))}
    # Linear 128 -> 10: 1280 weights + 10 biases, 1280 MACs for batch 1.
    assert rows["Gemm"]["params"] == 1290
    assert rows["Gemm"]["macs"] == 1280
    convs = [r for r in layer_table(prepare_onnx(conv_model)) if r["op"] == "Conv"]
    # depthwise 3x3 over 8 channels of 8x8 (BN is folded into the first conv by onnxruntime)
    assert any(r["macs"] == 8 * 8 * 8 * 9 for r in convs)
    assert any(r["macs"] == 8 * 8 * 8 * 3 * 9 for r in convs)


def test_minus_one_dims_are_dynamic(tmp_path):
    """PaddlePaddle exports mark dynamic dims as -1; they must be fixable with --input-shape."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "m.onnx"))
    with pytest.raises(errors.ShapeError, match=r"dynamic shape \[\?,4\]"):
        prepare_onnx(tmp_path / "m.onnx")
    assert prepare_onnx(tmp_path / "m.onnx", {"x": (3, 4)}).inputs[0].shape == (3, 4)
