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
        ``avxvnni``, ``pmaddubsw``, ``pmaddwd``, ``sdot``), or None for the generic int8 kernels.
    int8_act_dtypes: activation dtypes those kernels take.
    int8_pair_sums: those kernels add the products of adjacent input channels in saturating
        int16 pairs (``pmaddubsw``): conv weights whose same-signed pairs stay within 127 in
        magnitude run exactly (``Calibrate`` quantizes them so).
    vector_popcount: the ISA counts bits in vector registers (NEON ``cnt``, AVX-512 VPOPCNTDQ).
    sparse_block: (rows, columns) of the blocks the target's block-sparse float kernels take by
        default, or None when the target has no such kernels.
    binary_kernels: the target runs binary layers on bit-packed XNOR/popcount kernels.
    features: the preset's feature table as written.
    """

    target: str = ""
    vector_lanes: int = 4
    int8_dot: Optional[str] = None
    int8_act_dtypes: Tuple[str, ...] = ("int8", "uint8")
    int8_pair_sums: bool = False
    vector_popcount: bool = False
    sparse_block: Optional[Tuple[int, int]] = None
    binary_kernels: bool = False
    features: Dict[str, Any] = field(default_factory=dict)


def pair_weight_sums(w):
    """Per output channel (axis 0) of a conv weight, the largest same-signed sum of a pair of
    neighbouring input channels (2k, 2k+1; an odd last one pairs with 0): what a kernel with
    ``TargetFacts.int8_pair_sums`` adds in one saturating int16 (times an activation up to
    255). Calibration fits it, the packed kernels check it."""
    import numpy as np

    w = np.asarray(w)
    w = w if w.dtype.kind == "f" else w.astype(np.int64)  # int8 sums would wrap
    even = np.pad(w, [(0, 0), (0, w.shape[1] % 2)] + [(0, 0)] * (w.ndim - 2))
    pairs = even.reshape(w.shape[0], -1, 2, *w.shape[2:])
    same_signed = np.maximum(np.maximum(pairs, 0).sum(axis=2), np.maximum(-pairs, 0).sum(axis=2))
    return same_signed.reshape(w.shape[0], -1).max(axis=1)


# Module attribute (JSON) naming the layers whose constant weights are block sparse:
# {layer: {"block": [r, c], "sparsity": s, "kernel": "sparse" | "dense", ...}}. The pruning pass
# writes it; a target's sparse kernel hook runs the "sparse" ones with its kernels; other passes
# leave those layers in float32.
SPARSE_LAYERS_ATTR = "tvm_compress.sparse"


def json_attr(mod, key: str, default: Any = None) -> Any:
    """The JSON module attribute ``key`` of ``mod`` (an IRModule), decoded; ``default`` when
    absent. Passes and kernel hooks leave their marks and reports this way."""
    import json

    attrs = getattr(mod, "attrs", None)
    if attrs is None or key not in attrs:
        return default
    return json.loads(str(attrs[key]))


def sparse_layers(mod) -> Dict[str, Dict[str, Any]]:
    """The block-sparse layer marks of ``mod`` (an IRModule), {} when none."""
    return json_attr(mod, SPARSE_LAYERS_ATTR, {})


# Module attribute (JSON) naming the layers the binary pass made binary: {layer: {"activations":
# "binary" | "float"}}. Their weights are ``alpha * sign`` constants (one alpha per output
# channel); "binary" layers read a sign. A target's binary kernel hook runs them on bit-packed
# XNOR/popcount kernels ("float": 1-bit weights unpacked for a float kernel); without one they
# run as the float computation they equal.
BINARY_LAYERS_ATTR = "tvm_compress.binary"


def binary_layers(mod) -> Dict[str, Dict[str, Any]]:
    """The binary layer marks of ``mod`` (an IRModule), {} when none."""
    return json_attr(mod, BINARY_LAYERS_ATTR, {})
