"""Target registry (installed as ``tvm_compress.targets``).

A target is data: a preset table from ``presets/*.toml`` (or a user's TOML file) naming a family
(``x86``, ``aarch64``, ``armv7``, ``cuda``) and a TVM target in JSON form. The family knows how to
export, which kernels to offer (``KernelHook``s its preset's features turn on; plug-ins add theirs
with ``register_kernel_hook``), schedule without tuning, and run what was built.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Dict, Iterable, List

from tvm_compress.errors import TargetError, lookup

from . import arm, cuda, fast_math, x86  # noqa: F401  (register the families)
from .int8_hook import int8_layout
from .int8_pack import kernel_names
from .base import (
    KernelHook,
    RunResult,
    TargetFamily,
    TargetProfile,
    family_names,
    get_family,
    register_kernel_hook,
    unregister_kernel_hook,
)

fast_math.register()  # vectorized float32 exp, tanh, erf in every CPU kernel built in this process

_PRESET_DIR = Path(__file__).with_name("presets")
_REGISTRY: Dict[str, TargetProfile] = {}
_LOADED_FILES: List[str] = []
_BUILTIN_LOADED: List[bool] = []  # one element once the package presets are in _REGISTRY


def _load_file(path: Path) -> None:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as err:
        raise TargetError(f"cannot read target file {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise TargetError(f"target file {path}: {err}") from None
    for name, table in data.items():
        if not isinstance(table, dict) or "family" not in table or "target" not in table:
            raise TargetError(f"target file {path}: table [{name}] needs 'family' and 'target'")
        get_family(table["family"])  # unknown family -> one-line TargetError
        try:
            kernel_names(dict(table.get("features", {})).get("int8_dot"))
            int8_layout(dict(table.get("features", {})))
            cuda.cuda_graph(dict(table.get("features", {})))
        except TargetError as err:
            raise TargetError(f"target file {path}: [{name}] features.{err}") from None
        _REGISTRY[name] = TargetProfile(
            name=name,
            family=table["family"],
            description=table.get("description", ""),
            target=dict(table["target"]),
            features=dict(table.get("features", {})),
            source=str(path),
        )


def load_target_files(paths: Iterable[str | os.PathLike]) -> None:
    """Add (or override) presets from user TOML files."""
    _ensure_loaded()  # the built-in presets first, so a user file does not stand in for them
    for p in paths:
        if str(p) not in _LOADED_FILES:
            _load_file(Path(p))
            _LOADED_FILES.append(str(p))


def _ensure_loaded() -> None:
    if _BUILTIN_LOADED:
        return
    _BUILTIN_LOADED.append(True)
    for path in sorted(_PRESET_DIR.glob("*.toml")):
        _load_file(path)
    extra = os.environ.get("TVM_COMPRESS_TARGETS", "")
    load_target_files(p for p in extra.split(os.pathsep) if p)


def target_names() -> List[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def list_targets() -> List[TargetProfile]:
    _ensure_loaded()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def get_target(name: str) -> TargetProfile:
    _ensure_loaded()
    return lookup(_REGISTRY, name, TargetError, "target", "known targets")


__all__ = [
    "KernelHook",
    "RunResult",
    "TargetFamily",
    "TargetProfile",
    "family_names",
    "get_family",
    "get_target",
    "list_targets",
    "load_target_files",
    "register_kernel_hook",
    "target_names",
    "unregister_kernel_hook",
]
