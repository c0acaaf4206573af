"""Float depthwise convs in a kernel of their own (``FloatDepthwise``, a kernel hook of the CPU
families): channels-last ones read their padding inline, those on maps shorter than their
kernel run over the kernel rows that reach the map. The rewrite, the convs it leaves alone,
the kernel against numpy on strides, dilations and uneven padding, and models against
onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

import tvm_compress
from tvm_compress.targets.conv_geometry import conv_geometry, first_row, real_rows, row_window
from tvm_compress.targets.float_depthwise import FloatDepthwise, depthwise_conv2d

quiet = lambda m: None  # noqa: E731


def _weight(channels, kh, kw, layout, seed=0):
    w = np.random.default_rng(seed).standard_normal((channels, 1, kh, kw)).astype("float32")
    return w if layout == "NCHW" else w.transpose(2, 3, 1, 0).copy()


def _conv_module(x_shape, w, layout="NCHW", relu=True, **attrs):
    """``conv2d(x, w) [-> relu]`` with ``w`` a constant; a depthwise conv by default."""
    kernel_layout = "OIHW" if layout == "NCHW" else "HWIO"
    attrs.setdefault("groups", x_shape[1] if layout == "NCHW" else x_shape[3])
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), data_layout=layout, kernel_layout=kernel_layout, **attrs))
            if relu:
                y = bb.emit(relax.op.nn.relu(y))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _expected(x_shape, w, layout, strides, padding, dilation):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(bb.call_te(depthwise_conv2d, x, relax.const(w), strides, padding, dilation, layout,
                                   primfunc_name_hint="depthwise_conv2d", primfunc_attrs={"op_pattern": 4}))
            y = bb.emit(relax.op.nn.relu(y))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def test_row_window_of_a_5x5_kernel_on_few_rows():
    """Per output row the kernel rows that read the map: 3 rows of 5 on a 3-row map, starting
    at kernel rows 2, 1, 0; 4 rows on 4, the first and last rows starting one padding row early
    (kernel rows 1-4 and 0-3)."""
    g3 = conv_geometry(3, 96, 5, 5, (2, 2, 2, 2), (1, 1), (1, 1))
    assert real_rows(3, 5, g3) == [3, 3, 3] and row_window(3, 5, g3) == 3
    assert [int(first_row(tvm.tirx.IntImm("int64", y), 5, 3, g3)) for y in range(3)] == [2, 1, 0]
    g4 = conv_geometry(4, 96, 5, 5, (2, 2, 2, 2), (1, 1), (1, 1))
    assert real_rows(4, 5, g4) == [3, 4, 4, 3] and row_window(4, 5, g4) == 4
    assert [int(first_row(tvm.tirx.IntImm("int64", y), 5, 4, g4)) for y in range(4)] == [1, 1, 0, 0]
    assert row_window(6, 5, conv_geometry(6, 96, 5, 5, (2, 2, 2, 2), (1, 1), (1, 1))) == 5


def test_every_real_kernel_row_lies_in_the_window():
    """For maps of 1-5 rows, 3x3-7x7 kernels, padding 0-3, strides 1-2 and dilations 1-3: a
    reduction over ``first_row(y) + t`` (t < window), compiled, sums exactly the kernel rows
    that read the map plus padding rows (a weight of 10^r per kernel row r shows which)."""
    import itertools

    from tvm import te

    checked = 0
    for h, k, pad, s, d in itertools.product((1, 2, 3, 4, 5), (3, 5, 7), (0, 1, 2, 3), (1, 2), (1, 2, 3)):
        g = conv_geometry(h, 9, k, k, [pad] * 4, [s, s], [d, d])
        oh, window = g[3][0], row_window(h, k, g) if g[3][0] >= 1 else k
        if oh < 1 or window == k:
            continue
        w = te.placeholder((k,), "float32", name="w")
        t = te.reduce_axis((0, window), "t")
        rows = te.compute((oh,), lambda y: te.sum(w[first_row(y, k, window, g) + t], axis=[t]), name="rows")
        out = tvm.runtime.tensor(np.zeros(oh, "float32"))
        tvm.compile(te.create_prim_func([w, rows]), "llvm")(tvm.runtime.tensor(10.0 ** np.arange(k, dtype="float32")), out)
        for y, got in enumerate(out.numpy()):
            taken = [int(c) for c in f"{int(round(float(got))):0{k}d}"[::-1]]
            assert sum(taken) == window, (h, k, pad, s, d, y, taken)
            for r in range(k):
                if pad <= y * s + r * d < h + pad:
                    assert taken[r] == 1, (h, k, pad, s, d, y, taken)
        checked += 1
    assert checked > 50


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_a_depthwise_conv_on_three_rows_runs_its_row_window(layout):
    x_shape = (1, 24, 3, 40) if layout == "NCHW" else (1, 3, 40, 24)
    w = _weight(24, 5, 5, layout)
    after = FloatDepthwise()(_conv_module(x_shape, w, layout, padding=(2, 2)))
    expected = _expected(x_shape, w, layout, [1, 1], [2, 2, 2, 2], [1, 1])
    tvm.ir.assert_structural_equal(after, expected)


@pytest.mark.parametrize("x_shape", [(1, 40, 40, 24), (1, 3, 40, 24)])
def test_a_padded_channels_last_depthwise_conv_reads_its_padding_inline(x_shape):
    """NHWC with padding, on a tall map (whole window) or a short one: one kernel, no pad
    kernel before it."""
    from tvm_compress.pipeline import lowering_passes
    from tvm_compress.targets import get_target

    w = _weight(24, 5, 5, "NHWC")
    before = _conv_module(x_shape, w, "NHWC", padding=(2, 2))
    tvm.ir.assert_structural_equal(FloatDepthwise()(before), _expected(x_shape, w, "NHWC", [1, 1], [2, 2, 2, 2], [1, 1]))
    profile = get_target("x86-avx2")
    with profile.tvm_target():
        lowered = tvm.transform.Sequential(lowering_passes(profile))(before)
    (kernel,) = [f for f in lowered.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    script = kernel.script()
    assert 'T.sblock("depthwise_conv2d")' in script and "pad" not in script.replace("padding", "")


@pytest.mark.parametrize("x_shape, weight_shape, attrs", [
    ((1, 24, 6, 40), (24, 1, 5, 5), {"padding": (2, 2)}),  # NCHW, rows enough: the window is the kernel
    ((1, 24, 3, 40), (24, 1, 1, 5), {"padding": (0, 2)}),  # one kernel row
    ((1, 24, 3, 40), (24, 2, 5, 5), {"padding": (2, 2), "groups": 12}),  # grouped, not depthwise
    ((1, 24, 3, 40), (48, 1, 5, 5), {"padding": (2, 2)}),  # a channel multiplier of 2
    ((1, 24, 3, 40), (24, 24, 5, 5), {"padding": (2, 2), "groups": 1}),  # a regular conv
    ((1, 24, 8, 40), (24, 1, 3, 3), {"padding": (0, 0), "layout": "NHWC"}),  # NHWC without padding
])
def test_convs_it_leaves_alone(x_shape, weight_shape, attrs):
    w = np.random.default_rng(1).standard_normal(weight_shape).astype("float32")
    attrs = dict(attrs)
    layout = attrs.pop("layout", "NCHW")
    if layout == "NHWC":
        x_shape, w = (x_shape[0], x_shape[2], x_shape[3], x_shape[1]), w.transpose(2, 3, 1, 0).copy()
    before = _conv_module(x_shape, w, layout, **attrs)
    tvm.ir.assert_structural_equal(FloatDepthwise()(before), before)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("rows, k, strides, padding, dilation", [
    (9, 3, (1, 1), (1, 1, 1, 1), (1, 1)),  # tall: the whole kernel (NHWC: padding inline)
    (9, 5, (2, 2), (2, 1, 1, 2), (1, 1)),  # tall, strided, uneven padding
    (3, 5, (1, 1), (2, 2, 2, 2), (1, 1)),
    (2, 5, (1, 1), (2, 2, 2, 2), (1, 1)),
    (4, 5, (1, 1), (2, 2, 2, 2), (1, 1)),  # rows starting on a padding row
    (3, 3, (1, 1), (2, 2, 2, 2), (2, 2)),  # dilated
    (4, 5, (2, 2), (2, 2, 2, 2), (1, 1)),  # strided
    (3, 5, (1, 1), (2, 2, 1, 2), (1, 1)),  # less padding below (a trimmed conv before a pool)
])
def test_the_windowed_kernel_equals_numpy(layout, rows, k, strides, padding, dilation):
    from tvm_compress.pipeline import Schedule, lowering_passes
    from tvm_compress.targets import get_target

    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 16, rows, 21)).astype("float32")
    w = rng.standard_normal((16, 1, k, k)).astype("float32")
    xin = x if layout == "NCHW" else x.transpose(0, 2, 3, 1).copy()
    win = w if layout == "NCHW" else w.transpose(2, 3, 1, 0).copy()
    mod = _conv_module(xin.shape, win, layout, relu=False, strides=strides, padding=padding, dilation=dilation)
    profile = get_target("x86-avx2")
    with profile.tvm_target():
        lowered = tvm.transform.Sequential(lowering_passes(profile))(mod)
    kernels = [gv.name_hint for gv, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert any("depthwise_conv2d" in k for k in kernels) or (layout == "NCHW" and rows == 9), kernels
    ex = tvm.compile(Schedule(profile)(lowered), profile.tvm_target())
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(xin)).numpy()
    if layout == "NHWC":
        got = got.transpose(0, 3, 1, 2)
    # numpy reference: every tap, padding included
    pt, pl, pb, pr = padding
    xp = np.pad(x.astype("float64"), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    (_, _, _, _), (sh, sw), (dh, dw), (oh, ow) = conv_geometry(rows, 21, k, k, padding, strides, dilation)
    ref = np.zeros((1, 16, oh, ow))
    for r in range(k):
        for c in range(k):
            ref += xp[:, :, r * dh:r * dh + sh * (oh - 1) + 1:sh, c * dw:c * dw + sw * (ow - 1) + 1:sw] \
                * w[None, :, 0, r, c, None, None]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def _text_line_model(path, rows: int, width: int = 48):
    """A MobileNetV3 block on a text line's last stage: 1x1 expand -> HardSwish -> 5x5 depthwise
    (padding 2) -> HardSwish -> 1x1 project, on a map of ``rows`` x ``width``."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype("float32"), n) for n, s in (
        ("w0", (40, 16, 1, 1)), ("b0", (40,)), ("w1", (40, 1, 5, 5)), ("b1", (40,)), ("w2", (16, 40, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"]),
             helper.make_node("HardSwish", ["c0"], ["h0"]),
             helper.make_node("Conv", ["h0", "w1", "b1"], ["c1"], group=40, pads=[2, 2, 2, 2]),
             helper.make_node("HardSwish", ["c1"], ["h1"]),
             helper.make_node("Conv", ["h1", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "line", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, rows, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, rows, width])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("target, width, inline", [
    ("x86-avx2", 48, False),  # NCHW (the layout estimate): the row window on a padded copy
    ("x86-avx2", 7, True),    # channels-last: the row window reading its padding inline
    pytest.param("aarch64", 7, True, marks=pytest.mark.slow),
])
def test_a_text_line_block_matches_onnxruntime(tmp_path, target, width, inline):
    from tvm_compress.loader import load_onnx
    from tvm_compress.pipeline import lowering_passes
    from tvm_compress.targets import get_target

    if target == "aarch64":
        from tvm_compress.targets import qemu

        ok, why = qemu.can_run("aarch64")
        if not ok:
            pytest.skip(why)
    model = _text_line_model(tmp_path / "line.onnx", 3, width)
    profile = get_target(target)
    with profile.tvm_target():
        lowered = tvm.transform.Sequential(lowering_passes(profile))(load_onnx(model))
    (kernel,) = [f for gv, f in lowered.functions_items()
                 if isinstance(f, tvm.tirx.PrimFunc) and "depthwise_conv2d" in gv.name_hint]
    assert ("pad_temp" not in kernel.script()) == inline
    rep = tvm_compress.compile(model, tmp_path / "line.so", target=target, bench_runs=0, log=quiet)
    assert rep["verified"] and rep["max_rel_err"] < 1e-5, rep["max_rel_err"]
