"""Dense layers whose width is no whole number of vectors get zero columns up to one, and
those whose row count no register tile of 4-8 rows divides get zero rows up to a multiple of 8
(``PadDenseColumns``, a kernel hook of the CPU families): the rewrites as Before/Expected
pairs, the layers it leaves alone, and compiled models against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

import tvm_compress
from conftest import bound
from tvm_compress.targets.dense_columns import PadDenseColumns, padded_columns, padded_rows

quiet = lambda m: None  # noqa: E731


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((48, 96), "float32"), w: R.Tensor((96, 1001), "float32"),
             b: R.Tensor((1001,), "float32")) -> R.Tensor((48, 1001), "float32"):
        with R.dataflow():
            y = R.matmul(x, w)
            gv = R.add(y, b)
            R.output(gv)
        return gv


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((48, 96), "float32"), w: R.Tensor((96, 1008), "float32"),
             b: R.Tensor((1001,), "float32")) -> R.Tensor((48, 1001), "float32"):
        with R.dataflow():
            wide = R.matmul(x, w)
            y = R.strided_slice(wide, axes=[1], begin=[0], end=[1001])
            gv = R.add(y, b)
            R.output(gv)
        return gv


def test_a_width_of_no_whole_register_gets_zero_columns_and_a_slice():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 1001)).astype("float32")
    b = rng.standard_normal(1001).astype("float32")
    after = PadDenseColumns(16)(bound(Before, {"w": w, "b": b}))
    expected = bound(Expected, {"w": np.pad(w, ((0, 0), (0, 7))), "b": b})
    tvm.ir.assert_structural_equal(after, expected)


def test_widths_it_leaves_alone():
    assert padded_columns(1001, 16) == 1008 and padded_columns(6625, 8) == 6632
    assert padded_columns(1024, 16) == 1024  # whole registers already
    assert padded_columns(8, 16) == 8  # half a register either way
    # 40 rows: 3.8M MACs, under MIN_MACS: the slice kernel would cost more than it saves
    rng = np.random.default_rng(1)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((40, 96), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, relax.const(rng.standard_normal((96, 1001)).astype("float32"))))
        bb.emit_func_output(out)
    mod = bb.get()
    assert PadDenseColumns(16)(mod).same_as(mod)


@I.ir_module
class BeforeRows:
    @R.function
    def main(x: R.Tensor((1, 197, 384), "float32"), w: R.Tensor((384, 1536), "float32")) -> R.Tensor((1, 197, 1536), "float32"):
        with R.dataflow():
            gv = R.matmul(x, w)
            R.output(gv)
        return gv


@I.ir_module
class ExpectedRows:
    @R.function
    def main(x: R.Tensor((1, 197, 384), "float32"), w: R.Tensor((384, 1536), "float32")) -> R.Tensor((1, 197, 1536), "float32"):
        with R.dataflow():
            tall = R.nn.pad(x, [0, 0, 0, 3, 0, 0])
            out = R.matmul(tall, w)
            gv = R.strided_slice(out, axes=[1, 2], begin=[0, 0], end=[197, 1536])
            R.output(gv)
        return gv


def test_a_row_count_no_tile_divides_gets_zero_rows_and_a_slice():
    w = np.random.default_rng(3).standard_normal((384, 1536)).astype("float32")
    after = PadDenseColumns(16)(bound(BeforeRows, {"w": w}))
    tvm.ir.assert_structural_equal(after, bound(ExpectedRows, {"w": w}))


@I.ir_module
class BeforeScores:
    @R.function
    def main(q: R.Tensor((1, 6, 197, 64), "float32"), kt: R.Tensor((1, 6, 64, 197), "float32")) -> R.Tensor((1, 6, 197, 197), "float32"):
        with R.dataflow():
            gv = R.matmul(q, kt)
            R.output(gv)
        return gv


@I.ir_module
class ExpectedScores:
    @R.function
    def main(q: R.Tensor((1, 6, 197, 64), "float32"), kt: R.Tensor((1, 6, 64, 197), "float32")) -> R.Tensor((1, 6, 197, 197), "float32"):
        with R.dataflow():
            tall = R.nn.pad(q, [0, 0, 0, 0, 0, 3, 0, 0])
            wide = R.nn.pad(kt, [0, 0, 0, 0, 0, 0, 0, 11])
            out = R.matmul(tall, wide)
            gv = R.strided_slice(out, axes=[2, 3], begin=[0, 0], end=[197, 197])
            R.output(gv)
        return gv


def test_attention_scores_pad_both_activations():
    """Q x K^T of 197 tokens: no constant weight, both operands padded by kernels (rows to 200,
    columns to 208 = 13 whole registers; 197 columns had no vector width at all)."""
    tvm.ir.assert_structural_equal(PadDenseColumns(16)(BeforeScores), ExpectedScores)


def test_row_counts_it_leaves_alone():
    assert padded_rows(197) == 200 and padded_rows(131) == 136 and padded_rows(202) == 208
    assert [padded_rows(n) for n in (196, 200, 198, 40, 7, 31)] == [196, 200, 198, 40, 7, 31]


@pytest.fixture(scope="module")
def head_model(tmp_path_factory):
    """A classifier head as exported: MatMul + Add to 1001 classes, then Softmax."""
    rng = np.random.default_rng(2)
    path = tmp_path_factory.mktemp("models") / "head.onnx"
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Add", ["y", "b"], ["z"]),
         helper.make_node("Softmax", ["z"], ["p"], axis=-1)],
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 48, 96])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, 48, 1001])],
        [numpy_helper.from_array(rng.standard_normal((96, 1001)).astype("float32") * 0.2, "w"),
         numpy_helper.from_array(rng.standard_normal(1001).astype("float32"), "b")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
def test_padded_head_matches_onnxruntime(head_model, tmp_path, target):
    rep = tvm_compress.compile(head_model, tmp_path / "head.so", target=target, bench_runs=1, log=quiet)
    assert rep["verified"] and rep["max_rel_err"] < 1e-4, rep["max_rel_err"]
    # the stored weight is the padded one (bytes as stored)
    assert rep["weight_bytes_after"] == (96 * 1008 + 1001) * 4


def test_token_rows_padded_match_onnxruntime(tmp_path):
    """197 tokens (a ViT's 196 patches + class token) through MatMul + Add + Erf-GELU."""
    rng = np.random.default_rng(4)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Add", ["y", "b"], ["z"]),
         helper.make_node("Erf", ["z"], ["e"]), helper.make_node("Mul", ["z", "e"], ["p"])],
        "tokens",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 197, 64])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, 197, 512])],
        [numpy_helper.from_array(rng.standard_normal((64, 512)).astype("float32") * 0.2, "w"),
         numpy_helper.from_array(rng.standard_normal(512).astype("float32"), "b")],
    )
    path = tmp_path / "tokens.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    logs = []
    rep = tvm_compress.compile(path, tmp_path / "t.so", target="x86", bench_runs=0, log=logs.append)
    assert rep["verified"] and rep["max_rel_err"] < 1e-5, rep["max_rel_err"]


def test_attention_of_197_tokens_matches_onnxruntime(tmp_path):
    """softmax(Q K^T / 8) V with 197 tokens and 4 heads, all activations."""
    shape = [1, 4, 197, 64]
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Mul", ["s", "scale"], ["ss"]),
             helper.make_node("Softmax", ["ss"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["y"])]
    graph = helper.make_graph(
        nodes, "attention", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "qkv"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(np.array(0.125, np.float32), "scale")])
    path = tmp_path / "attention.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    rep = tvm_compress.compile(path, tmp_path / "a.so", target="x86", bench_runs=0, log=quiet)
    assert rep["verified"] and rep["max_rel_err"] < 1e-5, rep["max_rel_err"]


def _nhwc_conv_module(data_shape, weight_oihw, strides=(1, 1)):
    """An NHWC conv on an OIHW constant permuted to HWIO, as ``ConvertLayout`` leaves it."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(data_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            w = bb.emit(relax.op.permute_dims(relax.const(weight_oihw), [2, 3, 1, 0]))
            out = bb.emit_output(relax.op.nn.conv2d(x, w, strides=strides, data_layout="NHWC", kernel_layout="HWIO"))
        bb.emit_func_output(out)
    return bb.get()


def test_a_conv_with_channels_no_register_divides_gets_zero_channels_and_a_slice():
    """257 output channels (an STFT's frequency bins: a prime) filled one lane per vector:
    the HWIO weight gets 7 zero output channels, the conv's output is sliced back to 257."""
    w = np.random.default_rng(7).standard_normal((257, 1, 1, 64)).astype("float32")
    after = PadDenseColumns(8)(_nhwc_conv_module((1, 1, 512, 1), w, strides=(1, 16)))
    hwio = np.pad(w.transpose(2, 3, 1, 0), ((0, 0), (0, 0), (0, 0), (0, 7)))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 1, 512, 1), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            wide = bb.emit(relax.op.nn.conv2d(x, relax.const(hwio), strides=(1, 16), data_layout="NHWC",
                                              kernel_layout="HWIO"))
            out = bb.emit_output(relax.op.strided_slice(wide, axes=[3], begin=[0], end=[257]))
        bb.emit_func_output(out)
    # (the unused permute of the old weight is left for dead-code removal)
    tvm.ir.assert_structural_equal(relax.transform.DeadCodeElimination()(after), bb.get())


@pytest.mark.parametrize("channels,lanes,padded", [
    (230, 16, 240),  # 10-lane vectors, a masked register at every step
    (230, 8, 232),   # 5-lane vectors
    (45, 8, 48),
    (72, 16, None),  # 8-lane vectors: padded to 80 it ran slower
])
def test_a_large_conv_on_vectors_of_no_power_of_two_width_is_padded(channels, lanes, padded):
    w = np.random.default_rng(9).standard_normal((channels, 64, 1, 1)).astype("float32")
    after = PadDenseColumns(lanes)(_nhwc_conv_module((1, 56, 56, 64), w))  # 46M MACs for 230 channels
    convs = [b.value for b in after["main"].body.blocks[0].bindings
             if isinstance(b.value, relax.Call) and b.value.op.same_as(tvm.ir.Op.get("relax.nn.conv2d"))]
    assert int(convs[0].ty.shape[3]) == (padded or channels)


@pytest.mark.parametrize("data_shape,out_channels,lanes", [
    ((1, 28, 28, 32), 24, 16),  # half of each register: padded to 32 it ran slower
    ((1, 4, 4, 8), 257, 8),     # 33K MACs: too small for a slice kernel
    ((1, 8, 8, 16), 230, 16),   # 236K MACs: too small
    ((1, 8, 8, 16), 64, 8),     # whole registers already
])
def test_convs_it_leaves_alone(data_shape, out_channels, lanes):
    w = np.random.default_rng(8).standard_normal((out_channels, data_shape[3], 1, 1)).astype("float32")
    mod = _nhwc_conv_module(data_shape, w)
    assert PadDenseColumns(lanes)(mod).same_as(mod)


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
def test_an_stft_front_end_matches_onnxruntime(tmp_path, target):
    """Audio samples -> Conv1d to 257 bins (real and imaginary, stride 32) -> power -> mel
    MatMul, as openWakeWord's melspectrogram exports it: channels-last with padded channels,
    and the same results as onnxruntime."""
    rng = np.random.default_rng(9)
    nodes = [helper.make_node("Unsqueeze", ["x", "axis1"], ["x3"])]
    for part in ("re", "im"):
        nodes += [helper.make_node("Conv", ["x3", f"w_{part}"], [f"c_{part}"], kernel_shape=[128], strides=[32]),
                  helper.make_node("Transpose", [f"c_{part}"], [f"t_{part}"], perm=[0, 2, 1]),
                  helper.make_node("Mul", [f"t_{part}", f"t_{part}"], [f"p_{part}"])]
    nodes += [helper.make_node("Add", ["p_re", "p_im"], ["power"]), helper.make_node("MatMul", ["power", "mel"], ["y"])]
    graph = helper.make_graph(
        nodes, "stft", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 29, 16])],
        [numpy_helper.from_array(np.array([1], np.int64), "axis1"),
         numpy_helper.from_array(rng.standard_normal((257, 1, 128)).astype("float32") * 0.1, "w_re"),
         numpy_helper.from_array(rng.standard_normal((257, 1, 128)).astype("float32") * 0.1, "w_im"),
         numpy_helper.from_array(np.abs(rng.standard_normal((257, 16))).astype("float32"), "mel")])
    path = tmp_path / "stft.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    rep = tvm_compress.compile(path, tmp_path / "stft.so", target=target, bench_runs=0, log=quiet)
    assert rep["conv_layout"]["layout"] == "NHWC"
    # both weights stored with 264 (8 lanes) or 272 (16 lanes) output channels
    padded = padded_columns(257, 16 if target == "x86" else 8)
    assert rep["weight_bytes_after"] == (2 * 128 * padded + 257 * 16) * 4, rep["weight_bytes_after"]
    assert rep["verified"] and rep["max_rel_err"] < 1e-5, rep["max_rel_err"]
