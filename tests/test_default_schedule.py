"""Default schedules survive a rule that raises on a kernel (ResilientDefaultSchedule), and the
CUDA presets carry the device limits the GPU rules ask for."""

from __future__ import annotations

import shutil

import pytest
from tvm.s_tir import dlight as dl

import tvm_compress
from tvm_compress import errors
from tvm_compress.targets import get_family, get_target, target_names
from tvm_compress.targets.cpu_schedule import CPUFallback
from tvm_compress.targets.default_schedule import ResilientDefaultSchedule

quiet = lambda m: None  # noqa: E731
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc: CUDA code cannot be built here")


class _Raises:
    """A rule with a bug: raises on every matmul-like kernel (as dlight's gpu.Matmul did on a
    published detector: "consumers of the cache-write stage that are not properly inlined")."""

    def apply(self, func, target, tunable):
        if "matmul" in str(func.script()):  # test rule: which kernels it breaks on
            raise AssertionError("There are some consumers of the cache-write stage that are not properly inlined.")
        return None


def _with_rules(monkeypatch, family: str, *rules):
    monkeypatch.setattr(type(get_family(family)), "default_schedule",
                        lambda self, profile: [ResilientDefaultSchedule(*rules)])


def test_cpu_kernel_whose_rule_raises_falls_back_and_is_reported(dense_model, tmp_path, monkeypatch):
    _with_rules(monkeypatch, "x86", _Raises(), CPUFallback())
    logs = []
    rep = tvm_compress.compile(dense_model, tmp_path / "d.so", target="x86-avx2", bench_runs=1, log=logs.append)
    assert rep["verified"] and rep["within_float_tolerance"]
    fb = rep["schedule_fallbacks"]
    # CPUFallback where it applies; a CPU runs the others as plain loops.
    assert fb and all(f["used"] in ("CPUFallback", None) and f["failed"][0]["rule"] == "_Raises" for f in fb)
    assert all("matmul" in f["kernel"] for f in fb)
    assert any(line.startswith(f"schedule: kernel {fb[0]['kernel']}: _Raises failed (AssertionError: ")
               for line in logs)


def test_without_faults_nothing_is_reported(dense_model, tmp_path):
    rep = tvm_compress.compile(dense_model, tmp_path / "d.so", target="x86-avx2", bench_runs=1, log=quiet)
    assert rep["schedule_fallbacks"] == []


@needs_nvcc
def test_cuda_kernel_whose_rule_raises_gets_the_generic_gpu_schedule(dense_model, tmp_path, monkeypatch):
    _with_rules(monkeypatch, "cuda", _Raises(), dl.gpu.Fallback())
    rep = tvm_compress.compile(dense_model, tmp_path / "d.so", target="cuda-sm80", log=quiet)
    assert (tmp_path / "d.so").exists()
    assert rep["schedule_fallbacks"] and all(f["used"] == "Fallback" for f in rep["schedule_fallbacks"])


@needs_nvcc
def test_cuda_kernel_no_rule_can_schedule_is_one_line(dense_model, tmp_path, monkeypatch):
    _with_rules(monkeypatch, "cuda", _Raises())
    with pytest.raises(errors.TargetError, match=r"no schedule rule could schedule kernel \S*matmul\S* \(_Raises: "):
        tvm_compress.compile(dense_model, tmp_path / "d.so", target="cuda-sm80", log=quiet)
    assert not (tmp_path / "d.so").exists()


@pytest.mark.parametrize("name", [n for n in target_names() if get_target(n).family == "cuda"])
def test_cuda_presets_carry_the_device_limits(name):
    attrs = get_target(name).tvm_target().attrs
    assert int(attrs["max_shared_memory_per_block"]) == 49152
    assert int(attrs["max_threads_per_block"]) == 1024 and int(attrs["thread_warp_size"]) == 32
