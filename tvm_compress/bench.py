"""``bench``: one model, every (target x pass set), next to what the user would otherwise deploy.

Each combination is compiled by ``build.compile`` (tuning records shared through the cache),
verified against onnxruntime where it runs, and recorded in ``OUT/rows/``; a failing
combination is recorded with its one-line error and the rest goes on; a rerun skips rows that
are done with the same inputs. Then every engine that runs on this machine for real (host
libraries, a GPU here, onnxruntime fp32 and static int8 of the same model calibrated on the same
data) is timed in one session: each engine in its own process, taking turns for ``rounds``
rounds, the next one starting only once the previous one's threads have gone idle. Libraries
that only run under qemu are verified, never timed; boards are timed over RPC by ``compile``.

Writes ``report.json`` (one record per combination plus the baselines), ``report.md`` and PNG
plots (``bench_report``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import verify
from .console import Progress, native_output
from .errors import DataError, OutputError, PassOptionError, TvmCompressError
from .fileutil import atomic_path, write_json
from .pass_registry import get_preset, make_config, parse_pass_list
from .targets import get_family, get_target

LogFn = Callable[[str], None]

ORT_FP32 = "onnxruntime fp32"
ORT_INT8 = "onnxruntime int8"
NOISY_SPREAD = 0.25  # round medians of one engine further apart than this (relative): say so


@dataclasses.dataclass(frozen=True)
class PassSet:
    label: str  # "none", "quantize", "prune+quantize"
    passes: Tuple[str, ...]


def parse_pass_sets(text: str | Sequence[str]) -> List[PassSet]:
    """``"none,quantize,prune+quantize"`` -> pass sets; names and order checked."""
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if not items:
        raise PassOptionError("--passes: give at least one pass set (e.g. none,quantize)")
    out = []
    for item in items:
        names = [] if item == "none" else parse_pass_list(item.split("+"))
        label = "+".join(names) or "none"
        if label in [p.label for p in out]:
            raise PassOptionError(f"--passes: pass set {item!r} given twice")
        out.append(PassSet(label, tuple(names)))
    return out


def _row_key(target: str, pass_set: PassSet) -> str:
    return f"{target}--{pass_set.label}"


def _one_line(err: BaseException) -> str:
    if isinstance(err, TvmCompressError):
        return str(err)
    lines = str(err).strip().splitlines()
    return f"internal error: {type(err).__name__}: {lines[-1] if lines else ''}"


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()[:16]


_SOURCE_SUFFIXES = (".py", ".toml", ".cc", ".h")


def code_fingerprint() -> str:
    """This tool's own sources (driver, passes, targets, presets, runner) and TVM's version: a
    row that other code built is built again, not kept (an upgrade changes what a pass or a
    kernel does while the model and options stay the same)."""
    import tvm

    import tvm_compress.passes
    import tvm_compress.targets

    digest = hashlib.sha256(tvm.__version__.encode())
    for package in (sys.modules["tvm_compress"], tvm_compress.passes, tvm_compress.targets):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*")):
            if path.suffix in _SOURCE_SUFFIXES and "__pycache__" not in path.parts and path.is_file():
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def run_bench(
    model: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    targets: Sequence[str],
    pass_sets: str | Sequence[PassSet],
    input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
    input_values: Optional[Mapping[str, Sequence]] = None,
    pass_configs: Optional[Mapping[str, Any]] = None,
    calib: Optional[str] = None,
    eval_data: Optional[str] = None,
    tune_trials: int = 0,
    rpc=None,
    rpc_targets: Optional[Sequence[str]] = None,
    rounds: int = 10,
    fold: bool = True,
    plots: bool = True,
    verbose: bool = False,
    log: LogFn = print,
) -> Dict[str, Any]:
    """Compile, verify and time ``model`` for every target x pass set; write the report files
    under ``out_dir`` and return the report dict.

    ``rpc``: boards over a tracker, for ``rpc_targets`` (default: every target that does not run
    natively here); their builds are tuned, verified and timed on the board by ``compile``."""
    from .build import compile as compile_model
    from .loader import prepare_onnx

    sets = parse_pass_sets(pass_sets) if not (pass_sets and isinstance(pass_sets[0], PassSet)) else list(pass_sets)
    if not targets:
        raise PassOptionError("--targets: give at least one target")
    profiles = [get_target(t) for t in targets]  # unknown names: one line, before any work
    if len({p.name for p in profiles}) != len(profiles):
        raise PassOptionError("--targets: a target is given twice")
    if rpc_targets is not None:
        unknown = sorted(set(rpc_targets) - {p.name for p in profiles})
        if unknown:
            raise PassOptionError(f"--rpc-targets: {', '.join(unknown)} not in --targets")
        if rpc is None:
            raise PassOptionError("--rpc-targets needs --rpc-tracker HOST:PORT")
    on_board = {p.name for p in profiles if rpc is not None and (
        p.name in rpc_targets if rpc_targets is not None else not _runs_here(p))}
    if rounds < 1:
        raise PassOptionError(f"--rounds must be >= 1, got {rounds}")
    if tune_trials < 0:
        raise PassOptionError(f"--tune-trials must be >= 0, got {tune_trials}")
    configs = _configs(sets, pass_configs or {}, calib)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output directory {out} is a file")
    prepared = prepare_onnx(model, input_shapes, input_values=input_values)
    specs = prepared.inputs
    evalset = _load_eval(eval_data, specs) if eval_data else None
    for sub in ("rows", "logs", "baselines"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    verify_file = out / "verify_input.npz"
    inputs = ([a[:1] for a in evalset["arrays"]] if evalset else verify.random_inputs(specs, seed=0))
    np.savez(verify_file, **{s.name: x for s, x in zip(specs, inputs)})
    if evalset:
        np.savez(out / "eval_data.npz", **{s.name: a for s, a in zip(specs, evalset["arrays"])})

    progress = _Matrix(len(profiles) * len(sets), log)
    code = code_fingerprint()
    rows = []
    for profile in profiles:
        for ps in sets:
            key = _row_key(profile.name, ps)
            lib = out / "rows" / f"{key}.so"
            row_file = out / "rows" / f"{key}.row.json"  # (f"{key}.json" is the library's manifest)
            fp = _fingerprint(code, prepared.sha256, profile.target, profile.features, ps.passes,
                              {n: configs[n] for n in ps.passes}, tune_trials, fold,
                              {s.name: s.shape for s in specs}, prepared.bound_values(),
                              str(rpc) if profile.name in on_board else None)
            done = _load_json(row_file)
            if done and done.get("fingerprint") == fp and done["status"] == "ok" and _intact(lib):
                progress.finish(key, "done before, kept", resumed=True)
                rows.append(done)
                continue
            progress.start(key)
            row = {"key": key, "target": profile.name, "pass_set": ps.label, "passes": list(ps.passes),
                   "fingerprint": fp, "log": str(out / "logs" / f"{key}.log"),
                   "on_board": profile.name in on_board}
            t0 = time.monotonic()
            (out / "logs" / f"{key}.log").unlink(missing_ok=True)
            try:
                with native_output(out / "logs" / f"{key}.log", verbose), \
                        open(out / "logs" / f"{key}.log", "a") as row_log:
                    rep = compile_model(
                        prepared.path, lib, target=profile, passes=list(ps.passes),
                        pass_configs={n: configs[n] for n in ps.passes}, input_shapes=input_shapes,
                        input_values=input_values,
                        verify_input=verify_file, tune_trials=tune_trials,
                        report=out / "rows" / f"{key}.report.json", bench_runs=50, fold=fold,
                        rpc=rpc if profile.name in on_board else None,
                        log=progress.sub(row_log),
                    )
                row.update(_row_fields(rep, lib))
                row["status"] = "ok"
                note = f"ok, {rep['weight_bytes_after']:,} weight bytes, max rel err {_g(rep['max_rel_err'])}"
            except KeyboardInterrupt:
                raise
            except Exception as err:  # noqa: BLE001  (recorded in its row; the rest goes on)
                row.update(status="failed", error=_one_line(err), library=None)
                note = f"FAILED: {row['error']}"
            row["compile_seconds"] = round(time.monotonic() - t0, 1)
            write_json(row_file, row)
            progress.finish(key, note)
            rows.append(row)

    baselines = _baselines(prepared, out, configs, calib, log)
    engines = _engines([r for r in rows if r["target"] not in on_board], baselines, profiles)
    timing, accuracy, kernels = _measure(engines, specs, out, evalset, rounds, log)
    report = _assemble(prepared, rows, baselines, engines, timing, accuracy, kernels, evalset,
                       rounds, tune_trials, profiles)
    write_json(out / "report.json", report)
    from . import bench_report

    _write_text(out / "report.md", bench_report.markdown(report))
    if plots:
        report["plots"], report["plot_series"] = bench_report.plots(report, out)
        write_json(out / "report.json", report)
        _write_text(out / "report.md", bench_report.markdown(report))
    log(f"bench: {sum(r['status'] == 'ok' for r in rows)} of {len(rows)} combinations built; "
        f"report {out / 'report.md'}, data {out / 'report.json'}"
        + (f", plots {', '.join(str(out / p) for p in report.get('plots', []))}" if report.get("plots") else ""))
    return report


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _g(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _configs(sets: Sequence[PassSet], given: Mapping[str, Any], calib: Optional[str]) -> Dict[str, Any]:
    """One config per pass named anywhere (built now: bad options fail before any work);
    ``calib`` fills the calibration data of passes that read it and were given none."""
    out = {}
    for name in {n for s in sets for n in s.passes}:
        preset = get_preset(name)
        cfg = make_config(preset, given.get(name))
        if calib and preset.reads_calibration and getattr(cfg, "calib", None) is None:
            cfg = dataclasses.replace(cfg, calib=calib)
        out[name] = cfg
    return out


def _intact(lib: Path) -> bool:
    """The library is there and matches its manifest (it is loaded, so its code runs)."""
    from .manifest import load_manifest

    try:
        load_manifest(lib)
        return True
    except TvmCompressError:
        return False


def _load_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _load_eval(spec: str, specs) -> dict:
    from .calib_data import Preprocess, load_calibration

    data = load_calibration(spec, [(s.name, s.shape, s.dtype) for s in specs], Preprocess(), limit=10**9,
                            log=lambda m: None, who="--eval")
    arrays = [data.inputs[s.name] for s in specs]
    if not len(arrays[0]):
        raise DataError(f"--eval {spec}: no samples")
    return {"source": data.source, "arrays": arrays, "labels": data.labels, "count": len(arrays[0])}


def _row_fields(rep: dict, lib: Path) -> dict:
    keep = ("params_before", "params_after", "macs_before", "macs_after", "weight_bytes_before",
            "weight_bytes_after", "artifact_bytes", "verified", "verify_status", "max_abs_err",
            "max_rel_err", "within_float_tolerance", "latency_ms", "latency_note", "seconds",
            "schedule_fallbacks", "conv_layout")
    row = {k: rep.get(k) for k in keep}
    row["library"] = str(lib)
    row["tuning_trials"] = (rep.get("tuning") or {}).get("trials", 0)
    row["pass_reports"] = {k: {kk: vv for kk, vv in v.items() if kk not in ("layers", "layer_stats")}
                           for k, v in (rep.get("pass_reports") or {}).items()}
    return row


class _Matrix:
    """The matrix's progress: one status line (bar, ETA, the running compile's latest line)
    and one permanent line per finished combination."""

    def __init__(self, total: int, log: LogFn):
        self.total, self.log = total, log
        self.finished, self.timed, self.spent = 0, 0, 0.0
        self.key, self.t0 = "", time.monotonic()

    def _eta(self) -> str:
        left = self.total - self.finished
        if not self.timed or not left:
            return ""
        return f", ETA {_clock(self.spent / self.timed * left - (time.monotonic() - self.t0))}"

    def _bar(self) -> str:
        full = int(20 * self.finished / max(self.total, 1))
        return f"[{'#' * full}{'.' * (20 - full)}] {self.finished}/{self.total}"

    def start(self, key: str) -> None:
        self.key, self.t0 = key, time.monotonic()
        self.log(Progress(f"{self._bar()}{self._eta()} {key}: starting"))

    def sub(self, row_log) -> LogFn:
        def log(msg: str) -> None:
            row_log.write(str(msg) + "\n")
            row_log.flush()
            self.log(Progress(f"{self._bar()}{self._eta()} {self.key}: {msg}"))

        return log

    def finish(self, key: str, note: str, resumed: bool = False) -> None:
        self.finished += 1
        if not resumed:
            self.timed += 1
            self.spent += time.monotonic() - self.t0
        self.log(f"[{self.finished}/{self.total}] {key}: {note}")


def _clock(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


# ---- baselines -----------------------------------------------------------------------------

def _baselines(prepared, out: Path, configs, calib: Optional[str], log: LogFn) -> Dict[str, dict]:
    """onnxruntime fp32 (the model as given) and static int8 (QDQ, per-channel int8 weights,
    uint8 activations) calibrated on the data the quantize pass uses."""
    base = {ORT_FP32: {"path": str(prepared.path), "note": "the model as given, 2 threads"}}
    if prepared.upgraded is not None:  # onnxruntime cannot run the file's opset
        upgraded = out / "baselines" / "model_upgraded_opset.onnx"
        upgraded.write_bytes(prepared.upgraded)
        base[ORT_FP32] = {"path": str(upgraded), "note": "the model upgraded to a newer opset, 2 threads"}
    if prepared.bound:  # fed to onnxruntime with every run, as the compiled model holds them
        bound = out / "baselines" / "bound_inputs.npz"
        np.savez(bound, **prepared.bound)
        base[ORT_FP32]["bound"] = str(bound)
    spec = calib or next((getattr(c, "calib", None) for c in configs.values() if getattr(c, "calib", None)), None)
    if spec is None:
        base[ORT_INT8] = {"path": None, "note": "not built: needs calibration data (--calib)"}
        return base
    path = out / "baselines" / "onnxruntime_int8.onnx"
    meta = out / "baselines" / "onnxruntime_int8.json"
    fp = _fingerprint(prepared.sha256, spec, {s.name: s.shape for s in prepared.inputs},
                      prepared.bound_values())
    note = f"static QDQ u8s8, per-channel, calibrated on {spec}"
    done = _load_json(meta) or {}
    if path.exists() and done.get("fingerprint") == fp:
        base[ORT_INT8] = {"path": str(path), "note": done.get("note", note)}
        return base
    log(Progress("bench: onnxruntime static int8 of the model (calibrating)"))
    try:
        try:
            _ort_int8(prepared, spec, path)
        except ValueError:
            # onnxruntime 1.32's quantizer fails adjusting weight scales for int32 biases on some
            # models (Magika's: "truth value of an array ... is ambiguous"); build it without that.
            _ort_int8(prepared, spec, path, adjust_bias_scales=False)
            note += " (without onnxruntime's weight-scale adjustment for int32 biases, which failed)"
        write_json(meta, {"fingerprint": fp, "note": note})
        base[ORT_INT8] = {"path": str(path), "note": note}
    except Exception as err:  # noqa: BLE001  (a baseline that cannot be built is reported, not fatal)
        base[ORT_INT8] = {"path": None, "note": f"not built: {_one_line(err)}"}
    return base


def _ort_int8(prepared, spec: str, path: Path, samples: int = 64, adjust_bias_scales: bool = True) -> None:
    import onnx

    from .calib_data import Preprocess, load_calibration

    data = load_calibration(spec, [(s.name, s.shape, s.dtype) for s in prepared.inputs], Preprocess(),
                            limit=samples, log=lambda m: None, who="onnxruntime int8")
    fixed = path.with_name("model_fixed_shapes.onnx")
    onnx.save(prepared.model, str(fixed))
    ort_static_int8(fixed, path, data.inputs, sizes=data.sizes, adjust_bias_scales=adjust_bias_scales)


def ort_static_int8(model: str | os.PathLike, out: str | os.PathLike, calib: Mapping[str, np.ndarray],
                    activations: str = "uint8", sizes: Optional[Mapping[str, int]] = None,
                    adjust_bias_scales: bool = True) -> Path:
    """onnxruntime's static int8 of ``model`` (QDQ, per-channel int8 weights, ``uint8`` or
    ``int8`` activations), calibrated one sample at a time on ``calib`` (input name -> N x ...;
    ``sizes``: an input's rows per sample where that is not 1, a recurrent state's say; 0 for a
    0-d input), written to ``out`` (atomically). The baseline ``bench`` compares with."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from .calib_data import CalibData

    sizes = dict(sizes or {})
    # One model call per sample: the first input's leading size is the model's batch.
    feeds = iter([feed for feed, _ in CalibData({n: np.asarray(a) for n, a in calib.items()}, sizes=sizes)
                  .batches(sizes.get(next(iter(calib)), 1) or 1)])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(feeds, None)

    out = Path(out)
    act = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[activations]
    # onnxruntime's quantizer logs advice on the root logger; it belongs in the log, not the terminal
    logging.disable(logging.WARNING)
    try:
        with atomic_path(out) as tmp, native_output(out.with_suffix(".log")):
            quantize_static(str(model), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=act, weight_type=QuantType.QInt8,
                            extra_options={"QDQDisableWeightAdjustForInt32Bias": not adjust_bias_scales})
    finally:
        logging.disable(logging.NOTSET)
    return out


# ---- engines and measurement ----------------------------------------------------------------

@dataclasses.dataclass
class _Engine:
    name: str  # row key or baseline name
    kind: str  # "tvm" | "ort"
    path: str
    target: Optional[str] = None
    bound: Optional[str] = None  # .npz of inputs fixed to values (onnxruntime on the original model)


def _runs_here(profile) -> bool:
    family = get_family(profile.family)
    return family.can_run(profile)[0] and family.latency_is_meaningful(profile)


def _engines(rows, baselines, profiles) -> List[_Engine]:
    """What runs here for real: baselines and libraries of targets that run natively."""
    by_name = {p.name: p for p in profiles}
    engines = [_Engine(n, "ort", b["path"], bound=b.get("bound")) for n, b in baselines.items() if b["path"]]
    for row in rows:
        if row["status"] == "ok" and _runs_here(by_name[row["target"]]):
            engines.append(_Engine(row["key"], "tvm", row["library"], row["target"]))
    return engines


class _Worker:
    def __init__(self, engine: _Engine, inputs_file: Path, log_file: Path):
        self.engine = engine
        self._log = open(log_file, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tvm_compress._engine_worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1,
        )
        self.ask({"op": "load", "kind": engine.kind, "path": engine.path, "target": engine.target,
                  "inputs": str(inputs_file), "bound": engine.bound})

    def ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.engine.name}: engine process ended (see {self._log.name})")
        res = json.loads(line)
        if "error" in res:
            raise RuntimeError(f"{self.engine.name}: {res['error']}")
        return res

    def wait_idle(self, max_s: float = 3.0) -> None:
        """Until this process's threads stop using CPU (pools spin after a run)."""
        wait_idle(self.proc.pid, max_s)

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except Exception:  # noqa: BLE001
            self.proc.kill()
        self._log.close()


def wait_idle(pid: int, max_s: float = 3.0) -> None:
    """Until process ``pid``'s threads stop using CPU (thread pools spin after a run)."""
    end = time.monotonic() + max_s
    last = _cpu_ticks(pid)
    while last is not None and time.monotonic() < end:
        time.sleep(0.05)
        now = _cpu_ticks(pid)
        if now is None or now == last:
            return
        last = now


def _cpu_ticks(pid: int) -> Optional[int]:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime, all threads
    except (OSError, IndexError, ValueError):
        return None


def _measure(engines: List[_Engine], specs, out: Path, evalset, rounds: int, log: LogFn):
    timing: Dict[str, dict] = {}
    accuracy: Dict[str, dict] = {}
    kernels: Dict[str, Any] = {}
    workers: Dict[str, _Worker] = {}
    try:
        for k, e in enumerate(engines):
            log(Progress(f"bench: starting engine {k + 1}/{len(engines)}: {e.name}"))
            try:
                workers[e.name] = _Worker(e, out / "verify_input.npz", out / "logs" / "engines.log")
            except Exception as err:  # noqa: BLE001
                timing[e.name] = {"error": _one_line(err)}
        if evalset:
            for k, (name, w) in enumerate(workers.items()):
                log(Progress(f"bench: accuracy on {evalset['count']} samples, {k + 1}/{len(workers)}: {name}"))
                dest = out / "logs" / f"eval_outputs--{name.replace(' ', '_')}.npz"
                try:
                    w.ask({"op": "outputs", "data": str(out / "eval_data.npz"), "out": str(dest)})
                    with np.load(dest) as d:
                        accuracy[name] = [d[f"output_{i}"] for i in range(len(d.files))]
                except Exception as err:  # noqa: BLE001
                    accuracy[name] = {"error": _one_line(err)}
            accuracy = _accuracy(accuracy, evalset)
        live = list(workers.values())
        runs = {}
        for w in live:
            for other in live:
                if other is not w:
                    other.wait_idle()
            runs[w.engine.name] = _runs_per_round(w)
        times: Dict[str, List[List[float]]] = {w.engine.name: [] for w in live}
        for r in range(rounds):
            log(Progress(f"bench: timing round {r + 1}/{rounds} ({len(live)} engines, each in its own process)"))
            order = live[r % len(live):] + live[: r % len(live)] if live else []
            for w in order:
                for other in live:
                    if other is not w:
                        other.wait_idle()
                try:
                    times[w.engine.name].append(
                        w.ask({"op": "time", "runs": runs[w.engine.name], "warmup": 3})["times_ms"])
                except Exception as err:  # noqa: BLE001
                    timing[w.engine.name] = {"error": _one_line(err)}
                    live = [x for x in live if x is not w]
        for name, per_round in times.items():
            if name not in timing and per_round:
                timing[name] = _stats(per_round)
        tvm_timed = [n for n in timing if "median" in timing[n] and workers[n].engine.kind == "tvm"]
        if tvm_timed:
            slowest = max(tvm_timed, key=lambda n: timing[n]["median"])
            log(Progress(f"bench: per-kernel times of the slowest build ({slowest})"))
            try:
                kernels = {"engine": slowest, "kernels_ms": workers[slowest].ask({"op": "profile", "runs": 5})["kernels_ms"]}
            except Exception as err:  # noqa: BLE001
                kernels = {"engine": slowest, "error": _one_line(err)}
    finally:
        for w in workers.values():
            w.close()
    _ratios(timing, times if engines else {})
    return timing, accuracy, kernels


def _runs_per_round(w: _Worker) -> int:
    """About 0.2 s of runs per round (at least 5, at most 200)."""
    ms = max(float(np.median(w.ask({"op": "time", "runs": 5, "warmup": 3})["times_ms"])), 1e-3)
    return int(min(200, max(5, 200.0 / ms)))


def _stats(per_round: List[List[float]]) -> dict:
    t = np.concatenate([np.asarray(r) for r in per_round])
    med_rounds = [float(np.median(r)) for r in per_round]
    med = float(np.median(t))
    spread = (max(med_rounds) - min(med_rounds)) / med if med > 0 else 0.0
    return {"median": round(med, 4), "p10": round(float(np.percentile(t, 10)), 4),
            "p90": round(float(np.percentile(t, 90)), 4), "min": round(float(t.min()), 4),
            "runs": int(t.size), "rounds": len(per_round), "round_spread": round(spread, 3),
            "round_medians": [round(m, 4) for m in med_rounds]}


def _ratios(timing: Dict[str, dict], times: Dict[str, List[List[float]]]) -> None:
    """Speed-up against each onnxruntime baseline: the median over rounds of the ratio of the
    two engines' medians in that round (same rounds, so slow spells hit both)."""
    for base in (ORT_FP32, ORT_INT8):
        ref = times.get(base)
        if not ref:
            continue
        for name, per_round in times.items():
            if name == base or "median" not in timing.get(name, {}):
                continue
            n = min(len(ref), len(per_round))
            if n:
                r = [np.median(ref[k]) / np.median(per_round[k]) for k in range(n)]
                timing[name][f"speedup_vs_{base.replace(' ', '_')}"] = round(float(np.median(r)), 3)


def _accuracy(outputs: Dict[str, Any], evalset: dict) -> Dict[str, dict]:
    """Top-1 against the labels (when the data has them; the first output's argmax per sample)
    and agreement with onnxruntime fp32: top-1 match and the worst relative output error."""
    ref = outputs.get(ORT_FP32)
    labels = evalset["labels"]
    res = {}
    for name, outs in outputs.items():
        if isinstance(outs, dict):
            res[name] = outs
            continue
        first = outs[0].reshape(len(outs[0]), -1)
        acc: Dict[str, Any] = {"samples": int(len(first))}
        if labels is not None and first.shape[1] > 1:
            acc["top1"] = round(float(np.mean(first.argmax(1) == np.asarray(labels).reshape(-1))), 4)
        if isinstance(ref, list) and name != ORT_FP32:
            r = ref[0].reshape(len(ref[0]), -1)
            if first.shape[1] > 1:
                acc["top1_agreement"] = round(float(np.mean(first.argmax(1) == r.argmax(1))), 4)
            errs = [verify.compare(o, rr)["max_rel_err"] for o, rr in zip(outs, ref)]
            acc["max_rel_err"] = None if None in errs else float(max(errs))
        res[name] = acc
    return res


def _assemble(prepared, rows, baselines, engines, timing, accuracy, kernels, evalset, rounds,
              tune_trials, profiles) -> Dict[str, Any]:
    from ._threads import physical_cores

    for row in rows:
        row["timing"] = timing.get(row["key"])
        row["accuracy"] = accuracy.get(row["key"])
        if row["status"] == "ok" and row["timing"] is None and row.get("latency_ms") and row.get("on_board"):
            row["timing"] = {**row["latency_ms"], "where": row["verify_status"]}
            row["timing_note"] = "timed on the board by compile (consecutive runs, not in the rounds)"
        elif row["status"] == "ok" and row["timing"] is None:
            profile = get_target(row["target"])
            family = get_family(profile.family)
            ok, why = family.can_run(profile)
            row["timing_note"] = (row.get("latency_note") or why if not ok or not family.latency_is_meaningful(profile)
                                  else "not timed")
    noisy = [n for n, t in timing.items() if t.get("round_spread", 0) > NOISY_SPREAD]
    return {
        "model": str(prepared.path),
        "model_sha256": prepared.sha256,
        "inputs": {s.name: list(s.shape) for s in prepared.inputs},
        "machine": {"cpu": _cpu_name(), "cores": physical_cores(), "platform": platform.platform()},
        "tune_trials": tune_trials,
        "eval": None if not evalset else {"source": evalset["source"], "samples": evalset["count"],
                                          "labels": evalset["labels"] is not None},
        "timing_setup": (
            f"each engine in its own process (TVM: Relax VM, {os.environ.get('TVM_NUM_THREADS', '?')} "
            "threads; onnxruntime: 2 intra-op threads), warmed up with 3 runs, then "
            f"{rounds} rounds taking turns in rotated order, about 0.2 s of batch-1 runs per engine "
            "per round after 3 untimed runs; an engine starts only when the others' threads have "
            "gone idle. Medians, "
            "p10/p90 over all runs; ratios are the median over rounds of the per-round ratio."
        ),
        "noisy": noisy,
        "baselines": {n: {**b, "timing": timing.get(n), "accuracy": accuracy.get(n)} for n, b in baselines.items()},
        "rows": rows,
        "kernels_of_slowest": kernels,
        "targets": [p.name for p in profiles],
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
