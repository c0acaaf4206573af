"""Einsum nodes that are matrix products, as MatMul before import (tvm_compress/onnx_einsum.py).

The rewritten graph must compute what onnxruntime's Einsum computes (checked in onnxruntime, no
TVM in the loop), other einsums must stay, and an attention block spelled with einsums must
compile through the matmul kernels and match onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import tvm_compress
from tvm_compress.onnx_einsum import einsums_as_matmuls


def _einsum_model(equation, a_shape, b_shape, dtype=TensorProto.FLOAT):
    graph = helper.make_graph(
        [helper.make_node("Einsum", ["a", "b"], ["y"], equation=equation)], "g",
        [helper.make_tensor_value_info("a", dtype, a_shape), helper.make_tensor_value_info("b", dtype, b_shape)],
        [helper.make_tensor_value_info("y", dtype, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model)


def _run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("equation, a_shape, b_shape, ops", [
    ("bhid,bhjd->bhij", [1, 2, 5, 4], [1, 2, 6, 4], ["Transpose", "MatMul"]),  # q k^T
    ("bhij,bhjd->bhid", [1, 2, 5, 6], [1, 2, 6, 4], ["MatMul"]),  # attn v
    ("B G H I D, B G H J D -> B G H I J", [1, 3, 2, 5, 4], [1, 3, 2, 6, 4], ["Transpose", "MatMul"]),
    ("bik,kj->bij", [2, 3, 4], [4, 5], ["Reshape", "MatMul", "Reshape"]),
    ("bij,bkj->bki", [2, 3, 4], [2, 5, 4], ["Transpose", "MatMul", "Transpose"]),
    ("abcd,cdbe->ae", [2, 3, 4, 5], [4, 5, 3, 6], ["Reshape", "Transpose", "Reshape", "MatMul"]),
    ("ij,j->i", [3, 4], [4], ["Reshape", "MatMul", "Reshape"]),
    # no free index on one side, two contracted: as many dims before and after, other sizes
    ("ij,ijk->k", [2, 3], [2, 3, 4], ["Reshape", "Reshape", "MatMul", "Reshape"]),
    ("k,kij->ij", [3], [3, 4, 5], ["Reshape", "Reshape", "MatMul", "Reshape"]),
    ("bij,bijk->bk", [2, 3, 4], [2, 3, 4, 5], ["Reshape", "Reshape", "MatMul", "Reshape"]),
])
def test_matrix_products_become_matmuls_computing_the_same(equation, a_shape, b_shape, ops):
    model = _einsum_model(equation, a_shape, b_shape)
    rng = np.random.default_rng(3)
    feeds = {"a": rng.standard_normal(a_shape).astype(np.float32), "b": rng.standard_normal(b_shape).astype(np.float32)}
    ref = _run(model, feeds)
    assert einsums_as_matmuls(model) == 1
    assert [n.op_type for n in model.graph.node] == ops
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_allclose(_run(model, feeds), ref, rtol=1e-6, atol=1e-6)


def test_random_matrix_product_equations_compute_what_einsum_computes():
    """60 seeded equations: 0-2 batch, 0-2 free indices per side, 1-2 contracted, each operand's
    and the output's indices in a random order, sizes 1-4; every one rewritten and equal to
    onnxruntime's Einsum on the original."""
    rng = np.random.default_rng(7)
    for _ in range(60):
        letters = iter("abcdefghijkl")
        batch, a_free, b_free = ([next(letters) for _ in range(rng.integers(0, 3))] for _ in range(3))
        contracted = [next(letters) for _ in range(rng.integers(1, 3))]
        size = {c: int(rng.integers(1, 5)) for c in batch + a_free + b_free + contracted}
        a, b, out = (list(rng.permutation(g)) for g in (batch + a_free + contracted, batch + b_free + contracted,
                                                           batch + a_free + b_free))
        equation = f"{''.join(a)},{''.join(b)}->{''.join(out)}"
        model = _einsum_model(equation, [size[c] for c in a], [size[c] for c in b])
        feeds = {"a": rng.standard_normal([size[c] for c in a]).astype(np.float32),
                 "b": rng.standard_normal([size[c] for c in b]).astype(np.float32)}
        ref = _run(model, feeds)
        assert einsums_as_matmuls(model) == 1, equation
        got = _run(model, feeds)
        assert got.shape == ref.shape, equation
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=equation)


@pytest.mark.parametrize("equation, a_shape, b_shape, dtype", [
    ("ii,ij->ij", [3, 3], [3, 4], TensorProto.FLOAT),  # a diagonal
    ("ij,ij->ij", [3, 4], [3, 4], TensorProto.FLOAT),  # element-wise
    ("ij,kl->ijkl", [2, 3], [4, 5], TensorProto.FLOAT),  # outer product
    ("ij,jk", [2, 3], [3, 4], TensorProto.FLOAT),  # implicit output
    ("...ij,...jk->...ik", [2, 2, 3], [2, 3, 4], TensorProto.FLOAT),  # ellipsis
    ("bij,bjk->bik", [1, 2, 3], [2, 3, 4], TensorProto.FLOAT),  # broadcast batch
    ("ij,jk->ik", [2, 3], [3, 4], TensorProto.INT8),  # MatMul takes no int8
])
def test_other_einsums_stay(equation, a_shape, b_shape, dtype):
    model = _einsum_model(equation, a_shape, b_shape, dtype)
    assert einsums_as_matmuls(model) == 0
    assert [n.op_type for n in model.graph.node] == ["Einsum"]


def test_einsum_attention_compiles_to_matmul_kernels_and_matches_onnxruntime(tmp_path):
    """A windowed attention block as MaxViT exports it: q k^T and attn v as einsums, a relative
    position bias, a softmax. No einsum kernel is left after lowering."""
    import tvm
    from tvm_compress.pipeline import lowering_passes
    from tvm_compress.targets import get_target

    rng = np.random.default_rng(0)
    g, h, n, d = 4, 2, 49, 16
    w = [numpy_helper.from_array(rng.standard_normal((d * h, d * h)).astype(np.float32) * 0.2, f"w{i}") for i in range(3)]
    bias = numpy_helper.from_array(rng.standard_normal((1, 1, h, n, n)).astype(np.float32), "bias")
    shape = numpy_helper.from_array(np.array([1, g, n, h, d], np.int64), "heads")
    nodes = []
    for i, name in enumerate("qkv"):
        nodes += [helper.make_node("MatMul", ["x", f"w{i}"], [f"{name}0"]),
                  helper.make_node("Reshape", [f"{name}0", "heads"], [f"{name}1"]),
                  helper.make_node("Transpose", [f"{name}1"], [name], perm=[0, 1, 3, 2, 4])]
    nodes += [helper.make_node("Einsum", ["q", "k"], ["s"], equation="B G H I D, B G H J D -> B G H I J"),
              helper.make_node("Add", ["s", "bias"], ["sb"]),
              helper.make_node("Softmax", ["sb"], ["p"], axis=-1),
              helper.make_node("Einsum", ["p", "v"], ["y"], equation="B G H I J, B G H J D -> B G H I D")]
    graph = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, g, n, d * h])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, g, h, n, d])], [*w, bias, shape])
    path = tmp_path / "attn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))

    prepared = tvm_compress.prepare_onnx(path)
    assert "Einsum" not in {n.op_type for n in prepared.model.graph.node}
    with get_target("x86").tvm_target():
        low = tvm.transform.Sequential(lowering_passes())(prepared.to_relax())
    kernels = [gv.name_hint for gv, f in low.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert not any("einsum" in k for k in kernels) and sum("matmul" in k for k in kernels) >= 2, kernels
    rep = tvm_compress.compile(path, tmp_path / "attn.so", target="x86", bench_runs=2, log=lambda m: None)
    assert rep["verified"] and rep["max_rel_err"] < 1e-4
