"""The sharpness (largest eigenvalue of the loss Hessian in layer space) and what the run does
with it: warn when a fixed step is above the stability limit, exit non-zero when no seed
finished.

Reference: the Hessian of F(U) = ||X prod_j u^j - y||^2 / (2n) written out entry by entry in
this file (second derivatives by hand, for every pair of layers and coordinates), whose
eigenvalues numpy's eigvalsh computes; and central differences of the analytic gradient as a
second, independent check of that Hessian.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from ddln_fast.cli import main


def analytic_hessian(X, y, U):
    """d^2 F / (du^a_i du^b_k) for F = ||X theta - y||^2 / (2n), theta_i = prod_j u^j_i.

    = (X^T X / n)_{ik} P^a_i P^b_k + [i == k] g_i Q^{ab}_i (a != b), with P^a = prod_{j != a} u^j,
    Q^{ab} = prod_{j != a, b} u^j, g = X^T (X theta - y) / n. Returns (L d, L d).
    """
    L, d = U.shape
    n = X.shape[0]
    theta = U.prod(axis=0)
    g = X.T @ (X @ theta - y) / n
    M = X.T @ X / n
    P = np.array([np.prod(np.delete(U, a, axis=0), axis=0) for a in range(L)])
    H = np.zeros((L * d, L * d))
    for a in range(L):
        for b in range(L):
            block = M * np.outer(P[a], P[b])
            if a != b:
                Q = np.prod(np.delete(U, [a, b], axis=0), axis=0)
                block = block + np.diag(g * Q)
            H[a * d:(a + 1) * d, b * d:(b + 1) * d] = block
    return H


def analytic_gradient(X, y, U):
    theta = U.prod(axis=0)
    g = X.T @ (X @ theta - y) / X.shape[0]
    return np.array([g * np.prod(np.delete(U, a, axis=0), axis=0) for a in range(U.shape[0])])


def test_reference_hessian_matches_differences_of_the_gradient():
    rng = np.random.default_rng(0)
    X, y, U = rng.standard_normal((4, 5)), rng.standard_normal(4), rng.standard_normal((3, 5))
    H = analytic_hessian(X, y, U)
    eps = 1e-6
    columns = []
    for i in range(U.size):
        step = np.zeros(U.size)
        step[i] = eps
        plus = analytic_gradient(X, y, U + step.reshape(U.shape))
        minus = analytic_gradient(X, y, U - step.reshape(U.shape))
        columns.append(((plus - minus) / (2 * eps)).ravel())
    np.testing.assert_allclose(np.array(columns).T, H, atol=1e-7)


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
@pytest.mark.parametrize("zero_first_layer", [False, True])
def test_top_eigenvalue_per_seed_equals_eigvalsh(depth, zero_first_layer):
    from ddln_fast.sharpness import hessian_vector_product, top_hessian_eigenvalue

    rng = np.random.default_rng(depth)
    S, n, d = 3, 6, 7
    X, y = rng.standard_normal((n, d)), rng.standard_normal(n)
    U = rng.standard_normal((S, depth, d))
    if zero_first_layer and depth > 1:
        U[:, 0] = 0.0
    expected = [np.linalg.eigvalsh(analytic_hessian(X, y, U[s])).max() for s in range(S)]
    np.testing.assert_allclose(top_hessian_eigenvalue(X, y, U), expected, rtol=1e-8)
    V = rng.standard_normal(U.shape)
    for s in range(S):  # the products themselves
        np.testing.assert_allclose(hessian_vector_product(X, y, U, V)[s].ravel(),
                                   analytic_hessian(X, y, U[s]) @ V[s].ravel(), rtol=1e-10, atol=1e-12)


def test_per_seed_data_gives_each_seed_its_own_eigenvalue():
    from ddln_fast.sharpness import top_hessian_eigenvalue

    rng = np.random.default_rng(5)
    S, n, d = 4, 5, 6
    X = rng.standard_normal((S, n, d)) * np.array([0.5, 1.0, 2.0, 3.0])[:, None, None]
    y = rng.standard_normal((S, n))
    U = 0.7 + 0.3 * rng.standard_normal((S, 3, d))
    expected = [np.linalg.eigvalsh(analytic_hessian(X[s], y[s], U[s])).max() for s in range(S)]
    np.testing.assert_allclose(top_hessian_eigenvalue(X, y, U), expected, rtol=1e-8)
    assert top_hessian_eigenvalue(X[2], y[2], U[2]) == pytest.approx(expected[2], rel=1e-8)


def _tables(method, dt, seeds=2):
    return {"problem": {"n": 8, "d": 12, "sparsity": 2, "per_seed_data": False},
            "model": {"depth": 2, "alpha": 1.0, "init": "gaussian", "jitter": 0.3, "signs": "random"},
            "integrator": {"method": method, "dt": dt, "t_end": 40 * dt},
            "run": {"seeds": seeds, "checkpoints": 5, "spacing": "linear"}}


@pytest.mark.parametrize("method, bound", [("euler", 2.0), ("rk4", 2.785293563405282)])
def test_a_step_above_the_stability_limit_is_warned_with_the_limit(method, bound):
    from ddln_fast import Config, simulate
    from ddln_fast.init import initial_layers
    from ddln_fast.problem import make_problem
    from ddln_fast.simulate import StabilityWarning

    config = Config.from_dict(_tables(method, 0.01))
    problem = make_problem(config)
    u0 = initial_layers(config, problem.d)
    limits = [bound / np.linalg.eigvalsh(analytic_hessian(problem.X, problem.y, u0[s])).max() for s in range(2)]
    above = config.with_overrides({"integrator.dt": 1.5 * max(limits), "integrator.t_end": 60 * max(limits)})
    with pytest.warns(StabilityWarning) as caught:
        simulate(above)
    message = str(caught[0].message)
    assert f"{min(limits):.4g}" in message and "2 of 2 seeds" in message
    below = config.with_overrides({"integrator.dt": 0.9 * min(limits), "integrator.t_end": 27 * min(limits)})
    with warnings.catch_warnings():
        warnings.simplefilter("error", StabilityWarning)
        simulate(below)


def test_no_seed_finished_exits_1_and_one_finished_exits_0(tmp_path, capsys):
    """dt far above 2 / lambda_max: every seed diverges (exit 1, said on stderr); a stable dt:
    exit 0. Large steps are not refused: the file is written and complete either way."""
    import tomli_w

    config = tmp_path / "c.toml"
    config.write_text(tomli_w.dumps(_tables("euler", 5.0)))
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(config), "-o", str(tmp_path / "div.h5"), "--threads", "1"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 1
    assert "no seed finished normally" in captured.err and "stability limit" in captured.err
    from ddln_fast import open_run

    with open_run(tmp_path / "div.h5") as run:
        assert run.complete and set(run.status_names()) <= {"diverged", "stalled"}
    config.write_text(tomli_w.dumps(_tables("euler", 0.01)))
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(config), "-o", str(tmp_path / "ok.h5"), "--threads", "1"])
    assert exit_info.value.code == 0
