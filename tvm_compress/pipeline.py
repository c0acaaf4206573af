"""The one compile flow: compression passes, lowering, scheduling, as a single TVM pass.

``relax.get_pipeline("tvm_compress", target=profile, passes=[...])`` returns it (registered with
``register_pipeline``); ``tvm_compress.compile`` runs the same pipeline under a
``FlowInstrument``, which logs progress, times each stage, measures the weights around each
compression pass and keeps the lowered module for the kernel check.

Stages (each a pass of the pipeline's ``Sequential``, named as below):

- one per compression preset, named after it (``quantize`` ...);
- ``lower``: the target family's kernel rewrites (``TargetFamily.kernel_rewrites``), then
  Relax -> fused TIR kernels (the part tuning tasks are extracted from);
- ``schedule``: the family's hand schedules (``kernel_schedules``), MetaSchedule records (tuned
  when trials > 0, cached per model and target), then the family's default schedules for the
  kernels left. A summary of the tuning goes to the module attribute ``TUNING_ATTR``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import tvm
from tvm import relax

from tvm_compress.targets import TargetProfile, get_family

from . import tuning
from .pass_registry import PassEnv, make_passes
from .relax_utils import copy_module

PIPELINE = "tvm_compress"
LOWER = "lower"
SCHEDULE = "schedule"
TUNING_ATTR = "tvm_compress.tuning"

LogFn = Callable[[str], None]


def lowering_passes(profile: Optional[TargetProfile] = None) -> List[tvm.transform.Pass]:
    """The family's kernel rewrites (with a ``profile``), then Relax -> fused TIR kernels."""
    rewrites = get_family(profile.family).kernel_rewrites(profile) if profile is not None else []
    return [
        *rewrites,
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


@tvm.transform.module_pass(opt_level=0, name=LOWER)
class Lower:
    """Relax -> fused TIR kernels for ``profile`` (``lowering_passes``)."""

    def __init__(self, profile: TargetProfile):
        self.profile = profile

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with self.profile.tvm_target():
            return tvm.transform.Sequential(lowering_passes(self.profile))(mod)


@tvm.transform.module_pass(opt_level=0, name=SCHEDULE)
class Schedule:
    """Hand schedules, then tuning records (``trials`` > 0), then default schedules.

    ``runner`` measures candidates (e.g. an RPC runner for boards); default: the family's.
    ``scheduler``: how the trials are spread over the tasks (``tuning.SCHEDULERS``)."""

    def __init__(self, profile: TargetProfile, trials: int = 0, work_dir: Optional[Path] = None,
                 runner=None, log: LogFn = lambda m: None, scheduler: str = "auto"):
        self.profile = profile
        self.scheduler = scheduler
        self.trials = trials
        self.work_dir = work_dir
        self.runner = runner
        self.log = log

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        profile, trials, log = self.profile, self.trials, self.log
        family = get_family(profile.family)
        target = profile.tvm_target()
        # dlight's ApplyDefaultSchedule updates the module it is given: work on a copy, so the
        # caller's lowered module stays unscheduled (the kernel check compares with it).
        mod = copy_module(mod)
        summary = None
        # Keyed before the hand schedules: those kernels are not tuned, so their schedule may
        # change without invalidating the records of the others.
        work_dir = (self.work_dir or tuning.database_dir(mod, target)) if trials > 0 else None
        with target:
            # Hand-scheduled kernels first: tuning and the default schedules then skip them.
            mod = tvm.transform.Sequential(family.kernel_schedules(profile))(mod)
        if trials > 0:
            tuning.check_database(work_dir, log)
            runner = self.runner or family.tuning_runner(profile)
            if runner is None:
                # Records from an earlier run (or another machine) still apply; no new trials.
                log(f"tuning: no way to measure {profile.name} here; using cached records only")
                trials = min(trials, tuning.cached_trials(work_dir))
            if trials > 0:
                rules = [r for p in family.default_schedule(profile) for r in getattr(p, "rules", [])]
                summary = tuning.tune(mod, target, trials, work_dir, log=log, runner=runner,
                                      scheduler=self.scheduler, seed_rules=rules)
                mod = tuning.apply_database(mod, target, work_dir)
        with target:
            mod = tvm.transform.Sequential(family.default_schedule(profile))(mod)
        if summary is not None:
            mod = mod.with_attr(TUNING_ATTR, json.dumps(summary.as_dict()))
        return mod


def tuning_summary(mod: tvm.IRModule) -> Optional[Dict[str, Any]]:
    """The summary ``Schedule`` left on ``mod`` (None: nothing was tuned)."""
    attrs = mod.attrs
    if attrs is None or TUNING_ATTR not in attrs:
        return None
    return json.loads(str(attrs[TUNING_ATTR]))


@relax.pipeline.register_pipeline(PIPELINE)
def tvm_compress_pipeline(
    *,
    target: TargetProfile,
    passes: Sequence[str] = (),
    configs: Optional[Mapping[str, Any]] = None,
    env: Optional[PassEnv] = None,
    trials: int = 0,
    work_dir: Optional[str] = None,
    runner=None,
    log: LogFn = lambda m: None,
) -> tvm.transform.Pass:
    """Compression + lowering + scheduling for ``target``; feed the result to ``tvm.compile``.

    Every pass config is built, and so checked, here, before anything runs."""
    env = env or PassEnv(facts=get_family(target.family).facts(target), log=log)
    stages = [
        # Named after its preset, so progress and reports can say which pass ran.
        tvm.transform.Sequential([p], opt_level=0, name=name)
        for name, p in zip(passes, make_passes(passes, configs, env))
    ]
    stages += [Lower(target),
               Schedule(target, trials, Path(work_dir) if work_dir else None, runner, log)]
    return tvm.transform.Sequential(stages, opt_level=0, name=PIPELINE)


@tvm.instrument.pass_instrument
class FlowInstrument:
    """Progress lines and measurements for the stages of the ``tvm_compress`` pipeline.

    A stage is a pass run directly by the pipeline's ``Sequential``; nested passes only pass
    through. ``stages`` gets one record per stage: name, seconds, and for compression stages
    ``measure(module)`` before and after. ``lowered`` is the module the ``lower`` stage made.
    ``before(name)`` and ``after(record)`` return the progress line to log, or None."""

    def __init__(self, log: LogFn, before: Callable[[str], Optional[str]] = lambda name: None,
                 after: Callable[[Dict[str, Any]], Optional[str]] = lambda rec: None,
                 measure: Optional[Callable[[tvm.IRModule], Dict[str, Any]]] = None):
        self.log = log
        self.before = before
        self.after = after
        self.measure = measure
        self.stack: List[str] = []
        self.stages: List[Dict[str, Any]] = []
        self.lowered: Optional[tvm.IRModule] = None
        self._open: Dict[str, Any] = {}

    def _emit(self, line: Optional[str]) -> None:
        if line:
            self.log(line)

    def run_before_pass(self, mod, info):
        if self.stack and self.stack[-1] == PIPELINE:
            self._emit(self.before(info.name))
            self._open = {"name": info.name, "start": time.monotonic()}
            if is_compression_stage(info.name) and self.measure is not None:
                self._open["before"] = self.measure(mod)
        self.stack.append(info.name)

    def run_after_pass(self, mod, info):
        self.stack.pop()
        if not (self.stack and self.stack[-1] == PIPELINE):
            return
        rec = {"name": info.name, "seconds": round(time.monotonic() - self._open["start"], 3)}
        if "before" in self._open:
            rec["before"], rec["after"] = self._open["before"], self.measure(mod)
        if info.name == LOWER:
            self.lowered = mod
        self.stages.append(rec)
        self._emit(self.after(rec))


def is_compression_stage(name: str) -> bool:
    return name not in (LOWER, SCHEDULE)
