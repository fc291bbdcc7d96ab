"""One interface for every integrator: the driver runs any Solver, and each solver owns its
state and its resume.

References: the closed form of depth-1 gradient flow (linear regression),
theta(t) = theta0 - V diag((1 - exp(-lambda t)) / lambda) V^T (H theta0 - b) with
H = X^T X / n = V diag(lambda) V^T and b = X^T y / n, computed in numpy here; a run that was
never stopped, for the bytes of a stopped and resumed one.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from ddln_fast.controller import RUNNING, T_END, SeedState
from ddln_fast.methods import METHODS, Method
from ddln_fast.solver import Solver
from ddln_fast.tableaus import DOPRI5
from references import loss


class ExactLinearFlow(Solver):
    """Depth-1 gradient flow in closed form: a Solver that is not a Runge–Kutta integrator."""

    method = "exact"

    def __init__(self, problem, u0, **options):
        super().__init__()
        self.X, self.y = problem.X, problem.y
        self.seeds, self.depth, self.dim = u0.shape
        assert self.depth == 1
        self.dtype = np.float64
        self.u0 = np.array(u0, dtype=np.float64)
        self.U = self.u0.copy()
        self.state = SeedState.fresh(self.seeds, 0.0)
        n = self.X.shape[0]
        self.lam, self.V = np.linalg.eigh(self.X.T @ self.X / n)
        self.b = self.X.T @ self.y / n

    def theta_at(self, s, t):
        theta0 = self.u0[s, 0]
        lam = np.maximum(self.lam, 1e-300)
        phi = np.where(self.lam * t > 1e-12, -np.expm1(-self.lam * t) / lam, t)
        grad0 = self.X.T @ (self.X @ theta0) / self.X.shape[0] - self.b
        return theta0 - self.V @ (phi * (self.V.T @ grad0))

    def advance_to(self, t_target):
        if self.stop_requested():
            return False
        for s in np.flatnonzero(self.running):
            self.U[s, 0] = self.theta_at(s, t_target)
            self.state.t[s] = t_target
            self.state.steps[s] += 1
            self.state.nfev[s] += 1
        return True

    def theta_of_all(self):
        return self.U[:, 0].copy()

    def current_losses(self, theta=None):
        theta = self.theta_of_all() if theta is None else theta
        return np.array([loss(self.X, self.y, row) for row in theta])

    def invariant_drift(self):
        return np.zeros(self.seeds)

    def layers(self):
        return self.U

    def state_arrays(self):
        return {"U": self.U, **self.state.as_dict()}

    def restore_state(self, arrays):
        self.U[...] = arrays["U"]
        self.state = SeedState.from_dict(arrays)


@pytest.fixture
def exact_dopri5(monkeypatch):
    """integrator.method = "dopri5" runs the closed form (an adaptive method: any time)."""
    monkeypatch.setitem(METHODS, "dopri5", Method(DOPRI5, ExactLinearFlow))


def sigint_at_checkpoint(k):
    def hook(index, t, integrator):
        if index == k:
            os.kill(os.getpid(), signal.SIGINT)
    return hook


def sigint_at_stop_check(k, nth):
    """An on_checkpoint hook: after checkpoint ``k``, the ``nth`` time the solver asks whether
    to stop (a step boundary), SIGINT arrives, as from a user or a scheduler."""

    def hook(index, t, integrator):
        if index != k:
            return
        asked = [0]
        pending = integrator.stop_check

        def check():
            asked[0] += 1
            if asked[0] == nth:
                os.kill(os.getpid(), signal.SIGINT)
            return pending()

        integrator.stop_check = check

    return hook


def test_the_driver_runs_any_solver_through_the_interface(make_config, exact_dopri5, tmp_path):
    from ddln_fast.simulate import run_simulation
    from faults_support import assert_same_run_file

    cfg = make_config({"model.depth": 1, "integrator.method": "dopri5", "integrator.t_end": 5.0,
                       "run.checkpoints": 6, "run.spacing": "linear"})
    reference = tmp_path / "reference.h5"
    run = run_simulation(cfg, reference, threads=1).run
    assert np.all(run.status[:-1] == RUNNING) and np.all(run.status[-1] == T_END)
    np.testing.assert_array_equal(run.t_seed[-1], 5.0)
    solver = ExactLinearFlow(type("P", (), {"X": run.X, "y": run.y})(), run.u0)
    for k, t in enumerate(run.t):
        for s in range(cfg.run.seeds):
            np.testing.assert_allclose(run.theta[k, s], solver.theta_at(s, t), rtol=0, atol=1e-13)
            assert run.loss[k, s] == loss(run.X, run.y, run.theta[k, s])
    assert run.theta[-1, 0, 0] != run.theta[0, 0, 0]
    run.close()

    stopped = tmp_path / "stopped.h5"
    report = run_simulation(cfg, stopped, threads=1, on_checkpoint=sigint_at_checkpoint(2))
    report.run.close()
    assert report.interrupted == "SIGINT" and report.checkpoints_written == 3
    resumed = run_simulation(cfg, stopped, resume=True, threads=1)
    resumed.run.close()
    assert resumed.resumed_from == 2
    assert_same_run_file(reference, stopped)


def test_state_shapes_are_those_of_state_arrays(make_config):
    """The run file's /state layout comes from the solver: every method, the same names as
    the arrays it saves, with their shapes and dtypes."""
    from ddln_fast.init import initial_layers
    from ddln_fast.problem import make_problem

    for method in ("euler", "dopri5", "mirror"):
        cfg = make_config({"integrator.method": method, "model.init": "first_layer_zero"})
        problem = make_problem(cfg)
        u0 = initial_layers(cfg, problem.d)
        solver = METHODS[method].build(problem, u0, dt=0.01)
        shapes = solver.state_shapes()
        arrays = solver.state_arrays()
        assert list(shapes) == list(arrays)
        for name, (shape, dtype) in shapes.items():
            assert np.shape(arrays[name]) == shape and np.asarray(arrays[name]).dtype == dtype
        assert shapes["U"] == (u0.shape, np.dtype(np.float64))
        assert ("fsal" in shapes) == (method != "euler")


@pytest.mark.parametrize("interval", [0, 1])
def test_mirror_stopped_between_checkpoints_resumes_bit_identically(make_config, tmp_path, interval):
    """The mirror method saves its state at the step where a stop request found it; resuming
    continues every seed from there and gives the bytes of a run never stopped: theta is
    restored itself (not the product of the layers rebuilt from it), and in the first interval,
    where the stop comes before the second seed has started, the first one is not started
    again."""
    from ddln_fast.simulate import run_simulation
    from faults_support import assert_same_run_file

    cfg = make_config({"integrator.method": "mirror", "model.init": "first_layer_zero",
                       "integrator.t_end": 3.0, "run.checkpoints": 4, "run.spacing": "linear"})
    reference = tmp_path / "reference.h5"
    run_simulation(cfg, reference, threads=1).run.close()

    stopped = tmp_path / "stopped.h5"
    report = run_simulation(cfg, stopped, threads=1, on_checkpoint=sigint_at_stop_check(interval, 5))
    report.run.close()
    assert report.interrupted == "SIGINT" and report.checkpoints_written == interval + 1
    from ddln_fast import open_run

    with open_run(stopped) as run:
        index, state = run.state()
    assert index == interval and np.any((state["t"] > interval) & (state["t"] < interval + 1)), state["t"]
    if interval == 0:
        assert state["nfev"][0] > 0 and state["nfev"][1] == 0, state["nfev"]
    run_simulation(cfg, stopped, resume=True, threads=1).run.close()
    assert_same_run_file(reference, stopped)


def test_a_stop_inside_the_compiled_loop_lands_between_its_calls_and_resumes(make_config, tmp_path):
    """Small states take up to STEPS_PER_CALL adaptive steps per compiled call; a stop request
    is seen between two calls (a step boundary inside the interval) and resuming from there
    gives the bytes of a run never stopped."""
    from ddln_fast import open_run
    from ddln_fast.integrators import STEPS_PER_CALL
    from ddln_fast.simulate import run_simulation
    from faults_support import assert_same_run_file

    cfg = make_config({"integrator.t_end": 400.0, "run.checkpoints": 3, "run.spacing": "linear",
                       "integrator.rtol": 1e-10})
    reference = tmp_path / "reference.h5"
    run_simulation(cfg, reference, threads=1).run.close()

    stopped = tmp_path / "stopped.h5"
    report = run_simulation(cfg, stopped, threads=1, on_checkpoint=sigint_at_stop_check(1, 2))
    report.run.close()
    assert report.interrupted == "SIGINT" and report.checkpoints_written == 2
    with open_run(stopped) as run:
        index, state = run.state()
        evaluations = state["nfev"] - run.nfev[1]
    assert index == 1 and np.all((state["t"] > 200.0) & (state["t"] < 400.0)), state["t"]
    np.testing.assert_array_equal(evaluations, 6 * STEPS_PER_CALL)  # one call: 32 dopri5 steps
    run_simulation(cfg, stopped, resume=True, threads=1).run.close()
    assert_same_run_file(reference, stopped)
