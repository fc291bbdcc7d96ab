"""Benchmark configurations, the side-by-side timing helper and the ratio table.

Run with ``make bench`` (``pytest bench -q --benchmark-enable``). Each benchmark runs its
target under pytest-benchmark (compile excluded by a warm-up round) and, in the same loop,
the runners it is compared with (the floor, the peers), so that every ratio in the table comes
from measurements taken side by side. The minimum over rounds is used: on a machine shared
with other jobs the minimum is the least disturbed measurement.
"""

from __future__ import annotations

import datetime
import os
import platform

import numpy as np
import pytest

# name: (n, d, seeds, depth, per-seed data)
CONFIGS = {
    "A": dict(n=1000, d=5000, seeds=32, depth=3, per_seed=False),   # GEMM-heavy
    "B": dict(n=50, d=20000, seeds=64, depth=4, per_seed=False),    # elementwise-heavy
    "C": dict(n=100, d=1000, seeds=64, depth=3, per_seed=False),    # adaptive flow
    "D": dict(n=100, d=1_000_000, seeds=8, depth=3, per_seed=False),  # scale
    "E": dict(n=100, d=2000, seeds=64, depth=3, per_seed=True),     # per-seed data
}

ROUNDS = int(os.environ.get("DDLN_BENCH_ROUNDS", "12"))

#: Rows of the ratio table: (config, quantity, value, target, met or None, note).
RESULTS: list[tuple] = []


def bench_config(name, *, method="euler", dt=1e-3, init="gaussian", alpha=0.3, **overrides):
    """A ddln_fast Config for benchmark configuration ``name`` (planted sparse data)."""
    from ddln_fast import Config

    c = CONFIGS[name]
    tables = {
        "problem": {"kind": "gaussian", "n": c["n"], "d": c["d"], "sparsity": 5, "noise": 0.0,
                    "seed": 0, "per_seed_data": c["per_seed"]},
        "model": {"depth": c["depth"], "alpha": alpha, "init": init, "jitter": 0.1},
        "integrator": {"method": method, "dt": dt, "t_end": 1.0},
        "run": {"seeds": c["seeds"], "seed": 0},
    }
    for key, value in overrides.items():
        section, field = key.split("__")
        tables[section][field] = value
    return Config.from_dict(tables, None)


_PROBLEMS: dict = {}


def problem_and_layers(name, **kwargs):
    """(problem, u0) of a configuration, built once per session (A's X is 40 MB, E's 100 MB)."""
    from ddln_fast.init import initial_layers
    from ddln_fast.problem import make_problem

    key = (name, tuple(sorted(kwargs.items())))
    if key not in _PROBLEMS:
        config = bench_config(name, **kwargs)
        problem = make_problem(config)
        _PROBLEMS[key] = (problem, initial_layers(config, problem.d))
    return _PROBLEMS[key]


def side_by_side(benchmark, target, others, rounds=ROUNDS):
    """Time ``target`` with pytest-benchmark and, before each round, every runner in
    ``others`` (not part of the benchmark's time). All runners are called once first to
    compile and warm up."""
    for runner in (target, *others):
        runner()
        runner.per_step.clear()
        runner.per_eval.clear()

    def setup():
        for runner in others:
            runner()

    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)


def record(benchmark, config, quantity, value, target=None, better="lower", note=""):
    """Put one ratio in the benchmark's extra_info and in the table printed at the end."""
    met = None
    if target is not None:
        met = value <= target if better == "lower" else value >= target
    if benchmark is not None:
        benchmark.extra_info[quantity] = value
        if target is not None:
            benchmark.extra_info[f"{quantity} target"] = f"{'<=' if better == 'lower' else '>='} {target}"
    RESULTS.append((config, quantity, value, target, better, met, note))


def machine_line() -> str:
    import numba
    import threadpoolctl

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    blas = ", ".join(f"{i['internal_api']} {i['version']} {i.get('architecture', '')}"
                     for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas")
    from ddln_fast.threads import resolve_threads

    return (f"{cpu}, {os.cpu_count()} cores, {resolve_threads(THREADS)} threads for Numba and BLAS "
            f"(numba {numba.__version__}, layer {os.environ.get('NUMBA_THREADING_LAYER', 'omp')}), "
            f"{blas}, numpy {np.__version__}, {datetime.date.today().isoformat()}")


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("ddln_fast ratio table")
    tr.write_line(machine_line())
    tr.write_line(f"{'cfg':4s} {'quantity':52s} {'value':>10s} {'target':>9s}  met   note")
    for config, quantity, value, target, better, met, note in RESULTS:
        target_text = "" if target is None else f"{'<=' if better == 'lower' else '>='}{target:g}"
        met_text = "" if met is None else ("yes" if met else "MISS")
        tr.write_line(f"{config:4s} {quantity:52s} {value:10.4g} {target_text:>9s}  {met_text:4s}  {note}")


#: Threads for Numba and BLAS in every benchmark (0: all cores), like ``ddln run --threads``.
THREADS = int(os.environ.get("DDLN_BENCH_THREADS", "0"))


@pytest.fixture(scope="session", autouse=True)
def _threads_all():
    """Every benchmark runs with the same threads for Numba and BLAS."""
    from ddln_fast.threads import limit_threads

    with limit_threads(THREADS) as n:
        yield n
