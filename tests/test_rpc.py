"""Boards over TVM RPC, tested with a tracker and an RPC server on loopback."""

from __future__ import annotations

import numpy as np
import pytest

import tvm_compress
from tvm_compress import errors
from tvm_compress.cli import main
from tvm_compress.remote import RemoteSpec, check_tracker, parse_tracker

from conftest import free_port, tvm_rpc_process

quiet = lambda m: None  # noqa: E731


@pytest.fixture(scope="module")
def tracker(rpc_tracker_port):
    """One x86 RPC server under key 'x86-local' registered with the loopback tracker."""
    port = rpc_tracker_port
    spec = RemoteSpec("127.0.0.1", port, "x86-local")
    server_port = free_port()
    args = ["--host", "127.0.0.1", "--port", str(server_port), "--port-end", str(server_port + 1),
            "--tracker", f"127.0.0.1:{port}", "--key", "x86-local"]
    with tvm_rpc_process("rpc_server", args, lambda: check_tracker(spec, timeout=1) or True,
                         "RPC server"):
        yield spec


@pytest.mark.slow
def test_compile_verifies_and_times_on_the_remote_board(dense_model, tmp_path, tracker):
    rep = tvm_compress.compile(dense_model, tmp_path / "d.so", rpc=tracker, bench_runs=5, log=quiet)
    assert rep["verify_status"] == f"ran rpc x86-local@127.0.0.1:{tracker.port}"
    assert rep["max_rel_err"] < 1e-4 and rep["latency_ms"]["runs"] == 5

    x = np.random.default_rng(2).random((2, 32), dtype=np.float32)
    remote = tvm_compress.run(tmp_path / "d.so", {"x": x}, repeat=2, rpc=tracker)
    local = tvm_compress.run(tmp_path / "d.so", {"x": x})
    np.testing.assert_allclose(remote.outputs[0], local.outputs[0], rtol=1e-6)
    assert len(remote.times_ms) == 2


@pytest.mark.slow
def test_tuning_measures_on_the_remote_board(conv_model, tmp_path, tracker):
    rep = tvm_compress.compile(conv_model, tmp_path / "c.so", rpc=tracker, tune_trials=4, bench_runs=2, log=quiet)
    assert rep["tuning"]["new_trials"] == 4
    assert rep["max_rel_err"] < 1e-4


def test_unreachable_tracker_one_line_error(dense_model, tmp_path, capsys):
    port = free_port()  # nothing listens there
    code = main(["compile", str(dense_model), "-o", str(tmp_path / "d.so"),
                 "--rpc-tracker", f"127.0.0.1:{port}", "--rpc-key", "pi4"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "\n" not in err
    assert f"RPC tracker 127.0.0.1:{port} unreachable" in err
    assert not (tmp_path / "d.so").exists()


def test_unknown_key_one_line_error(dense_model, tmp_path, tracker, capsys):
    code = main(["compile", str(dense_model), "-o", str(tmp_path / "d.so"),
                 "--rpc-tracker", f"127.0.0.1:{tracker.port}", "--rpc-key", "jetson"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "no RPC server with key 'jetson'" in err and "x86-local" in err


@pytest.mark.parametrize("text, key", [("localhost", "k"), ("h:p", "k"), ("h:9190", None)])
def test_bad_tracker_arguments(text, key):
    with pytest.raises(errors.RemoteError):
        parse_tracker(text, key)


@pytest.mark.slow
def test_bench_times_rpc_targets_on_the_board_and_the_rest_here(dense_model, tmp_path, tracker):
    from tvm_compress.bench import run_bench

    rep = run_bench(dense_model, tmp_path / "out", targets=["x86-avx2", "x86"], pass_sets="none",
                    rpc=tracker, rpc_targets=["x86"], rounds=1, plots=False, log=quiet)
    rows = {r["target"]: r for r in rep["rows"]}
    board, here = rows["x86"], rows["x86-avx2"]
    assert board["on_board"] and board["timing"]["where"] == f"ran rpc x86-local@127.0.0.1:{tracker.port}"
    assert board["timing"]["runs"] == 50 and "timed on the board" in board["timing_note"]
    assert not here["on_board"] and here["timing"]["rounds"] == 1 and "speedup_vs_onnxruntime_fp32" in here["timing"]
    with pytest.raises(errors.TvmCompressError, match="--rpc-targets: rpi4 not in --targets"):
        run_bench(dense_model, tmp_path / "bad", targets=["x86"], pass_sets="none", rpc=tracker,
                  rpc_targets=["rpi4"], log=quiet)
