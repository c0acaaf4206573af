"""The one pipeline factory: compression passes, then lowering and scheduling per target.

``get_pipeline("tvm_compress", ...)`` (registered with Relax's pipeline registry) returns a
single module pass; ``tvm_compress.build`` runs the same pieces one by one so it can measure the
weights between compression and lowering and report tuning progress.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Sequence

import tvm
from tvm import relax

from tvm_compress.passes import PassEnv, get_pass, make_config
from tvm_compress.targets import TargetProfile, get_family
from tvm_compress.targets.int8_pack import PackInt8Conv, target_kernel
from tvm_compress.targets.int8_schedule import ScheduleInt8Conv

from . import tuning


def compression_passes(
    names: Sequence[str], configs: Optional[Mapping[str, Any]], env: PassEnv
) -> List[tvm.transform.Pass]:
    """Configured passes for the preset names, in order (``configs``: name -> config/mapping)."""
    configs = dict(configs or {})
    out = []
    for name in names:
        preset = get_pass(name)
        out.append(preset.make(make_config(preset, configs.get(name)), env))
    return out


def lowering_passes(profile: Optional[TargetProfile] = None) -> List[tvm.transform.Pass]:
    """High-level Relax -> fused TIR kernels (the part tuning tasks are extracted from).

    With a ``profile`` whose preset names an int8 dot kernel, int8 convolutions first become
    packed-weight kernels for it (``targets/int8_pack.py``).
    """
    kernel = target_kernel(profile) if profile is not None else None
    return [
        *([PackInt8Conv(kernel)] if kernel is not None else []),
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def schedule(
    mod: tvm.IRModule,
    profile: TargetProfile,
    trials: int,
    work_dir: Optional[Path] = None,
    log: Callable[[str], None] = lambda m: None,
    runner=None,
):
    """Tune (when ``trials`` > 0) and apply records, else the family's default schedules.

    ``runner`` measures candidates (e.g. an RPC runner for boards); default: the family's.

    Returns (scheduled module, TuningSummary or None).
    """
    family = get_family(profile.family)
    target = profile.tvm_target()
    summary = None
    # dlight's ApplyDefaultSchedule updates the module it is given: work on a copy, so the
    # caller's lowered module stays unscheduled (the kernel check compares with it).
    mod = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs, global_infos=mod.global_infos)
    # Keyed before hand scheduling: those kernels are not tuned, so their schedule may change
    # without invalidating the records of the others.
    if trials > 0:
        work_dir = work_dir or tuning.database_dir(mod, target)
    # Hand-scheduled int8 kernels first: tuning and the default schedules then skip them.
    mod = ScheduleInt8Conv()(mod)
    if trials > 0:
        runner = runner or family.tuning_runner(profile)
        if runner is None:
            # Records from an earlier run (or another machine) still apply; no new trials.
            log(f"tuning: no way to measure {profile.name} here; using cached records only")
            trials = min(trials, tuning.cached_trials(work_dir))
        if trials > 0:
            summary = tuning.tune(mod, target, trials, work_dir, log=log, runner=runner)
            mod = tuning.apply_database(mod, target, work_dir)
    with target:
        mod = tvm.transform.Sequential(family.default_schedule(profile))(mod)
    return mod, summary


@relax.pipeline.register_pipeline("tvm_compress")
def tvm_compress_pipeline(
    *,
    target: TargetProfile,
    passes: Sequence[str] = (),
    configs: Optional[Mapping[str, Any]] = None,
    env: Optional[PassEnv] = None,
    trials: int = 0,
    work_dir: Optional[str] = None,
):
    """Compression + lowering + scheduling for ``target``; feed the result to ``tvm.compile``."""
    env = env or PassEnv(model_path=None, inputs=[], target=target)

    @tvm.transform.module_pass(opt_level=0, name="TvmCompressPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        mod = tvm.transform.Sequential(compression_passes(passes, configs, env))(mod)
        mod = tvm.transform.Sequential(lowering_passes(target))(mod)
        mod, _ = schedule(mod, target, trials, Path(work_dir) if work_dir else None)
        return mod

    return _pipeline
