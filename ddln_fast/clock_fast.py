"""The clock map evaluated with SIMD instructions where its coordinates are depth-3 elliptic.

That is the commonest map of the dual method: a depth-3 product whose layers are jittered or
signed (a unique smallest layer, other gaps not near a tie; :mod:`ddln_fast.clock_elliptic`).
The general loop of :mod:`ddln_fast.clock_kernels` serves every family, and a SIMD unit can run
none of what that takes: a branch on the family of each coordinate, its parameters read from one
row of the packed arrays, the C library's sine and cosine, and a theta series stopped once its
terms fall below rounding. Here the same arithmetic (the same helpers: the clock distances of
:mod:`ddln_fast.clock_families`, the theta sums of :mod:`ddln_fast.clock_elliptic`) runs for
one family only:

- the parameters one array each (structure of arrays, rows seed * d + coordinate);
- branch-free: both sides of the middle and both blow-ups by selects;
- a polynomial sine and cosine on [0, pi / 4] (the range of zeta; Taylor polynomials of degree
  17 and 18, whose truncation is below 1e-19);
- a fixed number of series terms, ``TERMS``: as many as the general loop takes at most
  (q^2 <= 0.19 at the family's gap-ratio limit, below ``Q2_LIMIT``; jitter 0.1 gives
  q^2 < 0.005, where the terms past the third are far below rounding and cost 0.7 ns).

LLVM then vectorizes the loop over coordinates: 36.5 -> 11.3 ns per coordinate on one thread
(AVX2), theta and h within a few ulps of the general loop (the sine, cosine and series
lengths differ at rounding level). G is left to the general loop, and so are the coordinates of
other families in a map that is mostly elliptic (this loop fills every coordinate, then the
general loop overwrites the others).

The arrays cost 14 doubles per coordinate and seed, as much again as the packed map; they are
built at the first evaluation that can use them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from . import clock_families as fam
from .clock_elliptic import HALF_PI, SERIES_FLOOR, theta_sums
from .clock_families import clock_distances
from .clock_kernels import KERNEL_OPTIONS, PARALLEL_OPTIONS
from .clock_series import INLINE_OPTIONS, dd_scale
from .threads import SERIAL_CLOCK_ITEMS

#: theta-series terms after the first (n = 1 .. TERMS)
TERMS = 8
#: the largest q^2 served: the first term left out, (2 TERMS + 3) q^((TERMS + 1)(TERMS + 2)),
#: is then below the general loop's SERIES_FLOOR
Q2_LIMIT = (SERIES_FLOOR / (2 * TERMS + 3)) ** (2.0 / ((TERMS + 1) * (TERMS + 2)))
#: the packed columns the kernel reads, in this order (then the two gaps of the other layers)
COLUMNS = (fam.P_KAPPA, fam.P_SIGMA, fam.P_BP_HI, fam.P_BP_LO, fam.P_BM_HI, fam.P_BM_LO, fam.P_W0,
           fam.P_B, fam.P_P, fam.P_K, fam.P_SCALE, fam.P_SIGN)
#: Taylor coefficients (-1)^k / (2k + 1)! and (-1)^k / (2k)!
_S = tuple((-1) ** k / math.factorial(2 * k + 1) for k in range(9))
_C = tuple((-1) ** k / math.factorial(2 * k) for k in range(10))
S0, S1, S2, S3, S4, S5, S6, S7, S8 = _S
C0, C1, C2, C3, C4, C5, C6, C7, C8, C9 = _C
BIG = 1e150  # beyond it a^2 + g is formed as a^2 (1 + g / a^2), as in the general loop
#: the share of eligible coordinates below which the map keeps to the general loop (this loop
#: runs over every coordinate, the general one then over the others)
MIN_SHARE = 0.5


@njit(**INLINE_OPTIONS)
def sin_cos(z):
    """(sin z, cos z) for z in [0, pi / 4], to about an ulp."""
    z2 = z * z
    sn = z * (S0 + z2 * (S1 + z2 * (S2 + z2 * (S3 + z2 * (S4 + z2 * (S5 + z2 * (S6 + z2 * (S7 + z2 * S8))))))))
    cs = C0 + z2 * (C1 + z2 * (C2 + z2 * (C3 + z2 * (C4 + z2 * (C5 + z2 * (C6 + z2 * (C7 + z2 * (C8 + z2 * C9))))))))
    return sn, cs


@njit(**INLINE_OPTIONS)
def _other_layer(a, g, f):
    """(sqrt(a^2 + g) f, a^2 / (a^2 + g)) without overflow for a up to inf."""
    big = a > BIG
    t = 1.0 + g / a / a if big else a * a + g
    root = math.sqrt(t)
    return (a * root if big else root) * f, (1.0 if big else a * a) / t


@njit(**INLINE_OPTIONS)
def _rows(s, s_lo, rows, P, gap_a, gap_b, theta, h, first, last):
    d = s.shape[1]
    kappa_, sigma_, bp_hi_, bp_lo_, bm_hi_, bm_lo_ = P[0], P[1], P[2], P[3], P[4], P[5]
    w0_, b_, rho_, q2_, f_, sign_others_ = P[6], P[7], P[8], P[9], P[10], P[11]
    for a in range(first, last):
        base = rows[a] * d
        s_a, s_lo_a, theta_a, h_a = s[a], s_lo[a], theta[a], h[a]
        for i in range(d):
            k = base + i
            # the normalized double-double clock and the distances to both blow-ups
            s_hi, s_ln = dd_scale(s_a[i], s_lo_a[i], kappa_[k])
            rem_plus, rem_minus, w = clock_distances(s_hi, s_ln, sigma_[k], bp_hi_[k], bp_lo_[k], bm_hi_[k],
                                                     bm_lo_[k], w0_[k])
            sign = 1.0 if w >= 0.0 else -1.0
            w_abs = abs(w)
            rem = rem_plus if w >= 0.0 else rem_minus
            b = b_[k]
            middle = w_abs <= 0.5 * b
            # r = rho N / D at zeta = (pi / 2) w / b, or rho D / N at (pi / 2) rem / b
            s1, c1 = sin_cos(HALF_PI * ((w_abs if middle else rem) / b))
            num, den, _, _ = theta_sums(s1, c1, q2_[k], TERMS, False)
            rho = rho_[k]
            r = sign * (rho * num / den if middle else rho * den / num)
            r = np.inf if rem_plus <= 0.0 else r
            r = -np.inf if rem_minus <= 0.0 else r
            # theta = r P(r) and h = P^2 (1 + sum_j r^2 / (r^2 + g_j)) in true units
            f = f_[k]
            mag = abs(r)
            p_a, ratio_a = _other_layer(mag, gap_a[k], f)
            p_b, ratio_b = _other_layer(mag, gap_b[k], f)
            p_true = p_a * p_b
            theta_a[i] = sign_others_[k] * r * f * p_true
            h_a[i] = p_true * p_true * (1.0 + ratio_a + ratio_b)


@njit(**KERNEL_OPTIONS)
def evaluate_serial(s, s_lo, rows, P, gap_a, gap_b, theta, h):
    _rows(s, s_lo, rows, P, gap_a, gap_b, theta, h, 0, s.shape[0])


@njit(**PARALLEL_OPTIONS)
def evaluate_parallel(s, s_lo, rows, P, gap_a, gap_b, theta, h):
    m = s.shape[0]
    if m * s.shape[1] < SERIAL_CLOCK_ITEMS or m == 1:
        _rows(s, s_lo, rows, P, gap_a, gap_b, theta, h, 0, m)
        return
    for a in prange(m):
        _rows(s, s_lo, rows, P, gap_a, gap_b, theta, h, a, a + 1)


class EllipticArrays(NamedTuple):
    """What :func:`elliptic_arrays` returns (see there)."""

    P: np.ndarray
    gap_a: np.ndarray
    gap_b: np.ndarray
    eligible: np.ndarray
    every: bool


def elliptic_arrays(packed):
    """(P, gap_a, gap_b, eligible, every) of a packed one-half map, or None where fewer than
    ``MIN_SHARE`` of its coordinates are depth-3 elliptic with q^2 <= Q2_LIMIT: P
    (len(COLUMNS), rows) holds the columns COLUMNS, gap_a and gap_b the normalized gaps of the
    two other layers (in layer order, as the general loop multiplies them), ``eligible`` (uint8)
    marks the coordinates this loop evaluates (the general loop the others), ``every`` whether
    it marks them all."""
    ip, fp, lgap = packed.ip, packed.fp, packed.lgap
    if packed.half_sign.shape[0] != 1 or ip.shape[0] == 0:
        return None
    eligible = (ip[:, fam.I_FAMILY] == fam.ELLIPTIC3) & (fp[:, fam.P_K] <= Q2_LIMIT)
    if eligible.mean() < MIN_SHARE:
        return None
    # (a depth-3 map:) the other two layers of each smallest layer j*, any pair for rows
    # without one (j* = -1; not eligible)
    others = np.array([[j for j in range(3) if j != star] for star in range(3)])
    pair = others[np.clip(ip[:, fam.I_JSTAR], 0, 2)]
    rows = np.arange(ip.shape[0])
    gap_a = np.ascontiguousarray(lgap[rows, pair[:, 0]])
    gap_b = np.ascontiguousarray(lgap[rows, pair[:, 1]])
    P = np.ascontiguousarray(fp[:, list(COLUMNS)].T)
    return EllipticArrays(P, gap_a, gap_b, eligible.astype(np.uint8), bool(eligible.all()))
