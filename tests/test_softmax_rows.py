"""Softmax rows of no whole number of vectors are padded with -inf to one (``PadSoftmaxRows``,
a kernel hook of the CPU families): the rewrite as a Before/Expected pair, the softmaxes it
leaves alone, and compiled models against onnxruntime."""

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
from tvm_compress.targets.softmax_rows import PadSoftmaxRows

quiet = lambda m: None  # noqa: E731


@I.ir_module
class Before:
    @R.function
    def main(s: R.Tensor((1, 6, 197, 197), "float32")) -> R.Tensor((1, 6, 197, 197), "float32"):
        with R.dataflow():
            gv = R.nn.softmax(s, axis=-1)
            R.output(gv)
        return gv


@I.ir_module
class Expected:
    @R.function
    def main(s: R.Tensor((1, 6, 197, 197), "float32")) -> R.Tensor((1, 6, 197, 197), "float32"):
        with R.dataflow():
            wide = R.nn.pad(s, [0, 0, 0, 0, 0, 0, 0, 11], pad_value=float("-inf"))
            p = R.nn.softmax(wide, axis=-1)
            gv = R.strided_slice(p, axes=[3], begin=[0], end=[197])
            R.output(gv)
        return gv


def test_scores_of_197_tokens_get_minus_infinity_columns_and_a_slice():
    tvm.ir.assert_structural_equal(PadSoftmaxRows(16)(Before), Expected)


def _softmax_module(shape, axis=-1):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.softmax(x, axis=axis))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("shape,axis", [
    ((6, 197, 208), -1),     # whole registers already
    ((10, 97), -1),          # 970 elements: the schedule runs it serially, padding gains nothing
    ((1, 197, 20, 20), 1),   # along channels of NCHW: not a row of contiguous scores
])
def test_softmaxes_it_leaves_alone(shape, axis):
    mod = _softmax_module(shape, axis)
    assert PadSoftmaxRows(16)(mod).same_as(mod)


def test_padded_rows_give_the_same_softmax():
    """exp(-inf - max) is exactly 0: the padded softmax's real columns equal the unpadded one."""
    x = np.random.default_rng(0).standard_normal((40, 1001)).astype("float32") * 5
    outs = []
    for mod in (_softmax_module((40, 1001)), PadSoftmaxRows(8)(_softmax_module((40, 1001)))):
        ex = tvm.compile(relax.transform.LegalizeOps()(mod), target="llvm")
        outs.append(relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy())
    assert outs[0].shape == outs[1].shape == (40, 1001)
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-6, atol=1e-9)


@pytest.fixture(scope="module")
def classes_model(tmp_path_factory):
    """MatMul -> Softmax over 1001 classes for 40 rows (a CTC-style head)."""
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("models") / "classes.onnx"
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Softmax", ["y"], ["p"], axis=-1)],
        "classes", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 40, 64])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, 40, 1001])],
        [numpy_helper.from_array(rng.standard_normal((64, 1001)).astype("float32") * 0.5, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("target", ["x86", "x86-avx2", pytest.param("aarch64", marks=pytest.mark.slow)])
def test_padded_softmax_matches_onnxruntime(classes_model, tmp_path, target):
    if target == "aarch64":
        from tvm_compress.targets import qemu

        ok, why = qemu.can_run("aarch64")
        if not ok:
            pytest.skip(why)
    rep = tvm_compress.compile(classes_model, tmp_path / "c.so", target=target, bench_runs=0, log=quiet)
    assert rep["verified"] and rep["max_rel_err"] < 1e-5, rep["max_rel_err"]
