"""Packed int8 convolution kernels (targets/int8_*.py): rewrite, exact results, instructions.

Reference: int64 numpy convolution of the same integers; the kernels must match it exactly.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax

from tvm_compress import pipeline
from tvm_compress.errors import TargetError
from tvm_compress.cache import runner_cache_dir
from tvm_compress.targets import get_family, get_target, load_target_files, qemu
from tvm_compress.targets.arches import QEMU_ARCHES
from tvm_compress.targets.int8_conv import (
    column_taps, dense_tile, depthwise_tap_pairs, group_weight, layer_kernel, pack_depthwise_weight, pack_weight,
)
from tvm_compress.targets.int8_intrin import KERNELS, register, tap_intrin
from tvm_compress.targets.int8_pack import PackInt8Conv, int8_kernels, target_kernel
from tvm_compress.targets.int8_schedule import _marked_block

RUNNER_CACHE = runner_cache_dir()
CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
CALL_TIR = tvm.ir.Op.get("relax.call_tir")
PERMUTE = tvm.ir.Op.get("relax.permute_dims")


def _conv_module(x_shape, w, act="uint8", stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                 groups=1, epilogue=True, w_const=True):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, act))
    params = [x]
    if w_const:
        weight = relax.const(w)
    else:
        weight = relax.Var("w", relax.TensorType(w.shape, str(w.dtype)))
        params.append(weight)
    with bb.function("main", params):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, weight, strides=stride, padding=padding,
                                           dilation=dilation, groups=groups,
                                           out_dtype="float32" if act == "float32" else "int32"))
            if epilogue:  # what QuantizeRealize leaves after the conv: fused into its kernel
                y = bb.emit(relax.op.astype(y, "float32"))
                y = bb.emit(relax.op.multiply(y, relax.const(np.float32(0.5))))
            gv = bb.emit_output(y)
        bb.emit_func_output(gv)
    return bb.get()


def _reference(x, w, stride, padding, dilation, groups):
    n, c, h, wd = x.shape
    oc, icg, kh, kw = w.shape
    ph, pw = padding
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    oh = (h + 2 * ph - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * pw - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.zeros((n, oc, oh, ow), np.int64)
    per_group = oc // groups
    for o in range(oc):
        g = o // per_group
        for i in range(kh):
            for j in range(kw):
                y0, x0 = i * dilation[0], j * dilation[1]
                patch = xp[:, g * icg:(g + 1) * icg, y0:y0 + stride[0] * oh:stride[0],
                           x0:x0 + stride[1] * ow:stride[1]]
                out[:, o] += np.einsum("nchw,c->nhw", patch, w[o, :, i, j].astype(np.int64))
    return out


def _lower(mod, target_name):
    profile = get_target(target_name)
    target = profile.tvm_target()
    with target:
        lowered = tvm.transform.Sequential(pipeline.lowering_passes(profile))(mod)
    scheduled = pipeline.Schedule(profile)(lowered)
    return scheduled, target


def _asm(mod, target) -> str:
    executable = tvm.compile(mod, target)
    (llvm_mod,) = [m for m in executable.mod.imports if m.kind == "llvm"]
    return llvm_mod.inspect_source("s")


def _packed_kernels(mod):
    """Kernels holding a packed int8 convolution block (found by its annotation)."""
    return [gv for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)
            and _marked_block(tvm.s_tir.Schedule(f)) is not None]


def _scheduled_kernels(mod):
    """Packed kernels that ScheduleInt8Conv scheduled (marked so MetaSchedule skips them)."""
    return [gv for gv in _packed_kernels(mod) if mod[gv].attrs.get("tirx.is_scheduled", False)]


def _is_dot(func) -> bool:
    """A kernel calling a dot intrinsic on broadcast activations (dense convolutions)."""
    script = func.script()
    return bool(re.search(r"llvm\.(x86\.avx512\.vpdpbusd|aarch64\.neon\.sdot)", script)
                or re.search(r"llvm\.x86\.avx2\.pmadd\.wd[^\n]*broadcast", script, re.I))


def _is_tap(func) -> bool:
    """A kernel whose depthwise taps are pair multiply-adds (``int8_intrin.tap_intrin``)."""
    script = func.script()
    return bool(re.search(r"llvm\.x86\.(avx512\.vpdpwssd|avx2\.pmadd\.wd|sse2\.pmadd\.wd)", script)
                and not re.search(r"broadcast", script, re.I))


def _leaf_blocks(stmt, loops=()) -> list:
    """(block, every loop around it, outermost first) for each block under ``stmt`` that holds
    no other block."""
    if isinstance(stmt, tvm.tirx.For):
        return _leaf_blocks(stmt.body, (*loops, stmt))
    if isinstance(stmt, tvm.tirx.SeqStmt):
        return [b for st in stmt.seq for b in _leaf_blocks(st, loops)]
    if isinstance(stmt, tvm.s_tir.SBlockRealize):
        return _leaf_blocks(stmt.block.body, loops) or [(stmt.block, loops)]
    return _leaf_blocks(stmt.body, loops) if hasattr(stmt, "body") else []


def _pack_blocks(func) -> list:
    """(block, its loops) of the activation pack in ``func``, the most-run piece first (a
    schedule splits the padding columns off into pieces of their own)."""
    found = [(b, loops) for b, loops in _leaf_blocks(func.body)
             if b.writes and b.writes[0].source.name == "int8_pack"]
    return sorted(found, key=lambda bl: -np.prod([int(l.extent) for l in bl[1]]))


def _dot_calls(mod):
    return [gv for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and _is_dot(f)]


def _tap_calls(mod):
    return [gv for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and _is_tap(f)]


# (x shape, weight shape, stride, padding, dilation, groups, activations)
CASES = {
    "3x3": ((1, 16, 14, 14), (32, 16, 3, 3), (1, 1), (1, 1), (1, 1), 1, "uint8"),
    "odd-channels-stride2": ((1, 3, 17, 19), (10, 3, 3, 3), (2, 2), (1, 1), (1, 1), 1, "int8"),
    "1x1-rows-stride": ((1, 32, 4, 24), (200, 32, 1, 1), (2, 1), (0, 0), (1, 1), 1, "uint8"),
    "dilated": ((1, 8, 12, 12), (24, 8, 3, 3), (1, 1), (2, 2), (2, 2), 1, "int8"),
    # 13 columns: tiles of 3 (pmaddwd) or 7 (vpdpbusd, sdot) over a width padded to 15 / 14
    "padded-width-3-lane-groups": ((1, 20, 11, 13), (24, 20, 3, 3), (1, 1), (1, 1), (1, 1), 1, "uint8"),
    "depthwise-5x5": ((1, 24, 10, 13), (24, 1, 5, 5), (1, 1), (2, 2), (1, 1), 24, "uint8"),
    "depthwise-odd-stride2": ((1, 10, 9, 9), (10, 1, 3, 3), (2, 2), (1, 1), (1, 1), 10, "int8"),
    "depthwise-dilated": ((1, 16, 12, 14), (16, 1, 3, 3), (1, 1), (2, 2), (2, 2), 16, "int8"),
    "single-channel": ((1, 1, 11, 14), (8, 1, 3, 3), (1, 1), (1, 1), (1, 1), 1, "int8"),  # column_taps
    # groups of 8 channels (RegNet's): whole groups on 8 lanes, two at a time on 16; 5 groups
    # leave the last pair half empty
    "grouped-8": ((1, 40, 9, 10), (40, 8, 3, 3), (1, 1), (1, 1), (1, 1), 5, "uint8"),
    # groups of 4 (ResNeXt's first stage): two at a time on 8 lanes, four on 16, one on sdot's 4
    "grouped-4-stride2": ((1, 32, 9, 11), (32, 4, 3, 3), (2, 2), (1, 1), (1, 1), 8, "int8"),
}


def _case(name, seed=0, act=None, pairs=False):
    """``pairs``: weights within [-64, 64], so every pair of input channels fits the int16 sums
    of ``pmaddubsw`` (which other weights send to ``pmaddwd``, ``layer_kernel``)."""
    x_shape, w_shape, stride, padding, dilation, groups, case_act = CASES[name]
    act = act or case_act
    rng = np.random.default_rng(seed)
    lo, hi = (0, 256) if act == "uint8" else (-128, 128)
    x = rng.integers(lo, hi, x_shape).astype(act)
    w = rng.integers(-64, 65, w_shape).astype(np.int8) if pairs else rng.integers(-128, 128, w_shape).astype(np.int8)
    mod = _conv_module(x_shape, w, act, stride, padding, dilation, groups)
    return mod, x, w, (stride, padding, dilation, groups)


def test_pack_weight_layouts_round_trip():
    rng = np.random.default_rng(1)
    k = KERNELS["pmaddwd"]
    w = rng.integers(-128, 128, (10, 3, 3, 3)).astype(np.int8)
    wp = pack_weight(w, k)
    assert wp.shape == (2, 3, 3, 2, 8, 2)  # OC 10 -> 16 (two lane groups), IC 3 -> 4, IC innermost
    back = wp.transpose(0, 4, 3, 5, 1, 2).reshape(16, 4, 3, 3)
    np.testing.assert_array_equal(back[:10, :3], w)
    assert not back[10:].any() and not back[:, 3:].any()
    s = KERNELS["sdot"]
    dw = rng.integers(-128, 128, (6, 1, 5, 5)).astype(np.int8)
    np.testing.assert_array_equal(pack_depthwise_weight(dw, s), dw[:, 0])  # taps stay scalars


@pytest.mark.parametrize("groups, width, lanes, shape", [
    (4, 16, 8, (64, 3, 3, 3)),    # whole lane groups: the weight as it is
    (5, 8, 16, (48, 6, 3, 3)),    # two groups of 8 per 16 lanes, the last pair half empty
    (8, 4, 8, (32, 6, 3, 3)),
])
def test_group_weight_blocks_groups_into_whole_lane_groups(groups, width, lanes, shape):
    rng = np.random.default_rng(8)
    w = rng.integers(-128, 128, (groups * width, 3, 3, 3)).astype(np.int8)
    wg, group_out = group_weight(w, groups, lanes)
    assert wg.shape == shape and group_out == max(width, lanes)
    k = group_out // width  # original groups per packed group
    for g in range(groups):
        rows = wg[g * width:(g + 1) * width]
        j = g % k
        np.testing.assert_array_equal(rows[:, j * 3:(j + 1) * 3], w[g * width:(g + 1) * width])
        assert not np.delete(rows, np.s_[j * 3:(j + 1) * 3], axis=1).any()  # zeros across groups
    assert not wg[groups * width:].any()
    assert group_weight(w[:18], 6, 8) is None  # groups of 3 fit 8 lanes neither way


def test_depthwise_tap_pair_weights():
    """Tap pairs: [KH, ceil(KW / 2), C', 2], columns 2j and 2j + 1 of a channel side by side,
    an odd last column paired with 0; channels padded to whole vectors as without pairs."""
    rng = np.random.default_rng(4)
    k = KERNELS["pmaddubsw"]
    dw = rng.integers(-128, 128, (10, 1, 3, 5)).astype(np.int8)
    wp = pack_depthwise_weight(dw, k, "NHWC", pairs=True)
    assert wp.shape == (3, 3, 16, 2)  # 5 columns -> 3 pairs, 10 channels -> 16 (two vectors of 8)
    single = pack_depthwise_weight(dw, k, "NHWC")
    np.testing.assert_array_equal(wp.transpose(0, 1, 3, 2).reshape(3, 6, 16)[:, :5], single)
    assert not wp[:, 2, :, 1].any() and not wp[:, :, 10:].any()


@pytest.mark.parametrize("stride, dilation, kw, pairs", [
    ((1, 1), (1, 1), 3, True), ((2, 2), (1, 1), 3, True), ((1, 1), (2, 2), 5, True), ((2, 1), (1, 3), 3, True),
    ((1, 1), (1, 1), 1, False),  # one column: nothing to pair
])
def test_depthwise_taps_run_in_pairs(stride, dilation, kw, pairs):
    """On x86 a channels-last depthwise conv packs each channel next to its right neighbour's
    as the int16 halves of an int32, and one ``vpmaddwd`` multiplies two columns' taps (the
    detector's 5x5 depthwise convs 1.35x faster). A stride that skips columns packs only the
    columns the taps read. Exact against int64 numpy on any stride and dilation."""
    rng = np.random.default_rng(11)
    x = rng.integers(-128, 128, (1, 24, 13, 17)).astype("int8")
    w = rng.integers(-128, 128, (24, 1, 3, kw)).astype(np.int8)
    padding = (1, kw // 2 * dilation[1])
    profile = get_target("x86-avx2")
    assert depthwise_tap_pairs(target_kernel(profile), (1, 13, 17, 24), 3, kw,
                               (*padding, *padding), stride, dilation) == pairs
    scheduled, target = _lower(_conv_module(x.shape, w, "int8", stride, padding, dilation, 24), "x86-avx2")
    (gv,) = _scheduled_kernels(scheduled)
    func = scheduled[gv]
    sch = tvm.s_tir.Schedule(func)
    packs = [b for b, _ in _pack_blocks(func)]
    pack = packs[0]
    assert str(pack.writes[0].source.dtype) == ("int32" if pairs else "int8")
    # padding columns packed by pieces of their own: no bounds test per vector in the rest
    assert len(packs) == (3 if padding[1] else 1)
    conv = sch.get(sch.get_sblock("int8_conv_update_o"))
    weights = [tuple(int(d) for d in r.source.shape) for r in conv.reads if str(r.source.dtype) == "int8"]
    assert weights[-1] == ((3, (kw + 1) // 2, 24, 2) if pairs else (3, kw, 24))
    if pairs and stride[1] == 2:  # every other column packed
        assert int(pack.writes[0].source.shape[2]) == (17 + 2 * padding[1] + 1) // 2
    assert len(_tap_calls(scheduled)) == 1
    got = relax.VirtualMachine(tvm.compile(scheduled, target), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    ref = _reference(x, w, stride, padding, dilation, 24).astype(np.float32) * np.float32(0.5)
    np.testing.assert_array_equal(got, ref)


def test_column_taps_layout():
    """One input channel: kernel columns q * taps + j become input channel j of a kernel
    ceil(KW / taps) wide, zero past KW."""
    w = np.arange(2 * 3 * 5, dtype=np.int8).reshape(2, 1, 3, 5)
    wt = column_taps(w, 4)
    assert wt.shape == (2, 4, 3, 2)
    np.testing.assert_array_equal(wt.transpose(0, 2, 3, 1).reshape(2, 3, 8)[:, :, :5], w[:, 0])
    assert not wt[:, 1:, :, 1].any()


@pytest.mark.parametrize("target_name, limit, kernel", [
    ("x86-avx2", 64, "pmaddubsw"),  # column pairs within 128: the fast kernel
    ("x86-avx2", 128, "pmaddwd"),  # pairs that could saturate: the exact one, 2 columns a step
    ("x86", 128, None),  # the preset's first kernel this CPU has
])
@pytest.mark.parametrize("kw, stride, dilation, padding", [
    (3, (1, 1), (1, 1), (1, 1)), (5, (2, 2), (1, 1), (2, 2)), (3, (1, 2), (2, 2), (2, 1)),
])
def test_single_channel_conv_packs_columns_as_channels(target_name, limit, kernel, kw, stride, dilation, padding):
    """A conv on one input channel (a grayscale or spectrogram input) packs each pixel with its
    right neighbours as its channels (``column_taps``): a 3x3 kernel is 3 dot steps of 4 on
    pmaddubsw instead of 9 steps three quarters padding (the demo's 1 -> 16 conv 0.8-0.9x
    its float kernel before). Exact against int64 numpy with any stride, dilation, padding."""
    rng = np.random.default_rng(14)
    x = rng.integers(-128, 128, (1, 1, 15, 18)).astype("int8")
    w = rng.integers(-limit, limit + (limit < 128), (12, 1, 3, kw)).astype(np.int8)
    kernel = kernel or target_kernel(get_target(target_name)).name
    mod = _conv_module(x.shape, w, "int8", stride, padding, dilation)
    packed = PackInt8Conv(target_kernel(get_target(target_name)))(mod)
    assert int8_kernels(packed) == {kernel: 1}
    depth = KERNELS[kernel].depth
    (call,) = [c for c in _calls(packed) if c.op.same_as(CALL_TIR)]
    assert tuple(int(d) for d in call.args[1].fields[1].value.shape)[1:4] == (3, -(-kw // depth), 1)
    scheduled, target = _lower(mod, target_name)
    assert len(_scheduled_kernels(scheduled)) == 1 and len(_dot_calls(scheduled)) == 1
    if tvm.target.codegen.target_has_features(list(KERNELS[kernel].cpu_features), get_target("x86").tvm_target()):
        got = relax.VirtualMachine(tvm.compile(scheduled, target), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
        ref = _reference(x, w, stride, padding, dilation, 1).astype(np.float32) * np.float32(0.5)
        np.testing.assert_array_equal(got, ref)


def _calls(mod):
    calls = []
    relax.analysis.post_order_visit(mod["main"], lambda e: calls.append(e) if isinstance(e, relax.Call) else None)
    return calls


@pytest.mark.parametrize("vnni, channels, width", [(False, 96, 8), (True, 96, 16), (True, 24, 8)])
def test_depthwise_pair_pack_moves_one_register_at_a_time(vnni, channels, width):
    """The pair pack (int32 per channel) vectorizes a pixel's channels at most one register at
    a time, in vectors of ``channel_lanes``: in 32-lane vectors (four AVX2 registers, two
    conditional reads each) the PP-OCRv4 recognizer's 480-channel 5x5 kernel ran 0.91x its
    unpaired speed; 24 channels on AVX-512 as one 24-lane vector 5.8x slower (the classifier).
    Compiled for AVX-512 VNNI whatever this machine is; run where it can."""
    rng = np.random.default_rng(16)
    x = rng.integers(-128, 128, (1, channels, 6, 20)).astype("int8")
    w = rng.integers(-128, 128, (channels, 1, 5, 5)).astype(np.int8)
    profile = get_target("x86").with_target({"kind": "llvm", "mcpu": "icelake-server"}) if vnni \
        else get_target("x86-avx2")
    target = profile.tvm_target()
    with target:
        lowered = tvm.transform.Sequential(pipeline.lowering_passes(profile))(
            _conv_module(x.shape, w, "int8", (2, 1), (2, 2), groups=channels))
    scheduled = pipeline.Schedule(profile)(lowered)
    (gv,) = _scheduled_kernels(scheduled)
    sch = tvm.s_tir.Schedule(scheduled[gv])
    loops = _pack_blocks(sch.mod["main"])[0][1]
    assert [int(l.extent) for l in loops if l.kind == tvm.tirx.ForKind.VECTORIZED] == [width]
    got = _run_if_vnni(scheduled, target, x) if vnni else \
        relax.VirtualMachine(tvm.compile(scheduled, target), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    if got is not None:
        ref = _reference(x, w, (2, 1), (2, 2), (1, 1), channels).astype(np.float32) * np.float32(0.5)
        np.testing.assert_array_equal(got, ref)


def _matmul_module(x_shape, w, act):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, act))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.const(w), out_dtype="int32"))
            y = bb.emit(relax.op.astype(y, "float32"))
            y = bb.emit(relax.op.multiply(y, relax.const(np.float32(0.5))))
            gv = bb.emit_output(y)
        bb.emit_func_output(gv)
    return bb.get()


@pytest.mark.parametrize("target_name", ["x86-avx2", "x86"])
@pytest.mark.parametrize("x_shape, n, act", [((1, 576), 128, "int8"), ((3, 5, 37), 20, "uint8"), ((7, 64), 10, "int8"),
                                              ((1, 24, 40), 24, "int8")])
def test_int8_matmul_runs_the_packed_dot_kernel(x_shape, n, act, target_name):
    """An int8 matmul with a constant weight (a dense layer QuantizeRealize left) runs the
    convolutions' packed dot kernel, its rows the pixels of a one-row map: the demo's
    576 -> 128 layer 0.78x its float kernel's speed on the generic int8 kernel, 1.25x packed.
    Weights within [-64, 64] take pmaddubsw; exact against int64 numpy for any leading shape."""
    rng = np.random.default_rng(13)
    lo, hi = (0, 256) if act == "uint8" else (-128, 128)
    x = rng.integers(lo, hi, x_shape).astype(act)
    w = rng.integers(-64, 65, (x_shape[-1], n)).astype(np.int8)
    packed = PackInt8Conv(target_kernel(get_target(target_name)))(_matmul_module(x_shape, w, act))
    assert int8_kernels(packed) == {target_kernel(get_target(target_name)).name: 1}
    scheduled, target = _lower(_matmul_module(x_shape, w, act), target_name)
    assert len(_scheduled_kernels(scheduled)) == 1 and len(_dot_calls(scheduled)) == 1
    if target_name == "x86-avx2" or tvm.target.codegen.target_has_features(
            list(target_kernel(get_target(target_name)).cpu_features), get_target("x86").tvm_target()):
        got = relax.VirtualMachine(tvm.compile(scheduled, target), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
        ref = (x.astype(np.int64) @ w.astype(np.int64)).astype(np.float32) * np.float32(0.5)
        np.testing.assert_array_equal(got, ref)


def test_pack_leaves_other_convolutions_alone():
    """Before == Expected: float convs, grouped convs whose groups do not fit the lanes, non-constant weights,
    activations the kernel cannot take and matmuls whose rows form no map stay as they are."""
    rng = np.random.default_rng(2)
    w8 = rng.integers(-128, 128, (8, 4, 3, 3)).astype(np.int8)
    untouched = [
        (_conv_module((1, 4, 8, 8), w8.astype("float32"), "float32"), "pmaddwd"),
        # groups of 3 output channels: neither whole lane groups nor a divisor of 8 lanes
        (_conv_module((1, 8, 8, 8), w8[:6], "uint8", groups=2), "pmaddwd"),
        (_conv_module((1, 4, 8, 8), w8, "int8", w_const=False), "pmaddwd"),
        (_conv_module((1, 4, 8, 8), w8, "uint8"), "sdot"),  # sdot takes int8 activations only
        # a matmul over three leading dimensions other than 1 (no map of rows)
        (_matmul_module((2, 3, 4, 16), rng.integers(-128, 128, (16, 8)).astype(np.int8), "int8"), "pmaddwd"),
    ]
    for before, kernel in untouched:
        after = PackInt8Conv(KERNELS[kernel])(before)
        tvm.ir.assert_structural_equal(after, before)


def test_pack_rewrites_int8_and_depthwise_convs():
    rng = np.random.default_rng(3)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 8, 8), "uint8"))
    w1 = rng.integers(-128, 128, (16, 4, 3, 3)).astype(np.int8)
    w2 = rng.integers(-128, 128, (16, 1, 3, 3)).astype(np.int8)
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.nn.conv2d(x, relax.const(w1), padding=1, out_dtype="int32"))
            q = bb.emit(relax.op.astype(relax.op.clip(a, 0, 255), "uint8"))
            b = bb.emit(relax.op.nn.conv2d(q, relax.const(w2), padding=1, groups=16, out_dtype="int32"))
            gv = bb.emit_output(b)
        bb.emit_func_output(gv)
    after = PackInt8Conv(KERNELS["pmaddwd"])(bb.get())
    calls = []
    relax.analysis.post_order_visit(after["main"], lambda e: calls.append(e) if isinstance(e, relax.Call) else None)
    assert not [c for c in calls if c.op.same_as(CONV2D)]
    tir_calls = [c for c in calls if c.op.same_as(CALL_TIR)]
    assert len(tir_calls) == 2
    shapes = [tuple(int(d) for d in c.args[1].fields[1].value.shape) for c in tir_calls]
    assert shapes == [(2, 3, 3, 2, 8, 2), (16, 3, 3)]
    assert int8_kernels(after) == {"pmaddwd": 1, "depthwise": 1}
    for c in tir_calls:
        assert int(after[c.args[0]].attrs["op_pattern"]) == 4  # epilogues still fuse in


def _is_depthwise(name):
    return CASES[name][1][1] == 1 and CASES[name][5] > 1


@pytest.mark.parametrize("target_name, instruction", [
    ("x86-avx2", r"\bvpmaddubsw\s[^\n]*%ymm"),
    # AVX-512 VNNI: only where this CPU has it (the preset's list falls back to pmaddubsw).
    ("x86", r"\bvpdpbusd\s[^\n]*%zmm"),
])
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("act", ["uint8", "int8"])
def test_x86_kernels_exact_and_use_dot_instructions(name, act, target_name, instruction):
    mod, x, w, geometry = _case(name, act=act, pairs=target_kernel(get_target(target_name)).int16_pairs)
    scheduled, target = _lower(mod, target_name)
    assert _scheduled_kernels(scheduled), "the packed kernel was not scheduled"
    # Dense convolutions are tensorized with the dot intrinsic, depthwise taps with a pair
    # multiply-add (vpmaddwd / vpdpwssd).
    assert bool(_dot_calls(scheduled)) != _is_depthwise(name)
    assert bool(_tap_calls(scheduled)) == _is_depthwise(name)
    executable = tvm.compile(scheduled, target)
    got = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    ref = _reference(x, w, *geometry).astype(np.float32) * np.float32(0.5)
    np.testing.assert_array_equal(got, ref)
    (llvm_mod,) = [m for m in executable.mod.imports if m.kind == "llvm"]
    asm = llvm_mod.inspect_source("s")
    if not _is_depthwise(name):
        if target_name == "x86" and target_kernel(get_target("x86")).name != "vpdpbusd":
            instruction = r"\bvpmaddubsw\s"
        assert re.search(instruction, asm)
    else:
        # vpmulld: 2 micro-ops and 10 cycles' latency on Intel cores
        assert re.search(r"\b(vpmaddwd|vpdpwssd)\s", asm) and not re.search(r"\bvpmulld\s", asm)


@pytest.mark.parametrize("name", ["grouped-8", "grouped-4-stride2"])
def test_grouped_convs_run_the_dot_kernel_in_the_imported_layout_too(name):
    """``features.int8_layout = "NCHW"``: grouped convs still take the packed dot kernel (one
    per conv, counted under its name), exact."""
    profile = get_target("x86-avx2")
    profile = dataclasses.replace(profile, features={**profile.features, "int8_layout": "NCHW"})
    mod, x, w, geometry = _case(name, pairs=True)
    with profile.tvm_target():
        lowered = tvm.transform.Sequential(pipeline.lowering_passes(profile))(mod)
    assert int8_kernels(lowered) == {"pmaddubsw": 1}
    assert not [c for c in _calls(lowered) if c.op.same_as(PERMUTE)]  # no channels-last rewrite
    scheduled = pipeline.Schedule(profile)(lowered)
    assert len(_dot_calls(scheduled)) == 1 and _scheduled_kernels(scheduled)
    got = relax.VirtualMachine(tvm.compile(scheduled, profile.tvm_target()), tvm.cpu())["main"](
        tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(got, _reference(x, w, *geometry).astype(np.float32) * np.float32(0.5))


def test_layers_whose_pairs_could_saturate_run_the_exact_kernel():
    """``pmaddubsw`` sums uint8 x int8 products of adjacent input channels into saturating
    int16: a layer runs it while every pair's same-signed weights add up to at most 128 (255 x
    128 fits), else the exact ``pmaddwd`` kernel; so do layers of 1-2 input channels (padded to
    4 per dot step, twice ``pmaddwd``'s 2)."""
    k = KERNELS["pmaddubsw"]
    at_limit = np.array([64, 64, -64, -64, 127, -128, 1], np.int8).reshape(1, 7, 1, 1)
    assert layer_kernel(at_limit, k) is k
    past = at_limit.copy()
    past[0, 0] = 65  # 65 + 64 > 128
    assert layer_kernel(past, k) is KERNELS["pmaddwd"]
    assert layer_kernel(past, KERNELS["pmaddwd"]) is KERNELS["pmaddwd"]  # exact int16 products
    small = np.ones((8, 3, 3, 3), np.int8)
    assert layer_kernel(small, k) is k
    assert layer_kernel(small[:, :2], k) is layer_kernel(small[:, :1], k) is KERNELS["pmaddwd"]


@pytest.mark.parametrize("act", ["uint8", "int8"])
def test_pmaddubsw_pairs_never_saturate(act):
    """Activations at their extremes (255 and 0 after int8's shift) against weights at the
    pair limit (``vpmaddubsw``) and past it (``vpmaddwd``): both equal the integer convolution
    bit for bit."""
    rng = np.random.default_rng(11)
    hi, lo = (255, 0) if act == "uint8" else (127, -128)
    x = np.where(rng.random((1, 8, 5, 9)) < 0.8, hi, lo).astype(act)
    pairs = np.array([[64, 64], [-64, -64], [127, -128], [-128, 0]], np.int8)
    at_limit = pairs[rng.integers(0, 4, (16, 4))].reshape(16, 8, 1, 1)
    past = np.where(rng.random((16, 8, 1, 1)) < 0.5, 127, -128).astype(np.int8)
    for w, ubsw in ((at_limit, True), (past, False)):
        scheduled, target = _lower(_conv_module(x.shape, w, act), "x86-avx2")
        assert ("llvm.x86.avx2.pmadd.ub.sw" in scheduled.script()) == ubsw
        got = relax.VirtualMachine(tvm.compile(scheduled, target), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_array_equal(got, _reference(x, w, (1, 1), (0, 0), (1, 1), 1).astype(np.float32) * 0.5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_avxvnni_kernels_use_256_bit_vnni(name):
    """The ``x86-avxvnni`` preset (AVX2 + AVX-VNNI, no AVX-512: Alder Lake's cores): dense
    convolutions run ``vpdpbusd`` on 256-bit registers, depthwise taps ``vpdpwssd``, no
    AVX-512 register anywhere; exact where this CPU has AVX-VNNI."""
    mod, x, w, geometry = _case(name, act="int8")
    scheduled, target = _lower(mod, "x86-avxvnni")
    assert target_kernel(get_target("x86-avxvnni")).name == "avxvnni"
    assert bool(_dot_calls(scheduled)) != _is_depthwise(name)
    executable = tvm.compile(scheduled, target)
    (llvm_mod,) = [m for m in executable.mod.imports if m.kind == "llvm"]
    asm = llvm_mod.inspect_source("s")
    dot = r"\bvpdpwssd\s[^\n]*%[xy]mm" if _is_depthwise(name) else r"\bvpdpbusd\s[^\n]*%ymm"
    assert re.search(dot, asm) and "%zmm" not in asm
    if tvm.target.codegen.target_has_features(["avxvnni"], get_target("x86").tvm_target()):
        got = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_array_equal(got, _reference(x, w, *geometry).astype(np.float32) * np.float32(0.5))


@pytest.mark.parametrize("channels, width", [(16, 16), (48, 16), (64, 8), (192, 8)])
def test_depthwise_epilogue_runs_over_a_tile_of_few_channels(channels, width):
    """A channels-last depthwise kernel whose tile of accumulators (5 pixels here) stays under
    TVM's 1 KiB stack limit (16, 48 channels) requantizes the tile once, all channels at once in
    wide vectors, after the last channel vector's taps; with more (64: 1280 bytes, 192), after
    each channel vector (8 lanes on AVX2). Exact either way."""
    rng = np.random.default_rng(5)
    x = rng.integers(-128, 128, (1, channels, 20, 20)).astype("int8")
    w = rng.integers(-128, 128, (channels, 1, 3, 3)).astype(np.int8)
    scheduled, target = _lower(_conv_module(x.shape, w, "int8", padding=(1, 1), groups=channels), "x86-avx2")
    (gv,) = _scheduled_kernels(scheduled)
    (tail_loops,) = [loops for b, loops in _leaf_blocks(scheduled[gv].body)
                     if str(b.writes[0].source.dtype) == "float32"]
    assert [int(l.extent) for l in tail_loops if l.kind == tvm.tirx.ForKind.VECTORIZED] == [width]
    got = relax.VirtualMachine(tvm.compile(scheduled, target), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    ref = _reference(x, w, (1, 1), (1, 1), (1, 1), channels).astype(np.float32) * np.float32(0.5)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("shape, chunks", [((1, 32, 40, 40), 2), ((1, 32, 80, 80), 4), ((1, 32, 3, 128), 6)])
def test_depthwise_packs_per_chunk_of_rows(shape, chunks):
    """Each parallel chunk of output rows packs the rows it reads (a pass over the whole map
    first made every chunk read rows the other core had written), rows split evenly; 3 rows
    on two cores are cut into two bands of columns too (one core did two of the three rows)."""
    rng = np.random.default_rng(8)
    x = rng.integers(-128, 128, shape).astype("int8")
    w = rng.integers(-128, 128, (shape[1], 1, 3, 3)).astype(np.int8)
    scheduled, target = _lower(_conv_module(x.shape, w, "int8", padding=(1, 1), groups=shape[1]), "x86-avx2")
    (gv,) = _scheduled_kernels(scheduled)
    sch = tvm.s_tir.Schedule(scheduled[gv])
    loops = _pack_blocks(sch.mod["main"])[0][1]
    par = [loop for loop in loops if loop.kind == tvm.tirx.ForKind.PARALLEL]
    assert len(par) == 1 and int(par[0].extent) == chunks, [str(l.kind) for l in loops]
    ex = tvm.compile(scheduled, target)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    ref = _reference(x, w, (1, 1), (1, 1), (1, 1), shape[1]).astype(np.float32) * np.float32(0.5)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("target_name", ["x86-avx2", "x86-avxvnni"])
def test_depthwise_on_a_prime_width_is_tensorized(target_name):
    """7 output columns on 16-register ISAs take register tiles of one column, and 7 rows on
    two cores would be cut into bands of columns, the last one past the edge: a predicate on
    the tap block that tensorize rejects (the kernel ran as generic code). Only whole bands
    are cut."""
    rng = np.random.default_rng(12)
    x = rng.integers(-128, 128, (1, 24, 7, 7)).astype("int8")
    w = rng.integers(-128, 128, (24, 1, 5, 5)).astype(np.int8)
    scheduled, target = _lower(_conv_module(x.shape, w, "int8", padding=(2, 2), groups=24), target_name)
    assert len(_scheduled_kernels(scheduled)) == 1 and len(_tap_calls(scheduled)) == 1
    if target_name == "x86-avx2" or tvm.target.codegen.target_has_features(["avxvnni"], get_target("x86").tvm_target()):
        got = relax.VirtualMachine(tvm.compile(scheduled, target), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
        ref = _reference(x, w, (1, 1), (2, 2), (1, 1), 24).astype(np.float32) * np.float32(0.5)
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("target_name, rows, packed, window", [
    ("x86-avx2", 2, True, 2), ("x86-avx2", 3, True, 3), ("x86-avx2", 6, True, 5), ("aarch64-dotprod", 3, False, 5)])
def test_depthwise_on_few_rows_skips_padding_rows(target_name, rows, packed, window):
    """A 5x5 depthwise conv on 2-3 rows has 40-60 % of its taps on padding rows. With pair
    taps (x86) the packed kernel runs only the kernel rows that reach the map: ``window``
    rows per output row, from one that depends on the row (3 rows: kernel rows 2-4, 1-3,
    0-2), exact. Without them (ARM) the kernel reads the map with a bounds condition per tap
    instead of packing it; on 6 rows (20 % padding taps) it packs."""
    rng = np.random.default_rng(10)
    x = rng.integers(-128, 128, (1, 32, rows, 128)).astype("int8")
    w = rng.integers(-128, 128, (32, 1, 5, 5)).astype(np.int8)
    scheduled, target = _lower(_conv_module(x.shape, w, "int8", padding=(2, 2), groups=32), target_name)
    (gv,) = _scheduled_kernels(scheduled)
    sch = tvm.s_tir.Schedule(scheduled[gv])
    assert bool(_pack_blocks(sch.mod["main"])) == packed
    assert bool(_tap_calls(scheduled)) == packed
    if not packed:
        return  # the choice only: sdot kernels run under qemu in test_sdot_kernels_exact_under_qemu
    taps = sch.get(sch.get_sblock("int8_conv_update_o"))
    assert [int(v.dom.extent) for v in taps.iter_vars if v.iter_type == tvm.tirx.IterVar.CommReduce] == [window, 3]
    got = relax.VirtualMachine(tvm.compile(scheduled, target), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    ref = _reference(x, w, (1, 1), (2, 2), (1, 1), 32).astype(np.float32) * np.float32(0.5)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("rows, k, stride, dilation, window", [
    (4, 5, (1, 1), (1, 1), 4),  # the first and last rows start one padding row early
    (3, 3, (1, 1), (2, 2), None),  # dilated: no window (it would be a lookup), padding read inline
    (4, 5, (2, 2), (1, 1), 4),  # strided
])
def test_depthwise_row_window_exact(rows, k, stride, dilation, window):
    """Row windows on strided kernels, and where an output row has fewer real kernel rows than
    the window; a dilated kernel has none: exact against int64 numpy."""
    rng = np.random.default_rng(13)
    x = rng.integers(-128, 128, (1, 24, rows, 40)).astype("int8")
    w = rng.integers(-128, 128, (24, 1, k, k)).astype(np.int8)
    padding = (k // 2 * dilation[0], k // 2 * dilation[1])
    scheduled, target = _lower(_conv_module(x.shape, w, "int8", stride, padding, dilation, 24), "x86-avx2")
    (gv,) = _scheduled_kernels(scheduled)
    sch = tvm.s_tir.Schedule(scheduled[gv])
    if window is None:
        assert not _tap_calls(scheduled)
    else:
        taps = sch.get(sch.get_sblock("int8_conv_update_o"))
        assert [int(v.dom.extent) for v in taps.iter_vars if v.iter_type == tvm.tirx.IterVar.CommReduce][0] == window
    got = relax.VirtualMachine(tvm.compile(scheduled, target), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    ref = _reference(x, w, stride, padding, dilation, 24).astype(np.float32) * np.float32(0.5)
    np.testing.assert_array_equal(got, ref)


def _lowered_for(profile, x, w, padding=(0, 0), groups=1):
    """Scheduled module and target of a conv (int8 activations) for ``profile``."""
    target = profile.tvm_target()
    with target:
        lowered = tvm.transform.Sequential(pipeline.lowering_passes(profile))(
            _conv_module(x.shape, w, str(x.dtype), padding=padding, groups=groups))
    return pipeline.Schedule(profile)(lowered), target


def _vnni_lowered(x, w, padding=(0, 0)):
    """Scheduled module and target for an AVX-512 VNNI CPU, whatever this machine is."""
    profile = get_target("x86").with_target({"kind": "llvm", "mcpu": "icelake-server"})
    assert target_kernel(profile).name == "vpdpbusd"
    return _lowered_for(profile, x, w, padding)


def _kernel_asm(scheduled, target) -> str:
    """The assembly of the module's one int8 kernel: its parallel body (a local ".L" function
    follows it), not the layout transposes around it."""
    (kernel,) = [str(gv.name_hint) for gv in _scheduled_kernels(scheduled)]
    asm = _asm(scheduled, target)
    start = asm.index(f"\n{kernel}_compute_:")
    end = re.compile(r"\n[A-Za-z_]\w*:\s*\n").search(asm, start + 1)
    return asm[start:end.start() if end else len(asm)]


def _run_if_vnni(scheduled, target, x):
    if tvm.target.codegen.target_has_features(["avx512vnni"], get_target("x86").tvm_target()):
        return relax.VirtualMachine(tvm.compile(scheduled, target), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    return None


@pytest.mark.parametrize("channels, size", [(12, 80), (18, 40)])
def test_1x1_packs_each_pixel_tile_inside_the_parallel_loop(channels, size):
    """A 1x1 conv whose reduction is 3 dot steps (12 channels on vpdpbusd) runs all its lane
    groups inside each pixel tile: one pass over the map, packed once (per lane group it
    passed over the map 3 times: the detector's 12 -> 96 conv 155 -> 46 us). Input channels
    that are no whole dot steps (18 on vpdpbusd's 4) pack per pixel tile too (they packed the
    map in one serial pass first: the detector's 18 -> 96 and 42 -> 96 convs 1.1x and 1.7x
    slower). The padded step is packed in a vector too: as a conditional load it became byte
    loads, inserts and byte stores, and the dot step's 4-byte load of those bytes waited for
    them (store forwarding fails; the 18 -> 96 kernel 1.1-1.15x slower)."""
    rng = np.random.default_rng(11)
    x = rng.integers(-128, 128, (1, channels, size, size)).astype("int8")
    w = rng.integers(-128, 128, (96, channels, 1, 1)).astype(np.int8)
    scheduled, target = _vnni_lowered(x, w)
    (gv,) = _scheduled_kernels(scheduled)
    sch = tvm.s_tir.Schedule(scheduled[gv])
    loops = _pack_blocks(sch.mod["main"])[0][1]
    # inside the parallel loop (over the rows, not lane groups x rows), then the pixel tiles
    assert loops[0].kind == tvm.tirx.ForKind.PARALLEL
    if channels == 12:
        assert int(loops[0].extent) == size
    body = _kernel_asm(scheduled, target)
    assert not re.search(r"\bvpinsrb\s|\tmovb?\s+%(?:r\d+b|[a-d]l|[sd]il|bpl),", body)
    got = _run_if_vnni(scheduled, target, x)
    if got is not None:
        np.testing.assert_array_equal(got, _reference(x, w, (1, 1), (0, 0), (1, 1), 1).astype(np.float32) * np.float32(0.5))


@pytest.mark.parametrize("profile_name, channels, size, groups", [
    ("x86-avx2", 12, 80, 6),   # whole-map pack, 6 tiles of lane groups
    ("x86-vnni", 18, 40, 2),   # packed per pixel tile (lanes mode), 2 tiles
])
def test_parallel_chunks_are_bands_of_rows(profile_name, channels, size, groups):
    """The parallel loop of a channels-last conv runs rows outside lane groups: each core's
    chunk is a band of whole output pixels. With lane groups outside rows, the two cores took
    half of every pixel's channels in step and wrote neighbouring cache lines (the detector's
    18 -> 96 conv on AVX-512 3.8x, its 12 -> 96 on AVX2 1.65x slower; 2 threads slower than 1)."""
    rng = np.random.default_rng(13)
    x = rng.integers(-128, 128, (1, channels, size, size)).astype("int8")
    w = rng.integers(-128, 128, (96, channels, 1, 1)).astype(np.int8)
    if profile_name == "x86-vnni":
        scheduled, target = _vnni_lowered(x, w)
    else:
        scheduled, target = _lowered_for(get_target(profile_name), x, w)
    (gv,) = _scheduled_kernels(scheduled)
    script = scheduled[gv].script()
    (fused,) = re.findall(r"for (\w+) in T\.parallel\(T\.int64\(%d\)\)" % (size * groups), script)
    # the output row is the parallel index divided by the lane-group tiles (rows outer)
    assert re.search(r"v_y = T\.axis\.spatial\(T\.int64\(%d\), %s // T\.int64\(%d\)\)" % (size, fused, groups), script)
    got = _run_if_vnni(scheduled, target, x) if profile_name == "x86-vnni" else \
        relax.VirtualMachine(tvm.compile(scheduled, target), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    if got is not None:
        ref = _reference(x, w, (1, 1), (0, 0), (1, 1), 1).astype(np.float32) * np.float32(0.5)
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("rows, channels, out_channels, chunks", [
    (3, 16, 88, 6),   # lane groups inside each pixel tile: parallel over rows
    (6, 16, 88, 6),
    (3, 88, 16, 6),   # one lane group: parallel over rows and lane groups
    (3, 16, 40, 30),  # 15 chunks of rows x lane groups -> rows x bands x lane groups
])
def test_few_rows_on_two_cores_split_into_bands_of_columns(rows, channels, out_channels, chunks):
    """Few parallel chunks that two cores do not divide (3 rows of a 3x96 map: one core did
    two) are cut into two bands of columns too: the classifier's 16 -> 88/104 convs on 3x96
    maps 1.26-1.29x faster, its 88 -> 16 ones 1.10-1.14x."""
    rng = np.random.default_rng(17)
    x = rng.integers(-128, 128, (1, channels, rows, 96)).astype("int8")
    w = rng.integers(-128, 128, (out_channels, channels, 1, 1)).astype(np.int8)
    scheduled, target = _lowered_for(get_target("x86-avx2"), x, w)
    (gv,) = _scheduled_kernels(scheduled)
    script = scheduled[gv].script()
    assert re.findall(r"in T\.parallel\(T\.int64\((\d+)\)\)", script) == [str(chunks)]
    got = relax.VirtualMachine(tvm.compile(scheduled, target), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(got, _reference(x, w, (1, 1), (0, 0), (1, 1), 1).astype(np.float32) * np.float32(0.5))


def test_depthwise_pack_moves_whole_vectors_on_avx2():
    """A 3x3 depthwise conv on 48 channels packs each pixel's channels in 16-byte vectors: as
    one 48-byte vector LLVM assembled it through byte extracts and inserts on AVX2 (the
    detector's 48-channel depthwise at 80x80 1.6x slower, a quarter of its time in them).
    Compiled for Haswell whatever this machine is; run where it can."""
    rng = np.random.default_rng(5)
    x = rng.integers(-128, 128, (1, 48, 80, 80)).astype("int8")
    w = rng.integers(-128, 128, (48, 1, 3, 3)).astype(np.int8)
    profile = get_target("x86-avx2")
    scheduled, target = _lowered_for(profile, x, w, padding=(1, 1), groups=48)
    body = _kernel_asm(scheduled, target)
    assert re.search(r"\bvpmaddwd\s", body)
    assert not re.search(r"\bvp(ins|ext)rb\s", body)
    if get_family("x86").can_run(profile)[0]:
        got = relax.VirtualMachine(tvm.compile(scheduled, target), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
        ref = _reference(x, w, (1, 1), (1, 1), (1, 1), 48).astype(np.float32) * np.float32(0.5)
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("channels,out_channels", [(8, 24), (48, 12), (8, 8)])
def test_sixteen_lane_epilogue_keeps_channel_vectors(channels, out_channels):
    """On 16 int32 lanes (AVX-512 VNNI) an output of 24 channels requantizes in vectors of 8
    channels; fused with the pixels, its per-channel scales were gathered one lane at a time
    (an 8 -> 24 1x1 conv 8x slower than its float kernel). Fewer channels than a vector (12,
    8) are cropped out of the accumulator with the shift's correction first, then read
    contiguously (the detector's 48 -> 12 conv 3.1x, the classifier's 8 -> 8 2.6x faster).
    Compiled for an AVX-512 VNNI CPU whatever this machine is; run where it has one."""
    rng = np.random.default_rng(9)
    x = rng.integers(-128, 128, (1, channels, 12, 96)).astype("int8")
    w = rng.integers(-128, 128, (out_channels, channels, 1, 1)).astype(np.int8)
    scheduled, target = _vnni_lowered(x, w)
    assert _scheduled_kernels(scheduled)
    body = _kernel_asm(scheduled, target)
    assert re.search(r"\bvpdpbusd\s", body)
    assert not re.search(r"\b(vpinsrd|vpextrd|vinsertps|vpgatherdd|vgatherdps)\s", body)
    got = _run_if_vnni(scheduled, target, x)
    if got is not None:
        np.testing.assert_array_equal(got, _reference(x, w, (1, 1), (0, 0), (1, 1), 1).astype(np.float32) * np.float32(0.5))


@pytest.mark.parametrize("out_channels", [2, 4])
def test_squeeze_conv_on_one_pixel_requantizes_in_one_vector(out_channels):
    """A squeeze-excite conv's 2-4 output channels on one pixel: its epilogue is one short
    vector (left to LLVM it ran lane by lane, a branch per lane for a ReLU; the PP-OCR
    classifier's 8 -> 2 conv 0.8x its float kernel), and exact."""
    rng = np.random.default_rng(out_channels)
    x = rng.integers(0, 256, (1, 8, 1, 1)).astype("uint8")
    w = rng.integers(-64, 64, (out_channels, 8, 1, 1)).astype(np.int8)
    profile = get_target("x86-avx2")
    scheduled, target = _lowered_for(profile, x, w)
    (gv,) = _scheduled_kernels(scheduled)
    (tail,) = [loops for b, loops in _leaf_blocks(scheduled[gv].body) if b.name_hint == "T_multiply"]
    assert int(tail[-1].extent) == out_channels and tail[-1].kind == tvm.tirx.ForKind.VECTORIZED
    if get_family("x86").can_run(profile)[0]:
        got = relax.VirtualMachine(tvm.compile(scheduled, target), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_array_equal(got, _reference(x, w, (1, 1), (0, 0), (1, 1), 1).astype(np.float32) * np.float32(0.5))


def test_dense_tile_pads_ragged_widths_to_whole_tiles():
    """Widths without a good divisor are padded to whole register tiles; exact ones are not."""
    k = KERNELS["pmaddwd"]
    assert dense_tile(k, 2, 14) == (2, 5, 15)  # was a 2-column tile: 14 = 2 x 7
    assert dense_tile(k, 8, 80) == (2, 5, 80)
    for groups, width in [(1, 7), (3, 13), (4, 96), (6, 1)]:
        tile_oc, tile_w, padded = dense_tile(k, groups, width)
        assert groups % tile_oc == 0 and tile_oc * (tile_w + 1) + 2 <= 16  # AVX2 registers
        assert padded % tile_w == 0 and width <= padded < width + tile_w


@pytest.mark.parametrize("name", ["3x3", "depthwise-5x5"])
@pytest.mark.parametrize("epilogue", [True, False])
def test_accumulators_are_not_workspace_allocations(name, epilogue):
    # A "local" buffer is served by TVM's workspace pool (an alloc/free pair per parallel
    # iteration); "global" ones under 1 KiB go on the stack.
    mod, x, w, (stride, padding, dilation, groups) = _case(name)
    if not epilogue:
        mod = _conv_module(x.shape, w, str(x.dtype), stride, padding, dilation, groups, epilogue=False)
    scheduled, _ = _lower(mod, "x86-avx2")
    kernels = _scheduled_kernels(scheduled)
    assert kernels
    for gv in kernels:
        scopes = {b.name: b.scope() for b in scheduled[gv].body.block.alloc_buffers}
        assert set(scopes.values()) == {"global"}, scopes


_TAPS = [(k, lanes, act) for k in ("vpdpbusd", "pmaddwd") for lanes in (4, 8, 16) for act in ("int8", "uint8")
         if tap_intrin(KERNELS[k], lanes, act) is not None]


@pytest.mark.parametrize("name", sorted(KERNELS) + [f"tap-{k}-{n}-{a}" for k, n, a in _TAPS])
def test_dot_intrinsics_allocate_nothing(name):
    # A value bound to a name inside TVMScript becomes a 1-element "local" buffer, which the
    # kernel takes from the workspace pool: an alloc/free pair per call (and per parallel
    # iteration), twice the time of a one-pixel squeeze-excite conv. One store, nothing else.
    register()
    if name.startswith("tap-"):
        _, k, lanes, act = name.split("-")
        intrin = tap_intrin(KERNELS[k], int(lanes), act)
    else:
        intrin = KERNELS[name].intrin
    impl = tvm.s_tir.TensorIntrin.get(intrin).impl
    assert isinstance(impl.body.block.body, tvm.tirx.BufferStore), impl.script()


@pytest.mark.parametrize("kernel, lanes", [("pmaddwd", 8), ("pmaddwd", 4), ("vpdpbusd", 8), ("vpdpbusd", 16)])
@pytest.mark.parametrize("act", ["int8", "uint8"])
def test_tap_intrinsics_exact_at_the_extremes(kernel, lanes, act):
    """C += A * B lane by lane through a pair multiply-add: A's high int16 is its sign, B's is
    zero; checked on every int8/uint8 x int8 extreme, accumulated onto large sums."""
    from tvm.script import tirx as T

    target = get_target("x86").tvm_target()
    if not tvm.target.codegen.target_has_features(list(KERNELS[kernel].cpu_features), target):
        pytest.skip(f"this CPU has no {kernel}")
    intrin = tap_intrin(KERNELS[kernel], lanes, act)
    n = 64 * lanes
    lo, hi = (0, 255) if act == "uint8" else (-128, 127)
    a_vals = np.array([lo, hi, lo + 1, hi - 1, 0, 1, -1 if act == "int8" else 2, 77], dtype=np.int64)
    b_vals = np.array([-128, 127, -127, 126, 0, 1, -1, -77], dtype=np.int64)
    a = np.resize(np.repeat(a_vals, 8), n).astype(act)
    b = np.resize(np.tile(b_vals, 8), n).astype("int8")
    c0 = np.resize(np.array([2**31 - 2**22, -(2**31) + 2**22, 0, 12345]), n).astype("int32")

    @T.prim_func(s_tir=True)
    def func(A: T.Buffer((n,), act), B: T.Buffer((n,), "int8"), C: T.Buffer((n,), "int32")):
        for i in range(n):
            with T.sblock("update"):
                vi = T.axis.remap("S", [i])
                C[vi] = C[vi] + T.cast(A[vi], "int32") * T.cast(B[vi], "int32")

    sch = tvm.s_tir.Schedule(func)
    (i,) = sch.get_loops(sch.get_sblock("update"))
    _, inner = sch.split(i, [None, lanes])
    sch.tensorize(inner, intrin)
    lib = tvm.compile(sch.mod, target=target)
    c = tvm.runtime.tensor(c0.copy())
    lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), c)
    np.testing.assert_array_equal(c.numpy(), (c0.astype(np.int64) + a.astype(np.int64) * b).astype(np.int32))


def test_conv_without_epilogue_still_scheduled():
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, (1, 8, 6, 6)).astype("uint8")
    w = rng.integers(-128, 128, (16, 8, 3, 3)).astype(np.int8)
    scheduled, target = _lower(_conv_module(x.shape, w, epilogue=False), "x86-avx2")
    assert _scheduled_kernels(scheduled)
    ex = tvm.compile(scheduled, target)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(got, _reference(x, w, (1, 1), (0, 0), (1, 1), 1))


def test_dotprod_kernels_use_sdot():
    for name in ("3x3", "depthwise-5x5", "grouped-8"):
        mod, *_ = _case(name, act="int8")
        scheduled, target = _lower(mod, "aarch64-dotprod")
        assert _scheduled_kernels(scheduled)
        sdot = re.search(r"\bsdot\s+v\d+\.4s,\s*v\d+\.16b,\s*v\d+\.16b", _asm(scheduled, target))
        assert bool(sdot) != _is_depthwise(name), name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["odd-channels-stride2", "depthwise-odd-stride2", "single-channel", "grouped-4-stride2"])
def test_sdot_kernels_exact_under_qemu(name, tmp_path):
    ok, why = qemu.can_run("aarch64", cache_dir=RUNNER_CACHE)
    if not ok:
        pytest.skip(why)
    mod, x, w, geometry = _case(name, act="int8")
    scheduled, target = _lower(mod, "aarch64-dotprod")
    executable = tvm.compile(scheduled, target)
    lib = tmp_path / "k.so"
    executable.export_library(
        str(lib), fcompile=tvm.support.cc.cross_compiler(QEMU_ARCHES["aarch64"]["cxx"])
    )
    (got,) = qemu.run_library(lib, "aarch64", [x], cache_dir=RUNNER_CACHE).outputs
    np.testing.assert_array_equal(got, _reference(x, w, *geometry).astype(np.float32) * np.float32(0.5))


@pytest.mark.slow
def test_sdot_matmul_exact_under_qemu(tmp_path):
    """A dense layer on the packed sdot kernel, cross-compiled and run under qemu."""
    ok, why = qemu.can_run("aarch64", cache_dir=RUNNER_CACHE)
    if not ok:
        pytest.skip(why)
    rng = np.random.default_rng(15)
    x = rng.integers(-128, 128, (3, 70)).astype("int8")
    w = rng.integers(-128, 128, (70, 24)).astype(np.int8)
    scheduled, target = _lower(_matmul_module(x.shape, w, "int8"), "aarch64-dotprod")
    assert len(_dot_calls(scheduled)) == 1
    lib = tmp_path / "m.so"
    tvm.compile(scheduled, target).export_library(
        str(lib), fcompile=tvm.support.cc.cross_compiler(QEMU_ARCHES["aarch64"]["cxx"]))
    (got,) = qemu.run_library(lib, "aarch64", [x], cache_dir=RUNNER_CACHE).outputs
    np.testing.assert_array_equal(got, (x.astype(np.int64) @ w.astype(np.int64)).astype(np.float32) * np.float32(0.5))


def test_unknown_dot_kernel_in_target_file_is_one_line_error(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text('[my-board]\nfamily = "aarch64"\ntarget = { kind = "llvm", mtriple = "aarch64-linux-gnu" }\n'
                 'features = { int8_dot = ["sdot", "vnni"] }\n')
    with pytest.raises(TargetError, match="int8_dot 'vnni' is not one of vpdpbusd, avxvnni, pmaddubsw, pmaddwd, sdot") as err:
        load_target_files([f])
    assert "\n" not in str(err.value)


def test_residual_epilogue_fuses_into_the_kernel():
    """A dequantized residual input of the epilogue is inlined into the scheduled kernel."""
    rng = np.random.default_rng(6)
    x = rng.integers(-128, 128, (1, 16, 8, 8)).astype("int8")
    r = rng.integers(-128, 128, (1, 16, 8, 8)).astype("int8")
    w = rng.integers(-128, 128, (16, 16, 3, 3)).astype(np.int8)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x.shape, "int8"))
    rv = relax.Var("r", relax.TensorType(r.shape, "int8"))
    with bb.function("main", [xv, rv]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(xv, relax.const(w), padding=1, out_dtype="int32"))
            y = bb.emit(relax.op.astype(y, "float32"))
            res = bb.emit(relax.op.dequantize(rv, relax.const(np.float32(4.0)), relax.const(0, "int8")))
            gv = bb.emit_output(relax.op.add(y, res))
        bb.emit_func_output(gv)
    scheduled, target = _lower(bb.get(), "x86-avx2")
    assert _scheduled_kernels(scheduled)
    ex = tvm.compile(scheduled, target)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(r)).numpy()
    ref = _reference(x, w, (1, 1), (1, 1), (1, 1), 1).astype(np.float32) + 4.0 * r.astype(np.float32)
    np.testing.assert_array_equal(got, ref)


DEMO = Path(__file__).resolve().parents[1] / "tvm_compress" / "data"


def test_sdot_target_gets_int8_activations():
    """auto activations would give uint8 after ReLU; sdot takes int8 only, so the flow picks
    symmetric int8 for +dotprod presets and says so, and every conv is packed for sdot."""
    from tvm_compress.loader import load_onnx
    from tvm_compress.pass_registry import PassEnv, get_preset, make_config
    from tvm_compress.specs import InputSpec

    logs = []
    profile = get_target("aarch64-dotprod")
    env = PassEnv(inputs=[InputSpec("input", (1, 1, 28, 28), "float32")],
                  facts=get_family(profile.family).facts(profile), log=logs.append)
    preset = get_preset("quantize")
    config = make_config(preset, {"calib": str(DEMO / "fashion_test.npz") + ":calib", "calib_samples": 50})
    qmod = preset.make(config, env)(load_onnx(DEMO / "fashion_cnn.onnx", {"input": (1, 1, 28, 28)}))
    layers = env.report["quantize"]["layers"]
    assert {l["input_quant"]["dtype"] for l in layers} == {"int8"}
    assert any("int8 activations" in m and "sdot" in m for m in logs)
    with profile.tvm_target():
        lowered = tvm.transform.Sequential(pipeline.lowering_passes(profile))(qmod)
    # the three convolutions and the two dense layers are packed
    assert len(_packed_kernels(lowered)) == 5



def _x86_presets(tmp_path):
    """Four x86 presets with the x86 preset's kernel list and CPUs with AVX-512 VNNI, AVX-VNNI
    (no AVX-512), AVX2 only, none of them."""
    f = tmp_path / "t.toml"
    f.write_text("".join(
        f'[{name}]\nfamily = "x86"\ntarget = {{ kind = "llvm", mcpu = "{cpu}" }}\n'
        'features = { int8_dot = ["vpdpbusd", "avxvnni", "pmaddwd"] }\n'
        for name, cpu in [("vnni-cpu", "icelake-server"), ("avxvnni-cpu", "alderlake"), ("avx2-cpu", "haswell"),
                          ("old-cpu", "nehalem")]
    ))
    load_target_files([f])


def test_kernel_list_picks_the_first_the_cpu_has(tmp_path):
    """``int8_dot`` as a preference list: VNNI where the CPU has it, else the AVX2 kernel."""
    _x86_presets(tmp_path)
    assert target_kernel(get_target("vnni-cpu")).name == "vpdpbusd"
    assert target_kernel(get_target("avxvnni-cpu")).name == "avxvnni"
    assert target_kernel(get_target("avx2-cpu")).name == "pmaddwd"
    assert target_kernel(get_target("old-cpu")) is None  # no packed kernels: generic int8


def test_vnni_kernel_compiles_for_a_vnni_cpu(tmp_path):
    """The kernel choice without running it: code for an Ice Lake server has ``vpdpbusd``."""
    _x86_presets(tmp_path)
    mod, *_ = _case("3x3", act="int8")
    scheduled, target = _lower(mod, "vnni-cpu")
    assert re.search(r"\bvpdpbusd\s[^\n]*%zmm", _asm(scheduled, target))
