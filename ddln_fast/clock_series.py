"""Chebyshev and power-series helpers for the clock tables (Numba, scalar, no allocation).

Chebyshev conventions: a panel [lo, hi] maps to t in [-1, 1]; a function is sampled at the
``n`` first-kind nodes t_j = cos(pi (j + 1/2) / n) and stored as coefficients c_0..c_{n-1} of
sum_k c_k T_k(t) (c_0 not halved), evaluated by Clenshaw's recurrence.

Power series are plain coefficient arrays a_0, a_1, ... with a_0 = 1 where it matters.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .kernels import JIT_OPTIONS

#: Strict IEEE arithmetic: the double-double sums and the compensated clocks of the clock map
#: rely on the exact rounding order, which ``reassoc``/``contract`` would change, and ``afn``
#: trades ulps in exp/log/sinh that the 1e-15 targets need.
STRICT_OPTIONS = dict(JIT_OPTIONS, fastmath=False)


def chebyshev_matrix(n: int) -> np.ndarray:
    """M with c = M @ f for samples f at the n first-kind nodes (shape (n, n))."""
    k = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    m = (2.0 / n) * np.cos(np.pi * k * (j + 0.5) / n)
    m[0] *= 0.5
    return m


def chebyshev_nodes(n: int) -> np.ndarray:
    """First-kind nodes t_j = cos(pi (j + 1/2) / n) in (-1, 1), shape (n,)."""
    return np.cos(np.pi * (np.arange(n) + 0.5) / n)


#: Inlined into the kernels: a helper that receives arrays and is called (not inlined) costs the
#: passing of every array's fields per call (measured: the table lookup called, not inlined, took
#: a jittered depth-3 coordinate from 70 to 88 ns), and reference-count updates in code compiled
#: with them.
INLINE_OPTIONS = dict(STRICT_OPTIONS, inline="always")


@njit(**INLINE_OPTIONS)
def clenshaw(c, t):
    """sum_k c_k T_k(t) for the coefficient row ``c`` (n,)."""
    b1 = 0.0
    b2 = 0.0
    for k in range(c.shape[0] - 1, 0, -1):
        b0 = 2.0 * t * b1 - b2 + c[k]
        b2 = b1
        b1 = b0
    return t * b1 - b2 + c[0]


@njit(**INLINE_OPTIONS)
def clenshaw_row(a, row, start, n, t):
    """Clenshaw on the coefficients a[row, start:start + n] without making a view."""
    b1 = 0.0
    b2 = 0.0
    for k in range(start + n - 1, start, -1):
        b0 = 2.0 * t * b1 - b2 + a[row, k]
        b2 = b1
        b1 = b0
    return t * b1 - b2 + a[row, start]


@njit(**INLINE_OPTIONS)
def horner_row(a, row, start, n, z):
    """sum_k a[row, start + k] z^k without making a view."""
    acc = 0.0
    for k in range(start + n - 1, start - 1, -1):
        acc = acc * z + a[row, k]
    return acc


@njit(**STRICT_OPTIONS)
def to_coefficients(matrix, values, out):
    """out = matrix @ values (Chebyshev coefficients of node samples), no allocation."""
    n = values.shape[0]
    for k in range(n):
        acc = 0.0
        for j in range(n):
            acc += matrix[k, j] * values[j]
        out[k] = acc


@njit(**STRICT_OPTIONS)
def antiderivative(a, out):
    """Coefficients (n + 1,) of the antiderivative F of sum_k a_k T_k with F(-1) = 0."""
    n = a.shape[0]
    for k in range(n + 1):
        out[k] = 0.0
    for k in range(1, n + 1):
        left = a[k - 1] if k >= 2 else 2.0 * a[0]
        right = a[k + 1] if k + 1 < n else 0.0
        out[k] = (left - right) / (2.0 * k)
    # F(-1) = sum_k out_k (-1)^k must vanish
    acc = 0.0
    sign = -1.0
    for k in range(1, n + 1):
        acc += sign * out[k]
        sign = -sign
    out[0] = -acc


@njit(**STRICT_OPTIONS)
def series_power(a, alpha, out):
    """Power series of A(z)^alpha for A = sum a_n z^n with a_0 = 1 (J. C. P. Miller's recurrence)."""
    n_terms = out.shape[0]
    out[0] = 1.0
    for n in range(1, n_terms):
        acc = 0.0
        for j in range(1, min(n, a.shape[0] - 1) + 1):
            acc += ((alpha + 1.0) * j - n) * a[j] * out[n - j]
        out[n] = acc / n


@njit(**INLINE_OPTIONS)
def horner(c, z):
    """sum_n c_n z^n."""
    acc = 0.0
    for k in range(c.shape[0] - 1, -1, -1):
        acc = acc * z + c[k]
    return acc


@njit(**INLINE_OPTIONS)
def two_sum(a, b):
    """(s, e) with s = fl(a + b) and s + e = a + b exactly (Knuth)."""
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, e


@njit(**INLINE_OPTIONS)
def dd_add(hi, lo, x):
    """(hi + lo) + x as a renormalized double-double (s, e): two error-free two-sums, so that
    an increment far below an ulp of hi is kept in e."""
    s, e = two_sum(hi, x)
    return two_sum(s, e + lo)


@njit(**INLINE_OPTIONS)
def two_product(a, b):
    """(p, e) with p = fl(a b) and p + e = a b exactly (Dekker's splitting, no FMA)."""
    p = a * b
    split = 134217729.0  # 2^27 + 1
    t = split * a
    a_hi = t - (t - a)
    a_lo = a - a_hi
    t = split * b
    b_hi = t - (t - b)
    b_lo = b - b_hi
    e = ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo
    return p, e


@njit(**INLINE_OPTIONS)
def dd_scale(hi, lo, x):
    """(hi + lo) x as a renormalized double-double: hi x exact (Dekker), lo x rounded."""
    p, e = two_product(hi, x)
    return two_sum(p, e + lo * x)


@njit(**INLINE_OPTIONS)
def dd_difference(x_hi, x_lo, y_hi, y_lo):
    """(x_hi + x_lo) - (y_hi + y_lo) rounded to one double, with the leading difference exact."""
    s, e = two_sum(x_hi, -y_hi)
    return s + (e + (x_lo - y_lo))
