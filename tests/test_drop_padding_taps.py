"""DropPaddingTaps: conv kernel rows and columns that read only padding are dropped. The
rewrite (Before/Expected), the convs it leaves alone, the taps it keeps over many
geometries against torch's conv with the whole kernel, and a dilated ASPP-style model
against onnxruntime."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper
from tvm import relax

import tvm_compress
from tvm_compress.passes import DropPaddingTaps
from tvm_compress.passes.drop_padding_taps import real_taps

quiet = lambda m: None  # noqa: E731


def _conv_module(x_shape, w, **attrs):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), **attrs))
            y = bb.emit(relax.op.nn.relu(y))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("x_shape, w_shape, attrs, rows, cols, kept_attrs", [
    # an ASPP conv at rate 24 on a 20x20 map: only the centre tap reads the map (a plain 1x1 conv)
    ((1, 8, 20, 20), (4, 8, 3, 3), {"padding": 24, "dilation": 24}, slice(1, 2), slice(1, 2), {"padding": 0}),
    # rate 12 on an 8x20 map: the middle kernel row, the columns still dilated
    ((1, 8, 8, 20), (4, 8, 3, 3), {"padding": 12, "dilation": 12}, slice(1, 2), slice(0, 3),
     {"padding": (0, 12, 0, 12), "dilation": (1, 12)}),
    # a 3x3 conv on a one-pixel map
    ((1, 8, 1, 1), (4, 8, 3, 3), {"padding": 1}, slice(1, 2), slice(1, 2), {"padding": 0}),
    # a 3x3 conv on a one-row map: its middle row, the columns as they were
    ((1, 8, 1, 16), (4, 8, 3, 3), {"padding": 1}, slice(1, 2), slice(0, 3), {"padding": (0, 1, 0, 1)}),
    # 5x5, padding 2, stride 2 on a 2x2 map: rows 1-4 reach it (row 0 reads padding only)
    ((1, 4, 2, 2), (4, 2, 5, 5), {"padding": 2, "strides": 2, "groups": 2}, slice(2, 4), slice(2, 4),
     {"padding": 0, "strides": 2, "groups": 2}),
])
def test_kernel_taps_that_read_only_padding_are_dropped(x_shape, w_shape, attrs, rows, cols, kept_attrs):
    w = np.random.default_rng(0).standard_normal(w_shape).astype("float32")
    after = DropPaddingTaps()(_conv_module(x_shape, w, **attrs))
    expected = _conv_module(x_shape, np.ascontiguousarray(w[:, :, rows, cols]), **kept_attrs)
    tvm.ir.assert_structural_equal(after, expected)


@pytest.mark.parametrize("x_shape, w_shape, attrs", [
    ((1, 8, 8, 8), (4, 8, 3, 3), {"padding": 1}),                    # every tap reads the map
    ((1, 8, 20, 20), (4, 8, 3, 3), {"padding": 12, "dilation": 12}),  # rate 12: each row reads it somewhere
    ((1, 8, 20, 20), (4, 8, 1, 1), {}),
    ((1, 20, 20, 8), (3, 3, 8, 4), {"padding": 24, "dilation": 24, "data_layout": "NHWC",
                                    "kernel_layout": "HWIO"}),  # not the importer's NCHW / OIHW
])
def test_convs_it_leaves_alone(x_shape, w_shape, attrs):
    w = np.random.default_rng(1).standard_normal(w_shape).astype("float32")
    before = _conv_module(x_shape, w, **attrs)
    tvm.ir.assert_structural_equal(DropPaddingTaps()(before), before)


def test_the_kept_taps_compute_the_same_conv_over_many_geometries():
    """Maps of 1-6 rows, kernels 1-7, padding 0-8 (both sides alike or not), strides 1-3,
    dilations 1-9: wherever taps are dropped, the smaller conv equals the whole one (torch),
    and its output has the same size."""
    import torch

    rng = np.random.default_rng(2)
    dropped = 0
    for size, k, p0, p1, s, d in itertools.product((1, 2, 3, 6), (1, 3, 5, 7), (0, 1, 4, 8), (0, 2, 8), (1, 2, 3),
                                                   (1, 2, 5, 9)):
        if size + p0 + p1 < d * (k - 1) + 1:
            continue
        out = (size + p0 + p1 - d * (k - 1) - 1) // s + 1
        found = real_taps(size, k, (p0, p1), s, d, out)
        if found is None:
            continue
        dropped += 1
        first, last, before, after = found
        x = torch.from_numpy(rng.standard_normal((1, 2, 1, size)).astype("float32"))
        w = torch.from_numpy(rng.standard_normal((3, 2, 1, k)).astype("float32"))
        whole = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (p0, p1)), w, stride=(1, s), dilation=(1, d))
        kept = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (before, after)), w[..., first:last + 1],
                                          stride=(1, s), dilation=(1, d))
        assert kept.shape == whole.shape, (size, k, p0, p1, s, d)
        np.testing.assert_allclose(kept.numpy(), whole.numpy(), rtol=1e-5, atol=1e-5, err_msg=str((size, k, p0, p1, s, d)))
    assert dropped > 100


def _aspp_model(path, size=12):
    """conv 1x1 -> three dilated 3x3 branches (rates 2, 12, 18 on a 12x12 map) -> concat ->
    conv 1x1: DeepLabV3's atrous pyramid in small."""
    rng = np.random.default_rng(4)
    inits, nodes, branches = [], [], []

    def weight(name, shape):
        inits.append(onnx.numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name))
        return name

    nodes.append(helper.make_node("Conv", ["x", weight("w0", (16, 3, 1, 1))], ["f"]))
    for i, rate in enumerate((2, 12, 18)):
        nodes.append(helper.make_node("Conv", ["f", weight(f"w{i + 1}", (8, 16, 3, 3)), weight(f"b{i + 1}", (8,))],
                                      [f"c{i}"], pads=[rate] * 4, dilations=[rate, rate]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        branches.append(f"r{i}")
    nodes.append(helper.make_node("Concat", branches, ["cat"], axis=1))
    nodes.append(helper.make_node("Conv", ["cat", weight("w4", (5, 24, 1, 1))], ["y"]))
    graph = helper.make_graph(nodes, "aspp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, size, size])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_an_atrous_pyramid_matches_onnxruntime_with_its_wide_rates_as_1x1_convs(tmp_path):
    from tvm_compress.loader import load_onnx

    model = _aspp_model(tmp_path / "aspp.onnx")
    mod = load_onnx(model)
    kernels = []

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op.same_as(tvm.ir.Op.get("relax.nn.conv2d")):
            kernels.append(tuple(int(d) for d in list(expr.args[1].ty.shape)[2:]))

    relax.analysis.post_order_visit(mod["main"], visit)
    assert sorted(kernels) == [(1, 1), (1, 1), (1, 1), (1, 1), (3, 3)]  # rates 12 and 18 reach past 12x12
    rep = tvm_compress.compile(model, tmp_path / "aspp.so", target="x86-avx2", bench_runs=0, log=quiet)
    assert rep["verified"] and rep["max_rel_err"] < 1e-5, rep["max_rel_err"]
