"""The manifest: ``model.json`` beside ``model.so``, describing what the library computes and
how it was built (inputs, outputs, target, passes, versions, hashes of the source model and of
the library, tuning summary)."""

from __future__ import annotations

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
                  final_path: Path, tuning: Optional[dict], check_function: Optional[str]) -> Dict[str, Any]:
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
        "source_model": str(prepared.path),
        "source_sha256": prepared.sha256,
        "tuning": tuning,
    }
    if check_function:
        # Relax function that runs each scheduled kernel on caller-given buffers (kernel_check)
        data["check_function"] = check_function
    return data


def load_manifest(lib_path: str | os.PathLike) -> dict:
    lib_path = Path(lib_path)
    if not lib_path.exists():
        raise ModelError(f"library not found: {lib_path}")
    mpath = manifest_path(lib_path)
    try:
        return json.loads(mpath.read_text())
    except FileNotFoundError:
        raise ModelError(f"{lib_path}: manifest {mpath} not found (was it built by tvm-compress?)") from None
    except ValueError:
        raise ModelError(f"{lib_path}: manifest {mpath} is not valid JSON") from None


def input_specs(manifest: dict) -> List[InputSpec]:
    return [InputSpec(i["name"], tuple(i["shape"]), i["dtype"]) for i in manifest["inputs"]]
