"""The ``dual`` method (Radau IIA(5) on nu' = X F(X^T nu / n) - y) against independent references.

References (no ddln_fast code in them):
- scipy ``solve_ivp`` DOP853 at rtol 1e-12, atol 1e-14 on the flattened LAYER flow
  du^j/dt = -g(theta) prod_{k != j} u^k (``references.reference_layers``): the dual method
  integrates other coordinates, so agreement checks the whole chain (clock maps, dual field,
  Radau, layer recovery);
- depth 1: the matrix-exponential solution of linear least-squares gradient flow (in
  test_accuracy, parametrized over the methods);
- the implicit-bias limit: ``predict_limit`` (the Bregman projection by dual Newton, a separate
  code path: no time stepping) and, at depth 2 and a tiny scale, scipy's ``linprog`` minimum-l1
  interpolator;
- an orthogonal design (X^T X / n = I) at depth 2 with the balanced initialization: the logistic
  closed form theta(t) = theta* theta0 / (theta0 + (theta* - theta0) exp(-2 theta* t));
- activation times and loss-decade times: brentq on DOP853's dense output of the layer flow.

Tolerances: the dual method runs at rtol 1e-10 (atol 1e-14); its global error on these O(1)
problems then measures about 1e-10 (RADAU5's tolerance conversion makes rtol the accuracy of
theta), and the references are good to about 1e-12. Each test states its bound.
"""

from __future__ import annotations

import os

import numpy as np
import scipy.linalg
import pytest
from scipy.integrate import solve_ivp
from scipy.optimize import brentq, linprog

from references import (REFERENCE_ATOL, REFERENCE_RTOL, invariant_drift, layer_flow_rhs,
                        reference_layers, small_config_tables)

DUAL = {"integrator.method": "dual", "integrator.rtol": 1e-10, "integrator.atol": 1e-14}
#: the issue's bound for trajectories against DOP853 (measured: 1e-10 to 6e-10 at rtol 1e-10)
TRAJECTORY_TOLERANCE = 1e-8


def dual_config(overrides=None, base_dir=None):
    from ddln_fast import Config

    tables = small_config_tables({**DUAL, **(overrides or {})})
    return Config.from_dict(tables, base_dir)


def relative_trajectory_error(run, config):
    """max over seeds, checkpoints, layers and coordinates of |u - u_ref| / max |u_ref|, and
    the same for theta."""
    worst = 0.0
    for s in range(config.run.seeds):
        X = run.X[s] if run.X.ndim == 3 else run.X
        y = run.y[s] if run.y.ndim == 2 else run.y
        ref = reference_layers(X, y, run.u0[s], run.t)
        theta_ref = ref.prod(axis=1)
        worst = max(worst, np.abs(run.u[:, s] - ref).max() / np.abs(ref).max(),
                    np.abs(run.theta[:, s] - theta_ref).max() / np.abs(theta_ref).max())
    return worst


# --- trajectories against DOP853 on the layer flow ---------------------------------------------

@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5, 6])
def test_trajectory_matches_dop853_signed_jittered(depth):
    """Gaussian init, 30% jitter, random signs of the last layer (every family of depth d)."""
    from ddln_fast import simulate

    config = dual_config({"model.depth": depth})
    run = simulate(config)
    assert relative_trajectory_error(run, config) < TRAJECTORY_TOLERANCE


@pytest.mark.parametrize("depth, signs", [(2, "random"), (3, "positive"), (3, "random"),
                                          (4, "random"), (5, "positive")])
def test_trajectory_matches_dop853_first_layer_zero(depth, signs):
    from ddln_fast import simulate

    config = dual_config({"model.depth": depth, "model.init": "first_layer_zero", "model.alpha": 0.6,
                          "model.jitter": 0.0, "model.signs": signs, "integrator.t_end": 4.0})
    run = simulate(config)
    assert relative_trajectory_error(run, config) < TRAJECTORY_TOLERANCE


def test_trajectory_matches_dop853_balanced_with_signs():
    """All layers tied (sign trap): theta_i keeps its sign, the closed form of the tie."""
    import warnings

    from ddln_fast import simulate

    config = dual_config({"model.depth": 3, "model.init": "balanced", "model.alpha": 0.8,
                          "model.jitter": 0.0, "model.signs": "random"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the sign-trap warning is the point of this init
        run = simulate(config)
    assert relative_trajectory_error(run, config) < TRAJECTORY_TOLERANCE


def test_trajectory_matches_dop853_per_seed_data():
    from ddln_fast import simulate

    config = dual_config({"problem.per_seed_data": True, "model.depth": 3})
    run = simulate(config)
    assert run.X.ndim == 3
    assert relative_trajectory_error(run, config) < TRAJECTORY_TOLERANCE


def test_trajectory_with_two_zero_layers(tmp_path):
    """Coordinates with two zero layers are frozen (theta_i = 0, h_i = 0, J singular along
    them); the others (unequal layers) move. Init from a file, per seed."""
    from ddln_fast import simulate

    rng = np.random.default_rng(4)
    u0 = 0.6 * (1 + 0.3 * rng.standard_normal((2, 3, 12)))
    u0[:, 0, :4] = 0.0
    u0[:, 1, :4] = 0.0
    np.save(tmp_path / "u0.npy", u0)
    config = dual_config({"model.init": "file", "model.init_path": str(tmp_path / "u0.npy")})
    run = simulate(config)
    assert np.all(run.theta[:, :, :4] == 0.0)
    assert relative_trajectory_error(run, config) < TRAJECTORY_TOLERANCE


def test_overdetermined_and_rank_deficient_data(write_npz):
    """d < n (no interpolator: the s-form, whose state mu = Q^T nu converges while nu would grow
    without bound), d < n with a repeated column (rank < d: R and J are singular) and a design
    with repeated rows (rank < n: J is singular). None is an error; all follow DOP853."""
    from ddln_fast import simulate

    rng = np.random.default_rng(7)
    X = rng.standard_normal((14, 6))
    y = rng.standard_normal(14)
    path = write_npz("tall.npz", X=X, y=y)
    config = dual_config({"problem.kind": "file", "problem.path": path, "integrator.t_end": 3.0})
    run = simulate(config)
    assert run.file.attrs["dual_state"].startswith("s-form")
    assert relative_trajectory_error(run, config) < TRAJECTORY_TOLERANCE
    X[:, 4] = X[:, 1]  # 14 rows of rank 5
    path = write_npz("tall_deficient.npz", X=X, y=y)
    config = dual_config({"problem.kind": "file", "problem.path": path, "integrator.t_end": 3.0})
    run = simulate(config)
    assert run.file.attrs["dual_state"].startswith("s-form")
    assert relative_trajectory_error(run, config) < TRAJECTORY_TOLERANCE
    X = rng.standard_normal((6, 12))
    X = np.vstack([X, X[:3]])  # 9 rows of rank 6
    y = rng.standard_normal(9)
    path = write_npz("deficient.npz", X=X, y=y)
    config = dual_config({"problem.kind": "file", "problem.path": path, "integrator.t_end": 3.0})
    assert relative_trajectory_error(simulate(config), config) < TRAJECTORY_TOLERANCE


# --- the s-form (d < n) -------------------------------------------------------------------------
#: n = 60 samples of d = 15 coordinates with noise: no interpolator, y has a part outside the
#: range of X (the s-form's loss offset is not zero)
TALL = {"problem.n": 60, "problem.d": 15, "problem.noise": 0.5, "problem.sparsity": 4}


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("per_seed_data", [False, True])
def test_s_form_trajectory_and_loss_match_dop853(depth, per_seed_data):
    """d < n, signed and jittered init: layers and theta follow DOP853 on the layer flow, and the
    stored loss is ||X theta - y||^2 / (2n) of the stored theta (NumPy, here), which the part
    of y outside range(X) keeps well above zero."""
    from ddln_fast import simulate

    config = dual_config({**TALL, "model.depth": depth, "problem.per_seed_data": per_seed_data,
                          "integrator.t_end": 5.0})
    run = simulate(config)
    assert run.file.attrs["dual_state"].startswith("s-form")
    assert relative_trajectory_error(run, config) < TRAJECTORY_TOLERANCE
    for s in range(config.run.seeds):
        X = run.X[s] if run.X.ndim == 3 else run.X
        y = run.y[s] if run.y.ndim == 2 else run.y
        residuals = run.theta[:, s] @ X.T - y
        expected = np.sum(residuals ** 2, axis=1) / (2 * X.shape[0])
        np.testing.assert_allclose(run.loss[:, s], expected, rtol=1e-12)
        least_squares = np.linalg.lstsq(X, y, rcond=None)[0]
        assert np.all(run.loss[:, s] > 0.5 * np.sum((X @ least_squares - y) ** 2) / (2 * X.shape[0]))


@pytest.mark.parametrize("per_seed_data", [False, True])
def test_s_form_state_has_dimension_d(per_seed_data):
    """When d < n the solver's state and the matrices it factorizes have dimension d (the
    point of the s-form), unless the nu-form is forced; at d >= n the state is nu in R^n. After
    a few steps the Jacobian's factors A = V B V^T reproduce X diag(h) X^T / n (NumPy, here),
    V with orthonormal columns."""
    from ddln_fast.dual import DualIntegrator
    from ddln_fast.init import initial_layers
    from ddln_fast.problem import make_problem

    config = dual_config({**TALL, "problem.per_seed_data": per_seed_data})
    problem = make_problem(config)
    u0 = initial_layers(config, problem.d)
    n, d = problem.n, problem.d
    it = DualIntegrator(problem, u0, rtol=1e-8, atol=1e-12)
    assert it.n == d and it.nu.shape == (2, d) and it.basis.shape == (2, d, d)
    assert DualIntegrator(problem, u0, s_form=False).basis.shape == (2, n, n)
    it.advance_to(0.5)
    for s in range(2):
        X = problem.X[s] if per_seed_data else problem.X
        A = (X * it.jac_h[s]) @ X.T / n
        V, B = _jacobian_factors(it, s)
        # A has rank d: V B V^T is A in the d-dimensional s-form coordinates
        np.testing.assert_allclose(np.linalg.eigvalsh(B), np.linalg.eigvalsh(A)[n - d:], rtol=1e-10,
                                   atol=1e-12 * np.abs(A).max())
        np.testing.assert_allclose(V.T @ V, np.eye(V.shape[1]), atol=1e-14)
    square = make_problem(dual_config({"problem.n": 12, "problem.d": 12}))
    assert DualIntegrator(square, initial_layers(config, 12)).basis.shape == (2, 12, 12)


def _jacobian_factors(integrator, seed):
    """V (rows, k) and the tridiagonal B (k, k) of a seed's factored Jacobian A = V B V^T."""
    k = integrator.rank[seed]
    off = integrator.tri_off[seed, :max(k - 1, 0)]
    B = np.diag(integrator.tri_diag[seed, :k]) + np.diag(off, -1) + np.diag(off, 1)
    return integrator.basis[seed, :k].T, B


@pytest.mark.parametrize("per_seed_data", [False, True])
@pytest.mark.parametrize("active", [200, 60, 7, 0])
def test_jacobian_factors_and_newton_solves_match_numpy(active, per_seed_data):
    """The Jacobian A = X diag(h) X^T / n as V B V^T, and the two systems of every Newton
    update and the error estimate: (mu I + A)^{-1} b for the real mu and the complex pair of
    Radau IIA(5) at a step size h, against numpy.linalg.solve on the dense A. With ``active``
    of d = 200 coordinates at h ~ 1 and the others at h = 0 (left out of the factorization), A
    has full rank n = 40 (200, 60 active) or the rank of the active ones (7; 0: A = 0), for
    which the factors are V B V^T of rank k < n and the solves add the complement of V's
    range. Step sizes from 1e-3 to 1e9 (mu / h far below |A|); shared and per-seed data."""
    from ddln_fast import radau
    from ddln_fast.dual import DualIntegrator
    from ddln_fast.init import initial_layers
    from ddln_fast.problem import make_problem

    config = dual_config({"problem.n": 40, "problem.d": 200, "problem.per_seed_data": per_seed_data})
    problem = make_problem(config)
    it = DualIntegrator(problem, initial_layers(config, problem.d))
    data = problem.X if per_seed_data else np.stack([problem.X, problem.X])
    n = problem.n
    rng = np.random.default_rng(3)
    h = np.zeros((2, problem.d))
    h[:, rng.permutation(problem.d)[:active]] = rng.uniform(0.5, 2.0, size=(2, active))
    it._factor_jacobians(np.arange(2), h)
    for s in range(2):
        A = (data[s] * h[s]) @ data[s].T / n
        V, B = _jacobian_factors(it, s)
        assert it.rank[s] == min(active, n)
        np.testing.assert_allclose(V @ B @ V.T, A, rtol=0, atol=1e-13 * max(np.abs(A).max(), 1.0))
        np.testing.assert_allclose(V.T @ V, np.eye(V.shape[1]), atol=1e-14)
    seeds = np.array([0, 1, 1, 0])
    for step in (1e-3, 1.0, 1e9):
        inv_h = np.full(4, 1.0 / step)
        stage_f = rng.standard_normal((4, 3, n))
        W_inc, Z = np.zeros((4, 3, n)), np.zeros((4, 3, n))
        radau.NEWTON_UPDATE_KERNELS[0](stage_f, W_inc, Z, it.basis, it.tri_diag, it.tri_off, it.rank,
                                       seeds, inv_h, np.ones(4, dtype=np.uint8),
                                       np.empty((4, radau.WORK_VECTORS, n)))
        err = np.empty((4, n))
        Z_err = rng.standard_normal((4, 3, n))
        radau.ERROR_SOLVE_KERNELS[0](stage_f[:, 0], Z_err, it.basis, it.tri_diag, it.tri_off, it.rank,
                                     seeds, inv_h, err, np.empty((4, radau.WORK_VECTORS, n)))
        for r, s in enumerate(seeds):
            A = (data[s] * h[s]) @ data[s].T / n
            rhs = radau.TI @ stage_f[r]  # the transformed residual at W = 0
            real = np.linalg.solve(radau.MU_REAL / step * np.eye(n) + A, rhs[0])
            pair = np.linalg.solve(radau.MU_COMPLEX / step * np.eye(n) + A, rhs[1] + 1j * rhs[2])
            error = np.linalg.solve(radau.MU_REAL / step * np.eye(n) + A,
                                    stage_f[r, 0] + radau.E @ Z_err[r] / step)
            # NumPy's own error grows with the condition number of mu / h + A
            condition = 1.0 + np.linalg.norm(A, 2) * step / abs(radau.MU_COMPLEX)
            tol = 1e-9 + 100 * np.finfo(float).eps * condition
            for ours, ref in ((W_inc[r, 0], real), (W_inc[r, 1], pair.real), (W_inc[r, 2], pair.imag),
                              (err[r], error)):
                np.testing.assert_allclose(ours, ref, rtol=0, atol=tol * np.abs(ref).max())
            np.testing.assert_allclose(Z[r], radau.T @ W_inc[r], rtol=1e-12, atol=1e-12 * np.abs(Z[r]).max())


@pytest.mark.parametrize("step", [1e-2, 1e3, 1e9])
def test_jacobian_leaves_out_only_a_negligible_part(step):
    """At small scales most coordinates sit near zero (h_i ~ alpha^(2L-2)) and are left out of
    the Jacobian. What is left out, E = X_E diag(h_E) X_E^T / n, must be the smallest
    coordinates by h_i |x_i|^2 / n, with trace(E) within JACOBIAN_SLACK Re(mu) /
    (JACOBIAN_REACH h); the returned reach is the longest step at which ||E|| h / Re(mu) stays
    within JACOBIAN_SLACK (spectral norm by NumPy); and no further coordinate fits in."""
    from ddln_fast import radau
    from ddln_fast.dual_products import JACOBIAN_REACH, JACOBIAN_SLACK, DualProducts
    from ddln_fast.problem import make_problem

    problem = make_problem(dual_config({"problem.n": 40, "problem.d": 200}))
    X, n = problem.X, problem.n
    rng = np.random.default_rng(5)
    h = 10.0 ** rng.uniform(-40, 0, size=(1, 200))
    h[0, :5] = 0.0
    kept = h.copy()
    reach = DualProducts(problem).leave_out_small(kept, np.array([0]), np.array([step]))[0]
    weight = h[0] * (X * X).sum(axis=0) / n
    out = (kept[0] == 0) & (h[0] > 0)
    assert np.array_equal(kept[0][~out], h[0][~out])   # the others untouched
    budget = JACOBIAN_SLACK * radau.MU_COMPLEX_RE / (JACOBIAN_REACH * step)
    assert weight[out].sum() <= budget
    if out.any():
        assert weight[out].max() <= weight[~out & (h[0] > 0)].min()
        E = (X[:, out] * h[0, out]) @ X[:, out].T / n
        assert np.linalg.norm(E, 2) * reach / radau.MU_COMPLEX_RE <= JACOBIAN_SLACK * (1 + 1e-12)
        assert reach >= JACOBIAN_REACH * step * (1 - 1e-12)
    else:
        assert reach == np.inf
    left = weight[~out & (h[0] > 0)]
    assert left.size == 0 or weight[out].sum() + left.min() > budget


def test_dual_runs_give_the_same_bits_compiled_fresh_or_cached(tmp_path):
    """A run must not depend on whether its process compiled the kernels or loaded them from
    Numba's cache (a resumed run is often the other kind). With fast-math the Newton update of
    a Jacobian of rank k < N differed in the last bit between the two; the compiled Newton
    iteration and error estimate now carry the clock map, the products and the Radau solves
    inlined. Two processes on one empty cache directory (the first compiles, the second
    loads) and this one run the method on shared and per-seed data, with Jacobians of full and
    of lower rank, and hash every state array."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "runs.py"
    script.write_text(
        "import hashlib, numpy as np\n"
        "from ddln_fast import Config\n"
        "from ddln_fast.dual import DualIntegrator\n"
        "from ddln_fast.init import initial_layers\n"
        "from ddln_fast.problem import make_problem\n"
        "lines = []\n"
        "for per_seed, alpha in ((False, 1e-4), (True, 1e-3)):\n"
        "    config = Config.from_dict({'problem': {'n': 20, 'd': 60, 'seed': 0, 'per_seed_data': per_seed},\n"
        "                               'model': {'depth': 3, 'alpha': alpha, 'init': 'first_layer_zero',\n"
        "                                         'jitter': 0.1}, 'run': {'seeds': 3}})\n"
        "    problem = make_problem(config)\n"
        "    it = DualIntegrator(problem, initial_layers(config, problem.d), rtol=1e-10, atol=1e-14,\n"
        "                        loss_tol=1e-20)\n"
        "    ranks = set()\n"
        "    for t in np.geomspace(1.0, 1e12, 25):\n"
        "        it.advance_to(t)\n"
        "        ranks.update(int(k) for k in it.rank)\n"
        "    state = it.state_arrays()\n"
        "    digest = hashlib.md5(b''.join(np.ascontiguousarray(state[k]).tobytes() for k in sorted(state)))\n"
        "    partial, full = any(0 < k < problem.n for k in ranks), problem.n in ranks\n"
        "    lines.append(f'{per_seed} {partial} {full} {digest.hexdigest()}')\n"
        "print('\\n'.join(lines))\n")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    outputs = [subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                              check=True).stdout.strip() for _ in range(2)]
    here = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    assert outputs[0] == outputs[1] == here.stdout.strip()
    assert (tmp_path / "cache").is_dir() and any(Path(tmp_path / "cache").rglob("*.nbi"))
    # both kinds of Jacobian were factored in each run: rank 0 < k < N and k = N
    assert all(line.split()[1:3] == ["True", "True"] for line in outputs[0].splitlines())


def test_shifted_tridiagonal_solves_match_numpy():
    """The O(N) solves behind every Newton update and error estimate: (mu I + B) x = b for a
    real and a complex shift mu with a positive real part and B the package's tridiagonal form
    of a positive semidefinite matrix of rank 6 (n = 30), against numpy.linalg.solve on the
    dense matrix, from a well-conditioned shift to one 1e-20 of B's norm (the long steps late in
    a run, where mu / h is below the rounding of B): backward stable, and never larger than
    |b| / Re(mu), the bound of an accretive matrix (up to rounding: 2 |b| / Re(mu); without the
    deflation of B's negligible entries the elimination grew by 1e26 at 1e-17)."""
    from ddln_fast.dual_products import tridiagonalize
    from ddln_fast.radau import tridiagonal_solve_complex, tridiagonal_solve_real

    rng = np.random.default_rng(5)
    n = 30
    G = rng.standard_normal((n, 6))
    Q, diag, off = np.empty((n, n)), np.empty(n), np.empty(n)
    tridiagonalize(np.asfortranarray(G @ G.T), Q, diag, off)
    B = np.diag(diag) + np.diag(off[:-1], -1) + np.diag(off[:-1], 1)
    b = rng.standard_normal(n) + 1j * rng.standard_normal(n)
    scale = np.abs(B).max()
    for shift in (3.6 * scale, 1e-3 * scale, 1e-12 * scale, 1e-15 * scale, 1e-17 * scale,
                  1e-20 * scale):
        for mu in (shift, complex(shift, -0.9 * shift)):
            x = b.copy()
            if isinstance(mu, float):
                x = x.real.copy()
                tridiagonal_solve_real(diag, off, mu, x, np.empty(n))
                rhs = b.real
            else:
                re, im = x.real.copy(), x.imag.copy()
                tridiagonal_solve_complex(diag, off, mu.real, mu.imag, re, im, np.empty(n),
                                      np.empty(n))
                x = re + 1j * im
                rhs = b
            M = mu * np.eye(n) + B
            assert np.all(np.isfinite(x))
            # never larger than |b| / Re(mu), the bound of an accretive matrix
            assert np.linalg.norm(x) <= 2.0 * np.linalg.norm(rhs) / shift
            if shift < 1e-6 * scale:
                continue  # condition number 1e12 and beyond: NumPy's own answer is no reference
            # backward stable: the residual is rounding of the matrix and the solution's size
            residual = np.linalg.norm(M @ x - rhs)
            assert residual <= 1e-13 * (np.linalg.norm(M, 2) * np.linalg.norm(x) + np.linalg.norm(rhs))
            reference = np.linalg.solve(M, rhs)
            np.testing.assert_allclose(x, reference, rtol=0, atol=1e-12 * np.abs(reference).max())


@pytest.mark.parametrize("dropped", [False, True])
def test_newton_iteration_contracts_at_long_steps(dropped):
    """The simplified-Newton iteration of a Radau step, z -> z - S (mu I + A) z with S the
    package's solve (both systems: the real mu and the complex pair, through newton_update),
    contracts strongly down to mu / h = 1e-19 |A| (1e-14 with five active coordinates, below),
    as it must for Newton to converge at the
    long steps late in a run: the spectral radius of I - S (mu I + A), with (mu I + A) z formed
    in long double, stays below 0.1. A = X diag(h) X^T / n with h graded over 15 decades
    (n = 40, d = 200: numerically singular, k = N), or five coordinates at h ~ 1 and the others
    left out (``dropped``: k = 5 < N, the complement of V's range at 1 / mu). No factorization in float64 can do this
    where A has eigenvalues at its own rounding (eps |A|) above mu / h: there the eigenvalues
    themselves are unknown."""
    from ddln_fast import radau
    from ddln_fast.dual import DualIntegrator
    from ddln_fast.init import initial_layers
    from ddln_fast.problem import make_problem

    config = dual_config({"problem.n": 40, "problem.d": 200})
    problem = make_problem(config)
    it = DualIntegrator(problem, initial_layers(config, problem.d))
    n, d = problem.n, problem.d
    rng = np.random.default_rng(11)
    h = 10.0 ** -rng.uniform(0, 15, size=(2, d))
    if dropped:  # five active coordinates; A's null space (35 dimensions) is exactly zero
        h[:, :5] = rng.uniform(0.5, 2.0, size=(2, 5))
        h[:, 5:] = 0.0
    it._factor_jacobians(np.arange(2), h)
    assert (it.rank[0] < n) == dropped
    X = problem.X.astype(np.longdouble)
    A = (X * h[0].astype(np.longdouble)) @ X.T / n
    norm = float(np.linalg.norm(A.astype(float), 2))
    eye = np.eye(n, dtype=np.longdouble)
    # with A's null space exact, (mu I + A) z rounded to float64 carries eps |A| |z| there, which
    # any solve multiplies by 1 / mu: below mu = 1e-14 |A| that rounding, not the solve, decides
    for ratio in ((1e-12, 1e-13, 1e-14) if dropped else (1e-12, 1e-15, 1e-17, 1e-19)):
        step = radau.MU_REAL / (ratio * norm)
        # column j of each system's matrix, (mu I + A) e_j, as its transformed residual at W = 0
        real = (np.longdouble(radau.MU_REAL / step) * eye + A).astype(float)
        pair_re = (np.longdouble(radau.MU_COMPLEX_RE / step) * eye + A).astype(float)
        pair_im = (np.longdouble(radau.MU_COMPLEX_IM / step) * eye).astype(float)
        transformed = np.stack([real.T, pair_re.T, pair_im.T], axis=1)  # (column j, system, n)
        stage_f = np.ascontiguousarray(np.einsum("ki,jin->jkn", radau.T, transformed))
        W_inc, Z = np.zeros((n, 3, n)), np.zeros((n, 3, n))
        radau.NEWTON_UPDATE_KERNELS[0](stage_f, W_inc, Z, *it._jacobian(), np.zeros(n, dtype=np.int64),
                                       np.full(n, 1.0 / step), np.ones(n, dtype=np.uint8),
                                       np.full((n, radau.WORK_VECTORS, n), np.nan))
        for iteration in (np.eye(n) - W_inc[:, 0].T,
                          np.eye(n) - (W_inc[:, 1] + 1j * W_inc[:, 2]).T):
            radius = np.abs(np.linalg.eigvals(iteration)).max()
            assert radius < 0.1, (ratio, radius)


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_limit_is_the_predicted_bregman_projection(depth):
    """Run until the loss is below 1e-28 (theta within ~1e-13 of the interpolator it converges
    to), then compare with predict_limit (dual Newton, tolerance 1e-12): 1e-10 relative."""
    from ddln_fast import predict_limit, simulate

    config = dual_config({"model.depth": depth, "integrator.t_end": 1e6, "integrator.loss_tol": 1e-28,
                          "run.spacing": "log", "run.checkpoints": 20})
    run = simulate(config)
    assert np.all(run.loss[-1] < 1e-28)
    limit = predict_limit(config)
    for s in range(config.run.seeds):
        assert np.abs(run.theta[-1, s] - limit[s]).max() / np.abs(limit[s]).max() < 1e-10


def min_l1_interpolator(X, y):
    """argmin ||theta||_1 subject to X theta = y (scipy linprog, theta = p - m, p, m >= 0)."""
    n, d = X.shape
    res = linprog(np.ones(2 * d), A_eq=np.hstack([X, -X]), b_eq=y, bounds=(0, None), method="highs")
    assert res.status == 0
    return res.x[:d] - res.x[d:]


def test_depth_two_tiny_scale_reaches_the_minimum_l1_interpolator():
    """Depth 2, first layer zero, alpha = 1e-60: alpha^2 underflows nothing (log-scaled clock
    map), the plateaus last ~ log(1/alpha); the limit is the minimum-l1 interpolator up to terms
    of order alpha^c, far below 1e-10. Coordinates that activated on the way and must return to
    zero do so like 1/t (h_i ~ 2 |theta_i|), so the run goes on to t ~ 1e13 (loss ~ 1/t^2)."""
    from ddln_fast import simulate

    config = dual_config({"model.depth": 2, "model.init": "first_layer_zero", "model.alpha": 1e-60,
                          "model.jitter": 0.0, "integrator.t_end": 1e16, "integrator.loss_tol": 1e-26,
                          "run.spacing": "log", "run.checkpoints": 30, "run.seeds": 1})
    run = simulate(config)
    assert run.loss[-1, 0] < 1e-26
    target = min_l1_interpolator(run.X, run.y)
    assert np.abs(run.theta[-1, 0] - target).max() / np.abs(target).max() < 1e-10


def test_depth_four_tiny_scale_activates_on_time_and_converges():
    """Depth 4, first layer zero, alpha = 1e-6: blow-up clocks at 1 / alpha^2 = 1e12, where a
    float64 clock is known to 1e-4 only (such runs used to stop improving at loss ~4).

    - Hand-derived activation: the three equal layers w and the first r keep w^2 - r^2 = alpha^2,
      and dr/ds = w^3 gives s(r) = r / (alpha^2 sqrt(r^2 + alpha^2)), theta = r w^3. Until the
      first activation theta is ~0, so s_i(t) = -t (X^T y / n)_i: the first coordinate reaches
      |theta| = level at t = s(r_level) / |X^T y / n|_i (to O(1) clock units in 1e12).
    - The run reaches loss 1e-12, and its end is the minimum-l1 interpolator (scipy linprog):
      at depth 4 the limit's distance to it shrinks like alpha^2."""
    from ddln_fast import simulate
    from ddln_fast.events import read_events

    alpha, level = 1e-6, 0.05
    config = dual_config({"model.depth": 4, "model.init": "first_layer_zero", "model.alpha": alpha,
                          "model.jitter": 0.0, "integrator.t_end": 1e20, "integrator.loss_tol": 1e-26,
                          "integrator.activation_level": level, "run.seeds": 2,
                          "problem.per_seed_data": True})
    run = simulate(config)
    assert set(run.status_names()) == {"loss_tol"}
    events = read_events(run)
    r_level = brentq(lambda r: r * (r * r + alpha * alpha) ** 1.5 - level, 0.0, 10.0, xtol=1e-300,
                     rtol=1e-15)
    s_level = r_level / (alpha * alpha * np.sqrt(r_level * r_level + alpha * alpha))
    for seed in range(2):
        X, y = run.X[seed], run.y[seed]
        rate = np.abs(X.T @ y) / X.shape[0]
        first = int(np.argmax(rate))
        assert np.nanargmin(events.activation_time[seed]) == first
        assert abs(events.activation_time[seed, first] * rate[first] / s_level - 1.0) < 1e-9
        target = min_l1_interpolator(X, y)
        assert np.abs(run.theta[-1, seed] - target).max() / np.abs(target).max() < 1e-8


def test_loss_never_rises_beyond_the_tolerance_at_long_steps():
    """A gradient flow's loss never rises. Depth 4 at alpha = 1e-6 (per-seed data): after the
    activations the steps grow to 1e15 and more, where the error estimate (filtered by
    (I - h gamma J)^-1) sees almost nothing; such runs used to accept steps whose residual
    grew 1e3-fold (loss 2.8e-15 -> 5.8e-10) and left theta off by 3e-5 in checkpoints long
    after the flow had converged. Between checkpoints ||X theta - y|| may grow only by what
    errors within the tolerances can do, ||X||_2 ||atol + rtol |theta| ||, allowed tenfold
    (several steps per interval), plus rounding."""
    from ddln_fast import simulate

    rtol, atol = DUAL["integrator.rtol"], DUAL["integrator.atol"]
    config = dual_config({"model.depth": 4, "model.init": "first_layer_zero", "model.alpha": 1e-6,
                          "model.jitter": 0.0, "integrator.t_end": 1e16, "run.seeds": 2,
                          "run.spacing": "log", "run.checkpoints": 80, "problem.per_seed_data": True})
    run = simulate(config)
    n = run.X.shape[1]
    for seed in range(2):
        X = run.X[seed]
        residual = np.sqrt(2 * n * run.loss[:, seed])
        theta = run.theta[:, seed]
        allowed = 10 * np.linalg.norm(X, 2) * np.linalg.norm(atol + rtol * np.abs(theta[1:]), axis=1) + 1e-12
        rise = np.diff(residual)
        assert np.all(rise <= allowed), (seed, run.t[1:][rise > allowed], rise[rise > allowed])
    assert run.loss[-1].max() < 1e-18


def test_orthogonal_design_depth_two_balanced_is_logistic(write_npz):
    """X^T X / n = I decouples the coordinates; balanced depth 2 (u = alpha, theta0 = alpha^2)
    follows theta_i(t) = theta*_i theta0 / (theta0 + (theta*_i - theta0) e^{-2 theta*_i t})."""
    import warnings

    from ddln_fast import simulate

    n = d = 8
    rng = np.random.default_rng(2)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    X = np.sqrt(n) * Q
    star = np.array([1.5, -0.7, 0.3, 2.0, -1.2, 0.05, 0.9, -0.4])
    path = write_npz("orthogonal.npz", X=X, y=X @ star)
    alpha = 0.1
    config = dual_config({"problem.kind": "file", "problem.path": path, "model.depth": 2,
                          "model.init": "balanced", "model.alpha": alpha, "model.jitter": 0.0,
                          "model.signs": "positive", "integrator.t_end": 20.0, "run.seeds": 1,
                          "run.checkpoints": 11})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sign trap: intended here
        run = simulate(config)
    theta0 = alpha ** 2
    for k, t in enumerate(run.t):
        exact = star * theta0 / (theta0 + (star - theta0) * np.exp(-2 * star * t))
        np.testing.assert_allclose(run.theta[k, 0], exact, rtol=1e-8, atol=1e-14)


# --- invariants -----------------------------------------------------------------------------------

def test_invariant_drift_is_computed_from_the_recovered_layers():
    """The stored drift is the drift of the stored layers (recomputed pair by pair here, to a
    few ulps of u^2), at rounding level for layers recovered from the clocks, and not a zero
    written in: with layers of size ~30 (theta ~ 1e3) the rounding of u^2 shows."""
    from ddln_fast import simulate

    config = dual_config({"model.depth": 2, "problem.noise": 0.0, "model.alpha": 0.7,
                          "integrator.t_end": 1.0})
    run = simulate(config)
    recomputed = invariant_drift(run.u, run.u0[None])
    ulp = np.finfo(np.float64).eps * np.max(run.u ** 2, axis=(2, 3))
    assert np.all(np.abs(run.invariant_drift - recomputed) <= 4 * ulp)
    assert np.all(run.invariant_drift <= 8 * ulp)
    big = dual_config({"model.depth": 2, "model.alpha": 30.0, "integrator.t_end": 1e-3})
    run = simulate(big)
    assert np.any(run.invariant_drift[1:] > 0)
    recomputed = invariant_drift(run.u, run.u0[None])
    ulp = np.finfo(np.float64).eps * np.max(run.u ** 2, axis=(2, 3))
    assert np.all(np.abs(run.invariant_drift - recomputed) <= 4 * ulp)


# --- events ---------------------------------------------------------------------------------------

def reference_crossings(X, y, u0, t_end, level):
    """First times with |theta_i| >= level (per coordinate) and f < 10^k (per decade k), from
    DOP853's dense output of the layer flow: sign changes on its steps, then brentq."""
    L, d = u0.shape
    sol = solve_ivp(layer_flow_rhs(X, y, L), (0.0, t_end), u0.ravel(), method="DOP853",
                    rtol=REFERENCE_RTOL, atol=REFERENCE_ATOL, dense_output=True)
    theta = lambda t: sol.sol(t).reshape(L, d).prod(axis=0)  # noqa: E731
    loss = lambda t: float(np.sum((X @ theta(t) - y) ** 2)) / (2 * X.shape[0])  # noqa: E731
    ts = sol.t
    values = np.array([theta(t) for t in ts])
    activation = np.full(d, np.nan)
    for i in range(d):
        above = np.flatnonzero(np.abs(values[:, i]) >= level)
        if above.size and above[0] > 0:
            k = above[0]
            activation[i] = brentq(lambda t: abs(theta(t)[i]) - level, ts[k - 1], ts[k], xtol=1e-14,
                                   rtol=1e-15)
    losses = np.array([loss(t) for t in ts])
    decades = {}
    for k in range(0, -9, -1):
        below = np.flatnonzero(losses < 10.0 ** k)
        if below.size and below[0] > 0:
            j = below[0]
            decades[k] = brentq(lambda t: np.log(loss(t)) - k * np.log(10), ts[j - 1], ts[j],
                                xtol=1e-14, rtol=1e-15)
    return activation, decades


def test_activation_and_loss_decade_times_match_dop853():
    """Saddle-to-saddle at depth 2, alpha = 1e-3: coordinates activate one after another. The
    events located on the dual method's dense output agree with the reference's root-finds to
    1e-8 relative: 100 times the tolerance rtol = 1e-10, for the dense output's lower order
    between steps (measured: 1.7e-9, and 1.4e-8 at rtol = 1e-8)."""
    from ddln_fast import open_run, simulate
    from ddln_fast.events import read_events

    level = 0.3
    config = dual_config({"model.depth": 2, "model.init": "first_layer_zero", "model.alpha": 1e-3,
                          "model.jitter": 0.0, "integrator.t_end": 60.0, "run.seeds": 1,
                          "integrator.activation_level": level})
    run = simulate(config)
    events = read_events(run)
    activation, decades = reference_crossings(run.X, run.y, run.u0[0], 60.0, level)
    assert np.sum(np.isfinite(activation)) >= 2, "the test needs activations"
    np.testing.assert_array_equal(np.isfinite(events.activation_time[0]), np.isfinite(activation))
    found = np.isfinite(activation)
    np.testing.assert_allclose(events.activation_time[0, found], activation[found], rtol=1e-8)
    for k, t in decades.items():
        got = events.decade_time[0, list(events.decades).index(k)]
        assert abs(got - t) <= 1e-8 * t, (k, got, t)
    assert events.level[0] == level


def test_loss_decade_times_in_the_s_form_match_dop853():
    """d < n with noise: the loss has a floor (the part of y outside the range of X), which the
    s-form adds to the loss of its d residuals; the decades above that floor are crossed at the
    times a root search on DOP853's dense output of the layer flow finds (1e-7 relative)."""
    from ddln_fast import simulate
    from ddln_fast.events import read_events

    config = dual_config({**TALL, "problem.noise": 0.01, "model.depth": 2, "model.init": "first_layer_zero",
                          "model.alpha": 1e-3, "model.jitter": 0.0, "integrator.t_end": 60.0,
                          "integrator.rtol": 1e-10, "run.seeds": 1})
    run = simulate(config)
    assert "s-form" in run.file.attrs["dual_state"]
    events = read_events(run)
    _, decades = reference_crossings(run.X, run.y, run.u0[0], 60.0, 0.3)
    assert len(decades) >= 3, "the test needs loss decades above the floor"
    # 1e-7: as the loss flattens towards its floor, a clock error moves the crossing further
    for k, t in decades.items():
        got = events.decade_time[0, list(events.decades).index(k)]
        assert abs(got - t) <= 1e-7 * t, (k, got, t)


def test_default_activation_level_is_a_fraction_of_the_predicted_limit():
    from ddln_fast import predict_limit, simulate
    from ddln_fast.events import ACTIVATION_FRACTION, read_events

    config = dual_config({"model.depth": 3})
    run = simulate(config)
    limit = predict_limit(config)
    np.testing.assert_allclose(read_events(run).level, ACTIVATION_FRACTION * np.abs(limit).max(axis=1),
                               rtol=1e-12)


# --- resume ------------------------------------------------------------------------------------

@pytest.mark.parametrize("evaluations, data", [(0, {}), (2, {}), (2, TALL)])
def test_stop_then_resume_is_bit_identical(tmp_path, evaluations, data):
    """Reference: the same config run without interruption (threads = 1), byte for byte: every
    checkpoint, the events and the final state; also in the s-form (d < n)."""
    from faults_support import assert_same_run_file
    from test_resume import stop_request

    from ddln_fast.simulate import run_simulation

    config = dual_config({"model.depth": 3, "model.init": "first_layer_zero", "model.alpha": 0.05,
                          "model.jitter": 0.0, "model.signs": "random", "integrator.t_end": 400.0,
                          "integrator.rtol": 1e-8, "run.checkpoints": 9, **data})
    reference = tmp_path / "reference.h5"
    run_simulation(config, reference, threads=1).run.close()
    out = tmp_path / "stopped.h5"
    report = run_simulation(config, out, threads=1,
                            on_checkpoint=stop_request(4, evaluations, product="losses"))
    report.run.close()
    assert report.interrupted == "SIGINT"
    resumed = run_simulation(config, out, resume=True, threads=1)
    resumed.run.close()
    assert resumed.resumed_from == 4
    assert_same_run_file(reference, out)


def test_resuming_a_file_with_another_saved_state_is_refused(tmp_path):
    """A run file whose saved solver state lacks arrays this version keeps (here: a dual run
    written before its clocks and time became double-doubles, without s_lo and t_lo) cannot
    continue: one InputError naming the arrays, and the file is left as it was."""
    import h5py
    from test_resume import stop_request

    from ddln_fast.errors import InputError
    from ddln_fast.simulate import run_simulation

    config = dual_config({"model.depth": 3, "integrator.t_end": 50.0, "run.checkpoints": 6})
    out = tmp_path / "old.h5"
    run_simulation(config, out, threads=1, on_checkpoint=stop_request(2, 0)).run.close()
    with h5py.File(out, "r+") as f:
        for slot in f["state"].values():
            for name in ("s_lo", "t_lo"):
                if name in slot:
                    del slot[name]
    before = out.read_bytes()
    with pytest.raises(InputError, match=r"saved dual state \(s_lo, t_lo\).*without --resume"):
        run_simulation(config, out, resume=True, threads=1)
    assert out.read_bytes() == before
    # also when the resume would extend the run (which writes to the file): refused first
    with pytest.raises(InputError, match="cannot be resumed"):
        run_simulation(config.with_overrides({"integrator.t_end": 80.0}), out, resume=True, threads=1)
    assert out.read_bytes() == before


def test_extending_t_end_and_loss_tol_continues_the_dual_flow(tmp_path):
    """A dual run to t = 1, extended to t = 3 (--resume with a larger t_end), ends where DOP853
    on the layer flow does; then a run stopped at loss 1e-3 continues below 1e-6 when the
    tolerance is lowered, its loss-decade events carrying on."""
    from ddln_fast import open_run
    from ddln_fast.events import read_events
    from ddln_fast.simulate import run_simulation

    config = dual_config({"integrator.t_end": 1.0})
    out = tmp_path / "run.h5"
    run_simulation(config, out, threads=1).run.close()
    run_simulation(config.with_overrides({"integrator.t_end": 3.0}), out, resume=True, threads=1).run.close()
    with open_run(out) as run:
        assert run.complete and run.t[-1] == 3.0
        for s in range(config.run.seeds):
            X = run.X[s] if run.X.ndim == 3 else run.X
            y = run.y[s] if run.y.ndim == 2 else run.y
            expected = reference_layers(X, y, run.u0[s], np.array([0.0, 3.0]))[-1]
            assert np.abs(run.u[-1, s] - expected).max() / np.abs(expected).max() < TRAJECTORY_TOLERANCE
    config = dual_config({"integrator.t_end": 1e4, "integrator.loss_tol": 1e-3})
    out = tmp_path / "loss.h5"
    run_simulation(config, out, threads=1).run.close()
    run_simulation(config.with_overrides({"integrator.loss_tol": 1e-6}), out, resume=True, threads=1).run.close()
    with open_run(out) as run:
        assert set(run.status_names()) == {"loss_tol"} and np.all(run.loss[-1] < 1e-6)
        events = read_events(run)
        below = events.decade_time[:, list(events.decades).index(-6)]
        assert np.all(np.isfinite(below)) and np.all(below <= run.t_seed[-1])


# --- bad input and limits ------------------------------------------------------------------------

def test_scales_beyond_the_float64_limit_are_refused():
    """Blow-up clocks grow like alpha^(2-L): depth 4, first layer zero, has them at exactly
    1 / alpha^2: 1e17 at alpha = 10^-8.5, beyond the limit 1e16, and 6.25e15 at alpha =
    1.25e-8, accepted; depth 2 has no blow-up and takes alpha = 1e-300."""
    from ddln_fast.errors import InputError
    from ddln_fast.simulate import run_simulation

    flz = {"model.init": "first_layer_zero", "model.jitter": 0.0, "run.seeds": 1}
    with pytest.raises(InputError, match=r"blow-up clock of 1e\+17 .* limit 1e\+16"):
        run_simulation(dual_config({**flz, "model.depth": 4, "model.alpha": 10 ** -8.5}), None)
    run_simulation(dual_config({**flz, "model.depth": 4, "model.alpha": 1.25e-8, "integrator.t_end": 1.0}),
                   None)
    run = run_simulation(dual_config({**flz, "model.depth": 2, "model.alpha": 1e-300,
                                      "integrator.t_end": 1.0}), None).run
    assert np.all(np.isfinite(run.theta))


@pytest.mark.parametrize("key, value, word", [("run.dtype", "float32", "float64"),
                                              ("integrator.atol", 0.0, "atol")])
def test_settings_the_dual_method_cannot_honour(key, value, word):
    from ddln_fast.errors import InputError

    with pytest.raises(InputError, match=word):
        dual_config({key: value})


def test_cli_refuses_with_one_line(tmp_path):
    from faults_support import ddln

    out = tmp_path / "x.h5"
    proc = ddln("run", "--set", "integrator.method=dual", "--set", "run.dtype=float32", "-o", str(out))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "float64" in proc.stderr
    assert not out.exists()
    proc = ddln("run", "--set", "integrator.method=dual", "--set", "model.depth=5", "--set",
                "model.alpha=1e-6", "-o", str(out))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "1e+16" in proc.stderr
    assert not out.exists()


def test_cli_names_the_form_of_the_dual_state(tmp_path):
    """ddln run and ddln inspect say which state the dual method integrated: the s-form at
    d < n, nu at d >= n."""
    from faults_support import ddln

    for n, d, form in ((30, 8, "s-form: mu = Q^T nu in R^d"), (8, 30, "nu in R^n")):
        out = tmp_path / f"run{n}.h5"
        proc = ddln("run", "--set", "integrator.method=dual", "--set", f"problem.n={n}", "--set",
                    f"problem.d={d}", "--set", "integrator.t_end=1", "-o", str(out), "--threads", "1")
        assert proc.returncode == 0, proc.stderr
        assert f"dual state: {form}" in proc.stdout and f"n = {n}" in proc.stdout
        proc = ddln("inspect", str(out))
        assert f"dual_state: {form}" in proc.stdout


def test_analyze_prints_the_events_of_a_dual_run(tmp_path):
    import json

    from faults_support import ddln

    out = tmp_path / "run.h5"
    proc = ddln("run", "--set", "integrator.method=dual", "--set", "problem.n=10", "--set", "problem.d=30",
                "--set", "model.alpha=0.05", "--set", "run.seeds=2", "--set", "integrator.t_end=2000",
                "--set", "integrator.loss_tol=1e-10", "-o", str(out), "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    proc = ddln("analyze", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "activated" in proc.stdout and "loss below" in proc.stdout
    proc = ddln("analyze", str(out), "--json")
    data = json.loads(proc.stdout)
    assert len(data["events"]["seeds"]) == 2
    assert all(seed["activated"] for seed in data["events"]["seeds"])


# --- the difference and power parametrizations ----------------------------------------------------

@pytest.mark.parametrize("name, depth, power", [("difference", 2, 0.0), ("difference", 3, 0.0),
                                                ("power", 1, 2.0), ("power", 1, 2.5), ("power", 1, 3.0)])
def test_dual_method_for_the_difference_and_power_parametrizations(name, depth, power):
    """The dual method on the parametrized clock map against DOP853 on the flattened layer flow
    of the parametrization (references.parametrized_reference_layers): layers and theta at the
    checkpoints to 1e-8 relative; a long run ends at predict_limit; the drift of each half
    (power: its conserved quantity) stays at rounding."""
    from ddln_fast import predict_limit, simulate
    from references import parametrized_reference_layers, parametrized_theta

    model = {"model.parametrization": name, "model.depth": depth, "model.power": power}
    if name == "power":
        model.update({"model.signs": "positive", "model.jitter": 0.2})
    config = dual_config({**model, "integrator.t_end": 3.0, "run.checkpoints": 4})
    run = simulate(config)
    for s in range(config.run.seeds):
        ref = parametrized_reference_layers(run.X, run.y, run.u0[s], run.t, name, power)
        np.testing.assert_allclose(run.u[:, s], ref, rtol=0, atol=TRAJECTORY_TOLERANCE * np.abs(ref).max())
        theta_ref = np.array([parametrized_theta(name, U, power) for U in ref])
        assert np.abs(theta_ref[-1] - theta_ref[0]).max() > 0.1 * np.abs(theta_ref).max()  # theta moved
        np.testing.assert_allclose(run.theta[:, s], theta_ref, rtol=0,
                                   atol=TRAJECTORY_TOLERANCE * np.abs(theta_ref).max())
        assert np.all(run.invariant_drift[:, s] < 1e-10)
    long = dual_config({**model, "integrator.t_end": 1e4, "integrator.loss_tol": 1e-24,
                        "run.checkpoints": 3, "run.spacing": "log"})
    run = simulate(long)
    assert np.all(run.loss[-1] < 1e-24)
    limit = predict_limit(long)
    # the two seeds' initializations pick different interpolators: the limit depends on them
    assert np.abs(limit[0] - limit[1]).max() > 1e-4 * np.abs(limit).max()
    np.testing.assert_allclose(run.theta[-1], limit, rtol=0, atol=1e-8 * np.abs(limit).max())
