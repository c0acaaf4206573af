"""ONNX QDQ models from onnxruntime's quantizer compile to the same integer path."""

import numpy as np
import pytest
import tvm
from tvm import relax

from tvm_compress.pass_registry import PassEnv, get_preset, make_config
from tvm_compress.specs import InputSpec

torch = pytest.importorskip("torch")

from conftest import conv_net_class  # noqa: E402
from test_int8_kernels import _is_dot, _is_tap  # noqa: E402  (which intrinsic a kernel calls)


class Net(conv_net_class()):
    """conv+BN+relu, max-pool, depthwise, 1x1 conv, residual add, max-pool, linear (16x16)."""

    def __init__(self):
        super().__init__()
        self.c2 = torch.nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        x = torch.nn.functional.max_pool2d(x, 2)
        y = torch.relu(self.dw(x))
        x = torch.relu(x + self.c2(y))
        x = torch.nn.functional.max_pool2d(x, 2)
        return self.fc(x.flatten(1))


def _assert_matches_onnxruntime(fn, qdq_path, seed: int) -> None:
    """Against onnxruntime running the QDQ graph as written (graph optimizations off: each
    DequantizeLinear / Conv / QuantizeLinear on its own). Its fused int8 kernels are no exact
    reference: on AVX2 without VNNI they sum uint8 x int8 pairs with ``vpmaddubsw``, which
    saturates at int16, and differ from the model by up to 10 % of the output range here."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(qdq_path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    for _ in range(4):
        x = rng.uniform(0, 1, (1, 3, 16, 16)).astype("float32")
        ours = fn(tvm.runtime.tensor(x)).numpy()
        ref = sess.run(None, {"x": x})[0]
        # the same integers; float rounding of the last dequantize apart at most
        assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max(), np.abs(ours - ref).max()


def _make_qdq(tmp_path_factory, activation: str):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    tmp = tmp_path_factory.mktemp("qdq")
    torch.manual_seed(0)
    float_path, qdq_path = tmp / "small.onnx", tmp / "small_qdq.onnx"
    torch.onnx.export(Net().eval(), torch.randn(1, 3, 16, 16), str(float_path), input_names=["x"],
                      output_names=["y"], dynamo=False, opset_version=17)
    calib = np.random.default_rng(0).uniform(0, 1, (32, 3, 16, 16)).astype("float32")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"x": x[None]}

    quantize_static(str(float_path), str(qdq_path), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=getattr(QuantType, activation),
                    weight_type=QuantType.QInt8)
    return float_path, qdq_path


@pytest.fixture(scope="module")
def qdq_model(tmp_path_factory):
    return _make_qdq(tmp_path_factory, "QInt8")


def test_only_a_float_model_needs_calibration_data(qdq_model, tmp_path):
    """``compile`` refuses ``quantize`` without ``--calib`` before importing a float model; a
    QDQ model carries its scales and compiles without one."""
    import tvm_compress
    from tvm_compress.errors import DataError

    float_path, qdq_path = qdq_model
    with pytest.raises(DataError, match="quantize needs calibration data"):
        tvm_compress.compile(float_path, tmp_path / "f.so", target="x86-avx2", passes="quantize", log=lambda m: None)
    assert not (tmp_path / "f.so").exists()
    logs = []
    tvm_compress.compile(qdq_path, tmp_path / "q.so", target="x86-avx2", passes="quantize", bench_runs=1,
                         log=logs.append)
    assert (tmp_path / "q.so").exists() and any("realizing its own quantization" in m for m in logs)


def test_qdq_model_realizes_to_integer_compute(qdq_model):
    from tvm_compress.loader import load_onnx

    _, qdq_path = qdq_model
    mod = load_onnx(qdq_path, {"x": (1, 3, 16, 16)})
    preset = get_preset("quantize")
    logs = []
    env = PassEnv(inputs=[InputSpec("x", (1, 3, 16, 16), "float32")], log=logs.append)
    qmod = preset.make(make_config(preset, {}), env)(mod)  # no --calib needed: scales come with the model
    report = env.report["quantize"]
    assert report["source"] == "imported QDQ model"
    assert [l["status"] for l in report["layers"]] == ["int8"] * 4
    assert [l["op"] for l in report["layers"]] == ["conv2d", "conv2d", "conv2d", "matmul"]
    text = qmod["main"].script(show_meta=False)
    assert text.count('out_dtype="int32"') == 4
    assert any("already has QuantizeLinear" in m for m in logs)

    ex = tvm.compile(qmod, tvm.target.Target({"kind": "llvm"}))
    _assert_matches_onnxruntime(relax.VirtualMachine(ex, tvm.cpu())["main"], qdq_path, seed=1)


# x86-avx2: pmaddubsw, or pmaddwd for layers whose weights could saturate its int16 pairs
# (onnxruntime's weights here); x86: vpdpbusd where the CPU has VNNI.
@pytest.mark.parametrize("target_name", ["x86-avx2", "x86"])
@pytest.mark.parametrize("activation", ["QInt8", "QUInt8"])
def test_qdq_model_through_packed_int8_kernels(tmp_path_factory, activation, target_name):
    """The same models through the x86 lowering: conv, depthwise and dense layers become
    hand-scheduled packed kernels. onnxruntime's int8 activations here have zero point -128 (explicit
    zero-point pad + per-channel correction); its uint8 ones have zero point 0."""
    from tvm_compress import pipeline
    from tvm_compress.loader import load_onnx
    from tvm_compress.targets import get_target

    _, qdq_path = _make_qdq(tmp_path_factory, activation)
    preset = get_preset("quantize")
    env = PassEnv(inputs=[InputSpec("x", (1, 3, 16, 16), "float32")])
    qmod = preset.make(make_config(preset, {}), env)(load_onnx(qdq_path, {"x": (1, 3, 16, 16)}))
    profile = get_target(target_name)
    target = profile.tvm_target()
    with target:
        lowered = tvm.transform.Sequential(pipeline.lowering_passes(profile))(qmod)
    scheduled = pipeline.Schedule(profile)(lowered)
    kernels = [f for f in scheduled.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    hand = [f for f in kernels if "tvm_compress.int8_dot" in f.script()]
    assert len(hand) == 4 and all(f.attrs["tirx.is_scheduled"] for f in hand)  # c1, dw, c2, dense
    # The dense convolutions and the dense layer call the dot intrinsic on broadcast
    # activations; the depthwise one multiply-adds vectors of channels (a tap intrinsic, no
    # broadcast).
    assert len([f for f in hand if _is_dot(f)]) == 3 and len([f for f in hand if _is_tap(f)]) == 1
    fn = relax.VirtualMachine(tvm.compile(scheduled, target), tvm.cpu())["main"]
    _assert_matches_onnxruntime(fn, qdq_path, seed=2)
