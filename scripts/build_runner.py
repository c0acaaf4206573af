#!/usr/bin/env python3
"""Build the C++ deploy runner (targets/runner/tvm_runner.cc) for one architecture.

    python scripts/build_runner.py aarch64|armv7|x86_64 [--cache-dir DIR] [--force]

The runner and the TVM runtime libraries it needs land in <cache>/runners/<arch>/ (cache:
$TVM_COMPRESS_RUNNER_CACHE, $TVM_COMPRESS_CACHE or ~/.cache/tvm-compress). The build logic lives in tvm_compress.targets.qemu
(targets/qemu.py); this is a thin command line over it. See docs/deploy-runner.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _load_qemu():
    try:
        from tvm_compress.targets import qemu  # installed package

        return qemu
    except ImportError:
        pass
    # running from a checkout without the package installed
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    name = "tvm_compress.targets.qemu"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "targets" / "qemu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    qemu = _load_qemu()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arch", choices=sorted(qemu.QEMU_ARCHES))
    parser.add_argument(
        "--cache-dir", default=None,
        help="default: $TVM_COMPRESS_RUNNER_CACHE, $TVM_COMPRESS_CACHE or ~/.cache/tvm-compress",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)

    from tvm_compress.errors import TvmCompressError

    try:
        runner = qemu.build_runner(
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
