"""Fuzzing, bounded for CI: damaged model files and random command lines.

Each example runs the CLI in a subprocess (a native crash must not take the test run with it).
Whatever the input: no traceback, an exit status in the documented set (0 ok, 1 internal error
in one line, 2 user error, 3 verification refused, 4 bench rows failed), at most one error line,
and no file written anywhere but the output path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

EXIT_CODES = {0, 1, 2, 3, 4}
# TVMC_FUZZ_EXAMPLES=200 for a longer hunt; CI runs 12 of each, the same 12 every time.
SETTINGS = settings(max_examples=int(os.environ.get("TVMC_FUZZ_EXAMPLES", 12)), deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _run(args, cwd: Path):
    before = {p for p in cwd.rglob("*")}
    proc = subprocess.run([sys.executable, "-m", "tvm_compress.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode in EXIT_CODES, (args, proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout, (args, proc.stderr[-2000:])
    if proc.returncode != 0:
        assert len(proc.stderr.strip().splitlines()[-1:]) == 1
        assert proc.stderr.strip().splitlines()[-1].startswith("tvm-compress: "), proc.stderr[-500:]
    new = {p for p in cwd.rglob("*")} - before
    assert all(p == cwd / "out" or cwd / "out" in p.parents for p in new), sorted(map(str, new))
    return proc


@st.composite
def damaged(draw, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["truncate", "flip", "splice"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    buf = bytearray(data)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            buf[draw(st.integers(0, len(buf) - 1))] ^= draw(st.integers(1, 255))
        return bytes(buf)
    at = draw(st.integers(0, len(buf) - 1))
    return bytes(buf[:at]) + draw(st.binary(min_size=1, max_size=64)) + bytes(buf[at:])


@pytest.fixture(scope="module")
def model_bytes(dense_model) -> bytes:
    return Path(dense_model).read_bytes()


def test_damaged_model_files(model_bytes, tmp_path_factory):
    @SETTINGS
    @given(data=damaged(model_bytes))
    def check(data):
        work = tmp_path_factory.mktemp("fuzz-model")
        (work / "out").mkdir()
        (work / "m.onnx").write_bytes(data)
        proc = _run(["compile", "m.onnx", "-o", "out/m.so", "--no-check-kernels", "--bench-runs", "1", "--quiet"], work)
        if proc.returncode != 0:
            assert not list((work / "out").iterdir())  # nothing half-written

    check()


OPTIONS = st.sampled_from([
    ["--input-shape", "x=2,32"], ["--input-shape", "x=0,32"], ["--input-shape", "y=2,32"], ["--input-shape", "x"],
    ["--input-shape", "x=2,32,1"], ["--target", "aarch64"], ["--target", "no-such"], ["--passes", "quantize"],
    ["--passes", "quantize,prune"], ["--passes", "nope"], ["--tune-trials", "-3"], ["--calib", "random"],
    ["--calib", "missing.npz"], ["--prune-ratio", "1.5"], ["--lowrank-energy", "0"], ["--verify-input", "x.npz"],
    ["--report", "out/r.json"], ["--report", "/proc/r.json"], ["--bench-runs", "1"], ["--no-fold"],
])


def test_random_command_lines(dense_model, tmp_path_factory):
    @SETTINGS
    @given(opts=st.lists(OPTIONS, min_size=1, max_size=4))
    def check(opts):
        work = tmp_path_factory.mktemp("fuzz-cli")
        (work / "out").mkdir()
        args = ["compile", str(dense_model), "-o", "out/m.so", "--no-check-kernels", "--quiet"]
        for o in opts:
            args += o
        _run(args, work)

    check()
