"""Default schedules survive a rule that raises on a kernel, or whose schedule TVM cannot lower
(ResilientDefaultSchedule), and the CUDA presets carry the device limits the GPU rules ask for.

The two real failures of dlight's ``gpu.Matmul`` (TVM 0.27) are reproduced on small graphs:
a convolution fused with a trailing pad, and an int8 convolution with 128 input channels."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax
from tvm.s_tir import dlight as dl

import tvm_compress
from tvm_compress import errors
from tvm_compress.targets import get_family, get_target, target_names
from tvm_compress.targets.cpu_schedule import CPUFallback
from tvm_compress.targets.default_schedule import ResilientDefaultSchedule, schedule_fallbacks

quiet = lambda m: None  # noqa: E731
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc: CUDA code cannot be built here")


class _Raises:
    """A rule with a bug: raises on every matmul-like kernel (as dlight's gpu.Matmul did on a
    published detector: "consumers of the cache-write stage that are not properly inlined")."""

    def apply(self, func, target, tunable):
        if "matmul" in str(func.script()):  # test rule: which kernels it breaks on
            raise AssertionError("There are some consumers of the cache-write stage that are not properly inlined.")
        return None


def _with_rules(monkeypatch, family: str, *rules):
    monkeypatch.setattr(type(get_family(family)), "default_schedule",
                        lambda self, profile: [ResilientDefaultSchedule(*rules)])


def test_cpu_kernel_whose_rule_raises_falls_back_and_is_reported(dense_model, tmp_path, monkeypatch):
    _with_rules(monkeypatch, "x86", _Raises(), CPUFallback())
    logs = []
    rep = tvm_compress.compile(dense_model, tmp_path / "d.so", target="x86-avx2", bench_runs=1, log=logs.append)
    assert rep["verified"] and rep["within_float_tolerance"]
    fb = rep["schedule_fallbacks"]
    # CPUFallback where it applies; a CPU runs the others as plain loops.
    assert fb and all(f["used"] in ("CPUFallback", None) and f["failed"][0]["rule"] == "_Raises" for f in fb)
    assert all("matmul" in f["kernel"] for f in fb)
    assert any(line.startswith("schedule: ") and fb[0]["kernel"] in line
               and "_Raises failed (AssertionError: " in line for line in logs)


def test_without_faults_nothing_is_reported(dense_model, tmp_path):
    rep = tvm_compress.compile(dense_model, tmp_path / "d.so", target="x86-avx2", bench_runs=1, log=quiet)
    assert rep["schedule_fallbacks"] == []


@needs_nvcc
def test_cuda_kernel_whose_rule_raises_gets_the_generic_gpu_schedule(dense_model, tmp_path, monkeypatch):
    _with_rules(monkeypatch, "cuda", _Raises(), dl.gpu.Fallback())
    rep = tvm_compress.compile(dense_model, tmp_path / "d.so", target="cuda-sm80", log=quiet)
    assert (tmp_path / "d.so").exists()
    assert rep["schedule_fallbacks"] and all(f["used"] == "Fallback" for f in rep["schedule_fallbacks"])


@needs_nvcc
def test_cuda_kernel_no_rule_can_schedule_is_one_line(dense_model, tmp_path, monkeypatch):
    _with_rules(monkeypatch, "cuda", _Raises())
    with pytest.raises(errors.TargetError, match=r"no schedule rule could schedule kernel \S*matmul\S* \(_Raises: "):
        tvm_compress.compile(dense_model, tmp_path / "d.so", target="cuda-sm80", log=quiet)
    assert not (tmp_path / "d.so").exists()


@pytest.mark.parametrize("name", [n for n in target_names() if get_target(n).family == "cuda"])
def test_cuda_presets_carry_the_device_limits(name):
    attrs = get_target(name).tvm_target().attrs
    assert int(attrs["max_shared_memory_per_block"]) == 49152
    assert int(attrs["max_threads_per_block"]) == 1024 and int(attrs["thread_warp_size"]) == 32


# ---- the two dlight gpu.Matmul failures, on graphs of the same fusion ---------------------------

CUDA_PRESETS = [n for n in target_names() if get_target(n).family == "cuda"
                and get_target(n).target.get("host") is None]  # jetson-orin: aarch64 host, below


@pytest.fixture(scope="module")
def conv_pad_model(tmp_path_factory):
    """conv2d + bias + relu + pad (+ max pool): the pad fuses into the conv's kernel, as in the
    stem of a newer PaddleOCR detector (there: 1x12x161x161)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((12, 8, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(12).astype(np.float32), "b"),
             numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "pads")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Pad", ["r", "pads"], ["p"]),
             helper.make_node("MaxPool", ["p"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]
    graph = helper.make_graph(nodes, "conv_pad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 12, 8, 8])], inits)
    path = tmp_path_factory.mktemp("models") / "conv_pad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@needs_nvcc
@pytest.mark.parametrize("name", CUDA_PRESETS)
def test_conv_fused_with_a_pad_builds_for_every_cuda_preset(conv_pad_model, tmp_path, name):
    logs = []
    rep = tvm_compress.compile(conv_pad_model, tmp_path / "c.so", target=name, log=logs.append)
    assert (tmp_path / "c.so").exists()
    (fb,) = [f for f in rep["schedule_fallbacks"] if "conv2d" in f["kernel"]]
    assert "pad" in fb["kernel"] and fb["failed"][0]["rule"] == "Matmul"
    assert "cache-write stage that are not properly inlined" in fb["failed"][0]["error"]
    assert fb["used"] == "GeneralReduction"
    assert any(line.startswith(f"schedule: kernel {fb['kernel']}: Matmul failed") for line in logs)


def _int8_conv(channels: int) -> tvm.IRModule:
    """int8 1x1 conv (int32 sums) + dequantize, fused into one kernel."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, channels, 16, 16), "int8"))
    with bb.function("main", [x]):
        w = relax.const(np.ones((channels, channels, 1, 1), "int8"))
        with bb.dataflow():
            acc = bb.emit(relax.op.nn.conv2d(x, w, out_dtype="int32"))
            out = bb.emit_output(relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(0.5, "float32")))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("channels,falls_back", [(128, True), (64, False)])
def test_int8_conv_whose_tensor_core_schedule_does_not_lower_falls_back(channels, falls_back):
    """gpu.Matmul's int8 tensor-core schedule (sm_80+) of a reduction over 128 or more channels
    is made, then rejected by the software-pipeline lowering in tvm.compile; 64 lowers."""
    target = get_target("cuda-sm80").tvm_target()
    with target:
        mod = tvm.transform.Sequential([
            relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
            relax.transform.FuseOps(), relax.transform.FuseTIR(),
            ResilientDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()),
        ])(_int8_conv(channels))
    fallbacks = schedule_fallbacks(mod)
    if not falls_back:
        assert fallbacks == []
        return
    (fb,) = fallbacks
    assert fb["failed"][0]["rule"] == "Matmul" and "fragment_info_" in fb["failed"][0]["error"]
    assert fb["used"] == "GeneralReduction"
    if shutil.which("nvcc"):
        get_family("cuda").compile(mod, get_target("cuda-sm80"))  # the whole module now builds


@needs_nvcc
def test_int8_detector_kernels_build_for_cuda(tmp_path):
    """The same failure end to end: ``--passes quantize`` on a conv chain with 128 channels."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array((rng.standard_normal((128, 8, 3, 3)) * 0.2).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal((128, 128, 1, 1)) * 0.1).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"]),
             helper.make_node("Relu", ["c2"], ["y"])]
    graph = helper.make_graph(nodes, "int8_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128, 16, 16])], inits)
    model = tmp_path / "chain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, 8, 16, 16)).astype(np.float32))
    rep = tvm_compress.compile(model, tmp_path / "q.so", target="cuda-sm80", passes="quantize",
                               pass_configs={"quantize": {"calib": str(tmp_path / "calib.npz")}}, log=quiet)
    assert (tmp_path / "q.so").exists()
    (fb,) = rep["schedule_fallbacks"]  # the 128-channel 1x1 conv; the 8-channel one keeps Matmul
    assert fb["failed"][0]["rule"] == "Matmul" and fb["used"] == "GeneralReduction"


@needs_nvcc
def test_gpu_schedule_over_the_shared_memory_limit_is_skipped(tmp_path):
    """At 96x96 gpu.GeneralReduction stages the conv+pad kernel's whole output (12x48x48 floats,
    110 KB) in shared memory, over the 48 KiB a block gets; ptxas would refuse it, so the rule
    is skipped and the generic schedule used (at 320x320, PPHGNet's stem: 3.2 MB)."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal((12, 8, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "pads")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Pad", ["r", "pads"], ["y"])]
    graph = helper.make_graph(nodes, "conv_pad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 96, 96])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 12, 49, 49])], inits)
    model = tmp_path / "conv_pad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    logs = []
    rep = tvm_compress.compile(model, tmp_path / "c.so", target="cuda-sm80", log=logs.append)
    assert (tmp_path / "c.so").exists()
    (fb,) = rep["schedule_fallbacks"]
    assert [f["rule"] for f in fb["failed"]] == ["Matmul", "GeneralReduction"]
    assert "max_shared_memory_per_block" in fb["failed"][1]["error"] and fb["used"] == "Fallback"
    assert any("GeneralReduction failed (ValueError: the schedule exceeds" in line for line in logs)
