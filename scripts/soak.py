#!/usr/bin/env python3
"""Repeated compiles in one process: does memory or the temp folder grow?

    python scripts/soak.py [--runs 20] [--model demo]

Compiles the model ``--runs`` times into a fresh directory each time (default schedules, kernel
check and verification on), printing the process's resident memory (RSS) and the number of
entries in the temp folder after each compile. A leak shows as a steady climb after the first
few runs (TVM's caches fill once).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args(argv)
    import psutil

    import tvm_compress
    from tvm_compress.demo import INPUT_SHAPE, demo_files

    proc = psutil.Process()
    tmp_root = Path(tempfile.gettempdir())
    rows = []
    with tempfile.TemporaryDirectory(prefix="tvmc-soak-") as work:
        for k in range(args.runs):
            t0 = time.monotonic()
            out = Path(work) / f"run{k}"
            out.mkdir()
            tvm_compress.compile(demo_files()["model"], out / "m.so", input_shapes={"input": INPUT_SHAPE},
                                 bench_runs=5, log=lambda m: None)
            rss = proc.memory_info().rss / 2**20
            entries = len(os.listdir(tmp_root))
            rows.append((k + 1, rss, entries, time.monotonic() - t0))
            print(f"run {k + 1}: RSS {rss:.0f} MiB, {entries} entries in {tmp_root}, {rows[-1][3]:.1f} s", flush=True)
    first, last = rows[min(2, len(rows) - 1)], rows[-1]
    print(f"\nRSS after run {first[0]}: {first[1]:.0f} MiB; after run {last[0]}: {last[1]:.0f} MiB "
          f"({(last[1] - first[1]) / max(last[0] - first[0], 1):+.1f} MiB per run); temp entries "
          f"{rows[0][2]} -> {last[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
