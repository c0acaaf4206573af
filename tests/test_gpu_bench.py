"""``scripts/bench_gpu.py``: the libraries it builds run with the TVM runtime alone (as on a GPU
machine that has no TVM compiler), and its report scores them. On x86 here; the CUDA run itself
needs a GPU and is skipped without one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tvm_compress.targets import get_family, get_target

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_gpu.py"


def _script(*args, env=None):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


@pytest.fixture(scope="module")
def x86_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_bench")
    done = _script("build", out, "--target", "x86", "--models", "demo,stem")
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_the_bundle_runs_on_the_tvm_runtime_alone_and_is_reported(x86_bundle):
    done = _script("run", x86_bundle, "--runs", "10", "--warmup", "1", env={"TVM_USE_RUNTIME_LIB": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((x86_bundle / "gpu_result.json").read_text())
    assert set(result["models"]) == {"demo", "stem"}
    assert set(result["models"]["demo"]) >= {"float", "int8", "onnxruntime_cpu"}
    for model in result["models"].values():
        assert model["float"]["max_rel_err_vs_reference"] < 1e-4 and model["float"]["median_ms"] > 0
    report = _script("report", x86_bundle)
    assert report.returncode == 0, report.stderr[-2000:]
    rows = [ln for ln in report.stdout.splitlines() if ln.startswith("| demo | int8 |")]
    assert rows and "same_class_as_float_pct" in rows[0]


@pytest.mark.skipif(not get_family("cuda").can_run(get_target("cuda"))[0], reason="no GPU here")
def test_cuda_bundle_runs_on_the_gpu(tmp_path):
    done = _script("build", tmp_path, "--target", "cuda", "--models", "demo")
    assert done.returncode == 0, done.stderr[-2000:]
    done = _script("run", tmp_path, "--runs", "10")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_result.json").read_text())
    assert result["models"]["demo"]["float"]["max_rel_err_vs_reference"] < 1e-4
