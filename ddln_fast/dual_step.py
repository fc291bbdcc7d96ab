"""The compiled pieces of one step attempt of the dual method (:mod:`ddln_fast.dual`): the
clock tolerance, the error norm, the whole simplified Newton iteration of a step in one call
(:func:`newton_iterations`), and the error estimate and the state at the step's end in another
(:func:`error_estimates`). Each replaces a dozen calls from Python per round: at n = 40,
d = 200 those calls cost about 135 us per round against about 42 us of arithmetic per seed, and
8 seeds to loss 1e-10 (the rich regime of ``bench/test_dual.py``) took 0.345 s before, 0.29 s
after (with the compiled bookkeeping of :mod:`ddln_fast.dual` and :mod:`ddln_fast.events`).

Rows and seeds as in :mod:`ddln_fast.radau`: row r of a batch belongs to seed ``seeds[r]``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .clock_series import dd_add, two_sum
from .clockmap import evaluate_rows_kernel
from .dual_products import clocks_kernel, residual_rises, residuals_kernel
from .kernels import JIT_OPTIONS, STRICT_JIT_OPTIONS, serial_and_parallel
from .radau import (ERROR_SOLVE_KERNELS, NEWTON_GOING, NEWTON_MAXITER, NEWTON_UPDATE_KERNELS, WORK_VECTORS,
                    newton_decide, starting_guess)

#: The floor of the clock tolerance, in units of eps^2 |s_i| (see :mod:`ddln_fast.dual`).
CLOCK_FLOOR_ULPS = 64.0


def _clock_tolerance(s, theta, h, rows, rtol, atol, newton_floor, out, out_newton):
    """out[rows[a]] = the clock tolerance of every coordinate at (s, theta, h) of row a
    (:mod:`ddln_fast.dual`, "Error norm"); out_newton[rows[a]] the same with the floor
    ``newton_floor`` eps |s| (what Newton's increments are measured against)."""
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


_newton_update_serial, _newton_update_parallel = NEWTON_UPDATE_KERNELS


@njit(**STRICT_JIT_OPTIONS)
def newton_iterations(Z, W, sigma, sigma_lo, seeds, inv_h, h_step, start, start_lo, Z_prev, h_old,
                      has_previous, clock_arguments, product_arguments, basis, diag, off, rank, tol_newton,
                      noise, newton_tol, faccon, outcome, iterations, h_factor, rate, serial_work):
    """The simplified Newton iteration of one step attempt of every row, to its end (RADAU5's
    rules: :func:`ddln_fast.radau.newton_decide`), in one call.

    It starts from the previous step's collocation polynomial (:func:`ddln_fast.radau.starting_guess`).
    Each iteration evaluates F and the residuals at the stage clocks, updates the stage
    increments Z (and W = T^-1 Z) through the factored Jacobian, and moves the stage clocks by
    M^T dZ / n; rows that have converged or failed leave the batch, the others go on together.

    Parameters
    ----------
    Z, W : ndarray of shape (m, 3, rows)
        Out: the stage increments of the last iterate.
    sigma, sigma_lo : ndarray of shape (m, 3, d)
        Out: the stage clocks (double-double) of the last iterate.
    seeds, inv_h, h_step : ndarray of shape (m,)
        The seed of each row, 1 / its step size and its step size.
    start, start_lo : ndarray of shape (S, d)
        The clocks at the step start (double-double).
    Z_prev, h_old, has_previous : ndarray of shape (S, 3, rows), (S,), (S,)
        Each seed's last accepted step: its stage increments and size, and whether it has one.
    clock_arguments, product_arguments : tuple
        :attr:`ddln_fast.clockmap.ClockMap.kernel_arguments` and
        :attr:`ddln_fast.dual_products.DualProducts.kernel_arguments`.
    basis, diag, off, rank : the factored Jacobians (:func:`ddln_fast.radau.newton_update`).
    tol_newton, noise : ndarray of shape (S, d)
        The clock tolerance Newton's increments are measured against, and its rounding floor
        per unit of step (:func:`_weighted_rms`).
    newton_tol : float
    faccon : ndarray of shape (S,)
        Each seed's Newton contraction factor, carried over between steps (RADAU5's FACCON:
        max(faccon, eps)^0.8 at the start of a step, the last rate's at its end).
    outcome, iterations, h_factor, rate : ndarray of shape (m,)
        Out: NEWTON_CONVERGED or NEWTON_FAILED, the iterations taken, the step-size factor of a
        failed row, the last contraction rate.
    serial_work : int
        ``threads.SERIAL_STATE_WORK``: work below which kernels run in the calling thread.
    """
    m, _, n = Z.shape
    d = sigma.shape[2]
    starting_guess(Z_prev[seeds], h_old[seeds], h_step, has_previous[seeds], Z, W)
    eps = np.finfo(np.float64).eps
    faccon_w = np.empty(m)
    for a in range(m):
        faccon_w[a] = max(faccon[seeds[a]], eps) ** 0.8
    stage_rows = np.empty(3 * m, dtype=np.int64)
    for a in range(m):
        for j in range(3):
            stage_rows[3 * a + j] = seeds[a]
    clocks_kernel(product_arguments, Z.reshape((3 * m, n)), stage_rows, True, start, start_lo,
                  sigma.reshape((3 * m, d)), sigma_lo.reshape((3 * m, d)), serial_work)
    # the rows still iterating (working copies, compacted when some finish); rows[a]: the row
    # of working row a
    Zw, Ww, sw, sw_lo = Z.copy(), W.copy(), sigma.copy(), sigma_lo.copy()
    rows = np.arange(m)
    seeds_w, inv_h_w, h_w = seeds.copy(), inv_h.copy(), h_step.copy()
    factor_w, rate_w = np.ones(m), np.zeros(m)
    outcome_w = np.zeros(m, dtype=np.int8)
    increment_old, theta_old = np.ones(m), np.zeros(m)
    theta = np.empty((3 * m, d))
    h_unused = np.empty((3 * m, d))  # h at the stages: the clock map computes it alongside
    stage_f = np.empty((3 * m, n))
    new_sigma = np.empty((m, 3, d))
    increment = np.empty(m)
    finite = np.empty(m, dtype=np.uint8)
    work = np.empty((m, WORK_VECTORS, n))
    k = m
    for iteration in range(1, NEWTON_MAXITER + 1):
        rows_k = stage_rows[:3 * k]
        evaluate_rows_kernel(sw[:k].reshape((3 * k, d)), sw_lo[:k].reshape((3 * k, d)), rows_k,
                             clock_arguments, theta[:3 * k], h_unused[:3 * k])
        residuals_kernel(product_arguments, theta[:3 * k], rows_k, stage_f[:3 * k], serial_work)
        stage_fk = stage_f[:3 * k].reshape((k, 3, n))
        _rows_finite(stage_fk, finite[:k])
        if k * n * n > serial_work:
            _newton_update_parallel(stage_fk, Ww[:k], Zw[:k], basis, diag, off, rank, seeds_w[:k],
                                    inv_h_w[:k], finite[:k], work[:k])
        else:
            _newton_update_serial(stage_fk, Ww[:k], Zw[:k], basis, diag, off, rank, seeds_w[:k],
                                  inv_h_w[:k], finite[:k], work[:k])
        clocks_kernel(product_arguments, Zw[:k].reshape((3 * k, n)), rows_k, False, start, start_lo,
                      new_sigma[:k].reshape((3 * k, d)), new_sigma[:k].reshape((3 * k, d)), serial_work)
        _move_stage_clocks(new_sigma[:k], start, start_lo, seeds_w[:k], sw[:k], sw_lo[:k])
        # the RMS of the change relative to the tolerance (floored as for the error norm); a
        # row with a stage value not finite fails
        _weighted_rms(new_sigma[:k], tol_newton, seeds_w[:k], new_sigma[:k, 0], False, h_w[:k], noise,
                      increment[:k])
        going = newton_decide(iteration, increment[:k], finite[:k], increment_old[:k], theta_old[:k],
                              faccon_w[:k], newton_tol, outcome_w[:k], factor_w[:k], rate_w[:k])
        if going == k:
            continue
        # hand the finished rows' results back, move the others up
        kept = 0
        for a in range(k):
            r = rows[a]
            if outcome_w[a] != NEWTON_GOING:
                iterations[r] = iteration
                outcome[r], h_factor[r], rate[r] = outcome_w[a], factor_w[a], rate_w[a]
                faccon[seeds[r]] = faccon_w[a]
                Z[r], W[r], sigma[r], sigma_lo[r] = Zw[a], Ww[a], sw[a], sw_lo[a]
                continue
            if kept != a:
                Zw[kept], Ww[kept], sw[kept], sw_lo[kept] = Zw[a], Ww[a], sw[a], sw_lo[a]
                rows[kept], seeds_w[kept], inv_h_w[kept], h_w[kept] = r, seeds_w[a], inv_h_w[a], h_w[a]
                faccon_w[kept], factor_w[kept], rate_w[kept] = faccon_w[a], factor_w[a], rate_w[a]
                outcome_w[kept], increment_old[kept], theta_old[kept] = outcome_w[a], increment_old[a], theta_old[a]
                for j in range(3):
                    stage_rows[3 * kept + j] = seeds_w[a]
            kept += 1
        k = kept
        if k == 0:
            break


_error_solve_serial, _error_solve_parallel = ERROR_SOLVE_KERNELS
_clock_tolerance_serial, _clock_tolerance_parallel = CLOCK_TOLERANCE_KERNELS


@njit(**STRICT_JIT_OPTIONS)
def clock_tolerance(s, theta, h, rows, rtol, atol, newton_floor, out, out_newton, serial_work):
    """:func:`_clock_tolerance` on one thread or several, by the work it holds."""
    if s.size > serial_work:
        _clock_tolerance_parallel(s, theta, h, rows, rtol, atol, newton_floor, out, out_newton)
    else:
        _clock_tolerance_serial(s, theta, h, rows, rtol, atol, newton_floor, out, out_newton)


@njit(**STRICT_JIT_OPTIONS)
def _error_solve(f, Z, basis, diag, off, rank, seeds, inv_h, out, work, serial_work):
    """:func:`ddln_fast.radau.error_solve` on one thread or several, by the work it holds."""
    rows, _, n = Z.shape
    if rows * n * n > serial_work:
        _error_solve_parallel(f, Z, basis, diag, off, rank, seeds, inv_h, out, work)
    else:
        _error_solve_serial(f, Z, basis, diag, off, rank, seeds, inv_h, out, work)


@njit(**STRICT_JIT_OPTIONS)
def error_estimates(f_start, Z, sigma, sigma_lo, seeds, inv_h, h_step, start, start_lo, rejected, basis, diag,
                    off, rank, clock_arguments, product_arguments, norms, tolerances, tol, noise, serial_work):
    """The state at the end of each row's step, its error norm, and whether its loss rose, for
    rows whose Newton iteration converged (Z (c, 3, rows), stage clocks sigma + sigma_lo
    (c, 3, d), f_start (c, rows) the derivative at the step start, start + start_lo (S, d)
    the clocks there).

    After a rejection (``rejected[seed]`` = 1, per seed) an estimate above 1 is replaced by
    Hairer's second estimate: the same solve with f at the start plus the first estimate
    instead of f at the start (one evaluation more).

    ``tolerances``: (rtol, atol, newton_floor) of the error estimate and (rtol, atol) as
    requested (what :func:`ddln_fast.dual_products.residual_rises` allows); tol, noise (S, d):
    the clock tolerance at the step start and its rounding floor per unit of step; ``norms``:
    :attr:`ddln_fast.dual_products.DualProducts.norms`; the rest as for
    :func:`newton_iterations`.

    Returns (s_new, s_new_lo, theta_new, h_new, err, f_end, again, rose): the clocks
    (double-double), theta and h at the step's end, the error norm (inf where theta is not
    finite: a step whose end passed a blow-up), the residual at the end, 1 for the rows that
    took the second estimate, and 1 where the residual grew beyond what the requested
    tolerances explain.
    """
    c, _, n = Z.shape
    d = sigma.shape[2]
    rtol, atol, newton_floor, requested_rtol, requested_atol = tolerances
    err_nu = np.empty((c, n))
    work = np.empty((c, WORK_VECTORS, n))
    _error_solve(f_start, Z, basis, diag, off, rank, seeds, inv_h, err_nu, work, serial_work)
    delta = np.empty((c, d))
    clocks_kernel(product_arguments, err_nu, seeds, False, delta, delta, delta, delta, serial_work)
    s_new = sigma[:, 2].copy()
    s_new_lo = sigma_lo[:, 2].copy()
    theta_new = np.empty((c, d))
    h_new = np.empty((c, d))
    evaluate_rows_kernel(s_new, s_new_lo, seeds, clock_arguments, theta_new, h_new)
    tol_end = np.empty((c, d))
    clock_tolerance(s_new, theta_new, h_new, np.arange(c), rtol, atol, newton_floor, tol_end, tol_end, serial_work)
    err = np.empty(c)
    _weighted_rms(delta.reshape((c, 1, d)), tol, seeds, tol_end, True, h_step, noise, err)
    # Newton's last update moved the clocks after their last evaluation: a step whose end has
    # passed a blow-up is rejected, never accepted with an infinite theta
    finite = np.empty(c, dtype=np.uint8)
    _rows_finite(theta_new, finite)
    for r in range(c):
        if finite[r] == 0:
            err[r] = np.inf
    again = np.zeros(c, dtype=np.uint8)
    for r in range(c):
        again[r] = rejected[seeds[r]] == 1 and not err[r] <= 1.0 and np.isfinite(err[r])
    rows = np.nonzero(again)[0]
    if rows.size:
        # Hairer's second estimate: f at the start moved by the first estimate (delta may be
        # below an ulp of the clock: the sum is a double-double)
        again_seeds = seeds[rows]
        moved = np.empty((rows.size, d))
        moved_lo = np.empty((rows.size, d))
        for a in range(rows.size):
            seed = again_seeds[a]
            for i in range(d):
                moved[a, i], rounding = two_sum(start[seed, i], delta[rows[a], i])
                moved_lo[a, i] = rounding + start_lo[seed, i]
        theta_moved = np.empty((rows.size, d))
        h_unused = np.empty((rows.size, d))
        evaluate_rows_kernel(moved, moved_lo, again_seeds, clock_arguments, theta_moved, h_unused)
        f_moved = np.empty((rows.size, n))
        residuals_kernel(product_arguments, theta_moved, again_seeds, f_moved, serial_work)
        second = np.empty((rows.size, n))
        work_again = np.empty((rows.size, WORK_VECTORS, n))
        Z_again, inv_h_again = Z[rows], inv_h[rows]
        _error_solve(f_moved, Z_again, basis, diag, off, rank, again_seeds, inv_h_again, second, work_again,
                     serial_work)
        delta_again = np.empty((rows.size, d))
        clocks_kernel(product_arguments, second, again_seeds, False, delta_again, delta_again, delta_again,
                      delta_again, serial_work)
        err_again = np.empty(rows.size)
        _weighted_rms(delta_again.reshape((rows.size, 1, d)), tol, again_seeds, tol_end[rows], True,
                      h_step[rows], noise, err_again)
        for a in range(rows.size):
            err[rows[a]] = err_again[a]
    f_end = np.empty((c, n))
    residuals_kernel(product_arguments, theta_new, seeds, f_end, serial_work)
    per_seed = product_arguments[0]
    norm_rows = seeds.copy() if per_seed else np.zeros(c, dtype=np.int64)
    rose = np.empty(c, dtype=np.uint8)
    residual_rises(f_end, f_start, theta_new, norm_rows, norms[0], norms[1], norms[2], requested_rtol,
                   requested_atol, rose)
    return s_new, s_new_lo, theta_new, h_new, err, f_end, again, rose
