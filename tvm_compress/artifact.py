"""Run a compiled artifact (``model.so`` + ``model.json`` manifest) on this machine."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np

from tvm_compress.targets import RunResult, get_family, get_target

from . import verify
from .errors import DataError
from .manifest import input_specs, load_manifest


def run(
    lib_path: str | os.PathLike,
    inputs: Union[str, os.PathLike, Mapping[str, np.ndarray], Sequence[np.ndarray]],
    repeat: int = 0,
    rpc=None,
) -> RunResult:
    """Run the artifact with the family runner of its target (natively, under qemu, on a GPU)."""
    manifest = load_manifest(lib_path)
    specs = input_specs(manifest)
    if isinstance(inputs, (str, os.PathLike)):
        arrays = verify.inputs_from_file(inputs, specs)
    elif isinstance(inputs, Mapping):
        missing = [s.name for s in specs if s.name not in inputs]
        if missing:
            raise DataError(f"no array for input {missing[0]!r}")
        arrays = [np.asarray(inputs[s.name], dtype=s.dtype, order="C") for s in specs]
    else:
        arrays = [np.asarray(x, order="C") for x in inputs]
    if len(arrays) != len(specs):
        raise DataError(f"{len(arrays)} input arrays for a library with {len(specs)} inputs")
    for spec, arr in zip(specs, arrays):
        if tuple(arr.shape) != tuple(spec.shape) or str(arr.dtype) != spec.dtype:
            raise DataError(f"input {spec.name!r}: got {list(arr.shape)} {arr.dtype}, the library takes "
                            f"{list(spec.shape)} {spec.dtype}")
    profile = get_target(manifest["target"])
    family = get_family(profile.family)
    if rpc is not None:
        from . import remote

        remote.check_tracker(rpc)
        return remote.run_remote(rpc, family, Path(lib_path), arrays, repeat)
    ok, why = family.can_run(profile)
    if not ok:
        raise DataError(f"{lib_path}: cannot run a {profile.name} library here ({why})")
    return family.run(profile, Path(lib_path), arrays, repeat=repeat, warmup=1 if repeat else 0)
