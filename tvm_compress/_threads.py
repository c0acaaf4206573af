"""Give TVM's CPU thread pool one thread per physical core.

TVM's runtime sizes its pool from ``TVM_NUM_THREADS`` (or ``OMP_NUM_THREADS``), else on x86 it
takes half the logical CPUs, assuming two hyper-threads per core. On a VM whose vCPUs are whole
cores (these 2-core machines) that is one thread: every parallel kernel ran on one core while
onnxruntime used two (measured: a 96->32 3x3 int8 conv at 80x80 took 4.6-7.0 ms with the
default pool, 2.3 ms with two threads). The pool reads the variable when it is created, on the
first parallel kernel call, so it is set at import; a value the user set is left alone.
"""

from __future__ import annotations

import os


def physical_cores() -> int:
    """Physical cores this process may run on: a CPU affinity mask (``taskset``, a container's
    cpuset) smaller than the machine bounds it, so a restricted process does not oversubscribe."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        import psutil

        cores = psutil.cpu_count(logical=False) or allowed
    except ImportError:  # psutil is a dependency; stay usable without it
        cores = allowed
    return max(1, min(cores, allowed))


def use_physical_cores() -> None:
    if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(physical_cores())
