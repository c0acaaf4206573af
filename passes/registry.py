"""Name -> pass preset registry.

A preset turns a frozen config dataclass into a configured ``tvm.transform.Pass`` (often a
``Sequential`` of several module passes). The CLI's ``--passes`` choices and its per-pass flags
come from here, so a pass registered once is usable from Python and from the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import tvm

from tvm_compress.errors import PassOptionError


@dataclass(frozen=True)
class InputSpec:
    """One model input after shapes were fixed."""

    name: str
    shape: tuple
    dtype: str


@dataclass
class PassEnv:
    """What a preset may need beyond its config: the model, its inputs, the target, a log.

    ``report`` is a dict the preset fills with what the user should see in REPORT.json under
    the preset's name (per-layer dtypes, scales, fallbacks ...).
    """

    model_path: Optional[Path]
    inputs: List[InputSpec]
    target: Any = None  # tvm_compress.targets.TargetProfile
    log: Callable[[str], None] = lambda msg: None
    report: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PassPreset:
    name: str
    help: str
    config_cls: type
    make: Callable[[Any, PassEnv], tvm.transform.Pass]
    # Adds the preset's CLI flags to an argparse group; flags map to config fields.
    add_arguments: Optional[Callable[[argparse._ArgumentGroup], None]] = None
    # Builds the config from parsed CLI args (default: fields of the same name).
    config_from_args: Optional[Callable[[argparse.Namespace], Any]] = None
    # Lossy presets change the numbers on purpose: verification reports their error instead of
    # failing at float tolerance.
    lossy: bool = False


_PRESETS: Dict[str, PassPreset] = {}


def register_pass(preset: PassPreset) -> PassPreset:
    if preset.name in _PRESETS:
        raise ValueError(f"pass preset {preset.name!r} registered twice")
    _PRESETS[preset.name] = preset
    return preset


def pass_names() -> List[str]:
    return sorted(_PRESETS)


def get_pass(name: str) -> PassPreset:
    try:
        return _PRESETS[name]
    except KeyError:
        raise PassOptionError(
            f"unknown pass {name!r}; available: {', '.join(pass_names()) or 'none'}"
        ) from None


def parse_pass_list(text: str | Sequence[str] | None) -> List[str]:
    """``"quantize,prune"`` or a list -> validated names, in order."""
    if not text:
        return []
    names = text.split(",") if isinstance(text, str) else list(text)
    names = [n.strip() for n in names if n.strip()]
    for n in names:
        get_pass(n)
    return names


def config_from_args(preset: PassPreset, args: argparse.Namespace):
    if preset.config_from_args is not None:
        return preset.config_from_args(args)
    values = vars(args)
    kwargs = {
        f.name: values[f.name]
        for f in dataclasses.fields(preset.config_cls)
        if values.get(f.name) is not None
    }
    return make_config(preset, kwargs)


def make_config(preset: PassPreset, options: Mapping[str, Any] | Any | None):
    """A config instance from a config object, a mapping of field values, or None (defaults)."""
    if isinstance(options, preset.config_cls):
        return options
    options = dict(options or {})
    known = {f.name for f in dataclasses.fields(preset.config_cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise PassOptionError(
            f"pass {preset.name!r} has no option {unknown[0]!r}; options: {', '.join(sorted(known))}"
        )
    try:
        return preset.config_cls(**options)
    except (TypeError, ValueError) as err:
        raise PassOptionError(f"pass {preset.name!r}: {err}") from None
