"""Sharpness: the largest eigenvalue of the loss Hessian in layer space, per seed.

The loss of the layers is F(U) = ||X theta(U) - y||^2 / (2n). With J^j = d theta / d u^j (for the
product theta = u^1 * ... * u^L the all-but-one products P^j = prod_{k != j} u^k) and
g = X^T (X theta - y) / n, its Hessian applied to a direction V = (v^1, ..., v^L) is

    (H V)^j = (X^T X dtheta / n) * J^j + g * dJ^j[V],   dtheta = sum_k v^k * J^k,

where dJ^j[V] is the derivative of J^j along V (product: sum_{k != j} v^k prod_{m != j, k} u^m).
P^j and dP^j come from prefix and suffix products of the dual numbers (u^k, v^k), so nothing is
divided by a layer (layers may be exactly zero, e.g. the first layer of ``first_layer_zero``).
The difference parametrization (:mod:`ddln_fast.parametrization`) has these per half, the v half
negated; the power one J = +-D u^(D-1) and dJ = +-D (D - 1) u^(D-2) v.

The largest (algebraic) eigenvalue lambda_max is found by the Lanczos iteration on these exact
products, all seeds together; gradient descent with step dt is linearly stable at U only if
dt <= 2 / lambda_max (Cohen et al. call lambda_max the sharpness; the edge of stability is
dt ~ 2 / lambda_max). Every product is in float64.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import eigvalsh_tridiagonal

#: Where the stability interval of each fixed-step method on the negative real axis ends:
#: z = -dt * lambda is stable for z in [-bound, 0] (Euler: |1 + z| <= 1; classical RK4: the
#: real root of |1 + z + z^2/2 + z^3/6 + z^4/24| = 1, Hairer–Wanner II, Section IV.2).
STABILITY_BOUNDS = {"euler": 2.0, "rk4": 2.785293563405282}


def _as_batches(X, y, layers):
    """float64 arrays with a leading seed axis: X (S, n, d) or (n, d), y (S, n) or (n,),
    layers (S, L, d); and whether the caller passed one seed."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    layers = np.asarray(layers, dtype=np.float64)
    single = layers.ndim == 2
    if single:
        layers = layers[None]
        if X.ndim == 3:
            raise ValueError("one seed's layers (L, d) need X of shape (n, d)")
    if X.ndim == 3 and X.shape[0] != layers.shape[0]:
        raise ValueError(f"X has {X.shape[0]} per-seed designs for {layers.shape[0]} seeds")
    return X, y, layers, single


def _times_X(X, theta):
    """X theta for every seed: theta (S, d) -> (S, n)."""
    return theta @ X.T if X.ndim == 2 else np.einsum("snd,sd->sn", X, theta)


def _times_XT(X, r):
    """X^T r for every seed: r (S, n) -> (S, d)."""
    return r @ X if X.ndim == 2 else np.einsum("snd,sn->sd", X, r)


def _products_and_derivatives(layers, V):
    """P^j = prod_{k != j} u^k and its derivative along V, both (S, L, d), by prefix and suffix
    products of the dual numbers (u^k, v^k)."""
    S, L, d = layers.shape
    pre_val = np.ones((S, L + 1, d))
    pre_der = np.zeros((S, L + 1, d))
    suf_val = np.ones((S, L + 1, d))
    suf_der = np.zeros((S, L + 1, d))
    for j in range(L):
        pre_val[:, j + 1] = pre_val[:, j] * layers[:, j]
        pre_der[:, j + 1] = pre_der[:, j] * layers[:, j] + pre_val[:, j] * V[:, j]
        k = L - 1 - j
        suf_val[:, k] = suf_val[:, k + 1] * layers[:, k]
        suf_der[:, k] = suf_der[:, k + 1] * layers[:, k] + suf_val[:, k + 1] * V[:, k]
    P = pre_val[:, :L] * suf_val[:, 1:]
    dP = pre_der[:, :L] * suf_val[:, 1:] + pre_val[:, :L] * suf_der[:, 1:]
    return P, dP


def _jacobian_and_derivative(layers, V, parametrization):
    """J = d theta / d layers and its derivative along V, both (S, P, d)."""
    if parametrization is None or parametrization.name == "product":
        return _products_and_derivatives(layers, V)
    if parametrization.name == "power":
        D = parametrization.power
        sign = np.array([1.0, -1.0])[None, :, None]
        return sign * D * layers ** (D - 1), sign * (D * (D - 1)) * layers ** (D - 2) * V
    L = parametrization.depth
    Pu, dPu = _products_and_derivatives(layers[:, :L], V[:, :L])
    Pv, dPv = _products_and_derivatives(layers[:, L:], V[:, L:])
    return np.concatenate([Pu, -Pv], axis=1), np.concatenate([dPu, -dPv], axis=1)


def hessian_vector_product(X, y, layers, V, parametrization=None) -> np.ndarray:
    """H V for the loss F(U) = ||X theta(U) - y||^2 / (2n) of every seed (exact).

    Parameters
    ----------
    X : ndarray of shape (n, d) or (S, n, d)
        Shared design or one per seed.
    y : ndarray of shape (n,) or (S, n)
    layers : ndarray of shape (S, P, d)
        The point U of every seed.
    V : ndarray of shape (S, P, d)
        The directions.
    parametrization : Parametrization, optional
        How theta is made of the layers (default: their product).

    Returns
    -------
    ndarray of shape (S, P, d)
    """
    X, y, layers, _ = _as_batches(X, y, layers)
    V = np.asarray(V, dtype=np.float64).reshape(layers.shape)
    n = X.shape[-2]
    P, dP = _jacobian_and_derivative(layers, V, parametrization)
    theta = layers.prod(axis=1) if parametrization is None else parametrization.theta(layers)
    g = _times_XT(X, _times_X(X, theta) - y) / n
    dtheta = np.sum(V * P, axis=1)
    q = _times_XT(X, _times_X(X, dtheta)) / n
    return q[:, None, :] * P + g[:, None, :] * dP


def top_hessian_eigenvalue(X, y, layers, *, rtol: float = 1e-10, max_iter: int = 300,
                           seed: int = 0, parametrization=None) -> np.ndarray | float:
    """lambda_max, the largest eigenvalue of the loss Hessian in layer space, per seed.

    Lanczos on exact Hessian-vector products, all seeds at once, from a random start (fixed
    ``seed``: the result is reproducible). A seed stops when its largest Ritz value changes by
    at most ``rtol`` (relative) between two iterations, or when its Krylov space is exhausted
    (then the value is exact). The largest Ritz value never exceeds lambda_max, so an early stop
    errs low.

    Parameters
    ----------
    X : ndarray of shape (n, d) or (S, n, d)
    y : ndarray of shape (n,) or (S, n)
    layers : ndarray of shape (S, L, d), or (L, d) for one seed
    rtol : float
        Relative change of the estimate that ends the iteration.
    max_iter : int
        At most this many Hessian-vector products per seed (and at most L * d).
    parametrization : Parametrization, optional
        How theta is made of the layers (default: their product).

    Returns
    -------
    ndarray of shape (S,), or a float for layers of shape (L, d)
    """
    X, y, layers, single = _as_batches(X, y, layers)
    S, L, d = layers.shape
    size = L * d
    iterations = min(max_iter, size)
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((S, size))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    v_prev = np.zeros_like(v)
    alphas = np.zeros((S, iterations))
    betas = np.zeros((S, iterations))
    estimate = np.full(S, -np.inf)
    done = np.zeros(S, dtype=bool)
    steps = np.zeros(S, dtype=np.int64)
    for k in range(iterations):
        w = hessian_vector_product(X, y, layers, v.reshape(S, L, d), parametrization).reshape(S, size)
        alpha = np.einsum("si,si->s", w, v)
        w -= alpha[:, None] * v + betas[:, k - 1][:, None] * v_prev if k else alpha[:, None] * v
        beta = np.linalg.norm(w, axis=1)
        for s in np.flatnonzero(~done):
            alphas[s, k], betas[s, k] = alpha[s], beta[s]
            steps[s] = k + 1
            top = float(eigvalsh_tridiagonal(alphas[s, :k + 1], betas[s, :k], select="i",
                                             select_range=(k, k))[0])
            scale = max(abs(top), np.max(np.abs(alphas[s, :k + 1])), 1e-300)
            exhausted = beta[s] <= 1e-12 * scale
            if exhausted or abs(top - estimate[s]) <= rtol * scale:
                done[s] = True
            estimate[s] = top
        if done.all():
            break
        safe = np.where(beta > 0, beta, 1.0)
        v_prev, v = v, w / safe[:, None]
    return float(estimate[0]) if single else estimate


def stability_limits(method: str, X, y, layers, bound: float | None = None, shift: float = 0.0,
                     **kwargs) -> np.ndarray:
    """Largest stable step of a fixed-step method at the layers of every seed: the method's
    stability bound (``bound``, default :data:`STABILITY_BOUNDS` of ``method``) over
    lambda_max + ``shift`` (weight decay adds it to every eigenvalue; inf where that is <= 0),
    shape (S,)."""
    lam = np.atleast_1d(top_hessian_eigenvalue(X, y, layers, **kwargs)) + shift
    bound = STABILITY_BOUNDS[method] if bound is None else bound
    with np.errstate(divide="ignore"):
        return np.where(lam > 0, bound / np.where(lam > 0, lam, 1.0), np.inf)
