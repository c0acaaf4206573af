"""What every target family provides: a TVM target, an exporter, a way to run code here."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tvm

from tvm_compress.errors import TargetError


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


@dataclass
class RunResult:
    outputs: List[np.ndarray]
    times_ms: List[float]
    # Where the numbers come from: "native", "qemu (emulated)", "cuda:<gpu name>", ...
    where: str = "native"


class TargetFamily:
    """Base class; subclasses register themselves with ``register_family``."""

    name = ""
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

    def remote_device(self, session):
        """The device to run on in an RPC session to a board of this family."""
        return session.cpu(0)

    def tuning_runner(self, profile: TargetProfile):
        """MetaSchedule runner for tuning here, or None when this machine cannot measure."""
        return None

    def latency_is_meaningful(self, profile: TargetProfile) -> bool:
        """False when run() emulates the target (qemu): its times say nothing of the board."""
        return True


_FAMILIES: Dict[str, TargetFamily] = {}


def register_family(cls):
    _FAMILIES[cls.name] = cls()
    return cls


def get_family(name: str) -> TargetFamily:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise TargetError(
            f"unknown target family {name!r}; families: {', '.join(sorted(_FAMILIES))}"
        ) from None


def family_names() -> List[str]:
    return sorted(_FAMILIES)
