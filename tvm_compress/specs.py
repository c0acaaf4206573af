"""Plain data the driver, the passes and the targets share: model inputs and outputs, and the
target facts a pass may ask for."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple


@dataclass(frozen=True)
class InputSpec:
    """One model input after shapes were fixed."""

    name: str
    shape: tuple
    dtype: str


@dataclass(frozen=True)
class OutputSpec:
    name: str
    shape: Optional[tuple]
    dtype: str


@dataclass(frozen=True)
class TargetFacts:
    """What a compression pass may know of the target: the family answers
    (``TargetFamily.facts``); passes never import ``tvm_compress.targets``.

    vector_lanes: float32 lanes of one vector register (AVX2 8, AVX-512 16, NEON 4).
    int8_dot: the int8 dot-product kernel the target's int8 convolutions use (``vpdpbusd``,
        ``pmaddwd``, ``sdot``), or None for the generic int8 kernels.
    int8_act_dtypes: activation dtypes those kernels take.
    vector_popcount: the ISA counts bits in vector registers (NEON ``cnt``, AVX-512 VPOPCNTDQ).
    features: the preset's feature table as written.
    """

    target: str = ""
    vector_lanes: int = 4
    int8_dot: Optional[str] = None
    int8_act_dtypes: Tuple[str, ...] = ("int8", "uint8")
    vector_popcount: bool = False
    features: Dict[str, Any] = field(default_factory=dict)
