"""Block-sparse (BSR) float32 kernels with the sparsity pattern baked in at compile time.

A weight ``W [O, I]`` (out x in; a 1x1 convolution's ``[O, I, 1, 1]`` squeezed) is stored as
block sparse rows (``BSR``): the kept ``R x C`` blocks (``data [nnz, R, C]``), the block column
of each (``indices``) and where each block row starts (``indptr``). Only ``data`` is a runtime
input of a kernel; ``indices``/``indptr`` are Python data the kernel's code is generated from.

Formulation (after Elsen et al., "Fast Sparse ConvNets", CVPR 2020). TE's ``compute`` cannot
walk a per-row list of constant columns without a lookup table (an index tensor, which would put
the pattern back in memory, or a ``Select`` chain over the whole pattern, which the simplifier
must copy and fold once per unrolled term: quadratic compile time). So the kernels are
``te.extern`` ops whose TIR body is generated here, one straight-line piece of code per block
row, every column offset an immediate:

- ``sparse_conv1x1`` (NCHW): register tile = ``rs`` output rows of a block x ``V`` pixels
  (``V`` = ``U`` float vectors). Per kept block and input column: one vector load of ``V``
  activations, reused by the ``rs`` rows (one broadcast weight and one FMA each); the tile's
  ``rs x U`` accumulators stay in registers over the whole row, then are stored once. A row's
  code sits in a loop over pixel tiles (the last tile is shifted back to end at the last pixel,
  so there is no remainder code: the overlap is recomputed, identical values).
- ``sparse_dense`` (``x [B, I]``, batch 1 the important case): vectors along the ``R x C`` values
  of a block (contiguous in ``data``); the activation is a broadcast scalar (``C`` = 1) or a
  shuffled ``C``-vector, reused across the block's ``R`` rows; ``Q`` partial accumulators per
  row hide the FMA latency (one chain per row otherwise); a batch tile of ``bt`` rows reuses each
  weight load ``bt`` times.

The work is cut into ``chunks`` (the target's cores): pixel ranges when there are enough pixel
tiles, else block rows split by kept-block count. The ops carry ``SPARSE_ATTR``; after fusion
``schedule_sparse`` makes the chunk loop parallel when the kernel is large enough and schedules
the fused element-wise epilogue (bias add, relu...) as a parallel, vectorized loop nest of its
own (it cannot move into the extern's body, which is opaque to the other blocks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import tvm
from tvm import s_tir, te, tirx

# Set on the extern op (the block ``te.create_prim_func`` makes of it): "conv1x1" or "dense".
SPARSE_ATTR = "tvm_compress.bsr"
# Multiply-adds the kernel does (kept blocks only): decides the parallel loop.
MACS_ATTR = "tvm_compress.bsr_macs"
# A parallel region costs microseconds to start: small kernels run on one core.
_PARALLEL_MIN_MACS = 1 << 16
_PARALLEL_MIN_ELEMS = 1 << 14
# TVM puts a "global" buffer under 1 KiB on the stack (LLVM then keeps it in registers);
# accumulators are one small buffer per row / per (partial, batch row) to stay below.
_ACC_SCOPE = "global"


# ---- BSR storage --------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class BSR:
    """Block sparse rows of a 2-d weight ``W [O, I]``."""

    shape: tuple  # (O, I)
    block: tuple  # (R, C): R output rows x C input columns per block
    data: np.ndarray  # [nnz_blocks, R, C] float32
    indices: np.ndarray  # [nnz_blocks] int32: block column of each kept block
    indptr: np.ndarray  # [O/R + 1] int32

    def __post_init__(self):
        (o, i), (r, c) = _check_block(self.shape, self.block)
        nnz = int(self.indptr[-1]) if len(self.indptr) else 0
        if self.data.shape != (nnz, r, c) or self.indices.shape != (nnz,) or self.indptr.shape != (o // r + 1,):
            raise ValueError(
                f"BSR arrays do not fit shape {self.shape} block {self.block}: data {self.data.shape}, "
                f"indices {self.indices.shape}, indptr {self.indptr.shape}"
            )
        if nnz and (self.indices.min() < 0 or self.indices.max() >= i // c):
            raise ValueError("BSR block column out of range")

    @property
    def nnz_blocks(self) -> int:
        return int(self.indptr[-1])

    @property
    def density(self) -> float:
        """Kept blocks / all blocks."""
        (o, i), (r, c) = self.shape, self.block
        return self.nnz_blocks / ((o // r) * (i // c))

    @property
    def nbytes(self) -> int:
        """What the artifact stores: data + indices + indptr."""
        return int(self.data.nbytes + self.indices.nbytes + self.indptr.nbytes)

    def rows(self) -> List[List[Tuple[int, int]]]:
        """Per block row, its kept blocks as (index into ``data``, block column)."""
        return [
            [(k, int(self.indices[k])) for k in range(int(self.indptr[b]), int(self.indptr[b + 1]))]
            for b in range(len(self.indptr) - 1)
        ]

    def to_dense(self) -> np.ndarray:
        (o, i), (r, c) = self.shape, self.block
        blocks = np.zeros((o // r, i // c, r, c), self.data.dtype)
        for b, row in enumerate(self.rows()):
            for k, col in row:
                blocks[b, col] = self.data[k]
        return blocks.transpose(0, 2, 1, 3).reshape(o, i)


def _check_block(shape, block) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    if len(shape) != 2 or len(block) != 2:
        raise ValueError(f"BSR needs a 2-d weight and a 2-d block, got shape {tuple(shape)} block {tuple(block)}")
    (o, i), (r, c) = (int(v) for v in shape), (int(v) for v in block)
    if r < 1 or c < 1 or o % r or i % c:
        raise ValueError(
            f"block {r}x{c} does not divide the weight {o}x{i} (rows {o} % {r}, columns {i} % {c} must be 0)"
        )
    return (o, i), (r, c)


def _as_2d(w: np.ndarray) -> np.ndarray:
    """A dense/matmul weight [O, I], or a 1x1 convolution's [O, I, 1, 1] as [O, I]."""
    w = np.asarray(w)
    if w.ndim == 4 and w.shape[2:] == (1, 1):
        return w.reshape(w.shape[:2])
    if w.ndim != 2:
        raise ValueError(f"block-sparse weights are 2-d [O, I] (or 1x1 conv [O, I, 1, 1]), got {w.shape}")
    return w


def _blocks(w: np.ndarray, block) -> np.ndarray:
    """[O, I] -> [O/R, I/C, R, C]."""
    (o, i), (r, c) = _check_block(w.shape, block)
    return w.reshape(o // r, r, i // c, c).transpose(0, 2, 1, 3)


def bsr_from_dense(w: np.ndarray, block) -> BSR:
    """BSR of ``w`` keeping every block with a nonzero (exact: ``to_dense`` gives ``w`` back)."""
    w = _as_2d(w)
    blocks = _blocks(w, block)
    keep = np.any(blocks != 0, axis=(2, 3))
    indptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int32)
    indices = np.nonzero(keep)[1].astype(np.int32)  # row-major: CSR order
    data = np.ascontiguousarray(blocks[keep], dtype=np.float32)
    return BSR(tuple(int(v) for v in w.shape), tuple(int(v) for v in block), data, indices, indptr)


def prune_blocks(w: np.ndarray, block, sparsity: float, norm: str = "l2") -> np.ndarray:
    """``w`` with its smallest blocks (by L2 or L1 norm) zeroed, so that ``round(sparsity * blocks)``
    blocks are zero. Ties go to the earlier block (row-major). Same shape as ``w`` ([O, I] or a 1x1
    convolution's [O, I, 1, 1])."""
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
    w2 = _as_2d(w)
    blocks = _blocks(w2, block).astype(np.float64)
    norms = (np.abs(blocks) if norm == "l1" else blocks * blocks).sum(axis=(2, 3)).ravel()
    n_zero = int(round(float(sparsity) * norms.size))
    drop = np.argsort(norms, kind="stable")[:n_zero]
    mask = np.ones(norms.size, bool)
    mask[drop] = False
    (o, i), (r, c) = w2.shape, block
    keep = np.repeat(np.repeat(mask.reshape(o // r, i // c), r, axis=0), c, axis=1)
    return np.where(keep, w2, 0).astype(w2.dtype, copy=False).reshape(np.shape(w))


# ---- target facts ---------------------------------------------------------------------------

@dataclass(frozen=True)
class VectorIsa:
    lanes: int  # float32 per vector register
    registers: int  # vector registers
    chunks: int  # parallel chunks (the target's cores)


def target_isa(target: Optional[tvm.target.Target] = None) -> VectorIsa:
    """Vector width and register count of ``target`` (default: the current one; none: AVX2)."""
    target = target or tvm.target.Target.current(allow_none=True)
    if target is None:
        return VectorIsa(8, 16, 2)
    cores = target.attrs.get("num-cores")
    triple = str(target.attrs.get("mtriple", "") or "")
    # No core count in the target: a host build runs on this machine's cores.
    chunks = int(cores) if cores else (os.cpu_count() or 4) if not triple else 4
    if triple.startswith(("aarch64", "arm64")):
        return VectorIsa(4, 32, chunks)
    if triple.startswith(("arm", "thumb")):
        return VectorIsa(4, 16, chunks)
    has = tvm.target.codegen.target_has_features
    if str(target.kind.name) == "llvm" and has(["avx512f"], target):
        return VectorIsa(16, 32, chunks)
    if str(target.kind.name) == "llvm" and has(["avx"], target):
        return VectorIsa(8, 16, chunks)
    return VectorIsa(4, 16, chunks)


def _isa(lanes, registers, chunks) -> VectorIsa:
    base = target_isa()
    return VectorIsa(lanes or base.lanes, registers or base.registers, chunks or base.chunks)


# ---- planning ----------------------------------------------------------------------------------

def _row_bounds(rows: List[list], parts: int) -> List[int]:
    """Block-row boundaries of ``parts`` contiguous groups of about equal work (kept blocks, +1
    per row for its stores); fewer groups when there are fewer rows."""
    cost = np.cumsum([len(r) + 1 for r in rows])
    parts = max(1, min(parts, len(rows)))
    bounds = [0]
    for g in range(1, parts):
        cut = int(np.searchsorted(cost, cost[-1] * g / parts)) + 1
        bounds.append(min(max(cut, bounds[-1] + 1), len(rows) - (parts - g)))
    bounds.append(len(rows))
    return bounds


def _even_bounds(n: int, parts: int) -> List[int]:
    return [g * n // parts for g in range(parts + 1)]


@dataclass(frozen=True)
class Plan:
    """How a kernel is cut: register tile and the work of each parallel chunk."""

    rs: int  # rows of a block per register tile (conv; dense: R)
    vec: int  # conv: pixels per tile (U vectors); dense: batch rows per tile
    q: int  # dense: partial accumulators per batch row (conv: 1)
    tiles: int  # pixel tiles per image / batch tiles
    tile_ranges: Tuple[Tuple[int, int], ...]  # per chunk: its tiles [lo, hi)
    row_ranges: Tuple[Tuple[int, int], ...]  # per chunk: its block rows [lo, hi)

    @property
    def chunks(self) -> int:
        return len(self.tile_ranges)


def conv_plan(bsr: BSR, pixels: int, isa: VectorIsa, rows_per_tile: int = 0, vectors: int = 0) -> Plan:
    r = bsr.block[0]
    budget = isa.registers - 4  # accumulators; the rest: activation vector(s), broadcast weight
    rs = rows_per_tile or max(d for d in range(1, r + 1) if r % d == 0 and d <= max(1, budget))
    u = vectors or max(1, min(6, budget // rs))
    vec = min(u * isa.lanes, pixels)
    tiles = -(-pixels // vec)
    rows = bsr.rows()
    if isa.chunks > 1 and tiles >= 2 * isa.chunks:  # pixels split: every chunk does all rows
        return Plan(rs, vec, 1, tiles, _ranges(_even_bounds(tiles, isa.chunks)),
                    ((0, len(rows)),) * isa.chunks)
    row_ranges = _ranges(_row_bounds(rows, isa.chunks))
    return Plan(rs, vec, 1, tiles, ((0, tiles),) * len(row_ranges), row_ranges)


def dense_plan(bsr: BSR, batch: int, isa: VectorIsa) -> Plan:
    r, c = bsr.block
    vecs = -(-(r * c) // isa.lanes)
    budget = max(1, isa.registers - 4)
    bt = max(1, min(batch, budget // vecs, 8))
    q = max(1, min(4, budget // (vecs * bt)))
    tiles = -(-batch // bt)
    row_ranges = _ranges(_row_bounds(bsr.rows(), isa.chunks))
    return Plan(r, bt, q, tiles, ((0, tiles),) * len(row_ranges), row_ranges)


def _pick(t, values):
    expr = tirx.const(int(values[-1]), "int32")
    for g in range(len(values) - 2, -1, -1):
        expr = tirx.Select(t == g, tirx.const(int(values[g]), "int32"), expr)
    return expr


# ---- TIR generation ----------------------------------------------------------------------------

def _ib():
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    return IRBuilder, T


def _flat(T, buf, shape):
    """A view of ``buf`` with another shape (same data, same element offset)."""
    return T.decl_buffer(shape, "float32", data=buf.data, elem_offset=buf.elem_offset)


def _f32(v):
    return tirx.const(v, "float32")


def _switch(T, var, lo: int, hi: int, emit):
    """Run ``emit(v)``'s code for ``var == v`` in [lo, hi): a balanced tree of ``var < mid``
    tests (a chain of ``var == v`` tests nests as deep as there are rows, and the simplifier's
    constraint stack makes that quadratic: 6 minutes for 128 rows).

    Each row's code is reached through this inside the tile loop, so none of its weight loads
    is loop-invariant code for LLVM to hoist: hoisted, the broadcast weights of a row (8 per
    block) were spilled to the stack, and register allocation over them made compile time grow
    with the square of the row's length."""
    if hi - lo == 1:
        emit(lo)
        return
    mid = (lo + hi) // 2
    with T.If(var < mid):
        with T.Then():
            _switch(T, var, lo, mid, emit)
        with T.Else():
            _switch(T, var, mid, hi, emit)


def _conv_ir(x, data, out, bsr: BSR, plan: Plan):
    IRBuilder, T = _ib()
    n_img, i_ch, h, w = (int(v) for v in x.shape)
    (o_ch, _), (r, c) = bsr.shape, bsr.block
    pixels, vec, rs = h * w, plan.vec, plan.rs
    rows = bsr.rows()
    nnz = bsr.nnz_blocks
    overlap = plan.tiles * vec != pixels  # the last tile is shifted back

    def tile(xf, df, of, n, br, r0, p0):
        lanes = T.ramp(0, 1, vec)
        # per row: statement-level buffers (block-level ones made CompactBufferAllocation and
        # FlattenBuffer take minutes on big kernels: every access is a region to relax)
        accs = [T.alloc_buffer((vec,), "float32", scope=_ACC_SCOPE) for _ in range(rs)]
        first = True
        for k, col in rows[br]:
            for cc in range(c):
                xv = T.bind(xf[n, col * c + cc, T.ramp(p0, 1, vec)])
                for j in range(rs):
                    term = T.broadcast(df[k, r0 + j, cc], vec) * xv
                    T.buffer_store(accs[j], term if first else accs[j][lanes] + term, [lanes])
                first = False
        for j in range(rs):
            value = T.broadcast(_f32(0.0), vec) if first else accs[j][lanes]
            T.buffer_store(of, value, [n, br * r + r0 + j, T.ramp(p0, 1, vec)])

    with IRBuilder() as ib:
        with T.serial(0, n_img) as n_loop:
            with T.serial(0, plan.chunks) as t_loop:
                with T.sblock("bsr_conv1x1_tiles"):
                    n = T.axis.spatial(n_img, n_loop)
                    t = T.axis.spatial(plan.chunks, t_loop)
                    T.reads(x[n, 0:i_ch, 0:h, 0:w], data[0:max(nnz, 1), 0:r, 0:c])
                    T.writes(out[n, 0:o_ch, 0:h, 0:w])
                    xf = _flat(T, x, (n_img, i_ch, pixels))
                    of = _flat(T, out, (n_img, o_ch, pixels))
                    p_lo, p_hi = _bounds(plan.tile_ranges, t)
                    r_lo, r_hi = _bounds(plan.row_ranges, t)
                    with T.serial(p_lo, p_hi) as p_o:
                        p0 = T.bind(T.min(p_o * vec, pixels - vec) if overlap else p_o * vec)
                        with T.serial(r_lo, r_hi) as br:
                            _switch(T, br, 0, len(rows), lambda b: [
                                tile(xf, data, of, n, b, r0, p0) for r0 in range(0, r, rs)])
    return ib.get()


def _ranges(bounds) -> Tuple[Tuple[int, int], ...]:
    return tuple((int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]))


def _bounds(ranges, t):
    """[lo, hi) of chunk ``t`` (constants when every chunk has the same range)."""
    lows, highs = [lo for lo, _ in ranges], [hi for _, hi in ranges]
    if len(set(lows)) == 1 and len(set(highs)) == 1:
        return int(lows[0]), int(highs[0])
    return _pick(t, lows), _pick(t, highs)


def _dense_ir(x, data, out, bsr: BSR, plan: Plan):
    IRBuilder, T = _ib()
    batch, _ = (int(v) for v in x.shape)
    (o_dim, _), (r, c) = bsr.shape, bsr.block
    rc, bt, q_n = r * c, plan.vec, plan.q
    rows = bsr.rows()
    nnz = bsr.nnz_blocks
    overlap = plan.tiles * bt != batch

    def tile(df, of, b0, br):
        accs = {}  # (q, b) -> the running sum, a let-bound SSA value
        for j, (k, col) in enumerate(rows[br]):
            q = j % q_n
            dv = df[T.ramp(k * rc, 1, rc)]
            for b in range(bt):
                if c == 1:
                    xs = T.broadcast(x[b0 + b, col], rc)
                else:
                    xc = x[b0 + b, T.ramp(col * c, 1, c)]
                    xs = tirx.Shuffle([xc] * r, list(range(rc)))  # R copies
                prev = accs.get((q, b))
                accs[(q, b)] = T.bind(dv * xs if prev is None else prev + dv * xs)
        for b in range(bt):
            parts = [accs[(q, b)] for q in range(q_n) if (q, b) in accs]
            if not parts:
                total = T.broadcast(_f32(0.0), rc)
            else:
                total = parts[0]
                for p in parts[1:]:
                    total = total + p
            if c > 1:  # sum the C columns of each row
                total = T.bind(total)
                summed = tirx.Shuffle([total], [rr * c for rr in range(r)])
                for cc in range(1, c):
                    summed = summed + tirx.Shuffle([total], [rr * c + cc for rr in range(r)])
                total = summed
            T.buffer_store(of, total, [b0 + b, T.ramp(br * r, 1, r)])

    with IRBuilder() as ib:
        with T.serial(0, plan.chunks) as t_loop:
            with T.sblock("bsr_dense_rows"):
                t = T.axis.spatial(plan.chunks, t_loop)
                T.reads(x[0:batch, 0:bsr.shape[1]], data[0:max(nnz, 1), 0:r, 0:c])
                T.writes(out[0:batch, 0:o_dim])
                df = _flat(T, data, (max(nnz, 1) * rc,))
                # stores through a view: region analysis of a fused (intermediate) output
                # cannot bound a vector index on the buffer itself
                of = _flat(T, out, (batch, o_dim))
                b_lo, b_hi = _bounds(plan.tile_ranges, t)
                r_lo, r_hi = _bounds(plan.row_ranges, t)
                with T.serial(b_lo, b_hi) as b_o:
                    b0 = T.bind(T.min(b_o * bt, batch - bt) if overlap else b_o * bt)
                    with T.serial(r_lo, r_hi) as br:
                        _switch(T, br, 0, len(rows), lambda b: tile(df, of, b0, b))
    return ib.get()


# ---- the TE ops --------------------------------------------------------------------------------

def _plain_buffers(inputs, out_shape) -> dict:
    """Dense buffers at offset 0 for ``te.extern`` (its default ones have a free element offset,
    and FuseTIR then cannot join the kernel's output with an epilogue's input)."""
    return {
        "in_buffers": [tirx.decl_buffer(t.shape, t.dtype, t.op.name, scope="global", layout=None) for t in inputs],
        "out_buffers": [tirx.decl_buffer(out_shape, "float32", "out", scope="global", layout=None)],
    }


def _check_data(bsr: BSR, data: te.Tensor):
    want = (max(bsr.nnz_blocks, 1), *bsr.block) if bsr.nnz_blocks == 0 else (bsr.nnz_blocks, *bsr.block)
    got = tuple(int(v) for v in data.shape)
    if got != want:
        raise ValueError(f"data placeholder {got} does not match the BSR's data {want}")
    if str(data.dtype) != "float32":
        raise ValueError(f"sparse kernels are float32, data is {data.dtype}")


def sparse_conv1x1(x: te.Tensor, bsr: BSR, data: te.Tensor, *, lanes: int = 0, registers: int = 0,
                   chunks: int = 0, rows_per_tile: int = 0, vectors: int = 0) -> te.Tensor:
    """1x1 convolution, NCHW float32 ``x [N, I, H, W]`` -> ``[N, O, H, W]`` with the BSR weight.

    ``data``: the placeholder of ``bsr.data`` (a runtime input); the pattern is baked in. The
    keyword arguments override what the current target says (vector lanes, registers, cores) and
    the register tile (rows x vectors); for tests and measurements."""
    n, i, h, w = (int(v) for v in x.shape)
    if i != bsr.shape[1]:
        raise ValueError(f"input has {i} channels, the weight {bsr.shape[1]}")
    _check_data(bsr, data)
    plan = conv_plan(bsr, h * w, _isa(lanes, registers, chunks), rows_per_tile, vectors)
    macs = n * h * w * bsr.nnz_blocks * bsr.block[0] * bsr.block[1]
    return te.extern(
        (n, bsr.shape[0], h, w), [x, data],
        lambda ins, outs: _conv_ir(ins[0], ins[1], outs[0], bsr, plan),
        name="bsr_conv1x1", dtype="float32", **_plain_buffers([x, data], (n, bsr.shape[0], h, w)),
        attrs={SPARSE_ATTR: "conv1x1", MACS_ATTR: int(macs)},
    )


def sparse_dense(x: te.Tensor, bsr: BSR, data: te.Tensor, *, lanes: int = 0, registers: int = 0,
                 chunks: int = 0) -> te.Tensor:
    """``x [B, I]`` -> ``[B, O] = x @ W.T`` (``W [O, I]`` the BSR weight), float32."""
    b, i = (int(v) for v in x.shape)
    if i != bsr.shape[1]:
        raise ValueError(f"input has {i} features, the weight {bsr.shape[1]}")
    _check_data(bsr, data)
    plan = dense_plan(bsr, b, _isa(lanes, registers, chunks))
    macs = b * bsr.nnz_blocks * bsr.block[0] * bsr.block[1]
    return te.extern(
        (b, bsr.shape[0]), [x, data],
        lambda ins, outs: _dense_ir(ins[0], ins[1], outs[0], bsr, plan),
        name="bsr_dense", dtype="float32", **_plain_buffers([x, data], (b, bsr.shape[0])),
        attrs={SPARSE_ATTR: "dense", MACS_ATTR: int(macs)},
    )


# ---- schedule ----------------------------------------------------------------------------------

def _extent(sch: s_tir.Schedule, loop) -> int:
    return int(sch.get(loop).extent)


def _root(sch: s_tir.Schedule):
    gv = sch.func_working_on
    func = sch.mod[gv] if gv is not None else sch.mod["main"]
    return sch.get_sblock(func.body.block.name_hint)


def find_sparse_block(sch: s_tir.Schedule):
    """The block carrying ``SPARSE_ATTR`` in ``sch``'s function, or None.

    ``te.create_prim_func`` makes the extern op's block the function's root block when the
    kernel is alone in its function; after FuseTIR with an epilogue it is a child of the root."""
    root = _root(sch)
    if SPARSE_ATTR in sch.get(root).annotations:
        return root
    for blk in sch.get_child_blocks(root):
        if SPARSE_ATTR in sch.get(blk).annotations:
            return blk
    return None


def _kernel_blocks(sch: s_tir.Schedule, block):
    """(the extern's block, the generated block inside it) for either of them."""
    if SPARSE_ATTR in sch.get(block).annotations:
        return block, sch.get_child_blocks(block)[0]
    outer = find_sparse_block(sch)
    if outer is None or not any(sch.get(b).same_as(sch.get(block)) for b in sch.get_child_blocks(outer)):
        raise ValueError("schedule_sparse: not a block made by sparse_conv1x1 / sparse_dense")
    return outer, block


def _epilogue_chain(sch: s_tir.Schedule, outer, output) -> list:
    """Root blocks after the kernel that read its output, or what they wrote (in order)."""
    root = _root(sch)
    if sch.get(root).same_as(sch.get(outer)):
        return []  # the kernel is the whole function
    root_blocks = sch.get_child_blocks(root)
    stmts = [sch.get(b) for b in root_blocks]
    start = next(i for i, s in enumerate(stmts) if s.same_as(sch.get(outer)))
    produced, chain = {output}, []
    for blk, stmt in zip(root_blocks[start + 1:], stmts[start + 1:]):
        if any(_same_buffer(rd.source, produced) for rd in stmt.reads):
            chain.append(blk)
            produced.update(wr.source for wr in stmt.writes)
    return chain


def _same_buffer(buf, bufs) -> bool:
    return any(buf.same_as(b) for b in bufs)


def _schedule_elementwise(sch: s_tir.Schedule, blk, lanes: int) -> None:
    """Parallel outer loops, vectors along the innermost contiguous run (the last two loops of
    NCHW fused: a channel's pixels)."""
    loops = sch.get_loops(blk)
    if not loops:
        return
    total = int(np.prod([_extent(sch, l) for l in loops]))
    inner = loops[-1]
    if len(loops) == 4:  # NCHW: a channel's pixels are contiguous
        inner = sch.fuse(loops[2], loops[3])
        loops = [loops[0], loops[1], inner]
    ext = _extent(sch, inner)
    width = next((v for v in range(min(ext, 2 * lanes), 0, -1) if ext % v == 0), 1)
    outer_loops = loops[:-1]
    if width > 1:
        if width < ext:
            o, i = sch.split(inner, [None, width])
            outer_loops = [*outer_loops, o]
            inner = i
        sch.vectorize(inner)
    if total >= _PARALLEL_MIN_ELEMS and outer_loops:
        sch.parallel(sch.fuse(*outer_loops) if len(outer_loops) > 1 else outer_loops[0])


def schedule_sparse(sch: s_tir.Schedule, block) -> None:
    """Schedule the kernel of ``block`` (the extern block with ``SPARSE_ATTR``, or the block in
    it) and its fused element-wise epilogue, in ``sch``.

    The kernel's register tiling and vectors are in its generated body; here: the chunk loop
    becomes parallel when the kernel does at least ``_PARALLEL_MIN_MACS`` multiply-adds. The
    epilogue blocks are inlined into the last one, which runs as its own parallel, vectorized
    loop nest over the (cache-warm) kernel output."""
    outer, inner = _kernel_blocks(sch, block)
    annotations = sch.get(outer).annotations
    macs = int(annotations.get(MACS_ATTR, 0))
    loops = sch.get_loops(inner)
    spatial = [l for l in loops if _extent(sch, l) > 0]
    work = int(np.prod([_extent(sch, l) for l in spatial])) if spatial else 1
    if macs >= _PARALLEL_MIN_MACS and work > 1:
        sch.parallel(sch.fuse(*spatial) if len(spatial) > 1 else spatial[0])
    output = sch.get(inner).writes[0].source
    chain = _epilogue_chain(sch, outer, output)
    for blk in chain[:-1]:
        try:
            sch.compute_inline(blk)
        except Exception:  # noqa: BLE001  (stays a loop nest of its own)
            _schedule_elementwise(sch, blk, target_isa().lanes)
    if chain:
        _schedule_elementwise(sch, chain[-1], target_isa().lanes)


# ---- helpers for tests and benchmarks ----------------------------------------------------------

def sparse_prim_func(kind: str, bsr: BSR, x_shape: Sequence[int], schedule: bool = True,
                     epilogue: Optional[str] = None, **options) -> tirx.PrimFunc:
    """A PrimFunc ``(x, data, [bias,] out)`` of the sparse kernel; ``epilogue``: None, "bias" or
    "bias_relu" (a bias per output channel added after it, then a relu), fused into the function
    as FuseOps would. Call under the target (``with target:``) or pass lanes/registers/chunks."""
    x = te.placeholder(tuple(x_shape), "float32", name="x")
    data = te.placeholder((max(bsr.nnz_blocks, 1), *bsr.block), "float32", name="data")
    op = {"conv1x1": sparse_conv1x1, "dense": sparse_dense}[kind]
    y = op(x, bsr, data, **options)
    args = [x, data]
    if epilogue:
        bias = te.placeholder((bsr.shape[0],), "float32", name="bias")
        args.append(bias)
        if kind == "conv1x1":
            y = te.compute(y.shape, lambda n, o, hh, ww: y[n, o, hh, ww] + bias[o], name="bias_add")
        else:
            y = te.compute(y.shape, lambda b, o: y[b, o] + bias[o], name="bias_add")
        if epilogue == "bias_relu":
            y = te.compute(y.shape, lambda *i: tirx.max(y(*i), _f32(0.0)), name="relu")
    func = te.create_prim_func([*args, y])
    if not schedule:
        return func
    sch = s_tir.Schedule(func)
    schedule_sparse(sch, find_sparse_block(sch))
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
