"""Convergence bounds of the gradient flow on f(theta) = ||X theta - y||^2 / (2n), f* = min f.

Along the flow d theta / dt = -h(theta) g(theta) (Labarrière et al., arXiv:2412.16765; for every
parametrization, h from the clock map, :class:`ddln_fast.theory.Geometry`):

- sublinear, any convex f: f(theta(t)) - f* <= D_Q(theta*, theta0) / t;
- Polyak–Łojasiewicz, with mu = lambda_min^+(X X^T) / n:
      f(theta(t)) - f* <= (f0 - f*) exp(-2 mu int_0^t min_i h_i(theta_i(s)) ds)
                       <= (f0 - f*) exp(-2 mu c_A t),
  c_A = min_i min_theta h_i (the product under assumption (A): min_i prod_k delta^k_i).

These are theorems about the exact flow: a run follows it to its integration tolerance, so a
bound "holds" at a checkpoint within :data:`BOUND_RTOL` and :data:`BOUND_ATOL` (see
:func:`bound_held`).
"""

from __future__ import annotations

import numpy as np

# A bound "holds" at a checkpoint when f - f* <= bound * (1 + BOUND_RTOL) + BOUND_ATOL * (f0 - f*):
# the simulated loss carries the integrator's error (rtol ~ 1e-8 on theta), and f - f* cannot be
# resolved below rounding of f itself.
BOUND_RTOL = 1e-6
BOUND_ATOL = 1e-13


def pl_constant(X: np.ndarray) -> float:
    """mu = lambda_min^+(X X^T) / n: the PL constant of f = ||X theta - y||^2 / (2n) on the row
    space (the smallest nonzero eigenvalue when X is rank deficient). X of shape (n, d)."""
    X = np.asarray(X, dtype=np.float64)
    sv = np.linalg.svd(X, compute_uv=False)
    sv = sv[sv > 1e-12 * sv[0]]
    return float(sv[-1] ** 2 / X.shape[0])


def c_a(geometry) -> np.ndarray:
    """c_A of every seed, shape (S,): the smallest h any coordinate can reach,
    min_i min_theta h_i (:meth:`ddln_fast.theory.Geometry.min_h`)."""
    return np.min(geometry.min_h(), axis=1)


def rate_integral(t: np.ndarray, h_min: np.ndarray) -> np.ndarray:
    """int_0^t min_i h_i(theta_i(s)) ds at the checkpoints, from min_i h_i at the checkpoints
    (t, h_min of shape (K,)): the smaller of the two ends on each interval, a lower bound
    wherever the checkpoints are dense enough for min_i h_i to be monotone between them."""
    steps = np.minimum(h_min[1:], h_min[:-1]) * np.diff(t)
    return np.concatenate([[0.0], np.cumsum(steps)])


def pl_bound(f0_gap: float, mu: float, integral) -> np.ndarray:
    """(f(theta_0) - f*) exp(-2 mu integral): the PL bound with ``integral`` = c_A t or
    :func:`rate_integral`."""
    return f0_gap * np.exp(-2.0 * mu * np.asarray(integral, dtype=np.float64))


def sublinear_bound(t, bregman_gap: float) -> np.ndarray:
    """D_Q(theta*, theta_0) / t (inf at t = 0)."""
    t = np.asarray(t, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(t > 0, bregman_gap / np.where(t > 0, t, 1.0), np.inf)


def bound_held(gap: np.ndarray, bound: np.ndarray) -> bool:
    """Whether f - f* (``gap``, shape (K,), gap[0] = f0 - f*) stays below ``bound`` at every
    checkpoint, within BOUND_RTOL and BOUND_ATOL (f0 - f*)."""
    return bool(np.all(gap <= bound * (1 + BOUND_RTOL) + BOUND_ATOL * gap[0]))
