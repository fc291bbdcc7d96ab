"""The difference and power parametrizations: trajectories, gradient descent, invariants, the
depth-2 equivalences, Woodworth's closed forms and bad input.

References (written here or in references.py, no ddln_fast code):
- the flattened layer flow of each parametrization (theta = prod u - prod v or u^D - v^D, each
  row moving by -g d theta / d row) solved by scipy's DOP853 at rtol 1e-12, optionally carrying
  the clock s = int_0^t g;
- gradient descent as a numpy loop on the same layers;
- the invariants (u^j)^2 - (u^k)^2 within each half, and u v (D = 2) or u^(2-D) + v^(2-D)
  (D > 2) for power, derived by hand from the flow;
- the closed forms along the flow from u = v = alpha (Woodworth et al. 2020): difference depth 2
  theta = -2 alpha^2 sinh 2s, power D = 2 theta = -2 alpha^2 sinh 4s, depth / exponent p > 2
  theta = alpha^p [(1 + z)^(-p/(p-2)) - (1 - z)^(-p/(p-2))] with z = (p-2) alpha^(p-2) s
  (difference) or z = p (p-2) alpha^(p-2) s (power).
Tolerances: dopri5 at rtol 1e-11 against DOP853 at 1e-12 over t <= 3 on O(1) layers: 1e-8.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.integrate import quad

from ddln_fast import Config, InputError, simulate
from references import (parametrized_gradient_descent, parametrized_reference_layers, parametrized_theta,
                        small_config_tables)

CASES = [("difference", 2, 0.0), ("difference", 3, 0.0), ("difference", 4, 0.0), ("difference", 5, 0.0),
         ("power", 1, 2.0), ("power", 1, 2.5), ("power", 1, 3.0)]
CASE_IDS = [f"{name}-{depth if name == 'difference' else power}" for name, depth, power in CASES]


def config_for(name, depth, power, **overrides):
    """A tiny run of ``name``: gaussian init (alpha 0.7, jitter 0.3 and random signs; power
    needs u, v > 0: jitter 0.2 keeps 1 + 0.2 N(0, 1) > 0 for d <= 10^4), one X for both seeds."""
    tables = small_config_tables({"model.parametrization": name, "model.depth": depth,
                                  "model.power": power,
                                  "model.signs": "positive" if name == "power" else "random",
                                  "model.jitter": 0.2 if name == "power" else 0.3})
    for key, value in overrides.items():
        section, field = key.split(".")
        tables[section][field] = value
    return Config.from_dict(tables)


def rows_of(name, depth):
    return 2 if name == "power" else 2 * depth


@pytest.mark.parametrize("name, depth, power", CASES, ids=CASE_IDS)
def test_dopri5_follows_the_flow_of_every_parametrization(name, depth, power):
    cfg = config_for(name, depth, power, **{"integrator.t_end": 3.0, "integrator.rtol": 1e-11,
                                            "run.checkpoints": 4})
    run = simulate(cfg)
    assert run.u.shape[2] == rows_of(name, depth)
    for s in range(cfg.run.seeds):
        ref = parametrized_reference_layers(run.X, run.y, run.u0[s], run.t, name, power)
        assert np.max(np.abs(ref[-1] - ref[0])) > 0.05  # the layers moved
        np.testing.assert_allclose(run.u[:, s], ref, rtol=0, atol=1e-8)
        ref_theta = np.array([parametrized_theta(name, U, power) for U in ref])
        np.testing.assert_allclose(run.theta[:, s], ref_theta, rtol=0, atol=1e-8)
        assert np.all(run.invariant_drift[:, s] < 1e-9)


@pytest.mark.parametrize("name, depth, power", CASES, ids=CASE_IDS)
def test_rk4_converges_to_the_flow_with_order_four(name, depth, power):
    """rk4 at dt = 0.01 and 0.005 over t = 1 against DOP853: halving the step divides the error
    by 2^4 (between 12 and 20: the asymptotic regime on these O(1) problems)."""
    errors = []
    for dt in (0.01, 0.005):
        cfg = config_for(name, depth, power, **{"integrator.method": "rk4", "integrator.dt": dt,
                                                "integrator.t_end": 1.0, "run.checkpoints": 2})
        run = simulate(cfg)
        ref = parametrized_reference_layers(run.X, run.y, run.u0[0], run.t, name, power)
        errors.append(np.max(np.abs(run.u[-1, 0] - ref[-1])))
    assert errors[1] < 1e-5 and 12 < errors[0] / errors[1] < 20, errors


@pytest.mark.parametrize("name, depth, power", CASES + [("difference", 1, 0.0)],
                         ids=CASE_IDS + ["difference-1"])
@pytest.mark.parametrize("d", [12, 1100])  # 1100: three coordinate blocks, the last partial
def test_euler_is_gradient_descent_for_every_parametrization(name, depth, power, d):
    eta, steps = 0.02, 60
    cfg = config_for(name, depth, power, **{"integrator.method": "euler", "integrator.dt": eta,
                                            "integrator.t_end": eta * steps, "run.checkpoints": 4,
                                            "problem.d": d, "problem.n": 10 if d < 100 else 100})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (no stability warning expected; none matters here)
        run = simulate(cfg)
    steps_at = np.rint(run.t / eta).astype(int)
    for s in range(cfg.run.seeds):
        expected = parametrized_gradient_descent(run.X, run.y, run.u0[s], eta, steps, name, power)
        assert np.max(np.abs(expected[-1] - expected[0])) > 1e-3
        np.testing.assert_allclose(run.u[:, s], expected[steps_at], rtol=0, atol=1e-12)
        np.testing.assert_allclose(run.theta[:, s], [parametrized_theta(name, U, power) for U in expected[steps_at]],
                                   rtol=0, atol=1e-12)


def independent_drift(name, U, u0, power):
    """Largest change of the invariants of each half (difference), or relative change of u v /
    u^(2-D) + v^(2-D) (power); U (K, P, d), u0 (P, d)."""
    if name == "power":
        def c(W):
            return W[..., 0, :] * W[..., 1, :] if power == 2 else (W[..., 0, :] ** (2 - power)
                                                                   + W[..., 1, :] ** (2 - power))
        return np.max(np.abs(c(U) / c(u0) - 1), axis=-1)
    L = U.shape[1] // 2
    worst = np.zeros(U.shape[0])
    for half in (slice(0, L), slice(L, 2 * L)):
        W, W0 = U[:, half], u0[half]
        for j in range(L):
            for k in range(j + 1, L):
                change = (W[:, j] ** 2 - W[:, k] ** 2) - (W0[j] ** 2 - W0[k] ** 2)
                worst = np.maximum(worst, np.max(np.abs(change), axis=-1))
    return worst


@pytest.mark.parametrize("name, depth, power", [("difference", 3, 0.0), ("power", 1, 2.0), ("power", 1, 2.5)])
def test_invariant_drift_of_gradient_descent_is_the_drift_of_each_half(name, depth, power):
    """Gradient descent breaks the invariants by O(eta^2) per step: the reported drift is the
    test's own (pairs within each half; power: its conserved quantity), to rounding. The
    difference halves' cross terms (u^j)^2 - (v^k)^2 are not invariants and must not count."""
    cfg = config_for(name, depth, power, **{"integrator.method": "euler", "integrator.dt": 0.05,
                                            "integrator.t_end": 2.0, "run.checkpoints": 5})
    run = simulate(cfg)
    for s in range(cfg.run.seeds):
        expected = independent_drift(name, run.u[:, s], run.u0[s], power)
        assert expected[-1] > 1e-6
        np.testing.assert_allclose(run.invariant_drift[:, s], expected, rtol=1e-9, atol=1e-15)


def test_difference_at_depth_two_is_the_product_of_sum_and_difference():
    """u^j = v^j = alpha at depth 2: the halves stay balanced (u^1 = u^2 = u, v^1 = v^2 = v),
    theta = u^2 - v^2 = (u + v)(u - v), and a = u + v, b = u - v follow a' = -g b, b' = -g a:
    the product flow from (2 alpha, 0), at the same time."""
    alpha = 0.4
    common = {"model.depth": 2, "model.alpha": alpha, "model.init": "balanced", "model.jitter": 0.0,
              "model.signs": "positive", "integrator.t_end": 3.0, "integrator.rtol": 1e-11,
              "run.checkpoints": 6, "run.seeds": 1}
    diff = simulate(Config.from_dict(small_config_tables({**common, "model.parametrization": "difference"})))
    shape = {"model.init": "shape", "model.layer_scales": [2.0, 0.0]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (2 alpha, 0) satisfies (A): nothing expected, nothing checked
        prod = simulate(Config.from_dict(small_config_tables({**common, **shape})))
    np.testing.assert_array_equal(diff.t, prod.t)
    # theta: u^2 - v^2 = (u + v)(u - v)
    np.testing.assert_allclose(diff.theta, prod.theta, rtol=0, atol=1e-9)
    u, v = diff.u[:, 0, 0], diff.u[:, 0, 2]
    np.testing.assert_allclose(u + v, prod.u[:, 0, 0], rtol=0, atol=1e-9)
    np.testing.assert_allclose(u - v, prod.u[:, 0, 1], rtol=0, atol=1e-9)


def test_power_two_runs_the_depth_two_difference_path_twice_as_fast():
    alpha = 0.4
    common = {"model.alpha": alpha, "model.init": "balanced", "model.jitter": 0.0, "model.signs": "positive",
              "integrator.rtol": 1e-11, "run.spacing": "linear", "run.seeds": 1}
    diff = simulate(Config.from_dict(small_config_tables({**common, "model.parametrization": "difference",
                                                          "model.depth": 2, "integrator.t_end": 4.0,
                                                          "run.checkpoints": 9})))
    power = simulate(Config.from_dict(small_config_tables({**common, "model.parametrization": "power",
                                                           "model.power": 2.0, "integrator.t_end": 2.0,
                                                           "run.checkpoints": 9})))
    np.testing.assert_allclose(power.t * 2, diff.t, rtol=1e-15)
    np.testing.assert_allclose(power.theta, diff.theta, rtol=0, atol=1e-9)


def woodworth_theta(name, p, alpha, s):
    """theta(s) from u = v = alpha along the clock s (the closed forms of the module docstring)."""
    if p == 2:
        return -2 * alpha ** 2 * np.sinh((2 if name == "difference" else 4) * s)
    z = (p - 2) * alpha ** (p - 2) * s * (1 if name == "difference" else p)
    e = -p / (p - 2)
    return alpha ** p * ((1 + z) ** e - (1 - z) ** e)


@pytest.mark.parametrize("name, p", [("difference", 2), ("difference", 3), ("difference", 4),
                                     ("power", 2.0), ("power", 2.5), ("power", 3.0), ("power", 4.0)])
def test_woodworth_closed_forms_along_the_flow(name, p):
    """The simulated theta(t) equals the closed form at the clock s(t) = int_0^t g carried by
    the test's DOP853 run of the same flow (u = v = alpha: theta0 = 0)."""
    alpha = 0.6
    depth, power = (p, 0.0) if name == "difference" else (1, p)
    cfg = Config.from_dict(small_config_tables({
        "model.parametrization": name, "model.depth": depth, "model.power": power, "model.alpha": alpha,
        "model.init": "balanced", "model.jitter": 0.0, "model.signs": "positive",
        "integrator.t_end": 3.0, "integrator.rtol": 1e-11, "run.checkpoints": 5, "run.seeds": 1}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # balanced is the standard init here: no sign-trap warning
        run = simulate(cfg)
    _, clocks = parametrized_reference_layers(run.X, run.y, run.u0[0], run.t, name, power, clock=True)
    assert np.max(np.abs(run.theta[-1, 0])) > 0.1
    np.testing.assert_allclose(run.theta[:, 0], woodworth_theta(name, p, alpha, clocks), rtol=0, atol=1e-8)


# -- configuration and bad input ------------------------------------------------------------------
def test_the_run_file_names_the_parametrization_and_its_layer_axis(tmp_path):
    cfg = config_for("difference", 3, 0.0, **{"run.checkpoints": 2})
    run = simulate(cfg, out=tmp_path / "diff.h5")
    attrs = dict(run.file.attrs)
    assert attrs["parametrization"] == "difference" and attrs["power"] == 0.0
    assert "v^1" in attrs["layer_axis"]
    assert run.u0.shape == (2, 6, 12) and run.u.shape == (2, 2, 6, 12)
    assert run.config.model.parametrization == "difference"
    run.close()


@pytest.mark.parametrize("name, depth, power", [("difference", 3, 0.0), ("power", 1, 2.0)])
def test_first_layer_zero_and_shapes_apply_to_each_half(name, depth, power):
    from ddln_fast.init import initial_layers

    if name == "difference":
        u0 = initial_layers(config_for(name, depth, power, **{"model.init": "first_layer_zero",
                                                              "model.jitter": 0.0, "model.alpha": 0.3}), 5)
        np.testing.assert_array_equal(u0[:, [0, 3]], 0.0)
        assert np.all(np.abs(u0[:, [1, 2, 4, 5]]) == 0.3)
    one_half = initial_layers(config_for(name, depth, power, **{"model.init": "shape", "model.jitter": 0.0,
                                                                "model.layer_scales": [1.0, 2.0, 3.0][:depth]}), 4)
    both = initial_layers(config_for(name, depth, power, **{
        "model.init": "shape", "model.jitter": 0.0, "model.layer_scales": ([1.0, 2.0, 3.0][:depth]) * 2}), 4)
    np.testing.assert_array_equal(np.abs(one_half), np.abs(both))
    np.testing.assert_array_equal(np.abs(one_half[0, :depth]), np.abs(one_half[0, depth:]))


@pytest.mark.parametrize("overrides, message", [
    ({"model.parametrization": "power", "model.power": 1.5}, "D >= 2"),
    ({"model.parametrization": "power"}, "D >= 2"),
    ({"model.power": 3.0}, "only read by parametrization = \"power\""),
    ({"model.parametrization": "power", "model.power": 2.0, "model.init": "first_layer_zero"}, "u, v > 0"),
    ({"model.parametrization": "power", "model.power": 2.0, "model.init": "balanced", "model.signs": "random"},
     "u, v > 0"),
    ({"model.parametrization": "power", "model.power": 2.0, "model.init": "shape", "model.layer_scales": [1.0, -1.0]},
     "u, v > 0"),
    ({"model.parametrization": "power", "model.power": 2.0, "model.init": "gaussian", "model.jitter": 5.0},
     "entries <= 0"),
    ({"model.parametrization": "difference", "model.init": "shape", "model.layer_scales": [1.0, 2.0]},
     "layer_scales has 2 entries"),
    ({"model.parametrization": "power", "model.power": 2.0, "model.init": "balanced", "model.depth": 2,
      "integrator.method": "euler", "run.gain": True}, "product parametrization only"),
    ({"model.parametrization": "power", "model.power": 2.0, "model.init": "shape",
      "model.layer_scales": [1.0, 2.0, 3.0]}, "layer_scales has 3 entries"),
])
def test_bad_parametrization_input_is_one_line_exit_2(tmp_path, capsys, overrides, message):
    from ddln_fast.cli import main

    import tomli_w

    tables = {"problem": {"n": 5, "d": 8}, "model": {"depth": 3}, "run": {"seeds": 2, "checkpoints": 2}}
    for key, value in overrides.items():
        section, field = key.split(".")
        tables.setdefault(section, {})[field] = value
    path = tmp_path / "bad.toml"
    path.write_text(tomli_w.dumps(tables))
    out = tmp_path / "out.h5"
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(path), "-o", str(out), "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: ") and len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


@pytest.mark.parametrize("name, shape", [("difference", (3, 8)), ("difference", (2, 3, 8)), ("power", (3, 8))])
def test_an_init_file_of_the_wrong_shape_is_refused(tmp_path, name, shape):
    np.save(tmp_path / "u0.npy", np.full(shape, 0.5))
    cfg = Config.from_dict({"problem": {"n": 5, "d": 8}, "run": {"seeds": 2},
                            "model": {"parametrization": name, "depth": 3, "power": 2.0 if name == "power" else 0.0,
                                      "init": "file", "init_path": str(tmp_path / "u0.npy")}})
    rows = 6 if name == "difference" else 2
    with pytest.raises(InputError, match=f"expected \\({rows}, 8\\) or \\(2, {rows}, 8\\)"):
        simulate(cfg)
    np.save(tmp_path / "u0.npy", np.full((rows, 8), 0.5))
    assert simulate(cfg.with_overrides({"integrator.t_end": 0.1})).u0.shape == (2, rows, 8)


@pytest.mark.parametrize("name, depth, power", [("difference", 2, 0.0), ("difference", 3, 0.0),
                                                ("power", 1, 2.0), ("power", 1, 2.5)])
def test_hessian_vector_products_are_differences_of_the_gradient(name, depth, power):
    """The sharpness module's H V against central differences of the layer gradient
    g * d theta / d U written in references.py (step 1e-6: error ~1e-10 relative)."""
    from ddln_fast.parametrization import Parametrization
    from ddln_fast.sharpness import hessian_vector_product
    from references import gradient, parametrized_theta_gradient

    rng = np.random.default_rng(11)
    rows, d, n = rows_of(name, depth), 6, 4
    X, y = rng.standard_normal((n, d)), rng.standard_normal(n)
    U = rng.uniform(0.3, 1.2, (rows, d)) * (1 if name == "power" else rng.choice([-1.0, 1.0], (rows, d)))
    V = rng.standard_normal((rows, d))

    def layer_gradient(W):
        return gradient(X, y, parametrized_theta(name, W, power))[None] * parametrized_theta_gradient(name, W, power)

    eps = 1e-6
    expected = (layer_gradient(U + eps * V) - layer_gradient(U - eps * V)) / (2 * eps)
    param = Parametrization.of_layers(name, rows, power)
    got = hessian_vector_product(X, y, U[None], V[None], param)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-7, atol=1e-8)


def test_a_gradient_descent_step_above_the_stability_limit_of_a_difference_run_is_warned():
    """lambda_max of the difference parametrization's Hessian (numpy's eigvalsh of the Hessian
    assembled column by column from the test's central differences) sets the warning's limit."""
    from ddln_fast.init import initial_layers
    from ddln_fast.problem import make_problem
    from ddln_fast.simulate import StabilityWarning
    from references import gradient, parametrized_theta_gradient

    cfg = config_for("difference", 2, 0.0, **{"integrator.method": "euler", "run.seeds": 1,
                                               "integrator.t_end": 1.0})
    problem = make_problem(cfg)
    U = initial_layers(cfg, problem.d)[0]
    X, y = problem.X, problem.y

    def layer_gradient(W):
        return (gradient(X, y, parametrized_theta("difference", W)) * parametrized_theta_gradient("difference", W)).ravel()

    eps, size = 1e-6, U.size
    H = np.column_stack([(layer_gradient(U + eps * e.reshape(U.shape)) - layer_gradient(U - eps * e.reshape(U.shape)))
                         / (2 * eps) for e in np.eye(size)])
    limit = 2 / np.max(np.linalg.eigvalsh((H + H.T) / 2))
    def two_steps(dt):
        return cfg.with_overrides({"integrator.dt": dt, "integrator.t_end": 2 * dt, "run.checkpoints": 3})

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        simulate(two_steps(0.9 * limit))
    with pytest.warns(StabilityWarning, match=f"{limit:.4g}"):
        simulate(two_steps(1.1 * limit))


# -- theory: closed forms, the limit, the bounds ----------------------------------------------------
def woodworth_inverse_reference(x, p):
    """h_p^{-1}(x) by brentq on (1 - w)^(-p/(p-2)) - (1 + w)^(-p/(p-2)) = x."""
    from scipy.optimize import brentq

    e = p / (p - 2)
    return brentq(lambda w: (1 - w) ** -e - (1 + w) ** -e - x, -1 + 1e-15, 1 - 1e-15, xtol=1e-300, rtol=1e-15)


def closed_form_reference(name, p, u0):
    """(phi, Q) of one coordinate with phi(0) = Q(0) = 0, written from the closed forms:
    depth 2 / D = 2 the hyperbolic entropy with beta from the flow's A cosh - B sinh form,
    p >= 3 from u = v = alpha Woodworth's h_p^{-1} (brentq) and Q = int_0^theta phi (quad)."""
    if p == 2:
        if name == "power":
            k, beta = 4.0, 2 * u0[0] * u0[1]
        else:
            A = u0[0] * u0[1] - (u0[2] * u0[3] if name == "difference" else 0.0)
            B = np.sum(u0 ** 2) / 2
            k, beta = 2.0, np.sqrt(B * B - A * A)

        def phi(t):
            return np.arcsinh(t / beta) / k
    else:
        alpha = u0[0]
        c = (p - 2) * (p if name == "power" else 1)

        def phi(t):
            return woodworth_inverse_reference(t / alpha ** p, p) / (c * alpha ** (p - 2))

    def Q(t):
        return quad(phi, 0.0, t, epsabs=0, epsrel=1e-13, limit=200)[0]

    return phi, Q


@pytest.mark.parametrize("name, p, init", [
    ("product", 2, "random"), ("difference", 2, "random"), ("power", 2.0, "random"),
    ("difference", 2, "balanced"), ("difference", 3, "balanced"), ("difference", 4, "balanced"),
    ("power", 2.5, "balanced"), ("power", 3.0, "balanced"), ("power", 4.0, "balanced")])
def test_closed_form_potentials_against_the_clock_map_route(name, p, init):
    """potentials.ClosedForm (phi, Q with phi(0) = Q(0) = 0) against the formulas written here,
    and both against the clock-map geometry (phi(theta) - phi(theta0) = -s(theta),
    D_Q(theta, theta0) = G(s) - theta s)."""
    from ddln_fast.parametrization import Parametrization
    from ddln_fast.potentials import ClosedForm
    from ddln_fast.theory import Geometry

    rng = np.random.default_rng(int(10 * p) + len(name))
    d = 5
    param = Parametrization.of_layers(name, {"product": 2, "difference": 2 * int(p)}.get(name, 2),
                                      p if name == "power" else 0.0)
    rows = param.layer_count
    if init == "balanced":  # u = v = alpha_i, alpha varying across coordinates
        u0 = np.repeat(rng.uniform(0.3, 0.9, (1, d)), rows, axis=0)
    else:
        u0 = rng.uniform(0.3, 1.2, (rows, d))
        if name != "power":
            u0 *= rng.choice([-1.0, 1.0], (rows, d))
    theta0 = parametrized_theta(name, u0, param.power)
    theta = theta0 + rng.uniform(-2, 2, d)
    closed = ClosedForm.from_layers(u0, param)
    geometry = Geometry.from_layers(u0, param)
    for i in range(d):
        phi, Q = closed_form_reference(name, p, u0[:, i])
        np.testing.assert_allclose(closed.mirror_map(theta)[i], phi(theta[i]), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(closed.potential(theta)[i], Q(theta[i]), rtol=1e-10, atol=1e-15)
    phi_rel = closed.mirror_map(theta) - closed.mirror_map(theta0)
    breg = closed.potential(theta) - closed.potential(theta0) - closed.mirror_map(theta0) * (theta - theta0)
    np.testing.assert_allclose(geometry.mirror_map(theta, 0), phi_rel, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(geometry.potential(theta, 0), breg, rtol=1e-9, atol=1e-13)


def test_no_closed_form_is_said_so():
    from ddln_fast.parametrization import Parametrization
    from ddln_fast.potentials import ClosedForm

    with pytest.raises(InputError, match="no closed-form potential"):
        ClosedForm.from_layers(np.array([[0.3], [0.5], [0.7]]), Parametrization("product", 3))
    with pytest.raises(InputError, match="no closed-form potential"):
        ClosedForm.from_layers(np.array([[0.3], [0.5]]), Parametrization("power", 1, 3.0))


@pytest.mark.parametrize("name, depth, power", [("difference", 2, 0.0), ("difference", 3, 0.0),
                                                ("power", 1, 2.0), ("power", 1, 2.5), ("power", 1, 3.0)])
def test_the_limit_of_a_long_run_is_predict_limit(name, depth, power):
    """dopri5 at rtol 1e-13 until the loss is 1e-24: theta_K equals the dual Newton prediction
    to 1e-9, which interpolates and satisfies KKT (-s(theta_inf) in range(X^T))."""
    from ddln_fast.prediction import predict_limit
    from ddln_fast.theory import Geometry

    cfg = config_for(name, depth, power, **{"problem.n": 5, "problem.d": 10, "integrator.rtol": 1e-13,
                                            "integrator.atol": 1e-16, "integrator.t_end": 1e4,
                                            "integrator.loss_tol": 1e-24, "run.checkpoints": 4,
                                            "run.spacing": "log"})
    run = simulate(cfg)
    assert np.all(run.loss[-1] < 1e-24)
    limit = predict_limit(cfg)
    geometry = Geometry.from_layers(run.u0, parametrization_of(name, depth, power))
    for s in range(cfg.run.seeds):
        np.testing.assert_allclose(run.theta[-1, s], limit[s], rtol=0, atol=1e-9 * np.abs(limit[s]).max())
        np.testing.assert_allclose(run.X @ limit[s], run.y, atol=1e-11)
        kkt = geometry.mirror_map(limit[s], s)
        null_part = kkt - run.X.T @ np.linalg.lstsq(run.X.T, kkt, rcond=None)[0]
        assert np.linalg.norm(null_part) <= 1e-9 * max(1.0, np.linalg.norm(kkt))


def parametrization_of(name, depth, power):
    from ddln_fast.parametrization import Parametrization

    return Parametrization.of_layers(name, rows_of(name, depth), power)


@pytest.mark.parametrize("name, depth, power", [("difference", 2, 0.0), ("difference", 3, 0.0),
                                                ("power", 1, 2.0), ("power", 1, 3.0)])
def test_small_alpha_limits_tend_to_the_min_l1_interpolator(name, depth, power):
    """From u = v = alpha the limit's distance to the LP's minimum-l1 interpolator (unique on
    this generic problem) shrinks as alpha -> 0 (scipy linprog on the split LP)."""
    from scipy.optimize import linprog

    from ddln_fast.prediction import predict_limit
    from ddln_fast.problem import make_problem

    base = config_for(name, depth, power, **{"problem.n": 8, "problem.d": 24, "run.seeds": 1,
                                             "model.init": "balanced", "model.jitter": 0.0,
                                             "model.signs": "positive"})
    p = make_problem(base)
    res = linprog(np.ones(48), A_eq=np.hstack([p.X, -p.X]), b_eq=p.y, bounds=(0, None), method="highs")
    l1 = res.x[:24] - res.x[24:]
    alphas = (0.3, 0.03, 0.003) if name == "power" and power > 2 or depth > 2 else (0.3, 1e-3, 1e-6)
    dist = [np.linalg.norm(predict_limit(base.with_overrides({"model.alpha": a}))[0] - l1) / np.linalg.norm(l1)
            for a in alphas]
    assert dist[0] > dist[1] > dist[2] and dist[2] < 1e-3, dist


@pytest.mark.parametrize("name, depth, power", [("difference", 2, 0.0), ("difference", 3, 0.0),
                                                ("power", 1, 2.0), ("power", 1, 2.5)])
def test_analyze_puts_the_theory_next_to_every_parametrization(name, depth, power, tmp_path, capsys):
    """Bounds hold at every checkpoint, the limit and KKT residual are small, ``ddln analyze``
    prints the parametrization, and c_A (PL rate 2 mu c_A, mu by eigvalsh) is the smallest h a
    coordinate can reach: depth 2 / D = 2, h = k sqrt(theta^2 + beta^2) is smallest at k beta;
    power D > 2, h = D^2 (u^(2D-2) + v^(2D-2)) is smallest where u = v on the conserved
    u^(2-D) + v^(2-D); difference depth 3 (no closed form): at most the smallest h the run saw."""
    from ddln_fast.analysis import analyze_run
    from ddln_fast.cli import main

    cfg = config_for(name, depth, power, **{"problem.n": 6, "problem.d": 14, "integrator.rtol": 1e-10,
                                            "integrator.t_end": 400.0, "run.checkpoints": 60,
                                            "run.spacing": "log"})
    run = simulate(cfg, out=tmp_path / "run.h5")
    result = analyze_run(run)
    mu = np.linalg.eigvalsh(run.X @ run.X.T / run.X.shape[0]).min()
    for sa in result.seeds:
        assert sa.bound_pl_c_a_held and sa.bound_pl_trajectory_held and sa.bound_sublinear_held, sa
        assert sa.gap_to_prediction < 1e-6 and sa.kkt_residual < 1e-8 and not sa.note
        u0 = run.u0[sa.seed]
        if name == "power" and power > 2:
            w = ((u0[0] ** (2 - power) + u0[1] ** (2 - power)) / 2) ** (1 / (2 - power))
            c_a = np.min(2 * power ** 2 * w ** (2 * power - 2))
        elif name == "power":
            c_a = np.min(4 * 2 * u0[0] * u0[1])
        elif depth == 2:
            A = u0[0] * u0[1] - u0[2] * u0[3]
            B = np.sum(u0 ** 2, axis=0) / 2
            c_a = np.min(2 * np.sqrt(B * B - A * A))
        else:
            seen = [np.sum([np.prod(np.delete(U[half], j, axis=0) ** 2, axis=0)
                            for half in (slice(0, depth), slice(depth, 2 * depth)) for j in range(depth)], axis=0)
                    for U in run.u[:, sa.seed]]
            assert 2 * mu * np.min(seen) >= sa.pl_rate * (1 - 1e-12)
            continue
        np.testing.assert_allclose(sa.pl_rate, 2 * mu * c_a, rtol=1e-10)
    run.close()
    main_args = ["analyze", str(tmp_path / "run.h5")]
    with pytest.raises(SystemExit) as done:
        main(main_args)
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert ("power D" if name == "power" else "difference, depth") in out and "VIOLATED" not in out


@pytest.mark.parametrize("name, depth, power", [("difference", 2, 0.0), ("difference", 3, 0.0), ("power", 1, 2.5)])
def test_mirror_method_follows_the_flow_of_every_parametrization(name, depth, power):
    """dopri5 on theta with h(theta) from the clock map (method "mirror") against the test's
    DOP853 layer flow: theta and the rebuilt layers to 1e-8."""
    cfg = config_for(name, depth, power, **{"integrator.method": "mirror", "integrator.rtol": 1e-11,
                                            "integrator.t_end": 3.0, "run.checkpoints": 4})
    run = simulate(cfg)
    for s in range(cfg.run.seeds):
        ref = parametrized_reference_layers(run.X, run.y, run.u0[s], run.t, name, power)
        np.testing.assert_allclose(run.theta[:, s], [parametrized_theta(name, U, power) for U in ref],
                                   rtol=0, atol=1e-8)
        np.testing.assert_allclose(run.u[:, s], ref, rtol=0, atol=1e-8)
        assert np.all(run.invariant_drift[:, s] < 1e-12)


@pytest.mark.parametrize("power", [2.0, 3.0, 4.0])
def test_which_l1_minimizer_the_small_alpha_limit_picks_depends_on_D(power):
    """A segment of minimum-l1 interpolators theta(t) = ((1-t), 9 (1-t), 10 t, 0, ...) (column 2
    = (x_0 + 9 x_1) / 10): from u = v = alpha the limit at alpha^D = 1e-12 sits (to 1e-4) where the
    next-order term of the potential is smallest on the segment, sum theta log theta (D = 2) or
    -sum theta^(2/D) (D > 2), found here by scipy's bounded scalar minimization; the D's pick
    different points (their t differ by more than 0.01), and paper.tie_break_position agrees."""
    from scipy.optimize import minimize_scalar

    from ddln_fast.paper import tie_break_position
    from ddln_fast.parametrization import Parametrization
    from ddln_fast.prediction import PredictionWarning, predict_arrays

    rng = np.random.default_rng(8)
    n, d = 15, 30
    X = rng.standard_normal((n, d))
    X[:, 2] = (X[:, 0] + 9 * X[:, 1]) / 10
    y = X[:, 0] + 9 * X[:, 1]

    def tie_break(t):
        theta = np.array([1 - t, 9 * (1 - t), 10 * t])
        return np.sum(theta * np.log(theta)) if power == 2 else -np.sum(theta ** (2 / power))

    expected = minimize_scalar(tie_break, bounds=(1e-9, 1 - 1e-9), method="bounded",
                               options={"xatol": 1e-12}).x
    alpha = 1e-12 ** (1 / power)
    with warnings.catch_warnings():
        # D = 4 stops at a dual residual of ~1e-10 (clocks near the blow-up): far below what is checked
        warnings.simplefilter("ignore", PredictionWarning)
        theta = predict_arrays(X, y, np.full((1, 2, d), alpha), parametrization=Parametrization("power", 1, power)).theta[0]
    assert abs(theta[2] / 10 - expected) < 1e-4
    assert np.abs(theta[3:]).max() < 1e-4 and abs(np.abs(theta).sum() - 10) < 1e-4
    # (a minimum located from function values: to about sqrt(eps))
    assert abs(tie_break_position(power, 9.0) - expected) < 5e-8
    assert abs(expected - 1 / 3) > 0.05 and abs(tie_break_position(2.0, 9.0) - tie_break_position(4.0, 9.0)) > 0.03


@pytest.mark.parametrize("name, depth, power", [("difference", 2, 0.0), ("power", 1, 2.5)])
def test_sgd_with_the_full_batch_is_gradient_descent_for_every_parametrization(name, depth, power):
    """sgd with b = n (the data in its natural order, no label noise) takes euler's steps, the
    same bits: its step is the parametrized Euler kernel (which the numpy-loop test checks)."""
    common = {"integrator.dt": 0.02, "integrator.t_end": 0.4, "run.checkpoints": 5}
    euler = simulate(config_for(name, depth, power, **{**common, "integrator.method": "euler"}))
    sgd = simulate(config_for(name, depth, power, **{**common, "integrator.method": "sgd",
                                                    "integrator.batch_size": 10}))
    np.testing.assert_array_equal(sgd.u, euler.u)
    np.testing.assert_array_equal(sgd.theta, euler.theta)


def test_power_seed_whose_step_crosses_zero_is_named():
    """Gradient descent on u^3 - v^3 with a step large enough to carry a v below 0 without
    diverging: the run says which seed left u, v > 0 (where the theory of the power
    parametrization holds); a small step leaves the orthant alone and warns about nothing."""
    import warnings

    from ddln_fast import simulate
    from ddln_fast.simulate import OrthantWarning

    tables = {"problem.n": 10, "problem.d": 20, "problem.sparsity": 2, "model.parametrization": "power",
              "model.power": 3.0, "model.alpha": 0.3, "model.init": "balanced", "integrator.method": "euler",
              "run.seeds": 2, "run.checkpoints": 5}
    with pytest.warns(OrthantWarning, match=r"u or v is at or below 0") as caught:
        run = simulate(Config().with_overrides({**tables, "integrator.dt": 0.3, "integrator.t_end": 600.0}))
    u = run.u
    assert run.status_names()[1] == "t_end" and np.any(u[:, 1] <= 0)  # the silent case, seen here
    # seed 0 crosses too, before it diverges: each seed is named once
    named = [str(w.message).split(":")[0] for w in caught if issubclass(w.category, OrthantWarning)]
    assert sorted(named) == ["seed 0", "seed 1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", OrthantWarning)
        run = simulate(Config().with_overrides({**tables, "integrator.dt": 0.1, "integrator.t_end": 200.0}))
    assert np.all(run.u > 0)
