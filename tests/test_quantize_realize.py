"""QuantizeRealize: QDQ conv/matmul -> int8 x int8 -> int32 with a fused requantize."""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from tvm_compress.passes import QuantizeRealize, QuantizeRealizeConfig
from tvm_compress.passes import _quant_common as qc

RNG = np.random.default_rng(1)
WQ1 = RNG.integers(-127, 128, (8, 4, 3, 3)).astype("int8")
WS1 = RNG.uniform(0.01, 0.02, 8).astype("float32")
B1 = RNG.standard_normal((1, 8, 1, 1)).astype("float32")
WQ2 = RNG.integers(-127, 128, (8, 8, 1, 1)).astype("int8")
WS2 = RNG.uniform(0.01, 0.02, 8).astype("float32")
SX, SY = np.float32(0.05), np.float32(0.1)


def bind(mod, **params):
    return relax.transform.BindParams("main", params)(mod)


@I.ir_module
class QDQChain:
    @R.function
    def main(x: R.Tensor((1, 4, 8, 8), "float32"), wq1: R.Tensor((8, 4, 3, 3), "int8"),
             ws1: R.Tensor((8,), "float32"), b1: R.Tensor((1, 8, 1, 1), "float32"),
             wq2: R.Tensor((8, 8, 1, 1), "int8"), ws2: R.Tensor((8,), "float32"),
             ) -> R.Tensor((1, 8, 4, 4), "float32"):
        with R.dataflow():
            q = R.quantize(x, R.const(0.05, "float32"), R.const(0, "int8"), axis=-1, out_dtype="int8")
            dq = R.dequantize(q, R.const(0.05, "float32"), R.const(0, "int8"), axis=-1)
            w1 = R.dequantize(wq1, ws1, R.const(0, "int8"), axis=0)
            lv = R.nn.conv2d(dq, w1, padding=[1, 1, 1, 1])
            lv1 = R.add(lv, b1)
            lv2 = R.nn.relu(lv1)
            q1 = R.quantize(lv2, R.const(0.1, "float32"), R.const(0, "uint8"), axis=-1, out_dtype="uint8")
            dq1 = R.dequantize(q1, R.const(0.1, "float32"), R.const(0, "uint8"), axis=-1)
            lv3 = R.nn.max_pool2d(dq1, pool_size=[2, 2], strides=[2, 2])
            w2 = R.dequantize(wq2, ws2, R.const(0, "int8"), axis=0)
            gv = R.nn.conv2d(lv3, w2)
            R.output(gv)
        return gv


@I.ir_module
class IntChain:
    @R.function
    def main(x: R.Tensor((1, 4, 8, 8), "float32"), wq1: R.Tensor((8, 4, 3, 3), "int8"),
             m1: R.Tensor((1, 8, 1, 1), "float32"), b1: R.Tensor((1, 8, 1, 1), "float32"),
             wq2: R.Tensor((8, 8, 1, 1), "int8"), m2: R.Tensor((1, 8, 1, 1), "float32"),
             ) -> R.Tensor((1, 8, 4, 4), "float32"):
        with R.dataflow():
            q = R.quantize(x, R.const(0.05, "float32"), R.const(0, "int8"), axis=-1, out_dtype="int8")
            acc = R.nn.conv2d(q, wq1, padding=[1, 1, 1, 1], out_dtype="int32")
            # dequantize of the accumulator: one per-channel multiply, fused into the conv kernel
            f = R.astype(acc, "float32")
            lv = R.multiply(f, m1)
            lv1 = R.add(lv, b1)
            lv2 = R.nn.relu(lv1)
            q1 = R.quantize(lv2, R.const(0.1, "float32"), R.const(0, "uint8"), axis=-1, out_dtype="uint8")
            # max-pool runs on the uint8 tensor; no dequantize/quantize pair between the layers
            lv3 = R.nn.max_pool2d(q1, pool_size=[2, 2], strides=[2, 2])
            acc1 = R.nn.conv2d(lv3, wq2, out_dtype="int32")
            f1 = R.astype(acc1, "float32")
            gv = R.multiply(f1, m2)
            R.output(gv)
        return gv


def _before():
    return bind(QDQChain, wq1=WQ1, ws1=WS1, b1=B1, wq2=WQ2, ws2=WS2)


def test_chain_structure():
    after = QuantizeRealize()(_before())
    expected = bind(IntChain, wq1=WQ1, m1=(SX * WS1).reshape(1, 8, 1, 1), b1=B1, wq2=WQ2,
                    m2=(np.float32(0.1) * WS2).reshape(1, 8, 1, 1))
    tvm.ir.assert_structural_equal(after["main"], expected["main"])
    report = qc.read_report(after)
    assert [l["status"] for l in report["layers"]] == ["int8", "int8"]
    # the weights plus the zero-point scalar of the input quantize
    assert report["weight_bytes"]["by_dtype"]["int8"] == WQ1.size + WQ2.size + 1


def _run(mod, *args):
    ex = tvm.compile(qc.strip_report(mod), tvm.target.Target({"kind": "llvm"}))
    return relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


def test_chain_matches_fake_quant_and_fuses():
    before = _before()
    after = QuantizeRealize()(before)
    x = RNG.standard_normal((1, 4, 8, 8)).astype("float32")
    ref, got = _run(before, x), _run(after, x)
    # same integer math; float rounding in the requantize may move a value by one step
    assert np.abs(ref - got).max() <= 0.1 * 127 * WS2.max() * 2 + 1e-5
    assert np.mean(np.abs(ref - got) < 1e-4) > 0.95
    lowered = tvm.transform.Sequential([
        relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR(),
    ])(qc.strip_report(after))
    names = [gv.name_hint for gv in lowered.functions]
    # int32 accumulator, dequantize, bias, relu and requantize in one kernel
    assert any(n.startswith("fused_conv2d") and "quantize" in n for n in names), names


@I.ir_module
class AsymDense:
    @R.function
    def main(x: R.Tensor((3, 16), "float32"), wq: R.Tensor((10, 16), "int8"),
             ws: R.Tensor((10,), "float32")) -> R.Tensor((3, 10), "float32"):
        with R.dataflow():
            q = R.quantize(x, R.const(0.02, "float32"), R.const(100, "uint8"), axis=-1, out_dtype="uint8")
            dq = R.dequantize(q, R.const(0.02, "float32"), R.const(100, "uint8"), axis=-1)
            w = R.dequantize(wq, ws, R.const(0, "int8"), axis=0)
            wt = R.permute_dims(w, axes=[1, 0])
            gv = R.matmul(dq, wt)
            R.output(gv)
        return gv


def test_asymmetric_activation_and_gemm_weight():
    wq = RNG.integers(-127, 128, (10, 16)).astype("int8")
    ws = RNG.uniform(0.01, 0.02, 10).astype("float32")
    before = bind(AsymDense, wq=wq, ws=ws)
    after = QuantizeRealize()(before)
    text = after["main"].script(show_meta=False)
    assert 'R.matmul(q, metadata' in text and 'out_dtype="int32"' in text
    assert "R.dequantize" not in text
    x = RNG.uniform(-1.5, 3, (3, 16)).astype("float32")
    np.testing.assert_allclose(_run(after, x), _run(before, x), rtol=1e-4, atol=1e-4)


@I.ir_module
class AsymConv:
    @R.function
    def main(x: R.Tensor((1, 3, 6, 6), "float32"), wq: R.Tensor((4, 3, 3, 3), "int8"),
             ws: R.Tensor((4,), "float32")) -> R.Tensor((1, 4, 6, 6), "float32"):
        with R.dataflow():
            q = R.quantize(x, R.const(0.02, "float32"), R.const(-20, "int8"), axis=-1, out_dtype="int8")
            dq = R.dequantize(q, R.const(0.02, "float32"), R.const(-20, "int8"), axis=-1)
            w = R.dequantize(wq, ws, R.const(0, "int8"), axis=0)
            gv = R.nn.conv2d(dq, w, padding=[1, 1, 1, 1])
            R.output(gv)
        return gv


def test_zero_point_padding_is_exact():
    wq = RNG.integers(-127, 128, (4, 3, 3, 3)).astype("int8")
    ws = RNG.uniform(0.01, 0.02, 4).astype("float32")
    before = bind(AsymConv, wq=wq, ws=ws)
    after = QuantizeRealize()(before)
    assert "R.nn.pad" in after["main"].script(show_meta=False)
    x = RNG.uniform(-1, 2, (1, 3, 6, 6)).astype("float32")
    np.testing.assert_allclose(_run(after, x), _run(before, x), rtol=1e-4, atol=1e-4)


@I.ir_module
class AsymWeight:
    @R.function
    def main(x: R.Tensor((1, 4, 8, 8), "float32"), wq: R.Tensor((8, 4, 3, 3), "int8"),
             ws: R.Tensor((8,), "float32"), wz: R.Tensor((8,), "int8")) -> R.Tensor((1, 8, 8, 8), "float32"):
        with R.dataflow():
            q = R.quantize(x, R.const(0.05, "float32"), R.const(0, "int8"), axis=-1, out_dtype="int8")
            dq = R.dequantize(q, R.const(0.05, "float32"), R.const(0, "int8"), axis=-1)
            w = R.dequantize(wq, ws, wz, axis=0)
            gv = R.nn.conv2d(dq, w, padding=[1, 1, 1, 1])
            R.output(gv)
        return gv


def test_keep_float_and_asymmetric_weight_reported():
    after = QuantizeRealize(QuantizeRealizeConfig(keep_float=(1,)))(_before())
    report = qc.read_report(after)
    assert [l["status"] for l in report["layers"]] == ["int8", "float"]
    assert "keep_float" in report["layers"][1]["reason"]
    # a weight zero point != 0 cannot use the symmetric integer kernel: stays fake-quant, reported
    mod = bind(AsymWeight, wq=WQ1, ws=WS1, wz=np.full(8, 3, "int8"))
    report = qc.read_report(QuantizeRealize()(mod))
    assert report["layers"][0]["status"] == "float"
    assert "zero point" in report["layers"][0]["reason"]


@I.ir_module
class IntThenFloat:
    @R.function
    def main(x: R.Tensor((1, 4, 8, 8), "float32"), wq1: R.Tensor((8, 4, 3, 3), "int8"),
             m1: R.Tensor((1, 8, 1, 1), "float32"), b1: R.Tensor((1, 8, 1, 1), "float32"),
             w2: R.Tensor((8, 8, 1, 1), "float32")) -> R.Tensor((1, 8, 4, 4), "float32"):
        with R.dataflow():
            q = R.quantize(x, R.const(0.05, "float32"), R.const(0, "int8"), axis=-1, out_dtype="int8")
            acc = R.nn.conv2d(q, wq1, padding=[1, 1, 1, 1], out_dtype="int32")
            f = R.astype(acc, "float32")
            lv = R.multiply(f, m1)
            lv1 = R.add(lv, b1)
            lv2 = R.nn.relu(lv1)
            q1 = R.quantize(lv2, R.const(0.1, "float32"), R.const(0, "uint8"), axis=-1, out_dtype="uint8")
            lv3 = R.nn.max_pool2d(q1, pool_size=[2, 2], strides=[2, 2])
            dq1 = R.dequantize(lv3, R.const(0.1, "float32"), R.const(0, "uint8"), axis=-1)
            # kept float: a float conv on a constant weight holding the dequantized values
            gv = R.nn.conv2d(dq1, w2)
            R.output(gv)
        return gv


def test_kept_float_layer_reads_a_constant_float_weight():
    before = _before()
    after = QuantizeRealize(QuantizeRealizeConfig(keep_float=(1,)))(before)
    w2 = WQ2.astype("float32") * WS2.reshape(8, 1, 1, 1)
    expected = bind(IntThenFloat, wq1=WQ1, m1=(SX * WS1).reshape(1, 8, 1, 1), b1=B1, w2=w2)
    tvm.ir.assert_structural_equal(after["main"], expected["main"])
    # the fake-quantized layer's own arithmetic: its weight values bit for bit, so the float
    # layer computes what the QDQ graph computes (the int8 layer before it rounds the same way)
    x = RNG.standard_normal((1, 4, 8, 8)).astype("float32")
    fake = QuantizeRealize(QuantizeRealizeConfig(keep_float=(0, 1)))(before)
    np.testing.assert_array_equal(_run(fake, x), _run(before, x))


def test_bad_option():
    from tvm_compress.errors import PassOptionError

    with pytest.raises(PassOptionError, match="unknown realize op 'conv3d'"):
        QuantizeRealizeConfig(ops=("conv3d",))


def test_speed_table_reports_slower_layers(tmp_path):
    import json

    from tvm_compress.passes.quantize_realize import layer_key

    table = {"target": "x86-avx2", "layers": {
        layer_key("conv2d", WQ1.shape, (1, 8, 8, 8)): {"float_ms": 0.2, "int8_ms": 0.1},
        layer_key("conv2d", WQ2.shape, (1, 8, 4, 4)): {"float_ms": 0.01, "int8_ms": 0.02},
    }}
    path = tmp_path / "speed.json"
    path.write_text(json.dumps(table))
    logs = []
    report = qc.read_report(QuantizeRealize(QuantizeRealizeConfig(speed_table=str(path)), log=logs.append)(_before()))
    assert [l["status"] for l in report["layers"]] == ["int8", "int8"]
    assert report["layers"][0]["speed"]["speedup"] == pytest.approx(2.0)
    assert "slower than float" in report["layers"][1]["speed"]["note"]
    assert any("slower than float" in m for m in logs)
    report = qc.read_report(QuantizeRealize(QuantizeRealizeConfig(speed_table=str(path), slow_layers="float"))(_before()))
    assert [l["status"] for l in report["layers"]] == ["int8", "float"]
    assert "kept float" in report["layers"][1]["reason"]


def test_speed_table_compares_kernels_with_their_tails_where_measured(tmp_path):
    """A layer whose int8 kernel also runs what the float build runs in the next kernels (a
    sigmoid after a transpose) is judged on both kernels with their tails; a table without
    them (older, or hand-written) on the kernels alone."""
    import json

    from tvm_compress.passes.quantize_realize import layer_key

    table = {"target": "x86-avx2", "layers": {
        layer_key("conv2d", WQ1.shape, (1, 8, 8, 8)): {"float_ms": 0.03, "int8_ms": 0.07,
                                                     "float_segment_ms": 0.09, "int8_segment_ms": 0.08},
        layer_key("conv2d", WQ2.shape, (1, 8, 4, 4)): {"float_ms": 0.02, "int8_ms": 0.01,
                                                     "float_segment_ms": 0.02, "int8_segment_ms": 0.05},
    }}
    path = tmp_path / "speed.json"
    path.write_text(json.dumps(table))
    report = qc.read_report(QuantizeRealize(QuantizeRealizeConfig(speed_table=str(path), slow_layers="float"))(_before()))
    assert [l["status"] for l in report["layers"]] == ["int8", "float"]
    assert report["layers"][0]["speed"]["speedup"] == pytest.approx(0.09 / 0.08)
    assert report["layers"][0]["speed"]["measured"] == "kernel and tail"
    assert "its kernel and tail" in report["layers"][1]["reason"]
    for row in table["layers"].values():
        del row["float_segment_ms"], row["int8_segment_ms"]
    path.write_text(json.dumps(table))
    report = qc.read_report(QuantizeRealize(QuantizeRealizeConfig(speed_table=str(path), slow_layers="float"))(_before()))
    assert [l["status"] for l in report["layers"]] == ["float", "int8"]
    assert report["layers"][1]["speed"]["measured"] == "kernel"
