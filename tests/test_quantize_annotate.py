"""QuantizeAnnotate on small graphs: Before/Expected TVMScript, options, errors."""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from tvm_compress.errors import PassOptionError
from tvm_compress.passes import QuantizeAnnotate, QuantizeAnnotateConfig
from tvm_compress.passes import _quant_common as qc

RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((8, 4, 3, 3)).astype("float32")
B1 = RNG.standard_normal((1, 8, 1, 1)).astype("float32")
W2 = RNG.standard_normal((8, 8, 1, 1)).astype("float32")


def bind(mod, **params):
    return relax.transform.BindParams("main", {k: v for k, v in params.items()})(mod)


@I.ir_module
class ConvChain:
    @R.function
    def main(
        x: R.Tensor((1, 4, 8, 8), "float32"),
        w1: R.Tensor((8, 4, 3, 3), "float32"),
        b1: R.Tensor((1, 8, 1, 1), "float32"),
        w2: R.Tensor((8, 8, 1, 1), "float32"),
    ) -> R.Tensor((1, 8, 4, 4), "float32"):
        with R.dataflow():
            lv = R.nn.conv2d(x, w1, padding=[1, 1, 1, 1])
            lv1 = R.add(lv, b1)
            lv2 = R.nn.relu(lv1)
            lv3 = R.nn.max_pool2d(lv2, pool_size=[2, 2], strides=[2, 2])
            gv = R.nn.conv2d(lv3, w2)
            R.output(gv)
        return gv


@I.ir_module
class ConvChainAnnotated:
    @R.function
    def main(
        x: R.Tensor((1, 4, 8, 8), "float32"),
        w1: R.Tensor((8, 4, 3, 3), "float32"),
        b1: R.Tensor((1, 8, 1, 1), "float32"),
        w2: R.Tensor((8, 8, 1, 1), "float32"),
    ) -> R.Tensor((1, 8, 4, 4), "float32"):
        with R.dataflow():
            # the model input is observed once, where the first layer needs it
            obs = R.call_pure_packed("tvm_compress.quant.observe", x, R.prim_value(0),
                                     ty_args=(R.Tensor((1, 4, 8, 8), "float32"),))
            w = R.call_pure_packed("tvm_compress.quant.weight", w1, R.prim_value(0),
                                   ty_args=(R.Tensor((8, 4, 3, 3), "float32"),))
            lv = R.nn.conv2d(obs, w, padding=[1, 1, 1, 1])
            lv1 = R.add(lv, b1)
            lv2 = R.nn.relu(lv1)
            # observed before the max-pool: the pool passes the int8 tensor through
            obs1 = R.call_pure_packed("tvm_compress.quant.observe", lv2, R.prim_value(1),
                                      ty_args=(R.Tensor((1, 8, 8, 8), "float32"),))
            lv3 = R.nn.max_pool2d(obs1, pool_size=[2, 2], strides=[2, 2])
            w_1 = R.call_pure_packed("tvm_compress.quant.weight", w2, R.prim_value(1),
                                     ty_args=(R.Tensor((8, 8, 1, 1), "float32"),))
            gv = R.nn.conv2d(lv3, w_1)
            R.output(gv)
        return gv


def test_conv_chain_structure():
    before = bind(ConvChain, w1=W1, b1=B1, w2=W2)
    after = QuantizeAnnotate(QuantizeAnnotateConfig())(before)
    expected = bind(ConvChainAnnotated, w1=W1, b1=B1, w2=W2)
    tvm.ir.assert_structural_equal(after["main"], expected["main"])
    report = qc.read_report(after)
    assert [l["name"] for l in report["layers"]] == ["conv2d_0", "conv2d_1"]
    assert [p["layers"] for p in report["points"]] == [[0], [1]]


@I.ir_module
class Dense:
    @R.function
    def main(x: R.Tensor((2, 16), "float32"), w: R.Tensor((10, 16), "float32"),
             b: R.Tensor((10,), "float32")) -> R.Tensor((2, 10), "float32"):
        with R.dataflow():
            # Gemm(transB=1) as the ONNX importer writes it
            wt = R.permute_dims(w, axes=[1, 0])
            lv = R.matmul(x, wt)
            gv = R.add(lv, b)
            R.output(gv)
        return gv


@I.ir_module
class DenseAnnotated:
    @R.function
    def main(x: R.Tensor((2, 16), "float32"), wt: R.Tensor((16, 10), "float32"),
             b: R.Tensor((10,), "float32")) -> R.Tensor((2, 10), "float32"):
        with R.dataflow():
            obs = R.call_pure_packed("tvm_compress.quant.observe", x, R.prim_value(0),
                                     ty_args=(R.Tensor((2, 16), "float32"),))
            # the transpose is folded into the [K, N] weight constant
            w = R.call_pure_packed("tvm_compress.quant.weight", wt, R.prim_value(0),
                                   ty_args=(R.Tensor((16, 10), "float32"),))
            lv = R.matmul(obs, w)
            gv = R.add(lv, b)
            R.output(gv)
        return gv


def test_dense_structure():
    w = RNG.standard_normal((10, 16)).astype("float32")
    b = RNG.standard_normal((10,)).astype("float32")
    after = QuantizeAnnotate(QuantizeAnnotateConfig())(bind(Dense, w=w, b=b))
    expected = bind(DenseAnnotated, wt=np.ascontiguousarray(w.T), b=b)
    tvm.ir.assert_structural_equal(after["main"], expected["main"])


def test_skip_options():
    before = bind(ConvChain, w1=W1, b1=B1, w2=W2)
    for cfg in (QuantizeAnnotateConfig(skip=("conv2d_0",)), QuantizeAnnotateConfig(skip=(0,)),
                QuantizeAnnotateConfig(skip_first=True)):
        report = qc.read_report(QuantizeAnnotate(cfg)(before))
        assert [l["status"] for l in report["layers"]] == ["float", "int8"]
        assert len(report["points"]) == 1
    report = qc.read_report(QuantizeAnnotate(QuantizeAnnotateConfig(skip_last=True))(before))
    assert [l["status"] for l in report["layers"]] == ["int8", "float"]
    report = qc.read_report(QuantizeAnnotate(QuantizeAnnotateConfig(ops=("matmul",)))(before))
    assert [l["status"] for l in report["layers"]] == ["float", "float"]
    assert "not in quantize ops" in report["layers"][0]["reason"]


def test_depthwise_and_grouped_kinds():
    @I.ir_module
    class Groups:
        @R.function
        def main(x: R.Tensor((1, 8, 6, 6), "float32"), wd: R.Tensor((8, 1, 3, 3), "float32"),
                 wg: R.Tensor((8, 4, 1, 1), "float32")) -> R.Tensor((1, 8, 6, 6), "float32"):
            with R.dataflow():
                lv = R.nn.conv2d(x, wd, padding=[1, 1, 1, 1], groups=8)
                gv = R.nn.conv2d(lv, wg, groups=2)
                R.output(gv)
            return gv

    mod = bind(Groups, wd=np.ones((8, 1, 3, 3), "float32"), wg=np.ones((8, 4, 1, 1), "float32"))
    report = qc.read_report(QuantizeAnnotate(QuantizeAnnotateConfig())(mod))
    assert [l["op"] for l in report["layers"]] == ["depthwise_conv2d", "grouped_conv2d"]


def test_annotated_module_still_computes_float():
    before = bind(ConvChain, w1=W1, b1=B1, w2=W2)
    after = qc.strip_report(QuantizeAnnotate(QuantizeAnnotateConfig())(before))
    x = RNG.standard_normal((1, 4, 8, 8)).astype("float32")
    outs = []
    for mod in (before, after):
        ex = tvm.compile(mod, tvm.target.Target({"kind": "llvm"}))
        outs.append(relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy())
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "cfg, words",
    [
        (dict(ops=("conv3d",)), "unknown layer kind 'conv3d'"),
        (dict(skip=(7,)), "skip index 7 out of range"),
        (dict(skip=("nope",)), "no layer named 'nope'"),
    ],
)
def test_bad_options_one_line(cfg, words):
    before = bind(ConvChain, w1=W1, b1=B1, w2=W2)
    with pytest.raises(PassOptionError) as err:
        QuantizeAnnotate(QuantizeAnnotateConfig(**cfg))(before)
    assert words in str(err.value) and "\n" not in str(err.value)
