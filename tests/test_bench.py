"""``tvm-compress bench``: the matrix, its files, failures, resume, and a quiet terminal.

The CLI runs in a subprocess, as a user runs it, so that what reaches the terminal (file
descriptors 1 and 2, native TVM output included) is what the test sees.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tvm_compress import verify

# What TVM's native side prints ("[03:08:35] /project/src/...: Warning: ..."), MetaSchedule's
# console logger, and raw Python warnings: none of it may reach the terminal by default.
NATIVE = re.compile(r"^\[\d\d:\d\d:\d\d\] |/project/src/|Warning:|\[INFO\]|UserWarning|WARNING:root", re.M)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tvm_compress.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=dict(os.environ), timeout=1500)


@pytest.fixture(scope="module")
def labelled(conv_model, tmp_path_factory):
    """Seeded inputs for the conv model, labelled by onnxruntime's own argmax (its top-1 is 100 %)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((24, 3, 8, 8)).astype("float32")
    sess = verify.ort_session(conv_model)
    labels = np.concatenate([sess.run(None, {"x": x[i : i + 1]})[0] for i in range(len(x))]).argmax(1)
    path = tmp_path_factory.mktemp("bench-data") / "data.npz"
    np.savez(path, x=x, labels=labels)
    return path


@pytest.fixture(scope="module")
def bench_run(conv_model, labelled, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    args = ["bench", conv_model, "-o", out, "--targets", "x86-avx2,aarch64", "--passes", "none,quantize",
            "--calib", labelled, "--eval", labelled, "--tune-trials", "4", "--rounds", "2"]
    return out, args, _cli(*args)


def test_bench_writes_every_file_with_a_row_per_combination(bench_run):
    out, _, proc = bench_run
    assert proc.returncode == 0, proc.stderr
    rep = json.loads((out / "report.json").read_text())
    rows = {(r["target"], r["pass_set"]): r for r in rep["rows"]}
    assert set(rows) == {("x86-avx2", "none"), ("x86-avx2", "quantize"), ("aarch64", "none"), ("aarch64", "quantize")}
    assert all(r["status"] == "ok" and Path(r["library"]).exists() for r in rows.values())
    assert all(r["schedule_fallbacks"] == [] for r in rows.values())  # every default rule applied
    # Host builds are timed against both onnxruntime baselines in the same rounds, and scored.
    for ps in ("none", "quantize"):
        r = rows[("x86-avx2", ps)]
        t = r["timing"]
        assert t["rounds"] == 2 and t["p10"] <= t["median"] <= t["p90"]
        assert t["speedup_vs_onnxruntime_fp32"] > 0 and t["speedup_vs_onnxruntime_int8"] > 0
        assert r["accuracy"]["samples"] == 24
    assert rows[("x86-avx2", "none")]["accuracy"]["top1"] == 1.0  # float build == onnxruntime's labels
    assert rows[("x86-avx2", "quantize")]["weight_bytes_after"] < rows[("x86-avx2", "none")]["weight_bytes_after"] / 2
    # qemu builds are verified, never timed.
    for ps in ("none", "quantize"):
        r = rows[("aarch64", ps)]
        assert r["timing"] is None and "qemu" in r["timing_note"] and r["verified"]
    base = rep["baselines"]
    assert base["onnxruntime fp32"]["accuracy"]["top1"] == 1.0
    assert base["onnxruntime int8"]["timing"]["median"] > 0 and Path(base["onnxruntime int8"]["path"]).exists()
    assert "own process" in rep["timing_setup"]
    md = (out / "report.md").read_text()
    assert md.count("| x86-avx2 |") == 2 and md.count("| aarch64 |") == 2 and "onnxruntime int8" in md


def test_bench_plots_are_pngs_with_the_expected_series(bench_run):
    from PIL import Image

    out, _, _ = bench_run
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["plots"]) == {"latency.png", "tradeoff.png", "kernels.png"}
    for name in rep["plots"]:
        with Image.open(out / name) as img:
            img.verify()
            assert img.format == "PNG" and img.size[0] > 300
    series = rep["plot_series"]
    assert series["latency.png"] == ["onnxruntime fp32", "onnxruntime int8", "x86-avx2 none", "x86-avx2 quantize"]
    # Accuracy vs latency: timed engines; vs size: every build (qemu ones too) with a score.
    assert set(series["tradeoff.png"]["latency"]) == {"onnxruntime fp32", "onnxruntime int8", "x86-avx2--none",
                                                      "x86-avx2--quantize"}
    assert series["tradeoff.png"]["pareto_latency"]
    assert rep["kernels_of_slowest"]["engine"] in ("x86-avx2--none", "x86-avx2--quantize")
    assert series["kernels.png"] and all(k in rep["kernels_of_slowest"]["kernels_ms"] for k in series["kernels.png"])


def test_bench_terminal_has_progress_and_results_and_no_native_warnings(bench_run):
    out, _, proc = bench_run
    assert not NATIVE.search(proc.stderr + proc.stdout), (proc.stderr + proc.stdout)[:2000]
    assert "[4/4] aarch64--quantize: ok" in proc.stderr
    assert "onnxruntime int8" in proc.stdout and "x86-avx2" in proc.stdout
    # The native output went to the combination's log instead.
    assert any(NATIVE.search(p.read_text(errors="replace")) for p in (out / "logs").glob("*.log"))


def test_bench_rerun_resumes_finished_rows(bench_run):
    out, args, _ = bench_run
    before = {r["key"]: r["compile_seconds"] for r in json.loads((out / "report.json").read_text())["rows"]}
    proc = _cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("done before, kept") == 4
    after = json.loads((out / "report.json").read_text())["rows"]
    assert {r["key"]: r["compile_seconds"] for r in after} == before
    assert all(r["timing"] for r in after if r["target"] == "x86-avx2")  # timed again, in this run


def test_a_resumed_library_that_no_longer_matches_its_manifest_is_rebuilt(bench_run):
    out, args, _ = bench_run
    lib = out / "rows" / "x86-avx2--none.so"
    lib.write_bytes(lib.read_bytes()[:-16])  # altered after the first run: never loaded
    proc = _cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("done before, kept") == 3 and "[1/4] x86-avx2--none: ok" in proc.stderr


def test_a_failing_combination_is_recorded_and_the_rest_completes(conv_model, tmp_path):
    out = tmp_path / "out"
    proc = _cli("bench", conv_model, "-o", out, "--targets", "x86-avx2", "--passes", "none,lowrank",
                "--lowrank-skip", "nope", "--rounds", "1", "--no-plots")
    assert proc.returncode == 4
    rows = {r["pass_set"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    assert rows["lowrank"]["status"] == "failed" and "no layer named 'nope'" in rows["lowrank"]["error"]
    engines_log = (out / "logs" / "engines.log").read_text(errors="replace")[-2000:]
    assert rows["none"]["status"] == "ok" and rows["none"]["timing"].get("median", 0) > 0, \
        (rows["none"]["timing"], engines_log)
    assert "**failed**" in (out / "report.md").read_text()
    assert "FAILED: lowrank: no layer named 'nope'" in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, words", [
    (["--targets", "x86,nosuch"], "unknown target 'nosuch'"),
    (["--passes", "none,quantize+nosuch"], "nosuch"),
    (["--passes", "quantize,quantize"], "given twice"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--lowrank-energy", "2", "--passes", "lowrank"], "--lowrank-energy must be in (0, 1]"),
])
def test_bad_bench_arguments_are_one_line_errors(conv_model, tmp_path, args, words):
    out = tmp_path / "out"
    proc = _cli("bench", conv_model, "-o", out, *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], proc.stderr
    assert not out.exists()


def test_bench_of_a_missing_model_is_one_line(tmp_path):
    proc = _cli("bench", tmp_path / "nope.onnx", "-o", tmp_path / "out")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "nope.onnx" in proc.stderr and not (tmp_path / "out").exists()


def test_the_report_notes_kernels_on_a_fallback_schedule(bench_run):
    """A row whose build had kernels a default rule failed on says so in report.md."""
    from tvm_compress.bench_report import markdown

    out, _, _ = bench_run
    rep = json.loads((out / "report.json").read_text())
    row = next(r for r in rep["rows"] if r["target"] == "x86-avx2" and r["pass_set"] == "none")
    row["schedule_fallbacks"] = [{"kernel": "fused_conv2d_add_relu_pad", "used": "GeneralReduction",
                                  "failed": [{"rule": "Matmul", "error": "AssertionError: ..."}]}]
    lines = [ln for ln in markdown(rep).splitlines() if ln.startswith("| x86-avx2 | none |")]
    assert len(lines) == 1 and "1 kernel on a fallback schedule" in lines[0]


def test_rows_built_by_other_code_are_built_again(conv_model, tmp_path, monkeypatch):
    """A resumed bench keeps a finished row only if this tool's own code built it: after an
    upgrade (other pass or kernel code, same model and options) the row is built again."""
    from tvm_compress import bench

    def run():
        said = []
        report = bench.run_bench(conv_model, tmp_path / "out", targets=["x86-avx2"], pass_sets="none", rounds=1,
                                 plots=False, log=lambda m: said.append(str(m)))
        assert [r["status"] for r in report["rows"]] == ["ok"]
        return any("done before, kept" in m for m in said)

    assert not run() and run()
    monkeypatch.setattr(bench, "code_fingerprint", lambda: "other code")
    assert not run()


def test_onnxruntime_int8_baseline_takes_a_state_input_of_its_own_leading_size(tmp_path):
    """A recurrent state (2, 4) beside a (1, 4) frame: each calibration call gets one frame and
    that frame's two state rows (calibration data holds the inputs' rows stacked)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from tvm_compress.bench import ort_static_int8

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "state"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(1)
    calib = {"x": rng.standard_normal((6, 4)).astype(np.float32),
             "state": rng.standard_normal((12, 4)).astype(np.float32)}
    out = ort_static_int8(tmp_path / "m.onnx", tmp_path / "q.onnx", calib, sizes={"x": 1, "state": 2})
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops


def test_onnxruntime_int8_baseline_is_built_again_without_its_bias_scale_adjustment(conv_model, tmp_path,
                                                                                     monkeypatch):
    """onnxruntime's quantizer fails adjusting weight scales for int32 biases on some models
    (Magika's); the baseline is then built without that step, and its note says so."""
    from tvm_compress import bench
    from tvm_compress.loader import prepare_onnx

    real = bench.ort_static_int8

    def failing(*args, adjust_bias_scales=True, **kwargs):
        if adjust_bias_scales:
            raise ValueError("The truth value of an array with more than one element is ambiguous.")
        return real(*args, adjust_bias_scales=adjust_bias_scales, **kwargs)

    monkeypatch.setattr(bench, "ort_static_int8", failing)
    (tmp_path / "baselines").mkdir()
    base = bench._baselines(prepare_onnx(conv_model), tmp_path, {}, "random", lambda m: None)
    built = base[bench.ORT_INT8]
    assert built["path"] and Path(built["path"]).exists()
    assert "without onnxruntime's weight-scale adjustment" in built["note"]
