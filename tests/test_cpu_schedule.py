"""The default CPU schedule: parallel + vectorized kernels that still compute the model."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.s_tir import dlight as dl

import tvm_compress
from tvm_compress.pipeline import lowering_passes
from tvm_compress.targets import get_target
from tvm_compress.targets.cpu_schedule import CPUFallback
from tvm_compress.verify import ort_run


def _loop_kinds(func) -> set:
    import tvm_ffi

    kinds = set()
    tvm_ffi.structural_walk(func.body, [(tvm.tirx.For, lambda n: kinds.add(n.kind))], order="post")
    return kinds


def test_conv_kernels_get_parallel_and_vector_loops(demo_model):
    prepared = tvm_compress.prepare_onnx(demo_model, {"input": (1, 1, 28, 28)})
    target = get_target("x86").tvm_target()
    with target:
        low = tvm.transform.Sequential(lowering_passes())(prepared.to_relax())
        sched = dl.ApplyDefaultSchedule(CPUFallback())(low)
    convs = [gv.name_hint for gv, f in sched.functions.items()
             if isinstance(f, tvm.tirx.PrimFunc) and "conv2d" in gv.name_hint]
    assert len(convs) == 3
    for name in convs:
        kinds = _loop_kinds(sched[name])
        assert tvm.tirx.ForKind.PARALLEL in kinds, (name, kinds)
        assert tvm.tirx.ForKind.VECTORIZED in kinds, (name, kinds)
        assert sched[name].attrs["tirx.is_scheduled"]

    ex = tvm.compile(sched, target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    x = np.random.default_rng(5).random((1, 1, 28, 28), dtype=np.float32)
    out = vm["main"](tvm.runtime.tensor(x)).numpy()
    ref = ort_run(demo_model, prepared.inputs, [x])[0]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("length,parallel", [(65537, True), (7, False)])
def test_odd_length_elementwise_is_not_vectorized_and_parallel_only_when_large(length, parallel):
    """No vector width >= 4 divides a prime length: still scheduled, not vectorized; parallel
    when there is enough work to pay for waking the thread pool (PARALLEL_MIN_ELEMS)."""
    from tvm import te

    a = te.placeholder((length,), "float32", name="a")
    b = te.compute((length,), lambda i: a[i] * 2.0, name="b")
    func = te.create_prim_func([a, b])
    target = get_target("x86").tvm_target()
    sch = CPUFallback().apply(func, target, False)
    assert sch is not None
    kinds = _loop_kinds(sch.mod["main"])
    assert (tvm.tirx.ForKind.PARALLEL in kinds) == parallel
    assert not tvm.tirx.ForKind.VECTORIZED in kinds


def test_small_kernels_run_serially(demo_model):
    """The demo model's max-pool and its input transpose write a few thousand elements: no
    parallel loop (waking the pool cost 0.5 us per kernel, more than their work); its convs
    stay parallel. (Of its three pools two run inside their convs' kernels, ``PackedDense``;
    the third, on 3 rows that two cores do not split evenly, has a kernel of its own.)"""
    prepared = tvm_compress.prepare_onnx(demo_model, {"input": (1, 1, 28, 28)})
    target = get_target("x86").tvm_target()
    with target:
        sched = dl.ApplyDefaultSchedule(CPUFallback())(
            tvm.transform.Sequential(lowering_passes(get_target("x86")))(prepared.to_relax()))
    kinds = {gv.name_hint: _loop_kinds(f) for gv, f in sched.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    pools = [n for n in kinds if n.startswith("max_pool2d")]
    assert len(pools) == 1 and all(tvm.tirx.ForKind.PARALLEL not in kinds[n] for n in pools), kinds
    assert all(tvm.tirx.ForKind.PARALLEL in k for n, k in kinds.items() if "conv2d" in n)


def _loops(func) -> list:
    import tvm_ffi

    loops = []
    tvm_ffi.structural_walk(func.body, [(tvm.tirx.For, lambda n: loops.append((int(n.extent), n.kind)))],
                            order="pre")
    return loops


def test_padding_keeps_its_rows_and_computes_the_pad():
    """A pad (the input of a padded depthwise conv) runs row by row: parallel over channels,
    the row vectorized (162 = 18 x 9) or left to LLVM (82), never one loop over the flattened
    tensor (a div/mod per element made such pads most of a depthwise conv's time)."""
    from tvm import te, topi

    target = get_target("x86").tvm_target()
    for width, vector in ((160, 9), (80, None)):
        a = te.placeholder((1, 16, width, width), "float32", name="a")
        func = te.create_prim_func([a, topi.nn.pad(a, [0, 0, 1, 1], [0, 0, 1, 1])])
        sch = CPUFallback().apply(func, target, False)
        loops = _loops(sch.mod["main"])
        assert all(ext <= width + 2 for ext, _ in loops), loops  # no flattened loop
        assert loops[0] == (16, tvm.tirx.ForKind.PARALLEL), loops
        assert loops[-1] == ((vector, tvm.tirx.ForKind.VECTORIZED) if vector else
                             (width + 2, tvm.tirx.ForKind.SERIAL)), loops
        x = np.random.default_rng(width).standard_normal((1, 16, width, width)).astype("float32")
        out = tvm.runtime.tensor(np.full((1, 16, width + 2, width + 2), np.nan, "float32"))
        tvm.compile(sch.mod, target)(tvm.runtime.tensor(x), out)
        np.testing.assert_array_equal(out.numpy(), np.pad(x, [(0, 0), (0, 0), (1, 1), (1, 1)]))


def test_channels_last_concat_runs_in_whole_vectors_per_input():
    """A concat along the innermost axis (channels-last: 4 inputs of 24 channels) is cut at the
    inputs' boundaries into pieces of whole vectors, one piece per input (a vector spanning
    two inputs selected lane by lane: 1.75x slower, docs/benchmarks.md); the values are the
    concat's."""
    from tvm import te, topi

    target = get_target("x86-avx2").tvm_target()
    ins = [te.placeholder((1, 5, 6, 24), "float32", name=f"a{i}") for i in range(4)]
    func = te.create_prim_func([*ins, topi.concatenate(ins, axis=3)])
    sch = CPUFallback(lanes=8).apply(func, target, False)
    loops = _loops(sch.mod["main"])
    assert loops.count((8, tvm.tirx.ForKind.VECTORIZED)) == 4, loops  # one vector loop per input
    rng = np.random.default_rng(9)
    xs = [rng.standard_normal((1, 5, 6, 24)).astype("float32") for _ in ins]
    out = tvm.runtime.tensor(np.full((1, 5, 6, 96), np.nan, "float32"))
    tvm.compile(sch.mod, target)(*[tvm.runtime.tensor(x) for x in xs], out)
    np.testing.assert_array_equal(out.numpy(), np.concatenate(xs, axis=3))


def test_steps_stacked_along_an_outer_axis_run_one_loop_per_input():
    """An unrolled bidirectional RNN's outputs: per step the two directions concatenated, the
    steps stacked on an outer axis and reshaped to ``[T, 2H]`` (the direction is then
    ``c // H``). Each step and each direction gets a vector loop of its own, so no element
    walks a chain of selects (50 steps: one scalar select chain per element, 238 us against
    a few); the values are the concat's."""
    from tvm import te, topi

    steps, hidden = 6, 64
    target = get_target("x86-avx2").tvm_target()
    fwd = [te.placeholder((1, hidden), "float32", name=f"f{t}") for t in range(steps)]
    bwd = [te.placeholder((1, hidden), "float32", name=f"b{t}") for t in range(steps)]
    per_step = [topi.concatenate([topi.reshape(f, (1, 1, 1, hidden)), topi.reshape(b, (1, 1, 1, hidden))], axis=1)
                for f, b in zip(fwd, bwd)]
    out = topi.reshape(topi.concatenate(per_step, axis=0), (steps, 2 * hidden))
    func = te.create_prim_func([*fwd, *bwd, out])
    sch = CPUFallback(lanes=8).apply(func, target, False)
    loops = _loops(sch.mod["main"])
    assert [k for _, k in loops].count(tvm.tirx.ForKind.VECTORIZED) == 2 * steps, loops
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal((1, hidden)).astype("float32") for _ in range(2 * steps)]
    res = tvm.runtime.tensor(np.full((steps, 2 * hidden), np.nan, "float32"))
    tvm.compile(sch.mod, target)(*[tvm.runtime.tensor(x) for x in xs], res)
    want = np.stack([np.concatenate([xs[t][0], xs[steps + t][0]]) for t in range(steps)])
    np.testing.assert_array_equal(res.numpy(), want)


def test_conv_tile_holds_several_output_channels_and_dense_stays_scheduled():
    """The register tile of a conv holds 8 output channels x one vector row (the input vector is
    loaded once for 8 FMA chains); a batch-1 dense, whose only loop outside the row is the
    tile's own, is still scheduled (parallel + vectorized, a tile of 8 vectors of its row), and
    both compute the same numbers."""
    from tvm import te, topi

    target = get_target("x86").tvm_target()
    rng = np.random.default_rng(3)
    x = te.placeholder((1, 24, 6, 32), "float32", name="x")
    w = te.placeholder((32, 24, 1, 1), "float32", name="w")
    conv = te.create_prim_func([x, w, topi.nn.conv2d_nchw(x, w, 1, 0, 1)])
    a = te.placeholder((1, 256), "float32", name="a")  # 64K MACs: enough work to go parallel
    b = te.placeholder((256, 256), "float32", name="b")
    dense = te.create_prim_func([a, b, topi.nn.dense(a, b)])
    for func, shapes, ref in (
        (conv, [(1, 24, 6, 32), (32, 24, 1, 1), (1, 32, 6, 32)],
         lambda xv, wv: np.einsum("nchw,oc->nohw", xv, wv[:, :, 0, 0])),
        (dense, [(1, 256), (256, 256), (1, 256)], lambda av, bv: av @ bv.T),
    ):
        sch = CPUFallback().apply(func, target, False)
        assert sch is not None
        loops = _loops(sch.mod["main"])
        kinds = {k for _, k in loops}
        assert tvm.tirx.ForKind.PARALLEL in kinds and tvm.tirx.ForKind.VECTORIZED in kinds, loops
        if func is conv:
            assert (8, tvm.tirx.ForKind.UNROLLED) in loops, loops
            # 8-lane registers (AVX2): 4 rows of two registers keep 8 accumulators
            avx2 = _loops(CPUFallback(lanes=8).apply(func, target, False).mod["main"])
            assert (4, tvm.tirx.ForKind.UNROLLED) in avx2 and (8, tvm.tirx.ForKind.UNROLLED) not in avx2
        else:
            # every loop indexes the weight: the tile is 8 vectors of the output row, sharing
            # the broadcast input (one FMA chain made a 2048x512 dense 4x slower)
            assert (8, tvm.tirx.ForKind.UNROLLED) in loops, loops
        args = [rng.standard_normal(shape).astype("float32") for shape in shapes[:2]]
        out = tvm.runtime.tensor(np.full(shapes[2], np.nan, "float32"))
        tvm.compile(sch.mod, target)(*(tvm.runtime.tensor(v) for v in args), out)
        np.testing.assert_allclose(out.numpy(), ref(*args), rtol=1e-5, atol=1e-4)


def test_rows_share_the_input_vector_even_when_the_weight_is_larger():
    """A 1x1 conv on a small map whose weight outweighs its input (the detector's 384x384 convs
    on 10x10): the tile's rows are still output channels, which share the loaded input row,
    not the map's lines, which would share only a broadcast weight scalar."""
    from tvm import te, topi

    target = get_target("x86").tvm_target()
    x = te.placeholder((1, 96, 6, 16), "float32", name="x")
    w = te.placeholder((192, 96, 1, 1), "float32", name="w")  # 18432 weights > 9216 inputs
    func = te.create_prim_func([x, w, topi.nn.conv2d_nchw(x, w, 1, 0, 1)])
    sch = CPUFallback().apply(func, target, False)
    loops = _loops(sch.mod["main"])
    assert {n for n, kind in loops if kind == tvm.tirx.ForKind.UNROLLED} == {8}, loops
    rng = np.random.default_rng(4)
    xv, wv = rng.standard_normal((1, 96, 6, 16)).astype("float32"), rng.standard_normal((192, 96, 1, 1)).astype("float32")
    out = tvm.runtime.tensor(np.full((1, 192, 6, 16), np.nan, "float32"))
    tvm.compile(sch.mod, target)(tvm.runtime.tensor(xv), tvm.runtime.tensor(wv), out)
    np.testing.assert_allclose(out.numpy(), np.einsum("nchw,oc->nohw", xv, wv[:, :, 0, 0]), rtol=1e-5, atol=1e-4)


def _blocks_in_loops(stmt, loops=()) -> list:
    """(block realize, the loops around it, outermost first) for every block under ``stmt``."""
    if isinstance(stmt, tvm.tirx.For):
        return _blocks_in_loops(stmt.body, (*loops, stmt))
    if isinstance(stmt, tvm.tirx.SeqStmt):
        return [found for s in stmt.seq for found in _blocks_in_loops(s, loops)]
    if isinstance(stmt, tvm.s_tir.SBlockRealize):
        return [(stmt, loops), *_blocks_in_loops(stmt.block.body, loops)]
    return _blocks_in_loops(stmt.body, loops) if hasattr(stmt, "body") else []


@pytest.mark.parametrize("size,per_chunk", [(160, True), (20, False)])
def test_a_conv_pads_per_chunk_of_output_rows_on_tall_maps(size, per_chunk):
    """A channels-last depthwise 3x3 conv: on a 160-row map its pad runs inside the conv's
    parallel loop, per chunk of output rows (8 chunks of 20 rows, 22 padded rows each); on a
    20-row map (chunks of 3 rows would copy most rows twice) it stays a pass of its own."""
    from tvm import te, topi

    target = get_target("x86").tvm_target()
    c = 16
    a = te.placeholder((1, size, size, c), "float32", name="a")
    w = te.placeholder((3, 3, c, 1), "float32", name="w")
    out = topi.nn.depthwise_conv2d_nhwc(a, w, 1, 1, 1)
    sch = CPUFallback(lanes=8).apply(te.create_prim_func([a, w, out]), target, False)
    assert sch is not None
    func = sch.mod["main"]
    found = _blocks_in_loops(func.body)
    pad_loops = next(loops for realize, loops in found if realize.block.name_hint == "PaddedInput")
    kinds = [l.kind for l in pad_loops]
    assert (tvm.tirx.ForKind.PARALLEL in kinds) == per_chunk, kinds
    if per_chunk:
        parallel = pad_loops[kinds.index(tvm.tirx.ForKind.PARALLEL)]
        assert int(parallel.extent) == 8
        assert int(pad_loops[kinds.index(tvm.tirx.ForKind.PARALLEL) + 1].extent) == 22  # 20 rows + 2
    rng = np.random.default_rng(size)
    x = rng.standard_normal((1, size, size, c)).astype("float32")
    k = rng.standard_normal((3, 3, c, 1)).astype("float32")
    got = tvm.runtime.tensor(np.full((1, size, size, c), np.nan, "float32"))
    tvm.compile(sch.mod, target)(tvm.runtime.tensor(x), tvm.runtime.tensor(k), got)
    xp = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    want = sum(xp[:, i:i + size, j:j + size, :] * k[i, j, :, 0] for i in range(3) for j in range(3))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_a_depthwise_conv_pads_per_chunk_of_channels():
    """An NCHW depthwise 5x5 conv on a 6x96 map (the PP-OCR classifier's): its pad runs per
    chunk of channels inside the conv's parallel loop, whatever the chunk's size (channels'
    pads do not overlap). As a pass of its own, serial at this size, it made the second core
    read its half from the first core's cache: 1.9-2.6x slower on two threads than on one."""
    from tvm import te, topi

    target = get_target("x86").tvm_target()
    c, h, w_ = 32, 6, 96
    a = te.placeholder((1, c, h, w_), "float32", name="a")
    w = te.placeholder((c, 1, 5, 5), "float32", name="w")
    out = topi.nn.depthwise_conv2d_nchw(a, w, 1, 2, 1)
    sch = CPUFallback(lanes=8).apply(te.create_prim_func([a, w, out]), target, False)
    found = _blocks_in_loops(sch.mod["main"].body)
    pad_loops = next(loops for realize, loops in found if realize.block.name_hint == "PaddedInput")
    conv_loops = next(loops for realize, loops in found if realize.block.name_hint.endswith("_update"))
    (parallel,) = [l for l in conv_loops if l.kind == tvm.tirx.ForKind.PARALLEL]
    assert any(l.same_as(parallel) for l in pad_loops)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, c, h, w_)).astype("float32")
    k = rng.standard_normal((c, 1, 5, 5)).astype("float32")
    got = tvm.runtime.tensor(np.full((1, c, h, w_), np.nan, "float32"))
    tvm.compile(sch.mod, target)(tvm.runtime.tensor(x), tvm.runtime.tensor(k), got)
    xp = np.pad(x, [(0, 0), (0, 0), (2, 2), (2, 2)])
    want = sum(xp[:, :, i:i + h, j:j + w_] * k[None, :, 0, i, j, None, None] for i in range(5) for j in range(5))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-4)


def _conv_tile(func, lanes: int) -> tuple:
    """(output columns, vector registers of channels) in the register tile of a channels-last
    conv's update block: the unrolled loops around it that its column and channel indices use,
    and its vectorized loop."""
    import tvm_ffi

    def uses(expr, var):
        hits = []
        tvm_ffi.structural_walk(expr, [(tvm.tirx.Var, lambda v: hits.append(v.same_as(var)))], order="post")
        return any(hits)

    found = []
    for realize, loops in _blocks_in_loops(func.body):
        block = realize.block
        if not block.name_hint.endswith("_update"):
            continue
        tile = []
        for rng in list(block.writes[0].region)[1:4]:  # the output's y, x, channel
            value = next(v for iv, v in zip(block.iter_vars, realize.iter_values) if uses(rng.min, iv.var))
            unrolled = [int(l.extent) for l in loops if l.kind == tvm.tirx.ForKind.UNROLLED and uses(value, l.loop_var)]
            vector = [int(l.extent) for l in loops if l.kind == tvm.tirx.ForKind.VECTORIZED and uses(value, l.loop_var)]
            tile.append(int(np.prod(unrolled)) * -(-int(np.prod(vector)) // lanes))
        found.append(tile)
    assert len(found) == 1, found
    rows, columns, channels = found[0]
    return rows * columns, channels


@pytest.mark.parametrize("size,channels,tile", [
    (13, 192, (5, 2)),  # no divisor of 13 columns fills a tile: 2 tiles of 5, the last of 3
    (26, 96, (6, 2)),   # 26 = 2 x 13: 4 tiles of 6 and one of 2 (13 tiles of 2 held 4 registers)
    (6, 128, (6, 2)),   # the whole row
    (2, 128, (2, 4)),   # 2 columns: the tile takes two 16-channel vectors as well
    (208, 24, (4, 3)),  # 24 channels are 3 vectors: 4 columns x 3 (8 x 1 loaded a broadcast per FMA)
])
def test_channels_last_conv_tiles_fill_the_accumulators(size, channels, tile):
    """A channels-last 3x3 conv's register tile on AVX2 (16 registers of 8 floats): up to 12
    accumulators, columns x channel vectors, sized by the cycles each reduction step takes
    (``_tile_shape``), also where no count of columns divides the map's width (its last tile
    partial), never more registers than 16 (accumulators, weight vectors, a broadcast); not
    1 column x 4 vectors (one weight load per FMA) or 2 x 2 registers (FMA latency bound). It
    computes what torch does (the partial tile's columns past the end are not written: the
    output starts as NaN)."""
    from tvm import te, topi
    import torch

    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    x = te.placeholder((1, size, size, channels), "float32", name="x")
    w = te.placeholder((3, 3, channels, channels), "float32", name="w")
    func = te.create_prim_func([x, w, topi.nn.conv2d_nhwc(x, w, 1, 1, 1)])
    sch = CPUFallback(lanes=8).apply(func, target, False)
    assert _conv_tile(sch.mod["main"], 8) == tile
    rng = np.random.default_rng(size)
    xv = rng.standard_normal((1, size, size, channels)).astype("float32")
    wv = rng.standard_normal((3, 3, channels, channels)).astype("float32")
    out = tvm.runtime.tensor(np.full((1, size, size, channels), np.nan, "float32"))
    tvm.compile(sch.mod, target)(tvm.runtime.tensor(xv), tvm.runtime.tensor(wv), out)
    want = torch.nn.functional.conv2d(torch.from_numpy(xv).permute(0, 3, 1, 2),
                                      torch.from_numpy(wv).permute(3, 2, 0, 1), padding=1)
    np.testing.assert_allclose(out.numpy(), want.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-3)


def _update_predicates(func) -> list:
    return [r.predicate for r, _ in _blocks_in_loops(func.body) if r.block.name_hint.endswith("_update")]


@pytest.mark.parametrize("rows", [2704, 170, 169])
def test_dense_tiles_are_whole_tiles(rows):
    """A dense product (one reduction loop) never gets a partial last tile: LLVM compiled such
    bounds-tested tiles erratically (some row counts 2x slower). Its tile's rows divide the
    row count (2704: 4, 170: 5; 169 = 13 x 13: a single row, several vectors), and it
    computes what numpy does."""
    from tvm import te
    from tvm_compress.targets.packed_dense import pack_weight, packed_dense

    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    k, n = 96, 192
    x = te.placeholder((1, rows, k), "float32", name="x")
    w = te.placeholder((n // 16, k, 16), "float32", name="w")
    sch = CPUFallback(lanes=8).apply(te.create_prim_func([x, w, packed_dense(x, w)]), target, False)
    preds = _update_predicates(sch.mod["main"])
    assert preds and all(isinstance(p, tvm.tirx.IntImm) and int(p) == 1 for p in preds), preds
    rng = np.random.default_rng(rows)
    xv, wv = rng.standard_normal((1, rows, k)).astype("float32"), rng.standard_normal((k, n)).astype("float32")
    out = tvm.runtime.tensor(np.full((1, rows, n), np.nan, "float32"))
    tvm.compile(sch.mod, target)(tvm.runtime.tensor(xv), tvm.runtime.tensor(pack_weight(wv, 16)), out)
    np.testing.assert_allclose(out.numpy(), xv @ wv, rtol=1e-4, atol=1e-3)


def test_default_schedule_emits_neon_fmla_on_aarch64(demo_model):
    """Through our pipeline (lowering + default CPU schedule), aarch64 float kernels use NEON
    vector FMA; untuned naive loops do not (see tests/test_qemu_runner.py)."""
    import re

    prepared = tvm_compress.prepare_onnx(demo_model, {"input": (1, 1, 28, 28)})
    target = get_target("rpi4").tvm_target()
    with target:
        low = tvm.transform.Sequential(lowering_passes())(prepared.to_relax())
        sched = dl.ApplyDefaultSchedule(CPUFallback())(low)
    ex = tvm.compile(sched, target)
    (llvm_mod,) = [m for m in ex.mod.imports if m.kind == "llvm"]
    asm = llvm_mod.inspect_source("s")
    assert len(re.findall(r"\bfmla\s+v\d+\.4s", asm)) > 10


def test_a_large_softmax_runs_in_parallel_over_rows_with_each_stage_once():
    """A softmax (PP-OCRv4's 6625-class CTC head: 40 rows) matches no tile: it runs in parallel
    over rows, each stage under the row loop, the exponential kept as its own stage (inlined
    into the sum and the division it would be computed twice), and it computes the softmax.
    A small one (10 x 97) stays naive: starting threads costs more than it."""
    from tvm import te, topi

    target = get_target("x86").tvm_target()
    for rows, cols, scheduled in ((40, 6625, True), (10, 97, False)):
        a = te.placeholder((rows, cols), "float32", name="a")
        func = te.create_prim_func([a, topi.nn.softmax(a, axis=-1)])
        sch = CPUFallback().apply(func, target, False)
        assert (sch is not None) == scheduled
        if sch is None:
            continue
        loops = _loops(sch.mod["main"])
        assert loops[0] == (rows, tvm.tirx.ForKind.PARALLEL), loops
        assert tvm.tirx.ForKind.VECTORIZED in {k for _, k in loops}
        assert [r.name_hint for r in _stage_blocks(sch.mod["main"])] == \
            ["T_softmax_maxelem", "T_softmax_exp", "T_softmax_expsum", "T_softmax_norm"]
        x = np.random.default_rng(rows).standard_normal((rows, cols)).astype("float32") * 4
        out = tvm.runtime.tensor(np.full((rows, cols), np.nan, "float32"))
        tvm.compile(sch.mod, target)(tvm.runtime.tensor(x), out)
        e = np.exp(x.astype("float64") - x.max(-1, keepdims=True))
        # a float32 sum of 6625 terms in order: relative error up to ~1e-4 (the naive kernel's too)
        np.testing.assert_allclose(out.numpy(), e / e.sum(-1, keepdims=True), rtol=1e-4, atol=1e-9)


def _block_runs(stmt) -> dict:
    """How many times each block runs: the product of the loop extents around it."""
    runs: dict = {}
    for realize, loops in _blocks_in_loops(stmt):
        name = realize.block.name_hint
        runs[name] = runs.get(name, 0) + int(np.prod([int(l.extent) for l in loops]))
    return runs


@pytest.mark.parametrize("shape,axis", [((1, 16, 4, 2100), 1), ((1, 80, 8400), 1), ((2, 19, 64, 64), 1)])
def test_a_softmax_along_a_strided_axis_runs_each_stage_once(shape, axis):
    """A softmax along an axis that is not the innermost (YOLOv8's box head: 16 bins of 4 x 2100
    anchors, along axis 1) runs on chunks of the innermost axis, in parallel, the reduced axis
    looped outside the vectorized chunk: each stage computes each of its elements once (under
    a row loop over the reduced axis the maxima and sums ran again at each of its 16 rows),
    and the kernel computes what numpy does."""
    from tvm import te, topi

    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    a = te.placeholder(shape, "float32", name="a")
    sch = CPUFallback(lanes=8).apply(te.create_prim_func([a, topi.nn.softmax(a, axis=axis)]), target, False)
    func = sch.mod["main"]
    loops = _loops(func)
    assert loops[0][1] == tvm.tirx.ForKind.PARALLEL, loops
    vectorized = {e for e, k in loops if k == tvm.tirx.ForKind.VECTORIZED}
    # one chunk of the innermost axis: whole registers where a divisor allows (2100: 60)
    assert len(vectorized) == 1 and shape[-1] % min(vectorized) == 0 and min(vectorized) >= 8, loops
    full, reduced = int(np.prod(shape)), int(np.prod(shape)) // shape[axis]
    runs = _block_runs(func.body)
    assert runs["T_softmax_exp"] == runs["T_softmax_norm"] == full, runs
    assert runs["T_softmax_maxelem_init"] == runs["T_softmax_expsum_init"] == reduced, runs
    assert runs["T_softmax_maxelem_update"] == runs["T_softmax_expsum_update"] == full, runs
    x = np.random.default_rng(shape[-1]).standard_normal(shape).astype("float32") * 4
    out = tvm.runtime.tensor(np.full(shape, np.nan, "float32"))
    tvm.compile(sch.mod, target)(tvm.runtime.tensor(x), out)
    e = np.exp(x.astype("float64") - x.max(axis, keepdims=True))
    np.testing.assert_allclose(out.numpy(), e / e.sum(axis, keepdims=True), rtol=1e-5, atol=1e-7)


def _rows_kernel(kind, rows, cols):
    from tvm import te, topi

    a = te.placeholder((rows, cols), "float32", name="a")
    if kind == "softmax":
        return te.create_prim_func([a, topi.nn.softmax(a, axis=-1)])
    g, b = (te.placeholder((cols,), "float32", name=n) for n in "gb")
    return te.create_prim_func([a, g, b, topi.nn.layer_norm(a, g, b, axis=[1])])


@pytest.mark.parametrize("kind,rows,cols,lane_wise", [
    ("softmax", 1182, 208, True),    # ViT attention scores padded to whole registers
    ("softmax", 1182, 197, False),   # unpadded: spatial stages in whole vectors + a scalar tail
    ("layer_norm", 197, 384, True),  # mean and variance sums
])
def test_row_reductions_accumulate_lane_wise_vectors(kind, rows, cols, lane_wise):
    """A reduction along rows of whole vectors keeps lane-wise partial results in vectors
    (rfactor, the lanes added at the end) instead of one scalar chain per row; every stage
    still runs under the parallel row loop, and the kernel computes what numpy does."""
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    sch = CPUFallback(lanes=8).apply(_rows_kernel(kind, rows, cols), target, False)
    func = sch.mod["main"]
    loops = _loops(func)
    assert loops[0] == (rows, tvm.tirx.ForKind.PARALLEL), loops
    names = [b.name_hint for b in _stage_blocks(func)]
    assert any(n.endswith("_rf_update") for n in names) == lane_wise, names
    vectorized = [e for e, k in loops if k == tvm.tirx.ForKind.VECTORIZED]
    assert vectorized and all(e in (8, 16) for e in vectorized), loops
    rng = np.random.default_rng(cols)
    x = rng.standard_normal((rows, cols)).astype("float32") * 4
    args = [tvm.runtime.tensor(x)]
    if kind == "softmax":
        e = np.exp(x.astype("float64") - x.max(-1, keepdims=True))
        want = e / e.sum(-1, keepdims=True)
    else:
        g, b = rng.standard_normal((2, cols)).astype("float32")
        args += [tvm.runtime.tensor(g), tvm.runtime.tensor(b)]
        m = x.mean(-1, keepdims=True, dtype="float64")
        want = (x - m) / np.sqrt(((x - m) ** 2).mean(-1, keepdims=True) + 1e-5) * g + b
    out = tvm.runtime.tensor(np.full((rows, cols), np.nan, "float32"))
    tvm.compile(sch.mod, target)(*args, out)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=1e-5)


def _stage_blocks(func) -> list:
    import tvm_ffi

    blocks = []
    tvm_ffi.structural_walk(func.body, [(tvm.s_tir.SBlock, blocks.append)], order="pre")
    return [b for b in blocks if b.name_hint != "root"]


@pytest.mark.parametrize("k,n,streams", [(384, 1536, True), (64, 256, False)])
def test_a_large_streamed_weight_iterates_its_column_blocks_outermost(k, n, streams):
    """A matmul's [K, N] weight over half an L2 is swept once per column block for all rows,
    not once per row (197x384x1536: 2.4 -> 1.75 ms before row padding); small weights keep the
    rows outermost. Either order computes the same product."""
    from tvm import te

    from tvm_compress.targets.cpu_schedule import _streams_weight

    a = te.placeholder((64, k), "float32", name="A")
    w = te.placeholder((k, n), "float32", name="W")
    r = te.reduce_axis((0, k), name="r")
    func = te.create_prim_func([a, w, te.compute((64, n), lambda i, j: te.sum(a[i, r] * w[r, j], axis=r), name="C")])
    sch = tvm.s_tir.Schedule(func)
    assert _streams_weight(sch, sch.get_sblock("C")) is streams
    target = get_target("x86").tvm_target()
    space = CPUFallback(lanes=16).apply(func.with_attr("target", target), target, False)
    lib = tvm.compile((space[0] if isinstance(space, list) else space).mod, target)
    rng = np.random.default_rng(5)
    av, wv = rng.standard_normal((64, k)).astype("float32"), rng.standard_normal((k, n)).astype("float32")
    out = tvm.runtime.tensor(np.zeros((64, n), "float32"))
    lib(tvm.runtime.tensor(av), tvm.runtime.tensor(wv), out)
    np.testing.assert_allclose(out.numpy(), av @ wv, rtol=1e-4, atol=1e-3)


def test_round_to_nearest_even_stays_vectorized():
    """A vectorized loop of ``nearbyint`` (every int8 requantize: relax.round) reaches LLVM as
    vector code. Stock TVM 0.27 scalarizes it in VectorizeLoop; importing the targets marks the
    op vectorizable, and the values still round half to even."""
    import tvm_compress.targets  # noqa: F401  (registers the op attribute)
    from tvm.script import tirx as T

    @T.prim_func
    def func(a: T.Buffer((32,), "float32"), b: T.Buffer((32,), "float32")):
        for i in T.vectorized(32):
            b[i] = T.nearbyint(a[i])

    after = {}

    @tvm.instrument.pass_instrument
    class AfterVectorize:
        def run_after_pass(self, mod, info):
            if info.name == "tirx.VectorizeLoop":
                after["mod"] = mod

    with tvm.transform.PassContext(instruments=[AfterVectorize()]):
        lib = tvm.compile(tvm.IRModule({"main": func}), target=get_target("x86").tvm_target())
    loops = []
    import tvm_ffi
    tvm_ffi.structural_walk(after["mod"]["main"].body, [(tvm.tirx.For, loops.append)], order="post")
    assert not loops, "the vectorized loop was turned back into a scalar loop"
    x = (np.arange(32, dtype=np.float32) - 16) * 0.5  # ..., -1.5, -0.5, 0.5, 1.5, ...
    y = tvm.runtime.tensor(np.zeros(32, np.float32))
    lib["main"](tvm.runtime.tensor(x), y)
    np.testing.assert_array_equal(y.numpy(), np.round(x))


@pytest.mark.parametrize("lanes", [8, 16])
@pytest.mark.parametrize("channels, groups, widths", [
    (208, 26, {8}),    # 8 channels a group: 16-lane vectors would read two groups' inputs
    (48, 6, {8}),
    (128, 32, {4}),    # 4 a group: half a register, not a lane-by-lane gather
])
def test_grouped_conv_vectors_stay_inside_one_group(lanes, channels, groups, widths):
    """A grouped channels-last conv reads input channel ``o // g * g + i`` for output channel
    ``o``: a vector of outputs that crosses a group boundary loads every lane separately
    (RegNetY's 8-channel groups ran 3.8x slower than onnxruntime). Its vectors hold whole
    groups' lanes only, and it still computes what torch does."""
    from tvm import te, topi
    import torch

    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    per_group = channels // groups
    x = te.placeholder((1, 14, 14, channels), "float32", name="x")
    w = te.placeholder((3, 3, per_group, channels), "float32", name="w")
    func = te.create_prim_func([x, w, topi.nn.group_conv2d_nhwc(x, w, 1, 1, 1, groups)])
    sch = CPUFallback(lanes=lanes).apply(func, target, False)
    updates = [loops[-1] for r, loops in _blocks_in_loops(sch.mod["main"].body)
               if r.block.name_hint.endswith("_update")]
    assert updates and all(loop.kind == tvm.tirx.ForKind.VECTORIZED and int(loop.extent) in widths
                           for loop in updates)
    rng = np.random.default_rng(channels)
    xv = rng.standard_normal((1, 14, 14, channels)).astype("float32")
    wv = rng.standard_normal((3, 3, per_group, channels)).astype("float32")
    out = tvm.runtime.tensor(np.full((1, 14, 14, channels), np.nan, "float32"))
    tvm.compile(sch.mod, target)(tvm.runtime.tensor(xv), tvm.runtime.tensor(wv), out)
    want = torch.nn.functional.conv2d(torch.from_numpy(xv).permute(0, 3, 1, 2),
                                      torch.from_numpy(wv).permute(3, 2, 0, 1), padding=1, groups=groups)
    np.testing.assert_allclose(out.numpy(), want.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-3)


def test_a_transpose_onto_rows_of_no_whole_vector_runs_in_square_tiles():
    """A channels-last map of 100 pixels back to channels-first (rows of 100: 10-lane vectors
    with a strided read per element): tiles of 16 x 16, the input's channels then the
    output's pixels innermost; the same elements."""
    from tvm import te

    a = te.placeholder((100, 64), "float32", name="a")
    b = te.compute((64, 100), lambda c, t: a[t, c], name="b")
    target = get_target("x86").tvm_target()
    sch = CPUFallback().apply(te.create_prim_func([a, b]), target, False)
    extents = [int(sch.get(loop).extent) for loop in sch.get_loops(sch.get_sblock("b"))]
    assert extents[-2:] == [16, 16], extents
    x = np.random.default_rng(3).random((100, 64), dtype=np.float32)
    out = tvm.runtime.tensor(np.zeros((64, 100), "float32"))
    tvm.compile(sch.mod, target)["main"](tvm.runtime.tensor(x), out)
    np.testing.assert_array_equal(out.numpy(), x.T)


def test_a_long_reduction_to_one_element_runs_in_parallel_lane_wise_chunks():
    """A norm's statistics over a whole map (a global layer norm: a mean and a variance of
    65536 elements): each sum split into one chunk per core of 16-lane partial sums (parallel,
    vectorized), added up after; the same result as numpy's."""
    from tvm import te

    n = 1 << 16
    x = te.placeholder((1, 1, n), "float32", name="x")
    k = te.reduce_axis((0, n), "k")
    total = te.compute((1, 1, 1), lambda a, b, c: te.sum(x[a, b, k], axis=k), name="total")
    k2 = te.reduce_axis((0, n), "k2")
    d = lambda a, b: x[a, b, k2] - total[a, b, 0] / n  # noqa: E731
    sq = te.compute((1, 1, 1), lambda a, b, c: te.sum(d(a, b) * d(a, b), axis=k2), name="sq")
    target = get_target("x86").tvm_target()
    sch = CPUFallback().apply(te.create_prim_func([x, sq]), target, False)
    kinds = _loop_kinds(sch.mod["main"])
    assert tvm.tirx.ForKind.PARALLEL in kinds and tvm.tirx.ForKind.VECTORIZED in kinds, kinds
    data = np.random.default_rng(4).standard_normal((1, 1, n)).astype("float32")
    out = tvm.runtime.tensor(np.zeros((1, 1, 1), "float32"))
    tvm.compile(sch.mod, target)["main"](tvm.runtime.tensor(data), out)
    np.testing.assert_allclose(out.numpy().ravel()[0], ((data - data.mean()) ** 2).sum(), rtol=1e-4)


@pytest.mark.parametrize("reducer, split", [("sum", True), ("max", False)])
def test_a_long_reduction_over_two_axes(reducer, split):
    """A sum over a whole [128, 512] map splits the same way (its two loops fused); a maximum
    stays one loop (only sums are split). Both exact."""
    from tvm import te

    x = te.placeholder((1, 128, 512), "float32", name="x")
    r1, r2 = te.reduce_axis((0, 128), "r1"), te.reduce_axis((0, 512), "r2")
    op = te.sum if reducer == "sum" else te.max
    y = te.compute((1, 1, 1), lambda a, b, c: op(x[a, r1, r2], axis=[r1, r2]), name="y")
    target = get_target("x86").tvm_target()
    sch = CPUFallback().apply(te.create_prim_func([x, y]), target, False)
    assert (tvm.tirx.ForKind.PARALLEL in _loop_kinds(sch.mod["main"])) == split
    data = np.random.default_rng(6).standard_normal((1, 128, 512)).astype("float32")
    out = tvm.runtime.tensor(np.zeros((1, 1, 1), "float32"))
    tvm.compile(sch.mod, target)["main"](tvm.runtime.tensor(data), out)
    want = data.astype(np.float64).sum() if reducer == "sum" else data.max()
    np.testing.assert_allclose(out.numpy().ravel()[0], want, rtol=1e-4, atol=1e-3)


def test_channels_last_norm_statistics_tile_channels_in_each_reduction():
    """An instance norm's mean and then variance over H and W of an NHWC map (a CycleGAN's, after
    the channels-last rewrite): each reduction accumulates vectors of channels in registers,
    in parallel over channel blocks (it was left naive: 5.9 ms for a 64x64x256 map); same
    values as numpy."""
    from tvm import te, topi

    x = te.placeholder((1, 32, 32, 256), "float32", name="x")
    mean = topi.divide(topi.sum(x, axis=(1, 2), keepdims=True), 1024.0)
    diff = topi.subtract(x, mean)
    var = topi.divide(topi.sum(topi.multiply(diff, diff), axis=(1, 2), keepdims=True), 1024.0)
    func = te.create_prim_func([x, topi.sqrt(topi.add(var, 1e-5))])
    target = get_target("x86").tvm_target()
    sch = CPUFallback().apply(func, target, False)
    assert sch is not None
    kinds = [k for _, k in _loops(sch.mod["main"])]
    assert kinds.count(tvm.tirx.ForKind.PARALLEL) == 2 and tvm.tirx.ForKind.VECTORIZED in kinds
    lib = tvm.compile(sch.mod, target)
    a = np.random.default_rng(8).standard_normal((1, 32, 32, 256)).astype("float32")
    out = tvm.runtime.empty((1, 1, 1, 256), "float32", tvm.cpu())
    lib(tvm.runtime.tensor(a), out)
    np.testing.assert_allclose(out.numpy(), np.sqrt(a.var(axis=(1, 2), keepdims=True) + 1e-5), rtol=1e-5)


def test_an_epilogue_after_a_reduction_over_unit_axes_runs_once():
    """A 1x1 depthwise conv reduces over axes of extent 1 only (no reduce iterator left, an
    ``init`` still there; MobileOne's and FastViT's scale branches): its epilogue, which reads
    the conv's input too, was inlined into both the init and the update and applied twice
    (wrong values, caught by the kernel check: no library). Same values as numpy now."""
    from tvm import te

    a = te.placeholder((48, 28, 28), "float32", name="a")
    w = te.placeholder((48, 1), "float32", name="w")
    r = te.reduce_axis((0, 1), name="r")
    conv = te.compute((48, 28, 28), lambda c, h, x: te.sum(a[c, h, x] * w[c, r], axis=r), name="conv")
    out = te.compute((48, 28, 28), lambda c, h, x: te.max(conv[c, h, x] + a[c, h, x], 0.0), name="relu")
    target = get_target("x86").tvm_target()
    sch = CPUFallback().apply(te.create_prim_func([a, w, out]), target, False)
    assert sch is not None
    rng = np.random.default_rng(9)
    data, weight = rng.standard_normal((48, 28, 28)).astype("float32"), rng.standard_normal((48, 1)).astype("float32")
    got = tvm.runtime.tensor(np.zeros((48, 28, 28), "float32"))
    tvm.compile(sch.mod, target)(tvm.runtime.tensor(data), tvm.runtime.tensor(weight), got)
    np.testing.assert_allclose(got.numpy(), np.maximum(data * weight[:, :, None] + data, 0), rtol=1e-6, atol=1e-6)
