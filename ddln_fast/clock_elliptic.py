"""The depth-3 clock map of a unique smallest layer in closed form (Jacobi's theta functions).

At depth 3 the smallest layer r of a half moves by dr/dw = sqrt((r^2 + g_1)(r^2 + g_2)) with
gaps 0 < g_1 < g_2 (normalized units; w = psi(r) is the clock coordinate of
:mod:`ddln_fast.clock_families`). The solution through r = 0 is an elliptic function:

    r = sqrt(g_1) sc(sqrt(g_2) w | m),   m = 1 - g_1 / g_2,

which blows up at w = b = K(m) / sqrt(g_2). With zeta = (pi / 2) (w / b) and the nome
q = exp(-pi K(1 - m) / K(m)), Jacobi's theta functions give sc = theta_1 / (sqrt(k') theta_2)
(DLMF 22.2.4-5, k' = sqrt(1 - m)), so

    r = rho N(zeta) / D(zeta),   rho = (g_1 g_2)^(1/4),
    N = sum_n (-1)^n q^(n(n+1)) sin((2n+1) zeta),   D = sum_n q^(n(n+1)) cos((2n+1) zeta),

and, by sc(K - v) = 1 / (k' sc v), from the other end r = rho D(zeta') / N(zeta') with
zeta' = (pi / 2) (rem / b) and rem = b - w the distance to the blow-up (which the caller
knows to double-double). Both forms are used on zeta <= pi / 4 only, where N and D have no
cancellation, so r keeps full relative precision from 0 up to the blow-up.

The series are short: the family is used while g_2 / g_1 <= ``RATIO_LIMIT``, where q <= 0.44
and the terms fall below rounding by n = 7 (for the usual jitters, q < 0.1: three terms).
Larger ratios (a near tie of the two smallest layers) go to the tables of
:mod:`ddln_fast.clock_tables`. Compared with a table, nothing is built per coordinate (a table
costs 0.1-0.2 ms on one thread) and an evaluation is one sine and cosine plus a few products.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .clock_series import INLINE_OPTIONS, STRICT_OPTIONS

#: the largest gap ratio g_2 / g_1 served here (q = 0.44 there; above it, tables)
RATIO_LIMIT = 1e4
HALF_PI = 0.5 * math.pi
#: the series stop once (2n + 1) q^(n(n+1)) is below this (relative to the leading term)
SERIES_FLOOR = 1e-18
MAX_TERMS = 9


@njit(**INLINE_OPTIONS)
def theta_sums(s1, c1, q2, terms, stop_below_rounding):
    """(N, D, N', D') from s1 = sin zeta and c1 = cos zeta (q2 = q^2), with the terms
    n = 1 .. ``terms`` after the first; ``stop_below_rounding``: stop once they fall below
    SERIES_FLOOR (False keeps a fixed length, for a loop that must not branch)."""
    # rotation by 2 zeta, from (2n-1) zeta to (2n+1) zeta
    s2 = 2.0 * s1 * c1
    c2 = (c1 - s1) * (c1 + s1)
    num, den = s1, c1
    dnum, dden = c1, -s1
    sin_k, cos_k = s1, c1
    step = 1.0
    coef = 1.0
    sign = 1.0
    for n in range(1, terms + 1):
        step *= q2          # q^(2n)
        coef *= step        # q^(n(n+1))
        odd = 2.0 * n + 1.0
        if stop_below_rounding and coef * odd < SERIES_FLOOR:
            break
        sin_k, cos_k = sin_k * c2 + cos_k * s2, cos_k * c2 - sin_k * s2
        sign = -sign
        num += sign * coef * sin_k
        den += coef * cos_k
        dnum += sign * coef * odd * cos_k
        dden -= coef * odd * sin_k
    return num, den, dnum, dden


@njit(**INLINE_OPTIONS)
def theta_series(zeta, q2):
    """(N, D, N', D') at zeta (see the module docstring; q2 = q^2)."""
    return theta_sums(math.sin(zeta), math.cos(zeta), q2, MAX_TERMS - 1, True)


@njit(**INLINE_OPTIONS)
def elliptic_magnitude(w, rem, b, rho, q2):
    """Signed r from the clock coordinate w (|w| <= b / 2) or, past the middle, |r| from the
    distance rem to the blow-up (rem > 0)."""
    if abs(w) <= 0.5 * b:
        num, den, _, _ = theta_series(HALF_PI * (w / b), q2)
        return rho * num / den
    num, den, _, _ = theta_series(HALF_PI * (rem / b), q2)
    return rho * den / num


@njit(**STRICT_OPTIONS)
def _angle(t, q2):
    """zeta in [0, pi / 4] with N(zeta) / D(zeta) = t, for t in [0, 1] (Newton from the q = 0
    solution atan t; N - t D is increasing there)."""
    if t == 0.0:
        return 0.0
    zeta = math.atan(t)
    for _ in range(30):
        num, den, dnum, dden = theta_series(zeta, q2)
        step = (num - t * den) / (dnum - t * dden)
        zeta -= step
        # a few ulps: converged (quadratically); a tighter bound waits for an exact zero
        if abs(step) <= 4e-16 * zeta:
            break
    return zeta


@njit(**STRICT_OPTIONS)
def elliptic_clock(a, b, rho, q2):
    """(|w|, rem) at |r| = a: the inverse of :func:`elliptic_magnitude`, each of the two taken
    on the side where it is the precise one."""
    if a <= rho:
        w_abs = b * (_angle(a / rho, q2) / HALF_PI)
        return w_abs, b - w_abs
    rem = b * (_angle(rho / a, q2) / HALF_PI)
    return b - rem, rem


@njit(**STRICT_OPTIONS)
def elliptic_clocks(a, b, rho, q2, w_out, rem_out):
    for i in range(a.shape[0]):
        w_out[i], rem_out[i] = elliptic_clock(a[i], b[i], rho[i], q2[i])


def _agm(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Arithmetic-geometric mean, elementwise."""
    x = np.array(x, dtype=float)
    y = np.array(y, dtype=float)
    for _ in range(60):
        if np.all(np.abs(x - y) <= 4e-16 * x):
            break
        x, y = 0.5 * (x + y), np.sqrt(x * y)
    return 0.5 * (x + y)


def elliptic_constants(g1: np.ndarray, g2: np.ndarray):
    """(b, rho, q^2) of gaps 0 < g1 < g2 (arrays): K(m) = pi / (2 AGM(1, k')) with
    k' = sqrt(g1 / g2), and K(1 - m) likewise from k = sqrt((g2 - g1) / g2)."""
    g1 = np.asarray(g1, dtype=float)
    g2 = np.asarray(g2, dtype=float)
    k_prime = np.sqrt(g1 / g2)
    k = np.sqrt((g2 - g1) / g2)
    K = np.pi / (2.0 * _agm(np.ones_like(k), k_prime))
    K_prime = np.pi / (2.0 * _agm(np.ones_like(k), k))
    q = np.exp(-np.pi * K_prime / K)
    return K / np.sqrt(g2), np.sqrt(np.sqrt(g1) * np.sqrt(g2)), q * q
