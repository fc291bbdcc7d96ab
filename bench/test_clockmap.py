"""Cost of one clock-map evaluation (theta and h for S = 8 seeds x d = 200 coordinates, the
inner call of the dual-coordinates solver and of the theory), against a floor (one compiled pass
that reads the clocks and writes two outputs with one tan each), measured in the same process.
(The numpy mirror geometry it was once compared with is gone: the theory now runs on this map.)

Cases: first layer zero at depth 3 (closed form), jittered signed depth 3 and depth 5 (a table
per coordinate). Build times of the tables are recorded too.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from numba import njit

from conftest import ROUNDS, record
from ddln_fast.clockmap import ClockMap

SEEDS, DIM = 8, 200


@njit(cache=True)
def _floor(s, theta, h):
    for a in range(s.shape[0]):
        for i in range(s.shape[1]):
            t = math.tan(s[a, i])
            theta[a, i] = t
            h[a, i] = t * t


def _u0(case):
    rng = np.random.default_rng(0)
    if case == "first layer zero, depth 3":
        u0 = np.full((SEEDS, 3, DIM), 0.1)
        u0[:, 0] = 0.0
        return u0
    depth = 3 if case.endswith("3") else 5
    u0 = 0.1 * (1 + 0.1 * rng.standard_normal((SEEDS, depth, DIM)))
    return u0 * np.where(rng.random(u0.shape) < 0.5, -1.0, 1.0)


def _best(fn, rounds):
    fn()
    best = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("case", ["first layer zero, depth 3", "jittered depth 3", "jittered depth 5"])
def test_clock_map_evaluation(benchmark, case):
    u0 = _u0(case)
    start = time.perf_counter()
    cm = ClockMap.from_layers(u0)
    build = time.perf_counter() - start
    lower, upper = cm.blow_up
    rng = np.random.default_rng(1)
    s = np.where(rng.random((SEEDS, DIM)) < 0.5, 0.7 * upper, 0.7 * lower)
    theta = np.empty_like(s)
    h = np.empty_like(s)
    cm.evaluate(s, theta=theta, h=h)
    rounds = max(ROUNDS, 50)
    benchmark.pedantic(cm.evaluate, args=(s,), kwargs=dict(theta=theta, h=h), rounds=rounds,
                       warmup_rounds=1, iterations=1)
    ours = benchmark.stats.stats.min
    floor = _best(lambda: _floor(s, theta, h), rounds)
    record(benchmark, "clk", f"{case}: evaluation (us)", ours * 1e6,
           note=f"S={SEEDS}, d={DIM}, theta and h; tables built in {build * 1e3:.0f} ms "
                f"({cm.tables.kind.size} tables)")
    record(benchmark, "clk", f"{case}: evaluation / floor (one tan per entry)", ours / floor,
           note=f"floor {floor * 1e6:.1f} us")
