"""The CLI contract, through main(argv) and through the installed console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tvm_compress.cli import main

SCRIPT = Path(sys.executable).with_name("tvm-compress")


def _one_line_error(capsys, code, pattern):
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.startswith("tvm-compress: ")]
    assert len(lines) == 1, err
    assert pattern in lines[0], lines[0]


def test_compile_then_run(dense_model, tmp_path, capsys):
    out, rep = tmp_path / "d.so", tmp_path / "rep.json"
    assert main(["compile", str(dense_model), "-o", str(out), "--report", str(rep), "--bench-runs", "3"]) == 0
    report = json.loads(rep.read_text())
    assert report["target"] == "x86" and report["max_rel_err"] < 1e-4
    assert "wrote" in capsys.readouterr().out

    x = np.random.default_rng(3).random((2, 32), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["run", str(out), "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npz"), "--repeat", "3"]) == 0
    printed = capsys.readouterr().out
    assert "shape [2, 5] float32" in printed and "latency: median" in printed
    y = np.load(tmp_path / "y.npz")
    from tvm_compress.verify import ort_run
    from tvm_compress import prepare_onnx

    ref = ort_run(dense_model, prepare_onnx(dense_model).inputs, [x])[0]
    np.testing.assert_allclose(y[list(y.files)[0]], ref, rtol=1e-4, atol=1e-5)


def test_quiet_prints_nothing(dense_model, tmp_path, capsys):
    assert main(["compile", str(dense_model), "-o", str(tmp_path / "d.so"), "--quiet", "--bench-runs", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "import:" not in captured.err


def test_inspect(conv_model_dynamic, capsys):
    assert main(["inspect", str(conv_model_dynamic), "--input-shape", "x=2,3,8,8", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["inputs"] == [{"name": "x", "shape": [2, 3, 8, 8], "dtype": "float32"}]
    assert info["ops"]["Conv"] == 2 and "Shape" in info["ops"]
    assert info["params"] > 0 and info["macs"] == sum(l["macs"] for l in info["layers"])
    # Without shapes, dynamic dims default to 1 with a note.
    assert main(["inspect", str(conv_model_dynamic)]) == 0
    text = capsys.readouterr().out
    assert "dynamic dims assumed 1" in text and "input  x: [1, 3, 8, 8]" in text


def test_targets_lists_families(capsys):
    assert main(["targets", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"x86", "aarch64", "armv7", "cuda", "rpi4", "jetson-orin"} <= set(rows)
    assert {r["family"] for r in rows.values()} == {"x86", "aarch64", "armv7", "cuda"}


def test_user_targets_file(tmp_path, capsys):
    f = tmp_path / "mine.toml"
    f.write_text('[myboard]\nfamily = "aarch64"\ndescription = "my board"\n'
                 'target = { kind = "llvm", mtriple = "aarch64-linux-gnu", mcpu = "cortex-a55" }\n')
    assert main(["targets", "--targets-file", str(f)]) == 0
    assert "myboard" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["compile", "{missing}", "-o", "{out}"], "model file not found"),
        (["compile", "{notonnx}", "-o", "{out}"], "not a valid ONNX model"),
        (["compile", "{truncated}", "-o", "{out}"], "tvm-compress: error:"),
        (["compile", "{unsupported}", "-o", "{out}"], "unsupported ONNX ops: LSTM"),
        (["compile", "{dynamic}", "-o", "{out}"], "pass --input-shape x="),
        (["compile", "{dynamic}", "-o", "{out}", "--input-shape", "x=1,3,8"], "rank 3 does not match"),
        (["compile", "{dynamic}", "-o", "{out}", "--input-shape", "x=1,3,a"], "dimensions must be integers"),
        (["compile", "{dense}", "-o", "{out}", "--target", "z80"], "unknown target 'z80'"),
        (["compile", "{dense}", "-o", "{out}", "--passes", "magic"], "unknown pass 'magic'"),
        (["compile", "{dense}", "-o", "{tmp}/nodir/out.so"], "does not exist"),
        (["compile", "{dense}", "-o", "{tmp}/out.txt"], "must end in .so"),
        (["run", "{tmp}/nothing.so", "--input", "{tmp}/x.npy"], "library not found"),
        (["targets", "--targets-file", "{tmp}/none.toml"], "cannot read target file"),
    ],
)
def test_bad_input_one_line_error_no_output(argv, pattern, tmp_path, capsys, conv_model_dynamic,
                                            dense_model, unsupported_model):
    notonnx = tmp_path / "n.onnx"
    notonnx.write_bytes(b"\x00\x01garbage" * 100)
    truncated = tmp_path / "t.onnx"
    truncated.write_bytes(dense_model.read_bytes()[:300])
    subst = {
        "missing": tmp_path / "missing.onnx", "notonnx": notonnx, "truncated": truncated,
        "unsupported": unsupported_model, "dynamic": conv_model_dynamic, "dense": dense_model,
        "out": tmp_path / "out.so", "tmp": tmp_path,
    }
    code = main([a.format(**subst) for a in argv])
    _one_line_error(capsys, code, pattern)
    assert not (tmp_path / "out.so").exists() and not (tmp_path / "out.json").exists()
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"


@pytest.mark.parametrize("argv, who", [
    (["--passes", "quantize"], "quantize"),
    (["--passes", "prune", "--prune-recover", "lstsq"], "prune"),
    (["--passes", "lowrank", "--lowrank-method", "whitened"], "lowrank"),
])
def test_missing_calibration_data_is_refused_before_import(argv, who, dense_model, tmp_path, capsys):
    code = main(["compile", str(dense_model), "-o", str(tmp_path / "out.so"), *argv])
    out, err = capsys.readouterr()
    assert "import:" not in out and "pass:" not in out  # nothing ran first
    assert code != 0 and err.strip().splitlines() == [
        f"tvm-compress: error: {who} needs calibration data: --calib FILE.npz|FILE.npy|IMAGE_DIR "
        "(or --calib random, accuracy unknown)"]
    assert not (tmp_path / "out.so").exists()


def test_unwritable_directory(dense_model, tmp_path, capsys):
    if hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0:
        # root writes anywhere; a path under a regular file is unwritable for everyone
        blocker = tmp_path / "file"
        blocker.write_text("x")
        target = blocker / "out.so"
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        target = ro / "out.so"
    code = main(["compile", str(dense_model), "-o", str(target)])
    _one_line_error(capsys, code, "cannot write")


def test_console_script_end_to_end(dense_model, tmp_path):
    assert SCRIPT.exists(), "console script not installed"
    out = tmp_path / "d.so"
    ok = subprocess.run([str(SCRIPT), "compile", str(dense_model), "-o", str(out), "--quiet"],
                        capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr
    assert out.exists()
    bad = subprocess.run([str(SCRIPT), "compile", str(tmp_path / "nope.onnx"), "-o", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1].startswith("tvm-compress: error: model file not found")
    assert "Traceback" not in bad.stderr
    helped = subprocess.run([str(SCRIPT), "compile", "--help"], capture_output=True, text=True)
    assert "--tune-trials" in helped.stdout and "--input-shape" in helped.stdout
