"""Group norms exported as Reshape -> InstanceNormalization -> Reshape, with one group or one
group per channel, rewritten as reductions over the map's own axes (``tvm_compress/onnx_norms.py``)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper

import tvm_compress

quiet = lambda m: None  # noqa: E731


def _norm_model(path, groups: int, opset: int = 17, affine: bool = True):
    """Conv1d 8 -> 16 (k3) -> GroupNorm(groups, 16) as PyTorch exports it -> PReLU -> Conv1d
    16 -> 8 (k1), on 37 positions."""
    rng = np.random.default_rng(groups)

    def init(name, value):
        return numpy_helper.from_array(np.asarray(value), name)

    inits = [init("w0", (rng.standard_normal((16, 8, 3)) * 0.3).astype("float32")),
             init("grouped", np.array([0, groups, -1], np.int64)),
             init("scale", np.ones(groups, np.float32) * (1.5 if affine else 1)),
             init("bias", np.full(groups, 0.25 if affine else 0, np.float32)),
             init("back", np.array([1, 16, 37], np.int64)),
             init("gw", (rng.random((16, 1)) + 0.5).astype("float32") if affine else np.ones((16, 1), np.float32)),
             init("gb", rng.standard_normal((16, 1)).astype("float32") if affine else np.zeros((16, 1), np.float32)),
             init("slope", np.array([0.2], np.float32)),
             init("w1", (rng.standard_normal((8, 16, 1)) * 0.3).astype("float32"))]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1]),
             helper.make_node("Reshape", ["c0", "grouped"], ["r"]),
             helper.make_node("InstanceNormalization", ["r", "scale", "bias"], ["n"], epsilon=1e-5),
             helper.make_node("Reshape", ["n", "back"], ["rb"]),
             helper.make_node("Mul", ["rb", "gw"], ["m"]),
             helper.make_node("Add", ["m", "gb"], ["a"]),
             helper.make_node("PRelu", ["a", "slope"], ["p"]),
             helper.make_node("Conv", ["p", "w1"], ["y"])]
    graph = helper.make_graph(nodes, "gn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 37])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 37])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    return path


@pytest.mark.parametrize("groups, opset, rewritten", [
    (1, 17, True),    # a global layer norm (ConvTasNet's gLN)
    (1, 18, True),    # ReduceMean's axes an input from opset 18
    (16, 17, True),   # one group per channel (wav2vec2's first GroupNorm)
    (4, 17, False),   # a reshape that splits the channels: left as it is
])
def test_group_norms_become_reductions_over_the_map(tmp_path, groups, opset, rewritten):
    path = _norm_model(tmp_path / "gn.onnx", groups, opset)
    prepared = tvm_compress.prepare_onnx(path, None)
    ops = [n.op_type for n in prepared.model.graph.node]
    assert ("InstanceNormalization" not in ops) == rewritten, ops
    if rewritten:
        assert ops.count("ReduceMean") == 2 and "Reshape" not in ops, ops
    x = np.random.default_rng(5).standard_normal((1, 8, 37)).astype("float32")
    want = ort.InferenceSession(str(path))
    got = ort.InferenceSession(prepared.model.SerializeToString())
    np.testing.assert_allclose(got.run(None, {"x": x})[0], want.run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_a_group_norm_without_affine_ends_in_the_division(tmp_path):
    prepared = tvm_compress.prepare_onnx(_norm_model(tmp_path / "gn.onnx", 1, affine=False), None)
    ops = [n.op_type for n in prepared.model.graph.node]
    assert "InstanceNormalization" not in ops and ops.count("ReduceMean") == 2
    assert next(n for n in prepared.model.graph.node if "rb" in n.output).op_type == "Div"


@pytest.mark.parametrize("groups", [1, 6])
def test_a_group_norm_of_a_2d_map_with_per_group_scales(tmp_path, groups):
    """A 4-d map (1, 6, 5, 7): per-group scale and bias that differ, onnxruntime's numbers."""
    rng = np.random.default_rng(9)
    inits = [numpy_helper.from_array(np.array([0, groups, -1], np.int64), "grouped"),
             numpy_helper.from_array(rng.random(groups).astype(np.float32) + 0.5, "scale"),
             numpy_helper.from_array(rng.standard_normal(groups).astype(np.float32), "bias"),
             numpy_helper.from_array(np.array([1, 6, 5, 7], np.int64), "back")]
    nodes = [helper.make_node("Reshape", ["x", "grouped"], ["r"]),
             helper.make_node("InstanceNormalization", ["r", "scale", "bias"], ["n"], epsilon=1e-3),
             helper.make_node("Reshape", ["n", "back"], ["y"])]
    graph = helper.make_graph(nodes, "gn2d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 5, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 5, 7])], inits)
    path = tmp_path / "gn2d.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    prepared = tvm_compress.prepare_onnx(path, None)
    assert "InstanceNormalization" not in [n.op_type for n in prepared.model.graph.node]
    x = (rng.standard_normal((1, 6, 5, 7)) * 3 + 1).astype("float32")
    got = ort.InferenceSession(prepared.model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ort.InferenceSession(str(path)).run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_a_global_layer_norm_between_convs_stays_channels_last(tmp_path):
    """Compiled: no transpose between the two convs (only at the model's edges, into and out
    of channels-first), and the numbers of onnxruntime."""
    from tvm_compress.loader import load_onnx
    from tvm_compress.pipeline import lowering_passes
    from tvm_compress.targets import get_target

    path = _norm_model(tmp_path / "gn.onnx", 1)
    profile = get_target("x86")
    with profile.tvm_target():
        lowered = tvm.transform.Sequential(lowering_passes(profile))(load_onnx(path))
    moves = [gv.name_hint for gv, f in lowered.functions.items()
             if isinstance(f, tvm.tirx.PrimFunc) and "transpose" in f.script()]
    assert len(moves) <= 2, moves
    rep = tvm_compress.compile(path, tmp_path / "gn.so", target="x86", bench_runs=0, log=quiet)
    assert rep["conv_layout"]["layout"] == "NHWC"
    assert rep["verified"] and rep["max_rel_err"] < 1e-5, rep["max_rel_err"]
