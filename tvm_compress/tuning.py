"""MetaSchedule tuning with a persistent, resumable per-(model, target) database.

Two local fixes over a plain ``tune_relax`` call:
- worker processes start with ``_fast_inspect.install`` as initializer (a minute per worker
  otherwise, paid again for every builder batch), and the compiling process installs it too
  before its first tune context (which imports TVM's tensor intrinsics: ~30 s of every tuned
  compile, half of a 10-trial compile of the demo model);
- the trial budget goes where the model's time is: after one short round per task (so no
  task stays on its untuned schedule), MetaSchedule's gradient scheduler (Ansor's) gives the
  next round to the task with the largest expected gain, weight x best time per round, with
  rounds small enough (``num_trials_per_iter``) that at least half the budget is handed out
  that way. ``scheduler="round-robin"`` spreads the budget evenly instead.

Progress lines show the model's estimated latency as it falls: the sum over tasks of (times the
task runs per inference) x (its best measured time).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import contextlib
import logging
import sys

import tvm
from tvm.ir.utils import derived_object
from tvm import s_tir, tirx
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
from tvm.s_tir.meta_schedule.builder import local_builder as _lb
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

from . import _fast_inspect
from .cache import cache_root
from .errors import TargetError
from .console import Progress

LogFn = Callable[[str], None]


def measurement_key(mod: tvm.IRModule, target: tvm.target.Target) -> str:
    """What a measurement of ``mod`` on ``target`` is valid for: the module, the target and the
    thread pool it ran with (``_threads``; times taken with another pool size mislead)."""
    key = hashlib.sha256()
    key.update(tvm.ir.save_json(mod).encode())
    key.update(str(target).encode())
    key.update(f"threads={os.environ.get('TVM_NUM_THREADS', '')}".encode())
    return key.hexdigest()[:24]


def database_dir(mod: tvm.IRModule, target: tvm.target.Target, root: Optional[Path] = None) -> Path:
    """One work dir per (model after passes, target): records are only valid for both."""
    return Path(root or cache_root()) / "tuning" / measurement_key(mod, target)


SCHEDULERS = ("auto", "gradient", "round-robin")
# Below this many trials per task the gradient scheduler's first rounds are too small to find
# anything (measured: docs/benchmarks.md, "Tuning schedulers"); "auto" then spreads evenly.
GRADIENT_MIN_TRIALS_PER_TASK = 16


@dataclass
class TuningSummary:
    requested_trials: int
    new_trials: int
    cached_trials: int
    tasks: int
    seconds: float
    work_dir: str
    failed_trials: int = 0
    scheduler: str = ""
    # The model latency estimate (ms) once every task had a round, and at the end.
    first_estimate_ms: Optional[float] = None
    estimate_ms: Optional[float] = None

    def as_dict(self) -> dict:
        return {
            "scheduler": self.scheduler,
            "first_estimate_ms": self.first_estimate_ms,
            "estimate_ms": self.estimate_ms,
            "failed_trials": self.failed_trials,
            "trials": self.requested_trials,
            "new_trials": self.new_trials,
            "cached_trials": self.cached_trials,
            "tasks": self.tasks,
            "seconds": round(self.seconds, 2),
            "work_dir": self.work_dir,
        }


@derived_object
class _PersistentBuilder(PyBuilder):
    """LocalBuilder's work in a worker pool that lives across batches.

    LocalBuilder restarts its pool for every batch (to dodge a slow leak in long runs); here each
    restart costs seconds of worker start-up, so with small rounds spread over many tasks the
    restarts would dominate. The pool is recycled every ``recycle`` batches instead.
    """

    def __init__(self, max_workers: int, timeout_sec: float = 60.0, recycle: int = 16):
        super().__init__()
        self.max_workers = max_workers
        self.timeout_sec = timeout_sec
        self.recycle = recycle
        self._pool = None
        self._batches = 0

    def _get_pool(self) -> PopenPoolExecutor:
        if self._pool is None or self._batches >= self.recycle:
            self.shutdown()
            self._pool = PopenPoolExecutor(
                max_workers=self.max_workers,
                timeout=self.timeout_sec,
                initializer=_fast_inspect.install,
            )
            self._batches = 0
        self._batches += 1
        return self._pool

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def build(self, build_inputs):
        pool = self._get_pool()
        args = [
            (None, None, b.mod, b.target, _lb._serialize_params(b.params)) for b in build_inputs
        ]
        results = []
        for res in pool.map_with_error_catching(lambda a: _lb._worker_func(*a), args):
            if res.status == StatusKind.COMPLETE:
                results.append(BuilderResult(res.value, None))
            elif res.status == StatusKind.TIMEOUT:
                results.append(BuilderResult(None, f"build timed out after {self.timeout_sec} s"))
            else:
                results.append(BuilderResult(None, f"build failed: {res.value}"))
        return results


@derived_object
class _Progress(ms.measure_callback.PyMeasureCallback):
    """Prints trials done / budget, the model latency estimate and an ETA after each measured
    batch. ``weights``: how often each task's kernel runs per inference."""

    def __init__(self, total: int, weights, log: LogFn):
        super().__init__()
        self.total = total
        self.weights = [float(getattr(w, "value", w)) for w in weights]
        self.best: dict = {}  # task id -> best median time (s)
        self.first_estimate: Optional[float] = None
        self.done = 0
        self.failed = 0
        self.first_error = ""
        self.log = log
        self.start = time.monotonic()

    def estimate_ms(self) -> Optional[float]:
        """Sum of weight x best time over the tasks, once each has a measurement."""
        if len(self.best) < len(self.weights):
            return None
        return 1e3 * sum(self.weights[i] * t for i, t in self.best.items())

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
        self.done += len(measure_candidates)
        for b, r in zip(builder_results, runner_results):
            err = b.error_msg or r.error_msg
            times = sorted(float(getattr(t, "value", t)) for t in (r.run_secs or []))
            # A failed measurement is recorded as 1e10 s; count it, keep the first reason.
            if err or not times or times[0] >= 1e9:
                self.failed += 1
                if not self.first_error:
                    self.first_error = (str(err or "run time 1e10 s").strip().splitlines() or [""])[-1]
                continue
            median = times[len(times) // 2]
            self.best[task_id] = min(self.best.get(task_id, median), median)
        estimate = self.estimate_ms()
        if estimate is not None and self.first_estimate is None:
            self.first_estimate = estimate
        elapsed = time.monotonic() - self.start
        left = max(self.total - self.done, 0)
        eta = elapsed / self.done * left if self.done else 0.0
        model = (f"model estimate {estimate:.3g} ms" if estimate is not None
                 else f"{len(self.best)}/{len(self.weights)} tasks measured")
        self.log(Progress(
            f"tuning: {min(self.done, self.total)}/{self.total} trials, {model}, "
            f"{elapsed:.0f}s elapsed, ETA {eta:.0f}s"
        ))


def _quiet_console_logs() -> None:
    """MetaSchedule prints every round to stdout; keep that in its log files only."""
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith("tvm.s_tir.meta_schedule") and isinstance(logger, logging.Logger):
            for handler in logger.handlers:
                if type(handler) is logging.StreamHandler:
                    handler.setLevel(logging.WARNING)


def _meta_path(work_dir: Path) -> Path:
    return work_dir / "tvm_compress_tuning.json"


def _seeds_path(work_dir: Path) -> Path:
    return work_dir / "tvm_compress_seeds.json"


def _seeded(work_dir: Path) -> int:
    """Records that are default schedules (``_seed_default_schedules``), not trials."""
    try:
        return int(json.loads(_seeds_path(work_dir).read_text())["seeded"])
    except (OSError, ValueError, KeyError):
        return 0


DATABASE_FILES = ("database_workload.json", "database_tuning_record.json")


def check_database(work_dir: Path, log: LogFn = lambda m: None) -> bool:
    """True when ``work_dir``'s records are readable. A corrupted database (a line that is not
    JSON: a disk filled up, a copy cut short, an edit) would stop every later compile of the
    model; it is moved aside (``<dir>.corrupt-<time>``) with a warning, and tuning starts over."""
    if not work_dir.is_dir():
        return True
    with open(work_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # not while another compile appends to it
        for name in DATABASE_FILES:
            if _drop_cut_last_line(work_dir / name):
                log(f"tuning: dropped an unfinished last record of {work_dir / name} (a compile was stopped)")
        bad = _first_bad_line(work_dir)
        if bad is None:
            return True
        aside = work_dir.with_name(f"{work_dir.name}.corrupt-{int(time.time())}")
        os.rename(work_dir, aside)
    log(f"tuning: warning: cached records {bad} are corrupted; moved to {aside}, tuning again")
    return False


def _drop_cut_last_line(path: Path) -> bool:
    """A compile killed while appending leaves a last line without its newline: cut it off."""
    try:
        with open(path, "rb+") as f:
            data = f.read()
            if not data or data.endswith(b"\n"):
                return False
            f.truncate(data.rfind(b"\n") + 1)
            return True
    except FileNotFoundError:
        return False


def _first_bad_line(work_dir: Path) -> Optional[str]:
    for name in DATABASE_FILES:
        path = work_dir / name
        if not path.exists():
            continue
        try:
            with open(path, encoding="utf-8") as f:
                for k, line in enumerate(f, 1):
                    if line.strip():
                        json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return f"{path} (line {k})"
    return None


def cached_trials(work_dir: Path) -> int:
    """Trials already measured: the budget a finished run reached, or the records a stopped run
    left (one line per measured candidate)."""
    try:
        finished = int(json.loads(_meta_path(work_dir).read_text())["trials"])
    except (OSError, ValueError, KeyError):
        finished = 0
    try:
        with open(work_dir / "database_tuning_record.json", "rb") as f:
            records = sum(1 for line in f if line.strip())
    except OSError:
        records = 0
    return max(finished, records - _seeded(work_dir))


def tune(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    trials: int,
    work_dir: Path,
    log: LogFn = lambda m: None,
    runner: ms.runner.Runner | None = None,
    scheduler: str = "auto",
    seed_rules: Sequence = (),
) -> TuningSummary:
    """Tune ``mod`` (legalized and fused Relax) until ``work_dir`` holds ``trials`` trials.

    ``seed_rules``: the family's default-schedule rules. Each task's default schedule is
    measured first and recorded as a trial, so a kernel whose search finds nothing faster keeps
    it (a small budget must not end slower than ``--tune-trials 0``) and the search starts
    from it.

    Records already in ``work_dir`` count: asking again for the same budget runs nothing.
    ``scheduler``: ``gradient`` (trials where the model's time is), ``round-robin`` (evenly),
    or ``auto``: gradient from ``GRADIENT_MIN_TRIALS_PER_TASK`` trials per task, else even.
    """
    if scheduler not in SCHEDULERS:
        raise TargetError(f"tuning scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
    work_dir.mkdir(parents=True, exist_ok=True)
    # Two compiles of the same (model, target) must not append to one database at once.
    with open(work_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _tune_locked(mod, target, trials, work_dir, log, runner, scheduler, seed_rules)


def _is_scheduled(mod: tvm.IRModule) -> bool:
    return any(
        f.attrs is not None and f.attrs.get("tirx.is_scheduled", False) for f in mod.functions.values()
    )


def _rounds(todo: int, tasks: int, scheduler: str):
    """(scheduler, trials per round, most trials per task) for a budget of ``todo`` over ``tasks``."""
    if scheduler == "auto":
        scheduler = "gradient" if todo >= GRADIENT_MIN_TRIALS_PER_TASK * tasks else "round-robin"
    if scheduler == "round-robin":
        per_task = max(1, math.ceil(todo / tasks))
        # Rounds no larger than a task's share, so the scheduler reaches every task.
        return scheduler, min(64, per_task), per_task
    # The first round of every task takes at most half the budget; the rest follows the gradient.
    return scheduler, max(1, min(64, todo // (2 * tasks))), todo


def _search(per_iter: int) -> ms.search_strategy.EvolutionarySearch:
    """Evolutionary search sized to the round: MetaSchedule evolves 512 candidates per round
    whatever the round's size (about 10 s on 2 cores); rounds of a few trials need fewer."""
    return ms.search_strategy.EvolutionarySearch(population_size=max(128, min(512, 32 * per_iter)))


_DEVICE_NAMES = {1: "cpu", 2: "cuda"}  # DLDeviceType -> the runner's device name


def _default_schedule(func: tirx.PrimFunc, target, rules) -> s_tir.Schedule:
    """What the default schedule (``rules``, first that applies) makes of ``func``."""
    for rule in rules:
        try:
            sch = rule.apply(func, target, False)
        except Exception:  # noqa: BLE001  (no seed from a rule that fails here)
            continue
        if sch is not None:
            return sch[0] if isinstance(sch, list) else sch
    # No rule schedules it: the default build leaves the kernel as it is, so that is the record
    # to beat (else one random trial, e.g. a softmax recomputing its row sums per element, 3 s,
    # was all the database had for it). A record whose trace has no instruction is never
    # returned (``TuningRecord::IsValid``): one lookup that changes nothing makes it count.
    sch = s_tir.Schedule(func)
    sch.get_sblock("root", func_name="main")
    return sch


def _unrecorded_defaults(mods, target, database, rules) -> list:
    """(task index, module, default schedule) for each task whose default schedule has no
    record: new tasks, and tasks whose default schedule changed since their records were made
    (a newer tvm-compress), so cached trials never hide a better default."""
    todo = []
    for task_id, mod in enumerate(mods):
        sch = _default_schedule(mod["main"], target, rules)
        if database.has_workload(mod):
            trace = str(sch.trace.as_json(remove_postproc=False))
            known = database.get_top_k(database.commit_workload(mod), 1 << 20)
            if any(str(r.trace.as_json(remove_postproc=False)) == trace for r in known):
                continue
        todo.append((task_id, mod, sch))
    return todo


def _seed_default_schedules(todo, target, database, work_dir: Path, builder, runner, best=None) -> int:
    """Measure the default schedules ``todo`` (``_unrecorded_defaults``) and commit each to
    ``database`` (``work_dir``'s), counted as seeds, not trials; ``best``: task index -> median
    seconds, filled in. How many were recorded."""
    if not todo:
        return 0
    args = [ms.arg_info.ArgInfo.from_prim_func(mod["main"]) for _, mod, _ in todo]
    built = builder.build([ms.builder.BuilderInput(sch.mod, target) for _, _, sch in todo])
    device = _DEVICE_NAMES.get(int(target.get_target_device_type()), target.kind.name)
    inputs = [(entry, arg, ms.runner.RunnerInput(b.artifact_path, device, arg))
              for entry, arg, b in zip(todo, args, built) if b.error_msg is None]
    futures = runner.run([r for _, _, r in inputs])
    seeded = 0
    for ((task_id, mod, sch), args_info, _), future in zip(inputs, futures):
        result = future.result()
        times = [float(getattr(t, "value", t)) for t in (result.run_secs or [])]
        if result.error_msg or not times or min(times) >= 1e9:
            continue
        workload = database.commit_workload(mod)
        database.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, workload, run_secs=[tvm.runtime.convert(t) for t in times], target=target,
            args_info=args_info))
        if best is not None:
            times.sort()
            best[task_id] = times[len(times) // 2]
        seeded += 1
    if seeded:
        _seeds_path(work_dir).write_text(json.dumps({"seeded": _seeded(work_dir) + seeded}))
    return seeded


def _tune_locked(mod, target, trials, work_dir, log, runner, scheduler, seed_rules=()) -> TuningSummary:
    start = time.monotonic()
    done = cached_trials(work_dir)
    # Kernels scheduled by hand (tensorized int8, ``tirx.is_scheduled``) are not tuned.
    tasks = [t for t in ms.relax_integration.extract_tasks(mod, target) if not _is_scheduled(t.mod)]
    todo = trials - done
    if todo <= 0 or not tasks:
        log(f"tuning: reusing {done} cached trials from {work_dir}")
        if tasks and seed_rules:
            _refresh_seeds(tasks, target, work_dir, runner, seed_rules, log)
        return TuningSummary(trials, 0, done, len(tasks), time.monotonic() - start, str(work_dir))

    scheduler, per_iter, per_task = _rounds(todo, len(tasks), scheduler)
    share = "by latency share" if scheduler == "gradient" else f"<= {per_task} per task"
    log(f"tuning: {todo} trials over {len(tasks)} tasks ({share}, {per_iter} per round), work dir {work_dir}")
    # MetaSchedule re-creates its loggers from the names of the handlers already attached; a
    # handler without a name (added by a host application, e.g. pytest's capture) breaks that.
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    for handler in [h for h in ms_logger.handlers if h.get_name() is None]:
        ms_logger.removeHandler(handler)
    # Its console handler takes this logger's level when the loggers are (re)created: WARNING
    # keeps "Logging directory: ..." and every round out of the terminal (they stay in the files).
    ms_logger.setLevel(logging.WARNING)
    # Before the contexts: the first TuneContext imports TVM's tensor intrinsics (~500 parsed
    # TVMScript functions), half a minute with the stdlib ``inspect.stack``.
    _fast_inspect.install()
    builder = _PersistentBuilder(max_workers=os.cpu_count() or 1)
    try:
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            tasks, str(work_dir), strategy=_search(per_iter), seed=0
        )
        _quiet_console_logs()
        progress = _Progress(todo, weights, log)
        if runner is None:
            runner = ms.runner.LocalRunner(initializer=_fast_inspect.install)
        if seed_rules:
            database = ms.database.JSONDatabase(work_dir=str(work_dir))
            stale = _unrecorded_defaults([c.mod for c in contexts], target, database, seed_rules)
            seeded = _seed_default_schedules(stale, target, database, work_dir, builder, runner, progress.best)
            if seeded:
                log(f"tuning: default schedules of {seeded} tasks measured and recorded as the first trials")
        ms.tune.tune_tasks(
            tasks=contexts,
            task_weights=weights,
            work_dir=str(work_dir),
            max_trials_global=todo,
            max_trials_per_task=per_task,
            num_trials_per_iter=per_iter,
            builder=builder,
            runner=runner,
            measure_callbacks=[
                *ms.measure_callback.MeasureCallback.create("default"),
                progress,
            ],
            task_scheduler=ms.task_scheduler.create(scheduler, **({"seed": 0} if scheduler == "gradient" else {})),
        )
    finally:
        builder.shutdown()
        _fast_inspect.uninstall()
    if progress.done and progress.failed == progress.done:
        # Nothing was measured: the records are useless and must not count as cached trials.
        raise TargetError(
            f"tuning: all {progress.done} measurements failed ({progress.first_error}); "
            f"logs in {work_dir / 'logs'}"
        )
    if progress.failed:
        log(f"tuning: {progress.failed} of {progress.done} measurements failed (first: {progress.first_error})")
    _meta_path(work_dir).write_text(json.dumps({"trials": trials, "tasks": len(tasks)}))
    summary = TuningSummary(trials, todo, done, len(tasks), time.monotonic() - start, str(work_dir),
                            progress.failed, scheduler, progress.first_estimate, progress.estimate_ms())
    if summary.estimate_ms is not None:
        log(f"tuning: model estimate {summary.first_estimate_ms:.3g} ms after the first round of every task, "
            f"{summary.estimate_ms:.3g} ms at the end")
    return summary


def _refresh_seeds(tasks, target, work_dir: Path, runner, rules, log: LogFn) -> None:
    """Cached records, no new trials: still measure the default schedules the database has no
    record of (changed since the records were made), so the build can pick them."""
    database = ms.database.JSONDatabase(work_dir=str(work_dir))
    stale = _unrecorded_defaults([t.dispatched[0] for t in tasks], target, database, rules)
    if not stale:
        return
    builder = _PersistentBuilder(max_workers=os.cpu_count() or 1)
    if runner is None:
        runner = ms.runner.LocalRunner(initializer=_fast_inspect.install)
    _fast_inspect.install()
    try:
        seeded = _seed_default_schedules(stale, target, database, work_dir, builder, runner)
    finally:
        builder.shutdown()
        _fast_inspect.uninstall()
    if seeded:
        log(f"tuning: default schedules of {seeded} tasks changed since they were tuned: measured and recorded")


def apply_database(mod: tvm.IRModule, target: tvm.target.Target, work_dir: Path) -> tvm.IRModule:
    # TVM's C++ side announces "Creating JSONDatabase ..." on stderr: into the tuning logs with it.
    with _stderr_into(Path(work_dir) / "logs" / "apply_database.log"), target:
        return tvm.relax.transform.MetaScheduleApplyDatabase(str(work_dir))(mod)


@contextlib.contextmanager
def _stderr_into(path: Path):
    """Send what native code writes to file descriptor 2 to ``path`` for the duration."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "ab") as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)
