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
from conftest import assert_same_legalized, bound
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
            # The register tile on the stack ("global" under 1 KiB), not from the workspace
            # pool ("local": an alloc/free pair per parallel iteration).
            scopes = {b.name: b.scope() for b in mod[gv].body.block.alloc_buffers}
            assert scopes and set(scopes.values()) == {"global"}, scopes
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


# ---- 1x1 channels-last convs: dense layers over the flattened map ---------------------------

def _nhwc_conv(data, weight_oihw, **attrs):
    """conv2d in NHWC/HWIO of an OIHW constant, as ``ConvertLayout`` leaves it."""
    w = relax.op.permute_dims(relax.const(weight_oihw), [2, 3, 1, 0])
    return relax.op.nn.conv2d(data, w, data_layout="NHWC", kernel_layout="HWIO", **attrs)


def _two_convs():
    """x [1, 7, 9, 24] -> 1x1 conv to 40 + bias -> relu -> 1x1 conv to 16 -> output."""
    rng = np.random.default_rng(6)
    w1 = rng.standard_normal((40, 24, 1, 1)).astype("float32")
    b1 = rng.standard_normal((1, 1, 1, 40)).astype("float32")
    w2 = rng.standard_normal((16, 40, 1, 1)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 7, 9, 24), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            w1t = bb.emit(relax.op.permute_dims(relax.const(w1), [2, 3, 1, 0]))
            y = bb.emit(relax.op.nn.conv2d(x, w1t, data_layout="NHWC", kernel_layout="HWIO"))
            y = bb.emit(relax.op.add(y, relax.const(b1)))
            y = bb.emit(relax.op.nn.relu(y))
            w2t = bb.emit(relax.op.permute_dims(relax.const(w2), [2, 3, 1, 0]))
            out = bb.emit_output(relax.op.nn.conv2d(y, w2t, data_layout="NHWC", kernel_layout="HWIO"))
        bb.emit_func_output(out)
    return bb.get(), (w1, b1, w2)


def _expected_two_convs(w1, b1, w2):
    from tvm_compress.targets.packed_dense import packed_dense

    attrs = {"op_pattern": 4}
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 7, 9, 24), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            flat = bb.emit(relax.op.reshape(x, [1, 63, 24]))
            # 40 columns: panels of 8 on 8 lanes
            y = bb.emit_te(packed_dense, flat, relax.const(pack_weight(w1[:, :, 0, 0].T.copy(), 8)),
                           primfunc_name_hint="packed_dense", primfunc_attrs=attrs)
            y = bb.emit(relax.op.add(y, relax.const(b1.reshape(1, 1, 40))))
            y = bb.emit(relax.op.nn.relu(y))
            # the relu's flat output feeds the next conv: no reshape between the two; 16 columns
            # are one tile row: one panel, the weight as it is
            z = bb.emit_te(packed_dense, y, relax.const(w2[:, :, 0, 0].T.copy()[None]),
                           primfunc_name_hint="packed_dense", primfunc_attrs=attrs)
            out = bb.emit_output(relax.op.reshape(z, [1, 7, 9, 16]))
        bb.emit_func_output(out)
    return bb.get()


def test_consecutive_1x1_convs_run_as_dense_layers_on_the_flattened_map():
    before, weights = _two_convs()
    after = PackedDense(8)(before)
    tvm.ir.assert_structural_equal(after, _expected_two_convs(*weights))


def test_a_requantize_after_a_flattened_conv_moves_to_the_flat_side():
    """A float layer of an int8 build ends in a requantize (scale, round, clamp, cast): all of it
    on the flat side, so FuseOps puts it into the dense kernel (across the reshape it did not,
    and an int8 build's kept-float layers ran a requantize kernel of their own)."""
    from tvm_compress.targets.packed_dense import packed_dense

    w = np.random.default_rng(8).standard_normal((40, 24, 1, 1)).astype("float32")

    def requantize(bb, y):
        y = bb.emit(relax.op.multiply(y, relax.const(np.float32(12.5))))
        y = bb.emit(relax.op.round(y))
        y = bb.emit(relax.op.clip(y, -128, 127))
        return relax.op.astype(y, "int8")

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 7, 9, 24), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(_nhwc_conv(x, w))
            out = bb.emit_output(requantize(bb, y))
        bb.emit_func_output(out)
    after = PackedDense(8)(bb.get())

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 7, 9, 24), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            flat = bb.emit(relax.op.reshape(x, [1, 63, 24]))
            y = bb.emit_te(packed_dense, flat, relax.const(pack_weight(w[:, :, 0, 0].T.copy(), 8)),
                           primfunc_name_hint="packed_dense", primfunc_attrs={"op_pattern": 4})
            q = bb.emit(requantize(bb, y))
            out = bb.emit_output(relax.op.reshape(q, [1, 7, 9, 40]))
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(after, bb.get())


def _flat_conv(x_shape, out_shape, w, panel, rows, strides=None):
    """Expected module of a 1x1 conv run flattened: (a strided slice of the pixels it reads,)
    a reshape to rows of pixels, the dense kernel on ``rows`` rows, a reshape back."""
    from tvm_compress.targets.packed_dense import packed_dense

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            px = x if strides is None else bb.emit(relax.op.strided_slice(
                x, axes=[1, 2], begin=[0, 0], end=list(x_shape[1:3]), strides=[strides] * 2))
            flat = bb.emit(relax.op.reshape(px, [1, out_shape[1] * out_shape[2], x_shape[3]]))
            y = bb.emit_te(packed_dense, flat, relax.const(pack_weight(w[:, :, 0, 0].T.copy(), panel)), rows,
                           primfunc_name_hint="packed_dense", primfunc_attrs={"op_pattern": 4})
            out = bb.emit_output(relax.op.reshape(y, list(out_shape)))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("rows,columns,lanes,expected", [
    (49, 2048, 8, 50),     # 7x7 map, 2-register vectors: at most 6 rows, 49 = 7 x 7 -> 5 x 10
    (169, 384, 16, 170),   # 13x13: 169 = 13 x 13 -> 5 x 34
    (63, 40, 8, 63),       # 7 x 9: tiles of 7 rows divide it
    (200, 384, 8, 200),    # 8 x 25
    (2704, 96, 8, 2704),   # 52x52: tiles of 4 rows already (5 or 6 measured no faster)
    (1, 2048, 8, 1),       # one row: nothing to tile
])
def test_dense_rows_pads_only_where_the_tile_estimate_gains(rows, columns, lanes, expected):
    from tvm_compress.targets.cpu_schedule import dense_rows

    assert dense_rows(rows, columns, lanes) == expected


def test_a_map_no_row_tile_divides_runs_on_padded_rows():
    """13 x 13 = 169 pixels: no register tile divides them but one row, and tiles of one row
    read every weight vector once per pixel (YOLOX's 13x13 neck convs at half the FMA rate).
    The kernel computes 170 rows (tiles of 10 rows x 8 columns), the rows past the map
    repeating its last pixel, and keeps 169: no pad or slice kernel around it."""
    w = np.random.default_rng(10).standard_normal((40, 24, 1, 1)).astype("float32")
    after = PackedDense(8)(_conv_module((1, 13, 13, 24), w))
    tvm.ir.assert_structural_equal(after, _flat_conv((1, 13, 13, 24), (1, 13, 13, 40), w, 8, 170))


def test_the_flattened_convs_equal_the_convs():
    before, _ = _two_convs()
    assert_same_legalized(before, PackedDense(8)(before), (1, 7, 9, 24), seed=7)


def _conv_module(data_shape, weight, **attrs):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(data_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(_nhwc_conv(x, weight, **attrs) if attrs.get("data_layout") is None
                                 else relax.op.nn.conv2d(x, relax.const(weight), **attrs))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("data_shape,weight_shape,attrs", [
    ((1, 14, 14, 32), (32, 1, 1, 1), {"groups": 32}),              # grouped (depthwise 1x1)
    ((1, 14, 14, 32), (32, 1, 3, 3), {"groups": 32, "padding": 1}),  # depthwise 3x3
    ((1, 1, 1, 256), (64, 256, 1, 1), {}),                         # one pixel (squeeze-excite)
    ((1, 32, 14, 14), (64, 32, 1, 1), {"data_layout": "NCHW"}),    # kept NCHW
    ((1, 14, 14, 32), (8, 32, 3, 3), {"padding": 1}),              # 8 channels: one panel already
])
def test_convs_it_leaves_alone(data_shape, weight_shape, attrs):
    w = np.random.default_rng(8).standard_normal(weight_shape).astype("float32")
    mod = _conv_module(data_shape, w, **attrs)
    assert PackedDense(8)(mod).same_as(mod)


def test_a_strided_1x1_conv_takes_its_pixels_then_runs_flattened():
    """stride 2 on 14x14 -> the 7x7 pixels it reads (a strided slice, a copy), flattened: 49
    rows, padded to 50 inside the dense kernel (16-wide vectors: tiles of at most 6 rows)."""
    w = np.random.default_rng(11).standard_normal((128, 32, 1, 1)).astype("float32")
    before = _conv_module((1, 14, 14, 32), w, strides=2)
    after = PackedDense(8)(before)
    tvm.ir.assert_structural_equal(after, _flat_conv((1, 14, 14, 32), (1, 7, 7, 128), w, 16, 50, strides=2))
    assert_same_legalized(before, after, (1, 14, 14, 32), seed=12)


@pytest.mark.parametrize("data_shape,weight_shape,attrs", [
    ((1, 14, 14, 32), (64, 32, 1, 1), {"padding": 1}),             # padded 1x1: the border is no product
    ((1, 14, 14, 32), (40, 32, 3, 3), {"padding": 1}),             # 3x3
    ((1, 15, 13, 5), (24, 5, 3, 3), {"strides": 2, "padding": (0, 1, 1, 0), "dilation": 2}),
])
def test_other_convs_read_their_weight_in_panels(data_shape, weight_shape, attrs):
    """[KH, KW, I, O] -> [O / P, KH, KW, I, P]: the conv's kernel reads a tile's slice of the
    weight contiguously."""
    from tvm_compress.targets.packed_dense import packed_conv2d_nhwc, panel_width

    w = np.random.default_rng(8).standard_normal(weight_shape).astype("float32")
    after = PackedDense(8)(_conv_module(data_shape, w, **attrs))
    hwio = w.transpose(2, 3, 1, 0)
    kh, kw, ci, co = hwio.shape
    p = panel_width(co, 8)  # the tile's vector width: 16 or 8 columns
    panels = hwio.reshape(kh, kw, ci, co // p, p).transpose(3, 0, 1, 2, 4)
    pad = attrs.get("padding", 0)
    pad = [pad] * 4 if isinstance(pad, int) else list(pad)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(data_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.call_te(
                packed_conv2d_nhwc, x, relax.const(np.ascontiguousarray(panels)), [attrs.get("strides", 1)] * 2,
                pad, [attrs.get("dilation", 1)] * 2, primfunc_name_hint="packed_conv2d",
                primfunc_attrs={"op_pattern": 4}))
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(after, bb.get())
    assert_same_legalized(_conv_module(data_shape, w, **attrs), after, data_shape, seed=9)


def test_tap_bands_of_an_atrous_conv_on_a_small_map():
    """Rate 12 on 20 rows: rows 0-7 read the map with taps 1-2, rows 8-11 with the centre
    tap only, rows 12-19 with taps 0-1; a plain 3x3 conv's borders lose one tap each."""
    from tvm_compress.targets.packed_dense import tap_bands

    assert tap_bands(20, 3, 12, 1, 12, 20) == [(0, 8, 1, 2), (8, 12, 1, 1), (12, 20, 0, 1)]
    assert tap_bands(6, 3, 1, 1, 1, 6) == [(0, 1, 1, 2), (1, 5, 0, 2), (5, 6, 0, 1)]
    assert tap_bands(2, 1, 1, 1, 1, 4) is None  # the padded border outputs read no row of the map


@pytest.mark.parametrize("data_shape, weight_shape, attrs, regions", [
    # DeepLabV3's rate-12 ASPP conv on a 20x20 map: 3 x 3 regions
    ((1, 20, 20, 128), (128, 128, 3, 3), {"padding": 12, "dilation": 12}, 9),
    # strided, dilations differing per axis on 17x23: bands differ per axis
    ((1, 17, 23, 96), (192, 96, 3, 3), {"strides": 2, "padding": (9, 8, 9, 8), "dilation": (9, 8)}, 9),
])
def test_a_conv_reading_mostly_padding_runs_by_regions_sharing_one_weight(data_shape, weight_shape, attrs, regions):
    """One kernel per pair of row and column bands over the taps that read the map, every one
    reading the same packed weight (stored once), the bands concatenated; the same numbers
    as the conv."""
    w = np.random.default_rng(10).standard_normal(weight_shape).astype("float32") * 0.1
    before = _conv_module(data_shape, w, **attrs)
    after = PackedDense(8)(before)
    calls = [c for c in _calls(after["main"]) if c.op.same_as(_CALL_TIR)]
    assert len(calls) == regions
    weights = {id(c.args[1].fields[1]) for c in calls}
    assert len(weights) == 1 and is_constant(calls[0].args[1].fields[1])
    assert_same_legalized(before, after, data_shape, seed=11)


@pytest.mark.parametrize("data_shape, weight_shape, attrs", [
    ((1, 20, 20, 16), (32, 16, 3, 3), {"padding": 12, "dilation": 12}),  # 1.8 MMAC: not worth kernels
    ((1, 28, 28, 128), (128, 128, 3, 3), {"padding": 1}),                # borders: 7 % skipped
])
def test_convs_that_stay_one_kernel(data_shape, weight_shape, attrs):
    w = np.random.default_rng(12).standard_normal(weight_shape).astype("float32")
    after = PackedDense(8)(_conv_module(data_shape, w, **attrs))
    assert len([c for c in _calls(after["main"]) if c.op.same_as(_CALL_TIR)]) == 1


def test_an_aspp_conv_by_regions_matches_onnxruntime(tmp_path):
    """End to end: the rate-12 conv (bias, ReLU after it) of DeepLabV3's ASPP on a 20x20 map,
    compiled with its default schedules (every region's kernel checked alone) and verified
    against onnxruntime; the library stores the weight once."""
    rng = np.random.default_rng(13)
    inits = [numpy_helper.from_array((rng.standard_normal((128, 96, 3, 3)) * 0.05).astype("float32"), "w"),
             numpy_helper.from_array(rng.standard_normal(128).astype("float32"), "b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[12] * 4, dilations=[12, 12]),
             helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "aspp12", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 96, 20, 20])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128, 20, 20])], inits)
    path = tmp_path / "aspp12.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    rep = tvm_compress.compile(path, tmp_path / "a.so", target="x86", bench_runs=0, log=quiet)
    assert rep["conv_layout"]["layout"] == "NHWC"
    assert rep["verified"] and rep["max_rel_err"] < 1e-5, rep["max_rel_err"]
    assert rep["kernel_check"]["checked"] >= 9
    assert rep["weight_bytes_after"] < 1.01 * rep["weight_bytes_before"]


def _pointwise_model(path, size: int):
    """3x3 conv -> HardSwish -> 1x1 conv (+bias) -> HardSwish -> 1x1 conv, a residual Add of
    two 1x1 branches, then a squeeze-excite scale: MobileNet/PP-LCNet blocks on a map of
    ``size`` x ``size``."""
    rng = np.random.default_rng(9)
    w = lambda *s: numpy_helper.from_array(rng.standard_normal(s).astype("float32") * 0.2)  # noqa: E731

    def init(name, *shape):
        t = w(*shape)
        t.name = name
        return t

    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["c0"], ["h0"]),
        helper.make_node("Conv", ["h0", "w1", "b1"], ["c1"]),
        helper.make_node("HardSwish", ["c1"], ["h1"]),
        helper.make_node("Conv", ["h1", "w2"], ["c2"]),
        helper.make_node("Conv", ["h0", "w3", "b3"], ["c3"]),
        helper.make_node("Add", ["c2", "c3"], ["s"]),
        helper.make_node("GlobalAveragePool", ["s"], ["g"]),
        helper.make_node("Conv", ["g", "w4", "b4"], ["e"]),
        helper.make_node("HardSigmoid", ["e"], ["es"]),
        helper.make_node("Mul", ["s", "es"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "pointwise", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 40, size, size])],
        [init("w0", 32, 16, 3, 3), init("b0", 32), init("w1", 64, 32, 1, 1), init("b1", 64),
         init("w2", 40, 64, 1, 1), init("w3", 40, 32, 1, 1), init("b3", 40), init("w4", 40, 40, 1, 1),
         init("b4", 40)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="module")
def pointwise_model(tmp_path_factory):
    # 7 x 7: channels-last on 4, 8 and 16 lanes alike (estimated 1.7x / 3.4x / 1.7x)
    return _pointwise_model(tmp_path_factory.mktemp("models") / "pointwise.onnx", 7)


def test_padded_rows_of_flattened_convs_match_onnxruntime(tmp_path):
    """On 13 x 13 maps the dense kernels run on padded rows (see above); the rows kept are
    exact."""
    from tvm_compress.loader import load_onnx
    from tvm_compress.pipeline import lowering_passes
    from tvm_compress.targets import get_target

    model = _pointwise_model(tmp_path / "pointwise13.onnx", 13)
    profile = get_target("x86-avx2")
    with profile.tvm_target():
        lowered = tvm.transform.Sequential(lowering_passes(profile))(load_onnx(model))
    rows = [f for f in lowered.functions.values()
            if isinstance(f, tvm.tirx.PrimFunc) and "packed_dense_rows" in f.script()]
    assert len(rows) == 3, "the three flattened convs should run on padded rows"
    rep = tvm_compress.compile(model, tmp_path / "p.so", target="x86-avx2", bench_runs=0, log=quiet)
    assert rep["conv_layout"]["layout"] == "NHWC"
    assert rep["verified"] and rep["max_rel_err"] < 1e-5, rep["max_rel_err"]


@pytest.mark.parametrize("target", ["x86", "x86-avx2", pytest.param("aarch64", marks=pytest.mark.slow)])
def test_flattened_pointwise_convs_match_onnxruntime(pointwise_model, tmp_path, target):
    from tvm_compress.loader import load_onnx
    from tvm_compress.pipeline import lowering_passes
    from tvm_compress.targets import get_target

    if target == "aarch64":
        from tvm_compress.targets import qemu

        ok, why = qemu.can_run("aarch64")
        if not ok:
            pytest.skip(why)
    profile = get_target(target)
    with profile.tvm_target():
        lowered = tvm.transform.Sequential(lowering_passes(profile))(load_onnx(pointwise_model))
    kernels = [gv.name_hint for gv, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    # the three 1x1 convs on the map (not the squeeze-excite one on one pixel) with their
    # epilogues; the 3x3 conv with its weight in panels
    assert sum("packed_dense" in k for k in kernels) == 3, kernels
    assert sum("packed_conv2d" in k for k in kernels) == 1, kernels
    rep = tvm_compress.compile(pointwise_model, tmp_path / "p.so", target=target, bench_runs=0, log=quiet)
    assert rep["conv_layout"]["layout"] == "NHWC"
    assert rep["verified"] and rep["max_rel_err"] < 1e-5, rep["max_rel_err"]


def _conv_pool_module(data_shape, weight, pool=2, epilogue=("bias", "relu"), pool_kw=None, padding=1):
    """NHWC conv -> ``epilogue`` ops -> max pool, as ``ConvertLayout`` leaves a conv block."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(data_shape, "float32"))
    channels = weight.shape[0]
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(_nhwc_conv(x, weight, padding=padding))
            for op in epilogue:
                if op == "bias":
                    bias = np.random.default_rng(4).standard_normal((1, 1, 1, channels)).astype("float32")
                    y = bb.emit(relax.op.add(y, relax.const(bias)))
                elif op == "relu":
                    y = bb.emit(relax.op.nn.relu(y))
                elif op == "clip":
                    y = bb.emit(relax.op.clip(y, 0.0, 6.0))
                elif op.startswith("scale"):  # scale<value>
                    y = bb.emit(relax.op.multiply(y, relax.const(np.float32(op[5:]))))
                elif op == "sigmoid":
                    y = bb.emit(relax.op.sigmoid(y))
                elif op.startswith("leaky"):  # leaky<slope>
                    y = bb.emit(relax.op.nn.leakyrelu(y, float(op[5:])))
                elif op.startswith("prelu"):  # prelu<sign>: per-channel slopes of that sign
                    slopes = np.abs(np.random.default_rng(5).standard_normal(channels)).astype("float32") * 0.3
                    y = bb.emit(relax.op.nn.prelu(y, relax.const(slopes if op[5:] == "+" else -slopes), axis=3))
            kw = pool_kw or {"pool_size": pool, "strides": pool}
            out = bb.emit_output(relax.op.nn.max_pool2d(y, layout="NHWC", **kw))
        bb.emit_func_output(out)
    return bb.get()


def _blocks(stmt, loops=()) -> list:
    """(block, the loops around it, outermost first) for every block under ``stmt``."""
    if isinstance(stmt, tvm.tirx.For):
        return _blocks(stmt.body, (*loops, stmt))
    if isinstance(stmt, tvm.tirx.SeqStmt):
        return [b for st in stmt.seq for b in _blocks(st, loops)]
    if isinstance(stmt, tvm.s_tir.SBlockRealize):
        return [(stmt.block, loops), *_blocks(stmt.block.body, loops)]
    return _blocks(stmt.body, loops) if hasattr(stmt, "body") else []


def _pool_blocks(mod):
    """The blocks of ``mod``'s prim funcs that carry a pool window (``POOL_ATTR``)."""
    from tvm_compress.targets.cpu_schedule import POOL_ATTR

    return [b for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
            for b, _ in _blocks(f.body) if POOL_ATTR in b.annotations]


@pytest.mark.parametrize("data_shape,out_channels,epilogue,window", [
    ((1, 14, 14, 16), 32, ("bias", "relu"), (2, 2)),             # two 16-wide panels
    ((1, 28, 28, 1), 16, ("bias", "relu"), (2, 2)),              # one panel: the weight as it is
    ((1, 16, 16, 8), 24, ("clip", "scale0.5"), (2, 2)),          # relu6, then a positive scale
    ((1, 12, 16, 24), 48, ("bias", "leaky0.2"), (1, 2)),         # a window along the rows only
    ((1, 19, 9, 8), 16, ("bias", "leaky0.1", "relu"), (3, 2)),   # a row and a column left over
    ((1, 12, 12, 8), 16, ("bias", "prelu+"), (2, 2)),            # MTCNN's conv -> PReLU -> pool
])
def test_a_conv_takes_its_max_pool_and_the_epilogue_follows_on_the_pooled_map(data_shape, out_channels, epilogue,
                                                                              window):
    """conv -> bias -> ReLU -> max pool (stride the window) -> one kernel: the conv rows each
    pooled row reads, their maximum, then bias and ReLU on the pooled map (exact: they never
    decrease)."""
    w = np.random.default_rng(3).standard_normal((out_channels, data_shape[3], 3, 3)).astype("float32")
    before = _conv_pool_module(data_shape, w, epilogue=epilogue, pool_kw={"pool_size": window, "strides": window})
    after = PackedDense(8)(before)
    calls = _calls(after["main"])
    assert not any(c.op.same_as(tvm.ir.Op.get("relax.nn.max_pool2d")) for c in calls)
    assert len(_pool_blocks(after)) == 1
    # the epilogue runs on the pooled map
    pooled = [data_shape[0], data_shape[1] // window[0], data_shape[2] // window[1], out_channels]
    assert all([int(d) for d in c.ty.shape] == pooled for c in calls if not c.op.same_as(_CALL_TIR))
    # no kernel of the conv it replaced is left in the module
    assert sum(isinstance(f, tvm.tirx.PrimFunc) for _, f in after.functions_items()) == 1
    assert_same_legalized(before, after, data_shape, seed=5)


@pytest.mark.parametrize("data_shape,epilogue,pool_kw", [
    ((1, 14, 14, 16), ("bias", "scale-0.5"), None),                                  # a max turns into a min
    ((1, 14, 14, 16), ("bias", "sigmoid"), None),                                   # rounding of an approximation
    ((1, 14, 14, 16), ("bias", "leaky-0.5"), None),                                 # a negative slope
    ((1, 14, 14, 16), ("bias", "prelu-"), None),                                    # negative slopes
    ((1, 14, 14, 16), ("bias", "relu"), {"pool_size": (1, 2), "strides": (1, 1)}),  # stride not the window
    ((1, 15, 15, 16), ("bias", "relu"), {"pool_size": 3, "strides": 2}),            # overlapping windows
    ((1, 14, 14, 16), ("bias", "relu"), {"pool_size": 2, "strides": 2, "padding": 1}),
    ((1, 6, 6, 16), ("bias", "relu"), None),                                        # 3 pooled rows on 2 cores
])
def test_pools_it_leaves_to_a_kernel_of_their_own(data_shape, epilogue, pool_kw):
    w = np.random.default_rng(3).standard_normal((32, data_shape[3], 3, 3)).astype("float32")
    after = PackedDense(8)(_conv_pool_module(data_shape, w, epilogue=epilogue, pool_kw=pool_kw))
    assert any(c.op.same_as(tvm.ir.Op.get("relax.nn.max_pool2d")) for c in _calls(after["main"]))
    assert not _pool_blocks(after)


def test_the_pooled_kernel_computes_each_pooled_row_inside_one_parallel_loop():
    """The default schedule runs the pooled rows in parallel, each computing its conv rows and
    their pool and epilogue in the same iteration: one parallel loop, holding every block but
    the input's pad."""
    from tvm_compress.targets import get_family, get_target

    w = np.random.default_rng(3).standard_normal((32, 16, 3, 3)).astype("float32")
    after = PackedDense(8)(_conv_pool_module((1, 28, 28, 16), w))
    profile = get_target("x86-avx2")
    with profile.tvm_target():
        lowered = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                            relax.transform.FuseOps(), relax.transform.FuseTIR()])(after)
    (gv,) = [gv for gv, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    target = get_family(profile.family).tvm_target(profile)
    sch = CPUFallback(lanes=8).apply(lowered[gv], target, False)
    func = sch.mod["main"]
    blocks = [(b.name_hint, [l for l in loops if l.kind == tvm.tirx.ForKind.PARALLEL]) for b, loops in _blocks(func.body)]
    (par,) = {p for _, loops in blocks for p in loops}
    assert int(par.extent) == 14
    assert {name for name, loops in blocks if not loops} == {"root", "pad_temp"}
    rng = np.random.default_rng(6)
    inputs = [rng.standard_normal([int(d) for d in p.shape]).astype(str(p.dtype)) for p in func.params[:-1]]
    outs = []
    for f in (func, lowered[gv]):
        lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target)
        args = [*(tvm.runtime.tensor(a) for a in inputs),
                tvm.runtime.tensor(np.zeros([int(d) for d in f.params[-1].shape], "float32"))]
        lib(*args)
        outs.append(args[-1].numpy())
    assert np.abs(outs[1]).max() > 1
    np.testing.assert_array_equal(outs[0], outs[1])


def test_an_mtcnn_style_block_takes_its_pool_through_prelu_and_matches_onnxruntime(tmp_path):
    """Conv -> PRelu (slopes per channel, shaped (C, 1, 1) as exported) -> 2x2 max pool, as
    MTCNN's P-Net has it: channels-last, the pool inside the conv's kernel, same results."""
    from tvm_compress.loader import load_onnx
    from tvm_compress.pipeline import lowering_passes
    from tvm_compress.targets import get_target

    rng = np.random.default_rng(14)
    inits = [numpy_helper.from_array(a.astype("float32"), n) for n, a in (
        ("w0", rng.standard_normal((10, 3, 3, 3)) * 0.3), ("b0", rng.standard_normal(10) * 0.1),
        ("a0", np.abs(rng.standard_normal((10, 1, 1))) * 0.25), ("w1", rng.standard_normal((16, 10, 3, 3)) * 0.3))]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], kernel_shape=[3, 3]),
             helper.make_node("PRelu", ["c0", "a0"], ["p0"]),
             helper.make_node("MaxPool", ["p0"], ["m0"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["m0", "w1"], ["y"], kernel_shape=[3, 3])]
    graph = helper.make_graph(nodes, "pnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 48, 48])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 21, 21])], inits)
    path = tmp_path / "pnet.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    profile = get_target("x86-avx2")
    with profile.tvm_target():
        lowered = tvm.transform.Sequential(lowering_passes(profile))(load_onnx(path))
    kernels = [gv.name_hint for gv, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert not [k for k in kernels if "pool" in k], kernels
    rep = tvm_compress.compile(path, tmp_path / "pnet.so", target="x86-avx2", bench_runs=0, log=quiet)
    assert rep["verified"] and rep["max_rel_err"] < 1e-5, rep["max_rel_err"]
