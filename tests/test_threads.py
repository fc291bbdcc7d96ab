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
