"""The implicit-bias limit: where gradient flow on the layers ends, predicted without training.

If the flow converges to a minimizer of f, the limit is the Bregman projection of the
initialization onto argmin f = {A theta = c} (Labarrière et al., arXiv:2412.16765; Woodworth et
al. 2020 for the difference and power parametrizations):

    theta_inf = argmin { D_Q(theta, theta0) : A theta = c } = F(A^T mu),

with mu the minimizer of the convex dual Psi(mu) = -sum_i G_i((A^T mu)_i) + mu . c, whose
gradient is c - A F(A^T mu) and Hessian A diag(h) A^T (F, G, h: the clock map, see
:mod:`ddln_fast.theory`). Damped Newton solves it; trial points outside the blow-up clocks have
Psi = +inf and are backtracked. Also here: the orthonormal description of argmin f, and the
minimum-l1 / weighted-l1 (linear programs) and minimum-l2 interpolators the limit approaches at
small and large scale.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .parametrization import Parametrization
from .theory import Geometry, require_assumption_a
from .threads import serial_blas


@dataclass
class Constraints:
    """{theta : A theta = c} = argmin f, with A of orthonormal rows spanning range(X^T).

    ``projected`` is True when X has rank < n (no interpolator in general): the set is then the
    set of least-squares minimizers, not {X theta = y}.
    """

    A: np.ndarray  # (r, d)
    c: np.ndarray  # (r,)
    rank: int
    n: int
    f_star: float
    projected: bool


def constraints(X: np.ndarray, y: np.ndarray, rcond: float = 1e-12) -> Constraints:
    """Orthonormal description of argmin f for f = ||X theta - y||^2 / (2n) by a thin SVD."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = X.shape[0]
    U, sv, Vt = np.linalg.svd(X, full_matrices=False)
    r = int(np.sum(sv > rcond * sv[0])) if sv.size and sv[0] > 0 else 0
    coef = U[:, :r].T @ y
    residual = y - U[:, :r] @ coef
    f_star = float(residual @ residual / (2 * n))
    return Constraints(Vt[:r], coef / sv[:r], r, n, f_star, r < n)


def min_l2_interpolator(X, y) -> np.ndarray:
    """argmin ||theta||_2 over argmin f (pseudo-inverse)."""
    return np.linalg.lstsq(np.asarray(X, float), np.asarray(y, float), rcond=None)[0]


def weighted_l1_interpolator(X, y, w_plus, w_minus=None) -> np.ndarray:
    """argmin sum_i w+_i max(theta_i, 0) + w-_i max(-theta_i, 0) over argmin f (an LP, HiGHS).

    theta = theta+ - theta-, both >= 0, on X theta = y when X has full row rank, else on the
    orthonormal description of argmin f. (Column generation from the predicted support was
    tried: 17 rounds and 29 s against 6-16 s for the full LP with presolve at d = 10^4, n = 200.)
    """
    from scipy.optimize import linprog

    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    cons = constraints(X, y)
    A, c = (X, y) if not cons.projected else (cons.A, cons.c)
    d = A.shape[1]
    w_plus = np.broadcast_to(np.asarray(w_plus, float), (d,))
    w_minus = w_plus if w_minus is None else np.broadcast_to(np.asarray(w_minus, float), (d,))
    # presolve off: on a dense X it only costs (d = 10^4, n = 200: 1.4 s without, 5.9 s with)
    res = linprog(np.concatenate([w_plus, w_minus]), A_eq=np.hstack([A, -A]), b_eq=c,
                  bounds=(0, None), method="highs", options={"presolve": False})
    if res.status != 0:
        raise RuntimeError(f"the l1 linear program failed: {res.message}")
    return res.x[:d] - res.x[d:]


def min_l1_interpolator(X, y) -> np.ndarray:
    """argmin ||theta||_1 over argmin f (an LP, scipy's HiGHS)."""
    return weighted_l1_interpolator(X, y, 1.0)


@dataclass
class Limit:
    """The Bregman projection of one seed's initialization onto argmin f.

    Attributes
    ----------
    theta : ndarray of shape (d,)
    mu : ndarray of shape (r,)
        Dual variable: phi(theta) = phi(theta0) - A^T mu.
    residual : float
        ||A theta - c|| / max(1, ||c||) at the end.
    iterations : int
    projected : bool
        X has rank < n: the limit is the projection onto the least-squares minimizers.
    """

    theta: np.ndarray
    mu: np.ndarray
    residual: float
    iterations: int
    projected: bool
    rank: int


def bregman_projection(geometry: Geometry, seed: int, cons: Constraints, tol: float = 1e-12,
                       max_iter: int = 500) -> Limit:
    """theta_inf = argmin {D_Q(theta, theta0) : A theta = c} for one seed, by damped Newton on the
    dual Psi(mu) = -sum_i G_i((A^T mu)_i) + mu . c (gradient c - A theta(mu), Hessian
    A diag(h(theta)) A^T, theta(mu) = F(A^T mu)). Armijo backtracking also rejects steps whose
    clocks A^T mu leave the blow-up clocks (Psi = +inf there: the clock flow blows up)."""
    A, c = cons.A, cons.c
    scale = max(1.0, float(np.linalg.norm(c)))
    mu = np.zeros(A.shape[0])
    lower, upper = geometry.blow_up[0][seed], geometry.blow_up[1][seed]

    def evaluate(mu):
        s = A.T @ mu
        if not np.all((s > lower) & (s < upper)):
            return np.inf, None, None
        with np.errstate(over="ignore", invalid="ignore"):
            theta, h, G = geometry.evaluate(s, seed, G=True)
            value = float(mu @ c) - float(np.sum(G))
        if not np.isfinite(value):
            return np.inf, None, None
        return value, theta, h

    psi_val, theta, h = evaluate(mu)
    best = (np.inf, theta, mu)
    stalled = 0
    progress = True  # the last step decreased the dual by more than its rounding
    it = 0
    for it in range(1, max_iter + 1):
        grad = c - A @ theta
        residual = float(np.linalg.norm(grad)) / scale
        if residual < 0.5 * best[0] or progress:
            stalled = 0
        else:
            stalled += 1
        if residual < best[0]:
            best = (residual, theta, mu)
        # stop at the tolerance, or at the floor rounding sets: when the limit sits close to a
        # blow-up clock (small alpha, depth >= 3) the clocks are huge and A^T mu carries only
        # eps |s| of absolute precision
        if residual <= tol or stalled >= 6:
            break
        step = _newton_step(A, h, grad)
        slope = float(grad @ step)
        if not slope < 0:  # rounding beat the Newton direction: steepest descent on Psi
            step = -grad
            slope = -float(grad @ grad)
        t = 1.0
        accepted = False
        for _ in range(80):
            trial_val, trial_theta, trial_h = evaluate(mu + t * step)
            if np.isfinite(trial_val):
                # Armijo on the dual; where its decrease is below the rounding of Psi, the
                # residual norm decides (Newton on grad Psi = 0)
                if trial_val <= psi_val + 1e-4 * t * slope:
                    accepted = True
                elif trial_val <= psi_val + 1e-14 * abs(psi_val):
                    trial_res = float(np.linalg.norm(c - A @ trial_theta)) / scale
                    accepted = trial_res < (1 - 1e-4 * t) * residual
                if accepted:
                    break
            t *= 0.5
        if not accepted:
            break
        mu = mu + t * step
        progress = psi_val - trial_val > 1e-12 * max(1.0, abs(psi_val))
        psi_val, theta, h = trial_val, trial_theta, trial_h
    grad = c - A @ theta
    residual = float(np.linalg.norm(grad)) / scale
    if best[0] < residual:
        residual, theta, mu = best
    return Limit(theta, mu, residual, it, cons.projected, cons.rank)


class PredictionWarning(UserWarning):
    """The dual Newton iteration of the implicit-bias limit stopped above its tolerance."""


def warn_if_not_converged(limit: Limit, seed: int, tol: float) -> None:
    """Warn (one line, naming the seed) when ``limit.residual`` is above ``tol``: the predicted
    theta_inf then satisfies the constraints only to that relative residual."""
    if not limit.residual <= tol:
        import warnings

        warnings.warn(f"seed {seed}: the implicit-bias limit is not at tolerance: dual residual "
                      f"{limit.residual:.2g} > {tol:.2g} after {limit.iterations} Newton iterations "
                      f"(rounding near the edge of the dual range, e.g. at a tiny alpha); theta_inf "
                      f"is accurate to about that relative residual", PredictionWarning, stacklevel=3)


def _newton_step(A: np.ndarray, H: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """Solve (A diag(H) A^T) step = -grad through a QR of diag(sqrt H) A^T: h spans up to 17
    decades for small alpha, and squaring that condition number in the normal matrix made the
    Newton direction point uphill (measured at depth 5, alpha 0.01)."""
    from scipy.linalg import solve_triangular

    B = np.sqrt(H)[:, None] * A.T
    R = np.linalg.qr(B, mode="r")
    try:
        z = solve_triangular(R, -grad, trans="T", check_finite=False)
        return solve_triangular(R, z, check_finite=False)
    except (np.linalg.LinAlgError, ValueError):
        return -np.linalg.lstsq(B.T @ B, grad, rcond=None)[0]


@dataclass
class Prediction:
    """``predict`` for every seed of a config (arrays have a leading seed axis S)."""

    theta: np.ndarray          # (S, d)
    residual: np.ndarray       # (S,)
    iterations: np.ndarray     # (S,)
    projected: bool
    rank: int
    n: int
    min_l1: np.ndarray | None = None   # (S, d)
    min_l2: np.ndarray | None = None   # (S, d)
    seconds: float = 0.0               # the Bregman projections (and the SVDs of X)
    interpolator_seconds: float = 0.0  # the minimum-l1 LPs and minimum-l2 solutions

    @property
    def message(self) -> str:
        if self.projected:
            return (f"X has rank {self.rank} < n = {self.n}: no exact interpolator in general; "
                    f"predicted the Bregman projection onto the least-squares minimizers (argmin f)")
        return "Bregman projection of the initialization onto {X theta = y}"


def predict_arrays(X: np.ndarray, y: np.ndarray, u0: np.ndarray, tol: float = 1e-12,
                   interpolators: bool = False, parametrization: Parametrization | None = None) -> Prediction:
    """The implicit-bias limit of every seed from arrays.

    Parameters
    ----------
    X : ndarray of shape (n, d) or (S, n, d)
    y : ndarray of shape (n,) or (S, n)
    u0 : ndarray of shape (S, P, d)
        Initial layers of the parametrization (P = L, 2L or 2).
    interpolators : bool
        Also compute the minimum-l1 (LP) and minimum-l2 interpolators.
    parametrization : Parametrization, optional
        Default: the product of the P layers (which needs assumption (A), else InputError).
    """
    with serial_blas():
        return _predict_arrays(X, y, u0, tol, interpolators, parametrization)


def _predict_arrays(X, y, u0, tol, interpolators, parametrization):
    start = time.perf_counter()
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    u0 = np.asarray(u0, dtype=np.float64)
    S = u0.shape[0]
    per_seed = X.ndim == 3
    param = parametrization or Parametrization.of_layers("product", u0.shape[1])
    if param.name == "product":
        for s in range(S):
            require_assumption_a(u0[s], what=f"the implicit-bias limit of seed {s}")
    geometry = Geometry.from_layers(u0, param)
    shared = None if per_seed else constraints(X, y)
    thetas, residuals, iterations, l1s, l2s = [], [], [], [], []
    projected, rank = False, 0
    for s in range(S):
        cons = constraints(X[s], y[s]) if per_seed else shared
        limit = bregman_projection(geometry, s, cons, tol)
        warn_if_not_converged(limit, s, tol)
        thetas.append(limit.theta)
        residuals.append(limit.residual)
        iterations.append(limit.iterations)
        projected |= limit.projected
        rank = cons.rank
    seconds = time.perf_counter() - start
    if interpolators:
        for s in range(S if per_seed else 1):
            Xs, ys = (X[s], y[s]) if per_seed else (X, y)
            l1s.append(min_l1_interpolator(Xs, ys))
            l2s.append(min_l2_interpolator(Xs, ys))
        if not per_seed:
            l1s, l2s = l1s * S, l2s * S
    return Prediction(np.array(thetas), np.array(residuals), np.array(iterations), projected,
                      rank, X.shape[-2], np.array(l1s) if interpolators else None,
                      np.array(l2s) if interpolators else None, seconds,
                      time.perf_counter() - start - seconds)


def predict(config, interpolators: bool = False, tol: float = 1e-12) -> Prediction:
    """:func:`predict_arrays` on the data, initialization and parametrization of a config."""
    from .init import initial_layers
    from .problem import make_problem

    problem = make_problem(config)
    u0 = initial_layers(config, problem.d)
    return predict_arrays(problem.X, problem.y, u0, tol, interpolators,
                          Parametrization.from_config(config))


def predict_limit(config) -> np.ndarray:
    """Where gradient flow on the layers ends, without training: theta_inf of shape (S, d).

    The Bregman projection of each seed's initialization onto {X theta = y} (onto argmin f when
    X has rank < n), for every parametrization (the product under assumption (A), else
    InputError)."""
    return predict(config).theta
