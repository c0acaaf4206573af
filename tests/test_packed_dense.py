"""Float dense layers read their constant weight packed in column panels (``PackedDense``, a
kernel hook of the CPU families): the rewrite, the layers it leaves alone, the kernel against
numpy on odd shapes, and compiled models against onnxruntime."""

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
from tvm_compress.relax_utils import const_value, is_constant
from tvm_compress.targets.cpu_schedule import CPUFallback
from tvm_compress.targets.packed_dense import PackedDense, pack_weight

quiet = lambda m: None  # noqa: E731
_CALL_TIR = tvm.ir.Op.get("relax.call_tir")
_MATMUL = tvm.ir.Op.get("relax.matmul")


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((1, 197, 384), "float32"), w: R.Tensor((384, 1536), "float32"),
             b: R.Tensor((1536,), "float32")) -> R.Tensor((1, 197, 1536), "float32"):
        with R.dataflow():
            y = R.matmul(x, w)
            gv = R.add(y, b)
            R.output(gv)
        return gv


def _calls(func):
    calls = []
    relax.analysis.post_order_visit(func.body, lambda e: calls.append(e) if isinstance(e, relax.Call) else None)
    return calls


def test_pack_weight_makes_contiguous_column_panels():
    w = np.arange(6 * 32, dtype="float32").reshape(6, 32)
    p = pack_weight(w, 16)
    assert p.shape == (2, 6, 16) and p.flags.c_contiguous
    np.testing.assert_array_equal(p[1, 4], w[4, 16:32])


def test_a_matmul_with_a_constant_weight_reads_it_in_panels():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((384, 1536)).astype("float32")
    b = rng.standard_normal(1536).astype("float32")
    after = PackedDense(8)(bound(Before, {"w": w, "b": b}))
    calls = _calls(after["main"])
    assert not any(c.op.same_as(_MATMUL) for c in calls)
    (kernel,) = [c for c in calls if c.op.same_as(_CALL_TIR)]
    prim = after[kernel.args[0]]
    assert prim.attrs["op_pattern"] == 4  # out-element-wise fusable: the bias add still fuses
    data, panels = kernel.args[1]
    assert isinstance(data, relax.Var) and is_constant(panels)
    # 16 columns per panel: the tile's width for 1536 columns on 8 lanes (two AVX2 registers)
    np.testing.assert_array_equal(const_value(panels), pack_weight(w, 16))
    assert [int(d) for d in kernel.ty.shape] == [1, 197, 1536]


def _matmul_module(data_shape, weight):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(data_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, relax.const(weight)))
        bb.emit_func_output(out)
    return bb.get()


def test_matmuls_it_leaves_alone():
    rng = np.random.default_rng(1)
    # one panel already: the weight as it is
    mod = _matmul_module((8, 64), rng.standard_normal((64, 16)).astype("float32"))
    assert PackedDense(8)(mod).same_as(mod)
    # a width no vector of 4 or more divides
    mod = _matmul_module((8, 64), rng.standard_normal((64, 13)).astype("float32"))
    assert PackedDense(8)(mod).same_as(mod)
    # two activations (attention): nothing to pack offline
    bb = relax.BlockBuilder()
    q, k = (relax.Var(n, relax.TensorType((4, 64, 64), "float32")) for n in "qk")
    with bb.function("main", [q, k]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(q, k))
        bb.emit_func_output(out)
    mod = bb.get()
    assert PackedDense(8)(mod).same_as(mod)


@pytest.mark.parametrize("data_shape,columns,lanes", [
    ((197, 384), 1536, 8),     # 16-column panels, the token rows of a ViT
    ((1, 40, 120), 368, 16),   # a batch axis, 16 x 23 columns
    ((1, 2048), 200, 8),       # batch-1 dense (GEMV), 8-column panels
    ((7, 33), 20, 8),          # 5-column panels, odd reduction length
])
def test_the_packed_kernel_equals_numpy(data_shape, columns, lanes):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((data_shape[-1], columns)).astype("float32")
    x = rng.standard_normal(data_shape).astype("float32")
    mod = PackedDense(lanes)(_matmul_module(data_shape, w))
    assert not any(c.op.same_as(_MATMUL) for c in _calls(mod["main"]))
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    mod = relax.transform.LegalizeOps()(mod)
    for gv, func in mod.functions_items():  # the default CPU schedule, as a build without records
        if isinstance(func, tvm.tirx.PrimFunc):
            sch = CPUFallback(lanes=lanes).apply(func, target, False)
            assert sch is not None
            mod[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, x @ w, rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def mlp_model(tmp_path_factory):
    """Gemm (transB) -> Relu -> batched MatMul + Add, 17 tokens: the shapes of a small MLP."""
    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("models") / "mlp.onnx"
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "flat"], ["x2"]),
         helper.make_node("Gemm", ["x2", "w1", "b1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Reshape", ["r", "tokens"], ["r3"]),
         helper.make_node("MatMul", ["r3", "w2"], ["y"]), helper.make_node("Add", ["y", "b2"], ["z"])],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 17, 96])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 17, 40])],
        [numpy_helper.from_array(np.array([17, 96], np.int64), "flat"),
         numpy_helper.from_array(rng.standard_normal((256, 96)).astype("float32") * 0.1, "w1"),
         numpy_helper.from_array(rng.standard_normal(256).astype("float32"), "b1"),
         numpy_helper.from_array(np.array([1, 17, 256], np.int64), "tokens"),
         numpy_helper.from_array(rng.standard_normal((256, 40)).astype("float32") * 0.1, "w2"),
         numpy_helper.from_array(rng.standard_normal(40).astype("float32"), "b2")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
def test_packed_mlp_matches_onnxruntime(mlp_model, tmp_path, target):
    rep = tvm_compress.compile(mlp_model, tmp_path / "mlp.so", target=target, bench_runs=0, log=quiet)
    assert rep["verified"] and rep["max_rel_err"] < 1e-5, rep["max_rel_err"]
    # packing only reorders: the stored weight bytes are the model's
    assert rep["weight_bytes_after"] == (256 * 96 + 256 + 256 * 40 + 40) * 4


def test_a_transposed_constant_weight_is_packed_too():
    """A Gemm with transB imports as matmul(x, permute_dims(W)): packed without folding first."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 96)).astype("float32")  # [N, K] as a Gemm stores it
    x = rng.standard_normal((3, 96)).astype("float32")
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType((3, 96), "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            wt = bb.emit(relax.op.permute_dims(relax.const(w)))
            out = bb.emit_output(relax.op.matmul(xv, wt))
        bb.emit_func_output(out)
    after = PackedDense(8)(bb.get())
    calls = _calls(after["main"])
    (kernel,) = calls  # the transpose and the matmul gone
    assert kernel.op.same_as(_CALL_TIR)
    np.testing.assert_array_equal(const_value(kernel.args[1][1]), pack_weight(np.ascontiguousarray(w.T), 16))
    ex = tvm.compile(relax.transform.LegalizeOps()(after), target="llvm")
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, x @ w.T, rtol=1e-5, atol=1e-4)
