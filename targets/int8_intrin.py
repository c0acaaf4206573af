"""CPU dot-product tensor intrinsics for the packed int8 convolution (``int8_conv.py``).

Each intrinsic computes ``C[i] += sum_k A[k] * B[i, k]`` for ``lanes`` output channels and
``depth`` input channels: ``A`` is ``depth`` packed activations of one pixel (one scalar load,
broadcast), ``B`` a contiguous ``lanes x depth`` block of the packed weight, ``C`` a vector of
int32 accumulators.

- ``pmaddubsw`` (x86 AVX2, 8 x 4): ``vpmaddubsw`` multiplies 32 uint8 activations by int8
  weights and adds pairs into saturating int16, ``vpmaddwd`` by ones adds those pairs into
  int32: 32 products in two instructions, weights read as they are stored. int8 activations
  are shifted into uint8 as for ``vpdpbusd``. A pair saturates only when its two same-signed
  weights add up to more than 128 in magnitude: ``Calibrate`` quantizes conv weights so that
  none does (``TargetFacts.int8_pair_sums``); a layer quantized elsewhere (a QDQ model) where
  one could runs the exact ``pmaddwd`` kernel instead (``int8_conv.layer_kernel``), so the
  kernels never saturate and never change a model's integers.
- ``pmaddwd`` (x86 AVX2, 8 x 2): activations packed as int16 pairs, weights widened to int16;
  one ``vpmaddwd`` does 16 exact products and pair sums; uint8 or int8 activations. Exact
  for any weights, about half ``pmaddubsw``'s rate.
- ``vpdpbusd`` (x86 AVX-512 VNNI, 16 x 4): one ``vpdpbusd`` does 64 uint8 x int8 products
  and accumulates them; int8 activations are shifted by +128 into uint8 when packed and the
  kernel subtracts ``128 * sum(w)`` per output channel (``DotKernel.shift``).
- ``avxvnni`` (x86 AVX-VNNI, 8 x 4): the same ``vpdpbusd`` on 256-bit registers, for CPUs
  with AVX-VNNI and no AVX-512 (Intel client cores from Alder Lake on).
- ``sdot`` (AArch64 ``+dotprod``, 4 x 4): one ``sdot`` does 16 int8 x int8 products; int8
  activations only (``udot`` would need uint8 weights, ``usdot`` needs ``+i8mm``).

A preset may list several kernels (``features.int8_dot``); the first whose ``cpu_features`` the
target's CPU has is used (``int8_pack.target_kernel``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

from tvm import s_tir
from tvm.script import tirx as T


@dataclass(frozen=True)
class DotKernel:
    name: str
    lanes: int  # output channels per intrinsic call (one vector register of int32)
    depth: int  # input channels reduced per call
    act_dtypes: Tuple[str, ...]  # activation dtypes the kernel takes
    packed_dtype: str  # activations after packing (the intrinsic's A)
    max_acc: int  # vector registers available for accumulators (dense and depthwise tiles)
    cpu_features: Tuple[str, ...]  # LLVM CPU features the instruction needs
    registers: int = 16  # vector registers of the ISA
    accumulates: bool = True  # the instruction adds into C (else a temporary plus an add)
    # Products summed in pairs into saturating int16: a layer whose weights could saturate a
    # pair runs this exact kernel instead (``int8_conv.layer_kernel``).
    exact_fallback: str = ""
    tap_acc: int = 0  # accumulators of depthwise tiles when not max_acc (their tap instruction's)

    def shift(self, act_dtype: str) -> int:
        """Added to ``act_dtype`` activations when packing (int8 -> uint8 for unsigned x signed dots)."""
        return 128 if (act_dtype, self.packed_dtype) == ("int8", "uint8") else 0

    @property
    def depthwise_acc(self) -> int:
        return self.tap_acc or self.max_acc

    @property
    def intrin(self) -> str:
        return f"tvm_compress_{self.name}"

    @property
    def int16_pairs(self) -> bool:
        return bool(self.exact_fallback)


def _desc(kernel: DotKernel):
    lanes, depth, act = kernel.lanes, kernel.depth, kernel.packed_dtype

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (depth,), act, offset_factor=1)
        B = T.match_buffer(b, (lanes, depth), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:depth], B[0:lanes, 0:depth])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, depth):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


def _as_int32(buf, vector_dtype):
    """The first 4 bytes of ``buf`` as one int32, as an expression. (Bound to a name inside a
    TVMScript function, it would become a 1-element "local" buffer: an alloc/free pair from the
    workspace pool in every call, and in every iteration of a parallel loop.)"""
    return T.reinterpret(buf.vload([0], dtype=vector_dtype), dtype="int32")


def _pmaddwd_impl():
    # Parsed when first registered: TVMScript parsing costs the CLI's start-up ~0.2 s per kernel.
    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (2,), "int16", offset_factor=1)
        B = T.match_buffer(b, (8, 2), "int8", offset_factor=1)
        C = T.match_buffer(c, (8,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:8], A[0:2], B[0:8, 0:2])
            T.writes(C[0:8])
            # The (a0, a1) int16 pair is one int32: broadcast it, multiply-add pairs with B.
            C[T.ramp(T.int32(0), 1, 8)] = C[T.ramp(T.int32(0), 1, 8)] + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.reinterpret(T.broadcast(_as_int32(A, "int16x2"), 8), dtype="int16x16"),
                T.cast(B.vload([0, 0], dtype="int8x16"), "int16x16"),
                dtype="int32x8",
            )

    return impl


def _pmaddubsw_impl():
    # Parsed when first registered: TVMScript parsing costs the CLI's start-up ~0.2 s per kernel.
    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (8, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (8,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:8, 0:4])
            T.writes(C[0:8])
            # The 4 activations are one int32: broadcast, multiply by B and add pairs (int16),
            # then add the pairs of pairs into int32.
            C[T.ramp(T.int32(0), 1, 8)] = C[T.ramp(T.int32(0), 1, 8)] + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                    T.reinterpret(T.broadcast(_as_int32(A, "uint8x4"), 8), dtype="uint8x32"),
                    B.vload([0, 0], dtype="int8x32"),
                    dtype="int16x16",
                ),
                T.broadcast(T.int16(1), 16),
                dtype="int32x8",
            )

    return impl


def _sdot_impl():
    # Parsed when first registered: TVMScript parsing costs the CLI's start-up ~0.2 s per kernel.
    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "int8", offset_factor=1)
        B = T.match_buffer(b, (4, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (4,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
                C[T.ramp(T.int32(0), 1, 4)],
                B.vload([0, 0], dtype="int8x16"),
                T.reinterpret(T.broadcast(_as_int32(A, "int8x4"), 4), dtype="int8x16"),
                dtype="int32x4",
            )

    return impl


def _vpdpbusd(c, a, b, lanes: int = 16):
    # This LLVM's VNNI intrinsics take the byte operands as <4 * lanes x i8>; the 256-bit one
    # is also AVX-VNNI's (VEX-encoded) instruction on CPUs without AVX-512.
    return T.call_llvm_pure_intrin(
        T.llvm_lookup_intrinsic_id(f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"), c, a, b, dtype=f"int32x{lanes}"
    )


def _vpdpbusd_impl(lanes: int = 16):
    # Parsed when first registered: TVMScript parsing costs the CLI's start-up ~0.2 s per kernel.
    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (lanes, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = _vpdpbusd(
                C[T.ramp(T.int32(0), 1, lanes)],
                T.reinterpret(T.broadcast(_as_int32(A, "uint8x4"), lanes), dtype=f"uint8x{4 * lanes}"),
                B.vload([0, 0], dtype=f"int8x{4 * lanes}"),
                lanes,
            )

    return impl


def _tap_desc(lanes: int, act: str):
    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (lanes,), act, offset_factor=1)
        B = T.match_buffer(b, (lanes,), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes], B[0:lanes])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                with T.sblock("update"):
                    vi = T.axis.remap("S", [i])
                    C[vi] = C[vi] + T.cast(A[vi], "int32") * T.cast(B[vi], "int32")

    return desc


# One depthwise tap, C += A * B lane by lane, as a pair multiply-add: A widened to int32 lanes
# whose high int16 is its sign, B's high int16 zero, so each lane's pair sum is A * B + 0.
# (LLVM lowers the plain multiply to vpmulld: two micro-ops and ten cycles' latency on Intel
# cores; it only picks vpmaddwd itself for operands it can prove below 2^15.)
_TAP_OPS = {  # DotKernel -> {lanes: (LLVM intrinsic, accumulates)}
    "vpdpbusd": {4: ("llvm.x86.avx512.vpdpwssd.128", True), 8: ("llvm.x86.avx512.vpdpwssd.256", True),
                 16: ("llvm.x86.avx512.vpdpwssd.512", True)},
    "avxvnni": {4: ("llvm.x86.avx512.vpdpwssd.128", True), 8: ("llvm.x86.avx512.vpdpwssd.256", True)},
    "pmaddwd": {4: ("llvm.x86.sse2.pmadd.wd", False), 8: ("llvm.x86.avx2.pmadd.wd", False)},
}
_TAP_OPS["pmaddubsw"] = _TAP_OPS["pmaddwd"]  # exact pair sums: taps never saturate


def _signed_pairs(buf, act: str, lanes: int):
    """``lanes`` activations widened to int32, seen as int16 pairs (value, sign)."""
    return T.reinterpret(T.cast(buf.vload([0], dtype=f"{act}x{lanes}"), f"int32x{lanes}"),
                         dtype=f"int16x{2 * lanes}")


def _low_pairs(buf, lanes: int):
    """``lanes`` int8 weights as int16 pairs (value, 0)."""
    wide = T.cast(T.cast(T.cast(buf.vload([0], dtype=f"int8x{lanes}"), f"int16x{lanes}"), f"uint16x{lanes}"),
                  f"int32x{lanes}")
    return T.reinterpret(wide, dtype=f"int16x{2 * lanes}")


def _tap_impl(kernel: str, lanes: int, act: str):
    name, accumulates = _TAP_OPS[kernel][lanes]
    vec = f"int32x{lanes}"

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (lanes,), act, offset_factor=1)
        B = T.match_buffer(b, (lanes,), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes], B[0:lanes])
            T.writes(C[0:lanes])
            if accumulates:
                C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(name), C[T.ramp(T.int32(0), 1, lanes)],
                    _signed_pairs(A, act, lanes), _low_pairs(B, lanes), dtype=vec)
            else:
                C[T.ramp(T.int32(0), 1, lanes)] = C[T.ramp(T.int32(0), 1, lanes)] + T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(name), _signed_pairs(A, act, lanes), _low_pairs(B, lanes), dtype=vec)

    return impl


def tap_intrin(kernel: "DotKernel", lanes: int, act: str):
    """Name of the registered depthwise-tap intrinsic for ``kernel``'s ISA, ``lanes`` int32
    lanes and ``act`` activations; None where the ISA has none (the lane loop is vectorized)."""
    if lanes not in _TAP_OPS.get(kernel.name, {}):
        return None
    name = f"tvm_compress_tap_{kernel.name}_{act}_{lanes}"
    if name not in _taps:
        s_tir.TensorIntrin.register(name, _tap_desc(lanes, act), _tap_impl(kernel.name, lanes, act), override=True)
        _taps.add(name)
    return name


_taps: set = set()


def _pair_tap(kernel: str, lanes: int, desc: bool):
    """The two-tap intrinsic's description (``desc``: what tensorize matches, as
    ``int8_conv._depthwise_nhwc`` spells it) or its implementation (one pair multiply-add)."""
    name, accumulates = _TAP_OPS[kernel][lanes]
    vec, pairs = f"int32x{lanes}", f"int16x{2 * lanes}"

    @T.prim_func(s_tir=True)
    def func(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (lanes,), "int32", offset_factor=1)
        B = T.match_buffer(b, (lanes, 2), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes], B[0:lanes, 0:2])
            T.writes(C[0:lanes])
            if desc:
                for i in T.serial(0, lanes):
                    with T.sblock("update"):
                        vi = T.axis.remap("S", [i])
                        C[vi] = C[vi] + (T.cast(T.cast(A[vi], "int16"), "int32") * T.cast(B[vi, 0], "int32")
                                         + T.shift_right(A[vi], 16) * T.cast(B[vi, 1], "int32"))
            elif accumulates:
                C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(name), C[T.ramp(T.int32(0), 1, lanes)],
                    T.reinterpret(A.vload([0], dtype=vec), dtype=pairs),
                    T.cast(B.vload([0, 0], dtype=f"int8x{2 * lanes}"), pairs), dtype=vec)
            else:
                C[T.ramp(T.int32(0), 1, lanes)] = C[T.ramp(T.int32(0), 1, lanes)] + T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(name), T.reinterpret(A.vload([0], dtype=vec), dtype=pairs),
                    T.cast(B.vload([0, 0], dtype=f"int8x{2 * lanes}"), pairs), dtype=vec)

    return func


def pair_tap_intrin(kernel: "DotKernel", lanes: int):
    """Name of the registered two-tap depthwise intrinsic for ``kernel``'s ISA and ``lanes``
    channels (None where it has none): ``A`` holds each channel's two activations as the int16
    halves of an int32 (``int8_conv``'s pair pack), ``B`` the two taps' weights, and one pair
    multiply-add does both taps of ``lanes`` channels (the one-tap intrinsic: one)."""
    if lanes not in _TAP_OPS.get(kernel.name, {}):
        return None
    name = f"tvm_compress_tap_pair_{kernel.name}_{lanes}"
    if name not in _taps:
        s_tir.TensorIntrin.register(name, _pair_tap(kernel.name, lanes, True), _pair_tap(kernel.name, lanes, False),
                                    override=True)
        _taps.add(name)
    return name


KERNELS: Dict[str, DotKernel] = {
    "vpdpbusd": DotKernel("vpdpbusd", 16, 4, ("uint8", "int8"), "uint8", max_acc=24,
                          cpu_features=("avx512vnni",), registers=32),
    # AVX-VNNI (Intel client cores from Alder Lake on, which have no AVX-512): the same
    # instruction on 8 lanes, VEX-encoded, 16 registers.
    "avxvnni": DotKernel("avxvnni", 8, 4, ("uint8", "int8"), "uint8", max_acc=10, cpu_features=("avxvnni",)),
    # Dense tiles of 10 accumulators, depthwise ones of pmaddwd's 12 (its tap instruction): 12
    # on dense convs cost the classifier's kernels 3.5 %, 10 on depthwise ones 15-19 %.
    "pmaddubsw": DotKernel("pmaddubsw", 8, 4, ("uint8", "int8"), "uint8", max_acc=10, cpu_features=("avx2",),
                           accumulates=False, exact_fallback="pmaddwd", tap_acc=12),
    "pmaddwd": DotKernel("pmaddwd", 8, 2, ("uint8", "int8"), "int16", max_acc=12, cpu_features=("avx2",),
                         accumulates=False),
    "sdot": DotKernel("sdot", 4, 4, ("int8",), "int8", max_acc=24, cpu_features=("dotprod",), registers=32),
}
_IMPLS = {"vpdpbusd": _vpdpbusd_impl, "avxvnni": lambda: _vpdpbusd_impl(8), "pmaddubsw": _pmaddubsw_impl,
          "pmaddwd": _pmaddwd_impl, "sdot": _sdot_impl}
_registered = False


def register() -> None:
    """Register the intrinsics with TVM once (tensorize looks them up by name)."""
    global _registered
    if not _registered:
        for name, kernel in KERNELS.items():
            s_tir.TensorIntrin.register(kernel.intrin, _desc(kernel), _IMPLS[name](), override=True)
        _registered = True
