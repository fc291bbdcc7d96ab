"""Radau IIA of order 5 (three stages), batched over seeds: the tableau as data and the
compiled pieces of one simplified-Newton step.

The method and its implementation follow Hairer & Wanner, "Solving ODEs II", section IV.8
(the Fortran code RADAU5); scipy's ``scipy/integrate/_ivp/radau.py`` was read as a second
reference. For y' = f(y), a step of size h solves the collocation system for the stage
increments Z (3 x N) with the constant matrix J (the Jacobian at the step start). In the
coordinates W = T^{-1} Z that diagonalise the Runge–Kutta matrix, the 3N x 3N Newton matrix
splits into one real system (MU_REAL / h - J) and one complex system (MU_COMPLEX / h - J).

Here J is symmetric negative semidefinite (J = -A, A PSD), so both systems are solved through
one factorization per Jacobian, A = V B V^T with B symmetric tridiagonal of order k and V of k
orthonormal columns (:meth:`ddln_fast.dual_products.DualProducts.factor_jacobian`: LAPACK's
dsytrd, k = N, or a thin QR first when only k < N coordinates are kept):

    (mu / h + A)^{-1} b = V (mu / h + B)^{-1} V^T b + (b - V V^T b) / (mu / h)

for the real and the complex mu alike (the second term only when k < N), and a system with B
costs O(k). A new step size costs no factorization, only O(k) pivots; the factorization costs a
third of an eigendecomposition, and each solve asks as much (two products with V). The
elimination needs no pivoting: mu / h + B has a positive definite real part, and the pivots of
such a matrix have real parts of at least Re(mu) / h (the Schur complements of an accretive
matrix; B's own are >= 0), which the elimination enforces. At long steps mu / h falls below the
rounding of A (eps |A|; A is numerically singular at small scales, and a singular J is allowed):
a pivot held up to mu / h then divides the next entry below the diagonal, so the factorization
sets the entries below 4 eps |B| to zero (:func:`ddln_fast.dual_products.tridiagonalize`), a
change of B within its own rounding; and the part of b off V's range is projected out twice
(:func:`split_range`). Measured as the contraction of the simplified-Newton iteration at
mu / h down to 1e-19 |A| (``tests/test_dual.py``).

Kernels work on "rows": row r of a batch belongs to seed ``seeds[r]``; per-seed arrays (basis,
diag, off, rank) are indexed by seed, batch arrays by row. Every reduction of a row runs in one
thread, in a fixed order, and in IEEE arithmetic: with fast-math (contraction into FMAs,
reassociation) a freshly compiled Newton update and the same one loaded from Numba's cache gave
results one ulp apart in 39 of 100 entries (measured with k < N), so a run would have depended
on whether its process compiled the kernels. IEEE arithmetic costs nothing measurable here.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .kernels import STRICT_JIT_OPTIONS, serial_and_parallel, strict_twin, transposed_product

#: V coef (IEEE arithmetic, as everything here: see the module docstring)
_expand = strict_twin(transposed_product)

SQRT6 = 6.0 ** 0.5

#: Collocation nodes c_i (the last is 1: the method is stiffly accurate).
C = np.array([(4.0 - SQRT6) / 10.0, (4.0 + SQRT6) / 10.0, 1.0])
#: Weights of the embedded third-order error estimate (Hairer–Wanner IV.8, eq. (8.20)),
#: applied as err = (MU_REAL / h + A)^{-1} (f(y0) + sum_i E_i Z_i / h).
E = np.array([-13.0 - 7.0 * SQRT6, -13.0 + 7.0 * SQRT6, -1.0]) / 3.0
#: Eigenvalues of the inverse Runge–Kutta matrix: one real, one complex pair.
MU_REAL = 3.0 + 3.0 ** (2.0 / 3.0) - 3.0 ** (1.0 / 3.0)
MU_COMPLEX = (3.0 + 0.5 * (3.0 ** (1.0 / 3.0) - 3.0 ** (2.0 / 3.0))
              - 0.5j * (3.0 ** (5.0 / 6.0) + 3.0 ** (7.0 / 6.0)))
MU_COMPLEX_RE, MU_COMPLEX_IM = MU_COMPLEX.real, MU_COMPLEX.imag
#: Z = T W and W = TI Z (T's columns: eigenvectors of the inverse Runge–Kutta matrix).
T = np.array([
    [0.09443876248897524, -0.14125529502095421, 0.03002919410514742],
    [0.25021312296533332, 0.20412935229379994, -0.38294211275726192],
    [1.0, 1.0, 0.0]])
TI = np.array([
    [4.17871859155190428, 0.32768282076106237, 0.52337644549944951],
    [-4.17871859155190428, -0.32768282076106237, 0.47662355450055044],
    [0.50287263494578682, -2.57192694985560522, 0.59603920482822492]])
#: Dense output: the collocation polynomial on a step from t0 with size h is
#: y(t0 + x h) = y0 + sum_k (sum_i Z_i P[i, k]) x^(k + 1), x in [0, 1].
P = np.array([
    [13.0 / 3.0 + 7.0 * SQRT6 / 3.0, -23.0 / 3.0 - 22.0 * SQRT6 / 3.0, 10.0 / 3.0 + 5.0 * SQRT6],
    [13.0 / 3.0 - 7.0 * SQRT6 / 3.0, -23.0 / 3.0 + 22.0 * SQRT6 / 3.0, 10.0 / 3.0 - 5.0 * SQRT6],
    [1.0 / 3.0, -8.0 / 3.0, 10.0 / 3.0]])

ORDER = 5
#: Order of the embedded error estimate: the step-size exponent is 1 / (ERROR_ORDER + 1).
ERROR_ORDER = 3
#: Newton iterations per step before the step is given up (RADAU5's NIT).
NEWTON_MAXITER = 7
STAGES = 3


class RadauTableau:
    """What the method table asks of a method (:mod:`ddln_fast.methods`): it chooses its steps
    (an embedded error estimate of order ERROR_ORDER); the coefficients are the constants of
    this module."""

    adaptive = True
    stages = STAGES
    order = ORDER
    error_order = ERROR_ORDER


RADAU_IIA5 = RadauTableau()


def estimate_tolerances(rtol: float, atol: float) -> tuple[float, float]:
    """The tolerances the embedded error estimate is held to, for a requested (rtol, atol): the
    estimate has order 3 while the solution has order 5, so RADAU5 loosens them to
    0.1 rtol^(2/3) (and atol in proportion)."""
    inner = 0.1 * rtol ** (2.0 / 3.0)
    return inner, atol * inner / rtol


def newton_tolerance(rtol: float) -> float:
    """Stopping tolerance of the simplified Newton iteration, in units of the error norm
    (RADAU5's FNEWT: max(10 eps / rtol, min(0.03, sqrt(rtol))))."""
    eps = np.finfo(np.float64).eps
    return max(10.0 * eps / rtol, min(0.03, rtol ** 0.5))


# ---------------------------------------------------------------------------------------------
# Linear algebra through the factorization A = V B V^T
# ---------------------------------------------------------------------------------------------
#: Scratch vectors per row that :func:`newton_update` and :func:`error_solve` need.
WORK_VECTORS = 13


@njit(**STRICT_JIT_OPTIONS)
def _row_products(M, v, out):
    """out[i] = sum_j M[i, j] v[j] for M of shape (k, N): the coefficients V^T v in the basis
    whose vectors are the rows of M."""
    k, n = M.shape
    for i in range(k):
        row = M[i]
        acc = 0.0
        for j in range(n):
            acc += row[j] * v[j]
        out[i] = acc


@njit(**STRICT_JIT_OPTIONS)
def tridiagonal_solve_real(diag, off, shift, rhs, pivots):
    """rhs = (shift I + B)^{-1} rhs in place, B symmetric tridiagonal of order k = len(diag)
    (``diag``, and ``off`` below it; off[k - 1] unused), shift > 0: symmetric elimination without
    pivoting, each pivot at least ``shift`` (see the module docstring). ``pivots``: scratch."""
    n = diag.shape[0]
    if n == 0:
        return
    p = max(shift + diag[0], shift)
    pivots[0] = p
    for i in range(1, n):
        e = off[i - 1]
        ratio = e / p
        rhs[i] -= ratio * rhs[i - 1]
        p = max(shift + diag[i] - ratio * e, shift)
        pivots[i] = p
    rhs[n - 1] /= pivots[n - 1]
    for i in range(n - 2, -1, -1):
        rhs[i] = (rhs[i] - off[i] * rhs[i + 1]) / pivots[i]


@njit(**STRICT_JIT_OPTIONS)
def tridiagonal_solve_complex(diag, off, shift_re, shift_im, rhs_re, rhs_im, pivots_re, pivots_im):
    """(rhs_re + i rhs_im) = ((shift_re + i shift_im) I + B)^{-1} (rhs_re + i rhs_im) in place:
    :func:`tridiagonal_solve_real` in complex arithmetic (a complex symmetric system; the real part
    of each pivot at least shift_re)."""
    n = diag.shape[0]
    if n == 0:
        return
    pr = max(shift_re + diag[0], shift_re)
    pi = shift_im
    pivots_re[0], pivots_im[0] = pr, pi
    for i in range(1, n):
        e = off[i - 1]
        den = pr * pr + pi * pi
        # ratio = e / pivot
        qr = e * pr / den
        qi = -e * pi / den
        br, bi = rhs_re[i - 1], rhs_im[i - 1]
        rhs_re[i] -= qr * br - qi * bi
        rhs_im[i] -= qr * bi + qi * br
        pr = max(shift_re + diag[i] - qr * e, shift_re)
        pi = shift_im - qi * e
        pivots_re[i], pivots_im[i] = pr, pi
    for i in range(n - 1, -1, -1):
        br, bi = rhs_re[i], rhs_im[i]
        if i < n - 1:
            br -= off[i] * rhs_re[i + 1]
            bi -= off[i] * rhs_im[i + 1]
        pr, pi = pivots_re[i], pivots_im[i]
        den = pr * pr + pi * pi
        rhs_re[i] = (br * pr + bi * pi) / den
        rhs_im[i] = (bi * pr - br * pi) / den


@njit(**STRICT_JIT_OPTIONS)
def _subtract_expansion(basis, coef, out):
    """out -= V coef, V^T the rows of ``basis`` (k x N)."""
    k, n = basis.shape
    for j in range(k):
        c = coef[j]
        row = basis[j]
        for i in range(n):
            out[i] -= c * row[i]


@njit(**STRICT_JIT_OPTIONS)
def split_range(basis, v, coef, rest, extra):
    """v = V coef + rest with rest orthogonal to V's range (V^T the rows of ``basis``, k < N),
    projected twice: V's columns are orthonormal only to rounding, and a solve divides ``rest``
    by mu / h, which at long steps is below eps |A| (one projection leaves eps |v| of V's range
    in ``rest``, and the Newton iteration then diverges there). ``extra``: scratch (k)."""
    k, n = basis.shape
    _row_products(basis, v, coef)
    for i in range(n):
        rest[i] = v[i]
    _subtract_expansion(basis, coef, rest)
    _row_products(basis, rest, extra)
    _subtract_expansion(basis, extra, rest)
    for j in range(k):
        coef[j] += extra[j]


@njit(**STRICT_JIT_OPTIONS)
def jacobian_solve_real(basis, diag, off, shift, rhs, out, coef, rest, extra, pivots):
    """out = (shift I + A)^{-1} rhs for A = V B V^T, V^T the rows of ``basis`` (k x N,
    orthonormal), B tridiagonal of order k: V (shift + B)^{-1} V^T rhs, plus rest / shift for
    the part ``rest`` of rhs off V's range (where A vanishes) when k < N (:func:`split_range`).
    ``coef``, ``rest``, ``extra``, ``pivots``: scratch."""
    k, n = basis.shape
    if k == n:
        _row_products(basis, rhs, coef)
    else:
        split_range(basis, rhs, coef, rest, extra)
    tridiagonal_solve_real(diag, off, shift, coef, pivots)
    _expand(basis, coef, out)
    if k < n:
        inv = 1.0 / shift
        for i in range(n):
            out[i] += inv * rest[i]


@njit(**STRICT_JIT_OPTIONS)
def jacobian_solve_complex(basis, diag, off, shift_re, shift_im, rhs_re, rhs_im, out_re, out_im,
                           coef_re, coef_im, rest_re, rest_im, extra):
    """:func:`jacobian_solve_real` for a complex shift sigma and a complex right-hand side, as
    (re, im) pairs: out = (sigma I + A)^{-1} rhs. ``out_re`` and ``out_im`` hold the pivots
    until the expansion; the coefficients, rests and ``extra`` are scratch."""
    k, n = basis.shape
    if k == n:
        _row_products(basis, rhs_re, coef_re)
        _row_products(basis, rhs_im, coef_im)
    else:
        split_range(basis, rhs_re, coef_re, rest_re, extra)
        split_range(basis, rhs_im, coef_im, rest_im, extra)
    tridiagonal_solve_complex(diag, off, shift_re, shift_im, coef_re, coef_im, out_re, out_im)
    _expand(basis, coef_re, out_re)
    _expand(basis, coef_im, out_im)
    if k < n:
        den = shift_re * shift_re + shift_im * shift_im
        inv_re, inv_im = shift_re / den, -shift_im / den  # 1 / sigma
        for i in range(n):
            out_re[i] += inv_re * rest_re[i] - inv_im * rest_im[i]
            out_im[i] += inv_re * rest_im[i] + inv_im * rest_re[i]


def newton_update(stage_f, W, Z, basis, diag, off, rank, seeds, inv_h, live, work):
    """One simplified-Newton update of the collocation system, for every live row.

    Parameters
    ----------
    stage_f : ndarray of shape (rows, 3, N)
        f(y0 + Z_i) at the current stage increments.
    W, Z : ndarray of shape (rows, 3, N)
        Transformed and plain stage increments; updated in place (W += dW, Z = T W).
    basis, diag, off, rank : ndarray of shape (S, N, N), (S, N), (S, N), (S,)
        A = -J of each seed as V B V^T: the k = rank[s] orthonormal vectors of V as the rows
        basis[s, :k], and B's diagonal (diag[s, :k]) and the entries below it (off[s, :k - 1]).
    seeds : ndarray of shape (rows,)
    inv_h : ndarray of shape (rows,)
        1 / step size.
    live : ndarray of shape (rows,), uint8
        Rows to update (others are left untouched).
    work : ndarray of shape (rows, WORK_VECTORS, N)
        Scratch.
    """
    rows, _, n = W.shape
    t00, t01, t02 = TI[0, 0], TI[0, 1], TI[0, 2]
    t10, t11, t12 = TI[1, 0], TI[1, 1], TI[1, 2]
    t20, t21, t22 = TI[2, 0], TI[2, 1], TI[2, 2]
    for r in prange(rows):
        if live[r] == 0:
            continue
        s = seeds[r]
        k = rank[s]
        Vs = basis[s, :k]
        ds, es = diag[s, :k], off[s, :k]
        mr = MU_REAL * inv_h[r]
        mcr = MU_COMPLEX_RE * inv_h[r]
        mci = MU_COMPLEX_IM * inv_h[r]
        f0, f1, f2 = stage_f[r, 0], stage_f[r, 1], stage_f[r, 2]
        w0, w1, w2 = W[r, 0], W[r, 1], W[r, 2]
        rr, rc, ri = work[r, 0], work[r, 1], work[r, 2]
        # residuals in the transformed coordinates: TI f - (mu / h) W (complex pair as re, im)
        for i in range(n):
            rr[i] = t00 * f0[i] + t01 * f1[i] + t02 * f2[i] - mr * w0[i]
            a = t10 * f0[i] + t11 * f1[i] + t12 * f2[i]
            b = t20 * f0[i] + t21 * f1[i] + t22 * f2[i]
            rc[i] = a - (mcr * w1[i] - mci * w2[i])
            ri[i] = b - (mcr * w2[i] + mci * w1[i])
        dr, dc, di = work[r, 3], work[r, 4], work[r, 5]
        cr, cc, ci = work[r, 6], work[r, 7], work[r, 8]
        rest_r, rest_re, rest_im, extra = work[r, 9], work[r, 10], work[r, 11], work[r, 12]
        # the real system (dc: scratch until the complex one), then the complex one
        jacobian_solve_real(Vs, ds, es, mr, rr, dr, cr, rest_r, extra, dc)
        jacobian_solve_complex(Vs, ds, es, mcr, mci, rc, ri, dc, di, cc, ci, rest_re, rest_im, extra)
        z0, z1, z2 = Z[r, 0], Z[r, 1], Z[r, 2]
        for i in range(n):
            a0 = w0[i] + dr[i]
            a1 = w1[i] + dc[i]
            a2 = w2[i] + di[i]
            w0[i] = a0
            w1[i] = a1
            w2[i] = a2
            z0[i] = T[0, 0] * a0 + T[0, 1] * a1 + T[0, 2] * a2
            z1[i] = T[1, 0] * a0 + T[1, 1] * a1 + T[1, 2] * a2
            z2[i] = T[2, 0] * a0 + T[2, 1] * a1 + T[2, 2] * a2


NEWTON_UPDATE_KERNELS = serial_and_parallel(newton_update, strict=True)


def error_solve(f, Z, basis, diag, off, rank, seeds, inv_h, out, work):
    """The embedded error estimate of every row: (MU_REAL / h + A)^{-1} (f + sum_i E_i Z_i / h),
    with f the derivative at the step's start (or, for Hairer's second estimate after a
    rejection, at the start moved by the first estimate).

    f, out : ndarray of shape (rows, N); Z : (rows, 3, N); basis, diag, off, rank as for
    :func:`newton_update`; work : (rows, WORK_VECTORS, N).
    """
    rows, _, n = Z.shape
    e0, e1, e2 = E[0], E[1], E[2]
    for r in prange(rows):
        s = seeds[r]
        k = rank[s]
        ih = inv_h[r]
        rhs = work[r, 0]
        for i in range(n):
            rhs[i] = f[r, i] + (e0 * Z[r, 0, i] + e1 * Z[r, 1, i] + e2 * Z[r, 2, i]) * ih
        jacobian_solve_real(basis[s, :k], diag[s, :k], off[s, :k], MU_REAL * ih, rhs, out[r],
                            work[r, 1], work[r, 2], work[r, 3], work[r, 4])


ERROR_SOLVE_KERNELS = serial_and_parallel(error_solve, strict=True)


@njit(**STRICT_JIT_OPTIONS)
def starting_guess(Z_prev, h_prev, h, has_previous, Z, W):
    """Stage increments to start Newton from: the previous step's collocation polynomial
    extrapolated to the new nodes (zero on a seed's first step), and W = TI Z.

    Z_prev, Z, W : ndarray of shape (rows, 3, N); h_prev, h : (rows,); has_previous : (rows,).
    """
    rows, _, n = Z.shape
    for r in range(rows):
        if has_previous[r] == 0:
            for k in range(3):
                for i in range(n):
                    Z[r, k, i] = 0.0
                    W[r, k, i] = 0.0
            continue
        ratio = h[r] / h_prev[r]
        for k in range(3):
            x = 1.0 + C[k] * ratio
            x2 = x * x
            x3 = x2 * x
            for i in range(n):
                # y(t_prev + x h_prev) - y(t_prev + h_prev), from the previous step's polynomial
                q0 = P[0, 0] * Z_prev[r, 0, i] + P[1, 0] * Z_prev[r, 1, i] + P[2, 0] * Z_prev[r, 2, i]
                q1 = P[0, 1] * Z_prev[r, 0, i] + P[1, 1] * Z_prev[r, 1, i] + P[2, 1] * Z_prev[r, 2, i]
                q2 = P[0, 2] * Z_prev[r, 0, i] + P[1, 2] * Z_prev[r, 1, i] + P[2, 2] * Z_prev[r, 2, i]
                Z[r, k, i] = q0 * x + q1 * x2 + q2 * x3 - Z_prev[r, 2, i]
        for k in range(3):
            for i in range(n):
                W[r, k, i] = TI[k, 0] * Z[r, 0, i] + TI[k, 1] * Z[r, 1, i] + TI[k, 2] * Z[r, 2, i]


@njit(**STRICT_JIT_OPTIONS)
def dense_coefficients(start, nodes, out):
    """Monomial coefficients of the collocation polynomial of each row:
    p(x) = start + out[0] x + out[1] x^2 + out[2] x^3 passes through ``nodes[i]`` at x = C[i].

    start : (R, M); nodes : (R, 3, M); out : (R, 3, M). Works for any linear image of the state
    (the clocks X^T nu / n of the dual flow)."""
    R, m = start.shape
    for r in range(R):
        for k in range(3):
            for i in range(m):
                out[r, k, i] = (P[0, k] * (nodes[r, 0, i] - start[r, i])
                                + P[1, k] * (nodes[r, 1, i] - start[r, i])
                                + P[2, k] * (nodes[r, 2, i] - start[r, i]))


# ---------------------------------------------------------------------------------------------
# Newton convergence (RADAU5's rules, per row)
# ---------------------------------------------------------------------------------------------
#: Outcome codes of a row's Newton iteration.
NEWTON_GOING, NEWTON_CONVERGED, NEWTON_FAILED = 0, 1, 2


@njit(**STRICT_JIT_OPTIONS)
def newton_decide(iteration, increment, finite, increment_old, theta_old, faccon, tol, state, h_factor,
                  theta_out):
    """Decide, for each row, after Newton update number ``iteration`` (1-based) whose size in the
    error norm is ``increment``: converged, failed (with a step-size factor), or go on.

    RADAU5 (Hairer–Wanner IV.8): the contraction rate theta is the ratio of successive
    increments (geometric mean of the last two from the third update on); the iteration fails
    when theta >= 0.99 or when the predicted error after the remaining iterations exceeds
    ``tol``; it has converged when faccon * increment <= tol, with faccon = theta / (1 - theta),
    carried over from the previous step (so a step can converge after one update).

    An increment below ``tol`` itself ends the iteration at once: it is at the resolution of the
    state (or far below the error tolerance), where the rate is only rounding noise.

    Arrays of shape (rows,): a row whose stage values were not all finite (``finite[r]`` = 0)
    fails; increment_old and theta_old are updated in place; faccon too; ``state`` gets
    NEWTON_* codes; ``h_factor`` the proposed step-size factor of failed rows; ``theta_out``
    the current rate estimate (for the Jacobian-reuse decision). Returns the number of rows
    still going.
    """
    rows = increment.shape[0]
    for r in range(rows):
        if state[r] != NEWTON_GOING:
            continue
        dyno = increment[r] if finite[r] != 0 else np.inf
        if not np.isfinite(dyno):
            state[r] = NEWTON_FAILED
            h_factor[r] = 0.5
            continue
        if dyno <= tol:
            state[r] = NEWTON_CONVERGED
            continue
        if iteration > 1:
            thq = dyno / increment_old[r]
            theta = thq if iteration == 2 else np.sqrt(thq * theta_old[r])
            theta_old[r] = thq
            theta_out[r] = theta
            if theta < 0.99:
                faccon[r] = theta / (1.0 - theta)
                predicted = faccon[r] * dyno * theta ** (NEWTON_MAXITER - 1 - iteration) / tol
                if predicted >= 1.0:
                    q = max(1e-4, min(20.0, predicted))
                    state[r] = NEWTON_FAILED
                    h_factor[r] = 0.8 * q ** (-1.0 / (4.0 + NEWTON_MAXITER - 1 - iteration))
                    continue
            else:
                state[r] = NEWTON_FAILED
                h_factor[r] = 0.5
                continue
        increment_old[r] = max(dyno, np.finfo(np.float64).eps)
        if faccon[r] * dyno <= tol:
            state[r] = NEWTON_CONVERGED
        elif iteration >= NEWTON_MAXITER:
            state[r] = NEWTON_FAILED
            h_factor[r] = 0.5
    going = 0
    for r in range(rows):
        going += state[r] == NEWTON_GOING
    return going
