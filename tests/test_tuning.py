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
    _default_schedules_are_recorded(dense_model, Path(t["work_dir"]))

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


def test_rounds_follow_the_budget_per_task():
    from tvm_compress.tuning import GRADIENT_MIN_TRIALS_PER_TASK, _rounds

    few = GRADIENT_MIN_TRIALS_PER_TASK * 10 - 1
    assert _rounds(few, 10, "auto") == ("round-robin", 16, 16)
    assert _rounds(few + 1, 10, "auto") == ("gradient", 8, few + 1)  # first rounds: half the budget
    assert _rounds(8, 10, "round-robin") == ("round-robin", 1, 1)
    assert _rounds(8, 10, "gradient") == ("gradient", 1, 8)
    with pytest.raises(tvm_compress.errors.TargetError, match="scheduler must be one of"):
        from tvm_compress.tuning import tune
        tune(None, None, 1, Path("."), scheduler="fastest")


def test_gradient_scheduler_spends_the_trials_where_the_time_is(tmp_path):
    """A big matmul next to a tiny add: after one round each, the gradient scheduler gives the
    rest of the budget to the matmul; progress shows the model estimate falling."""
    import json

    import numpy as np
    from tvm import relax

    from tvm_compress.pipeline import Lower, Schedule
    from tvm_compress.targets import get_target

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 512), "float32"))
    v = relax.Var("v", relax.TensorType((1, 4), "float32"))
    w = np.random.default_rng(0).standard_normal((512, 512)).astype("float32")
    with bb.function("main", [x, v]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.matmul(x, relax.const(w))))
            z = bb.emit(relax.op.add(v, relax.const(np.ones((1, 4), "float32"))))
            out = bb.emit_output(relax.Tuple([y, z]))
        bb.emit_func_output(out)
    profile = get_target("x86")
    log = []
    mod = Schedule(profile, 16, tmp_path / "db", scheduler="gradient", log=log.append)(Lower(profile)(bb.get()))
    summary = json.loads(str(mod.attrs["tvm_compress.tuning"]))
    assert summary["scheduler"] == "gradient" and summary["tasks"] == 2
    from tvm.s_tir import meta_schedule as ms

    records = ms.database.JSONDatabase(work_dir=str(tmp_path / "db")).get_all_tuning_records()
    big = ["512" in str(r.workload.mod) for r in records]  # the matmul's [512, 512] weight
    per_task = {"matmul": sum(big), "add": len(big) - sum(big)}
    # a first round of 4 each (the add has fewer distinct schedules), then all to the matmul
    # (round-robin would stop the matmul at 8); the last round may overshoot the budget
    assert 1 <= per_task["add"] <= 4 and per_task["matmul"] >= 16 - per_task["add"], per_task
    assert summary["estimate_ms"] <= summary["first_estimate_ms"]
    assert any("model estimate" in str(line) for line in log)



def _default_schedules_are_recorded(model, work: Path):
    """Every task's default schedule was measured and recorded before the search, so each
    kernel's best record is at worst what ``--tune-trials 0`` builds (a small budget cannot end
    slower); those records are not counted as trials (the caller checks the count)."""
    import tvm
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    from tvm_compress.pipeline import lowering_passes
    from tvm_compress.targets import get_family, get_target
    from tvm_compress.targets.cpu_schedule import CPUFallback

    profile = get_target("x86")
    target = profile.tvm_target()
    mod = tvm_compress.prepare_onnx(model).to_relax()
    with target:
        mod = tvm.transform.Sequential(lowering_passes(profile))(mod)
    database = ms.database.JSONDatabase(work_dir=str(work))
    tasks = ms.relax_integration.extract_tasks(mod, target)
    assert tasks
    for task in tasks:
        records = database.get_top_k(database.commit_workload(task.mod), 1000)
        default = CPUFallback(lanes=get_family("x86").vector_lanes(profile)).apply(task.mod["main"], target, False).mod
        seeds = []
        for rec in records:
            sch = tvm.s_tir.Schedule(task.mod)
            rec.trace.apply_to_schedule(sch, remove_postproc=False)
            if tvm_ffi.structural_equal(sch.mod["main"], default["main"]):
                seeds.append(rec)
        assert seeds and all(0 < float(v) < 1 for v in seeds[0].run_secs), task.task_name  # measured


def test_a_kernel_no_default_rule_schedules_is_seeded_as_it_is(tmp_path):
    """A softmax matches no default rule: its seed record is the kernel left as it is (what
    ``--tune-trials 0`` builds), so a small budget cannot leave a random trial as its only
    record (a PP-OCRv4 recognizer build once kept one that ran 3 s a call)."""
    import numpy as np
    import tvm
    import tvm_ffi
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    from tvm_compress.pipeline import Lower, Schedule
    from tvm_compress.targets import get_target

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((40, 97), "float32"))
    w = np.random.default_rng(0).standard_normal((97, 97)).astype("float32")
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.const(w)))
            out = bb.emit_output(relax.op.nn.softmax(y, axis=-1))
        bb.emit_func_output(out)
    profile = get_target("x86")
    Schedule(profile, 2, tmp_path / "db", scheduler="round-robin")(Lower(profile)(bb.get()))
    database = ms.database.JSONDatabase(work_dir=str(tmp_path / "db"))
    softmax = [r.workload for r in database.get_all_tuning_records()
               if len(r.workload.mod["main"].params) == 2]  # the matmul has 3
    assert softmax, "no record for the softmax task"
    # What the build may apply: the top records (an invalid record would be left out here).
    unscheduled = tvm.s_tir.Schedule(softmax[0].mod)
    as_is = []
    for rec in database.get_top_k(softmax[0], 100):
        sch = tvm.s_tir.Schedule(softmax[0].mod)
        rec.trace.apply_to_schedule(sch, remove_postproc=False)
        if tvm_ffi.structural_equal(sch.mod, unscheduled.mod):
            as_is.append(rec)
    assert as_is and 0 < min(float(t) for t in as_is[0].run_secs) < 1  # measured, not a failure


def test_a_changed_default_schedule_is_measured_into_cached_records(tmp_path):
    """Records cached by an older default schedule (a newer tvm-compress since) still get the
    new default schedule measured and recorded, even when no trial is left to run, so the
    build can pick it; unchanged, nothing is measured again."""
    import numpy as np
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    from tvm_compress.pipeline import Lower
    from tvm_compress.targets import get_target
    from tvm_compress.targets.cpu_schedule import CPUFallback
    from tvm_compress.tuning import tune

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 256), "float32"))
    w = np.random.default_rng(1).standard_normal((256, 128)).astype("float32")
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, relax.const(w)))
        bb.emit_func_output(out)
    profile = get_target("x86")
    target = profile.tvm_target()
    low = Lower(profile)(bb.get())
    work = tmp_path / "db"
    old, new = CPUFallback(lanes=16), CPUFallback(lanes=4)  # two versions of the default
    tune(low, target, 2, work, seed_rules=[old])
    logs = []
    summary = tune(low, target, 2, work, log=logs.append, seed_rules=[new])
    assert summary.new_trials == 0 and summary.cached_trials == 2
    assert any("changed since they were tuned" in m for m in logs), logs

    database = ms.database.JSONDatabase(work_dir=str(work))
    (record,) = [r for r in database.get_all_tuning_records()][:1]
    func = record.workload.mod["main"]
    wanted = str(new.apply(func, target, False).trace.as_json(remove_postproc=False))
    assert any(str(r.trace.as_json(remove_postproc=False)) == wanted
               for r in database.get_top_k(record.workload, 100))
    logs.clear()
    tune(low, target, 2, work, log=logs.append, seed_rules=[new])
    assert not any("changed since" in m for m in logs), logs
