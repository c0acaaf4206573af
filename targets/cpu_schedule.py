"""Default CPU schedules for kernels without tuning records (``--tune-trials 0``).

TVM 0.27 offers two things for untuned CPU code: LegalizeOps' naive loop nests (one thread, no
vectors) and dlight's CPU rules, which only cover GEMV and row reductions (and were slower than
naive on the demo model). This dlight rule does what any hand schedule starts with, per block:
inline pads and elementwise ops, put spatial loops outside reductions, accumulate a tile of
several output rows (output channels of an NCHW conv, columns of a channels-last one) times
one or more vectors of the row in a local buffer that LLVM keeps in registers (up to 8 vector
registers; 12 for a weight's vectors, ``_tile_shape``), vectorize its rows, and run the outer
spatial loops in parallel. A softmax or norm runs row by row, or chunk by chunk of the
innermost axis when it reduces along another one.
Kernels without a reduction (pads, element-wise) keep their rows: parallel over the outer
loops, the innermost loop vectorized. A conv's pad stays a block of its own; on maps tall
enough it runs per chunk of output rows, inside the conv's parallel loop (``_pad_under``).
Numbers: docs/benchmarks.md.
"""

from __future__ import annotations

import math
from typing import List, Optional

import tvm
import tvm.sym
import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

# TVM 0.27 marks tirx.round vectorizable but not tirx.nearbyint, which relax.round (every int8
# requantize) legalizes to; both lower to llvm.nearbyint on CPUs. Unmarked, VectorizeLoop turns
# each vectorized requantize loop back into scalar code, which LLVM then re-vectorizes along
# the wrong loop with shuffles (a squeeze-excite epilogue ran 2x slower that way) or not at all.
if tvm.ir.Op.get("tirx.nearbyint").get_attr("TVectorizable") is None:
    tvm.ir.register_op_attr("tirx.nearbyint", "TVectorizable", True)

# Block annotation: the storage scope of the block's register tile (default "local"). TVM
# takes every "local" buffer from the workspace pool (an alloc/free pair per iteration of a
# parallel loop) and puts a "global" one under 1 KiB on the stack. From the stack LLVM keeps
# some tiles in registers (the packed dense kernels' row x column tiles: 1.05-1.64x faster)
# but splits others into scalars rebuilt with inserts at every step (a channels-last depthwise
# conv 2x slower, row reductions 2x slower), so kernels opt in.
TILE_SCOPE_ATTR = "tvm_compress.tile_scope"

# Block annotation of a conv whose output a pool reads in windows of this many rows, the
# conv's rows grouped by window (``packed_dense.packed_conv2d_nhwc``): ``_schedule_pooled``.
POOL_ATTR = "tvm_compress.pool_window"

# TVM's block annotation that MetaSchedule's AutoInline reads ("disable": never inline the
# block); the default schedule keeps such blocks too (a resize's row pass, ``separable_resize``).
NO_INLINE_ATTR = "meta_schedule.inline_rule"

# Widest output-row tile (16 floats = one AVX-512 / two AVX2 registers); narrower divisors of
# the row length are taken when 16 does not divide it (e.g. 14 -> 7).
_MAX_WIDTH, _MIN_WIDTH = 16, 4
# Loop copies at most for a concat's inputs along one axis (code size).
_MAX_PIECES = 256
# Side of a transpose's square tile (``_tile_transpose``).
_TRANSPOSE_TILE = 16


def target_cores() -> int:
    """Cores of the current target (its ``num-cores``; 2 where it names none)."""
    target = Target.current(allow_none=True)
    cores = int(target.attrs.get("num-cores", 0) or 0) if target is not None else 0
    return cores if cores > 0 else 2


def _extent(sch: s_tir.Schedule, loop) -> Optional[int]:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def vector_width(extent: Optional[int], lanes: int = _MAX_WIDTH) -> Optional[int]:
    """Width of the vectorized innermost loop: whole registers of ``lanes`` first (40 -> 8
    lanes, not 10), else the widest divisor that fits one register (20 -> 10 on 16 lanes, 5
    on 8: a 10-wide row on 8-lane AVX2 spills into a second, mostly empty register and was
    up to 12x slower), else any divisor down to _MIN_WIDTH."""
    if extent is None:
        return None
    for w in (_MAX_WIDTH, 8):
        if extent % w == 0 and extent >= w:
            return w
    for w in range(min(lanes, extent), _MIN_WIDTH - 1, -1):
        if extent % w == 0:
            return w
    for w in range(min(_MAX_WIDTH, extent), _MIN_WIDTH - 1, -1):
        if extent % w == 0:
            return w
    return None


def reads_within(sch: s_tir.Schedule, consumer, producer) -> bool:
    """True when every iteration of ``consumer`` reads ``producer``'s output inside its bounds.

    ``reverse_compute_at`` under a tile loop of the producer regenerates only the consumer
    iterations that read what a tile wrote. Iterations that read none of it (the border of a
    pad, the other inputs' part of a concat) would be dropped and their outputs never written,
    so such consumers must stay where they are."""
    outputs = [w.source for w in sch.get(producer).writes]
    block = sch.get(consumer)
    analyzer = tvm.sym.Analyzer()
    for iv in block.iter_vars:
        analyzer.bind(iv.var, iv.dom)
    regions = [r for r in block.reads if any(r.source.same_as(b) for b in outputs)]
    if not regions:
        return False
    for region in regions:
        for rng, dim in zip(region.region, region.source.shape):
            lo = analyzer.const_int_bound(rng.min).min_value
            hi = analyzer.const_int_bound(rng.min + rng.extent - 1).max_value
            if not isinstance(dim, tirx.IntImm) or lo < 0 or hi > int(dim) - 1:
                return False
    return True


def _into_init(sch: s_tir.Schedule, block) -> bool:
    """Whether ``block``'s producer has an ``init``: a reduction over unit axes only (a 1x1
    depthwise conv) has no reduce iterators left, and TVM then inlines a consumer into both its
    init and its update, applying the epilogue twice (MobileOne's scale branches)."""
    return any(sch.get(p).init is not None for p in sch.get_producers(block))


def _inline(sch: s_tir.Schedule, infos):
    """Inline elementwise producers and consumers, but keep padding as its own loop nest (a
    pad inlined into a convolution puts a bounds check in the innermost reduction loop) and
    blocks marked ``NO_INLINE_ATTR``."""
    changed = True
    while changed:
        changed = False
        for info in list(infos):
            if info.is_reduction() or info.is_data_pad(sch) \
                    or str(sch.get(info.block_rv).annotations.get(NO_INLINE_ATTR, "")) == "disable":
                continue
            for primitive in (sch.compute_inline, sch.reverse_compute_inline):
                if primitive == sch.reverse_compute_inline and _into_init(sch, info.block_rv):
                    continue
                try:
                    primitive(info.block_rv)
                except Exception:  # noqa: BLE001  (not inlinable here: keep the block)
                    continue
                infos.remove(info)
                changed = True
                break
    return infos


def _parallelize(sch: s_tir.Schedule, loops: list, min_chunks: Optional[int]):
    """Fuse leading loops until there are ``min_chunks`` iterations, then mark them parallel.
    (the parallel loop or None, how many of ``loops`` it took); None: stay serial."""
    if not loops or min_chunks is None:
        return None, 0
    take, total = [], 1
    for loop in loops:
        ext = _extent(sch, loop)
        if ext is None:
            break
        take.append(loop)
        total *= ext
        if total >= min_chunks:
            break
    if not take or total < 2:
        return None, 0
    par = sch.fuse(*take) if len(take) > 1 else take[0]
    sch.parallel(par)
    return par, len(take)


# Output rows accumulated at once: one FMA chain per vector register is bound by the FMA's
# latency (4 cycles) where two units could each start one per cycle. At most _ACCUMULATORS
# vector registers of accumulators, so that loads and broadcasts fit beside them (AVX2 and
# armv7 NEON have 16 registers).
_ACCUMULATORS = 8
# A channels-last conv's 2-D tile (``_tile_shape``): up to 12 accumulators (16 registers: 12 +
# weight vectors + a broadcast), and the cycles one reduction step waits for an FMA chain.
_TILE_REGISTERS = 12
_REGISTERS = 16
_STEP_LATENCY = 5.0
# Starting the thread pool costs microseconds: kernels writing fewer elements run serially
# (row reductions here, the int8 packs).
PARALLEL_MIN_ELEMS = 1 << 15
# Output rows per chunk below which a conv's pad stays one pass over the whole map.
_PAD_CHUNK_ROWS = 8


def _block_rows(sch: s_tir.Schedule, block, loops: list, per_row: int):
    """Split one spatial loop around the vectorized row so that the register tile holds several
    rows that share one vector load: an input whose innermost index follows the vectorized
    loop (a conv's input row) is loaded once per reduction step and feeds one FMA per row, the
    rows being the innermost spatial loop that input does not depend on (output channels for
    a dense weight, columns of a channels-last conv's map). Not simply the largest input: a 1x1
    conv's weight (384x384) outweighs its 10x10 map, and rows taken from the map's lines
    shared only a broadcast scalar (2.6x slower). The tile's shape, rows x vectors of the row,
    and a partial last tile where the rows do not divide the loop: ``_tile_shape``.
    (loops outside the tile, [the tile's loops]); ``loops`` unchanged when nothing can be
    split."""
    spatial, vector = _vector_reads(sch, block)
    vector = vector or sorted(sch.get(block).reads, key=lambda r: -_elements(r.source))[:1]
    # A conv window (several reduction loops) may end in a partial tile; a dense product's
    # single reduction loop must not: LLVM compiled its bounds-tested tiles erratically, some
    # (extent, rows) pairs 2x slower than whole tiles.
    window = sum(iv.iter_type == tirx.IterVar.CommReduce and not _is_one(iv.dom.extent)
                 for iv in sch.get(block).iter_vars) > 1
    for data in vector:
        used: list = []
        for rng in data.region:
            tvm_ffi.structural_walk(rng.min, [(tirx.Var, used.append)], order="post")
        # A weight's vectors (channels-last conv, matmul): 2-D tiles by their cost; an input's
        # (a conv's rows of NCHW pixels): rows of output channels (2-D: 0.7-0.9x there).
        weight = not any(v.same_as(s) for v in used for s in spatial[:-1])
        for i in range(len(loops) - 2, -1, -1):  # the last loop is the row itself
            if i >= len(spatial) or any(v.same_as(spatial[i]) for v in used):
                continue
            if weight:
                shape = _tile_shape(_extent(sch, loops[i]), _extent(sch, loops[-1]), per_row, window)
            else:
                shape = _tile_rows(_extent(sch, loops[i]), _extent(sch, loops[-1]), per_row, window)
            if shape is None:
                continue
            factor, more = shape
            outer, rows = sch.split(loops[i], factors=[None, factor])
            loops = [*loops[:i], outer, *loops[i + 1:]]
            if more == 1:
                return loops, [rows]
            outer_v, vectors = sch.split(loops[-1], factors=[None, more])
            return [*loops[:-1], outer_v], [rows, vectors]
    # None shares the vector load (a batch-1 dense: every loop indexes the weight): several
    # vectors of the row itself, sharing the broadcast input, still beat one FMA chain
    # (2048x512 dense: 4x).
    factor = _row_factor(_extent(sch, loops[-1]), _ACCUMULATORS // per_row) if loops else None
    if factor is not None:
        outer, rows = sch.split(loops[-1], factors=[None, factor])
        return [*loops[:-1], outer], [rows]
    return loops, []


# A weight streamed along the vector axis larger than this (half of a 1 MiB L2) is read again
# from L3 or memory for every tile row when the rows are the outer loops.
_STREAM_BYTES = 1 << 19


def _vector_reads(sch: s_tir.Schedule, block):
    """(the block's spatial vars, its reads whose innermost index follows the last spatial
    var, largest first): where the tile's vector loads come from."""
    stmt = sch.get(block)
    spatial = [iv.var for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
    reads = sorted(stmt.reads, key=lambda r: -_elements(r.source))
    return spatial, [r for r in reads if r.region and _uses(r.region[-1].min, spatial[-1])]


def _gathers(sch: s_tir.Schedule, block) -> bool:
    """Whether a read indexes an outer axis by the last spatial var: vectors along it would be
    gathered element by element (a softmax's rows)."""
    spatial, _ = _vector_reads(sch, block)
    return any(_uses(rng.min, spatial[-1]) for r in sch.get(block).reads for rng in r.region[:-1])


def _transposed_axis(sch: s_tir.Schedule, block) -> Optional[int]:
    """For a block without reduction whose largest read is indexed last by another of its
    spatial vars than its write (a transpose): that var's position among the spatial vars;
    else None."""
    stmt = sch.get(block)
    spatial = [iv.var for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
    reads = sorted((r for r in stmt.reads if r.region), key=lambda r: -_elements(r.source))
    if not reads or _uses(reads[0].region[-1].min, spatial[-1]):
        return None
    used = [i for i, v in enumerate(spatial[:-1]) if _uses(reads[0].region[-1].min, v)]
    return used[0] if len(used) == 1 else None


def _tile_transpose(sch: s_tir.Schedule, s_loops: list, axis: int, chunks: Optional[int]) -> None:
    """Square tiles of _TRANSPOSE_TILE: each reads that many contiguous runs of the input's
    last axis and writes as many of the output's. Row by row, the innermost loop wrote along
    a row that no whole vector divides while reading one element per cache line (wav2vec2's
    feature map, 512 x 3199, back to channels-first: 4.29 -> 0.41 ms)."""
    inner = s_loops[axis]
    ext = _extent(sch, inner)
    if ext is not None and ext % _TRANSPOSE_TILE == 0:
        src_o, src_i = sch.split(inner, factors=[None, _TRANSPOSE_TILE])
    else:
        src_o, src_i = inner, None
    dst_o, dst_i = sch.split(s_loops[-1], factors=[None, _TRANSPOSE_TILE])
    others = [l for i, l in enumerate(s_loops[:-1]) if i != axis]
    sch.reorder(*others, src_o, dst_o, *([src_i] if src_i is not None else []), dst_i)
    _parallelize(sch, [*others, src_o, dst_o], chunks)


def _lane_group(sch: s_tir.Schedule, block) -> Optional[int]:
    """The run of the vector axis within which every read index stays affine: a grouped
    channels-last conv reads input channel ``o // 8 * 8 + i`` for output channel ``o``, so
    vectors of ``o`` must not cross a multiple of 8, or each lane's load is a separate
    scalar (a 208-channel conv of 8-channel groups in 16-lane vectors ran 4x slower than
    onnxruntime). None when no read divides the vector axis by a constant."""
    stmt = sch.get(block)
    spatial = [iv.var for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
    if not spatial:
        return None
    groups: List[int] = []

    def visit(node):
        if isinstance(node.b, tirx.IntImm) and int(node.b) > 1 and _uses(node.a, spatial[-1]):
            groups.append(int(node.b))

    for region in stmt.reads:
        for rng in region.region:
            tvm_ffi.structural_walk(rng.min, [(tirx.FloorDiv, visit), (tirx.FloorMod, visit)], order="pre")
    return math.gcd(*groups) if groups else None


def _streams_weight(sch: s_tir.Schedule, block) -> bool:
    """Whether the read the vector loads come from depends on no spatial loop but the vector
    axis (a matmul's [K, N] weight, a channels-last conv's [KH, KW, C, O] one) and is large:
    then iterating over its column blocks outermost keeps one block in cache for all rows
    (a 197x384 by 384x1536 matmul: every row re-read the whole 2.4 MB weight)."""
    spatial, vector = _vector_reads(sch, block)
    if not vector or _elements(vector[0].source) * vector[0].source.dtype.bits // 8 < _STREAM_BYTES:
        return False
    return not any(_uses(rng.min, v) for rng in vector[0].region for v in spatial[:-1])


def _tile_rows(extent: Optional[int], vectors: Optional[int], per_row: int, ragged: bool = True):
    """(rows, vectors of the row) of a register tile of ``_ACCUMULATORS`` registers: the largest
    divisor of ``extent`` up to that many rows, or, where ``ragged`` allows a partial last
    tile, that many rows if that waits on fewer FMA latencies (26 rows: 13 tiles of 2 against
    6 of 4 and one of 2); rows that leave registers over take several vectors of the row."""
    max_rows = _ACCUMULATORS // per_row
    exact = _row_factor(extent, max_rows)
    if ragged and extent is not None and extent > max_rows:
        def steps(rows):
            return sum(max(_ACCUMULATORS, r * per_row) for r in [rows] * (extent // rows) + [extent % rows] if r)

        exact = exact if exact is not None and steps(exact) <= steps(max_rows) else max_rows
    if exact is None:
        return None
    return exact, _row_factor(vectors, max_rows // exact) or 1


def _tile_shape(extent: Optional[int], vectors: Optional[int], per_row: int, ragged: bool = True):
    """(rows, vectors of the row) of a register tile over a loop of ``extent`` rows that share
    each vector load and ``vectors`` vectors of ``per_row`` registers that share each broadcast
    (None when the loop has fewer than 2 rows). ``ragged``: whether the last tile may be partial.

    Per reduction step a tile issues one FMA per accumulator register and loads one broadcast
    per row and one weight vector per register of its vectors; a step takes the longest of
    the FMAs (two per cycle), the loads (broadcasts from L1, two per cycle; weight vectors
    one per cycle: a large weight's slice streams from L2) and one FMA latency with some slack
    (``_STEP_LATENCY``): fewer than about 10 accumulators wait on their own chains. The shape
    that takes fewest cycles over the whole loop wins, with at most ``_TILE_REGISTERS``
    accumulators that fit the 16 vector registers beside their weights and a broadcast (3
    columns x 2 vectors of 16 channels on AVX2, 17 registers, spilled: 2x slower). The
    rows need not divide the loop (13 or 26 columns): the last tile is then partial, its rows
    past the end skipped by a bounds test. 3x3 channels-last convs on AVX2 (znver3), against
    tiles of at most 8 registers with the same partial tiles: 96 channels at 52x52 (4 -> 6
    columns x 2 registers) 1.10x, 192 at 13x13 1.17x, 128 at 14x14 1.29x, 24 at 20x20 and
    208x208 (8 x 1 -> 4 x 3) 1.25-1.38x. 16 registers assumed (AVX2, armv7 NEON; AVX-512
    and AArch64 have 32)."""
    if extent is None or extent < 2:
        return None
    best = _best_tile(extent, vectors or 1, per_row, ragged)
    return None if best is None or best[1] * best[2] < 2 else (best[1], best[2])


def _best_tile(extent: int, vectors: int, per_row: int, ragged: bool):
    """(estimated cycles per reduction step over the whole loop, rows, vectors) of the
    cheapest tile (``_tile_shape``), or None."""
    best = None
    for more in (v for v in range(1, vectors + 1) if vectors % v == 0 and v * per_row <= _TILE_REGISTERS):
        for rows in range(1, min(extent, _TILE_REGISTERS // (more * per_row)) + 1):
            if (rows + 1) * more * per_row + 1 > _REGISTERS:
                break  # the accumulators, the weight vectors and a broadcast must stay in registers
            if extent % rows and not ragged:
                continue
            def step(r):
                return max(r * more * per_row / 2, r / 2 + more * per_row, _STEP_LATENCY)

            cycles = extent // rows * step(rows) + (step(extent % rows) if extent % rows else 0)
            key = (cycles * (vectors // more), extent % rows != 0, -rows)
            if best is None or key < best[0]:
                best = (key, rows, more)
    return None if best is None else (best[0][0], best[1], best[2])


# Padding a dense product's rows costs a cropped copy of its tile (and the padded rows' work,
# which the estimate counts): taken where the estimate falls by more than this, on products of
# at least this many outputs (below, a kernel of a few microseconds), and at most this many rows.
_PAD_ROWS_GAIN = 1.1
_PAD_ROWS_MIN_OUTPUTS = 1 << 12
_ROW_PAD = 8


def dense_rows(rows: int, columns: int, lanes: int) -> int:
    """Rows a dense product of ``rows`` x ``columns`` outputs should run on in this schedule's
    whole register tiles: ``rows``, unless its best tile holds a single row and up to
    ``_ROW_PAD`` more rows give one of several rows that the tile estimate (``_tile_shape``)
    puts ``_PAD_ROWS_GAIN`` lower (49 rows of 2048 columns on AVX2: 16-wide vectors of 2
    registers allow at most 6 rows and no divisor of 49 but 1 fits, so tiles of one row; 50
    rows take 5: 1.9x faster). Counts that already have a tile of several rows stay: going
    from 4 to 5 or 6 rows measured 0.99-1.09x, against the estimate's 1.25x."""
    width = vector_width(columns, lanes)
    if width is None or rows < 2 or rows * columns < _PAD_ROWS_MIN_OUTPUTS:
        return rows
    per_row, vectors = -(-width // lanes), columns // width
    unpadded = _best_tile(rows, vectors, per_row, ragged=False)
    if unpadded is not None and unpadded[1] >= 2:
        return rows
    costs = {}
    for padded in range(rows + 1, rows + _ROW_PAD + 1):
        best = _best_tile(padded, vectors, per_row, ragged=False)
        if best is not None and best[1] >= 2:
            costs[padded] = best[0]
    if not costs:
        return rows
    padded = min(costs, key=lambda r: (costs[r], r))
    return padded if unpadded is None or unpadded[0] > _PAD_ROWS_GAIN * costs[padded] else rows


def _is_one(expr) -> bool:
    return isinstance(expr, tirx.IntImm) and int(expr) == 1


def _row_factor(extent: Optional[int], max_rows: int) -> Optional[int]:
    """The largest tile row count from ``max_rows`` down to 2 that divides ``extent``."""
    return next((f for f in range(max_rows, 1, -1) if extent is not None and extent % f == 0 and extent >= f), None)


def _reduced_axis(sch: s_tir.Schedule, info) -> Optional[int]:
    """The input axis a one-axis reduction block runs along (None: several, or none found)."""
    stmt = sch.get(info.block_rv)
    red = [iv.var for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    if len(red) != 1:
        return None
    found = {i for r in stmt.reads for i, rng in enumerate(r.region) if _uses(rng.min, red[0])}
    return found.pop() if len(found) == 1 else None


def _chunk(extent: Optional[int], lanes: int) -> Optional[int]:
    """Elements of the innermost axis per step of a strided reduction: the largest divisor
    of at most 8 registers, whole registers preferred (2100 -> 60: 7.5 registers of 8)."""
    if extent is None:
        return None
    fits = [d for d in range(lanes, 8 * lanes + 1) if extent % d == 0]
    whole = [d for d in fits if d % lanes == 0]
    return (whole or fits or [None])[-1]


def _uses(expr, var) -> bool:
    found: list = []
    tvm_ffi.structural_walk(expr, [(tirx.Var, found.append)], order="post")
    return any(v.same_as(var) for v in found)


_CMP = (tirx.LT, tirx.LE, tirx.GT, tirx.GE)


def _cut_points(sch: s_tir.Schedule, block, axis: int = -1) -> List[int]:
    """Where the comparisons of the index of loop ``axis`` (or of its quotient by a constant)
    with constants change value (a concat along that axis: ``c < 24``, ``c < 48``...; an
    unrolled sequence's steps stacked and reshaped: ``1 <= c // 256``): between two cuts every
    element reads the same input."""
    blk = sch.get(block)
    if len(blk.iter_vars) != len(sch.get_loops(block)):
        return []
    var, extent = blk.iter_vars[axis].var, _extent(sch, sch.get_loops(block)[axis])
    cuts = set()

    def visit(node):
        a, b = node.a, node.b
        flip = isinstance(a, tirx.IntImm)
        if flip:
            a, b = b, a
        step = 1
        if isinstance(a, tirx.FloorDiv) and isinstance(a.b, tirx.IntImm) and a.b.value > 0:
            a, step = a.a, int(a.b.value)
        if not (isinstance(a, tirx.Var) and a.same_as(var) and isinstance(b, tirx.IntImm)):
            return
        # var < c, var >= c: cut at c; var <= c, var > c: at c + 1 (sides swap when flipped);
        # var // d compared with c: at that times d.
        strict_low = isinstance(node, (tirx.LT, tirx.GE)) != flip
        cuts.add((int(b.value) + (0 if strict_low else 1)) * step)

    tvm_ffi.structural_walk(blk.body, [(kind, visit) for kind in _CMP], order="pre")
    return sorted(c for c in cuts if extent is not None and 0 < c < extent)


def _partition_at(sch: s_tir.Schedule, loop, cuts: List[int]) -> None:
    """One copy of ``loop`` per range between ``cuts``: the comparisons are constant in each
    and simplified away."""
    bounds = [0, *cuts, _extent(sch, loop)]
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    sch.loop_partition(loop, [*sizes[:-1], None])


def _vectorize_pieces(sch: s_tir.Schedule, loop, cuts: List[int], lanes: int) -> bool:
    """Vectorize ``loop`` in vectors that no cut crosses and split the vectors' loop at the
    cuts: in each piece the conditions are constant and simplified away (a channels-last
    concat of 4 x 24 channels: 1.75x faster than vectors that select per lane). False when
    the cuts leave no vector of 4 or more (a pad's one-column borders)."""
    extent = _extent(sch, loop)
    step = math.gcd(extent, *cuts)
    width = vector_width(step, lanes) if step >= _MIN_WIDTH else None
    if width is None:
        return False
    outer, inner = sch.split(loop, [None, width])
    sch.vectorize(inner)
    bounds = [0, *(c // width for c in cuts), extent // width]
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    sch.loop_partition(outer, [*sizes[:-1], None])
    return True


def _work(sch: s_tir.Schedule, loops) -> int:
    """Iterations of a block's loop nest (spatial times reduction)."""
    n = 1
    for loop in loops:
        n *= _extent(sch, loop) or 1
    return n


def _elements(buf) -> int:
    n = 1
    for d in buf.shape:
        n *= int(d) if isinstance(d, tirx.IntImm) else 1
    return n


def _pad_producer(sch: s_tir.Schedule, block, infos):
    """The data pad ``block`` reads (kept a block of its own by ``_inline``), or None."""
    pads = [i.block_rv for i in infos if i.is_data_pad(sch)]
    for producer in sch.get_producers(block):
        if any(sch.get(producer).same_as(sch.get(p)) for p in pads):
            return producer
    return None


def _partitions_pad(sch: s_tir.Schedule, block, pad, axis: int) -> bool:
    """Whether chunks of the ``axis``-th spatial loop of ``block`` read disjoint parts of
    ``pad``: the loop's var indexes the read, and only dimensions read one element at a time
    (a depthwise conv's channel; not a window's rows, nor an output channel of a dense conv,
    whose every chunk reads the whole pad)."""
    iter_vars = sch.get(block).iter_vars
    spatial = [iv.var for iv in iter_vars if iv.iter_type == tirx.IterVar.DataPar]
    reduced = [iv.var for iv in iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    source = sch.get(pad).writes[0].source
    reads = [r for r in sch.get(block).reads if r.source.same_as(source)]
    if axis >= len(spatial) or len(reads) != 1:
        return False
    dims = [rng for rng in reads[0].region if _uses(rng.min, spatial[axis])]
    # a window's row is the output row plus a reduction var (a point per block iteration)
    return bool(dims) and all(_is_one(rng.extent) and not any(_uses(rng.min, r) for r in reduced)
                              for rng in dims)


def _chunked(sch: s_tir.Schedule, block, pad, rows: list, chunks: int) -> Optional[list]:
    """``rows`` with the loop where the product of extents reaches ``chunks`` split into
    (the iterations the parallel loop needs, chunks of the rest); None where a chunk would
    have fewer than _PAD_CHUNK_ROWS rows of a window (a pad per chunk copies the window's
    extra rows again for every chunk: a 20x20 map's 3x3 conv in chunks of 3 rows ran 15 %
    slower). Chunks of a loop whose pads do not overlap (a depthwise conv's channels) may be
    any size: as one pass over the whole map first (serial when small), the pad made the other
    core read its half from the first core's cache (the classifier's 5x5 depthwise convs on
    3-6 x 96 maps 1.9-2.6x slower on two threads than on one; with larger maps, padded in
    parallel, per chunk still 1.3-1.8x faster)."""
    total = 1
    for i, loop in enumerate(rows):
        ext = _extent(sch, loop)
        if ext is None:
            return None
        if total * ext >= chunks:
            need = -(-chunks // total)
            if ext < _PAD_CHUNK_ROWS * need and not _partitions_pad(sch, block, pad, i):
                return None
            outer, inner = sch.split(loop, factors=[need, None])
            return [*rows[:i], outer, inner, *rows[i + 1:]]
        total *= ext
    return None


def _pad_under(sch: s_tir.Schedule, pad, loop, lanes: int) -> None:
    """The pad computed per iteration of ``loop`` (a chunk of output rows): the padded rows
    that chunk reads, written and read again while they are in cache, instead of a pass over
    the whole padded map first (a 160x160x16 depthwise conv copied 1.7 MB that way, 37 % of
    its kernel; per chunk of 20 rows it ran 1.1-1.6x faster, the first 320x320 conv 1.12x)."""
    sch.compute_at(pad, loop, preserve_unit_loops=True)
    inner = sch.get_loops(pad)[-1]
    width = vector_width(_extent(sch, inner), lanes)
    if width is not None:
        sch.vectorize(sch.split(inner, [None, width])[1] if _extent(sch, inner) > width else inner)


class CPUFallback(CPUScheduleRule):
    """Parallel outer spatial loops, vectorized register tile on the innermost spatial loop.

    ``lanes``: float32 lanes of one vector register (sizes the tile's rows)."""

    def __init__(self, num_cores: int = 2, lanes: int = 16):
        self.num_cores = num_cores
        self.lanes = lanes

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        if func.attrs is not None and func.attrs.get("tirx.is_scheduled", False):
            return None
        for schedule in (self._schedule_pooled, self._schedule_rows, self._schedule):
            try:
                sch = schedule(func, target)
            except Exception:  # noqa: BLE001  (a block this rule does not understand stays naive)
                continue
            if sch is not None:
                return sch
        return None

    def _schedule_pooled(self, func, target):
        """A conv with its pool (``POOL_ATTR``) and the element-wise ops after the pool: in
        parallel over the pooled rows, each computing the conv rows its windows read (a
        register tile of columns x vectors, as ``_schedule`` tiles a conv) and then the pool
        and its epilogue on them while they are in cache. The conv's output never goes to
        memory as a whole, and the pool is no kernel of its own."""
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        conv = [i.block_rv for i in infos if POOL_ATTR in sch.get(i.block_rv).annotations]
        if len(conv) != 1:
            return None
        (conv,) = conv
        infos = _inline(sch, infos)
        *_, last = infos
        if last.is_reduction() or sch.get(last.block_rv).same_as(sch.get(conv)):
            return None
        out = last.block_rv
        loops = sch.get_loops(out)
        if len(loops) < 3 or any(_extent(sch, l) is None for l in loops):
            return None  # [(n,) pooled rows, pooled columns, channels]: unit loops dropped
        cores = int(target.attrs.get("num-cores", self.num_cores) or self.num_cores)
        *rows, _, channels = loops
        par = sch.fuse(*rows) if len(rows) > 1 else rows[0]
        if _extent(sch, par) >= cores and _work(sch, sch.get_loops(conv)) >= PARALLEL_MIN_ELEMS:
            sch.parallel(par)
        self._vectorize_row(sch, channels)
        sch.compute_at(conv, par, preserve_unit_loops=True)
        kinds = ["R" if iv.iter_type == tirx.IterVar.CommReduce else "S" for iv in sch.get(conv).iter_vars]
        under = sch.get_loops(conv)[-len(kinds):]
        s_loops = [l for l, k in zip(under, kinds) if k == "S"]
        r_loops = [l for l, k in zip(under, kinds) if k == "R"]
        width = vector_width(_extent(sch, s_loops[-1]), self.lanes)
        if width is None or not r_loops:
            return None
        outer, inner = sch.split(s_loops[-1], factors=[None, width])
        rows, block_inner = _block_rows(sch, conv, [*s_loops[:-1], outer], -(-width // self.lanes))
        sch.reorder(*rows, *r_loops, *block_inner, inner)
        for loop in block_inner:
            sch.unroll(loop)
        local = sch.cache_write(conv, 0, "local")
        sch.reverse_compute_at(local, rows[-1], preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(local)[-1])
        sch.vectorize(sch.get_loops(conv)[-1])
        sch.decompose_reduction(conv, r_loops[0])
        return sch

    def _schedule_rows(self, func, target):
        """Kernels of several blocks that reduce along rows (softmax, layer norm, a mean over
        the last axis: every reduction writes fewer dimensions than the kernel's output): every
        block runs under the last block's outer loops, in parallel over rows. A reduction along
        a row whose length whole vectors divide accumulates lane-wise partial results in
        vectors (``rfactor``), then adds up the lanes; spatial blocks vectorize their row, a
        row no vector divides in whole vectors and a scalar tail. Blocks stay blocks: an
        exponential inlined into both the sum and the division would be computed twice."""
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or len(infos) < 2 or infos[-1].is_reduction():
            return None
        last = sch.get(infos[-1].block_rv)
        loops = sch.get_loops(infos[-1].block_rv)
        if len(loops) < 2 or any(k != "S" for k in infos[-1].dom_kind()):
            return None
        rank = len(last.writes[0].source.shape)
        reductions = [i for i in infos[:-1] if i.is_reduction()]
        if not reductions or any(len(sch.get(i.block_rv).writes[0].source.shape) >= rank for i in reductions):
            return None  # a matmul or conv with its epilogue: the tiles of _schedule
        if _elements(last.writes[0].source) < PARALLEL_MIN_ELEMS:
            return None  # measured no faster than the naive loops when it cannot go parallel
        axes = {_reduced_axis(sch, info) for info in reductions}
        if axes != {rank - 1}:
            # Under a row loop, a reduction along another axis would run in full at every row.
            return self._schedule_strided(sch, infos, axes.pop(), target) if len(axes) == 1 else None
        lane_wise = [self._lane_wise(sch, info) for info in reductions]
        lane_wise = [b for b in lane_wise if b is not None]
        cores = int(target.attrs.get("num-cores", self.num_cores) or self.num_cores)
        row, _ = _parallelize(sch, sch.get_loops(infos[-1].block_rv)[:-1], 4 * cores)
        if row is None:
            return None
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        for block in reversed(blocks[:-1]):
            sch.compute_at(block, row, preserve_unit_loops=True)
        for block in blocks:
            stmt = sch.get(block)
            if any(stmt.same_as(sch.get(b)) for b in lane_wise):
                nest = sch.get_loops(block)
                # compute_at put the lane loop first under the row and the loop over chunks of
                # the row last: chunks outside, so that each step loads one vector
                at = [sch.get(l).same_as(sch.get(row)) for l in nest].index(True)
                lane, chunk = nest[at + 1], nest[-1]
                sch.reorder(chunk, lane)
                sch.vectorize(lane)  # while the block still has its init
                sch.decompose_reduction(block, chunk)
            elif all(iv.iter_type == tirx.IterVar.DataPar for iv in stmt.iter_vars):
                self._vectorize_row(sch, sch.get_loops(block)[-1])
        return sch

    def _schedule_strided(self, sch: s_tir.Schedule, infos, axis: Optional[int], target):
        """Reductions along one axis that is not the innermost (a softmax over the 16 bins of
        YOLOv8's box head, ``[1, 16, 4, 2100]`` along axis 1): every stage runs on a chunk of
        the innermost axis, the chunk vectorized and the reduced axis looped outside it, in
        parallel over chunks and the other outer axes."""
        last = infos[-1].block_rv
        loops = sch.get_loops(last)
        stmt = sch.get(last)
        if axis is None or len(loops) != len(stmt.iter_vars):
            return None
        # The loop of each output axis (normalize_prim_func drops unit loops: positions differ).
        at_axis = [next((j for j, iv in enumerate(stmt.iter_vars) if _uses(rng.min, iv.var)), None)
                   for rng in stmt.writes[0].region]
        k = at_axis[axis]
        chunk = _chunk(_extent(sch, loops[-1]), self.lanes)
        if k is None or k >= len(loops) - 1 or at_axis[-1] != len(loops) - 1 or chunk is None:
            return None
        outer, inner = sch.split(loops[-1], factors=[None, chunk])
        sch.reorder(*loops[:k], *loops[k + 1:-1], outer, loops[k], inner)
        cores = int(target.attrs.get("num-cores", self.num_cores) or self.num_cores)
        _parallelize(sch, sch.get_loops(last)[:-2], 4 * cores)
        at = sch.get_loops(last)[-3]
        for info in reversed(infos[:-1]):
            sch.compute_at(info.block_rv, at, preserve_unit_loops=True)
        for info in infos:
            block = info.block_rv
            nest = sch.get_loops(block)
            under = nest[[sch.get(l).same_as(sch.get(at)) for l in nest].index(True) + 1:]
            if info.is_reduction():
                *spatial, red = under
                sch.reorder(red, *spatial)
                sch.vectorize(spatial[-1])
                sch.decompose_reduction(block, red)
            else:
                sch.vectorize(under[-1])
        return sch

    def _split_reduction(self, sch: s_tir.Schedule, block, s_loops, r_loops, cores: int) -> bool:
        """A long reduction to one element (the statistics of a norm over a whole map: a
        ConvTasNet's global layer norm sums 1M elements, over one axis or several) in ``cores`` parallel chunks of
        lane-wise partial sums (``rfactor``), added up after. Row by row it was one serial
        scalar loop. False (nothing changed) where it does not apply."""
        loops = sch.get_loops(block)
        extents = [_extent(sch, l) for l in r_loops]
        if None in extents or not all(sch.get(a).same_as(sch.get(b)) for a, b in zip(loops[-len(r_loops):], r_loops)):
            return False  # the reduction loops innermost: fused, one run along contiguous rows
        ext = math.prod(extents)
        if ext < PARALLEL_MIN_ELEMS or ext % (cores * self.lanes) or any(_extent(sch, l) != 1 for l in s_loops):
            return False
        stmt = sch.get(block)
        if stmt.init is None or not (isinstance(stmt.body, tirx.BufferStore) and isinstance(stmt.body.value, tirx.Add)):
            return False  # a sum (rfactor takes others, and raises on some: the kernel left unscheduled)
        var = stmt.iter_vars[-1].var
        reads = [r for r in stmt.reads if r.region and _uses(r.region[-1].min, var)]
        if not reads or any(_uses(rng.min, var) for r in reads for rng in r.region[:-1]):
            return False  # not along the inputs' innermost axis: no vector loads
        fused = sch.fuse(*r_loops) if len(r_loops) > 1 else r_loops[0]
        part, step, lane = sch.split(fused, factors=[cores, None, self.lanes])
        sch.reorder(part, lane, step)
        factored = sch.rfactor(sch.fuse(part, lane), 0)
        chunk_lane, step = sch.get_loops(factored)[-2:]
        chunk, lane = sch.split(chunk_lane, factors=[cores, self.lanes])
        sch.reorder(chunk, step, lane)
        sch.parallel(chunk)
        sch.vectorize(lane)  # while the block still has its init
        sch.decompose_reduction(factored, step)
        return True

    def _lane_wise(self, sch: s_tir.Schedule, info):
        """Split a reduction over the innermost axis of its input into lane-wise partial
        results (``rfactor``; the new block, or None when the row has no whole vectors)."""
        block = info.block_rv
        stmt = sch.get(block)
        if info.dom_kind().count("R") != 1 or info.dom_kind()[-1] != "R":
            return None
        var = stmt.iter_vars[-1].var
        reads = [r for r in stmt.reads if r.region]
        if not any(_uses(r.region[-1].min, var) for r in reads) or \
                any(_uses(rng.min, var) for r in reads for rng in r.region[:-1]):
            return None  # along a strided axis (softmax over NCHW channels): no vector loads
        inner = sch.get_loops(block)[-1]
        extent = _extent(sch, inner)
        width = vector_width(extent, self.lanes)
        if width is None or width < min(8, self.lanes) or extent < 2 * width:
            return None  # partial vectors (6625 = 5 x 1325) measured 5x slower than scalar sums
        lane = sch.split(inner, factors=[None, width])[1]
        return sch.rfactor(lane, len(stmt.writes[0].source.shape))

    def _vectorize_row(self, sch: s_tir.Schedule, loop) -> None:
        extent = _extent(sch, loop)
        width = vector_width(extent, self.lanes)
        if width is None and extent is not None and extent > 2 * self.lanes:
            # whole vectors, then a scalar tail (197 scores of a ViT's attention)
            width = self.lanes
            loop = sch.loop_partition(loop, [extent - extent % width, None])[0]
        if width is not None:
            sch.vectorize(sch.split(loop, factors=[None, width])[1])

    def _schedule(self, func, target):
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        infos = _inline(sch, infos)
        cores = int(target.attrs.get("num-cores", self.num_cores) or self.num_cores)
        chained = sum("R" in info.dom_kind() for info in infos) > 1
        reductions: List[tuple] = []
        for info in infos:
            block = info.block_rv
            kinds = info.dom_kind()
            loops = sch.get_loops(block)
            if len(loops) != len(kinds) or "O" in kinds:
                continue
            # A block with little work runs serially: waking the pool costs more than it saves.
            chunks = 4 * cores if _work(sch, loops) >= PARALLEL_MIN_ELEMS else None
            s_loops = [l for l, k in zip(loops, kinds) if k == "S"]
            r_loops = [l for l, k in zip(loops, kinds) if k == "R"]
            if not s_loops:
                continue
            width = vector_width(_extent(sch, s_loops[-1]), self.lanes)
            if r_loops:
                if chained and _gathers(sch, block):
                    # a norm's statistics on rows (a softmax): for _schedule_rows, else naive
                    return None
                group = _lane_group(sch, block)
                if group is not None and width is not None:
                    width = vector_width(math.gcd(_extent(sch, s_loops[-1]), group), self.lanes) or width
                if width is None and self._split_reduction(sch, block, s_loops, r_loops, cores):
                    continue
                if width is None:
                    sch.reorder(*s_loops, *r_loops)
                    _parallelize(sch, s_loops, chunks)
                    reductions.append((block, r_loops[0], None))
                    continue
                outer, inner = sch.split(s_loops[-1], factors=[None, width])
                per_row = -(-width // self.lanes)  # vector registers per row
                rows, block_inner = _block_rows(sch, block, [*s_loops[:-1], outer], per_row)
                streams = len(rows) > 1 and _streams_weight(sch, block)
                if streams:
                    rows = [rows[-1], *rows[:-1]]  # column blocks outermost: each stays in cache
                sch.reorder(*rows, *r_loops, *block_inner, inner)
                for loop in block_inner:
                    sch.unroll(loop)
                # A conv's pad per chunk of output rows (see _pad_under) on maps tall enough;
                # not where column blocks are outermost (each chunk would pad the whole map).
                pad = None if streams else _pad_producer(sch, block, infos)
                split = _chunked(sch, block, pad, rows, chunks) if pad is not None and chunks is not None else None
                rows = split or rows
                par, taken = _parallelize(sch, rows, chunks)
                if split is not None and par is not None and taken < len(rows):
                    try:
                        _pad_under(sch, pad, par, self.lanes)
                    except Exception:  # noqa: BLE001  (the pad stays one pass over the map)
                        pass
                # A fuse that took the tile loop leaves the fused loop as the tile's.
                tile = par if taken == len(rows) else rows[-1]
                reductions.append((block, r_loops[0], tile))
            elif len(s_loops) > 1 and (width is None or width & (width - 1)) \
                    and _transposed_axis(sch, block) is not None:
                _tile_transpose(sch, s_loops, _transposed_axis(sch, block), chunks)
            elif len(s_loops) > 1 and _extent(sch, s_loops[-1]) is not None:
                # Rows stay rows: fusing every loop would put a div/mod per element into the
                # index (a pad of a 160x160 map: most of the conv's time). A row whose length
                # no vector width divides (a pad to 82) is left to LLVM's loop vectorizer.
                rows = s_loops[:-1]
                cuts = _cut_points(sch, block)
                # (before the block is copied into pieces) Only where each piece reads an input
                # of its own, as a concat's do: a pad's borders stay in its loops.
                inputs = len({r.source.name for r in sch.get(block).reads})
                outer_cuts = [c if len(c) < inputs else [] for c in
                              (_cut_points(sch, block, axis) for axis in range(len(rows)))]
                if cuts and _vectorize_pieces(sch, s_loops[-1], cuts, self.lanes):
                    pass
                elif width is not None and _extent(sch, s_loops[-1]) > width:
                    outer, inner = sch.split(s_loops[-1], factors=[None, width])
                    sch.vectorize(inner)
                    rows.append(outer)
                if chunks is None:
                    # A serial concat along an outer axis (the steps of an unrolled RNN): one
                    # loop per input instead of a chain of selects per element. Inner loops
                    # first: a partition copies the loops under it.
                    for loop, cuts in reversed(list(zip(s_loops, outer_cuts))):
                        if 0 < len(cuts) <= _MAX_PIECES:
                            _partition_at(sch, loop, cuts)
                else:
                    _parallelize(sch, rows, chunks)
            else:
                fused = sch.fuse(*s_loops) if len(s_loops) > 1 else s_loops[0]
                ext = _extent(sch, fused)
                w = vector_width(ext, self.lanes)
                if w is not None and ext > w:
                    outer, inner = sch.split(fused, factors=[None, w])
                    if chunks is not None:
                        sch.parallel(outer)
                    sch.vectorize(inner)
                elif ext is not None and ext > 1 and chunks is not None:
                    sch.parallel(fused)
        for block, r_loop, tile_loop in reductions:
            if tile_loop is None:
                sch.decompose_reduction(block, r_loop)
                continue
            # Accumulate one output tile in a local buffer (registers), write it back once.
            scope = str(sch.get(block).annotations.get(TILE_SCOPE_ATTR, "local"))
            local = sch.cache_write(block, 0, scope)
            sch.reverse_compute_at(local, tile_loop, preserve_unit_loops=True)
            # Bias / activation epilogues run on the tile while it is hot; a consumer larger
            # than the tile's producer (pad, concat) stays a loop nest of its own.
            for consumer in sch.get_consumers(local):
                # another reduction (a variance after its mean) keeps its own tile loops
                if not reads_within(sch, consumer, local) or any(
                        iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(consumer).iter_vars):
                    continue
                try:
                    sch.reverse_compute_at(consumer, tile_loop, preserve_unit_loops=True)
                    sch.vectorize(sch.get_loops(consumer)[-1])
                except Exception:  # noqa: BLE001  (epilogue stays a separate loop nest)
                    pass
            sch.vectorize(sch.get_loops(local)[-1])
            # Vectorize while the block still has its init (a "reduction block" for the checks).
            sch.vectorize(sch.get_loops(block)[-1])
            sch.decompose_reduction(block, r_loop)
        return sch


def cpu_default_schedule(lanes: int = 16):
    """The passes CPU families run on kernels that have no tuning records; ``lanes``: float32
    lanes of the target's vector registers."""
    from .default_schedule import ResilientDefaultSchedule

    return [ResilientDefaultSchedule(CPUFallback(lanes=lanes))]
