"""What every target family provides: a TVM target, an exporter, its kernels, a way to run
code here, and the facts passes may ask for.

Kernels come through ``KernelHook``s: a hook is offered by a family (``register_kernel_hook``)
and turned on by its preset's features; it contributes Relax rewrites that run before
legalization and fusion (e.g. int8 convolutions -> packed-weight kernels) and TIR schedules that
run after fusion, before tuning (hand schedules of those kernels). The compile pipeline asks the
family for them and names no kernel kind itself.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tvm

from tvm_compress.errors import TargetError, lookup
from tvm_compress.specs import TargetFacts


@dataclass(frozen=True)
class TargetProfile:
    """A target preset: data from a TOML table, plus the family that knows how to use it."""

    name: str
    family: str
    description: str
    target: Dict[str, Any]
    # Extra facts passes may ask for (e.g. "int8_dot": true); never branch on names.
    features: Dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def tvm_target(self) -> tvm.target.Target:
        return get_family(self.family).tvm_target(self)

    def with_target(self, spec: Dict[str, Any]) -> "TargetProfile":
        """The same preset with the TVM target ``spec`` (families fill in detected values)."""
        return dataclasses.replace(self, target=dict(spec))


class KernelHook:
    """Kernels a family offers: Relax rewrites before legalization/fusion, TIR schedules after
    fusion (before tuning and the default schedules), and the facts they add for passes.

    ``feature``: the preset feature that turns the hook on (None: always on)."""

    name = ""
    feature: Optional[str] = None

    # A feature on unless a preset sets it false (the float layout hooks), or off unless set.
    default_on = False

    def enabled(self, profile: TargetProfile) -> bool:
        return self.feature is None or bool(profile.features.get(self.feature, self.default_on))

    @staticmethod
    def lanes(profile: TargetProfile) -> int:
        """float32 lanes of the profile's vector registers (what the CPU rewrites size by)."""
        return get_family(profile.family).vector_lanes(profile)

    def rewrites(self, profile: TargetProfile) -> List[tvm.transform.Pass]:
        return []

    def schedules(self, profile: TargetProfile) -> List[tvm.transform.Pass]:
        return []

    def facts(self, profile: TargetProfile) -> Dict[str, Any]:
        """``TargetFacts`` fields this hook decides (e.g. the int8 dot kernel)."""
        return {}

    def candidates(self, mod: tvm.IRModule, profile: TargetProfile) -> Dict[str, tvm.IRModule]:
        """Variants of ``mod`` the hook's own estimate cannot choose between (name -> ``mod``
        with that choice pinned, for its rewrites to follow). The compile flow times them on
        the target with default schedules and lowers the fastest; where it cannot time (an
        emulated target), the estimate decides. {}: the estimate is clear."""
        return {}


@dataclass
class RunResult:
    outputs: List[np.ndarray]
    times_ms: List[float]
    # Where the numbers come from: "native", "qemu (emulated)", "cuda:<gpu name>", ...
    where: str = "native"


class TargetFamily:
    """Base class; subclasses register themselves with ``register_family``."""

    name = ""
    # Hooks every instance starts with; ``register_kernel_hook`` adds more.
    kernel_hooks: Tuple[KernelHook, ...] = ()
    # Debian package of the cross compiler, if any (for the one-line error).
    cross_cc: Optional[str] = None
    cross_package: Optional[str] = None

    def tvm_target(self, profile: TargetProfile) -> tvm.target.Target:
        try:
            return tvm.target.Target(dict(profile.target))
        except Exception as err:  # TVM raises ValueError / TVMError variants
            raise TargetError(f"target {profile.name!r}: invalid TVM target: {err}") from None

    def check_toolchain(self, profile: TargetProfile) -> None:
        if self.cross_cc and shutil.which(self.cross_cc) is None:
            raise TargetError(
                f"target {profile.name!r} needs the cross compiler {self.cross_cc}: "
                f"apt-get install {self.cross_package}"
            )

    def fcompile(self, profile: TargetProfile) -> Optional[Callable]:
        if self.cross_cc:
            return tvm.support.cc.cross_compiler(self.cross_cc)
        return None

    def compile(self, mod, profile: TargetProfile):
        """``tvm.compile`` for this family (a family may compile its device code its own way)."""
        with pass_config(kernel_build_config(profile)):
            return tvm.compile(mod, profile.tvm_target())

    def export(self, executable, path: Path, profile: TargetProfile) -> None:
        fcompile = self.fcompile(profile)
        # "-s": no symbol table or debug info in the deployed library (the runtime needs only
        # the dynamic symbols); about 10-25% smaller artifacts.
        if fcompile is None:
            executable.export_library(str(path), options=["-s"])
        else:
            executable.export_library(str(path), fcompile=fcompile, options=["-s"])

    def default_schedule(self, profile: TargetProfile) -> List[tvm.transform.Pass]:
        """Passes that schedule legalized, fused TIR when no tuning records exist."""
        return []

    def hooks(self, profile: TargetProfile) -> List[KernelHook]:
        return [h for h in self.kernel_hooks if h.enabled(profile)]

    def kernel_rewrites(self, profile: TargetProfile) -> List[tvm.transform.Pass]:
        """Relax rewrites of the enabled hooks, run before legalization and fusion."""
        return [p for h in self.hooks(profile) for p in h.rewrites(profile)]

    def kernel_schedules(self, profile: TargetProfile) -> List[tvm.transform.Pass]:
        """Hand schedules of the enabled hooks, run after fusion and before tuning."""
        return [p for h in self.hooks(profile) for p in h.schedules(profile)]

    def vector_lanes(self, profile: TargetProfile) -> int:
        """float32 lanes of one vector register of the target."""
        return 4

    def vector_popcount(self, profile: TargetProfile) -> bool:
        return False

    def facts(self, profile: TargetProfile) -> TargetFacts:
        """What compression passes may know of this target (``PassEnv.facts``)."""
        fields: Dict[str, Any] = {
            "target": profile.name,
            "vector_lanes": self.vector_lanes(profile),
            "vector_popcount": self.vector_popcount(profile),
            "features": dict(profile.features),
        }
        for hook in self.hooks(profile):
            fields.update(hook.facts(profile))
        return TargetFacts(**fields)

    def can_run(self, profile: TargetProfile) -> Tuple[bool, str]:
        """(True, "") when libraries for this target can run on this machine."""
        return False, "not run: no way to run this target here"

    def run(
        self,
        profile: TargetProfile,
        lib_path: Path,
        inputs: Sequence[np.ndarray],
        repeat: int = 0,
        warmup: int = 0,
        function: str = "main",
    ) -> RunResult:
        """Run the Relax ``function`` of an exported library here, on ``inputs``."""
        raise TargetError(f"target {profile.name!r}: {self.can_run(profile)[1]}")

    def local_device(self, profile: TargetProfile):
        """The device this family's libraries run on here (when ``can_run``)."""
        return tvm.cpu(0)

    def remote_device(self, session):
        """The device to run on in an RPC session to a board of this family."""
        return session.cpu(0)

    def tuning_runner(self, profile: TargetProfile):
        """MetaSchedule runner for tuning here, or None when this machine cannot measure."""
        return None

    def latency_is_meaningful(self, profile: TargetProfile) -> bool:
        """False when run() emulates the target (qemu): its times say nothing of the board."""
        return True


def kernel_build_config(profile: TargetProfile) -> Dict[str, Any]:
    """PassContext config of a library's final build. TVM's packed API checks every argument
    of every kernel call (type, device, dtype, each dimension): about 10 ns a call, a third of
    a squeeze-excite conv on one pixel, and 5-50 % of the library's bytes. Only the model's VM
    function calls its kernels, with the buffers it allocated after checking the model's
    inputs itself, so they are off unless a preset sets ``features.kernel_arg_checks``."""
    if profile.features.get("kernel_arg_checks", False):
        return {}
    return {"tirx.disable_assert": True}


def pass_config(extra: Dict[str, Any]) -> tvm.transform.PassContext:
    """The current PassContext with ``extra`` config entries added."""
    current = tvm.transform.PassContext.current()
    return tvm.transform.PassContext(
        opt_level=current.opt_level,
        required_pass=list(current.required_pass),
        disabled_pass=list(current.disabled_pass),
        config={**dict(current.config), **extra},
    )


_FAMILIES: Dict[str, TargetFamily] = {}


def register_family(cls):
    family = cls()
    family.kernel_hooks = tuple(cls.kernel_hooks)
    _FAMILIES[cls.name] = family
    return cls


def register_kernel_hook(family: str, hook: KernelHook) -> KernelHook:
    """Offer ``hook``'s kernels on every preset of ``family`` whose features turn it on."""
    fam = get_family(family)
    fam.kernel_hooks = (*fam.kernel_hooks, hook)
    return hook


def unregister_kernel_hook(family: str, hook: KernelHook) -> None:
    fam = get_family(family)
    fam.kernel_hooks = tuple(h for h in fam.kernel_hooks if h is not hook)


def get_family(name: str) -> TargetFamily:
    return lookup(_FAMILIES, name, TargetError, "target family", "families")


def family_names() -> List[str]:
    return sorted(_FAMILIES)


def rewrite_functions(mod: tvm.IRModule, make_rewriter, changed: str) -> tvm.IRModule:
    """Each Relax function of ``mod`` through a fresh ``make_rewriter(mod)`` mutator; a copy of
    ``mod`` with the functions whose rewriter counted changes (its attribute ``changed``),
    normalized, or ``mod`` itself when none did."""
    from tvm import relax

    from tvm_compress.relax_utils import copy_module

    out = None
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter = make_rewriter(mod)
            func = rewriter.visit_expr(func)
            if getattr(rewriter, changed):
                out = out or copy_module(mod)
                out[gv] = func
    return relax.transform.Normalize()(out) if out is not None else mod
