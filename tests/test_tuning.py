"""MetaSchedule tuning: a short run finishes, records are cached and reused."""

from __future__ import annotations

from pathlib import Path

import pytest

import tvm_compress

pytestmark = pytest.mark.slow


def test_short_tuning_run_then_cache_reuse(dense_model, tmp_path):
    quiet = lambda m: None  # noqa: E731
    first = tvm_compress.compile(dense_model, tmp_path / "a.so", tune_trials=4, bench_runs=3, log=quiet)
    t = first["tuning"]
    assert t["trials"] == 4 and t["new_trials"] == 4 and t["tasks"] >= 1
    assert t["failed_trials"] == 0  # measured for real, not recorded as 1e10 s failures
    assert first["max_rel_err"] < 1e-4  # tuned kernels still compute the model

    again = tvm_compress.compile(dense_model, tmp_path / "b.so", tune_trials=4, bench_runs=3, log=quiet)
    assert again["tuning"]["new_trials"] == 0 and again["tuning"]["cached_trials"] == 4
    assert again["tuning"]["work_dir"] == t["work_dir"]
    assert again["max_rel_err"] < 1e-4


def test_budget_reaches_every_task(conv_model, tmp_path):
    """With fewer trials than tasks x 64, every task still gets measured candidates."""
    import json
    from pathlib import Path

    log = []
    rep = tvm_compress.compile(conv_model, tmp_path / "c.so", tune_trials=8, bench_runs=1, log=log.append)
    tasks = rep["tuning"]["tasks"]
    assert tasks >= 2
    work = Path(rep["tuning"]["work_dir"])
    workloads = (work / "database_workload.json").read_text().strip().splitlines()
    assert len(workloads) == tasks
    assert any(line.startswith("tuning:") and "ETA" in line for line in log)


def test_a_corrupted_cache_is_set_aside_and_tuning_starts_over(dense_model, tmp_path):
    """A database line that is not JSON (a full disk, a cut copy) must not stop later compiles."""
    logs = []
    rep = tvm_compress.compile(dense_model, tmp_path / "a.so", tune_trials=2, bench_runs=1, log=lambda m: None)
    work = Path(rep["tuning"]["work_dir"])
    with open(work / "database_tuning_record.json", "a") as f:
        f.write('[0, [["garbage\n')
    rep = tvm_compress.compile(dense_model, tmp_path / "b.so", tune_trials=2, bench_runs=1, log=logs.append)
    assert any("are corrupted; moved to" in m for m in logs)
    assert rep["tuning"]["new_trials"] == 2 and rep["verified"]
    assert list(work.parent.glob(f"{work.name}.corrupt-*"))


def test_a_record_cut_off_by_a_killed_compile_is_dropped_and_the_rest_reused(dense_model, tmp_path):
    rep = tvm_compress.compile(dense_model, tmp_path / "a.so", tune_trials=2, bench_runs=1, log=lambda m: None)
    work = Path(rep["tuning"]["work_dir"])
    with open(work / "database_tuning_record.json", "a") as f:
        f.write('[0, [[["GetSBlock", [], ["matm')  # no newline: the process died mid-write
    logs = []
    rep = tvm_compress.compile(dense_model, tmp_path / "b.so", tune_trials=2, bench_runs=1, log=logs.append)
    assert any("dropped an unfinished last record" in m for m in logs)
    assert rep["tuning"]["new_trials"] == 0 and rep["tuning"]["cached_trials"] == 2 and rep["verified"]
