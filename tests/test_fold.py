"""Fold: structure (Before/Expected), refusals, and numerics against onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import tvm
from tvm import relax

from tvm_compress.pass_registry import PassEnv
from tvm_compress.passes import Fold, FoldConfig
from tvm_compress.passes.fold import foldable_left

F32 = "float32"


def _run(mod, x):
    vm = relax.VirtualMachine(tvm.compile(relax.transform.DecomposeOpsForInference()(mod), "llvm"), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def _ops(mod):
    ops = []
    relax.analysis.post_order_visit(
        mod["main"], lambda e: ops.append(e.op.name.split(".")[-1]) if isinstance(e, relax.Call) else None)
    return ops


def _fold(mod, **cfg):
    env = PassEnv()
    return Fold(FoldConfig(**cfg), env)(mod), env.report["fold"]


def _module(x_shape, body):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, F32))
    with bb.function("main", [x]):
        with bb.dataflow():
            gv = bb.emit_output(body(bb, x))
        bb.emit_func_output(gv)
    return bb.get()


def test_bias_scale_and_shift_after_a_conv_fold_into_weight_and_one_bias():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(F32)
    b = rng.standard_normal((1, 4, 1, 1)).astype(F32)
    s = rng.uniform(0.5, 2, (1, 4, 1, 1)).astype(F32)
    t = np.float32(0.25)

    def before(bb, x):
        y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), padding=1))
        y = bb.emit(relax.op.add(y, relax.const(b)))
        y = bb.emit(relax.op.multiply(y, relax.const(s)))
        y = bb.emit(relax.op.add(y, relax.const(t)))
        return relax.op.nn.relu(y)

    s64 = s.reshape(4).astype(np.float64)
    w_exp = (w.astype(np.float64) * s64[:, None, None, None]).astype(F32)
    b_exp = (b.reshape(4).astype(np.float64) * s64 + np.float64(t)).reshape(1, 4, 1, 1).astype(F32)

    def expected(bb, x):
        y = bb.emit(relax.op.nn.conv2d(x, relax.const(w_exp), padding=1))
        y = bb.emit(relax.op.add(y, relax.const(b_exp)))
        return relax.op.nn.relu(y)

    mod = _module((1, 3, 6, 6), before)
    after, report = _fold(mod)
    tvm.ir.assert_structural_equal(after, _module((1, 3, 6, 6), expected))
    assert report["ops_folded"] == 3 and report["ops_removed"] == 2 and not report["refused"]
    x = np.random.default_rng(1).standard_normal((1, 3, 6, 6)).astype(F32)
    np.testing.assert_allclose(_run(after, x), _run(mod, x), rtol=1e-5, atol=1e-5)


def test_conv_with_only_its_bias_is_left_as_is():
    w = np.ones((4, 3, 1, 1), F32)
    mod = _module((1, 3, 4, 4), lambda bb, x: relax.op.add(
        bb.emit(relax.op.nn.conv2d(x, relax.const(w))), relax.const(np.ones((1, 4, 1, 1), F32))))
    after, report = _fold(mod)
    tvm.ir.assert_structural_equal(after, mod)
    assert report["ops_folded"] == 0 and foldable_left(after) == []


def test_a_constant_that_varies_over_pixels_is_refused():
    """onnxruntime #12498: a [1, C, H, W] addend after a grouped conv is not a bias."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 2, 1, 1)).astype(F32)
    c = rng.standard_normal((1, 8, 4, 4)).astype(F32)
    mod = _module((1, 8, 4, 4), lambda bb, x: relax.op.add(
        bb.emit(relax.op.nn.conv2d(x, relax.const(w), groups=4)), relax.const(c)))
    after, report = _fold(mod)
    tvm.ir.assert_structural_equal(after, mod)
    assert report["refused"] == [{"layer": "conv2d", "op": "add",
                                  "reason": "the constant varies along axis 2, not per channel (shape (1, 8, 4, 4))"}]


def test_scale_before_a_padded_conv_folds_but_a_shift_is_refused():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 3, 3, 3)).astype(F32)
    k = rng.uniform(0.5, 2, (1, 3, 1, 1)).astype(F32)

    def scaled(bb, x):
        return relax.op.nn.conv2d(bb.emit(relax.op.divide(x, relax.const(k))), relax.const(w), padding=1)

    mod = _module((1, 3, 5, 5), scaled)
    after, report = _fold(mod)
    assert _ops(after) == ["conv2d"] and report["layers"][0]["before"] == ["div"]
    x = rng.standard_normal((1, 3, 5, 5)).astype(F32)
    np.testing.assert_allclose(_run(after, x), _run(mod, x), rtol=1e-5, atol=1e-5)

    def shifted(bb, x):
        return relax.op.nn.conv2d(bb.emit(relax.op.subtract(x, relax.const(k))), relax.const(w), padding=1)

    mod = _module((1, 3, 5, 5), shifted)
    after, report = _fold(mod)
    tvm.ir.assert_structural_equal(after, mod)
    assert report["refused"][0]["op"] == "sub" and "zero-padded" in report["refused"][0]["reason"]


@pytest.mark.parametrize("groups", [1, 3])
def test_batch_norm_and_shift_before_an_unpadded_conv_fold(groups):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((6, 6 // groups, 3, 3)).astype(F32)
    gamma, beta, mean = (rng.standard_normal(6).astype(F32) for _ in range(3))
    var = rng.uniform(0.5, 2, 6).astype(F32)

    def body(bb, x):
        x = bb.emit(relax.op.add(x, relax.const(rng.standard_normal((6, 1, 1)).astype(F32))))
        bn = bb.emit(relax.op.nn.batch_norm(x, *(relax.const(v) for v in (gamma, beta, mean, var)), axis=1))
        x = bb.emit(relax.TupleGetItem(bn, 0))
        return relax.op.nn.conv2d(x, relax.const(w), groups=groups)

    mod = _module((1, 6, 5, 5), body)
    after, report = _fold(mod)
    assert _ops(after) == ["conv2d", "add"] and report["layers"][0]["before"] == ["add", "batch_norm"]
    x = rng.standard_normal((1, 6, 5, 5)).astype(F32)
    np.testing.assert_allclose(_run(after, x), _run(mod, x), rtol=1e-5, atol=1e-5)


def test_nhwc_depthwise_conv_and_matmul_chains():
    rng = np.random.default_rng(5)
    wd = rng.standard_normal((3, 3, 1, 8)).astype(F32)  # HWIO, depthwise
    wm = rng.standard_normal((8, 5)).astype(F32)

    def body(bb, x):
        y = bb.emit(relax.op.nn.conv2d(x, relax.const(wd), padding=1, groups=8, data_layout="NHWC",
                                       kernel_layout="HWIO"))
        y = bb.emit(relax.op.multiply(relax.const(rng.uniform(1, 2, 8).astype(F32)), y))
        y = bb.emit(relax.op.subtract(relax.const(rng.standard_normal((1, 1, 1, 8)).astype(F32)), y))
        y = bb.emit(relax.op.nn.relu(y))
        y = bb.emit(relax.op.matmul(bb.emit(relax.op.multiply(y, relax.const(rng.uniform(1, 2, 8).astype(F32)))),
                                    relax.const(wm)))
        y = bb.emit(relax.op.add(y, relax.const(rng.standard_normal(5).astype(F32))))
        return relax.op.divide(y, relax.const(np.float32(4)))

    mod = _module((1, 4, 4, 8), body)
    after, report = _fold(mod)
    assert _ops(after) == ["conv2d", "add", "relu", "matmul", "add"]
    assert [(r["before"], r["after"]) for r in report["layers"]] == [([], ["mul", "sub"]), (["mul"], ["add", "div"])]
    assert foldable_left(after) == []
    x = rng.standard_normal((1, 4, 4, 8)).astype(F32)
    np.testing.assert_allclose(_run(after, x), _run(mod, x), rtol=1e-5, atol=1e-5)


def test_a_value_read_twice_is_not_folded():
    w = np.random.default_rng(6).standard_normal((4, 3, 1, 1)).astype(F32)

    def body(bb, x):
        y = bb.emit(relax.op.nn.conv2d(x, relax.const(w)))
        z = bb.emit(relax.op.multiply(y, relax.const(np.float32(2))))
        return relax.op.add(z, y)  # y is read by the multiply and by this add

    mod = _module((1, 3, 4, 4), body)
    tvm.ir.assert_structural_equal(_fold(mod)[0], mod)


def _int8_conv(bb, x, wq, m, tail):
    """The realized int8 layer ``quantize_realize`` emits: int32 conv, cast, rescale ``m``."""
    q = bb.emit(relax.op.quantize(x, relax.const(np.float32(0.05)), relax.const(np.uint8(128)), out_dtype="uint8"))
    q = bb.emit(relax.op.nn.pad(q, [0, 0, 0, 0, 1, 1, 1, 1], pad_value=128.0))
    acc = bb.emit(relax.op.nn.conv2d(q, relax.const(wq), out_dtype="int32"))
    y = bb.emit(relax.op.astype(acc, F32))
    return tail(bb, bb.emit(relax.op.multiply(y, relax.const(m))))


def test_after_quantize_the_chain_folds_into_the_int8_rescale_and_one_bias():
    """Zero-point correction, bias, scale and shift after an int8 conv: one rescale, one add;
    the int8 weights stay as quantized."""
    rng = np.random.default_rng(8)
    wq = rng.integers(-127, 128, (4, 3, 3, 3)).astype("int8")
    m = rng.uniform(1e-4, 1e-3, (1, 4, 1, 1)).astype(F32)
    corr, b = (rng.standard_normal((1, 4, 1, 1)).astype(F32) for _ in range(2))
    s = rng.uniform(-2, 2, (4, 1, 1)).astype(F32)

    def before(bb, y):
        y = bb.emit(relax.op.add(y, relax.const(corr)))
        y = bb.emit(relax.op.add(y, relax.const(b)))
        y = bb.emit(relax.op.multiply(y, relax.const(s)))
        return relax.op.nn.relu(bb.emit(relax.op.subtract(y, relax.const(np.float32(0.5)))))

    s64 = s.reshape(4).astype(np.float64)
    m_exp = (m.reshape(4).astype(np.float64) * s64).reshape(1, 4, 1, 1).astype(F32)
    t = corr.reshape(4).astype(np.float64) + b.reshape(4).astype(np.float64)
    b_exp = (t * s64 - 0.5).reshape(1, 4, 1, 1).astype(F32)

    def expected(bb, y):
        return relax.op.nn.relu(bb.emit(relax.op.add(y, relax.const(b_exp))))

    mod = _module((1, 3, 6, 6), lambda bb, x: _int8_conv(bb, x, wq, m, before))
    after, report = _fold(mod)
    tvm.ir.assert_structural_equal(after, _module((1, 3, 6, 6), lambda bb, x: _int8_conv(bb, x, wq, m_exp, expected)))
    assert report["layers"] == [{"name": "conv2d", "before": [], "after": ["add", "add", "mul", "sub"],
                                 "into": "int8 rescale"}]
    assert report["ops_removed"] == 3 and foldable_left(after) == []
    x = rng.uniform(-3, 3, (1, 3, 6, 6)).astype(F32)
    ref = _run(mod, x)
    np.testing.assert_allclose(_run(after, x), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def _torch_bn_model(path):
    """A torch model exported with its batch norms unfused (no constant folding at export)."""
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
            self.b2, self.c2 = torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 8, 1, groups=2)
            self.c3, self.b3 = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), torch.nn.BatchNorm2d(8)
            self.fc, self.b4 = torch.nn.Linear(8 * 6 * 6, 10), torch.nn.BatchNorm1d(10)

        def forward(self, x):
            x = torch.relu(self.b1(self.c1(x * 0.5)))
            x = torch.relu(self.c2(self.b2(x)))  # batch norm before an unpadded conv
            x = torch.relu(self.b3(self.c3(x)) * 2.0)
            return self.b4(self.fc(x.flatten(1))) / 3.0

    torch.manual_seed(0)
    net = Net()
    for m in net.modules():  # non-trivial running statistics
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    torch.onnx.export(net.eval(), torch.randn(1, 3, 6, 6), str(path), dynamo=False, do_constant_folding=False,
                      input_names=["x"], output_names=["y"])
    return path


def test_torch_model_with_unfused_batch_norm_folds_completely_and_matches_onnxruntime(tmp_path):
    import onnx

    from tvm_compress import load_onnx

    path = _torch_bn_model(tmp_path / "bn.onnx")
    assert [n.op_type for n in onnx.load(str(path)).graph.node].count("BatchNormalization") == 4
    mod = load_onnx(path, {"x": (1, 3, 6, 6)})
    after, report = _fold(mod)
    assert "batch_norm" not in _ops(after) and foldable_left(after) == []
    assert report["ops_removed"] > 0
    x = np.random.default_rng(7).standard_normal((1, 3, 6, 6)).astype(F32)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = _run(after, x)
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-5


def test_compile_folds_by_default_and_no_fold_turns_it_off(tmp_path):
    from tvm_compress.cli import main

    path = _torch_bn_model(tmp_path / "bn.onnx")
    for flag, folded in (([], True), (["--no-fold"], False)):
        rep_path = tmp_path / f"rep{len(flag)}.json"
        assert main(["compile", str(path), "-o", str(tmp_path / f"m{len(flag)}.so"), "--target", "x86-avx2",
                     "--report", str(rep_path), "--quiet", *flag]) == 0
        rep = json.loads(rep_path.read_text())
        assert ("fold" in rep["passes"]) == folded
        assert rep["max_rel_err"] <= 1e-5
        if folded:
            assert rep["pass_reports"]["fold"]["ops_removed"] > 0


def test_quantize_then_fold_folds_into_int8_rescales_and_keeps_the_int8_outputs(tmp_path):
    """``--passes quantize,fold``: the unfused batch norms and scales after the int8 layers fold
    into their rescales; the int8 model computes the same numbers as before the fold."""
    from tvm_compress import load_onnx
    from tvm_compress.cli import main
    from tvm_compress.pass_registry import get_preset, make_config
    from tvm_compress.specs import InputSpec

    path = _torch_bn_model(tmp_path / "bn.onnx")
    quantize = get_preset("quantize")
    env = PassEnv(inputs=[InputSpec("x", (1, 3, 6, 6), F32)])
    q = quantize.make(make_config(quantize, {"calib": "random"}), env)(load_onnx(path, {"x": (1, 3, 6, 6)}))
    left = foldable_left(q)
    assert left and all(not f["before"] for f in left)
    after, report = _fold(q)
    assert foldable_left(after) == [] and report["layers"]
    assert {r["into"] for r in report["layers"]} == {"int8 rescale"} and report["ops_removed"] > 0
    x = np.random.default_rng(9).uniform(-1, 1, (1, 3, 6, 6)).astype(F32)
    ref = _run(q, x)
    assert np.abs(_run(after, x) - ref).max() <= 1e-5 * np.abs(ref).max()

    rep_path = tmp_path / "rep.json"
    assert main(["compile", str(path), "-o", str(tmp_path / "q.so"), "--target", "x86-avx2", "--passes",
                 "quantize,fold", "--calib", "random", "--report", str(rep_path), "--quiet"]) == 0
    rep = json.loads(rep_path.read_text())
    assert rep["passes"] == ["quantize", "fold"]
    assert [r["into"] for r in rep["pass_reports"]["fold"]["layers"]] == [r["into"] for r in report["layers"]]


def test_bad_fold_options_give_one_line_errors(tmp_path, capsys):
    from tvm_compress.cli import main

    model = "tvm_compress/data/fashion_cnn.onnx"
    assert main(["compile", model, "-o", str(tmp_path / "a.so"), "--fold-skip", "nope",
                 "--input-shape", "input=1,1,28,28"]) != 0
    assert main(["compile", model, "-o", str(tmp_path / "b.so"), "--passes", "prune,fold"]) != 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tvm-compress: error")]
    assert len(err) == 2 and "no layer named 'nope'" in err[0] and "fold must come before prune" in err[1]
    assert not list(tmp_path.iterdir())
