"""Name -> pass preset registry, and what a preset gets besides its config (``PassEnv``).

A preset turns a frozen config dataclass into a configured ``tvm.transform.Pass``. The CLI's
``--passes`` choices and per-pass flags come from here, so a pass registered once is usable
from Python and from the command line. A preset declares which presets must run before or
after it; ``parse_pass_list`` rejects a list that breaks those rules or names a pass twice.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import tvm

from .errors import PassOptionError, lookup
from .specs import InputSpec, TargetFacts


# (candidate modules, their main's inputs) -> median milliseconds of each main on the target,
# or None where the target cannot be timed here (emulated, no device).
MeasureFn = Callable[[Sequence[tvm.IRModule], List[Any]], Optional[List[float]]]


@dataclass
class PassEnv:
    """What a preset may need beyond its config: the model's inputs, the target's facts, a log,
    and a way to time candidate kernels on the target.

    ``measure(modules, inputs)`` builds small Relax modules (variants of one layer) the way the
    compile flow builds the model for the target (its kernel hooks, its tuning budget) and times
    their ``main`` where the target runs (here, or a board over RPC), in interleaved rounds so
    that load on the machine slows all alike; None when it cannot time them (emulated targets,
    no measuring at all). Passes decide between variants of a layer with it.
    ``report`` is a dict the preset fills with what the user should see in REPORT.json under
    the preset's name (per-layer choices, errors, fallbacks ...).
    """

    inputs: List[InputSpec] = field(default_factory=list)
    facts: TargetFacts = field(default_factory=TargetFacts)
    log: Callable[[str], None] = lambda msg: None
    report: Dict[str, Any] = field(default_factory=dict)
    measure: MeasureFn = lambda mods, inputs: None
    # The same with default schedules only (no tuning), for choices made before tuning; None
    # where the target cannot be timed.
    measure_defaults: Optional[MeasureFn] = None


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
    # Reads calibration data: the config subclasses ``calib_data.CalibDataConfig`` and the CLI
    # adds the shared ``--calib*`` flags.
    reads_calibration: bool = False
    # Order rules: presets that, when also given, must run before / after this one, and why.
    runs_after: Tuple[str, ...] = ()
    runs_before: Tuple[str, ...] = ()
    order_reason: str = ""


_PRESETS: Dict[str, PassPreset] = {}


def _ensure_registered() -> None:
    # The presets register themselves when the passes package is imported.
    import tvm_compress.passes  # noqa: F401


def register_pass(preset: PassPreset) -> PassPreset:
    if preset.name in _PRESETS:
        raise ValueError(f"pass preset {preset.name!r} registered twice")
    _PRESETS[preset.name] = preset
    return preset


def unregister_pass(name: str) -> None:
    """Remove a preset (tests and plug-ins that register temporary ones)."""
    _PRESETS.pop(name, None)


def pass_names() -> List[str]:
    _ensure_registered()
    return sorted(_PRESETS)


def get_preset(name: str) -> PassPreset:
    _ensure_registered()
    return lookup(_PRESETS, name, PassOptionError, "pass", "available")


def parse_pass_list(text: str | Sequence[str] | None) -> List[str]:
    """``"prune,quantize"`` or a list -> validated names, in order: known, each once, and in an
    order every preset's rules allow."""
    if not text:
        return []
    names = text.split(",") if isinstance(text, str) else list(text)
    names = [n.strip() for n in names if n.strip()]
    for i, name in enumerate(names):
        get_preset(name)
        if name in names[:i]:
            raise PassOptionError(f"--passes names {name!r} twice; each pass runs once")
    position = {n: i for i, n in enumerate(names)}
    for name in names:
        preset = _PRESETS[name]
        for other in preset.runs_after:
            if other in position and position[other] > position[name]:
                raise PassOptionError(_order_error(other, name, preset))
        for other in preset.runs_before:
            if other in position and position[other] < position[name]:
                raise PassOptionError(_order_error(name, other, preset))
    return names


def _order_error(first: str, second: str, preset: PassPreset) -> str:
    why = f": {preset.order_reason}" if preset.order_reason else ""
    return f"--passes: {first} must come before {second}{why}"


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


def make_passes(
    names: Sequence[str], configs: Optional[Mapping[str, Any]], env: PassEnv
) -> List[tvm.transform.Pass]:
    """Configured passes for the preset names, in order (``configs``: name -> config/mapping).
    Every config is built (and so validated) before any pass runs."""
    configs = dict(configs or {})
    presets = [get_preset(n) for n in names]
    built = [make_config(p, configs.get(p.name)) for p in presets]
    return [p.make(c, env) for p, c in zip(presets, built)]
