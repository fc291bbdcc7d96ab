"""The compiled pieces of one step attempt of the dual method (:mod:`ddln_fast.dual`): the
clock tolerance, the error norm, the Newton update of the stage clocks.

Rows and seeds as in :mod:`ddln_fast.radau`: row r of a batch belongs to seed ``seeds[r]``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .clock_series import dd_add
from .kernels import JIT_OPTIONS, STRICT_JIT_OPTIONS, serial_and_parallel

#: The floor of the clock tolerance, in units of eps^2 |s_i| (see :mod:`ddln_fast.dual`).
CLOCK_FLOOR_ULPS = 64.0


def _clock_tolerance(s, theta, h, rows, rtol, atol, newton_floor, out, out_newton):
    """out[rows[a]] = the clock tolerance of every coordinate (:mod:`ddln_fast.dual`, "Error norm") at (s, theta, h)
    of row a; out_newton[rows[a]] the same with the floor ``newton_floor`` eps |s| (what
    Newton's increments are measured against)."""
    R, d = s.shape
    eps = np.finfo(np.float64).eps
    for a in prange(R):
        row = rows[a]
        for i in range(d):
            si = abs(s[a, i])
            tol = atol + rtol * si
            hi = h[a, i]
            if hi > 0:
                tol = min(tol, (atol + rtol * abs(theta[a, i])) / hi)
            out[row, i] = max(tol, CLOCK_FLOOR_ULPS * eps * eps * si)
            out_newton[row, i] = max(tol, newton_floor * eps * eps * si)


CLOCK_TOLERANCE_KERNELS = serial_and_parallel(_clock_tolerance)


@njit(inline="always")
def _floored(tol, step, noise):
    """A clock tolerance raised to the rounding floor step * noise of a step of that size."""
    return max(tol, step * noise)


@njit(**JIT_OPTIONS)
def _weighted_rms(delta, tol, row_seeds, tol_other, use_other, step, noise, out):
    """out[r] = RMS over stages and coordinates of delta[r] / tol, with tol = tol[seed] (or the
    smaller of it and tol_other[r] when ``use_other``), raised to the rounding floor
    step[r] * noise[seed] of a step of that size. delta : (R, K, d); tol, noise : (S, d);
    tol_other : (R, d); step : (R,)."""
    R, K, d = delta.shape
    for r in range(R):
        seed = row_seeds[r]
        acc = 0.0
        for k in range(K):
            for i in range(d):
                t = min(tol[seed, i], tol_other[r, i]) if use_other else tol[seed, i]
                q = delta[r, k, i] / _floored(t, step[r], noise[seed, i])
                acc += q * q
        out[r] = np.sqrt(acc / (K * d))


@njit(**STRICT_JIT_OPTIONS)
def _move_stage_clocks(increments, start, start_lo, seeds, sigma, sigma_lo):
    """One Newton update of the stage clocks: sigma_new = (start + start_lo)[seed] + increments
    (X^T Z / n) as a double-double; ``increments`` then holds sigma_new - sigma (for the error
    norm), and (sigma, sigma_lo) = sigma_new.

    increments, sigma, sigma_lo : (R, 3, d); start, start_lo : (S, d); seeds : (R,)."""
    R, K, d = sigma.shape
    for r in range(R):
        seed = seeds[r]
        for k in range(K):
            for i in range(d):
                hi, lo = dd_add(start[seed, i], start_lo[seed, i], increments[r, k, i])
                increments[r, k, i] = (hi - sigma[r, k, i]) + (lo - sigma_lo[r, k, i])
                sigma[r, k, i] = hi
                sigma_lo[r, k, i] = lo


@njit(**JIT_OPTIONS)
def _rows_finite(values, out):
    """out[r] = 1 if every value of row r (R, ...) is finite."""
    R = values.shape[0]
    flat = values.reshape(R, -1)
    for r in range(R):
        ok = 1
        for v in flat[r]:
            if not np.isfinite(v):
                ok = 0
                break
        out[r] = ok
