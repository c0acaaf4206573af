"""TVM's CPU thread pool gets one thread per physical core (``tvm_compress._threads``)."""

import os
import subprocess
import sys

import psutil

_PROBE = "import tvm_compress, tvm; print(tvm.get_global_func('runtime.NumThreads')())"


def _pool_size(env_update, cpus=None):
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    env.update(env_update)
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True,
                         preexec_fn=pin)
    return int(out.stdout.split()[-1])


def test_pool_uses_every_physical_core():
    # TVM alone takes half the logical CPUs on x86 (one thread on a 2-vCPU VM)
    expected = min(psutil.cpu_count(logical=False) or os.cpu_count(), len(os.sched_getaffinity(0)))
    assert _pool_size({}) == expected


def test_affinity_mask_bounds_the_pool():
    # a process pinned to one CPU (taskset, a container's cpuset) gets one thread, not one per core
    assert _pool_size({}, cpus={min(os.sched_getaffinity(0))}) == 1


def test_user_setting_is_kept():
    assert _pool_size({"TVM_NUM_THREADS": "1"}) == 1
