"""Channels-last 3-D convolutions (video models): NDHWC layout, weights in panels, bands of
output frames over the kernel frames that read no padding (``targets/packed_conv3d.py``)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

import tvm_compress
from conftest import assert_same_legalized
from tvm_compress.relax_utils import is_constant
from tvm_compress.targets.channels_last import ChannelsLast
from tvm_compress.targets.packed_conv3d import frame_bands
from tvm_compress.targets.packed_dense import PackedDense

quiet = lambda m: None  # noqa: E731
_CALL_TIR = tvm.ir.Op.get("relax.call_tir")
_CONV3D = tvm.ir.Op.get("relax.nn.conv3d")


def test_frame_bands():
    """(first input frame, output frames, first kernel frame, kernel frames) per band."""
    # ResNet3D's last stages: 2 frames, 3 taps, padding 1 -> each frame skips one tap
    assert frame_bands(2, 3, 1, 1, 1, 1) == [(0, 1, 1, 2), (0, 1, 0, 2)]
    assert frame_bands(1, 3, 1, 1, 1, 1) == [(0, 1, 1, 1)]  # one frame: the centre tap only
    assert frame_bands(8, 3, 1, 1, 1, 1) == [(0, 1, 1, 2), (0, 6, 0, 3), (6, 1, 0, 2)]
    assert frame_bands(8, 3, 1, 1, 2, 1) == [(0, 1, 1, 2), (1, 3, 0, 3)]  # stride 2: 4 outputs
    # dilation 2, padding 2: outputs 0-1 read taps 1-2, output 2 all three, outputs 3-4 taps 0-1
    assert frame_bands(5, 3, 2, 2, 1, 2) == [(0, 2, 1, 2), (0, 1, 0, 3), (1, 2, 0, 2)]
    assert frame_bands(2, 1, 1, 1, 1, 1) is None  # the padded outputs read no frame


def _conv3d_module(data_shape, weight_oidhw, **attrs):
    """One NDHWC conv3d on a DHWIO constant weight."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(data_shape, "float32"))
    w = relax.const(np.ascontiguousarray(weight_oidhw.transpose(2, 3, 4, 1, 0)))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.conv3d(x, w, data_layout="NDHWC", kernel_layout="DHWIO", **attrs))
        bb.emit_func_output(out)
    return bb.get()


def _kernels(mod):
    calls = []
    relax.analysis.post_order_visit(mod["main"], lambda e: calls.append(e) if isinstance(e, relax.Call)
                                    and e.op.same_as(_CALL_TIR) else None)
    return calls


@pytest.mark.parametrize("data_shape, weight_shape, attrs, kernels", [
    # 2 frames, 3 taps, padding 1: two bands of one frame and two taps each
    ((1, 2, 6, 5, 16), (32, 16, 3, 3, 3), {"padding": 1}, 2),
    # 1 frame: the centre tap only, one kernel (no concat)
    ((1, 1, 5, 5, 16), (16, 16, 3, 3, 3), {"padding": 1}, 1),
    # 6 frames, stride 2, dilation 2 in time, uneven padding (front 2, back 1), strided map
    ((1, 6, 9, 7, 32), (16, 32, 3, 3, 2), {"strides": (2, 2, 1), "padding": (2, 1, 0, 1, 0, 1),
                                           "dilation": (2, 1, 1)}, 3),
    # a temporal conv of R(2+1)D, (3, 1, 1), on 4 frames: too few products skipped for bands
    ((1, 4, 6, 6, 24), (16, 24, 3, 1, 1), {"padding": (1, 0, 0, 1, 0, 0)}, 1),
])
def test_a_conv3d_runs_by_bands_of_frames_on_one_packed_weight(data_shape, weight_shape, attrs, kernels):
    """As many kernels as bands, every one reading the same packed weight; the same numbers as
    TVM's own conv3d."""
    w = np.random.default_rng(1).standard_normal(weight_shape).astype("float32") * 0.1
    before = _conv3d_module(data_shape, w, **attrs)
    after = PackedDense(8)(before)
    calls = _kernels(after)
    assert len(calls) == kernels
    assert all("packed_conv3d" in c.args[0].name_hint for c in calls)
    weights = {id(c.args[1].fields[1]) for c in calls}
    assert len(weights) == 1 and is_constant(calls[0].args[1].fields[1])
    # [O / P, KT, KH, KW, I, P], P = 16: the tile's two 8-lane registers
    assert tuple(calls[0].args[1].fields[1].ty.shape) == (weight_shape[0] // 16, *weight_shape[2:], weight_shape[1], 16)
    assert_same_legalized(before, after, data_shape, seed=2)


def test_a_1x1x1_conv3d_is_a_dense_layer_over_its_pixels():
    """Strided 1x1x1 (a ResNet3D downsample): its pixels taken by a strided slice, flattened,
    one packed dense kernel."""
    w = np.random.default_rng(3).standard_normal((32, 16, 1, 1, 1)).astype("float32")
    before = _conv3d_module((1, 4, 6, 6, 16), w, strides=2)
    after = PackedDense(8)(before)
    calls = _kernels(after)
    assert len(calls) == 1 and "packed_dense" in calls[0].args[0].name_hint
    assert_same_legalized(before, after, (1, 4, 6, 6, 16), seed=4)


@pytest.mark.parametrize("weight_shape, attrs", [
    ((17, 16, 3, 3, 3), {"padding": 1}),              # 17 channels: no vector width divides them
    ((16, 4, 3, 3, 3), {"padding": 1, "groups": 4}),  # grouped
])
def test_conv3ds_it_leaves_alone(weight_shape, attrs):
    w = np.random.default_rng(5).standard_normal(weight_shape).astype("float32")
    mod = _conv3d_module((1, 2, 5, 5, 16), w, **attrs)
    assert PackedDense(8)(mod).same_as(mod)


def test_channels_last_moves_conv3d_to_ndhwc():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, 4, 7, 7), "float32"))  # rows of 7: channels fill vectors better
    w = relax.const(np.random.default_rng(6).standard_normal((32, 16, 3, 3, 3)).astype("float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.nn.conv3d(x, w, padding=1)))
            out = bb.emit_output(relax.op.nn.conv3d(y, relax.const(np.ones((32, 32, 1, 1, 1), "float32"))))
        bb.emit_func_output(out)
    after = ChannelsLast(16)(bb.get())
    convs = []
    relax.analysis.post_order_visit(after["main"], lambda e: convs.append(e) if isinstance(e, relax.Call)
                                    and e.op.same_as(_CONV3D) else None)
    assert [(str(c.attrs.data_layout), str(c.attrs.kernel_layout)) for c in convs] == [("NDHWC", "DHWIO")] * 2


def _video_model(path):
    """An R(2+1)D-style block on 4 frames of 14x14 (7x7 after the stem: channels-last on 8 and
    16 lanes): a (1, 3, 3) stride (1, 2, 2) stem to 23 channels (no power-of-two vector width:
    padded to whole registers), a (3, 3, 3) conv with temporal stride 2 (bands), a (3, 1, 1)
    temporal conv, a strided 1x1x1 shortcut, the residual add, global pooling and a Gemm."""
    rng = np.random.default_rng(7)

    def init(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype("float32"), name)

    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[0, 1, 1, 0, 1, 1], strides=[1, 2, 2]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1, 1, 1], strides=[2, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 0, 0, 1, 0, 0]),
        helper.make_node("Conv", ["r0", "w3"], ["c3"], strides=[2, 1, 1]),
        helper.make_node("Add", ["c2", "c3"], ["s"]),
        helper.make_node("Relu", ["s"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "w4", "b4"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "video", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 14, 14])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [init("w0", 23, 3, 1, 3, 3), init("b0", 23), init("w1", 32, 23, 3, 3, 3), init("b1", 32),
         init("w2", 48, 32, 3, 1, 1), init("b2", 48), init("w3", 48, 23, 1, 1, 1), init("w4", 10, 48),
         init("b4", 10)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("target", ["x86", "x86-avx2", pytest.param("aarch64", marks=pytest.mark.slow)])
def test_a_video_block_matches_onnxruntime(tmp_path, target):
    """End to end with default schedules (every kernel checked alone): the convs NDHWC, every
    3-D conv a packed kernel (TOPI's conv3d nowhere), the stem's 23 channels padded; verified
    against onnxruntime (under qemu on aarch64)."""
    from tvm_compress.loader import load_onnx
    from tvm_compress.pipeline import lowering_passes
    from tvm_compress.targets import get_target

    model = _video_model(tmp_path / "video.onnx")
    profile = get_target(target)
    with profile.tvm_target():
        lowered = tvm.transform.Sequential(lowering_passes(profile))(load_onnx(model))
    names = [gv.name_hint for gv, f in lowered.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert sum("packed_conv3d" in n for n in names) >= 3, names
    assert not any("conv3d_n" in f.script() for f in lowered.functions.values() if isinstance(f, tvm.tirx.PrimFunc))
    rep = tvm_compress.compile(model, tmp_path / "v.so", target=target, bench_runs=0, log=quiet)
    assert rep["conv_layout"]["layout"] == "NHWC" and rep["conv_layout"]["nhwc_convs"] == 4
    assert rep["verified"] and rep["max_rel_err"] < 1e-5, rep["max_rel_err"]
    assert {layer["op"] for layer in rep["layers"]} == {"conv3d", "matmul"}


def test_an_int8_build_of_a_video_block_keeps_its_conv3ds_channels_last(tmp_path):
    """int8 quantizes the classifier (no int8 conv3d kernel: the report and log say the 3-d
    convs stay float); its kernel reads a pooled vector, no map, so the float conv3ds still go
    channels-last and run as packed kernels."""
    lines = []
    rep = tvm_compress.compile(_video_model(tmp_path / "video.onnx"), tmp_path / "v8.so", target="x86",
                               passes=["quantize"], pass_configs={"quantize": {"calib": "random"}},
                               bench_runs=0, log=lines.append)
    quant = rep["pass_reports"]["quantize"]
    assert [layer["status"] for layer in quant["layers"]] == ["int8"] and quant["float_conv3d"] == 4
    assert any("4 3-d convolutions stay float" in line for line in lines)
    assert rep["conv_layout"]["layout"] == "NHWC" and rep["conv_layout"]["nhwc_convs"] == 4
    assert rep["verified"] and rep["max_rel_err"] < 0.05, rep["max_rel_err"]  # int8 classifier: about 4e-3
