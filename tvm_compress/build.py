"""compile(): ONNX in, verified shared library + manifest + report out."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import numpy as np
import tvm
from tvm import relax

from tvm_compress.passes import PassEnv, get_pass, parse_pass_list
from tvm_compress.targets import TargetProfile, get_family, get_target

from . import kernel_check, pipeline, remote, verify
from .errors import OutputError, TargetError, VerificationError
from .fileutil import atomic_path, check_writable, write_json
from .loader import PreparedModel, prepare_onnx

LogFn = Callable[[str], None]


def weight_stats(mod: tvm.IRModule) -> Dict[str, int]:
    """Element count and bytes of every constant tensor in the module's Relax functions."""
    seen: Dict[int, Any] = {}

    def visit(expr):
        if isinstance(expr, tvm.ir.expr.GenericConst):  # Relax's constant tensor node
            seen.setdefault(hash(expr), expr.value)

    for _, func in mod.functions.items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    params = nbytes = 0
    for data in seen.values():
        n = int(np.prod(data.shape)) if len(data.shape) else 1
        params += n
        nbytes += n * np.dtype(data.dtype).itemsize
    return {"params": params, "bytes": nbytes}


def manifest_path(lib_path: str | os.PathLike) -> Path:
    """``model.so`` -> ``model.json`` beside it."""
    return Path(lib_path).with_suffix(".json")


def _resolve_target(target: str | TargetProfile) -> TargetProfile:
    return target if isinstance(target, TargetProfile) else get_target(target)


def compile(  # noqa: A001  (the product's verb)
    model: str | os.PathLike,
    output: str | os.PathLike,
    *,
    target: str | TargetProfile = "x86",
    passes: str | Sequence[str] | None = None,
    pass_configs: Optional[Mapping[str, Any]] = None,
    input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
    verify_input: Optional[str | os.PathLike] = None,
    tune_trials: int = 0,
    report: Optional[str | os.PathLike] = None,
    bench_runs: int = 50,
    rpc: Optional["remote.RemoteSpec"] = None,
    check_kernels: bool = True,
    log: LogFn = print,
) -> Dict[str, Any]:
    """Compile ``model`` for ``target`` into ``output`` (.so) and return the report dict.

    Everything that can be checked is checked before any long work: target, toolchain, pass
    names and options, output paths, model, shapes, verification data.

    ``check_kernels``: run every scheduled kernel alone with pre-filled outputs against its
    unscheduled form (``kernel_check``) before the library is written.
    """
    t_start = time.monotonic()
    profile = _resolve_target(target)
    family = get_family(profile.family)
    family.check_toolchain(profile)
    tvm_target = profile.tvm_target()
    names = parse_pass_list(passes)
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

    prepared = prepare_onnx(model, input_shapes)
    for note in prepared.notes:
        log(f"note: {note}")
    if verify_input is not None:
        inputs = verify.inputs_from_file(verify_input, prepared.inputs)
        input_source = str(verify_input)
    else:
        inputs = verify.random_inputs(prepared.inputs, seed=0)
        input_source = "random (seed 0)"

    log(f"import: {prepared.path} ({len(prepared.model.graph.node)} ONNX nodes)")
    mod = prepared.to_relax()
    before = weight_stats(mod)

    env = PassEnv(model_path=prepared.path, inputs=list(prepared.inputs), target=profile, log=log)
    # Config validation happens here, before any pass runs.
    passes_list = pipeline.compression_passes(names, pass_configs, env)
    for name, p in zip(names, passes_list):
        log(f"pass: {name}")
        mod = p(mod)
    after = weight_stats(mod)

    log(f"lower: {profile.name} ({tvm_target.kind.name})")
    with tvm_target:
        mod = tvm.transform.Sequential(pipeline.lowering_passes(profile))(mod)
    lowered = mod
    mod, tuning_summary = pipeline.schedule(
        mod, profile, tune_trials, log=log, runner=remote.tuning_runner(rpc) if rpc else None
    )
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
    executable = tvm.compile(mod, tvm_target)

    with atomic_path(output) as tmp_lib:
        family.export(executable, tmp_lib, profile)
        if calls:
            kernel_report = _check_kernels(family, profile, tmp_lib, lowered, calls, inputs, rpc, log)
        record = _verify_and_time(
            family, profile, tmp_lib, prepared, inputs, bench_runs,
            lossy=any(get_pass(n).lossy for n in names), log=log, rpc=rpc,
        )
        artifact_bytes = tmp_lib.stat().st_size
        manifest_data = _manifest(prepared, profile, tvm_target, names, tmp_lib, output, tuning_summary)
        if calls:
            # Relax function that runs each scheduled kernel on caller-given buffers (kernel_check)
            manifest_data["check_function"] = kernel_check.CHECK_FUNCTION
    try:
        write_json(manifest, manifest_data)
    except BaseException:
        output.unlink(missing_ok=True)  # never a library without its manifest
        raise

    rep: Dict[str, Any] = {
        "model": str(prepared.path),
        "model_sha256": prepared.sha256,
        "target": profile.name,
        "tvm_target": json.loads(str(tvm_target)),
        "passes": names,
        "params_before": before["params"],
        "params_after": after["params"],
        "weight_bytes_before": before["bytes"],
        "weight_bytes_after": after["bytes"],
        "artifact": str(output),
        "artifact_bytes": artifact_bytes,
        "verify_input": input_source,
        **record,
        "tuning": (
            tuning_summary.as_dict() if tuning_summary else {"trials": 0, "new_trials": 0, "seconds": 0.0}
        ),
        "kernel_check": kernel_report,
        "pass_reports": env.report,
        "seconds": round(time.monotonic() - t_start, 2),
    }
    if report is not None:
        write_json(report, rep)
    return rep


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


def _verify_and_time(family, profile, lib_path, prepared: PreparedModel, inputs, bench_runs, lossy, log, rpc=None):
    refs = verify.ort_run(prepared.path, prepared.inputs, inputs)
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
    if meaningful:
        rec["latency_ms"] = verify.latency_stats(result.times_ms)
        rec["onnxruntime_latency_ms"] = verify.latency_stats(
            verify.ort_latency(prepared.path, prepared.inputs, inputs, repeat=bench_runs)
        )
        log(
            f"latency: median {rec['latency_ms']['median']:.3f} ms "
            f"(onnxruntime {rec['onnxruntime_latency_ms']['median']:.3f} ms, 2 threads)"
        )
    else:
        rec["latency_note"] = f"{result.where}: emulated, not the board's speed (use --rpc-tracker)"
    return rec


def _manifest(prepared, profile, tvm_target, names, lib_path, final_path, tuning_summary):
    from .loader import file_sha256

    return {
        "format": "tvm-compress-artifact/1",
        "library": Path(final_path).name,
        "library_sha256": file_sha256(lib_path),
        "inputs": [{"name": i.name, "shape": list(i.shape), "dtype": i.dtype} for i in prepared.inputs],
        "outputs": [
            {"name": o.name, "shape": list(o.shape) if o.shape else None, "dtype": o.dtype}
            for o in prepared.outputs
        ],
        "target": profile.name,
        "family": profile.family,
        "tvm_target": json.loads(str(tvm_target)),
        "passes": list(names),
        "tvm_version": tvm.__version__,
        "source_model": str(prepared.path),
        "source_sha256": prepared.sha256,
        "tuning": tuning_summary.as_dict() if tuning_summary else None,
    }
