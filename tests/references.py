"""Independent references for the simulator tests: plain numpy and scipy, no ddln_fast code.

Everything here is written from the equations of docs/theory.md directly:

- the layer flow du^j/dt = -g(theta) * prod_{k != j} u^k, with theta = prod_j u^j and
  g(theta) = X^T (X theta - y) / n, as a flat right-hand side for ``scipy.integrate.solve_ivp``;
- the "all but one layer" products by deleting the layer and multiplying the others (the slow,
  obvious way; the package uses prefix/suffix products);
- gradient descent as a naive numpy loop;
- the invariants (u^j)^2 - (u^k)^2 and their drift.
"""

from __future__ import annotations

import numpy as np
from scipy.integrate import solve_ivp

#: DOP853 settings of every trajectory reference: about 1e-13 global error on the O(1) problems
#: of these tests, three orders below the 1e-10 accuracy asked of the code under test.
REFERENCE_RTOL = 1e-12
REFERENCE_ATOL = 1e-14


def all_but_one_products(U: np.ndarray) -> np.ndarray:
    """prod_{k != j} u^k for every layer j, by multiplying the other layers.

    U : ndarray of shape (L, d). Returns (L, d); for L = 1 the empty product is 1.
    """
    L = U.shape[0]
    return np.stack([np.prod(np.delete(U, j, axis=0), axis=0) for j in range(L)])


def gradient(X: np.ndarray, y: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """g(theta) = X^T (X theta - y) / n for X of shape (n, d)."""
    return X.T @ (X @ theta - y) / X.shape[0]


def loss(X: np.ndarray, y: np.ndarray, theta: np.ndarray) -> float:
    """f(theta) = ||X theta - y||^2 / (2n)."""
    r = X @ theta - y
    return float(r @ r) / (2 * X.shape[0])


def layer_flow_rhs(X: np.ndarray, y: np.ndarray, depth: int):
    """The flattened layer flow z = vec(U) (L*d,) -> dz/dt, for ``solve_ivp``."""
    d = X.shape[1]

    def rhs(t, z):
        U = z.reshape(depth, d)
        g = gradient(X, y, np.prod(U, axis=0))
        return (-g[None, :] * all_but_one_products(U)).ravel()

    return rhs


def reference_layers(X: np.ndarray, y: np.ndarray, u0: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Layers at ``times`` by DOP853 (rtol 1e-12, atol 1e-14), one interval at a time so that
    every value is a step end point, not an interpolant.

    u0 : ndarray of shape (L, d). Returns (len(times), L, d); ``times[0]`` must be 0.
    """
    L, d = u0.shape
    rhs = layer_flow_rhs(X, y, L)
    out = np.empty((len(times), L, d))
    out[0] = u0
    z = u0.ravel().copy()
    for k in range(1, len(times)):
        sol = solve_ivp(rhs, (times[k - 1], times[k]), z, method="DOP853",
                        rtol=REFERENCE_RTOL, atol=REFERENCE_ATOL)
        assert sol.success, sol.message
        z = sol.y[:, -1]
        out[k] = z.reshape(L, d)
    return out


def gradient_descent(X: np.ndarray, y: np.ndarray, u0: np.ndarray, eta: float, steps: int) -> np.ndarray:
    """Plain gradient descent on the layers: u^j <- u^j - eta g(theta) prod_{k != j} u^k.

    Returns every iterate, shape (steps + 1, L, d).
    """
    U = np.array(u0, dtype=np.float64)
    out = [U.copy()]
    for _ in range(steps):
        g = gradient(X, y, np.prod(U, axis=0))
        U = U - eta * g[None, :] * all_but_one_products(U)
        out.append(U.copy())
    return np.array(out)


def invariant_drift(U: np.ndarray, u0: np.ndarray) -> np.ndarray:
    """max over coordinates i and layer pairs (j, k) of |Delta_jk(t) - Delta_jk(0)|, with
    Delta_jk = (u^j_i)^2 - (u^k_i)^2, written pair by pair.

    U : ndarray of shape (..., L, d) (e.g. (K, S, L, d)); u0 : (..., L, d) broadcastable to it.
    Returns the drift with the last two axes reduced.
    """
    L = U.shape[-2]
    worst = np.zeros(U.shape[:-2])
    for j in range(L):
        for k in range(j + 1, L):
            now = U[..., j, :] ** 2 - U[..., k, :] ** 2
            then = u0[..., j, :] ** 2 - u0[..., k, :] ** 2
            worst = np.maximum(worst, np.max(np.abs(now - then), axis=-1))
    return worst


def small_config_tables(overrides: dict | None = None) -> dict:
    """Nested config tables of a tiny, well-conditioned run, with dotted-key ``overrides``
    (``{"model.depth": 2}``).

    Defaults: n = 10 samples, d = 12, 3 nonzeros, one X shared by the seeds, depth 3, gaussian init (alpha 0.7, jitter 0.3,
    random signs: every coordinate satisfies (A) and the signs are mixed), linear checkpoints.
    """
    tables = {
        "problem": {"n": 10, "d": 12, "sparsity": 3, "seed": 3, "per_seed_data": False},
        "model": {"depth": 3, "alpha": 0.7, "init": "gaussian", "jitter": 0.3, "signs": "random"},
        "integrator": {"method": "dopri5", "rtol": 1e-10, "atol": 1e-14, "dt": 0.01, "t_end": 2.0},
        "run": {"seeds": 2, "seed": 5, "checkpoints": 5, "spacing": "linear"},
    }
    for key, value in (overrides or {}).items():
        section, name = key.split(".")
        tables.setdefault(section, {})[name] = value
    return tables


# -- the difference and power parametrizations ----------------------------------------------------
# theta = prod_j u^j - prod_j v^j (layers (2L, d), the u half first) or u^D - v^D (layers (2, d));
# every layer row moves by -g times the derivative of theta in that row.
def parametrized_theta(name: str, U: np.ndarray, power: float = 0.0) -> np.ndarray:
    """theta of layers U (P, d) for ``name`` in product, difference, power."""
    if name == "power":
        return U[0] ** power - U[1] ** power
    if name == "difference":
        L = U.shape[0] // 2
        return np.prod(U[:L], axis=0) - np.prod(U[L:], axis=0)
    return np.prod(U, axis=0)


def parametrized_theta_gradient(name: str, U: np.ndarray, power: float = 0.0) -> np.ndarray:
    """d theta / d U, shape (P, d): all-but-one products (v half negated), or +-D u^(D-1)."""
    if name == "power":
        return np.stack([power * U[0] ** (power - 1), -power * U[1] ** (power - 1)])
    if name == "difference":
        L = U.shape[0] // 2
        return np.concatenate([all_but_one_products(U[:L]), -all_but_one_products(U[L:])])
    return all_but_one_products(U)


def parametrized_flow_rhs(X, y, name: str, rows: int, power: float = 0.0, clock: bool = False):
    """The flattened layer flow vec(U) (P*d,) -> d vec(U)/dt, for ``solve_ivp``; with ``clock``
    the state carries s = int_0^t g(theta) after the layers (P*d + d,)."""
    d = X.shape[1]

    def rhs(t, z):
        U = z[: rows * d].reshape(rows, d)
        g = gradient(X, y, parametrized_theta(name, U, power))
        du = (-g[None, :] * parametrized_theta_gradient(name, U, power)).ravel()
        return np.concatenate([du, g]) if clock else du

    return rhs


def parametrized_reference_layers(X, y, u0, times, name: str, power: float = 0.0, clock=False):
    """Layers (and with ``clock`` the clocks s) at ``times`` by DOP853 (rtol 1e-12, atol 1e-14),
    one interval at a time. u0 (P, d); returns (len(times), P, d) [, (len(times), d)]."""
    rows, d = u0.shape
    rhs = parametrized_flow_rhs(X, y, name, rows, power, clock)
    z = np.concatenate([u0.ravel(), np.zeros(d)]) if clock else u0.ravel().copy()
    out = [z.copy()]
    for k in range(1, len(times)):
        sol = solve_ivp(rhs, (times[k - 1], times[k]), z, method="DOP853",
                        rtol=REFERENCE_RTOL, atol=REFERENCE_ATOL)
        assert sol.success, sol.message
        z = sol.y[:, -1]
        out.append(z.copy())
    out = np.array(out)
    layers = out[:, : rows * d].reshape(len(times), rows, d)
    return (layers, out[:, rows * d:]) if clock else layers


def parametrized_gradient_descent(X, y, u0, eta: float, steps: int, name: str, power: float = 0.0):
    """Plain gradient descent on the layers of ``name``; every iterate, (steps + 1, P, d)."""
    U = np.array(u0, dtype=np.float64)
    out = [U.copy()]
    for _ in range(steps):
        g = gradient(X, y, parametrized_theta(name, U, power))
        U = U - eta * g[None, :] * parametrized_theta_gradient(name, U, power)
        out.append(U.copy())
    return np.array(out)
