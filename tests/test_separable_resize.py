"""Bilinear upsampling in two passes (``SeparableResize``, a kernel hook of the CPU families):
the rewrite, the resizes it leaves alone, the kernel bit-identical to the legalized resize
over coordinate modes and shapes, its row pass kept out of the output loop by the default
schedule, and models against onnxruntime on x86 and under qemu on aarch64."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper
from tvm import relax, te, topi

import tvm_compress
from tvm_compress.targets.separable_resize import SeparableResize, separable_resize2d

quiet = lambda m: None  # noqa: E731


def _resize_module(x_shape, size, layout="NCHW", method="linear", mode="half_pixel", dtype="float32"):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.image.resize2d(x, size, layout=layout, method=method,
                                                coordinate_transformation_mode=mode))
            y = bb.emit(relax.op.sigmoid(y))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _expected(x_shape, size, mode):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(bb.call_te(separable_resize2d, x, *size, mode, primfunc_name_hint="resize2d",
                                   primfunc_attrs={"op_pattern": 2}))
            y = bb.emit(relax.op.sigmoid(y))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("mode", ["half_pixel", "align_corners"])
def test_an_upsampling_bilinear_resize_gets_the_two_pass_kernel(mode):
    before = _resize_module((1, 21, 40, 40), (320, 320), mode=mode)
    tvm.ir.assert_structural_equal(SeparableResize()(before), _expected((1, 21, 40, 40), (320, 320), mode))


@pytest.mark.parametrize("x_shape, size, attrs", [
    ((1, 8, 10, 10), (20, 20), {"method": "nearest_neighbor"}),
    ((1, 8, 10, 10), (20, 20), {"method": "cubic"}),
    ((1, 10, 10, 8), (20, 20), {"layout": "NHWC"}),  # channels innermost: no gathers to save
    ((1, 8, 40, 10), (10, 20), {}),  # shorter than its input: rows no output reads
    ((1, 8, 10, 10), (10, 10), {}),  # the same size
    ((1, 8, 10, 10), (20, 20), {"mode": "tf_crop_and_resize"}),
    ((1, 8, 10, 10), (20, 20), {"dtype": "float16"}),
])
def test_resizes_it_leaves_alone(x_shape, size, attrs):
    before = _resize_module(x_shape, size, **attrs)
    tvm.ir.assert_structural_equal(SeparableResize()(before), before)


@pytest.mark.parametrize("x_shape, size, mode", [
    ((1, 21, 40, 40), (320, 320), "half_pixel"),      # a segmentation head's 8x
    ((2, 3, 7, 5), (15, 12), "align_corners"),        # odd factors, batch 2
    ((1, 4, 10, 10), (25, 17), "asymmetric"),
    ((1, 4, 3, 6), (8, 1), "pytorch_half_pixel"),     # one output column: column 0 of the input
    ((1, 4, 1, 1), (9, 9), "half_pixel"),             # one pixel broadcast
])
def test_the_two_pass_kernel_equals_the_legalized_resize(x_shape, size, mode):
    """Both kernels under the default CPU schedule: the same bits (the same blends, in TOPI's
    order), and the row pass a loop nest of its own."""
    from tvm_compress.targets import get_target
    from tvm_compress.targets.cpu_schedule import CPUFallback

    profile = get_target("x86-avx2")
    target = profile.tvm_target()
    x = te.placeholder(x_shape, "float32", name="x")
    xv = tvm.runtime.tensor(np.random.default_rng(0).standard_normal(x_shape).astype("float32"))
    out_shape = (*x_shape[:2], *size)
    got = {}
    for name, y in (("legalized", topi.image.resize2d(x, [0.0] * 4, size, "NCHW", "linear", mode)),
                    ("two-pass", separable_resize2d(x, *size, mode))):
        sch = CPUFallback(lanes=8).apply(te.create_prim_func([x, y]), target, False)
        if name == "two-pass":
            assert [b.name_hint for b in _blocks(sch.mod["main"])] == ["resize_rows", "resize"]
        out = tvm.runtime.tensor(np.full(out_shape, np.nan, "float32"))
        tvm.compile(sch.mod, target)(xv, out)
        got[name] = out.numpy()
    np.testing.assert_array_equal(got["two-pass"], got["legalized"])


def _blocks(func) -> list:
    import tvm_ffi

    found = []
    tvm_ffi.structural_walk(func.body, [(tvm.s_tir.SBlock, found.append)], order="pre")
    return [b for b in found if b.name_hint != "root"]


def _segmentation_head(path, channels=24, classes=5, size=20, factor=8, mode="half_pixel"):
    """conv 3x3 -> relu -> conv 1x1 to the classes -> bilinear upsampling: a segmentation
    model's head, its output NCHW."""
    rng = np.random.default_rng(3)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.2, n) for n, s in (
        ("w1", (channels, 3, 3, 3)), ("b1", (channels,)), ("w2", (classes, channels, 1, 1)), ("b2", (classes,)))]
    out = size * factor
    inits.append(onnx.numpy_helper.from_array(np.array([1, classes, out, out], np.int64), "sizes"))
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"]),
        helper.make_node("Resize", ["c2", "", "", "sizes"], ["y"], mode="linear",
                         coordinate_transformation_mode=mode),
    ]
    graph = helper.make_graph(nodes, "seg", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, classes, out, out])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("target", ["x86-avx2", pytest.param("aarch64", marks=pytest.mark.slow)])
def test_a_segmentation_head_matches_onnxruntime(tmp_path, target):
    """Channels-last convs, then the upsampling to the NCHW output: the transpose moves before
    the resize (the smaller map), which runs as the two-pass kernel."""
    from tvm_compress.loader import load_onnx
    from tvm_compress.pipeline import lowering_passes
    from tvm_compress.targets import get_target

    if target == "aarch64":
        from tvm_compress.targets import qemu

        ok, why = qemu.can_run("aarch64")
        if not ok:
            pytest.skip(why)
    model = _segmentation_head(tmp_path / "seg.onnx")
    profile = get_target(target)
    with profile.tvm_target():
        lowered = tvm.transform.Sequential(lowering_passes(profile))(load_onnx(model))
    kernels = [f for f in lowered.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert sum("resize_rows" in [b.name_hint for b in _blocks(f)] for f in kernels) == 1
    rep = tvm_compress.compile(model, tmp_path / "seg.so", target=target, bench_runs=0, log=quiet)
    assert rep["verified"] and rep["max_rel_err"] < 1e-5, rep["max_rel_err"]


def test_an_int8_segmentation_head_upsamples_in_two_passes_too(tmp_path):
    """Quantized, the convs keep int8 activations channels-last (``Int8ChannelsLast``); its
    transpose to the NCHW output moves before the float resize as in the float build."""
    from tvm_compress.loader import load_onnx
    from tvm_compress.passes import Quantize, QuantizeConfig
    from tvm_compress.pipeline import lowering_passes
    from tvm_compress.pass_registry import PassEnv
    from tvm_compress.targets import get_family, get_target

    model = _segmentation_head(tmp_path / "seg.onnx")
    profile = get_target("x86-avx2")
    env = PassEnv(facts=get_family(profile.family).facts(profile), log=quiet)
    mod = Quantize(QuantizeConfig(calib="random", calib_samples=8), env)(load_onnx(model))
    with profile.tvm_target():
        lowered = tvm.transform.Sequential(lowering_passes(profile))(mod)
    kernels = [f for f in lowered.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert sum("resize_rows" in [b.name_hint for b in _blocks(f)] for f in kernels) == 1
    rep = tvm_compress.compile(model, tmp_path / "seg.so", target="x86-avx2", passes="quantize",
                               pass_configs={"quantize": {"calib": "random"}}, bench_runs=0, log=quiet)
    assert rep["verified"]


def test_metaschedule_tunes_the_two_pass_kernel(tmp_path):
    """A few trials: MetaSchedule reads the row pass's annotation (TVM's ``inline_rule``, a
    string) without error, and the tuned library still matches onnxruntime."""
    model = _segmentation_head(tmp_path / "seg.onnx", size=10, factor=4)
    rep = tvm_compress.compile(model, tmp_path / "seg.so", target="x86-avx2", tune_trials=6, bench_runs=0, log=quiet)
    assert rep["verified"] and rep["max_rel_err"] < 1e-5, rep["max_rel_err"]
