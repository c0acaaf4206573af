"""A conv whose pool reads only its first rows and columns computes just those
(``TrimPooledConv``, a kernel hook of the CPU families): the rewrite as a Before/Expected
pair, the convs it leaves alone, and compiled models against onnxruntime."""

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
from tvm_compress.targets.pooled_conv import TrimPooledConv, pool_reads

quiet = lambda m: None  # noqa: E731


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((1, 32, 7, 7), "float32"), w: R.Tensor((64, 32, 3, 3), "float32"),
             b: R.Tensor((1, 64, 1, 1), "float32")) -> R.Tensor((1, 64, 3, 3), "float32"):
        with R.dataflow():
            c = R.nn.conv2d(x, w, padding=(1, 1, 1, 1))
            a = R.add(b, c)
            r = R.nn.relu(a)
            gv = R.nn.max_pool2d(r, pool_size=(2, 2), strides=(2, 2))
            R.output(gv)
        return gv


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((1, 32, 7, 7), "float32"), w: R.Tensor((64, 32, 3, 3), "float32"),
             b: R.Tensor((1, 64, 1, 1), "float32")) -> R.Tensor((1, 64, 3, 3), "float32"):
        with R.dataflow():
            c = R.nn.conv2d(x, w, padding=(1, 1, 0, 0))
            a = R.add(b, c)
            r = R.nn.relu(a)
            gv = R.nn.max_pool2d(r, pool_size=(2, 2), strides=(2, 2))
            R.output(gv)
        return gv


def test_a_7x7_conv_before_a_2x2_pool_computes_6x6():
    tvm.ir.assert_structural_equal(TrimPooledConv()(Before), Expected)


def test_pool_reads():
    # (kernel, stride, dilation, top padding, output size)
    assert pool_reads(7, (2, 2, 1, 0, 3)) == 6
    assert pool_reads(15, (3, 2, 1, 0, 7)) == 15   # overlapping windows reach the last row
    assert pool_reads(14, (3, 3, 1, 0, 4)) == 12
    assert pool_reads(9, (3, 2, 1, 1, 4)) == 8     # top padding shifts the windows up


def _chain(x_shape, w_shape, pad, pool_kw=None, epilogue="bias", out_pool="max", strides=1):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    w = relax.Var("w", relax.TensorType(w_shape, "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            c = bb.emit(relax.op.nn.conv2d(x, w, strides=strides, padding=pad))
            if epilogue == "bias":
                c = bb.emit(relax.op.add(c, relax.const(np.ones((1, w_shape[0], 1, 1), "float32"))))
            elif epilogue == "residual":  # varies along the map
                c = bb.emit(relax.op.add(c, relax.const(np.ones([int(d) for d in c.ty.shape], "float32"))))
            elif epilogue == "read twice":
                c = bb.emit(relax.op.add(c, c))
            pool = relax.op.nn.max_pool2d if out_pool == "max" else relax.op.nn.avg_pool2d
            out = bb.emit_output(pool(c, **(pool_kw or {"pool_size": 2, "strides": 2})))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("mod", [
    _chain((1, 8, 8, 8), (8, 8, 3, 3), 1),                       # 8x8: the pool reads all of it
    _chain((1, 8, 9, 9), (8, 8, 3, 3), 0),                       # 7x7, no padding to shed
    _chain((1, 8, 7, 7), (8, 8, 3, 3), 1, epilogue="residual"),  # an operand that varies per pixel
    _chain((1, 8, 7, 7), (8, 8, 3, 3), 1, epilogue="read twice"),
    _chain((1, 8, 7, 7), (8, 8, 3, 3), 1, {"pool_size": 2, "strides": 2, "ceil_mode": True}),
    _chain((1, 8, 7, 7), (8, 8, 3, 3), 1, {"pool_size": 2, "strides": 2, "padding": (0, 0, 1, 1)}),
], ids=["whole-map", "no-padding", "residual", "read-twice", "ceil-mode", "pool-padding"])
def test_convs_it_leaves_alone(mod):
    assert TrimPooledConv()(mod).same_as(mod)


def test_a_strided_conv_sheds_what_padding_it_has():
    """A stride-2 conv sheds two rows of padding per output row it does not compute: of its 4x5
    outputs the 3x3 average pool reads 3x3; 2 columns of padding pay for one column, not two."""
    mod = _chain((1, 4, 7, 9), (4, 4, 5, 5), 2, {"pool_size": 3, "strides": 3}, out_pool="avg", strides=2)
    out = TrimPooledConv()(mod)
    conv = next(b.value for b in out["main"].body.blocks[0].bindings
                if isinstance(b.value, relax.Call) and b.value.op.same_as(tvm.ir.Op.get("relax.nn.conv2d")))
    assert [int(d) for d in conv.ty.shape] == [1, 4, 3, 4]
    assert [int(p) for p in conv.attrs.padding] == [2, 2, 0, 0]
    assert [int(d) for d in out["main"].ret_ty.shape] == [1, 4, 1, 1]


def _pooled_model(path):
    """Conv blocks on odd maps whose pools leave the last rows and columns unread, as in
    LeNet- and VGG-style stacks: 15x15 -> 2x2 max pool, a stride-2 5x5 conv -> 3x3 average
    pool, then a dense head."""
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype("float32") * 0.3
    b1 = rng.standard_normal(8).astype("float32") * 0.1
    w2 = rng.standard_normal((16, 8, 5, 5)).astype("float32") * 0.1
    b2 = rng.standard_normal(16).astype("float32") * 0.1
    wf = rng.standard_normal((16, 10)).astype("float32") * 0.3
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),   # 15 -> 7
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[2, 2, 2, 2], strides=[2, 2]),  # 7 -> 4
        helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"]),
        helper.make_node("AveragePool", ["r2"], ["p2"], kernel_shape=[3, 3], strides=[3, 3]),  # 4 -> 1
        helper.make_node("Flatten", ["p2"], ["f"]),
        helper.make_node("MatMul", ["f", "wf"], ["y"]),
    ]
    inits = [numpy_helper.from_array(v, n) for n, v in
             (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2), ("wf", wf),
              ("lo", np.array(0, "float32")), ("hi", np.array(6, "float32")))]
    graph = helper.make_graph(nodes, "pooled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 15, 15])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="module")
def pooled_model(tmp_path_factory):
    return _pooled_model(tmp_path_factory.mktemp("models") / "pooled.onnx")


@pytest.mark.parametrize("target,passes", [("x86", ()), ("x86-avx2", ()), ("x86-avx2", ("quantize",)),
                                           pytest.param("aarch64", (), marks=pytest.mark.slow)])
def test_trimmed_convs_match_onnxruntime(pooled_model, tmp_path, target, passes):
    if target == "aarch64":
        from tvm_compress.targets import qemu

        ok, why = qemu.can_run("aarch64")
        if not ok:
            pytest.skip(why)
    configs = {"quantize": {"calib": "random"}} if passes else None
    rep = tvm_compress.compile(pooled_model, tmp_path / "p.so", target=target, passes=list(passes),
                               pass_configs=configs, bench_runs=0, log=quiet)
    assert rep["verified"], rep
    # int8: the requantize's rounding; float: exact up to the sums' order
    assert rep["max_rel_err"] < (0.1 if passes else 1e-5), rep["max_rel_err"]


def _vgg_model(path):
    """Three conv -> bias -> ReLU (or ReLU6) -> 2x2 max pool blocks, VGG-style, 32x32 -> 4x4,
    then a dense head: each conv takes its pool into its kernel (``PackedDense``)."""
    rng = np.random.default_rng(4)
    nodes, inits, src = [], [], "x"
    for i, (ci, co) in enumerate(((3, 16), (16, 32), (32, 32))):
        inits += [numpy_helper.from_array(rng.standard_normal((co, ci, 3, 3)).astype("float32") * (2 / (9 * ci)) ** 0.5, f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal(co).astype("float32") * 0.1, f"b{i}")]
        nodes.append(helper.make_node("Conv", [src, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]) if i < 2 else
                     helper.make_node("Clip", [f"c{i}", "lo", "hi"], [f"r{i}"]))
        nodes.append(helper.make_node("MaxPool", [f"r{i}"], [f"p{i}"], kernel_shape=[2, 2], strides=[2, 2]))
        src = f"p{i}"
    nodes += [helper.make_node("Flatten", [src], ["f"]), helper.make_node("MatMul", ["f", "wf"], ["y"])]
    inits += [numpy_helper.from_array(rng.standard_normal((512, 10)).astype("float32") * 0.05, "wf"),
              numpy_helper.from_array(np.array(0, "float32"), "lo"), numpy_helper.from_array(np.array(6, "float32"), "hi")]
    graph = helper.make_graph(nodes, "vgg", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="module")
def vgg_model(tmp_path_factory):
    return _vgg_model(tmp_path_factory.mktemp("models") / "vgg.onnx")


@pytest.mark.parametrize("target", ["x86", "x86-avx2", pytest.param("aarch64", marks=pytest.mark.slow)])
def test_convs_with_their_pools_in_one_kernel_match_onnxruntime(vgg_model, tmp_path, target):
    if target == "aarch64":
        from tvm_compress.targets import qemu

        ok, why = qemu.can_run("aarch64")
        if not ok:
            pytest.skip(why)
    rep = tvm_compress.compile(vgg_model, tmp_path / "v.so", target=target, bench_runs=0, log=quiet)
    assert rep["verified"] and rep["max_rel_err"] < 1e-5, rep["max_rel_err"]
    assert rep["kernel_check"]["checked"] > 0 and not rep["kernel_check"]["failed"]


def test_a_vgg_style_cnn_is_timed_in_both_layouts_and_takes_its_pools_into_its_convs(vgg_model, tmp_path, monkeypatch):
    """2.2M MACs, channels-last estimated 1.00x on AVX2: both layouts are built and timed. Here the
    clock is a stand-in that favours NHWC, where each conv takes its 2x2 pool into its kernel:
    8 kernels in NCHW (3 convs, 3 pools), 6 in NHWC."""
    from tvm_compress import build

    monkeypatch.setenv("TVM_COMPRESS_CACHE", str(tmp_path / "cache"))
    timed = []

    def clock(mods, inputs, *_):
        timed.append([str(m.attrs["tvm_compress.conv_layout_pin"]) for m in mods])
        return [2.0, 1.0]

    monkeypatch.setattr(build, "measure_on_target", clock)
    rep = tvm_compress.compile(vgg_model, tmp_path / "v.so", target="x86-avx2", bench_runs=0, log=quiet)
    assert timed == [["NCHW", "NHWC"]]
    assert rep["conv_layout"]["layout"] == "NHWC" and rep["conv_layout"]["nhwc_convs"] == 3
    assert rep["kernel_check"]["checked"] == 6, rep["kernel_check"]["kernels"]
    assert rep["verified"] and rep["max_rel_err"] < 1e-5
