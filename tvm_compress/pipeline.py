"""The one compile flow: compression passes, lowering, scheduling, as a single TVM pass.

``relax.get_pipeline("tvm_compress", target=profile, passes=[...])`` returns it (registered with
``register_pipeline``); ``tvm_compress.compile`` runs the same pipeline under a
``FlowInstrument``, which logs progress, times each stage, measures the weights around each
compression pass and keeps the lowered module for the kernel check.

Stages (each a pass of the pipeline's ``Sequential``, named as below):

- one per compression preset, named after it (``quantize`` ...);
- ``lower``: choices a kernel hook leaves to timing (``KernelHook.candidates``, timed with
  default schedules), the target family's kernel rewrites (``TargetFamily.kernel_rewrites``),
  then Relax -> fused TIR kernels (the part tuning tasks are extracted from);
- ``schedule``: the family's hand schedules (``kernel_schedules``), MetaSchedule records (tuned
  when trials > 0, cached per model and target), then the family's default schedules for the
  kernels left. A summary of the tuning goes to the module attribute ``TUNING_ATTR``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import tvm
from tvm import relax

from tvm_compress.passes import ShareConstants
from tvm_compress.targets import TargetProfile, get_family

from . import tuning
from .cache import cache_root
from .fileutil import write_json
from .pass_registry import PassEnv, make_passes
from .relax_utils import copy_module

PIPELINE = "tvm_compress"
LOWER = "lower"
SCHEDULE = "schedule"
TUNING_ATTR = "tvm_compress.tuning"
MEASURED_ATTR = "tvm_compress.measured_choices"
# How much faster than the hook's estimated choice a timed variant must be to replace it.
MIN_TIMED_WIN = 1.1

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
        # equal copies of one weight (an unrolled LSTM's packed per step) stored once
        ShareConstants(),
    ]


@tvm.transform.module_pass(opt_level=0, name=LOWER)
class Lower:
    """Relax -> fused TIR kernels for ``profile`` (``lowering_passes``).

    With ``env`` (its ``measure_defaults`` and inputs), the choices a kernel hook cannot make by
    estimate (``KernelHook.candidates``) are timed on the target first and the fastest variant is
    lowered; the times go to the module attribute ``MEASURED_ATTR``."""

    def __init__(self, profile: TargetProfile, env: Optional[PassEnv] = None, log: LogFn = lambda m: None):
        self.profile = profile
        self.env = env
        self.log = log

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if self.env is not None and self.env.measure_defaults is not None:
            mod = self._timed_choices(mod)
        with self.profile.tvm_target():
            return tvm.transform.Sequential(lowering_passes(self.profile))(mod)

    def _timed_choices(self, mod: tvm.IRModule) -> tvm.IRModule:
        measured = measured_choices(mod)
        for hook in get_family(self.profile.family).hooks(self.profile):
            variants = hook.candidates(mod, self.profile)
            if len(variants) < 2:
                continue
            # Cached like tuning records: the same model and target get the same choice again,
            # as long as the kernels timed are the same code (``kernels_fingerprint``).
            key = tuning.measurement_key(mod, self.profile.tvm_target())
            path = cache_root() / "choices" / f"{key}-{hook.name}-{kernels_fingerprint()}.json"
            choice = _read_choice(path, variants)
            if choice is None:
                choice = self._time(hook.name, variants)
                if choice is None:  # cannot time here: the hook's estimate decides
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                write_json(path, choice)
            names, times = list(choice["times_ms"]), list(choice["times_ms"].values())
            self.log(f"{hook.name}: " + ", ".join(f"{n} {t:.3f} ms" for n, t in zip(names, times))
                     + f" -> {choice['chosen']}" + (" (timed by an earlier build)" if choice.get("cached") else ""))
            measured[hook.name] = choice
            mod = variants[choice["chosen"]].with_attr(MEASURED_ATTR, json.dumps(measured))
        return mod

    def _time(self, name: str, variants: Dict[str, tvm.IRModule]) -> Optional[Dict[str, Any]]:
        from .verify import random_inputs

        self.log(f"{name}: estimate unclear; timing {', '.join(variants)} with default schedules")
        times = self.env.measure_defaults(list(variants.values()), random_inputs(self.env.inputs, seed=0))
        if not times:
            self.log(f"{name}: could not time them; the estimate decides")
            return None
        names = list(variants)
        # The first variant is the hook's estimate: another replaces it only when clearly faster,
        # so that timing noise does not flip a build.
        best = min(range(len(names)), key=times.__getitem__)
        chosen = names[best] if times[0] >= MIN_TIMED_WIN * times[best] else names[0]
        return {"times_ms": dict(zip(names, (round(t, 4) for t in times))), "chosen": chosen}


@functools.lru_cache(maxsize=None)
def kernels_fingerprint() -> str:
    """A hash of the kernel hooks' source (``tvm_compress.targets``): a variant timed with other
    kernels (a cached choice from before an upgrade: NCHW against NHWC convs timed before the
    NHWC depthwise kernels got faster) is timed again."""
    import tvm_compress.targets as targets

    digest = hashlib.sha256()
    for source in sorted(Path(targets.__file__).parent.glob("*.py")):
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()[:12]


def _read_choice(path: Path, variants: Dict[str, tvm.IRModule]) -> Optional[Dict[str, Any]]:
    try:
        choice = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(choice, dict) or choice.get("chosen") not in variants:
        return None  # a damaged or foreign file: time again
    return {**choice, "cached": True}


def measured_choices(mod: tvm.IRModule) -> Dict[str, Any]:
    """What ``Lower`` timed: {hook name: {"times_ms": {variant: ms}, "chosen": variant}}."""
    return json.loads(str(mod.attrs[MEASURED_ATTR])) if mod.attrs and MEASURED_ATTR in mod.attrs else {}


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
    stages += [Lower(target, env, log),
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
        # Down to this pass: a nested one that raised, caught by its caller (a rewrite falling
        # back to the module it was given), never reached this hook.
        while self.stack and self.stack.pop() != info.name:
            pass
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
