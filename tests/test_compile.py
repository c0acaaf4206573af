"""compile(): x86 libraries that match onnxruntime, manifests, reports, atomic outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tvm_compress
from tvm_compress import errors
from tvm_compress.verify import ort_run, random_inputs

REPORT_KEYS = {
    "model", "target", "passes", "params_before", "params_after", "weight_bytes_before",
    "weight_bytes_after", "artifact_bytes", "max_abs_err", "max_rel_err", "latency_ms", "tuning",
}


def test_conv_model_matches_onnxruntime(conv_model, tmp_path):
    out = tmp_path / "conv.so"
    rep = tvm_compress.compile(conv_model, out, target="x86", report=tmp_path / "r.json", bench_runs=5, log=lambda m: None)
    assert out.exists() and out.with_suffix(".json").exists()
    assert REPORT_KEYS <= set(rep)
    assert rep["verified"] and rep["max_rel_err"] < 1e-4
    assert set(rep["latency_ms"]) >= {"median", "p90"}
    assert rep["params_before"] == rep["params_after"] > 0
    assert rep["weight_bytes_before"] == 4 * rep["params_before"]
    assert json.loads((tmp_path / "r.json").read_text())["artifact_bytes"] == out.stat().st_size

    # The artifact runs again through the public API on new data and still matches.
    x = np.random.default_rng(7).random((1, 3, 8, 8), dtype=np.float32)
    res = tvm_compress.run(out, {"x": x})
    ref = ort_run(conv_model, tvm_compress.prepare_onnx(conv_model).inputs, [x])
    np.testing.assert_allclose(res.outputs[0], ref[0], rtol=1e-4, atol=1e-5)


def test_manifest_describes_artifact(dense_model, tmp_path):
    out = tmp_path / "dense.so"
    tvm_compress.compile(dense_model, out, bench_runs=2, log=lambda m: None)
    man = json.loads(out.with_suffix(".json").read_text())
    assert man["inputs"] == [{"name": "x", "shape": [2, 32], "dtype": "float32"}]
    assert man["outputs"][0]["shape"] == [2, 5]
    assert man["target"] == "x86" and man["tvm_target"]["kind"] == "llvm"
    assert man["tvm_target"]["mcpu"] not in ("", "auto", "native")
    assert len(man["source_sha256"]) == 64 and man["tvm_version"].startswith("0.27")


def test_verify_input_file_is_used(dense_model, tmp_path):
    x = np.full((2, 32), 0.5, np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    rep = tvm_compress.compile(dense_model, tmp_path / "d.so", verify_input=tmp_path / "in.npz", bench_runs=1, log=lambda m: None)
    assert rep["verify_input"].endswith("in.npz")


@pytest.mark.parametrize(
    "arrays, pattern",
    [({"x": np.zeros((3, 32), np.float32)}, r"shape \[3, 32\], the model needs \[2, 32\]"),
     ({"z": np.zeros((2, 32), np.float32), "w": np.zeros(1)}, "no array for input 'x'")],
)
def test_bad_verify_input(dense_model, tmp_path, arrays, pattern):
    np.savez(tmp_path / "in.npz", **arrays)
    with pytest.raises(errors.DataError, match=pattern):
        tvm_compress.compile(dense_model, tmp_path / "d.so", verify_input=tmp_path / "in.npz", log=lambda m: None)
    assert not (tmp_path / "d.so").exists()


def test_random_inputs_respect_dtype():
    from tvm_compress.specs import InputSpec

    a, b = random_inputs([InputSpec("a", (2, 3), "float32"), InputSpec("b", (4,), "int64")])
    assert a.dtype == np.float32 and b.dtype == np.int64 and a.shape == (2, 3)


def test_demo_model_compiles_and_classifies_like_onnxruntime(demo_model, tmp_path):
    from tvm_compress.demo import _top1_ort, _top1_tvm, demo_images

    out = tmp_path / "fashion.so"
    rep = tvm_compress.compile(demo_model, out, input_shapes={"input": (1, 1, 28, 28)}, bench_runs=3, log=lambda m: None)
    assert rep["max_rel_err"] < 1e-4
    images, labels = demo_images()
    images, labels = images[:100], labels[:100]
    assert _top1_tvm(out, images, labels) == _top1_ort(demo_model, images, labels) > 0.8


def test_unknown_target_fails_before_work(dense_model, tmp_path):
    with pytest.raises(errors.TargetError, match="unknown target 'x87'"):
        tvm_compress.compile(dense_model, tmp_path / "d.so", target="x87")


def test_unwritable_output(dense_model, tmp_path):
    with pytest.raises(errors.OutputError, match="does not exist"):
        tvm_compress.compile(dense_model, tmp_path / "no" / "dir" / "d.so")


def test_unknown_pass(dense_model, tmp_path):
    with pytest.raises(errors.PassOptionError, match="unknown pass 'sparsify'"):
        tvm_compress.compile(dense_model, tmp_path / "d.so", passes="sparsify")


def test_registered_relax_pipeline_compiles(conv_model):
    """relax.get_pipeline("tvm_compress", ...) is the same flow as one pass."""
    import tvm
    from tvm import relax

    import tvm_compress.pipeline  # noqa: F401  (registers the pipeline)
    from tvm_compress.targets import get_target

    profile = get_target("x86")
    prepared = tvm_compress.prepare_onnx(conv_model)
    mod = relax.get_pipeline("tvm_compress", target=profile)(prepared.to_relax())
    ex = tvm.compile(mod, profile.tvm_target())
    vm = relax.VirtualMachine(ex, tvm.cpu())
    x = np.random.default_rng(1).random((1, 3, 8, 8), dtype=np.float32)
    ref = ort_run(conv_model, prepared.inputs, [x])[0]
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x)).numpy(), ref, rtol=1e-4, atol=1e-5)


def test_compare_tolerates_tiny_differences_on_near_constant_outputs():
    from tvm_compress.verify import compare

    ref = np.full((4, 4), 1e-6, np.float32)
    ref[0, 0] = 3e-5  # range 2.9e-5
    ok = compare([ref + 1e-7], [ref])
    assert ok["within_float_tolerance"] and ok["max_rel_err"] > 1e-3
    bad = compare([ref + 1e-3], [ref])
    assert not bad["within_float_tolerance"]
    scaled = np.linspace(-50, 50, 16, dtype=np.float32)
    assert not compare([scaled + 0.2], [scaled])["within_float_tolerance"]
    assert compare([scaled + 0.01], [scaled])["within_float_tolerance"]
