"""LSTM, GRU and RNN nodes unrolled before import (tvm_compress/onnx_rnn.py).

The unrolled graph must compute what onnxruntime's own LSTM/GRU kernels compute on the original
node: checked in onnxruntime for the attribute variants (no TVM in the loop), then end to end
through ``compile`` (which verifies the library against onnxruntime on the original model).
"""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import tvm_compress
from tvm_compress import errors
from tvm_compress.loader import prepare_onnx
from tvm_compress.onnx_rnn import expand_recurrent

torch = pytest.importorskip("torch")

H, I, T, B = 5, 4, 6, 2


def _ort(model: onnx.ModelProto, feeds):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _node_model(op, attrs, seq_lens=False, peepholes=False, states=False, layout=0, seed=0):
    """One LSTM/GRU node with random constant weights; inputs x (and its initial states)."""
    rng = np.random.default_rng(seed)
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    dirs = 2 if attrs.get("direction") == "bidirectional" else 1
    x_shape = [T, B, I] if layout == 0 else [B, T, I]
    state_shape = [dirs, B, H] if layout == 0 else [B, dirs, H]
    inits = [numpy_helper.from_array(rng.uniform(-0.6, 0.6, (dirs, gates * H, I)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.uniform(-0.6, 0.6, (dirs, gates * H, H)).astype(np.float32), "R"),
             numpy_helper.from_array(rng.uniform(-0.3, 0.3, (dirs, 2 * gates * H)).astype(np.float32), "B")]
    inputs = ["x", "W", "R", "B", ""]
    if seq_lens:
        inits.append(numpy_helper.from_array(np.full(B, T, np.int32), "seq"))
        inputs[4] = "seq"
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    names = ["h0", "c0"] if op == "LSTM" else ["h0"]
    if states:
        inputs += names
        graph_inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, state_shape) for n in names]
    if peepholes:
        inputs += [""] * (7 - len(inputs)) + ["P"]
        inits.append(numpy_helper.from_array(rng.uniform(-0.5, 0.5, (dirs, 3 * H)).astype(np.float32), "P"))
    outs = ["y", "yh", "yc"][: 3 if op == "LSTM" else 2]
    node = helper.make_node(op, inputs, outs, name="rnn", hidden_size=H, layout=layout, **attrs)
    y_shape = [T, dirs, B, H] if layout == 0 else [B, T, dirs, H]
    graph = helper.make_graph([node], "g", graph_inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)]
                              + [helper.make_tensor_value_info(n, TensorProto.FLOAT, state_shape) for n in outs[1:]],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": rng.standard_normal(x_shape).astype(np.float32)}
    if states:
        feeds.update({n: rng.standard_normal(state_shape).astype(np.float32) for n in names})
    return model, feeds


@pytest.mark.parametrize("op, attrs, extra", [
    ("LSTM", {}, {}),
    ("LSTM", {"direction": "reverse"}, {"peepholes": True, "states": True}),
    ("LSTM", {"direction": "bidirectional"}, {"seq_lens": True, "states": True}),
    ("LSTM", {}, {"layout": 1, "states": True}),
    ("GRU", {}, {}),  # linear_before_reset 0: the reset gate before the recurrent matmul
    ("GRU", {"linear_before_reset": 1, "direction": "bidirectional"}, {"states": True}),
    ("GRU", {"direction": "reverse"}, {"states": True, "layout": 1}),
    ("RNN", {}, {}),
    ("RNN", {"direction": "bidirectional"}, {"states": True, "seq_lens": True}),
    # activations other than the defaults (DeepSpeech's ReLU RNN), per direction
    ("RNN", {"direction": "bidirectional", "activations": ["Relu", "Tanh"]}, {"states": True}),
    ("LSTM", {"activations": ["Sigmoid", "Relu", "Tanh"]}, {}),
    ("GRU", {"direction": "bidirectional", "activations": ["Sigmoid", "Relu", "Relu", "Tanh"]}, {}),
])
def test_unrolled_node_computes_what_onnxruntime_computes(op, attrs, extra):
    model, feeds = _node_model(op, attrs, **extra)
    if extra.get("layout"):
        # onnxruntime runs no batch-first (layout 1) node: the same node in layout 0, transposed
        ref_model, ref_feeds = _node_model(op, attrs, **{**extra, "layout": 0})
        feeds = {k: np.ascontiguousarray(np.swapaxes(v, 0, 1)) for k, v in ref_feeds.items()}
        y, *states = _ort(ref_model, ref_feeds)
        ref = [y.transpose(2, 0, 1, 3), *(np.swapaxes(s, 0, 1) for s in states)]
    else:
        ref = _ort(model, feeds)
    unrolled = onnx.ModelProto()
    unrolled.CopyFrom(model)
    unrolled = onnx.shape_inference.infer_shapes(unrolled)
    counts, refused = expand_recurrent(unrolled)
    assert counts == {op: 1} and not refused
    assert op not in {n.op_type for n in unrolled.graph.node}
    assert {i.name for i in unrolled.graph.initializer}.isdisjoint({"W", "R", "B", "P", "seq"})  # replaced
    onnx.checker.check_model(unrolled, full_check=True)
    got = _ort(unrolled, feeds)  # the unrolled graph has no recurrent node: runs in any layout
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attrs, words", [
    ({"clip": 3.0}, "clip and input_forget are not supported"),
    ({"activations": ["Sigmoid", "Elu", "Tanh"]}, "activations sigmoid, elu, tanh (only sigmoid, tanh, relu"),
])
def test_nodes_not_unrolled_are_refused_saying_why(attrs, words, tmp_path):
    model, _ = _node_model("LSTM", attrs)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    with pytest.raises(errors.UnsupportedOpError) as err:
        prepare_onnx(path)
    assert f"LSTM (e.g. node 'rnn': not unrolled, {words}" in str(err.value) and "\n" not in str(err.value)


class _Recurrent(torch.nn.Module):
    """conv1d features -> two-layer bidirectional LSTM or GRU (batch first) -> linear."""

    def __init__(self, kind):
        super().__init__()
        self.conv = torch.nn.Conv1d(3, 8, 3, padding=1)
        self.rnn = (torch.nn.LSTM if kind == "lstm" else torch.nn.GRU)(8, 16, num_layers=2, bidirectional=True,
                                                                     batch_first=True)
        self.fc = torch.nn.Linear(32, 5)

    def forward(self, x):
        y, _ = self.rnn(torch.relu(self.conv(x)).transpose(1, 2))
        return self.fc(y)


def _export(kind, path: Path) -> Path:
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.onnx.export(_Recurrent(kind).eval(), torch.randn(1, 3, 20), buf, input_names=["x"], dynamo=False,
                      opset_version=17, dynamic_axes={"x": {0: "batch", 2: "time"}})
    path.write_bytes(buf.getvalue())
    return path


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_recurrent_model_compiles_and_matches_onnxruntime(kind, tmp_path):
    """A dynamic-length export, its length fixed by ``input_shapes``; compile verifies the
    library against onnxruntime running the original LSTM/GRU nodes. Every weight is stored
    once, though each time step's kernels read the recurrent ones (``ShareConstants``)."""
    path = _export(kind, tmp_path / f"{kind}.onnx")
    logs = []
    rep = tvm_compress.compile(path, tmp_path / "m.so", input_shapes={"x": (2, 3, 24)}, target="x86-avx2",
                               bench_runs=2, log=logs.append)
    assert rep["verified"] and rep["max_rel_err"] < 1e-4
    assert any(f"2 {kind.upper()} nodes unrolled" in m for m in logs)
    assert rep["weight_bytes_after"] <= rep["weight_bytes_before"] * 1.25  # not one copy per step


@pytest.mark.parametrize("kind, per_step", [("lstm", 3), ("gru", 2)])
def test_each_step_is_its_matmul_and_its_gate_kernels(kind, per_step, tmp_path):
    """Each gate reads its own slice of the step's input projection, fused into the gates'
    kernel: per step the recurrent matmul and the gates (one kernel; LSTM two, its cell state
    being read by the next step as well), no gather of the step's row as a kernel call of its
    own (about 1 us each; with it: 4 and 3 calls per step)."""
    import tvm
    from tvm_compress.pipeline import lowering_passes
    from tvm_compress.targets import get_target

    prepared = prepare_onnx(_export(kind, tmp_path / f"{kind}.onnx"), {"x": (1, 3, 24)})
    with get_target("x86").tvm_target():
        low = tvm.transform.Sequential(lowering_passes())(prepared.to_relax())
    call_tir, callees = tvm.ir.Op.get("relax.call_tir"), []
    tvm.relax.analysis.post_order_visit(
        low["main"], lambda e: callees.append(e.args[0].name_hint)
        if isinstance(e, tvm.relax.Call) and e.op.same_as(call_tir) else None)
    steps = 24 * 2 * 2  # time steps x directions x layers
    assert "take" not in callees
    # besides the steps: the conv, the two layers' projections, the output concats, the linear
    assert len(callees) <= per_step * steps + 12, len(callees)


def test_recurrent_model_quantizes(tmp_path):
    """The unrolled projections are dense layers with constant weights: int8 like any other."""
    path = _export("lstm", tmp_path / "lstm.onnx")
    rep = tvm_compress.compile(path, tmp_path / "q.so", input_shapes={"x": (1, 3, 16)}, target="x86-avx2",
                               passes="quantize", pass_configs={"quantize": {"calib": "random"}}, bench_runs=2,
                               log=lambda m: None)
    layers = rep["pass_reports"]["quantize"]["layers"]
    matmuls = [l for l in layers if l["op"] == "matmul"]
    assert len(matmuls) >= 8 and all(l["status"] == "int8" for l in matmuls)
    # int8 weights stored once for all steps (a copy per step: 1.9x the float bytes); each
    # step keeps its own float rescale vector (calibrated per step), a third of this small model
    assert rep["weight_bytes_after"] < 0.75 * rep["weight_bytes_before"]


_SILERO = importlib.util.find_spec("silero_vad")


@pytest.mark.slow
@pytest.mark.skipif(_SILERO is None, reason="pip install --no-deps silero-vad==6.2.3 (make test does)")
@pytest.mark.parametrize("name, shapes, values", [
    ("silero_vad_16k_sequence.onnx", {"input": (12, 576)}, None),  # an LSTM over 12 steps after the convs
    ("silero_vad_16k_op15.onnx", {"input": (1, 512), "state": (2, 1, 128)}, None),  # its LSTM inside an If
    # the published default file: both sample rates' networks behind If(sr == 16000), their
    # weights computed inside the branches; the sample rate fixed picks one
    ("silero_vad.onnx", {"input": (1, 512), "state": (2, 1, 128)}, {"sr": [16000]}),
    ("silero_vad.onnx", {"input": (1, 256), "state": (2, 1, 128)}, {"sr": [8000]}),
])
def test_silero_vad_compiles_and_matches_onnxruntime(name, shapes, values, tmp_path):
    path = Path(_SILERO.submodule_search_locations[0]) / "data" / name
    rep = tvm_compress.compile(path, tmp_path / "vad.so", input_shapes=shapes, input_values=values,
                               target="x86-avx2", bench_runs=2, log=lambda m: None)
    assert rep["verified"] and rep["max_rel_err"] < 1e-4
    assert rep["conv_layout"]["layout"] == "NHWC", rep["conv_layout"]


@pytest.mark.slow
@pytest.mark.skipif(_SILERO is None, reason="pip install --no-deps silero-vad==6.2.3 (make test does)")
def test_silero_vad_without_its_sample_rate_is_refused_naming_the_option():
    from tvm_compress.errors import UnsupportedOpError

    path = Path(_SILERO.submodule_search_locations[0]) / "data" / "silero_vad.onnx"
    with pytest.raises(UnsupportedOpError, match=r"its weights are computed at run time .*"
                                                 r"input 'sr' decides 1 If node at run time: --input-value sr=V"):
        tvm_compress.prepare_onnx(path, {"input": (1, 512), "state": (2, 1, 128)})


@pytest.mark.slow
def test_recurrent_model_matches_onnxruntime_on_aarch64_under_qemu(tmp_path):
    from tvm_compress.cache import runner_cache_dir
    from tvm_compress.targets import qemu

    ok, why = qemu.can_run("aarch64", cache_dir=runner_cache_dir())
    if not ok:
        pytest.skip(why)
    path = _export("gru", tmp_path / "gru.onnx")
    rep = tvm_compress.compile(path, tmp_path / "a.so", input_shapes={"x": (1, 3, 24)}, target="aarch64",
                               bench_runs=1, log=lambda m: None)
    assert rep["verified"] and rep["max_rel_err"] < 1e-4


def test_inspect_says_the_nodes_were_unrolled(tmp_path, capsys):
    from tvm_compress.cli import main

    model, _ = _node_model("GRU", {"direction": "bidirectional"})
    onnx.save(model, str(tmp_path / "gru.onnx"))
    assert main(["inspect", str(tmp_path / "gru.onnx")]) == 0
    out = capsys.readouterr().out
    assert "note: 1 GRU node unrolled over its fixed sequence length" in out and "GRU x1" in out
    assert main(["inspect", str(tmp_path / "gru.onnx"), "--json"]) == 0
    assert any("unrolled" in n for n in json.loads(capsys.readouterr().out)["notes"])
