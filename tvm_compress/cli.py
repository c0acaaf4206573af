"""``tvm-compress``: a thin argparse layer over the Python API.

Subcommands come from ``tvm_compress.commands`` (one module each). Every user error ends as one
line on stderr and a non-zero exit; set TVM_COMPRESS_DEBUG=1 to see tracebacks of internal
errors.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Optional, Sequence

from .console import default_log_path, native_output
from .errors import TvmCompressError

PROG = "tvm-compress"


def _log_hint(command: str) -> str:
    path = str(default_log_path(command))
    home = os.path.expanduser("~")
    return "~" + path[len(home):] if path.startswith(home + os.sep) else path


def _build_parser() -> argparse.ArgumentParser:
    from .commands import commands

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Compress ONNX models with TVM passes and compile verified libraries "
        "for x86, ARM and CUDA.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in commands():
        p = sub.add_parser(command.name, help=command.help)
        command.add_arguments(p)
        p.add_argument("--verbose", action="store_true",
                       help="also show TVM's native messages and Python warnings (by default they go to "
                       f"{_log_hint(command.name)})")
        p.set_defaults(handler=command.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    def on_sigint(signum, frame):
        # Unwinding a KeyboardInterrupt through TVM's C++ frames (tuning callbacks, its thread
        # pool) came back as a TVM RuntimeError, or once as a segfault: leave at once instead.
        # Outputs are only ever renamed into place complete, so removing the temporary ones
        # being written is all the cleaning there is; a tuning record cut short is dropped by
        # the next compile.
        from .fileutil import remove_in_progress

        remove_in_progress()
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        os._exit(130)

    old = signal.signal(signal.SIGINT, on_sigint) if threading.current_thread() is threading.main_thread() else None
    try:
        with native_output(default_log_path(args.command), verbose=args.verbose):
            return args.handler(args)
    except TvmCompressError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (one line, never a traceback, unless asked)
        if os.environ.get("TVM_COMPRESS_DEBUG"):
            raise
        first = str(err).strip().splitlines()
        print(
            f"{PROG}: internal error: {type(err).__name__}: {first[-1] if first else ''} "
            "(set TVM_COMPRESS_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)


if __name__ == "__main__":
    sys.exit(main())
