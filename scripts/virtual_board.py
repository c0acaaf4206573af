#!/usr/bin/env python3
"""Start a virtual aarch64 board (TVM RPC server under qemu-user) that registers with a tracker.

    python scripts/virtual_board.py --tracker 127.0.0.1:9190 [--key virtual-aarch64] [--port P]
                                    [--cache-dir DIR] [--prepare-only] [--force]

The first run prepares the board in <cache>/boards/aarch64/ (arm64 python3.11 from Debian,
aarch64 TVM wheels from PyPI; ~20 s); later runs reuse it. Then the server runs until Ctrl-C /
SIGTERM. Use it with

    tvm-compress compile model.onnx -o m.so --target aarch64 \\
        --rpc-tracker 127.0.0.1:9190 --rpc-key virtual-aarch64

The logic lives in tvm_compress.targets.virtual_board (targets/virtual_board.py); see
docs/virtual-board.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _load():
    try:
        from tvm_compress.targets import virtual_board  # installed package

        return virtual_board
    except ImportError:
        pass
    if str(REPO) not in sys.path:  # a checkout without the package installed
        sys.path.insert(0, str(REPO))
    for name, file in (("tvm_compress.targets.qemu", "qemu.py"),
                       ("tvm_compress.targets.virtual_board", "virtual_board.py")):
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, REPO / "targets" / file)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
    return sys.modules["tvm_compress.targets.virtual_board"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracker", metavar="HOST:PORT", help="RPC tracker to register with")
    parser.add_argument("--key", default="virtual-aarch64", help="device key (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address the server binds (default: %(default)s)")
    parser.add_argument("--port", type=int, default=None, help="server port (default: a free one)")
    parser.add_argument("--cache-dir", default=None,
                        help="default: $TVM_COMPRESS_RUNNER_CACHE, $TVM_COMPRESS_CACHE or ~/.cache/tvm-compress")
    parser.add_argument("--prepare-only", action="store_true", help="prepare the board and exit")
    parser.add_argument("--force", action="store_true", help="prepare again even when up to date")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds to wait for the registration (default: %(default)s)")
    args = parser.parse_args(argv)
    say = lambda msg: print(f"virtual_board: {msg}", flush=True)  # noqa: E731

    vb = _load()
    from tvm_compress.errors import TvmCompressError

    tracker_host = tracker_port = None
    if not args.prepare_only:
        host, sep, port = (args.tracker or "").rpartition(":")
        if not sep or not host or not port.isdigit():
            parser.error("--tracker HOST:PORT is required (e.g. 127.0.0.1:9190) unless --prepare-only")
        tracker_host, tracker_port = host, int(port)

    proc = None
    stopping = False

    def _stop(signum, frame):  # noqa: ARG001
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        t0 = time.monotonic()
        board = vb.prepare(args.cache_dir, force=args.force, log=say)
        if args.prepare_only:
            say(f"prepared {board} ({time.monotonic() - t0:.1f} s)")
            return 0
        proc = vb.start_server(tracker_host, tracker_port, args.key, args.port, host=args.host,
                               cache_dir=args.cache_dir)
        say(f"starting the aarch64 RPC server on {args.host}:{proc.server_port} (log {proc.log_path})")
        waited = vb.wait_registered(tracker_host, tracker_port, args.key, proc, timeout=args.timeout)
        say(f"registered with tracker {tracker_host}:{tracker_port} as {args.key!r} "
            f"after {waited:.1f} s; Ctrl-C to stop")
        while proc.poll() is None:
            time.sleep(1)
        print(f"virtual_board: error: the server exited with code {proc.returncode}", file=sys.stderr)
        return 1
    except TvmCompressError as err:
        print(f"virtual_board: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        say("stopping")
        return 0 if stopping or proc is not None else 130
    finally:
        if proc is not None:
            vb.stop_server(proc)


if __name__ == "__main__":
    sys.exit(main())
