"""MetaSchedule tuning: a short run finishes, records are cached and reused."""

from __future__ import annotations

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
