"""A real published model on real data: Google's Magika file-type detector (magika 1.0.3, its
bundled ONNX model: bytes in, one-hot tokens, a conv and dense layers, 214 content types).

The data are files of this machine read as Magika reads them (``scripts/file_type_data.py``),
labelled by onnxruntime's top-1 on the model as given.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tvm_compress

pytestmark = pytest.mark.slow
_SPEC = importlib.util.find_spec("magika")
if _SPEC is None:
    pytest.skip("pip install --no-deps magika==1.0.3 (make test does)", allow_module_level=True)
MODEL = Path(_SPEC.submodule_search_locations[0]) / "models" / "standard_v3_3" / "model.onnx"
REPO = Path(__file__).resolve().parents[1]


def _files(out: Path, *roots: str, per_kind: int, limit: int) -> Path:
    subprocess.run([sys.executable, str(REPO / "scripts" / "file_type_data.py"), str(MODEL), str(out),
                    "--roots", *roots, "--per-kind", str(per_kind), "--limit", str(limit)],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("magika")
    # calibration and evaluation on different files
    return {"calib": _files(d / "calib.npz", str(REPO / "tvm_compress"), str(REPO / "docs"), per_kind=8, limit=64),
            "eval": _files(d / "eval.npz", "/usr/share", "/etc", per_kind=3, limit=160)}


def test_magika_compiles_and_matches_onnxruntime(data, tmp_path):
    with np.load(data["eval"]) as d:
        np.savez(tmp_path / "one.npz", bytes=d["bytes"][:1])
    rep = tvm_compress.compile(MODEL, tmp_path / "m.so", input_shapes={"bytes": (1, 2048)}, target="x86-avx2",
                               verify_input=tmp_path / "one.npz", bench_runs=2, log=lambda m: None)
    assert rep["verified"] and rep["max_rel_err"] < 1e-4


def test_magika_int8_agrees_with_onnxruntime_on_real_files(data, tmp_path):
    rep = tvm_compress.compile(MODEL, tmp_path / "q.so", input_shapes={"bytes": (1, 2048)}, target="x86-avx2",
                               passes="quantize", pass_configs={"quantize": {"calib": str(data["calib"])}},
                               bench_runs=1, log=lambda m: None)
    assert rep["verified"] and rep["weight_bytes_after"] < 0.3 * rep["weight_bytes_before"]
    with np.load(data["eval"]) as d:
        x, labels = d["bytes"], d["labels"]
    got = np.array([tvm_compress.run(tmp_path / "q.so", {"bytes": x[i : i + 1]}).outputs[0].argmax()
                    for i in range(len(x))])
    # measured 97.7 % on 512 files (docs/benchmarks.md); onnxruntime's own int8: 12.7 %
    assert (got == labels).mean() >= 0.9, (got == labels).mean()
