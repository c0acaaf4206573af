"""compile(): ONNX in, verified shared library + manifest + report out.

The work is the registered ``tvm_compress`` pipeline (``pipeline.py``), run under a
``FlowInstrument`` that logs each stage, times it and measures the weights around each
compression pass; then ``tvm.compile``, export, the kernel check, verification and timing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import numpy as np
import tvm
from tvm import relax

from tvm_compress.targets import TargetProfile, get_family, get_target

from . import kernel_check, pipeline, remote, verify
from .calib_data import missing_calibration
from .errors import OutputError, TargetError, VerificationError
from .fileutil import atomic_path, check_writable, write_json
from .layers import layer_stats, totals, weight_stats
from .loader import PreparedModel, file_sha256, prepare_onnx
from .manifest import make_manifest, manifest_path
from .pass_registry import PassEnv, get_preset, make_config, parse_pass_list

LogFn = Callable[[str], None]


def _resolve_target(target: str | TargetProfile) -> TargetProfile:
    return target if isinstance(target, TargetProfile) else get_target(target)


def measure(mod: tvm.IRModule) -> Dict[str, Any]:
    """Weights as stored (all constants) and per named layer: params, MACs, bytes."""
    stats = layer_stats(mod)
    params, macs = totals(stats)
    return {**weight_stats(mod), "layer_params": params, "macs": macs, "layers": stats}


def _per_layer(before: Dict[str, Dict], after: Dict[str, Dict]) -> list:
    """One row per layer: op, params / MACs / weight bytes before and after."""
    rows = []
    for name in list(before) + [n for n in after if n not in before]:
        b, a = before.get(name, {}), after.get(name, {})
        row = {"name": name, "op": b.get("op") or a.get("op")}
        for key in ("params", "macs", "weight_bytes"):
            row[f"{key}_before"], row[f"{key}_after"] = b.get(key, 0), a.get(key, 0)
        rows.append(row)
    return rows


def compile(  # noqa: A001  (the product's verb)
    model: str | os.PathLike,
    output: str | os.PathLike,
    *,
    target: str | TargetProfile = "x86",
    passes: str | Sequence[str] | None = None,
    pass_configs: Optional[Mapping[str, Any]] = None,
    input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
    input_values: Optional[Mapping[str, Sequence]] = None,
    verify_input: Optional[str | os.PathLike] = None,
    tune_trials: int = 0,
    report: Optional[str | os.PathLike] = None,
    bench_runs: int = 50,
    rpc: Optional["remote.RemoteSpec"] = None,
    check_kernels: bool = True,
    fold: bool = True,
    log: LogFn = print,
) -> Dict[str, Any]:
    """Compile ``model`` for ``target`` into ``output`` (.so) and return the report dict.

    Everything that can be checked is checked before any long work: target, toolchain, pass
    names, order and options, output paths, model, shapes, verification data.

    ``check_kernels``: run every scheduled kernel alone with pre-filled outputs against its
    unscheduled form (``kernel_check``) before the library is written.

    ``fold``: run the exact ``fold`` pass first (constant per-channel ops into the layers'
    weights and biases) unless ``passes`` already names it.
    """
    t_start = time.monotonic()
    profile = _resolve_target(target)
    family = get_family(profile.family)
    family.check_toolchain(profile)
    tvm_target = profile.tvm_target()
    names = parse_pass_list(passes)
    if fold and "fold" not in names:
        names = parse_pass_list(["fold", *names])
    if tune_trials < 0:
        raise TargetError(f"--tune-trials must be >= 0, got {tune_trials}")
    if rpc is not None:
        remote.check_tracker(rpc)
    output = check_writable(output)
    if output.suffix != ".so":
        raise OutputError(f"output {output} must end in .so")
    manifest = manifest_path(output)
    if report is not None:
        report = check_writable(report)
        if Path(report).resolve() == manifest.resolve():
            raise OutputError(f"--report {report} would overwrite the manifest written beside {output}")

    prepared = prepare_onnx(model, input_shapes, input_values=input_values)
    for note in prepared.notes:
        log(f"note: {note}")
    _check_calibration(names, pass_configs, prepared.model)
    if verify_input is not None:
        inputs = verify.inputs_from_file(verify_input, prepared.inputs)
        input_source = str(verify_input)
    else:
        inputs = verify.random_inputs(prepared.inputs, seed=0)
        input_source = "random (seed 0)"
    # The reference first: a model onnxruntime cannot run is refused before any long work.
    refs = verify.ort_run(prepared.reference, prepared.inputs, inputs, prepared.bound)

    timeable = _timeable(family, profile, rpc)
    env = PassEnv(inputs=list(prepared.inputs), facts=family.facts(profile), log=log,
                  measure=lambda m, xs: measure_on_target(m, xs, profile, rpc, trials=tune_trials),
                  measure_defaults=(lambda m, xs: measure_on_target(m, xs, profile, rpc)) if timeable else None)
    # Builds (and so checks) every pass config before any work.
    flow_pass = relax.get_pipeline(
        pipeline.PIPELINE, target=profile, passes=names, configs=pass_configs, env=env,
        trials=tune_trials, runner=remote.tuning_runner(rpc) if rpc else None, log=log,
    )
    log(f"import: {prepared.path} ({len(prepared.model.graph.node)} ONNX nodes)")
    mod = prepared.to_relax()
    before = measure(mod)
    flow = pipeline.FlowInstrument(
        log,
        before=lambda name: _stage_line(name, profile, tvm_target),
        after=_stage_done,
        measure=measure,
    )
    with tvm.transform.PassContext(instruments=[flow]):
        mod = flow_pass(mod)
    compressed = next((s["after"] for s in reversed(flow.stages) if "after" in s), before)
    tuning_summary = pipeline.tuning_summary(mod)
    fallbacks = _schedule_fallbacks(mod, profile, tvm_target, log)
    binary = _binary_kernels(mod, log)
    int8 = _int8_kernels(mod, env.facts.int8_dot, log)
    layout = _conv_layout(mod, log)
    lowered = flow.lowered

    calls, kernel_report = [], None
    if check_kernels:
        runnable, why = (True, "") if rpc else family.can_run(profile)
        if runnable:
            calls = kernel_check.plan(lowered, mod)
            mod = kernel_check.with_check_function(mod, calls) if calls else mod
        else:
            log(f"check: kernels not run alone ({why})")
            kernel_report = {"checked": 0, "where": None, "note": why}
    log("build: tvm.compile")
    executable = family.compile(mod, profile)

    with atomic_path(output) as tmp_lib:
        family.export(executable, tmp_lib, profile)
        if calls:
            kernel_report = _check_kernels(family, profile, tmp_lib, lowered, calls, inputs, rpc, log)
        record = _verify_and_time(
            family, profile, tmp_lib, prepared, inputs, refs, bench_runs,
            lossy=any(get_preset(n).lossy for n in names), log=log, rpc=rpc,
        )
        artifact_bytes = tmp_lib.stat().st_size
        manifest_data = make_manifest(
            prepared, profile, tvm_target, names, file_sha256(tmp_lib), output, tuning_summary,
            kernel_check.CHECK_FUNCTION if calls else None,
            build_options={
                "pass_configs": {n: _as_dict(make_config(get_preset(n), (pass_configs or {}).get(n))) for n in names},
                "tune_trials": tune_trials, "fold": fold, "check_kernels": check_kernels,
                "input_shapes": {i.name: list(i.shape) for i in prepared.inputs},
                "input_values": prepared.bound_values(),
                "verify_input": input_source,
            },
        )
    try:
        write_json(manifest, manifest_data)
    except BaseException:
        output.unlink(missing_ok=True)  # never a library without its manifest
        raise

    # Bytes as stored: the constants of the lowered module are what the library embeds (packed
    # int8 weights and their compensation terms included).
    stored = weight_stats(lowered)
    rep: Dict[str, Any] = {
        "model": str(prepared.path),
        "model_sha256": prepared.sha256,
        "target": profile.name,
        "tvm_target": json.loads(str(tvm_target)),
        "passes": names,
        "params_before": before["params"],
        "params_after": stored["params"],
        "macs_before": before["macs"],
        "macs_after": compressed["macs"],
        "weight_bytes_before": before["bytes"],
        "weight_bytes_after": stored["bytes"],
        "layers": _per_layer(before["layers"], compressed["layers"]),
        "artifact": str(output),
        "artifact_bytes": artifact_bytes,
        "verify_input": input_source,
        **record,
        "tuning": tuning_summary or {"trials": 0, "new_trials": 0, "seconds": 0.0},
        "kernel_check": kernel_report,
        "schedule_fallbacks": fallbacks,
        "binary_kernels": binary,
        "int8_kernels": int8,
        "conv_layout": layout,
        "stages": [{"name": s["name"], "seconds": s["seconds"]} for s in flow.stages],
        "pass_reports": _pass_reports(env.report, flow.stages),
        "seconds": round(time.monotonic() - t_start, 2),
    }
    if report is not None:
        write_json(report, rep)
    return rep


def _as_dict(config) -> dict:
    """A pass config as JSON-able fields (tuples as lists)."""
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def _timeable(family, profile: TargetProfile, rpc) -> bool:
    """Whether a time taken for ``profile`` says something of its speed (here, or over RPC)."""
    return rpc is not None or (family.can_run(profile)[0] and family.latency_is_meaningful(profile))


def measure_on_target(mods: Sequence[tvm.IRModule], inputs, profile: TargetProfile, rpc=None,
                      rounds: int = 5, repeat: int = 10, trials: int = 0) -> Optional[list]:
    """Median ms of each module's main built like the model (kernel hooks; tuned with
    ``trials``, records cached per module; default schedules) and run where ``profile`` runs,
    the candidates timed in turn for ``rounds`` rounds; None where that says nothing of the
    target's speed."""
    import tempfile

    family = get_family(profile.family)
    if not _timeable(family, profile, rpc):
        return None
    runner = remote.tuning_runner(rpc) if rpc else None
    flow = tvm.transform.Sequential([pipeline.Lower(profile), pipeline.Schedule(profile, trials, runner=runner)])
    times: list = [[] for _ in mods]
    with tempfile.TemporaryDirectory(prefix="tvmc-measure-") as tmp:
        libs = []
        for k, mod in enumerate(mods):
            libs.append(Path(tmp) / f"candidate{k}.so")
            family.export(family.compile(flow(mod), profile), libs[-1], profile)
        for r in range(rounds):
            for k in [(r + j) % len(libs) for j in range(len(libs))]:  # order rotated each round
                if rpc is not None:
                    run = remote.run_remote(rpc, family, libs[k], inputs, repeat=repeat)
                else:
                    run = family.run(profile, libs[k], inputs, repeat=repeat, warmup=2)
                times[k] += list(run.times_ms)
    return [float(np.median(t)) for t in times]


def _binary_kernels(mod, log) -> dict:
    """What the target's binary kernel hook made of each binary layer ({}: none)."""
    from tvm_compress.targets.binary_hook import binary_kernels

    layers = binary_kernels(mod)
    if layers:
        xnor = sum(1 for r in layers.values() if r["kernel"] == "xnor-popcount")
        chains = sum(1 for r in layers.values() if r.get("output", "").startswith("bit-packed"))
        log(f"binary: {xnor} of {len(layers)} layers on XNOR/popcount kernels, {chains} fused chains "
            f"(bit-packed output)")
    return layers


def _check_calibration(names, pass_configs, model) -> None:
    """Refuse a pass that needs calibration data and has none before the model is imported
    (not after the passes before it ran)."""
    for name in names:
        preset = get_preset(name)
        if preset.reads_calibration:
            config = make_config(preset, (pass_configs or {}).get(name))
            if config.calib is None and config.needs_calibration(model):
                raise missing_calibration(name)


def _int8_kernels(mod, preferred, log) -> dict:
    """Convolutions and dense layers per packed int8 kernel ({}: none); said when some layer
    could not take the target's kernel ``preferred`` (``pmaddubsw``: weights that could
    saturate its int16 sums)."""
    from tvm_compress.targets.int8_pack import int8_kernels

    kernels = int8_kernels(mod)
    others = {k: n for k, n in kernels.items() if k not in ("depthwise", preferred)}
    if others:
        said = ", ".join(f"{n} on {k}" for k, n in sorted(others.items()))
        log(f"int8: {kernels.get(preferred, 0)} layers on {preferred}, {said} (exact where {preferred}'s "
            f"int16 pair sums could saturate, or for 1-2 input channels)")
    return kernels


def _conv_layout(mod, log) -> dict:
    """The float convs' layout the CPU family chose ({}: no float conv, or not a CPU target)."""
    from tvm_compress.targets.channels_last import conv_layout

    info = conv_layout(mod)
    if info.get("layout") == "NHWC":
        kept = f", {info['nchw_convs']} kept NCHW" if info["nchw_convs"] else ""
        why = info.get("reason") or f"estimated {info['estimated_gain']:.2f}x from vector use"
        log(f"layout: {info['nhwc_convs']} convs channels-last (NHWC){kept}; {why}")
    elif info:
        log(f"layout: convs stay NCHW ({info['reason']})")
    return info


def _schedule_fallbacks(mod, profile: TargetProfile, tvm_target, log) -> list:
    """Kernels whose first default-schedule rules raised: said, reported; a GPU kernel no rule
    could schedule ends the build in one line (it would not be bound to threads)."""
    from tvm_compress.targets.default_schedule import schedule_fallbacks

    fallbacks = schedule_fallbacks(mod)
    groups: dict = {}  # one line per (failure, rule used): a model repeats a kernel shape often
    for fb in fallbacks:
        first = fb["failed"][0]
        if fb["used"] is None and tvm_target.kind.name != "llvm":
            raise TargetError(f"{profile.name}: no schedule rule could schedule kernel {fb['kernel']} "
                              f"({first['rule']}: {first['error']})")
        why = "; ".join(f"{f['rule']} failed ({f['error']})" for f in fb["failed"])
        groups.setdefault((why, fb["used"]), []).append(fb["kernel"])
    for (why, used), kernels in groups.items():
        which = f"kernel {kernels[0]}" if len(kernels) == 1 else (
            f"{len(kernels)} kernels ({', '.join(kernels[:2])}{', ...' if len(kernels) > 2 else ''}; "
            "all in the report)")
        log(f"schedule: {which}: {why}; scheduled by {used or 'none (plain loops)'}")
    return fallbacks


def _stage_line(name: str, profile: TargetProfile, tvm_target) -> Optional[str]:
    if name == pipeline.LOWER:
        return f"lower: {profile.name} ({tvm_target.kind.name})"
    if name == pipeline.SCHEDULE:
        return None  # tuning reports its own progress
    return f"pass: {name}"


def _stage_done(rec: Dict[str, Any]) -> Optional[str]:
    if "after" not in rec:
        return None
    b, a = rec["before"], rec["after"]
    return (f"pass: {rec['name']}: {rec['seconds']:.1f} s; weight bytes {b['bytes']} -> {a['bytes']}, "
            f"MACs {b['macs']} -> {a['macs']}")


def _pass_reports(reports: Dict[str, Any], stages) -> Dict[str, Any]:
    """Each pass's own report, plus per-layer params / MACs / bytes around that pass."""
    out = {name: dict(rep) for name, rep in reports.items()}
    for s in stages:
        if "after" in s:
            rep = out.setdefault(s["name"], {})
            rep["seconds"] = s["seconds"]
            rep["layer_stats"] = _per_layer(s["before"]["layers"], s["after"]["layers"])
    return out


def _check_kernels(family, profile, lib_path, lowered, calls, inputs, rpc, log):
    """Run the library's kernel check where the target runs; VerificationError on a bad kernel."""

    def run(args):
        if rpc:
            return remote.run_remote(rpc, family, lib_path, args, repeat=0,
                                     function=kernel_check.CHECK_FUNCTION).outputs
        return family.run(profile, lib_path, args, function=kernel_check.CHECK_FUNCTION).outputs

    res = kernel_check.check(lowered, calls, inputs, run, where=rpc.where if rpc else profile.name)
    if res.failed:
        name, what = next(iter(res.failed.items()))
        more = f" (and {len(res.failed) - 1} more kernels)" if len(res.failed) > 1 else ""
        raise VerificationError(f"{profile.name}: kernel {name}: {what}{more}; no library written")
    unreached = (f"; {len(res.unreached)} more not reached by the input, checked written only"
                 if res.unreached else "")
    log(f"check: {len(res.checked)} scheduled kernels run alone with pre-filled outputs: every "
        f"element written, values match the unscheduled kernels{unreached}")
    return res.as_dict()


def _verify_and_time(family, profile, lib_path, prepared: PreparedModel, inputs, refs, bench_runs, lossy, log,
                     rpc=None):
    ok, why = (True, "") if rpc else family.can_run(profile)
    if not ok:
        log(f"verify: {why}")
        return {"verified": False, "verify_status": why, "max_abs_err": None, "max_rel_err": None,
                "latency_ms": None, "onnxruntime_latency_ms": None}
    meaningful = bool(rpc) or family.latency_is_meaningful(profile)
    if rpc:
        result = remote.run_remote(rpc, family, lib_path, inputs, repeat=bench_runs)
    else:
        result = family.run(profile, lib_path, inputs, repeat=bench_runs if meaningful else 1,
                            warmup=3 if meaningful else 0)
    cmp = verify.compare(result.outputs, refs)
    if cmp.get("error"):
        raise VerificationError(f"{profile.name}: {cmp['error']}")
    within = cmp["within_float_tolerance"]
    log(
        f"verify: {result.where}: max abs err {cmp['max_abs_err']:.3g}, "
        f"max rel err {cmp['max_rel_err']:.3g} vs onnxruntime"
    )
    if not within and not lossy:
        raise VerificationError(
            f"{profile.name}: output differs from onnxruntime (max abs err {cmp['max_abs_err']:.3g}, "
            f"max rel err {cmp['max_rel_err']:.3g}; tolerance {verify.FLOAT_REL_TOL} of the output's "
            f"scale + {verify.FLOAT_ABS_TOL}); no library written"
        )
    rec = {
        "verified": True,
        "verify_status": f"ran {result.where}",
        "within_float_tolerance": bool(within),
        "max_abs_err": cmp["max_abs_err"],
        "max_rel_err": cmp["max_rel_err"],
        "latency_ms": None,
        "onnxruntime_latency_ms": None,
    }
    if meaningful and bench_runs > 0:
        rec["latency_ms"] = verify.latency_stats(result.times_ms)
        rec["onnxruntime_latency_ms"] = verify.latency_stats(
            verify.ort_latency(prepared.reference, prepared.inputs, inputs, repeat=bench_runs,
                                bound=prepared.bound)
        )
        log(
            f"latency: median {rec['latency_ms']['median']:.3f} ms "
            f"(onnxruntime {rec['onnxruntime_latency_ms']['median']:.3f} ms, 2 threads)"
        )
    elif not meaningful:
        rec["latency_note"] = f"{result.where}: emulated, not the board's speed (use --rpc-tracker)"
    else:
        rec["latency_note"] = "not timed (--bench-runs 0)"
    return rec
