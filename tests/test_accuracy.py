"""Accuracy of the integrators against independent references.

References (written here or in references.py, no ddln_fast code in them):
- scipy ``solve_ivp`` DOP853 at rtol 1e-12, atol 1e-14 on the flattened layer flow
  du^j/dt = -g(theta) * prod_{k != j} u^k (numpy right-hand side, all-but-one products by
  multiplying the other layers);
- for depth 1 (plain linear regression) the closed forms: the gradient flow
  theta(t) = exp(-A t) theta0 + int_0^t exp(-A s) ds b (A = X^T X / n, b = X^T y / n), computed
  as the exponential of the augmented matrix [[-A, b], [0, 0]], and gradient descent
  theta_k = M^k [theta0; 1] with M = [[I - eta A, eta b], [0, 1]];
- the invariants (u^j)^2 - (u^k)^2 (docs/theory.md, "Invariants"), recomputed pair by pair from the
  stored layers.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from ddln_fast import simulate
from ddln_fast.init import initial_layers
from ddln_fast.problem import make_problem
from references import invariant_drift, loss, reference_layers

# --- depth 1 closed forms -----------------------------------------------------------------------


def linear_flow(X, y, theta0, t):
    """Gradient flow of f(theta) = ||X theta - y||^2 / (2n) at time t (exact, via expm)."""
    n, d = X.shape
    M = np.zeros((d + 1, d + 1))
    M[:d, :d] = -X.T @ X / n
    M[:d, d] = X.T @ y / n
    return (scipy.linalg.expm(M * t) @ np.append(theta0, 1.0))[:d]


def linear_gradient_descent(X, y, theta0, eta, steps):
    """theta after ``steps`` steps of gradient descent with step eta (affine map, matrix power)."""
    n, d = X.shape
    M = np.eye(d + 1)
    M[:d, :d] -= eta * X.T @ X / n
    M[:d, d] = eta * X.T @ y / n
    return (np.linalg.matrix_power(M, steps) @ np.append(theta0, 1.0))[:d]


# --- trajectories vs DOP853 ---------------------------------------------------------------------

# dopri5 at rtol 1e-10 has a global error of a few 1e-10 on these O(1), t <= 2 problems, rk4 at
# dt = 0.005 about C dt^4 ~ 1e-9 (measured ~1e-9 at dt = 0.01 for t = 1); the reference is good
# to ~1e-13. The bound 1e-7 leaves two orders of margin for the problem constants.
TRAJECTORY_TOLERANCE = 1e-7


def _checkpoint_errors(run, config):
    """Max |u - u_ref| over checkpoints, layers and coordinates, for every seed."""
    u0 = run.u0
    X, y = run.X, run.y
    errors = []
    for s in range(config.run.seeds):
        Xs, ys = (X[s], y[s]) if X.ndim == 3 else (X, y)
        ref = reference_layers(Xs, ys, u0[s], run.t)
        errors.append(np.max(np.abs(run.u[:, s] - ref)))
    return np.array(errors)


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_trajectory_matches_dop853(make_config, method, depth):
    # gaussian init with jitter and random signs of the last layer: mixed signs, (A) holds.
    config = make_config({"model.depth": depth, "integrator.method": method, "integrator.dt": 0.005})
    run = simulate(config)
    assert np.all(np.isfinite(run.u))
    assert run.t[-1] == config.integrator.t_end
    np.testing.assert_array_equal(run.t_seed, np.broadcast_to(run.t[:, None], run.t_seed.shape))  # landed exactly
    errors = _checkpoint_errors(run, config)
    assert np.max(errors) <= TRAJECTORY_TOLERANCE, f"errors per seed {errors}"


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
@pytest.mark.parametrize("depth,n,d", [(2, 5, 8), (3, 20, 30), (4, 12, 16)])
def test_trajectory_from_random_mixed_sign_file(make_config, write_npz, tmp_path, method, depth, n, d):
    # Every layer of every seed random in +-[0.3, 1.2]: signs mixed in all layers, not only the last.
    rng = np.random.default_rng(100 * depth + n)
    seeds = 2
    u0 = rng.uniform(0.3, 1.2, (seeds, depth, d)) * rng.choice([-1.0, 1.0], (seeds, depth, d))
    path = tmp_path / "u0.npy"
    np.save(path, u0)
    config = make_config({"problem.n": n, "problem.d": d, "problem.sparsity": 2, "model.depth": depth,
                          "model.init": "file", "model.init_path": str(path), "model.signs": "positive",
                          "integrator.method": method, "integrator.dt": 0.005, "run.seeds": seeds})
    run = simulate(config)
    np.testing.assert_array_equal(run.u0, u0)
    errors = _checkpoint_errors(run, config)
    assert np.max(errors) <= TRAJECTORY_TOLERANCE, f"errors per seed {errors}"


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
@pytest.mark.parametrize("depth,n,d,dt", [(5, 8, 12, 0.0025), (6, 8, 9, 0.0025), (3, 100, 1100, 0.001)])
def test_trajectory_deep_and_wide(make_config, method, depth, n, d, dt):
    """Depths beyond 4 (the generic kernel path) and d = 1100 > 2 blocks of coordinates (the
    per-block partial sums of the error norm and drift, with a partial last block). With
    d = 1100 the largest eigenvalue of X^T X / n is about (sqrt(d) + sqrt(n))^2 / n ~ 18 (n = 100),
    so rk4 gets dt = 0.001 there (measured error 2e-8 at dt = 0.002); at depth 5 the rk4 error
    was 1e-7 at dt = 0.005, hence dt = 0.0025 (~6e-9)."""
    config = make_config({"model.depth": depth, "problem.d": d, "problem.n": n, "integrator.method": method,
                          "integrator.dt": dt, "integrator.t_end": 1.0, "run.checkpoints": 3,
                          "model.alpha": 0.9, "model.jitter": 0.2})
    run = simulate(config)
    errors = _checkpoint_errors(run, config)
    assert np.max(errors) <= TRAJECTORY_TOLERANCE, f"errors per seed {errors}"
    assert np.max(np.abs(run.u[-1] - run.u0)) > 1e-3  # the layers moved
    np.testing.assert_allclose(run.invariant_drift, invariant_drift(run.u, run.u0[None]), rtol=0, atol=1e-13)


# --- order of accuracy --------------------------------------------------------------------------


@pytest.mark.parametrize("method,dt,low,high", [("rk4", 0.01, 14.0, 18.0), ("euler", 0.004, 1.8, 2.2)])
def test_order_of_accuracy(make_config, method, dt, low, high):
    """Halving dt divides the error at t = 1 by 2^p (p = 4 for rk4, 1 for euler).

    Asymptotic range: the error is C dt^p (1 + O(dt)); the ratio is 2^p only once the O(dt)
    correction is small. Measured on this problem (depth 3) the rk4 ratio goes 17.2, 16.6, 16.3
    for dt = 0.02, 0.01, 0.005 (so at dt = 0.01 the correction is ~4%), and the euler ratio is
    2.0000 from dt = 0.004. The errors there (rk4: 2e-8 and 1e-9; euler: 2e-3 and 1e-3) are far
    above the reference's ~1e-13 and the rounding of a few hundred steps, so the ratio measures
    the method and nothing else.
    """
    config = make_config({"model.depth": 3, "integrator.method": method, "integrator.t_end": 1.0,
                          "run.checkpoints": 2, "run.seeds": 1})
    problem = make_problem(config)
    u0 = initial_layers(config, problem.d)[0]
    reference = reference_layers(problem.X, problem.y, u0, np.array([0.0, 1.0]))[-1]
    errors = []
    for step in (dt, dt / 2):
        run = simulate(config.with_overrides({"integrator.dt": step}))
        assert run.t[-1] == 1.0
        errors.append(np.max(np.abs(run.u[-1, 0] - reference)))
    ratio = errors[0] / errors[1]
    assert low <= ratio <= high, f"{method}: errors {errors}, ratio {ratio:.3f}"


# --- invariants ---------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_invariant_drift_dopri5(make_config, depth):
    """(u^j)^2 - (u^k)^2 is conserved by the flow; dopri5 at rtol 1e-10 keeps it to ~1e-11 on
    O(1) layers (its local errors are ~rtol * |u|), so 1e-9 is the bound of the issue."""
    config = make_config({"model.depth": depth, "integrator.t_end": 5.0, "run.seeds": 3,
                          "run.checkpoints": 6})
    run = simulate(config)
    stored = run.invariant_drift
    recomputed = invariant_drift(run.u, run.u0[None])
    assert stored.shape == (6, 3)
    assert np.all(stored[0] == 0.0)
    assert np.max(recomputed) <= 1e-9
    assert np.max(stored) <= 1e-9
    # The stored drift is the same quantity: equal up to the rounding of squaring O(1) numbers.
    np.testing.assert_allclose(stored, recomputed, rtol=0, atol=1e-14)
    # The layers did move (squares change by O(0.1)), so a zero drift is not a frozen run.
    assert np.max(np.abs(run.u[-1] ** 2 - run.u0 ** 2)) > 1e-2


def test_invariant_drift_detects_euler(make_config):
    """Gradient descent breaks the invariants by O(eta^2) per step: the stored drift sees it."""
    config = make_config({"model.depth": 2, "integrator.method": "euler", "integrator.dt": 0.05})
    run = simulate(config)
    recomputed = invariant_drift(run.u, run.u0[None])
    assert np.max(run.invariant_drift[-1]) > 1e-6
    np.testing.assert_allclose(run.invariant_drift, recomputed, rtol=1e-10, atol=1e-15)


# --- loss ---------------------------------------------------------------------------------------


def test_loss_non_increasing_along_dopri5(make_config):
    """d/dt f = -sum_i h_i g_i^2 <= 0 along the exact flow. Small first-layer-zero init: a
    plateau then a drop (the hard case for monotonicity). The stored loss is f(theta) of the
    stored theta (recomputed in numpy to 1e-12 relative); between checkpoints it may only rise by
    the integration error, which at rtol 1e-10 is far below 1e-12 * f(0)."""
    config = make_config({"model.depth": 3, "model.init": "first_layer_zero", "model.alpha": 0.3,
                          "model.jitter": 0.1, "model.signs": "positive", "integrator.t_end": 200.0,
                          "run.checkpoints": 40, "run.spacing": "log", "run.seeds": 2})
    run = simulate(config)
    losses = run.loss
    for s in range(2):
        numpy_loss = [loss(run.X, run.y, theta) for theta in run.theta[:, s]]
        np.testing.assert_allclose(losses[:, s], numpy_loss, rtol=1e-12, atol=1e-300)
        assert np.all(np.diff(losses[:, s]) <= 1e-12 * losses[0, s]), losses[:, s]
        assert losses[-1, s] < 1e-3 * losses[0, s]  # it trained


def test_loss_decreases_under_stable_gradient_descent(make_config):
    """GD with eta = 0.02, well below 2 / (Lipschitz constant of the layer gradient, about 10 here):
    the loss decreases at every step (checkpoints at every step)."""
    steps = 150
    config = make_config({"model.depth": 3, "integrator.method": "euler", "integrator.dt": 0.02,
                          "integrator.t_end": 0.02 * steps, "run.checkpoints": steps + 1})
    run = simulate(config)
    assert len(run.t) == steps + 1
    assert np.all(np.diff(run.loss, axis=0) < 0)


# --- depth 1: linear regression -----------------------------------------------------------------


@pytest.mark.parametrize("method", ["dopri5", "dual"])
@pytest.mark.parametrize("n,d", [(10, 6), (6, 10)])
def test_depth_one_flow_is_linear_regression(make_config, n, d, method):
    """Depth 1: theta = u^1 and the layer flow is the gradient flow of least squares (over- and
    under-determined). dopri5 and dual at rtol 1e-10 vs the matrix-exponential solution: 1e-8."""
    config = make_config({"problem.n": n, "problem.d": d, "problem.sparsity": 2, "model.depth": 1,
                          "integrator.t_end": 3.0, "integrator.method": method})
    run = simulate(config)
    for s in range(config.run.seeds):
        for k, t in enumerate(run.t):
            exact = linear_flow(run.X, run.y, run.u0[s, 0], t)
            np.testing.assert_allclose(run.theta[k, s], exact, rtol=0, atol=1e-8)
    assert np.all(run.invariant_drift == 0.0)  # one layer: no pair of layers, nothing to drift


def test_depth_one_euler_is_linear_gradient_descent(make_config):
    """Euler on depth 1 is GD on least squares: theta_k = M^k [theta0; 1] up to rounding (1e-12)."""
    eta, steps = 0.05, 60
    config = make_config({"model.depth": 1, "integrator.method": "euler", "integrator.dt": eta,
                          "integrator.t_end": eta * steps, "run.checkpoints": 4})
    run = simulate(config)
    for k, t in enumerate(run.t):
        step = int(round(t / eta))
        for s in range(config.run.seeds):
            exact = linear_gradient_descent(run.X, run.y, run.u0[s, 0], eta, step)
            np.testing.assert_allclose(run.theta[k, s], exact, rtol=0, atol=1e-12)
