"""Bit-packed binary (+1/-1) kernels: XNOR/popcount convolution and dense, sign packing, and the
fused chain that writes the next binary layer's packed input.

Encoding: bit 1 is +1, bit 0 is -1; a value ``v`` packs as 1 when ``v >= 0`` (``Sign`` gives 0
for an exact 0, which no bit can hold: such ties pack as +1). Channels pack along 32-bit words,
innermost: an NCHW activation ``[N, C, H, W]`` becomes ``[N, H, W, ceil(C/32)]``, a weight
``[O, C, KH, KW]`` becomes ``[KH, KW, ceil(C/32), O]`` (output channels innermost: one vector of
``O`` words per tap and word). Bits past ``C`` in the last word are 0 in both, so their XOR is 0.

For +1/-1 vectors of ``n`` bits, ``a . w = n - 2 popcount(a XOR w)``. The convolution sums that
over the taps inside the input only (``n`` = the real bits of each word), which is what a
zero-padded convolution of the +1/-1 tensors computes: padding handled exactly.

``binary_conv2d`` gives the int32 dot products ``[N, O, OH, OW]`` (the float scale, bias and
activation after it fuse in as an element-wise epilogue). ``binary_conv2d_packed`` is the fused
chain: the dots of one pixel for all output channels, each compared with its integer threshold
(``sgn[o] * dot >= thr[o]`` is ``sign(s[o] * dot + t[o]) >= 0`` for the per-channel affine
``s, t`` between this layer and the next sign), written bit-packed: no float tensor between two
binary layers. ``schedule_binary`` vectorizes the kernels over output channels (AVX2 has no
vector popcount: LLVM expands it with byte-table shuffles; NEON has ``cnt``; AVX-512 VPOPCNTDQ
counts directly).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
from tvm import s_tir, te, tirx

from .sparse_kernels import _root  # the root block of the function a schedule works on

WORD = 32
# Set on the TE ops (the blocks ``create_prim_func`` makes): "pack", "conv", "conv_packed", "dense".
BINARY_ATTR = "tvm_compress.binary"
_PARALLEL_MIN_OPS = 1 << 14


def words(channels: int) -> int:
    return (int(channels) + WORD - 1) // WORD


# ---- numpy side: weights and reference --------------------------------------------------------

def pack_bits(signs: np.ndarray, axis: int) -> np.ndarray:
    """``signs`` (bool, True = +1) packed along ``axis`` into uint32 words, moved last."""
    s = np.moveaxis(np.asarray(signs, bool), axis, -1)
    c = s.shape[-1]
    padded = np.zeros((*s.shape[:-1], words(c) * WORD), bool)
    padded[..., :c] = s
    bits = padded.reshape(*s.shape[:-1], words(c), WORD).astype(np.uint64)
    return (bits << np.arange(WORD, dtype=np.uint64)).sum(-1).astype(np.uint32)


def unpack_bits(packed: np.ndarray, channels: int) -> np.ndarray:
    """Inverse of ``pack_bits`` (channels last): bool [..., channels]."""
    p = np.asarray(packed, np.uint32)[..., None]
    bits = (p >> np.arange(WORD, dtype=np.uint32)) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :channels].astype(bool)


def pack_conv_weight(w: np.ndarray) -> np.ndarray:
    """``[O, C, KH, KW]`` (signs of) -> uint32 ``[KH, KW, ceil(C/32), O]``."""
    p = pack_bits(np.asarray(w) >= 0, axis=1)  # [O, KH, KW, CW]
    return np.ascontiguousarray(p.transpose(1, 2, 3, 0))


def pack_dense_weight(w: np.ndarray) -> np.ndarray:
    """``[O, K]`` (signs of) -> uint32 ``[ceil(K/32), O]``."""
    return np.ascontiguousarray(pack_bits(np.asarray(w) >= 0, axis=1).T)


def binarize(w: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(alpha per output channel = mean |W| over the rest, W's signs as +1/-1): ``alpha * signs``
    is the binary weight closest to ``W`` in L2 (Rastegari et al., XNOR-Net)."""
    w = np.asarray(w, np.float64)
    alpha = np.abs(w).reshape(w.shape[0], -1).mean(axis=1)
    return alpha, np.where(w >= 0, 1.0, -1.0)


def thresholds(scale: np.ndarray, shift: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(sgn, thr) int32 per channel with ``sgn * dot >= thr`` exactly when ``scale * dot + shift
    >= 0`` for every integer ``dot``, padded to whole words (padding: 0 >= 1, never set)."""
    scale, shift = np.asarray(scale, np.float64), np.asarray(shift, np.float64)
    sgn = np.sign(scale).astype(np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        thr = np.ceil(-shift / np.abs(scale))
    # scale 0: the output is sign(shift) everywhere: 0 >= 0 (always) or 0 >= 1 (never)
    thr = np.where(sgn == 0, np.where(shift >= 0, 0, 1), np.clip(thr, -(2**30), 2**30))
    pad = words(len(sgn)) * WORD - len(sgn)  # channels of the last word that do not exist: never set
    return (np.concatenate([sgn, np.zeros(pad, np.int64)]).astype(np.int32),
            np.concatenate([thr, np.ones(pad, np.int64)]).astype(np.int32))


# ---- TE kernels -------------------------------------------------------------------------------

def _u32(v):
    return tirx.const(v, "uint32")


def bitpack(x: te.Tensor, axis: int = 1) -> te.Tensor:
    """Sign-pack ``x`` along ``axis`` (its channels), which moves last as words: NCHW
    ``[N, C, H, W]`` -> ``[N, H, W, CW]``, ``[N, K]`` -> ``[N, KW]``."""
    shape = [int(d) for d in x.shape]
    c = shape[axis]
    out_shape = [*shape[:axis], *shape[axis + 1:], words(c)]
    b = te.reduce_axis((0, WORD), name="bit")

    def f(*idx):
        g = idx[-1]
        ch = g * WORD + b
        src = [*idx[:axis], ch, *idx[axis:-1]]
        bit = tirx.if_then_else(x(*src) >= tirx.const(0, x.dtype), tirx.shift_left(_u32(1), b.var.astype("uint32")), _u32(0))
        return te.sum(tirx.if_then_else(ch < c, bit, _u32(0)), axis=b)

    return te.compute(out_shape, f, name="bitpack", attrs={BINARY_ATTR: "pack"})


def _conv_dot(xp, wp, channels, strides, padding, dilation, name, attrs):
    n_, h_, w_, cw_ = (int(d) for d in xp.shape)
    kh_, kw_, cw2, o_ = (int(d) for d in wp.shape)
    assert cw2 == cw_ == words(channels), (xp.shape, wp.shape, channels)
    (sh, sw), (dh, dw) = strides, dilation
    pt, pl, pb, pr = padding
    oh_ = (h_ + pt + pb - dh * (kh_ - 1) - 1) // sh + 1
    ow_ = (w_ + pl + pr - dw * (kw_ - 1) - 1) // sw + 1
    rh, rw, rc = te.reduce_axis((0, kh_), "kh"), te.reduce_axis((0, kw_), "kw"), te.reduce_axis((0, cw_), "cw")
    last = channels - WORD * (cw_ - 1)

    def f(n, o, y, x):
        ih, iw = y * sh - pt + rh * dh, x * sw - pl + rw * dw
        inside = tirx.all(ih >= 0, ih < h_, iw >= 0, iw < w_)
        bits = tirx.Select(rc == cw_ - 1, tirx.const(last, "int32"), tirx.const(WORD, "int32"))
        ones = tirx.popcount(tirx.bitwise_xor(xp[n, ih, iw, rc], wp[rh, rw, rc, o])).astype("int32")
        return te.sum(tirx.if_then_else(inside, bits - 2 * ones, tirx.const(0, "int32")), axis=[rh, rw, rc])

    return te.compute((n_, o_, oh_, ow_), f, name=name, attrs=attrs)


def binary_conv2d(xp: te.Tensor, wp: te.Tensor, channels: int, strides=(1, 1),
                  padding=(0, 0, 0, 0), dilation=(1, 1)) -> te.Tensor:
    """int32 ``[N, O, OH, OW]``: the +1/-1 convolution of the packed input ``xp`` ``[N, H, W, CW]``
    with the packed weight ``wp`` ``[KH, KW, CW, O]`` (``channels`` real input channels)."""
    return _conv_dot(xp, wp, channels, strides, padding, dilation, "binary_conv", {BINARY_ATTR: "conv"})


def binary_conv2d_packed(xp: te.Tensor, wp: te.Tensor, sgn: te.Tensor, thr: te.Tensor, channels: int,
                         strides=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1)) -> te.Tensor:
    """The fused chain: uint32 ``[N, OH, OW, ceil(O/32)]``, bit ``o`` set where
    ``sgn[o] * dot[o] >= thr[o]`` (``dot`` as ``binary_conv2d``; ``sgn``, ``thr`` as
    ``thresholds`` gives them, ``32 * ceil(O/32)`` long)."""
    dot = _conv_dot(xp, wp, channels, strides, padding, dilation, "binary_conv_dot", {})
    n_, o_, oh_, ow_ = (int(d) for d in dot.shape)
    b = te.reduce_axis((0, WORD), name="bit")

    def f(n, y, x, g):
        o = g * WORD + b
        # A lone if_then_else guards the read past the last channel (codegen branches around
        # it); ``sgn``/``thr`` are padded to whole words with never-set channels.
        d = tirx.if_then_else(o < o_, dot[n, o, y, x], tirx.const(0, "int32"))
        on = tirx.Select(sgn[o] * d >= thr[o], tirx.shift_left(_u32(1), b.var.astype("uint32")), _u32(0))
        return te.sum(on, axis=b)

    return te.compute((n_, oh_, ow_, words(o_)), f, name="binary_threshold_pack",
                      attrs={BINARY_ATTR: "conv_packed"})


def binary_dense(xp: te.Tensor, wp: te.Tensor, features: int) -> te.Tensor:
    """int32 ``[N, O]``: packed ``xp`` ``[N, KW]`` times packed ``wp`` ``[KW, O]`` in +1/-1."""
    n_, kw_ = (int(d) for d in xp.shape)
    kw2, o_ = (int(d) for d in wp.shape)
    assert kw2 == kw_ == words(features), (xp.shape, wp.shape, features)
    r = te.reduce_axis((0, kw_), "kw")
    last = features - WORD * (kw_ - 1)

    def f(n, o):
        bits = tirx.Select(r == kw_ - 1, tirx.const(last, "int32"), tirx.const(WORD, "int32"))
        ones = tirx.popcount(tirx.bitwise_xor(xp[n, r], wp[r, o])).astype("int32")
        return te.sum(bits - 2 * ones, axis=r)

    return te.compute((n_, o_), f, name="binary_dense", attrs={BINARY_ATTR: "dense"})


def unpack_weight(wp: te.Tensor, alpha: te.Tensor, shape, conv: bool) -> te.Tensor:
    """float32 ``alpha[o] * (+1/-1)`` from packed bits: a conv weight ``[O, C, KH, KW]`` from
    ``[KH, KW, CW, O]``, or a matmul weight ``[K, O]`` from ``[KW, O]``."""
    def sign(word, bit):
        one = tirx.bitwise_and(tirx.shift_right(word, bit.astype("uint32")), _u32(1))
        return one.astype("float32") * tirx.const(2.0, "float32") - tirx.const(1.0, "float32")

    if conv:
        return te.compute(tuple(shape), lambda o, c, h, w: alpha[o] * sign(wp[h, w, c // WORD, o], c % WORD),
                          name="unpack_binary_weight")
    return te.compute(tuple(shape), lambda k, o: alpha[o] * sign(wp[k // WORD, o], k % WORD),
                      name="unpack_binary_weight")


# ---- schedules ---------------------------------------------------------------------------------

def _kind(sch: s_tir.Schedule, block) -> Optional[str]:
    return sch.get(block).annotations.get(BINARY_ATTR)


def find_binary_blocks(sch: s_tir.Schedule) -> List:
    """The blocks of ``sch``'s function that carry ``BINARY_ATTR``, in order."""
    return [blk for blk in sch.get_child_blocks(_root(sch)) if _kind(sch, blk) is not None]


def _extent(sch, loop) -> int:
    return int(sch.get(loop).extent)


def _lanes(o: int, lanes: int) -> int:
    """The vector width over ``o`` output channels: the largest power of two <= ``lanes`` that
    divides ``o`` (1: scalar)."""
    v = lanes
    while v > 1 and o % v:
        v //= 2
    return v


def _tile_dot(sch, block, lanes: int):
    """A dot block ``[N, O, OH, OW]`` (reduction kh, kw, cw): a vector of output channels
    innermost, the reduction around it. Returns (pixel loops, channel-vector loop, vector)."""
    loops = sch.get_loops(block)
    n, o, y, x = loops[-7:-3]
    kh = loops[-3]
    v = _lanes(_extent(sch, o), lanes)
    oo, oi = sch.split(o, [None, v])
    sch.reorder(n, y, x, oo, *loops[-3:], oi)
    return (n, y, x, oo), kh, oi, v


def _finish_reduction(sch, block, first_reduce, inner, v: int) -> None:
    """Init out of the reduction, both vectorized (after every compute_at: a decomposed block
    no longer counts as a reduction)."""
    if v > 1:
        sch.vectorize(inner)
    init = sch.decompose_reduction(block, first_reduce)
    if v > 1:
        sch.vectorize(sch.get_loops(init)[-1])


def _dense_tiles(sch, block, lanes: int):
    n, o, r = sch.get_loops(block)[-3:]
    v = _lanes(_extent(sch, o), lanes)
    oo, oi = sch.split(o, [None, v])
    sch.reorder(n, oo, r, oi)
    return (n, oo), r, oi, v


def _consumers_inlined(sch, block) -> None:
    """Element-wise blocks after ``block`` inlined into it, one after the other (the float
    scale, bias and activation FuseOps put with the kernel)."""
    while True:
        consumers = sch.get_consumers(block)
        if len(consumers) != 1:
            return
        try:
            sch.reverse_compute_inline(consumers[0])
        except Exception:  # noqa: BLE001  (not element-wise: left as it is)
            return


def schedule_binary(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Schedule the binary kernel ``block`` (and what is fused with it) of ``sch``."""
    kind = _kind(sch, block)
    if kind == "pack":
        for producer in reversed(sch.get_producers(block)):  # the sign (and what fused before it)
            try:
                sch.compute_inline(producer)
            except Exception:  # noqa: BLE001  (stays a loop nest of its own)
                pass
        loops = sch.get_loops(block)
        spatial = loops[:-1]
        if len(spatial) > 1 and int(np.prod([_extent(sch, l) for l in spatial])) >= _PARALLEL_MIN_OPS // WORD:
            sch.parallel(sch.fuse(*spatial[:-1]) if len(spatial) > 2 else spatial[0])
        sch.unroll(loops[-1])
        return
    if kind == "dense":
        write = sch.cache_write(block, 0, "local")
        (n, oo), r, oi, v = _dense_tiles(sch, block, lanes)
        sch.reverse_compute_at(write, oo)
        _consumers_inlined(sch, write)
        _finish_reduction(sch, block, r, oi, v)
        wl = sch.get_loops(write)
        if v > 1 and len(wl) > 2:
            sch.vectorize(wl[-1])
        return
    if kind == "conv":
        ops = int(np.prod([_extent(sch, l) for l in sch.get_loops(block)[:4]]))
        write = sch.cache_write(block, 0, "local")
        (n, y, x, oo), kh, oi, v = _tile_dot(sch, block, lanes)
        sch.reverse_compute_at(write, oo)
        _consumers_inlined(sch, write)
        if ops >= _PARALLEL_MIN_OPS:
            sch.parallel(sch.fuse(n, y))
        _finish_reduction(sch, block, kh, oi, v)
        if v > 1:
            sch.vectorize(sch.get_loops(write)[-1])
        return
    if kind == "conv_packed":
        # The dots of one pixel, computed under the pixel loop of the packing (reverse_compute_at
        # would clip the bit loop to the last word's channels).
        dot = sch.get_producers(block)[0]
        # (no explicit unroll of the bit loop: unrolled under compute_at it gave wrong words)
        n, y, x, _, _ = sch.get_loops(block)
        if _extent(sch, n) * _extent(sch, y) * _extent(sch, x) * 32 >= _PARALLEL_MIN_OPS:
            sch.parallel(sch.fuse(n, y))
        sch.compute_at(dot, x)
        loops = sch.get_loops(dot)
        depth = next(i for i, l in enumerate(loops) if sch.get(l).same_as(sch.get(x))) + 1
        o, *reduce = loops[depth:]  # loops of extent 1 are gone
        v = _lanes(_extent(sch, o), lanes)
        oo, oi = sch.split(o, [None, v])
        sch.reorder(oo, *reduce, oi)
        _finish_reduction(sch, dot, reduce[0] if reduce else oo, oi, v)
        return
    raise ValueError(f"not a binary kernel block: {kind!r}")
