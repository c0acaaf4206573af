"""Stopped, concurrent and repeated compiles: nothing partial is left, the tuning records stay
valid and are reused, and the same inputs give the same library."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tvm_compress.demo import demo_files

pytestmark = pytest.mark.slow


def _compile_cmd(out: Path, trials: int, extra=()):
    return [sys.executable, "-m", "tvm_compress.cli", "compile", str(demo_files()["model"]), "-o", str(out / "m.so"),
            "--input-shape", "input=1,1,28,28", "--tune-trials", str(trials), "--report", str(out / "r.json"),
            "--bench-runs", "2", *extra]


def _records(cache: Path) -> int:
    """Trials measured so far (the default schedules recorded before them do not count)."""
    from tvm_compress.tuning import cached_trials

    return sum(cached_trials(p.parent) for p in cache.glob("tuning/*/database_tuning_record.json"))


# Small budgets: the default schedules are measured before the first trial, which already
# takes most of a short compile.
TRIALS = 10


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_a_compile_stopped_mid_tuning_leaves_nothing_and_the_rerun_reuses_its_records(tmp_path, sig):
    cache, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "TVM_COMPRESS_CACHE": str(cache)}
    proc = subprocess.Popen(_compile_cmd(out, TRIALS), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while _records(cache) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, "finished before it could be stopped"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert not list(out.iterdir())  # no library, manifest, report or temporary file
    measured = _records(cache)

    rerun = subprocess.run(_compile_cmd(out, TRIALS), env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr
    tuning = json.loads((out / "r.json").read_text())["tuning"]
    assert tuning["cached_trials"] >= min(measured, TRIALS) > 0 and tuning["new_trials"] <= TRIALS - min(measured, TRIALS)


def test_two_compiles_of_one_model_at_once_both_succeed_and_share_valid_records(tmp_path):
    from tvm_compress.tuning import _first_bad_line

    cache = tmp_path / "cache"
    env = {**os.environ, "TVM_COMPRESS_CACHE": str(cache)}
    outs = [tmp_path / "a", tmp_path / "b"]
    for o in outs:
        o.mkdir()
    procs = [subprocess.Popen(_compile_cmd(o, 4), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for o in outs]
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err
    work = [d for d in (cache / "tuning").iterdir() if d.is_dir()]
    assert len(work) == 1 and _first_bad_line(work[0]) is None
    reports = [json.loads((o / "r.json").read_text())["tuning"] for o in outs]
    # One tuned, the other waited on the lock and reused the records.
    assert sorted(r["new_trials"] for r in reports)[0] == 0


def test_the_same_inputs_give_a_byte_identical_library(tmp_path):
    import tvm_compress

    data = str(demo_files()["data"]) + ":calib"
    libs = []
    for k in range(2):
        rep = tvm_compress.compile(demo_files()["model"], tmp_path / f"m{k}.so", passes=["quantize"],
                                   pass_configs={"quantize": {"calib": data, "calib_samples": 32}},
                                   input_shapes={"input": (1, 1, 28, 28)}, bench_runs=1, log=lambda m: None)
        libs.append((tmp_path / f"m{k}.so").read_bytes())
        manifest = json.loads((tmp_path / f"m{k}.json").read_text())
        assert manifest["build_options"]["pass_configs"]["quantize"]["calib_samples"] == 32
        assert manifest["versions"]["apache-tvm"] and rep["verified"]
    assert libs[0] == libs[1]
