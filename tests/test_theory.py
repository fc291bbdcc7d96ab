"""theory.py (the mirror geometry on the clock map) and prediction.py against independent
references.

References (written here, not taken from the package):
- ``quad_psi``: the mirror map psi(s) = int_0^s dr / prod_k sqrt(r^2 + delta_k) by scipy's quad;
- the depth-2 closed forms of docs/theory.md, "Closed forms": phi = (1/2) arcsinh(2 theta / delta),
  h = sqrt(delta^2 + 4 theta^2), and the clock map theta(tau) = ((a+b)^2 e^{-2 tau} - (a-b)^2 e^{2 tau}) / 4;
- ``layer_ode``: the clock flow du^j/dtau = -prod_{k != j} u^k solved by scipy's solve_ivp (DOP853,
  rtol 1e-12), and the layer gradient flow augmented with the clock dtau/dt = g(theta);
- ``naive_h``: h from the layers, sum_j prod_{k != j} (u^k)^2, as a loop over layers;
- ``smallest_layer``: the unique smallest layer s with theta = sigma s prod_k sqrt(s^2 + delta_k),
  by scipy's brentq (the geometry under (A): phi(theta) = sign(theta) psi(|s|));
- scipy's linprog (HiGHS) on the split LP for the (weighted) minimum-l1 interpolator.
Tolerances: quad's 1e-13 relative, solve_ivp's rtol 1e-12 over O(1) clock times (-> 1e-9), the
dopri5 tolerance of the runs (rtol 1e-11 -> 1e-7 on limits reached at t ~ 1e3).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.integrate import quad, solve_ivp
from scipy.optimize import linprog

from ddln_fast import Config, InputError, simulate
from ddln_fast.prediction import min_l1_interpolator, predict, predict_limit, weighted_l1_interpolator
from ddln_fast.theory import Geometry, assumption_a, clock_flow


# -- references -----------------------------------------------------------------------------------
def quad_psi(s, gaps):
    f = lambda r: 1.0 / np.prod(np.sqrt(r * r + gaps))  # noqa: E731
    edges = [0.0] + sorted(p for p in np.sqrt(gaps) if p < abs(s)) + [abs(s)]
    total = sum(quad(f, lo, hi, epsabs=0, epsrel=1e-13, limit=400)[0] for lo, hi in zip(edges[:-1], edges[1:]))
    return np.sign(s) * total


def naive_h(u):
    """u of shape (L, ...): sum_j prod_{k != j} u_k^2."""
    L = u.shape[0]
    out = np.zeros(u.shape[1:])
    for j in range(L):
        term = np.ones(u.shape[1:])
        for k in range(L):
            if k != j:
                term = term * u[k] ** 2
        out += term
    return out


def clock_ode(u0_col, tau):
    """theta(tau) of one coordinate by solve_ivp on du^j/dtau = -prod_{k != j} u^k."""
    L = len(u0_col)

    def rhs(_, u):
        return np.array([-np.prod(np.delete(u, j)) for j in range(L)])

    sol = solve_ivp(rhs, (0.0, tau), u0_col, method="DOP853", rtol=1e-12, atol=1e-14)
    return np.prod(sol.y[:, -1])


def smallest_layer(theta, u0_col):
    """s with theta = sigma s prod_{k != j*} sqrt(s^2 + delta_k) for one coordinate under (A)."""
    from scipy.optimize import brentq

    mags = np.abs(u0_col)
    j = int(np.argmin(mags))
    others = np.delete(u0_col, j)
    gaps = others ** 2 - u0_col[j] ** 2
    sigma = np.prod(np.sign(others))
    f = lambda s: sigma * s * np.prod(np.sqrt(s * s + gaps)) - theta  # noqa: E731
    hi = 1.0
    while f(hi) * f(-hi) > 0:
        hi *= 2
    return brentq(f, -hi, hi, xtol=1e-300, rtol=1e-15, maxiter=500), gaps


def psi_of_theta(theta, u0_col):
    """phi(theta) with phi(0) = 0: sign(theta) psi(|s(theta)|) by quad."""
    s, gaps = smallest_layer(theta, u0_col)
    return np.sign(theta) * quad_psi(abs(s), gaps)


def random_layers(rng, L, d, low=0.2, high=1.5):
    return rng.uniform(low, high, (L, d)) * rng.choice([-1.0, 1.0], (L, d))


def lp_l1(X, y, w_plus, w_minus):
    d = X.shape[1]
    res = linprog(np.concatenate([w_plus, w_minus]), A_eq=np.hstack([X, -X]), b_eq=y, bounds=(0, None),
                  method="highs")
    return res.x[:d] - res.x[d:]


# -- closed forms ---------------------------------------------------------------------------------
def test_depth2_closed_forms():
    """phi, h, Q (normalized at theta0) and the clock map against the closed forms."""
    rng = np.random.default_rng(20)
    u0 = random_layers(rng, 2, 7)
    geo = Geometry.from_layers(u0)
    a, b = u0
    delta = np.abs(a ** 2 - b ** 2)
    theta0 = a * b
    theta = rng.normal(size=7) * 3
    phi = lambda x: 0.5 * np.arcsinh(2 * x / delta)  # noqa: E731
    np.testing.assert_allclose(geo.mirror_map(theta, 0), phi(theta) - phi(theta0), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(geo.h(theta, 0), np.sqrt(delta ** 2 + 4 * theta ** 2), rtol=1e-13)
    # potential: Q(theta) = int_theta0^theta (phi - phi(theta0)), by quad of the closed-form phi
    Q_ref = [quad(lambda x: 0.5 * np.arcsinh(2 * x / dl) - 0.5 * np.arcsinh(2 * t0 / dl), t0, t,
                  epsabs=0, epsrel=1e-13)[0] for t, t0, dl in zip(theta, theta0, delta)]
    np.testing.assert_allclose(geo.potential(theta, 0), Q_ref, rtol=1e-11, atol=1e-15)
    for tau in (-0.7, 0.4, 2.0):
        ref = ((a + b) ** 2 * np.exp(-2 * tau) - (a - b) ** 2 * np.exp(2 * tau)) / 4
        got = geo.evaluate(np.full(7, tau), 0)[0]
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)
    assert np.all(np.isinf(geo.blow_up[0])) and np.all(np.isinf(geo.blow_up[1]))


@pytest.mark.parametrize("L", [3, 4, 5, 7])
def test_mirror_map_and_bound_vs_quadrature(L):
    """depth 3: elliptic integrals; depth >= 4: the quadrature table; both against quad."""
    rng = np.random.default_rng(30 + L)
    u0 = random_layers(rng, L, 6, 0.05, 1.5)
    geo = Geometry.from_layers(u0)
    theta0 = np.prod(u0, axis=0)
    theta = np.concatenate([rng.normal(size=3) * 2, [1e-7, -40.0, 3e3]])
    phi0 = np.array([psi_of_theta(t0, u0[:, i]) for i, t0 in enumerate(theta0)])
    ref = np.array([psi_of_theta(t, u0[:, i]) for i, t in enumerate(theta)]) - phi0
    np.testing.assert_allclose(geo.mirror_map(theta, 0), ref, rtol=1e-12, atol=1e-14)
    # the blow-up clocks are the ends of the dual range phi - phi0 in (-b - phi0, b - phi0)
    bound_ref = np.array([quad_psi(np.inf, smallest_layer(0.0, u0[:, i])[1]) for i in range(6)])
    np.testing.assert_allclose(geo.blow_up[0][0], phi0 - bound_ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(geo.blow_up[1][0], phi0 + bound_ref, rtol=1e-12, atol=1e-14)
    # inverse: round trip, also close to the blow-up clocks
    lower, upper = geo.blow_up[0][0], geo.blow_up[1][0]
    s = lower + np.array([0.05, 0.25, 0.5, 0.65, 0.995, 0.9999995]) * (upper - lower)
    back = geo.clock(geo.evaluate(s, 0)[0], 0)
    np.testing.assert_allclose(back, s, rtol=1e-12, atol=1e-15)
    # Q = int_theta0^theta (phi - phi0) by quad over the mirror map
    i = 0
    Q_ref = quad(lambda x: geo.mirror_map(np.full(6, x), 0)[i], theta0[i], theta[i], epsabs=0, epsrel=1e-12)[0]
    np.testing.assert_allclose(geo.potential(theta, 0)[i], Q_ref, rtol=1e-10)


def test_equal_gaps_hypergeometric_vs_quadrature():
    u0 = np.full((5, 4), 0.3)
    u0[0] = 0.0  # first layer zero: all four gaps equal 0.09, theta0 = phi0 = 0
    geo = Geometry.from_layers(u0)
    theta = np.array([1e-6, 0.3, -5.0, 1e4])
    ref = [psi_of_theta(t, u0[:, 0]) for t in theta]
    np.testing.assert_allclose(geo.mirror_map(theta, 0), ref, rtol=1e-12)
    from scipy.special import gamma

    delta, L = 0.09, 5  # b = delta^{(2-L)/2} sqrt(pi) Gamma((L-2)/2) / (2 Gamma((L-1)/2))
    b = delta ** ((2 - L) / 2) * np.sqrt(np.pi) * gamma(1.5) / (2 * gamma(2.0))
    np.testing.assert_allclose(geo.blow_up[1][0], b, rtol=1e-13)
    np.testing.assert_allclose(geo.blow_up[0][0], -b, rtol=1e-13)


# -- h, mirror identity and the clock map along trajectories ------------------------------------
def small_problem(L, seeds=2, t_end=5.0, **model):
    tables = {"problem": {"n": 5, "d": 10, "sparsity": 3, "per_seed_data": False},
              "model": {"depth": L, "alpha": 0.7, "init": "gaussian", "jitter": 0.5, "signs": "random", **model},
              "integrator": {"rtol": 1e-11, "atol": 1e-14, "t_end": t_end},
              "run": {"seeds": seeds, "checkpoints": 12}}
    return Config.from_dict(tables)


@pytest.mark.parametrize("L", [2, 3, 4])
def test_h_from_theta_equals_h_from_layers(L):
    run = simulate(small_problem(L))
    geo = Geometry.from_layers(run.u0)
    for s in range(2):
        u = run.u[:, s]  # (K, L, d)
        np.testing.assert_allclose(geo.h(run.theta[:, s], s), naive_h(np.moveaxis(u, 1, 0)), rtol=1e-10)
        # the layers rebuilt from theta are the simulated ones (invariants)
        np.testing.assert_allclose(geo.layers(run.theta[:, s], s), u, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("L", [2, 3, 5])
def test_mirror_identity_with_carried_clock(L):
    """phi(theta(t)) - phi(theta0) = -int_0^t g: the layer flow with tau' = g, by solve_ivp."""
    rng = np.random.default_rng(40 + L)
    n, d = 4, 7
    X = rng.normal(size=(n, d))
    y = rng.normal(size=n)
    u0 = random_layers(rng, L, d, 0.3, 1.2)

    def rhs(_, z):
        u = z[: L * d].reshape(L, d)
        g = X.T @ (X @ np.prod(u, axis=0) - y) / n
        du = np.array([-g * np.prod(np.delete(u, j, axis=0), axis=0) for j in range(L)])
        return np.concatenate([du.ravel(), g])

    times = [0.5, 2.0, 6.0]
    sol = solve_ivp(rhs, (0, times[-1]), np.concatenate([u0.ravel(), np.zeros(d)]), method="DOP853",
                    rtol=1e-12, atol=1e-14, t_eval=times)
    geo = Geometry.from_layers(u0)
    for k in range(len(times)):
        theta = np.prod(sol.y[: L * d, k].reshape(L, d), axis=0)
        tau = sol.y[L * d:, k]
        np.testing.assert_allclose(geo.mirror_map(theta, 0), -tau, atol=1e-9)
        clock = geo.evaluate(tau, 0)[0]
        np.testing.assert_allclose(clock, theta, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("L", [3, 4])
def test_clock_map_vs_layer_ode_and_blow_up_both_ways(L):
    rng = np.random.default_rng(50 + L)
    u0 = random_layers(rng, L, 3, 0.3, 1.2)
    geo = Geometry.from_layers(u0)
    for i in range(3):
        lo, hi = geo.blow_up[0][0, i], geo.blow_up[1][0, i]  # tau range without blow-up
        for frac in (0.05, 0.5, 0.9):
            for tau in (lo + frac * (hi - lo),):
                got = geo.evaluate(np.full(3, tau), 0)[0]
                assert np.isfinite(got[i])
                assert abs(got[i] - clock_ode(u0[:, i], tau)) <= 1e-8 * max(1.0, abs(got[i]))
        for tau in (hi * 1.0001 + 1e-3, lo * 1.0001 - 1e-3):
            got = geo.evaluate(np.full(3, tau), 0)[0]
            assert np.isinf(got[i])
            # the reference ODE blows up before tau: it cannot reach it with bounded layers
            event = lambda _, u: np.max(np.abs(u)) - 1e6  # noqa: E731
            event.terminal = True
            rhs = lambda _, u: np.array([-np.prod(np.delete(u, j)) for j in range(L)])  # noqa: E731
            sol = solve_ivp(rhs, (0, tau), u0[:, i], method="DOP853", rtol=1e-10, atol=1e-12, events=event)
            assert sol.status == 1 and abs(sol.t[-1]) < abs(tau)


@pytest.mark.parametrize("L", [2, 3, 4, 6])
def test_clock_flow_integrator_equals_mirror_inverse(L):
    """Two routes to F(tau): dopri5 on the clock flow (package tableau, rtol 1e-11) and the
    inverse mirror map; they agree to 1e-8 up to 98% of the way to the blow-up clock times, and
    both flag blow-up past them in either direction; solve_ivp checks one coordinate."""
    rng = np.random.default_rng(60 + L)
    u0 = random_layers(rng, L, 6, 0.3, 1.2)
    geo = Geometry.from_layers(u0)
    lo = np.where(np.isinf(geo.blow_up[0][0]), -3.0, geo.blow_up[0][0])
    hi = np.where(np.isinf(geo.blow_up[1][0]), 3.0, geo.blow_up[1][0])
    for frac in (0.02, 0.3, 0.7, 0.98):
        tau = lo + frac * (hi - lo)
        got, blown = clock_flow(u0, tau)
        ref = geo.evaluate(tau, 0)[0]
        assert not blown.any() and np.all(np.isfinite(ref))
        np.testing.assert_allclose(got, ref, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(got[0], clock_ode(u0[:, 0], tau[0]), rtol=1e-8)
    if L >= 3:
        for tau in (hi + 0.01, lo - 0.01):
            got, blown = clock_flow(u0, tau)
            assert blown.all() and np.all(np.isinf(got))


# -- the implicit-bias limit ---------------------------------------------------------------------
@pytest.mark.parametrize("L", [2, 3, 4])
def test_predict_limit_equals_long_dopri5_run(L):
    cfg = small_problem(L, t_end=2000.0, seeds=2).with_overrides({"problem.per_seed_data": True,
                                                                   "run.checkpoints": 4})
    run = simulate(cfg)
    assert np.all(run.loss[-1] < 1e-18)
    limit = predict_limit(cfg)
    for s in range(2):
        rel = np.linalg.norm(run.theta[-1, s] - limit[s]) / np.linalg.norm(limit[s])
        assert rel <= 1e-7, (L, s, rel)
        # the limit interpolates, and satisfies KKT: phi(theta) - phi(theta0) in range(X^T)
        X, y = run.X[s], run.y[s]
        np.testing.assert_allclose(X @ limit[s], y, atol=1e-10)
        geo = Geometry.from_layers(run.u0[s])
        kkt = geo.mirror_map(limit[s], 0)
        null_part = kkt - X.T @ np.linalg.lstsq(X.T, kkt, rcond=None)[0]
        assert np.linalg.norm(null_part) <= 1e-9 * max(1.0, np.linalg.norm(kkt))


def test_more_samples_than_dimensions_projects_onto_least_squares():
    cfg = Config.from_dict({"problem": {"n": 9, "d": 5, "sparsity": 2, "noise": 0.3, "per_seed_data": False},
                            "model": {"depth": 3, "alpha": 0.5}, "run": {"seeds": 1}})
    pred = predict(cfg)
    assert pred.projected and "least-squares" in pred.message
    from ddln_fast.problem import make_problem

    p = make_problem(cfg)
    np.testing.assert_allclose(pred.theta[0], np.linalg.lstsq(p.X, p.y, rcond=None)[0], rtol=1e-10)


def test_balanced_init_is_flagged_and_theta_keeps_its_orthant():
    cfg = Config.from_dict({"problem": {"n": 5, "d": 10, "sparsity": 3},
                            "model": {"depth": 3, "alpha": 0.5, "init": "balanced", "signs": "random"},
                            "integrator": {"t_end": 50.0}, "run": {"seeds": 2, "checkpoints": 15}})
    from ddln_fast.init import initial_layers

    u0 = initial_layers(cfg, 10)
    assert assumption_a(u0[0]).violating.all()
    with pytest.raises(InputError, match="assumption \\(A\\)"):
        predict_limit(cfg)
    with pytest.warns(UserWarning, match="assumption \\(A\\)"):
        run = simulate(cfg)
    theta0 = np.prod(u0, axis=1)
    assert np.all(run.theta * np.sign(theta0)[None] >= 0)


def test_small_uniform_init_moves_toward_min_l1():
    """first_layer_zero, depth 3: the distance of the limit to the min-l1 LP solution shrinks
    monotonically as alpha decreases."""
    base = Config.from_dict({"problem": {"n": 8, "d": 24, "sparsity": 3, "seed": 3, "per_seed_data": False},
                             "model": {"depth": 3, "init": "first_layer_zero"}, "run": {"seeds": 1}})
    from ddln_fast.problem import make_problem

    p = make_problem(base)
    ref = lp_l1(p.X, p.y, np.ones(24), np.ones(24))
    np.testing.assert_allclose(min_l1_interpolator(p.X, p.y), ref, atol=1e-8)
    dist = [np.linalg.norm(predict_limit(base.with_overrides({"model.alpha": a}))[0] - ref)
            for a in (0.5, 0.1, 0.02)]
    assert dist[0] > dist[1] > dist[2], dist
    assert dist[2] < 0.05 * np.linalg.norm(ref)


def test_small_random_shape_init_approaches_weighted_l1():
    """Random-shape init, depth 3: weights b_i - sign(theta_i) phi_i(theta_0,i) are scale-free,
    and the limit approaches the weighted-l1 LP solution as alpha -> 0."""
    base = Config.from_dict({"problem": {"n": 6, "d": 16, "sparsity": 3, "seed": 5, "per_seed_data": False},
                             "model": {"depth": 3, "init": "gaussian", "jitter": 0.4, "signs": "random"},
                             "run": {"seeds": 1}})
    from ddln_fast.init import initial_layers
    from ddln_fast.problem import make_problem

    p = make_problem(base)
    dists = []
    for alpha in (0.3, 0.03, 0.003):
        cfg = base.with_overrides({"model.alpha": alpha})
        w_plus, w_minus = (w[0] for w in Geometry.from_layers(initial_layers(cfg, 16)[:1]).small_init_weights())
        ref = lp_l1(p.X, p.y, w_plus, w_minus)
        np.testing.assert_allclose(weighted_l1_interpolator(p.X, p.y, w_plus, w_minus), ref, atol=1e-8)
        dists.append(np.linalg.norm(predict_limit(cfg)[0] - ref) / np.linalg.norm(ref))
    assert dists[0] > dists[1] > dists[2] and dists[2] < 0.02, dists


# -- the mirror method and the orthogonal design --------------------------------------------------
@pytest.mark.parametrize("L", [2, 3, 4])
def test_mirror_method_equals_layer_flow(L):
    """dopri5 in theta space (method "mirror") and dopri5 on the layers, both at rtol 1e-11:
    the same trajectory to 1e-8 (each is within ~1e-10 of the exact flow)."""
    cfg = small_problem(L, t_end=30.0)
    layer = simulate(cfg)
    mirror = simulate(cfg.with_overrides({"integrator.method": "mirror"}))
    np.testing.assert_array_equal(layer.t, mirror.t)
    np.testing.assert_allclose(mirror.theta, layer.theta, atol=1e-8, rtol=0)
    np.testing.assert_allclose(mirror.u, layer.u, atol=1e-8, rtol=0)


def test_mirror_method_refuses_the_sign_trap():
    cfg = small_problem(3).with_overrides({"model.init": "balanced", "model.jitter": 0.0,
                                           "integrator.method": "mirror"})
    with pytest.raises(InputError, match="assumption \\(A\\)"), pytest.warns(UserWarning, match="sign trap"):
        simulate(cfg)


def test_orthogonal_design_depth2_balanced_logistic(tmp_path):
    """X^T X / n = I decouples the coordinates; balanced depth 2 gives
    theta(t) = theta* theta0 / (theta0 + (theta* - theta0) e^{-2 theta* t}) (docs/theory.md,
    "Closed forms")."""
    rng = np.random.default_rng(7)
    n = d = 8
    Q, _ = np.linalg.qr(rng.normal(size=(n, d)))
    X = np.sqrt(n) * Q
    star = rng.uniform(0.5, 2.0, d) * rng.choice([-1.0, 1.0], d)
    np.savez(tmp_path / "orth.npz", X=X, y=X @ star, theta_star=star)
    cfg = Config.from_dict({"problem": {"kind": "file", "path": str(tmp_path / "orth.npz")},
                            "model": {"depth": 2, "alpha": 0.3, "init": "balanced"},
                            "integrator": {"rtol": 1e-11, "atol": 1e-14, "t_end": 20.0},
                            "run": {"seeds": 1, "checkpoints": 25}})
    with pytest.warns(UserWarning, match="assumption"):
        run = simulate(cfg)
    theta0 = 0.3 ** 2
    t = run.t[:, None]
    ref = star * theta0 / (theta0 + (star - theta0) * np.exp(-2 * star * t))
    np.testing.assert_allclose(run.theta[:, 0], ref, atol=1e-9)
