#!/usr/bin/env python3
"""Build the C++ deploy runner (targets/runner/tvm_runner.cc) for one architecture.

    python scripts/build_runner.py aarch64|armv7|x86_64 [--cache-dir DIR] [--force]

The runner and the TVM runtime libraries it needs land in <cache>/runners/<arch>/ (cache:
$TVM_COMPRESS_RUNNER_CACHE, $TVM_COMPRESS_CACHE or ~/.cache/tvm-compress). The build logic lives in
tvm_compress.targets.runner_build (targets/runner_build.py); this is a thin command line over it.
See docs/deploy-runner.md.
"""

from __future__ import annotations

import argparse
import sys

from tvm_compress.errors import TvmCompressError
from tvm_compress.targets.arches import QEMU_ARCHES
from tvm_compress.targets.runner_build import build_runner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arch", choices=sorted(QEMU_ARCHES))
    parser.add_argument(
        "--cache-dir", default=None,
        help="default: $TVM_COMPRESS_RUNNER_CACHE, $TVM_COMPRESS_CACHE or ~/.cache/tvm-compress",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)

    try:
        runner = build_runner(
            args.arch, args.cache_dir, force=args.force, log=lambda msg: print(msg, flush=True)
        )
    except TvmCompressError as err:
        print(f"build_runner: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("build_runner: interrupted", file=sys.stderr)
        return 130
    print(runner)
    return 0


if __name__ == "__main__":
    sys.exit(main())
