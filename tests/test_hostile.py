"""Hostile and broken inputs end in one line and a non-zero exit, and never load or write what
they should not: altered libraries, edited manifests, absurd shapes, unwritable outputs, models
onnxruntime cannot run as they are."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from tvm_compress.cli import main

CORPUS = Path(onnx.__file__).parent / "backend" / "test" / "data"


def _one_line_error(capsys, argv, words, code=2):
    assert main([str(a) for a in argv]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    return err[0]


@pytest.fixture(scope="module")
def built(dense_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "d.so"
    assert main(["compile", str(dense_model), "-o", str(out), "--quiet"]) == 0
    x = np.random.default_rng(0).random((2, 32), dtype=np.float32)
    np.save(out.parent / "x.npy", x)
    return out


def _copy(built: Path, tmp_path: Path) -> Path:
    lib = tmp_path / "d.so"
    shutil.copy(built, lib)
    shutil.copy(built.with_suffix(".json"), lib.with_suffix(".json"))
    return lib


def test_run_refuses_an_altered_library(built, tmp_path, capsys):
    lib = _copy(built, tmp_path)
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    _one_line_error(capsys, ["run", lib, "--input", built.parent / "x.npy"], "does not match its manifest's sha256")


def test_run_refuses_a_truncated_library_without_loading_it(built, tmp_path, capsys):
    lib = _copy(built, tmp_path)
    lib.write_bytes(lib.read_bytes()[:4096])
    _one_line_error(capsys, ["run", lib, "--input", built.parent / "x.npy"], "refusing to load it")


@pytest.mark.parametrize("edit", ["shape", "dtype", "hash"])
def test_run_refuses_an_edited_manifest(built, tmp_path, capsys, edit):
    lib = _copy(built, tmp_path)
    m = json.loads(lib.with_suffix(".json").read_text())
    if edit == "shape":
        m["inputs"][0]["shape"] = [4, 32]
    elif edit == "dtype":
        m["inputs"][0]["dtype"] = "float16"
    else:
        m["library_sha256"] = "0" * 64
    lib.with_suffix(".json").write_text(json.dumps(m))
    _one_line_error(capsys, ["run", lib, "--input", built.parent / "x.npy"], "was edited after the build")


def test_run_checks_in_memory_inputs_against_the_manifest(built):
    import tvm_compress
    from tvm_compress.errors import DataError

    with pytest.raises(DataError, match=r"input 'x': got \[3, 32\] float32, the library takes \[2, 32\] float32"):
        tvm_compress.run(built, [np.zeros((3, 32), np.float32)])


def test_an_input_larger_than_memory_is_refused_before_allocating(conv_model_dynamic, tmp_path, capsys):
    line = _one_line_error(capsys, ["compile", conv_model_dynamic, "-o", tmp_path / "m.so",
                                    "--input-shape", "x=100000000,3,8,8"], "GiB")
    assert "needs 71.5 GiB" in line and "memory" in line
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flag", ["-o", "--report"])
def test_outputs_that_cannot_be_created_are_refused_before_any_work(dense_model, tmp_path, capsys, flag):
    argv = ["compile", dense_model, "-o", tmp_path / "m.so"]
    if flag == "-o":
        argv[3] = "/proc/m.so"
    else:
        argv += ["--report", "/proc/r.json"]
    _one_line_error(capsys, argv, "cannot write /proc/")
    assert not list(tmp_path.iterdir())  # no library written when only the report path is bad


def test_run_output_that_cannot_be_created_is_refused(built, capsys):
    _one_line_error(capsys, ["run", built, "--input", built.parent / "x.npy", "--output", "/proc/y.npz"],
                    "cannot write /proc/y.npz")


def test_an_old_opset_model_onnxruntime_cannot_run_is_upgraded_and_verified(tmp_path, capsys):
    model = CORPUS / "pytorch-converted" / "test_BatchNorm2d_eval" / "model.onnx"
    assert onnx.load(str(model)).opset_import[0].version < 7
    assert main(["compile", str(model), "-o", str(tmp_path / "bn.so"), "--report", str(tmp_path / "r.json")]) == 0
    err = capsys.readouterr().err
    assert "upgraded from ONNX opset 6 to 13" in err
    assert json.loads((tmp_path / "r.json").read_text())["within_float_tolerance"]


def test_nan_where_onnxruntime_gives_nan_verifies(tmp_path):
    import tvm_compress

    model = CORPUS / "pytorch-operator" / "test_operator_sqrt" / "model.onnx"
    x = np.linspace(-2.0, 4.0, 12, dtype=np.float32).reshape(3, 4)  # negatives: NaN on both sides
    name = onnx.load(str(model)).graph.input[0].name
    np.savez(tmp_path / "x.npz", **{name: x})
    rep = tvm_compress.compile(model, tmp_path / "s.so", verify_input=tmp_path / "x.npz", bench_runs=0,
                               log=lambda m: None)
    assert rep["within_float_tolerance"]
    out = tvm_compress.run(tmp_path / "s.so", {name: x}).outputs[0]
    assert np.isnan(out[0, 0]) and out[2, 3] == 2.0


def _model(graph, opset=17, extra_opsets=()):
    from onnx import helper

    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    m.ir_version = 8
    return m


def _hostile_models():
    """(name, model, words of the one-line error): models a checker or a loader must refuse."""
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    g = lambda nodes, inputs=(x,), inits=(): helper.make_graph(nodes, "g", list(inputs), [y], initializer=list(inits))  # noqa: E731
    escape = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    escape.ClearField("raw_data")
    escape.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "../../../../etc/passwd"), ("offset", "0"), ("length", "64")):
        entry = escape.external_data.add()
        entry.key, entry.value = k, v
    huge_init = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[10**6, 10**6])
    big = helper.make_tensor_value_info("x", TensorProto.FLOAT, [10**6, 10**6])
    return [
        ("cycle", _model(g([helper.make_node("Relu", ["z"], ["w"]), helper.make_node("Add", ["x", "w"], ["z"]),
                            helper.make_node("Identity", ["z"], ["y"])])), "topologically sorted"),
        ("undefined input", _model(g([helper.make_node("Add", ["x", "nope"], ["y"])])), "'nope'"),
        ("missing initializer", _model(g([helper.make_node("MatMul", ["x", "W"], ["y"])])), "'W'"),
        ("duplicate names", _model(g([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["y"])])),
         "single static assignment"),
        ("10^12-element input", _model(g([helper.make_node("Relu", ["x"], ["y"])], inputs=[big])), "3725.3 GiB"),
        ("10^12-element initializer", _model(g([helper.make_node("MatMul", ["x", "W"], ["y"])], inits=[huge_init])),
         "ONNX checker"),
        ("future opset", _model(g([helper.make_node("Relu", ["x"], ["y"])]), opset=99), "uses ONNX opset 99"),
        ("unknown domain", _model(g([helper.make_node("Foo", ["x"], ["y"], domain="com.evil")]),
                                  extra_opsets=[helper.make_opsetid("com.evil", 1)]), "unsupported ONNX ops: Foo"),
        ("external data outside the folder", _model(g([helper.make_node("MatMul", ["x", "W"], ["y"])], inits=[escape])),
         "points outside the directory"),
    ]


@pytest.mark.parametrize("case", range(9))
def test_hostile_onnx_is_refused_in_one_line(tmp_path, capsys, case):
    name, model, words = _hostile_models()[case]
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    _one_line_error(capsys, ["compile", path, "-o", tmp_path / "out.so"], words)
    assert not (tmp_path / "out.so").exists()


def test_a_very_deep_graph_compiles(tmp_path):
    from onnx import TensorProto, helper

    import tvm_compress

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("Relu" if i % 2 else "Neg", ["x" if i == 0 else f"t{i - 1}"], [f"t{i}" if i < 2999 else "y"])
             for i in range(3000)]
    onnx.save(_model(helper.make_graph(nodes, "g", [x], [y])), str(tmp_path / "deep.onnx"))
    rep = tvm_compress.compile(tmp_path / "deep.onnx", tmp_path / "deep.so", bench_runs=0, log=lambda m: None)
    assert rep["within_float_tolerance"]
    assert rep["latency_ms"] is None and rep["latency_note"] == "not timed (--bench-runs 0)"


def test_a_model_larger_than_memory_allows_is_refused_before_loading(dense_model, tmp_path, capsys, monkeypatch):
    import tvm_compress.loader as loader

    monkeypatch.setattr(loader, "_memory_bytes", lambda: 3 * 1024)  # a 3 KiB machine
    _one_line_error(capsys, ["compile", dense_model, "-o", tmp_path / "m.so"], "too large to load")
