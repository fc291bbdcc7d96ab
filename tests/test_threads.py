"""The OpenMP runtime under Numba's kernels: checked by what is loaded and bound, not by timing.

Reference: a library imported before ddln_fast that brings its own libgomp, loaded globally
and initialized with libgomp's default spinning (PyTorch does this). We stand in for it with a
copy of the system libgomp under another file name, loaded with RTLD_GLOBAL before
``import ddln_fast`` and without OMP_WAIT_POLICY in the environment. Numba's parallel regions
must then run on a libgomp that waits passively (spin count 0), not on the stand-in.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import shutil
import subprocess
import sys

import pytest

PROBE = """
import ctypes, json, sys
if len(sys.argv) > 1:
    ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)   # the foreign runtime, spinning
import numpy as np
import ddln_fast
from ddln_fast.threads import openmp_binding
from numba import njit, prange

@njit(parallel=True)
def touch(a):
    for i in prange(a.size):
        a[i] += 1.0

touch(np.zeros(64))
print(json.dumps(openmp_binding()))
"""


def _system_libgomp() -> str | None:
    name = ctypes.util.find_library("gomp")
    if name is None:
        return None
    for folder in ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib",
                   "/usr/lib/aarch64-linux-gnu", "/lib/aarch64-linux-gnu"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    return None


def _probe(tmp_path, *args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_numba_runs_on_a_passive_openmp_runtime(tmp_path):
    binding = _probe(tmp_path)
    assert binding["library"] is not None and "libgomp" in binding["library"]
    assert binding["spin_count"] == 0, binding


def test_a_spinning_runtime_imported_first_is_not_used(tmp_path):
    system = _system_libgomp()
    if system is None:
        pytest.skip("no system libgomp to copy as the foreign runtime")
    foreign = tmp_path / "libgomp-foreign.so.1"
    shutil.copy(system, foreign)
    binding = _probe(tmp_path, str(foreign))
    assert binding["library"] != str(foreign), "Numba's regions run on the foreign, spinning runtime"
    assert binding["spin_count"] == 0, binding


_SERIAL_AND_PARALLEL_MODULE = '''
import numba
from numba import prange
from ddln_fast.kernels import serial_and_parallel

def thread_ids(out):
    for i in prange(out.shape[0]):
        out[i] = numba.get_thread_id()

SERIAL, PARALLEL = serial_and_parallel(thread_ids)
'''

_CALL_ONE_BUILD = '''
import sys
import numpy as np
import pairmod
out = np.zeros(200_000)
(pairmod.SERIAL if sys.argv[1] == "serial" else pairmod.PARALLEL)(out)
print(len(set(out.tolist())))
'''


def test_serial_build_stays_serial_when_the_parallel_one_is_cached(tmp_path):
    """The two builds of kernels.serial_and_parallel keep their own entries in Numba's on-disk
    cache: in a fresh process whose cache already holds the parallel build, the serial build
    still runs on one thread (with one function object for both, it loaded the parallel machine
    code and ran on two)."""
    (tmp_path / "pairmod.py").write_text(_SERIAL_AND_PARALLEL_MODULE)
    (tmp_path / "call.py").write_text(_CALL_ONE_BUILD)
    env = {**os.environ, "NUMBA_NUM_THREADS": "2", "NUMBA_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": str(tmp_path)}

    def threads_used(build):
        done = subprocess.run([sys.executable, str(tmp_path / "call.py"), build], capture_output=True,
                              text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        return int(done.stdout.split()[-1])

    assert threads_used("parallel") == 2  # compiled and cached first
    assert threads_used("serial") == 1
    assert threads_used("parallel") == 2  # and the other way round


def test_dual_method_runs_small_dense_algebra_on_one_blas_thread(monkeypatch):
    """The dual method's Jacobian factorizations and its products with a small X (n d below
    SERIAL_PRODUCT_WORK) run on one BLAS thread whatever the run's thread setting: on a busy
    machine a second OpenBLAS thread made them 10-50 times slower (threads.blas_for_products).
    Checked by asking threadpoolctl inside the calls, not by timing. (The products inside the
    compiled step, Numba's np.dot on scipy's OpenBLAS, run within the same advance_to and its
    limit; threadpoolctl's count covers both OpenBLAS libraries.)"""
    import threadpoolctl

    from ddln_fast import Config, dual, dual_products
    from ddln_fast.init import initial_layers
    from ddln_fast.problem import make_problem
    from ddln_fast.threads import limit_threads

    seen = []

    def blas_threads():
        return max(p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas")

    for name in ("factor_jacobian", "residuals", "clocks"):
        original = getattr(dual_products.DualProducts, name)

        def spy(self, *args, _original=original, _name=name):
            seen.append((_name, blas_threads()))
            return _original(self, *args)

        monkeypatch.setattr(dual_products.DualProducts, name, spy)
    factor = dual_products.tridiagonalize

    def factor_spy(*args):
        seen.append(("tridiagonalize", blas_threads()))
        return factor(*args)

    monkeypatch.setattr(dual_products, "tridiagonalize", factor_spy)
    config = Config.from_dict({"problem": {"n": 20, "d": 50, "seed": 0},
                               "model": {"depth": 3, "alpha": 0.1, "jitter": 0.1},
                               "run": {"seeds": 2}})
    problem = make_problem(config)
    with limit_threads(2):
        assert blas_threads() == 2  # the run's setting
        # (to t = 10: until t ~ 1 the Jacobian is negligible at the step sizes, nothing to factor)
        dual.DualIntegrator(problem, initial_layers(config, problem.d), dt=1.0).advance_to(10.0)
        assert blas_threads() == 2  # restored
    assert {name for name, _ in seen} == {"factor_jacobian", "tridiagonalize", "residuals", "clocks"}
    assert {threads for _, threads in seen} == {1}
