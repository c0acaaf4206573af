"""Every target family compiles the demo model; ARM runs under qemu, CUDA builds without a GPU."""

from __future__ import annotations

import json
import shutil

import pytest

import tvm_compress
from tvm_compress import errors
from tvm_compress.cli import main
from tvm_compress.targets import get_family, get_target

SHAPE = {"input": (1, 1, 28, 28)}
quiet = lambda m: None  # noqa: E731


def _needs(tool: str):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed")


@pytest.mark.slow
@pytest.mark.parametrize("target", ["aarch64", "rpi5", "armv7"])
def test_arm_library_runs_under_qemu_and_matches(demo_model, tmp_path, target):
    profile = get_target(target)
    _needs(get_family(profile.family).cross_cc)
    ok, why = get_family(profile.family).can_run(profile)
    if not ok:
        pytest.skip(why)
    out = tmp_path / f"{target}.so"
    rep = tvm_compress.compile(demo_model, out, target=target, input_shapes=SHAPE, log=quiet)
    assert rep["verified"] and rep["max_rel_err"] < 1e-4
    assert rep["latency_ms"] is None and "emulated" in rep["latency_note"]
    magic = out.read_bytes()[:20]
    assert magic[:4] == b"\x7fELF"
    machine = int.from_bytes(magic[18:20], "little")
    assert machine == (183 if profile.family == "aarch64" else 40)  # EM_AARCH64 / EM_ARM


def test_cuda_builds_without_gpu(demo_model, tmp_path):
    _needs("nvcc")
    out = tmp_path / "cuda.so"
    rep = tvm_compress.compile(demo_model, out, target="cuda-sm80", input_shapes=SHAPE, log=quiet)
    assert out.exists() and rep["artifact_bytes"] > 0
    man = json.loads(out.with_suffix(".json").read_text())
    assert man["tvm_target"]["kind"] == "cuda" and man["tvm_target"]["arch"] == "sm_80"
    ok, why = get_family("cuda").can_run(get_target("cuda-sm80"))
    if ok:
        assert rep["verified"] and rep["max_rel_err"] < 1e-3
        assert rep["latency_ms"]["median"] > 0
    else:
        assert rep["verify_status"] == "not run: no GPU" and rep["max_rel_err"] is None


def test_x86_code_for_a_cpu_this_one_is_not_builds_and_is_not_run(demo_model, tmp_path, monkeypatch):
    """An x86 preset whose code uses an extension this CPU lacks (``x86-avxvnni`` on a CPU
    without AVX-VNNI, seen here by hiding the flag) is built and reported not run, with the
    extension named: running it would die on an illegal instruction."""
    from tvm_compress.targets import x86

    flags = x86.host_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo")
    monkeypatch.setattr(x86, "host_flags", lambda: flags - {"avx_vnni"})
    profile = get_target("x86-avxvnni")
    ok, why = get_family("x86").can_run(profile)
    assert not ok and "avxvnni" in why
    out = tmp_path / "adl.so"
    rep = tvm_compress.compile(demo_model, out, target="x86-avxvnni", input_shapes=SHAPE,
                               passes="quantize", pass_configs={"quantize": {"calib": "random"}}, log=quiet)
    assert out.exists() and not rep["verified"] and "avxvnni" in rep["verify_status"]
    assert rep["kernel_check"]["checked"] == 0
    assert get_family("x86").tuning_runner(profile) is None  # no local trials either


def test_jetson_preset_cross_compiles_the_host_side(demo_model, tmp_path):
    _needs("nvcc")
    _needs("aarch64-linux-gnu-g++")
    out = tmp_path / "orin.so"
    rep = tvm_compress.compile(demo_model, out, target="jetson-orin", input_shapes=SHAPE, log=quiet)
    assert int.from_bytes(out.read_bytes()[18:20], "little") == 183
    assert "needs the board" in rep["verify_status"]


def test_missing_cross_compiler_names_the_debian_package(demo_model, tmp_path, monkeypatch, capsys):
    real_which = shutil.which
    monkeypatch.setattr(
        "tvm_compress.targets.base.shutil.which",
        lambda name: None if name == "arm-linux-gnueabihf-g++" else real_which(name),
    )
    code = main(["compile", str(demo_model), "-o", str(tmp_path / "a.so"), "--target", "armv7",
                 "--input-shape", "input=1,1,28,28"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.count("\n") == 0
    assert "arm-linux-gnueabihf-g++" in err and "apt-get install g++-arm-linux-gnueabihf" in err
    assert not (tmp_path / "a.so").exists()


def test_bad_target_file_family(tmp_path):
    from tvm_compress.targets import load_target_files

    f = tmp_path / "t.toml"
    f.write_text('[b]\nfamily = "mips"\ntarget = { kind = "llvm" }\n')
    with pytest.raises(errors.TargetError, match="unknown target family 'mips'"):
        load_target_files([f])


def test_kernel_argument_checks_are_off_unless_a_preset_keeps_them(demo_model, tmp_path):
    """The VM checks the model's inputs; its kernels' own checks of each argument are left out
    of the library (smaller, ~10 ns less a call) unless ``features.kernel_arg_checks``."""
    import numpy as np
    import tvm
    from tvm import relax

    presets = tmp_path / "t.toml"
    presets.write_text('[avx2-checked]\nfamily = "x86"\ndescription = "x86-avx2, kernel argument checks"\n'
                       'target = { kind = "llvm", mcpu = "haswell", num-cores = 2 }\n'
                       'features = { kernel_arg_checks = true }\n')
    libs = {}
    for name in ("x86-avx2", "avx2-checked"):
        libs[name] = tmp_path / f"{name}.so"
        assert main(["compile", str(demo_model), "--input-shape", "input=1,1,28,28", "--target", name,
                     "--targets-file", str(presets), "--tune-trials", "0", "--bench-runs", "0",
                     "-o", str(libs[name]), "--quiet"]) == 0
    marker = b"Mismatched type on argument"  # the text of TVM's packed-API argument checks
    assert marker in libs["avx2-checked"].read_bytes()
    assert marker not in libs["x86-avx2"].read_bytes()
    assert libs["x86-avx2"].stat().st_size < libs["avx2-checked"].stat().st_size
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(libs["x86-avx2"])), tvm.cpu())
    with pytest.raises(Exception, match="29 vs. 28"):  # the VM's own check of the model's input
        vm["main"](tvm.runtime.tensor(np.zeros((1, 1, 28, 29), np.float32)))


@pytest.mark.parametrize("module, hook, feature", [
    ("float_depthwise", "FLOAT_DEPTHWISE", "float_depthwise"),
    ("separable_resize", "SEPARABLE_RESIZE", "separable_resize"),
])
def test_float_kernel_hooks_are_on_for_the_cpu_families_unless_a_preset_turns_them_off(module, hook, feature):
    import dataclasses
    import importlib

    hook = getattr(importlib.import_module(f"tvm_compress.targets.{module}"), hook)
    for name in ("x86", "x86-avx2", "aarch64", "armv7"):
        profile = get_target(name)
        assert hook in get_family(profile.family).hooks(profile)
        off = dataclasses.replace(profile, features={**profile.features, feature: False})
        assert hook not in get_family(profile.family).hooks(off)
