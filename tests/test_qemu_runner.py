"""The C++ deploy runner (targets/runner/tvm_runner.cc): its build (runner_build) and runs (qemu).

Libraries are compiled here for x86_64 (run natively), aarch64 and armv7 (run under qemu-user)
and compared with onnxruntime. Also: what the ARM code generator emits (NEON fmla, sdot).

Runners are built into the user's cache ($TVM_COMPRESS_RUNNER_CACHE, $TVM_COMPRESS_CACHE or
~/.cache/tvm-compress, read when this module is imported, i.e. before conftest points TVM_COMPRESS_CACHE at a per-session directory)
so that later sessions reuse them: the first aarch64 run downloads the aarch64 wheels (~100 MB),
the first armv7 run compiles tvm-ffi and the TVM runtime (several minutes on 2 cores). Runners are
build tools, not test data: sharing them changes no result.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from tvm_compress.errors import DataError, TargetError  # noqa: E402
from tvm_compress.cache import runner_cache_dir  # noqa: E402
from tvm_compress.targets import qemu, runner_build  # noqa: E402
from tvm_compress.targets.arches import QEMU_ARCHES  # noqa: E402
from tvm_compress.targets.runner_sdk import RUNTIME_LIBS  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RUNNER_CACHE = runner_cache_dir()  # evaluated at collection, before conftest's override
RTOL = 1e-5
ATOL = 1e-5


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _need(arch: str) -> None:
    """Skip (with the reason) when libraries for ``arch`` cannot be run on this machine."""
    ok, why = qemu.can_run(arch, cache_dir=RUNNER_CACHE)
    if not ok:
        pytest.skip(why)


def _run(lib, arch, inputs, **kwargs):
    return qemu.run_library(lib, arch, inputs, cache_dir=RUNNER_CACHE, **kwargs)


def _export(mod, arch: str, path: Path, target: dict | None = None) -> Path:
    facts = QEMU_ARCHES[arch]
    executable = tvm.compile(mod, tvm.target.Target(target or facts["target"]))
    if arch == "x86_64":
        executable.export_library(str(path))
    else:
        executable.export_library(str(path), fcompile=tvm.support.cc.cross_compiler(facts["cxx"]))
    return path


class _Net:
    """A small conv net exported to ONNX, imported into Relax, with onnxruntime as reference."""

    def __init__(self, two_outputs: bool):
        torch = pytest.importorskip("torch")
        onnx = pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")
        from tvm.relax.frontend.onnx import from_onnx

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
                self.fc = torch.nn.Linear(8 * 8 * 8, 10)

            def forward(self, x):
                y = torch.relu(self.conv(x))
                logits = self.fc(y.flatten(1))
                if two_outputs:
                    return logits, y.mean(dim=(2, 3))
                return logits

        torch.manual_seed(0)
        net = Net().eval()
        self.input_shape = (1, 3, 8, 8)
        buf = io.BytesIO()
        torch.onnx.export(
            net, (torch.zeros(self.input_shape),), buf, input_names=["x"], dynamo=False
        )
        self.onnx_bytes = buf.getvalue()
        self.mod = from_onnx(
            onnx.load_from_string(self.onnx_bytes),
            shape_dict={"x": list(self.input_shape)},
            keep_params_in_input=False,
        )

    def input(self, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).standard_normal(self.input_shape).astype(np.float32)

    def reference(self, x: np.ndarray) -> list[np.ndarray]:
        import onnxruntime as ort

        sess = ort.InferenceSession(self.onnx_bytes, providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": x})


@pytest.fixture(scope="module")
def net():
    return _Net(two_outputs=False)


@pytest.fixture(scope="module")
def net2():
    return _Net(two_outputs=True)


def _dtype_module():
    """main(int8, uint8, int32, int64, float16, float32) -> a tuple of one result per input."""
    shape = (2, 3)
    dtypes = ["int8", "uint8", "int32", "int64", "float16", "float32"]
    bb = relax.BlockBuilder()
    params = [relax.Var(f"x_{dt}", relax.TensorType(shape, dt)) for dt in dtypes]
    with bb.function("main", params):
        with bb.dataflow():
            outs = []
            for p, dt in zip(params, dtypes):
                two = relax.const(np.full(shape, 2, dtype=dt), dtype=dt)
                outs.append(bb.emit(relax.op.multiply(p, two)))
            gv = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(gv)
    rng = np.random.default_rng(1)
    inputs = []
    for dt in dtypes:
        if dt.startswith("float"):
            inputs.append(rng.standard_normal(shape).astype(dt))
        else:
            info = np.iinfo(dt)
            inputs.append(rng.integers(max(info.min, -1000), min(info.max, 1000), shape).astype(dt))
    refs = [x * np.array(2, dtype=x.dtype) for x in inputs]  # wraps like TVM for int8/uint8
    return bb.get(), inputs, refs


def _check_close(outputs, refs):
    assert len(outputs) == len(refs)
    for got, ref in zip(outputs, refs):
        assert got.shape == ref.shape and got.dtype == ref.dtype
        np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# x86_64: the runner itself, natively
# ---------------------------------------------------------------------------------------------


def test_x86_64_runner_matches_onnxruntime(net2, tmp_path):
    _need("x86_64")
    lib = _export(net2.mod, "x86_64", tmp_path / "net_x86.so")
    x = net2.input()
    res = _run(lib, "x86_64", [x], repeat=3, warmup=1)
    _check_close(res.outputs, net2.reference(x))
    assert len(res.times_ms) == 3 and all(t > 0 for t in res.times_ms)


@pytest.mark.parametrize("arch", ["x86_64", pytest.param("aarch64", marks=pytest.mark.slow),
                                  pytest.param("armv7", marks=pytest.mark.slow)])
def test_dtypes(arch, tmp_path):
    _need(arch)
    mod, inputs, refs = _dtype_module()
    lib = _export(mod, arch, tmp_path / f"dtypes_{arch}.so")
    res = _run(lib, arch, inputs)
    for got, ref in zip(res.outputs, refs):
        assert got.dtype == ref.dtype
        np.testing.assert_array_equal(got, ref)


def test_runner_cli_contract(net2, tmp_path):
    """The command line and the JSON line Python depends on."""
    _need("x86_64")
    runner = runner_build.ensure_runner("x86_64", cache_dir=RUNNER_CACHE)
    lib = _export(net2.mod, "x86_64", tmp_path / "net_x86.so")
    x = net2.input()
    x.tofile(tmp_path / "x.bin")
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(
        [str(runner), str(lib), "--input", f"float32:1x3x8x8:{tmp_path / 'x.bin'}",
         "--out-dir", str(out), "--repeat", "2", "--warmup", "1"],
        capture_output=True, text=True, check=True,
    )
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    import json

    report = json.loads(lines[0])
    assert [o["file"] for o in report["outputs"]] == ["out_0.bin", "out_1.bin"]
    assert report["outputs"][0] == {"dtype": "float32", "shape": [1, 10], "file": "out_0.bin"}
    assert len(report["times_ms"]) == 2
    ref = net2.reference(x)
    got = np.fromfile(out / "out_0.bin", dtype=np.float32).reshape(1, 10)
    np.testing.assert_allclose(got, ref[0], rtol=RTOL, atol=ATOL)

    # usage errors: one message on stderr, exit 2
    bad = subprocess.run([str(runner), str(lib)], capture_output=True, text=True)
    assert bad.returncode == 2 and "--out-dir" in bad.stderr
    # an input that does not fit main: exit 3
    bad = subprocess.run(
        [str(runner), str(lib), "--input", f"int32:1x3x8x8:{tmp_path / 'x.bin'}",
         "--out-dir", str(out)],
        capture_output=True, text=True,
    )
    assert bad.returncode == 3 and "dtype" in bad.stderr


# ---------------------------------------------------------------------------------------------
# aarch64 under qemu-aarch64
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_aarch64_matches_onnxruntime(net, tmp_path):
    _need("aarch64")
    lib = _export(net.mod, "aarch64", tmp_path / "net_a64.so")
    for seed in (0, 1):
        x = net.input(seed)
        res = _run(lib, "aarch64", [x])
        _check_close(res.outputs, net.reference(x))
    assert len(res.times_ms) == 1


@pytest.mark.slow
def test_aarch64_tuple_output(net2, tmp_path):
    _need("aarch64")
    lib = _export(net2.mod, "aarch64", tmp_path / "net2_a64.so")
    x = net2.input(3)
    res = _run(lib, "aarch64", [x], repeat=2, warmup=1)
    _check_close(res.outputs, net2.reference(x))
    assert [o.shape for o in res.outputs] == [(1, 10), (1, 8)]
    assert len(res.times_ms) == 2


@pytest.mark.slow
def test_aarch64_topk_needs_runtime_extra(tmp_path):
    """topk lowers to a call of tvm.contrib.sort.topk, which lives in libtvm_runtime_extra.so."""
    _need("aarch64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 50), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            gv = bb.emit_output(bb.emit(relax.op.topk(x, k=4, axis=-1, ret_type="both")))
        bb.emit_func_output(gv)
    lib = _export(bb.get(), "aarch64", tmp_path / "topk_a64.so")
    xv = np.random.default_rng(2).standard_normal((1, 50)).astype(np.float32)
    values, indices = _run(lib, "aarch64", [xv]).outputs
    order = np.argsort(-xv[0])[:4]
    np.testing.assert_array_equal(indices[0], order)
    np.testing.assert_array_equal(values[0], xv[0][order])


# ---------------------------------------------------------------------------------------------
# armv7 (hard-float) under qemu-arm; the runtime is built from source
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_armv7_matches_onnxruntime(net2, tmp_path):
    _need("armv7")
    lib = _export(net2.mod, "armv7", tmp_path / "net2_armv7.so")
    head = lib.read_bytes()[:20]
    assert head[4] == 1 and int.from_bytes(head[18:20], "little") == 40  # ELF32, EM_ARM
    x = net2.input(4)
    res = _run(lib, "armv7", [x], repeat=2)
    _check_close(res.outputs, net2.reference(x))


# ---------------------------------------------------------------------------------------------
# errors: one line, the right family
# ---------------------------------------------------------------------------------------------


def _one_line(err: Exception) -> str:
    msg = str(err)
    assert "\n" not in msg and msg
    return msg


def test_missing_library_is_one_line_data_error(tmp_path):
    with pytest.raises(DataError) as exc:
        _run(tmp_path / "nope.so", "aarch64", [np.zeros(3, np.float32)])
    assert "nope.so" in _one_line(exc.value)


def test_unknown_arch_is_target_error(tmp_path):
    with pytest.raises(TargetError) as exc:
        _run(tmp_path / "x.so", "riscv64", [])
    assert "riscv64" in _one_line(exc.value)
    with pytest.raises(TargetError):
        runner_build.ensure_runner("mips")


def test_library_for_another_arch_is_data_error(net, tmp_path):
    lib = _export(net.mod, "x86_64", tmp_path / "net_x86.so")
    with pytest.raises(DataError) as exc:
        _run(lib, "aarch64", [net.input()])
    assert "x86_64" in _one_line(exc.value) and "aarch64" in str(exc.value)


def test_not_a_library_is_data_error(tmp_path):
    junk = tmp_path / "junk.so"
    junk.write_text("not an ELF file\n")
    with pytest.raises(DataError) as exc:
        _run(junk, "x86_64", [])
    _one_line(exc.value)


def test_inputs_that_do_not_fit_are_data_errors(net, tmp_path):
    _need("x86_64")
    lib = _export(net.mod, "x86_64", tmp_path / "net_x86.so")
    cases = [
        [np.zeros((1, 3, 4, 4), np.float32)],  # shape
        [np.zeros((1, 3, 8, 8), np.int32)],  # dtype
        [],  # count
        [net.input(), net.input()],  # count
    ]
    for inputs in cases:
        with pytest.raises(DataError) as exc:
            _run(lib, "x86_64", inputs)
        _one_line(exc.value)
    with pytest.raises(DataError):
        _run(lib, "x86_64", [[1.0, 2.0]])  # not an ndarray
    with pytest.raises(DataError):
        _run(lib, "x86_64", [np.zeros(3, np.complex64)])
    with pytest.raises(DataError):
        _run(lib, "x86_64", [net.input()], repeat=0)


def test_missing_cross_compiler_names_debian_package(monkeypatch, tmp_path):
    monkeypatch.setitem(QEMU_ARCHES["aarch64"], "cxx", "no-such-aarch64-g++")
    with pytest.raises(TargetError) as exc:
        runner_build.ensure_runner("aarch64", cache_dir=tmp_path)
    msg = _one_line(exc.value)
    assert "no-such-aarch64-g++" in msg and "g++-aarch64-linux-gnu" in msg
    ok, why = qemu.can_run("aarch64", cache_dir=tmp_path)
    assert not ok and "g++-aarch64-linux-gnu" in why


def test_missing_qemu_names_debian_package(monkeypatch, tmp_path, net):
    _need("aarch64")
    lib = _export(net.mod, "aarch64", tmp_path / "net_a64.so")
    monkeypatch.setitem(QEMU_ARCHES["aarch64"], "qemu", "qemu-nonexistent-aarch64")
    with pytest.raises(TargetError) as exc:
        qemu.run_library(lib, "aarch64", [net.input()], cache_dir=tmp_path / "cache")
    assert "qemu-user" in _one_line(exc.value)
    assert not (tmp_path / "cache" / "runners").exists()  # failed before building anything
    ok, why = qemu.can_run("aarch64", cache_dir=RUNNER_CACHE)
    assert not ok and "qemu-user" in why


def test_failed_download_is_one_line_target_error(monkeypatch, tmp_path):
    _need("aarch64")
    monkeypatch.setattr(
        runner_build, "tvm_versions", lambda: {"apache-tvm": "0.0.0.dev0", "apache-tvm-ffi": "0.0.0.dev0"}
    )
    with pytest.raises(TargetError) as exc:
        runner_build.ensure_runner("aarch64", cache_dir=tmp_path)
    msg = _one_line(exc.value)
    assert "download of apache-tvm==0.0.0.dev0" in msg and "manylinux_2_28_aarch64" in msg


def test_build_runner_cli_one_line_error_without_cross_compiler(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_runner.py"), "aarch64",
         "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, env={"PATH": str(empty), "HOME": str(tmp_path)},
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "g++-aarch64-linux-gnu" in lines[0], proc.stderr


def test_build_runner_cli_is_idempotent(tmp_path):
    _need("x86_64")
    cmd = [sys.executable, str(REPO / "scripts" / "build_runner.py"), "x86_64",
           "--cache-dir", str(tmp_path)]
    first = subprocess.run(cmd, capture_output=True, text=True, check=True)
    runner = Path(first.stdout.strip().splitlines()[-1])
    assert runner.is_file() and runner.parent == tmp_path / "runners" / "x86_64"
    for lib in RUNTIME_LIBS:
        assert (runner.parent / lib).is_file()
    mtime = runner.stat().st_mtime
    second = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "up to date" in second.stdout
    assert runner.stat().st_mtime == mtime


def test_qemu_arches_facts():
    for arch, facts in QEMU_ARCHES.items():
        for key in ("qemu", "sysroot", "cxx", "cxx_package", "qemu_package", "mtriple", "target"):
            assert key in facts, (arch, key)
    assert QEMU_ARCHES["aarch64"]["qemu"] == "qemu-aarch64"
    assert QEMU_ARCHES["armv7"]["cxx_package"] == "g++-arm-linux-gnueabihf"
    assert QEMU_ARCHES["aarch64"]["qemu_package"] == "qemu-user"


# ---------------------------------------------------------------------------------------------
# what the aarch64 code generator emits (assembly only: no cross compiler or qemu needed)
# ---------------------------------------------------------------------------------------------

A64_NEON = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
A64_DOTPROD = {
    "kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
    "mattr": ["+neon", "+dotprod"],
}


def _matmul_module(dtype: str, out_dtype: str, m: int, n: int, k: int):
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType((m, k), dtype))
    b = relax.Var("b", relax.TensorType((k, n), dtype))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            gv = bb.emit_output(bb.emit(relax.op.matmul(a, b, out_dtype=out_dtype)))
        bb.emit_func_output(gv)
    return bb.get()


def _asm(mod, target: dict) -> str:
    executable = tvm.compile(mod, tvm.target.Target(target))
    (llvm_mod,) = [m for m in executable.mod.imports if m.kind == "llvm"]
    return llvm_mod.inspect_source("s")


def _count(pattern: str, asm: str) -> int:
    return len(re.findall(pattern, asm))


FMLA_V = r"\bfmla\s+v\d+\.(4s|2s)"
SDOT_V = r"\bsdot\s+v\d+\.(4s|2s)"


def test_untuned_float_kernels_are_scalar_on_aarch64():
    """Documented finding (docs/deploy-runner.md): without a schedule, float matmul and conv2d
    compile to scalar fmadd loops; no NEON vector FMA."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, 16, 16), "float32"))
    w = relax.Var("w", relax.TensorType((16, 16, 3, 3), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            gv = bb.emit_output(bb.emit(relax.op.nn.conv2d(x, w, padding=1)))
        bb.emit_func_output(gv)
    for mod in (_matmul_module("float32", "float32", 64, 64, 64), bb.get()):
        asm = _asm(mod, A64_NEON)
        assert _count(r"\bfmadd\s", asm) > 0
        assert _count(FMLA_V, asm) == 0, "untuned code now uses fmla: update docs/deploy-runner.md"


def test_vectorized_float_matmul_uses_neon_fmla():
    """A schedule that vectorizes the output columns gives NEON fmla v.4s."""
    import tvm.s_tir as s_tir

    mod = relax.transform.LegalizeOps()(_matmul_module("float32", "float32", 64, 64, 64))
    sch = s_tir.Schedule(mod)
    block = sch.get_sblock("matmul", func_name="matmul")
    i, j, k = sch.get_loops(block)
    j_outer, j_inner = sch.split(j, [None, 4])
    sch.reorder(i, j_outer, k, j_inner)
    sch.vectorize(j_inner)
    sch.decompose_reduction(block, k)
    asm = _asm(sch.mod, A64_NEON)
    assert _count(FMLA_V, asm) > 0


def test_untuned_int8_matmul_sdot_depends_on_shape():
    """Documented finding: untuned int8 x int8 -> int32 matmul gets sdot from LLVM's
    vectorizer for 64x64x64 (+dotprod) but not for 128x128x128; without +dotprod it uses
    smull/saddw."""
    small = _matmul_module("int8", "int32", 64, 64, 64)
    assert _count(SDOT_V, _asm(small, A64_DOTPROD)) > 0
    no_dot = _asm(small, A64_NEON)
    assert _count(SDOT_V, no_dot) == 0 and _count(r"\bsmull2?\s", no_dot) > 0
    big = _matmul_module("int8", "int32", 128, 128, 128)
    assert _count(SDOT_V, _asm(big, A64_DOTPROD)) == 0, "update docs/deploy-runner.md"


M8, N8, K8 = 16, 32, 64


def _sdot_module():
    """int8 matmul with the weight pre-packed as [N/4, K/4, 4, 4], tensorized with TVM's
    ARM dot-product intrinsic (tvm.s_tir.tensor_intrin.arm_cpu.ARM_DOT_4x4_i8_SDOT_INTRIN)."""
    import tvm.s_tir as s_tir
    from tvm.script import tirx as T

    try:  # importing the intrinsics parses TVMScript: about a minute without this cure
        from tvm_compress import _fast_inspect
    except ImportError:  # pragma: no cover
        _fast_inspect = None
    if _fast_inspect is not None:
        _fast_inspect.install()
    try:
        from tvm.s_tir.tensor_intrin.arm_cpu import ARM_DOT_4x4_i8_SDOT_INTRIN
    finally:
        if _fast_inspect is not None:
            _fast_inspect.uninstall()

    @T.prim_func(s_tir=True)
    def mm(a: T.handle, bp: T.handle, c: T.handle):
        T.func_attr({"global_symbol": "mm", "tir.noalias": True})
        A = T.match_buffer(a, (M8, K8), "int8")
        B = T.match_buffer(bp, (N8 // 4, K8 // 4, 4, 4), "int8")
        C = T.match_buffer(c, (M8, N8), "int32")
        for i, j, k in T.grid(M8, N8, K8):
            with T.sblock("C"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                with T.init():
                    C[vi, vj] = 0
                C[vi, vj] = C[vi, vj] + T.cast(A[vi, vk], "int32") * T.cast(
                    B[vj // 4, vk // 4, vj % 4, vk % 4], "int32"
                )

    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType((M8, K8), "int8"))
    b = relax.Var("b", relax.TensorType((N8 // 4, K8 // 4, 4, 4), "int8"))
    gv_mm = bb.add_func(mm, "mm")
    with bb.function("main", [a, b]):
        with bb.dataflow():
            c = bb.emit(relax.call_tir(gv_mm, [a, b], relax.TensorType((M8, N8), "int32")))
            gv = bb.emit_output(c)
        bb.emit_func_output(gv)
    sch = s_tir.Schedule(bb.get())
    block = sch.get_sblock("C", func_name="mm")
    i, j, k = sch.get_loops(block)
    j_outer, j_inner = sch.split(j, [None, 4])
    k_outer, k_inner = sch.split(k, [None, 4])
    sch.reorder(i, j_outer, k_outer, j_inner, k_inner)
    sch.decompose_reduction(block, k_outer)
    sch.tensorize(j_inner, ARM_DOT_4x4_i8_SDOT_INTRIN)
    return sch.mod


@pytest.fixture(scope="module")
def sdot_module():
    return _sdot_module()


def test_tensorized_int8_matmul_uses_sdot(sdot_module):
    asm = _asm(sdot_module, {"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                             "mattr": ["+neon", "+dotprod"]})
    assert _count(r"\bsdot\s+v\d+\.4s,\s*v\d+\.16b,\s*v\d+\.16b", asm) > 0


@pytest.mark.slow
def test_tensorized_sdot_matmul_runs_under_qemu(sdot_module, tmp_path):
    _need("aarch64")
    target = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}
    lib = _export(sdot_module, "aarch64", tmp_path / "sdot_a64.so", target=target)
    rng = np.random.default_rng(5)
    a = rng.integers(-128, 128, (M8, K8), dtype=np.int8)
    b_nk = rng.integers(-128, 128, (N8, K8), dtype=np.int8)
    b_packed = np.ascontiguousarray(
        b_nk.reshape(N8 // 4, 4, K8 // 4, 4).transpose(0, 2, 1, 3)
    )
    (got,) = _run(lib, "aarch64", [a, b_packed]).outputs
    np.testing.assert_array_equal(got, a.astype(np.int32) @ b_nk.T.astype(np.int32))
