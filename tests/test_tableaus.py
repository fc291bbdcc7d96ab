"""A method is its tableau: embedded pairs that are only data run in the layer integrator.

References: scipy's DOP853 on the flattened layer system (references.py), for the local error
of one step (which falls as h^(p+1) for a method of order p) and for whole adaptive runs; f recomputed in numpy for the loss_tol stop; the
evaluation count of each pair derived by hand (2 for the starting step, then its stages per
attempted step, one fewer with FSAL).

Bogacki–Shampine 3(2) (FSAL) and Cash–Karp 5(4) (no FSAL) are entries of ``TABLEAUS`` and
nothing else.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.integrate import solve_ivp

from ddln_fast.controller import LOSS_TOL, RUNNING, SeedState
from ddln_fast.integrators import Integrator
from ddln_fast.problem import Problem
from ddln_fast.tableaus import BOGACKI_SHAMPINE, CASH_KARP, DOPRI5, TABLEAUS, Tableau
from references import layer_flow_rhs, loss, reference_layers

ORDERS = {"bogacki_shampine": 3, "cash_karp": 5, "dopri5": 5}


def small_problem(seed=3, depth=3, n=6, d=9, seeds=2):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)) / np.sqrt(n)
    y = X @ np.where(rng.random(d) < 0.4, 1.0, 0.0)
    u0 = 0.6 * (1 + 0.3 * rng.standard_normal((seeds, depth, d)))
    return Problem(X, y), u0


def test_the_structure_is_read_from_the_tableau():
    assert DOPRI5.fsal and DOPRI5.evaluations == 6 and DOPRI5.stages == 7
    assert BOGACKI_SHAMPINE.fsal and BOGACKI_SHAMPINE.evaluations == 3
    assert not CASH_KARP.fsal and CASH_KARP.evaluations == 6
    assert not TABLEAUS["rk4"].adaptive and not TABLEAUS["rk4"].fsal
    with pytest.raises(ValueError, match="row sums"):
        Tableau(DOPRI5.A, DOPRI5.B, DOPRI5.C + 0.1, DOPRI5.E, 4)
    with pytest.raises(ValueError, match="strictly lower"):
        Tableau(DOPRI5.A.T, DOPRI5.B, DOPRI5.C, DOPRI5.E, 4)


@pytest.mark.parametrize("method", sorted(ORDERS))
def test_one_step_has_the_order_of_the_method(method):
    """One step of size h from the same state (t = 0.3) for h = 0.8 * 2^(-k/2), k = 0..9,
    against DOP853 at scipy's tightest rtol: the error of a method of order p falls as
    h^(p+1). The slope is read on the two smallest steps whose errors are above 1e-12 (the
    most asymptotic ones the reference still resolves); +-0.5 tells orders apart. Tolerances
    of 1e10 accept every step; the step is forced by the proposal."""
    problem, u0 = small_problem(seed=0, seeds=1)
    rhs = layer_flow_rhs(problem.X, problem.y, u0.shape[1])
    t1 = 0.3
    steps = 0.8 * 2.0 ** -np.arange(0, 5, 0.5)
    errors = []
    for h in steps:
        it = Integrator(method, problem, u0, dt=0.1, rtol=1e10, atol=1e10)
        assert it.advance_to(t1)
        start = it.U[0].ravel().copy()
        it.state.h[:] = h
        assert it.advance_to(t1 + h)
        with warnings.catch_warnings():  # rtol below 100 eps: scipy raises it to that, says so
            warnings.simplefilter("ignore", UserWarning)
            ref = solve_ivp(rhs, (0.0, (t1 + h) - t1), start, method="DOP853", rtol=1e-14,
                            atol=1e-16).y[:, -1]
        errors.append(np.linalg.norm(it.U[0].ravel() - ref))
    errors = np.array(errors)
    resolved = np.flatnonzero(errors > 1e-12)
    k = resolved[-1]
    assert k >= 4 and resolved[-2] == k - 1, errors  # enough resolved points, and consecutive
    slope = np.log(errors[k - 1] / errors[k]) / np.log(steps[k - 1] / steps[k])
    assert abs(slope - (ORDERS[method] + 1)) < 0.5, (slope, errors)


@pytest.mark.parametrize("method", sorted(ORDERS))
def test_adaptive_runs_follow_dop853_and_count_their_evaluations(method):
    """Integrated to t = 3 through two checkpoints at rtol 1e-9: each seed lands on both
    times and stays within 1e-6 of DOP853 (global error: a few hundred times rtol at most);
    every attempted step costs the pair's evaluations, plus 2 for the starting step."""
    problem, u0 = small_problem()
    it = Integrator(method, problem, u0, dt=0.1, rtol=1e-9, atol=1e-12)
    times = np.array([0.0, 1.0, 3.0])
    for t in times[1:]:
        assert it.advance_to(t)
        assert np.all(it.state.t == t)
    for s in range(2):
        ref = reference_layers(problem.X, problem.y, u0[s], times)[-1]
        np.testing.assert_allclose(it.U[s], ref, rtol=0, atol=1e-6)
    tableau = TABLEAUS[method]
    np.testing.assert_array_equal(it.state.nfev, 2 + tableau.evaluations * it.state.steps)
    assert np.all(it.state.status == RUNNING) and np.all(it.state.accepted > 5)


@pytest.mark.parametrize("method", ["cash_karp", "bogacki_shampine"])
def test_loss_tol_stops_a_pair_with_or_without_fsal(method):
    """Without FSAL the loss of a new state is known only when the next step evaluates its
    first stage: the seed stops there, before moving, at the same state and time as with FSAL
    (the first accepted state below loss_tol)."""
    problem, u0 = small_problem(depth=2, n=5, d=12)
    it = Integrator(method, problem, u0, dt=0.1, rtol=1e-8, atol=1e-12, loss_tol=1e-6)
    assert it.advance_to(500.0)
    assert np.all(it.state.status == LOSS_TOL)
    theta = it.theta_of_all()
    for s in range(2):
        assert loss(problem.X, problem.y, theta[s]) < 1e-6
        assert it.state.t_stop[s] == it.state.t[s] < 500.0


@pytest.mark.parametrize("method", ["dopri5", "cash_karp"])
@pytest.mark.parametrize("per_seed,dtype", [(True, np.float64), (False, np.float64), (False, np.float32)])
def test_the_compiled_loop_and_the_python_loop_give_the_same_bits(method, per_seed, dtype):
    """Small active states take whole runs of steps in one compiled call, larger ones one step
    per call from Python; both make the same kernel calls in the same order (products seed by
    seed at this size), so forcing every step through Python changes no bit: layers, times,
    counters, with seeds stopping (loss_tol) along the way."""
    problem, u0 = small_problem(depth=2, n=5, d=12, seeds=3)
    if per_seed:
        rng = np.random.default_rng(1)
        X = problem.X[None] * (1 + 0.2 * rng.standard_normal((3, 1, 12)))
        problem = Problem(X, np.einsum("snd,d->sn", X, np.ones(12)))
    runs = []
    for compiled in (True, False):
        it = Integrator(method, problem, u0, dt=0.1, rtol=1e-8, atol=1e-12, loss_tol=1e-7, dtype=dtype)
        if not compiled:
            it.compiled_loop_work = -1
        for t in (0.5, 7.0, 300.0):
            assert it.advance_to(t)
        runs.append(it)
    assert np.all(runs[0].state.status == LOSS_TOL)
    assert len(set(runs[0].state.t_stop)) == 3  # the seeds stopped at different times
    np.testing.assert_array_equal(runs[0].U, runs[1].U)
    for name in SeedState._fields:
        np.testing.assert_array_equal(getattr(runs[0].state, name), getattr(runs[1].state, name), err_msg=name)
