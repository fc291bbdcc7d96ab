"""The step-size controller (ddln_fast.controller) against Hairer's formulas and scipy.

References:
- a transcription of the PI control of Hairer's dopri5.f (HNW I §II.4; II §IV.2), of
  Gustafsson's predictive control of radau5.f and of the landing rule, written below in plain
  Python, one seed at a time;
- scipy's ``select_initial_step`` (scipy.integrate._ivp.common) for the starting step;
- exp(lambda t) for a whole integration of y' = lambda y driven by the controller.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ddln_fast import controller
from ddln_fast.controller import (LOSS_TOL, MAX_STEPS, RUNNING, STALLED, SeedState, Trial,
                                  control_for)
from ddln_fast.tableaus import DOPRI5

SAFE, FAC1, FAC2, BETA = 0.9, 0.2, 10.0, 0.04


def dopri5_new_step(h, err, facold, rejected_before):
    """dopri5.f, after the error norm of a step of size h: (accepted, next h, next facold)."""
    expo1 = 0.2 - BETA * 0.75
    fac11 = err ** expo1 if math.isfinite(err) else math.inf
    if err <= 1.0:
        fac = fac11 / facold ** BETA
        fac = max(1 / FAC2, min(1 / FAC1, fac / SAFE))
        hnew = h / fac
        if rejected_before:
            hnew = min(hnew, h)
        return True, hnew, max(err, 1e-4)
    return False, h / min(1 / FAC1, fac11 / SAFE), facold


def one_attempt(err, h, facold=1e-4, rejected=0, t=0.0, target=1e9, loss_new=1.0, loss_tol=0.0,
                max_steps=1000, fastmath=False, steps=0):
    """One seed through propose_steps and control_steps; returns (state, trial)."""
    st = SeedState.fresh(1, h)
    st.t[0], st.facold[0], st.rejected[0], st.steps[0] = t, facold, rejected, steps
    trial = Trial.empty(1)
    seed, targets, live = np.array([0]), np.array([target]), np.ones(1, dtype=np.uint8)
    if fastmath:
        controller.propose_steps_fastmath(seed, targets, st, trial, np.zeros(1))
        controller.control_steps_fastmath(seed, live, np.array([err]), np.array([loss_new]), targets,
                                          st, trial, control_for(4).expo1, 6, loss_tol, max_steps)
    else:
        controller.propose_steps(seed, targets, st, trial)
        controller.control_steps(seed, live, np.array([err]), np.array([loss_new]), targets, st, trial,
                                 control_for(4), 6, loss_tol, max_steps)
    return st, trial


@pytest.mark.parametrize("err", [0.0, 1e-9, 0.013, 0.5, 1.0, 1.3, 40.0, np.inf, np.nan])
@pytest.mark.parametrize("facold", [1e-4, 0.3, 0.99])
@pytest.mark.parametrize("rejected", [0, 1])
def test_pi_control_is_dopri5_f(err, facold, rejected):
    """IEEE entry points: bitwise Hairer's formulas; the fast-math ones (constants folded into
    products) agree to a few ulps."""
    h = 0.37
    accepted, h_next, facold_next = dopri5_new_step(h, err, facold, rejected)
    st, trial = one_attempt(err, h, facold, rejected)
    assert bool(trial.accepted[0]) == accepted
    assert st.h[0] == h_next
    assert st.facold[0] == facold_next
    assert st.t[0] == (h if accepted else 0.0)
    assert st.rejected[0] == (0 if accepted else 1)
    assert st.steps[0] == 1 and st.nfev[0] == 6 and st.accepted[0] == int(accepted)
    fast, _ = one_attempt(err, h, facold, rejected, fastmath=True)
    np.testing.assert_allclose(fast.h[0], h_next, rtol=4 * np.finfo(float).eps)


def test_error_exponent_comes_from_the_order():
    for q in (1, 2, 3, 4, 7):
        c = control_for(q)
        assert c.exponent == 1 / (q + 1) and c.expo1 == 1 / (q + 1) - 0.75 * BETA
    assert control_for(3, beta=0.0).expo1 == 0.25  # Radau IIA's estimate, I control
    with pytest.raises(ValueError, match="order"):
        control_for(0)


def test_a_step_within_one_percent_of_the_target_lands_on_it():
    """From t = 1.6 to the target 2.1: a proposal of 0.496 is stretched to land on it
    (1.6 + 1.01 * 0.496 >= 2.1), one of 0.49 is not (1.6 + 1.01 * 0.49 = 2.0949)."""
    st, trial = one_attempt(0.5, 0.496, t=1.6, target=2.1)
    assert trial.landing[0] == 1 and trial.h[0] == 2.1 - 1.6 and st.t[0] == 2.1
    st, trial = one_attempt(0.5, 0.49, t=1.6, target=2.1)
    assert trial.landing[0] == 0 and trial.h[0] == 0.49 and st.t[0] == 1.6 + 0.49


def test_a_clipped_step_remembers_its_proposal():
    """Clipping a proposal of 10 to the 0.1 left before a checkpoint does not shrink the steps
    after it: the next proposal is at least the unclipped one."""
    st, trial = one_attempt(0.9, 10.0, t=0.9, target=1.0)
    assert trial.landing[0] == 1 and st.t[0] == 1.0
    assert trial.h_proposed[0] == 10.0 and st.h[0] >= 10.0


def test_stops_loss_tol_max_steps_and_stalled():
    st, _ = one_attempt(0.5, 0.1, loss_new=1e-9, loss_tol=1e-8)
    assert st.status[0] == LOSS_TOL and st.t_stop[0] == st.t[0] == 0.1
    st, _ = one_attempt(0.5, 0.1, loss_new=1e-7, loss_tol=1e-8)
    assert st.status[0] == RUNNING
    st, _ = one_attempt(2.0, 0.1, steps=9, max_steps=10)  # the 10th attempt, rejected
    assert st.status[0] == MAX_STEPS and st.t_stop[0] == 0.0
    # a rejected step at t = 1e3 whose next proposal is below 16 eps t no longer moves t
    st, _ = one_attempt(np.nan, 1e-12, t=1e3)
    assert st.h[0] == 1e-12 / 5 and st.status[0] == STALLED and st.t_stop[0] == 1e3


def test_rejecting_with_a_factor_and_no_growth_after():
    """An implicit solver's Newton failure: h -> factor * h, counted as an attempt; the next
    accepted step may not grow."""
    st = SeedState.fresh(2, 0.8)
    trial = Trial.empty(2)
    active, targets = np.array([0, 1]), np.full(2, 100.0)
    controller.propose_steps(active, targets, st, trial)
    controller.reject_steps(active, np.array([1, 0], dtype=np.uint8), 0.5, st, trial, 1000)
    assert st.h[0] == 0.4 and st.rejected[0] == 1 and st.steps[0] == 1 and st.nfev[0] == 0
    assert st.h[1] == 0.8 and st.steps[1] == 0
    controller.propose_steps(active[:1], targets, st, trial)
    controller.control_steps(active[:1], np.ones(1, np.uint8), np.array([1e-6]), np.array([1.0]),
                             targets, st, trial, control_for(4), 6, 0.0, 1000)
    assert trial.accepted[0] == 1 and st.t[0] == 0.4 and st.h[0] == 0.4  # capped at h


def test_predictive_control_is_radau5_f():
    """Gustafsson's ratio (radau5.f, PRED = true), q = 3: after the first accepted step (no
    history) the I control alone; then the larger of the I and predicted ratios. A rejection
    in between does not change the history (1e-14: the history is kept as one number)."""
    safe, facl, facr = 0.9, 1 / 0.2, 1 / 10.0

    def radau5(h, err, hacc, erracc, naccpt):
        quot = max(facr, min(facl, err ** 0.25 / safe))
        if naccpt > 0:
            facgus = (hacc / h) * (err ** 2 / erracc) ** 0.25 / safe
            quot = max(quot, max(facr, min(facl, facgus)))
        return h / quot, h, max(1e-2, err)

    st = SeedState.fresh(1, 0.2)
    trial = Trial.empty(1)
    active, live, targets = np.array([0]), np.ones(1, np.uint8), np.full(1, 1e9)
    c = control_for(3, beta=0.0, predictive=True)
    hacc = erracc = 0.0
    accepted = 0
    for err in [0.3, 0.02, 3.0, 0.7, 0.001]:
        h = st.h[0]
        controller.propose_steps(active, targets, st, trial)
        controller.control_steps(active, live, np.array([err]), np.array([1.0]), targets, st, trial,
                                 c, 4, 0.0, 100)
        if err > 1:
            assert trial.accepted[0] == 0
            np.testing.assert_allclose(st.h[0], h / min(facl, err ** 0.25 / safe), rtol=1e-15)
            continue
        expected, hacc, erracc = radau5(h, err, hacc, erracc, accepted)
        accepted += 1
        np.testing.assert_allclose(st.h[0], min(expected, h) if err == 0.7 else expected, rtol=1e-14)
    assert st.accepted[0] == 4


def test_screen_losses():
    st = SeedState.fresh(4, 0.1)
    live = np.array([1, 1, 1, 0], dtype=np.uint8)
    controller.screen_losses(np.array([3, 2, 1, 0]), live, np.array([np.inf, 1e-9, 0.5, np.nan]), 1e-8, st)
    assert list(live) == [0, 0, 1, 0]
    assert list(st.status) == [RUNNING, RUNNING, LOSS_TOL, controller.DIVERGED]
    assert np.isnan(st.loss[0]) and st.loss[1] == 0.5 and st.loss[2] == 1e-9


@pytest.mark.parametrize("order", [2, 3, 4])
def test_starting_step_is_scipys(order):
    """HINIT against scipy's select_initial_step on a linear field f(y) = M y (rtol 1e-14:
    the RMS norms are summed differently)."""
    from scipy.integrate._ivp.common import norm, select_initial_step

    rng = np.random.default_rng(order)
    for trial in range(20):
        y0 = rng.standard_normal(30) * 10.0 ** rng.integers(-8, 3)
        M = rng.standard_normal((30, 30)) * 10.0 ** rng.integers(-3, 3)
        rtol, atol = 1e-8, 1e-12
        f0 = M @ y0
        expected = select_initial_step(lambda t, y: M @ y, 0.0, y0, np.inf, np.inf, f0, 1.0, order, rtol, atol)
        scale = atol + rtol * np.abs(y0)
        d1 = norm(f0 / scale)
        h0 = controller.first_trial_step(norm(y0 / scale), d1, np.inf)
        d2 = norm((M @ (y0 + h0 * f0) - f0) / scale) / h0
        got = controller.starting_step(h0, d1, d2, order, np.inf)
        np.testing.assert_allclose(got, expected, rtol=1e-14, err_msg=f"trial {trial}")
    assert controller.starting_step(1.0, 1e-3, 1e-3, 4, 0.5) == 0.5  # at most h_max


def test_the_controller_integrates_exponentials_and_lands_on_every_target():
    """Three seeds of y' = lambda y, dopri5 stages in numpy, steps from the controller: each
    lands exactly on each target time and matches exp(lambda t) to its tolerance."""
    lam = np.array([-1.0, 0.5, -30.0])
    rtol, atol = 1e-9, 1e-12
    A, B, E = DOPRI5.A, DOPRI5.B, DOPRI5.E
    st = SeedState.fresh(3, 0.0)
    trial = Trial.empty(3)
    y = np.ones(3)
    active = np.arange(3)
    f0 = lam * y
    scale = atol + rtol * np.abs(y)
    h0 = controller.first_trial_step(np.abs(y) / scale, np.abs(f0) / scale, 1.0)
    d2 = np.abs(lam * (y + h0 * f0) - f0) / scale / h0
    st.h[:] = controller.starting_step(h0, np.abs(f0) / scale, d2, 4, 1.0)
    c = control_for(4)
    for target in (0.3, 0.7, 2.0):
        targets = np.full(3, target)
        while np.any(st.t < target):
            active = np.flatnonzero(st.t < target)
            controller.propose_steps(active, targets, st, trial)
            h = trial.h[active]
            K = np.zeros((7, active.size))
            K[0] = lam[active] * y[active]
            for i in range(1, 7):
                K[i] = lam[active] * (y[active] + h * (A[i, :i] @ K[:i]))
            y_new = y[active] + h * (B @ K)
            err = np.abs(h * (E @ K)) / (atol + rtol * np.maximum(np.abs(y[active]), np.abs(y_new)))
            controller.control_steps(active, np.ones(active.size, np.uint8), err, np.full(active.size, np.nan),
                                     targets, st, trial, c, 6, 0.0, 10_000)
            ok = trial.accepted[active] == 1
            y[active[ok]] = y_new[ok]
        assert np.all(st.t == target)
        np.testing.assert_allclose(y, np.exp(lam * target), rtol=1e-7, atol=1e-12)
    assert np.all(st.status == RUNNING) and np.all(st.rejected == 0)


def test_clock_flow_says_when_max_steps_is_too_small():
    """theory.clock_flow steps each coordinate with this controller: a coordinate that needs
    more than max_steps raises instead of returning a theta short of tau."""
    from ddln_fast.theory import clock_flow

    u0 = np.array([[0.1, 0.2], [0.5, 0.4], [0.7, 0.9]])
    theta, blown = clock_flow(u0, np.array([1.0, -1.0]))
    assert not blown.any() and np.all(np.isfinite(theta))
    with pytest.raises(RuntimeError, match="max_steps = 3"):
        clock_flow(u0, np.array([1.0, -1.0]), max_steps=3)
