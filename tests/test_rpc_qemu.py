"""A virtual aarch64 board (TVM's RPC server under qemu-user) registered with a loopback tracker.

The board is prepared once in the user's cache (scripts/virtual_board.py: Debian's arm64
python3.11 + the aarch64 TVM wheels, ~20 s cold); the tests skip when qemu-aarch64 is missing or
the board cannot be prepared (no network).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tvm_compress
from tvm_compress import errors
from tvm_compress.remote import RemoteSpec

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
KEY = "virtual-aarch64"
quiet = lambda m: None  # noqa: E731


@pytest.fixture(scope="module")
def board(tmp_path_factory, rpc_tracker_port):
    """(RemoteSpec, server log path): a tracker on 127.0.0.1 and the virtual board under KEY."""
    # the board is a test tool in scripts/, not part of the package
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    import virtual_board as vb

    why = vb.blocker()
    if why:
        pytest.skip(why)
    try:
        vb.prepare()
    except errors.TvmCompressError as err:
        pytest.skip(f"virtual aarch64 board cannot be prepared: {err}")

    port = rpc_tracker_port
    server = None
    try:
        log_path = tmp_path_factory.mktemp("board") / "server.log"
        server = vb.start_server("127.0.0.1", port, KEY, host="127.0.0.1", log_path=log_path)
        try:
            vb.wait_registered("127.0.0.1", port, KEY, server, timeout=300)
        except errors.RemoteError as err:
            pytest.fail(str(err))
        yield RemoteSpec("127.0.0.1", port, KEY), log_path
    finally:
        if server is not None:
            vb.stop_server(server)


@pytest.mark.slow
def test_demo_model_verifies_and_times_on_the_virtual_board(board, demo_model, tmp_path):
    spec, log_path = board
    rep = tvm_compress.compile(demo_model, tmp_path / "m.so", target="aarch64",
                               input_shapes={"input": (1, 1, 28, 28)}, rpc=spec, bench_runs=3, log=quiet)
    assert rep["verify_status"] == f"ran rpc {KEY}@127.0.0.1:{spec.port}"
    assert rep["verified"] and rep["max_rel_err"] < 1e-4
    assert rep["latency_ms"]["runs"] == 3 and rep["latency_ms"]["median"] > 0
    # the library really went to the board (an aarch64 ELF, loaded there)
    assert (tmp_path / "m.so").read_bytes()[18] == 183  # e_machine EM_AARCH64
    assert ".so" in "".join(ln for ln in log_path.read_text().splitlines() if "load_module" in ln)

    x = np.random.default_rng(3).random((1, 1, 28, 28), dtype=np.float32)
    remote = tvm_compress.run(tmp_path / "m.so", {"input": x}, repeat=2, rpc=spec)
    assert remote.outputs[0].shape == (1, 10) and len(remote.times_ms) == 2


@pytest.mark.slow
def test_tuning_measures_on_the_virtual_board(board, dense_model, tmp_path):
    from tvm_compress.targets import get_target

    spec, log_path = board
    # MetaSchedule needs the board's core count in the target; the aarch64 preset has none.
    profile = get_target("aarch64")
    profile = dataclasses.replace(profile, target={**profile.target, "num-cores": 2})
    t0 = time.monotonic()
    rep = tvm_compress.compile(dense_model, tmp_path / "d.so", target=profile, rpc=spec,
                               tune_trials=2, bench_runs=2, log=quiet)
    assert rep["tuning"]["new_trials"] == 2
    assert rep["max_rel_err"] < 1e-4 and rep["verify_status"].startswith(f"ran rpc {KEY}")
    # every candidate was built here, linked and timed on the board (1e10 s marks a failed run)
    records = Path(rep["tuning"]["work_dir"]) / "database_tuning_record.json"
    run_secs = [json.loads(line)[1][1] for line in records.read_text().splitlines() if line.strip()]
    assert run_secs and all(0 < s[0] < 1.0 for s in run_secs), run_secs
    assert "tvm_tmp_mod.tar" in log_path.read_text()
    assert time.monotonic() - t0 < 600
