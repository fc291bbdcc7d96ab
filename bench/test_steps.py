"""Cost of one step on configurations A (GEMM-heavy), B (elementwise-heavy) and E (per-seed
data): ddln_fast's euler, rk4 and dopri5 against the floor, a numpy loop and a PyTorch eager
loop, measured side by side; then 2 threads against 1 and float32 against float64.

References: the floor (two products with X plus one pass over the state) and the peers are in
``peers.py``. Targets are those of issue 6; a miss is printed as MISS in the table, not failed.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import CONFIGS, problem_and_layers, record, side_by_side
from ddln_fast.threads import limit_threads
from peers import DdlnSteps, Floor, NumpyGD, TorchGD, torch_available

DT = 1e-3
#: Euler steps per timed call (a checkpoint every 10 steps: each call restarts from the layers).
EULER_STEPS_PER_CALL = 10
EULER_FLOOR_TARGET = {"A": 1.15, "B": 1.5, "E": 1.3}
TORCH_SPEEDUP_TARGET = {"A": 1.5, "B": 8.0, "E": 2.0}


def make_floor(problem, u0, dtype=np.float64):
    U = np.array(u0, dtype=dtype)
    X = np.ascontiguousarray(problem.X, dtype=dtype)
    return Floor(X, U, U.prod(axis=1))


@pytest.mark.parametrize("name", ["A", "B", "E"])
def test_gd_step(benchmark, name):
    """One gradient-descent (Euler) step: ddln_fast vs floor, numpy and PyTorch eager."""
    problem, u0 = problem_and_layers(name)
    threads = benchmark_threads()
    ours = DdlnSteps("euler", problem, u0, DT, steps_per_call=EULER_STEPS_PER_CALL)
    floor = make_floor(problem, u0)
    numpy_loop = NumpyGD(problem.X, problem.y, u0, DT)
    others = [floor, numpy_loop]
    torch_loop = None
    if torch_available():
        torch_loop = TorchGD(problem.X, problem.y, u0, DT, threads)
        others.append(torch_loop)
    side_by_side(benchmark, ours, others)
    assert np.all(np.isfinite(ours.it.U))
    record(benchmark, name, "euler step / floor", ours.best_step / floor.best_step,
           EULER_FLOOR_TARGET[name],
           note=f"euler {ours.best_step * 1e3:.2f} ms, floor {floor.best_step * 1e3:.2f} ms")
    record(benchmark, name, "numpy loop step / euler step", numpy_loop.best_step / ours.best_step,
           note=f"numpy {numpy_loop.best_step * 1e3:.2f} ms")
    if torch_loop is None:
        record(benchmark, name, "torch eager / euler (SKIPPED: torch not installed)", float("nan"),
               note="pip install torch==2.13.0 (CPU wheel) to measure")
    else:
        record(benchmark, name, "torch eager step / euler step", torch_loop.best_step / ours.best_step,
               TORCH_SPEEDUP_TARGET[name], better="higher",
               note=f"torch {torch_loop.best_step * 1e3:.2f} ms")


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
@pytest.mark.parametrize("name", ["A", "B", "E"])
def test_method_step(benchmark, name, method):
    """Time per step and per gradient evaluation of rk4 and dopri5 (rtol 1e-8), vs the floor."""
    problem, u0 = problem_and_layers(name)
    ours = DdlnSteps(method, problem, u0, DT, steps_per_call=2, t_per_call=2 * DT)
    floor = make_floor(problem, u0)
    side_by_side(benchmark, ours, [floor])
    record(benchmark, name, f"{method} gradient evaluation / floor", ours.best_eval / floor.best_step,
           note=f"{ours.best_step * 1e3:.2f} ms per step, {ours.best_eval * 1e3:.2f} ms per evaluation")


@pytest.mark.parametrize("method", ["euler", "dopri5"])
@pytest.mark.parametrize("name", ["A", "B"])
def test_difference_step(benchmark, name, method):
    """The difference parametrization of depth L (2L layer rows) against the product of depth
    2L, side by side: the same state size and the same products with X, so a difference step
    should cost no more (issue 11). Power D = 2.5 (2 rows, pow per entry) against the product
    of depth 2 is recorded too."""
    from ddln_fast.parametrization import Parametrization

    depth = CONFIGS[name]["depth"]
    problem, u0 = problem_and_layers(name, model__parametrization="difference")
    _, u0_product = problem_and_layers(name, model__depth=2 * depth)
    _, u0_power = problem_and_layers(name, model__parametrization="power", model__power=2.5)
    _, u0_depth2 = problem_and_layers(name, model__depth=2)
    kwargs = dict(steps_per_call=EULER_STEPS_PER_CALL) if method == "euler" else dict(steps_per_call=2, t_per_call=2 * DT)
    difference = DdlnSteps(method, problem, u0, DT, parametrization=Parametrization("difference", depth), **kwargs)
    product = DdlnSteps(method, problem, u0_product, DT, **kwargs)
    power = DdlnSteps(method, problem, u0_power, DT, parametrization=Parametrization("power", 1, 2.5), **kwargs)
    depth2 = DdlnSteps(method, problem, u0_depth2, DT, **kwargs)
    side_by_side(benchmark, difference, [product, power, depth2])
    per = "step" if method == "euler" else "evaluation"
    best = (lambda r: r.best_step) if method == "euler" else (lambda r: r.best_eval)
    record(benchmark, name, f"{method}: difference L={depth} {per} / product L={2 * depth} {per}",
           best(difference) / best(product), 1.0,
           note=f"{best(difference) * 1e3:.2f} ms vs {best(product) * 1e3:.2f} ms")
    record(benchmark, name, f"{method}: power D=2.5 {per} / product L=2 {per}", best(power) / best(depth2),
           note=f"{best(power) * 1e3:.2f} ms vs {best(depth2) * 1e3:.2f} ms")


class Limited:
    """A runner called with ``threads`` Numba and BLAS threads (the switch is not timed)."""

    def __init__(self, runner, threads):
        self.runner, self.threads = runner, threads

    def __call__(self):
        with limit_threads(self.threads):
            self.runner()

    def __getattr__(self, name):
        return getattr(self.runner, name)


def benchmark_threads() -> int:
    import numba

    return numba.get_num_threads()


@pytest.mark.parametrize("name", ["A", "B"])
def test_threads(benchmark, name):
    """Euler step with all threads against one thread."""
    threads = benchmark_threads()
    if threads < 2:
        pytest.skip("one core: nothing to compare")
    problem, u0 = problem_and_layers(name)
    many = Limited(DdlnSteps("euler", problem, u0, DT, steps_per_call=EULER_STEPS_PER_CALL), threads)
    one = Limited(DdlnSteps("euler", problem, u0, DT, steps_per_call=EULER_STEPS_PER_CALL), 1)
    floor_many, floor_one = Limited(make_floor(problem, u0), threads), Limited(make_floor(problem, u0), 1)
    side_by_side(benchmark, many, [one, floor_many, floor_one])
    record(benchmark, name, f"1-thread step / {threads}-thread step", one.best_step / many.best_step,
           1.7, better="higher",
           note=f"{one.best_step * 1e3:.2f} ms vs {many.best_step * 1e3:.2f} ms")
    # what the machine allows: the floor itself (BLAS GEMMs + one streaming pass)
    record(benchmark, name, f"floor: 1-thread / {threads}-thread", floor_one.best_step / floor_many.best_step,
           note=f"{floor_one.best_step * 1e3:.2f} ms vs {floor_many.best_step * 1e3:.2f} ms")


def test_float32(benchmark):
    """Euler step on B in float32 against float64, and how far float32 drifts from float64."""
    problem, u0 = problem_and_layers("B")
    single = DdlnSteps("euler", problem, u0, DT, dtype=np.float32, steps_per_call=EULER_STEPS_PER_CALL)
    double = DdlnSteps("euler", problem, u0, DT, dtype=np.float64, steps_per_call=EULER_STEPS_PER_CALL)
    side_by_side(benchmark, single, [double])
    record(benchmark, "B", "float64 step / float32 step", double.best_step / single.best_step, 1.6,
           better="higher",
           note=f"{double.best_step * 1e3:.2f} ms vs {single.best_step * 1e3:.2f} ms")
    # both have taken the same steps from the same u0: compare the effective parameters
    steps = int(double.it.state.steps[0])
    assert steps == int(single.it.state.steps[0])
    theta64 = double.it.theta_of_all()
    theta32 = single.it.theta_of_all().astype(np.float64)
    error = np.abs(theta32 - theta64).max() / np.abs(theta64).max()
    loss64, loss32 = double.it.current_losses(), single.it.current_losses()
    loss_error = float(np.max(np.abs(loss32 - loss64) / loss64))
    record(benchmark, "B", f"float32 theta rel. error after {steps} steps", float(error),
           note=f"max|theta32-theta64|/max|theta64|; loss rel. error {loss_error:.2g}")
