"""The manifest: ``model.json`` beside ``model.so``, describing what the library computes and
how it was built (inputs, outputs, target, passes, versions, hashes of the source model and of
the library, tuning summary)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import tvm

from .errors import ModelError
from .specs import InputSpec

FORMAT = "tvm-compress-artifact/1"


def manifest_path(lib_path: str | os.PathLike) -> Path:
    """``model.so`` -> ``model.json`` beside it."""
    return Path(lib_path).with_suffix(".json")


def make_manifest(prepared, profile, tvm_target, passes: List[str], library_sha256: str,
                  final_path: Path, tuning: Optional[dict], check_function: Optional[str],
                  build_options: Optional[dict] = None) -> Dict[str, Any]:
    data = {
        "format": FORMAT,
        "library": Path(final_path).name,
        "library_sha256": library_sha256,
        "inputs": [{"name": i.name, "shape": list(i.shape), "dtype": i.dtype} for i in prepared.inputs],
        "outputs": [
            {"name": o.name, "shape": list(o.shape) if o.shape else None, "dtype": o.dtype}
            for o in prepared.outputs
        ],
        "target": profile.name,
        "family": profile.family,
        "tvm_target": json.loads(str(tvm_target)),
        "passes": list(passes),
        "tvm_version": tvm.__version__,
        # Everything else a rebuild needs: the same inputs, options and tuning records give a
        # byte-identical library (tests/test_hostile.py).
        "versions": _versions(),
        "build_options": build_options or {},
        "source_model": str(prepared.path),
        "source_sha256": prepared.sha256,
        "tuning": tuning,
    }
    if check_function:
        # Relax function that runs each scheduled kernel on caller-given buffers (kernel_check)
        data["check_function"] = check_function
    data["manifest_sha256"] = _content_sha256(data)
    return data


def _versions() -> Dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("tvm-compress", "apache-tvm", "apache-tvm-ffi", "onnx", "onnxruntime", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _content_sha256(data: dict) -> str:
    body = {k: v for k, v in data.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def load_manifest(lib_path: str | os.PathLike, check_library: bool = True) -> dict:
    """The manifest beside ``lib_path``, checked: its own checksum (an edited manifest would
    describe another library) and, with ``check_library``, the library's sha256 against it
    (loading a shared library runs its code: an altered or truncated one is never loaded). These
    catch accidents and naive tampering, not someone who rewrites both files."""
    lib_path = Path(lib_path)
    if not lib_path.exists():
        raise ModelError(f"library not found: {lib_path}")
    mpath = manifest_path(lib_path)
    try:
        data = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise ModelError(f"{lib_path}: manifest {mpath} not found (was it built by tvm-compress?)") from None
    except (ValueError, UnicodeDecodeError):
        raise ModelError(f"{lib_path}: manifest {mpath} is not valid JSON") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or "library_sha256" not in data:
        raise ModelError(f"{lib_path}: {mpath} is not a tvm-compress manifest")
    if "manifest_sha256" in data and data["manifest_sha256"] != _content_sha256(data):
        raise ModelError(f"{lib_path}: manifest {mpath} was edited after the build (its checksum does not "
                         "match); rebuild the library")
    if check_library:
        from .loader import file_sha256

        if file_sha256(lib_path) != data["library_sha256"]:
            raise ModelError(f"{lib_path}: the library does not match its manifest's sha256 (altered, "
                             "truncated or replaced); refusing to load it")
    return data


def input_specs(manifest: dict) -> List[InputSpec]:
    return [InputSpec(i["name"], tuple(i["shape"]), i["dtype"]) for i in manifest["inputs"]]
