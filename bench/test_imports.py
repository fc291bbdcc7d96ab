"""Step time of ddln_fast when PyTorch or JAX was imported first, against the step time without
them (issue 13: within 10 %).

Each mode runs in its own process (what was imported first is a property of the process), and
the modes alternate, round after round, so that a disturbance of the machine hits them alike;
the minimum over rounds is compared. Configuration: n = 200, d = 5000, 64 seeds, depth 3, Euler.
Modes whose package is not installed are reported as skipped.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import THREADS, record

STEP_SCRIPT = r"""
import os, sys, time
first = sys.argv[1]
if first == "torch":
    import torch
    torch.ones(8).sum()
elif first == "jax":
    import jax.numpy as jnp
    jnp.ones(8).sum().block_until_ready()
import numpy as np
from ddln_fast import Config
from ddln_fast.init import initial_layers
from ddln_fast.integrators import Integrator
from ddln_fast.problem import make_problem
from ddln_fast.threads import limit_threads
cfg = Config.from_dict({"problem": {"n": 200, "d": 5000, "per_seed_data": False},
                        "model": {"depth": 3, "init": "gaussian", "jitter": 0.1, "alpha": 0.3},
                        "integrator": {"method": "euler", "dt": 1e-3}, "run": {"seeds": 64}})
problem = make_problem(cfg)
u0 = initial_layers(cfg, problem.d)
with limit_threads(int(sys.argv[2])):
    integrator = Integrator("euler", problem, u0, dt=1e-3)
    integrator.advance_to(0.01)  # compile and warm up
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        integrator.advance_to(integrator.state.t[0] + 0.01)
        best = min(best, (time.perf_counter() - start) / 10)
print(best)
"""

ROUNDS = 3


def _step_time(first: str) -> float:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)  # as in a user's notebook: nothing set by hand
    out = subprocess.run([sys.executable, "-c", STEP_SCRIPT, first, str(THREADS)], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip().splitlines()[-1])


def test_step_time_with_torch_or_jax_imported_first(benchmark):
    modes = ["none"] + [m for m in ("torch", "jax") if importlib.util.find_spec(m) is not None]
    best = {m: float("inf") for m in modes}

    def all_modes():
        for _ in range(ROUNDS):
            for mode in modes:
                best[mode] = min(best[mode], _step_time(mode))

    benchmark.pedantic(all_modes, rounds=1, iterations=1)
    for mode in ("torch", "jax"):
        if mode in best:
            record(benchmark, "-", f"step with {mode} imported first / without", best[mode] / best["none"],
                   1.10, note=f"{best[mode] * 1e3:.2f} ms vs {best['none'] * 1e3:.2f} ms")
        else:
            record(benchmark, "-", f"step with {mode} imported first (SKIPPED: not installed)",
                   float("nan"), note=f"pip install {mode}")
    assert all(v < float("inf") for v in best.values())
