"""The two products of the dual field with the data, and the Jacobian's factorization.

The dual method (:mod:`ddln_fast.dual`) needs X only through the clocks X^T Z / n of its stage
increments and the residuals X theta - y of its stage values, and through the factored Jacobian
A = X diag(h) X^T / n of each seed. :class:`DualProducts` computes them for rows of any batch:
one GEMM for all rows when the data is shared, a parallel kernel over rows when each seed has
its own. The compiled :func:`residuals` and :func:`clocks` take the products' arrays as one
tuple (:attr:`DualProducts.kernel_arguments`), so that a compiled loop calls them too.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from scipy.linalg.blas import dsyrk
from scipy.linalg.lapack import dgeqrf, dorgqr, dsytrd

from . import kernels
from .clock_series import dd_add
from .kernels import STRICT_JIT_OPTIONS, serial_and_parallel
from . import threads
from .problem import Problem
from .radau import MU_COMPLEX_RE


#: The rounding of a residual's norm, in units of eps (||M||_F ||theta|| + ||b||) (see
#: residual_rises).
RESIDUAL_ROUNDING_ULPS = 4.0
#: Coordinates may be left out of a Jacobian while their part E of A moves the Newton matrices
#: mu / h + A by at most this share of mu / h, ||E|| h / Re(mu) <= trace(E) h / Re(mu), at every
#: step up to JACOBIAN_REACH times the step it was factored for (then it is factored again).
JACOBIAN_SLACK = 1e-3
JACOBIAN_REACH = 100.0
#: Entries of the tridiagonal B below this times |B| (a bound on its norm) are set to zero.
TRIDIAGONAL_DEFLATION = 4.0 * float(np.finfo(np.float64).eps)


def _add_start(out, out_lo, start, start_lo, row_seeds, scale):
    """(out[r], out_lo[r]) = (start + start_lo)[row_seeds[r]] + scale * out[r] as a double-double
    (a clock from a product X^T Z)."""
    R, d = out.shape
    for r in prange(R):
        seed = row_seeds[r]
        o, o_lo, s, s_lo = out[r], out_lo[r], start[seed], start_lo[seed]
        for i in range(d):  # (a loop over rows and coordinates: it vectorizes)
            o[i], o_lo[i] = dd_add(s[i], s_lo[i], scale * o[i])


ADD_START_KERNELS = serial_and_parallel(_add_start, strict=True)


def _subtract_targets(out, y, row_seeds):
    """out[r] -= y[row_seeds[r]] (y of shape (S or 1, n); row 0 when shared)."""
    R, n = out.shape
    shared = y.shape[0] == 1
    for r in prange(R):
        src = y[0] if shared else y[row_seeds[r]]
        for i in range(n):
            out[r, i] -= src[i]


SUBTRACT_TARGETS_KERNELS = serial_and_parallel(_subtract_targets)


def _per_seed_clocks(X, Z, start, start_lo, row_seeds, inv_n, use_start, out, out_lo):
    """(out[r], out_lo[r]) = (start + start_lo)[seed] + X[seed]^T Z[r] / n (double-double) for
    per-seed data X of shape (S, n, d); without a start, out = X[seed]^T Z[r] / n."""
    R = Z.shape[0]
    d = X.shape[2]
    for r in prange(R):
        seed = row_seeds[r]
        o = out[r]
        kernels.transposed_product(X[seed], Z[r], o)
        for i in range(d):
            if use_start:
                o[i], out_lo[r, i] = dd_add(start[seed, i], start_lo[seed, i], inv_n * o[i])
            else:
                o[i] = inv_n * o[i]


PER_SEED_CLOCKS_KERNELS = serial_and_parallel(_per_seed_clocks, strict=True)


def _per_seed_residuals(X, y, theta, row_seeds, out):
    """out[r] = X[seed] theta[r] - y[seed] for per-seed data."""
    R, d = theta.shape
    n = X.shape[1]
    for r in prange(R):
        seed = row_seeds[r]
        th = theta[r]
        for k in range(n):
            xr = X[seed, k]
            acc = 0.0
            for i in range(d):
                acc += xr[i] * th[i]
            out[r, k] = acc - y[seed, k]


PER_SEED_RESIDUALS_KERNELS = serial_and_parallel(_per_seed_residuals)

_add_start_serial, _add_start_parallel = ADD_START_KERNELS
_subtract_targets_serial, _subtract_targets_parallel = SUBTRACT_TARGETS_KERNELS
_per_seed_clocks_serial, _per_seed_clocks_parallel = PER_SEED_CLOCKS_KERNELS
_per_seed_residuals_serial, _per_seed_residuals_parallel = PER_SEED_RESIDUALS_KERNELS


@njit(**STRICT_JIT_OPTIONS)
def residuals_kernel(arguments, theta, row_seeds, out, serial_work):
    """out = M theta - b for rows of theta (R, d) (:meth:`DualProducts.residuals`);
    ``arguments``: :attr:`DualProducts.kernel_arguments`. Shared data: one GEMM for every row;
    per-seed data: a kernel over rows. Kernels run in threads above ``serial_work`` items of
    work (``threads.SERIAL_STATE_WORK``, read by the caller: a setting, not a constant)."""
    per_seed, M, MT, b, _ = arguments
    if per_seed:
        if theta.size * M.shape[1] > serial_work:
            _per_seed_residuals_parallel(M, b, theta, row_seeds, out)
        else:
            _per_seed_residuals_serial(M, b, theta, row_seeds, out)
        return
    np.dot(theta, MT[0], out)
    if out.size > serial_work:
        _subtract_targets_parallel(out, b, row_seeds)
    else:
        _subtract_targets_serial(out, b, row_seeds)


@njit(**STRICT_JIT_OPTIONS)
def clocks_kernel(arguments, Z, row_seeds, with_start, start, start_lo, out, out_lo, serial_work):
    """out = M^T Z / n, or with a start the double-double (out, out_lo) = (start +
    start_lo)[row_seeds] + M^T Z / n (:meth:`DualProducts.clocks`; without a start,
    ``start``, ``start_lo`` and ``out_lo`` are not read and may be any arrays of their type;
    ``serial_work`` as for :func:`residuals_kernel`)."""
    per_seed, M, _, _, inv_n = arguments
    if per_seed:
        if out.size * M.shape[1] > serial_work:
            _per_seed_clocks_parallel(M, Z, start, start_lo, row_seeds, inv_n, with_start, out, out_lo)
        else:
            _per_seed_clocks_serial(M, Z, start, start_lo, row_seeds, inv_n, with_start, out, out_lo)
        return
    np.dot(Z, M[0], out)
    if not with_start:
        R, d = out.shape
        for r in range(R):
            for i in range(d):
                out[r, i] *= inv_n
    elif out.size > serial_work:
        _add_start_parallel(out, out_lo, start, start_lo, row_seeds, inv_n)
    else:
        _add_start_serial(out, out_lo, start, start_lo, row_seeds, inv_n)


@njit(**STRICT_JIT_OPTIONS)
def residual_rises(f_end, f_start, theta, norm_rows, spectral, frobenius, targets, rtol, atol, rose):
    """rose[r] = 1 where the residual norm ||M theta - b|| grew in the step of row r (from
    f_start to f_end, at theta at the end) by more than errors within the tolerances explain,
    else 0: ||M||_2 ||atol + rtol |theta| ||, the most a change of theta within them moves the
    residual, plus a bound on the rounding of the residual,
    RESIDUAL_ROUNDING_ULPS eps (||M||_F ||theta|| + ||b||) (an entry's error is a few
    eps (|M| |theta| + |b|)_k, and || |M| |theta| || <= ||M||_F ||theta||). norm_rows[r]
    indexes the norms (:attr:`DualProducts.norms`) of the row's data."""
    R, m = f_end.shape
    d = theta.shape[1]
    rounding = RESIDUAL_ROUNDING_ULPS * np.finfo(np.float64).eps
    for r in range(R):
        end = 0.0
        start = 0.0
        for k in range(m):
            end += f_end[r, k] * f_end[r, k]
            start += f_start[r, k] * f_start[r, k]
        size = 0.0
        tol = 0.0
        for i in range(d):
            value = theta[r, i]
            size += value * value
            allowed = atol + rtol * abs(value)
            tol += allowed * allowed
        j = norm_rows[r]
        allowed = spectral[j] * np.sqrt(tol) + rounding * (frobenius[j] * np.sqrt(size) + targets[j])
        rose[r] = np.sqrt(end) - np.sqrt(start) > allowed


@njit(**STRICT_JIT_OPTIONS)
def _leave_out_small(h, column_weights, norm_rows, budget, reach):
    """:meth:`DualProducts.leave_out_small` for rows of h (in place) and reach (out)."""
    R, d = h.shape
    share = JACOBIAN_SLACK * MU_COMPLEX_RE
    for a in range(R):
        weights = h[a] * column_weights[norm_rows[a]]
        reach[a] = np.inf
        if not np.all(np.isfinite(weights)):
            continue
        order = np.argsort(weights)
        total = 0.0
        for j in range(d):
            grown = total + weights[order[j]]
            if grown > budget[a]:
                break
            total = grown
            h[a, order[j]] = 0.0
        if total > 0.0:
            reach[a] = share / total


# ---------------------------------------------------------------------------------------------
# Products with X
# ---------------------------------------------------------------------------------------------
class DualProducts:
    """The two products of the dual field, for rows of any batch (row r belongs to seed
    ``row_seeds[r]``): clocks M^T Z / n (+ a start) and residuals M theta - b. Shared data: one
    GEMM for every row of the batch; per-seed data: a parallel kernel over rows.

    (M, b) is the data the dual state lives on: (X, y) in the nu-form, and in the s-form (when
    d < n) (R, Q^T y) of a thin QR factorization X = Q R, with Q of shape (n, d) (orthonormal
    columns) and R of shape (d, d). Only the part Q^T nu of nu moves the clocks,
    X^T nu = R^T Q^T nu, so mu = Q^T nu follows mu' = R F(R^T mu / n) - Q^T y: the nu-form of
    d rows, with the 1/n of the n samples. This holds for a rank-deficient X too (R is then
    singular, and so is the Jacobian). The loss adds the part of y no theta can reach:
    ||X theta - y||^2 = ||R theta - Q^T y||^2 + ||y - Q Q^T y||^2.

    Parameters
    ----------
    problem : Problem
    s_form : bool, optional
        Whether to integrate in the s-form; None (the default): when d < n. The s-form needs
        d < n (ValueError otherwise); False forces the nu-form (for comparisons).

    Attributes
    ----------
    X : ndarray of shape (rows, d) or (S, rows, d)
        M, the matrix multiplied (X, or R in the s-form).
    y : ndarray of shape (1, rows) or (S, rows)
        b, the targets of the dual field (y, or Q^T y in the s-form).
    n, d : int
        Samples and coordinates of the problem.
    rows : int
        The dimension of the dual state: n, or d in the s-form.
    loss_offset : ndarray of shape (1,) or (S,)
        ||y - Q Q^T y||^2 / (2n) (zero in the nu-form), added to the loss of the residuals.
    """

    def __init__(self, problem: Problem, s_form: bool | None = None):
        X = np.asarray(problem.X, dtype=np.float64)
        y = np.asarray(problem.y, dtype=np.float64)
        self.per_seed = problem.per_seed
        self.n, self.d = problem.n, problem.d
        self.inv_n = 1.0 / self.n
        self.s_form = self.d < self.n if s_form is None else bool(s_form)
        if self.s_form and self.d >= self.n:
            raise ValueError(f"the s-form needs d < n (d = {self.d}, n = {self.n})")
        y = y if self.per_seed else y[None, :]
        self.loss_offset = np.zeros(y.shape[0])
        if self.s_form:
            Q, X = np.linalg.qr(X)  # numpy's QR is batched over per-seed data
            Q = Q if self.per_seed else Q[None]
            y_range = np.matmul(y[:, None, :], Q)[:, 0]
            y_perp = y - np.matmul(Q, y_range[:, :, None])[:, :, 0]
            self.loss_offset = np.einsum("ik,ik->i", y_perp, y_perp) / (2 * self.n)
            y = y_range
        self.X = np.ascontiguousarray(X)
        self.y = np.ascontiguousarray(y)
        self.rows = self.X.shape[-2]
        self.XT = None if self.per_seed else np.ascontiguousarray(self.X.T)
        #: (per_seed, M, M^T, b, 1 / n) for the compiled products: M and M^T of shape
        #: (S or 1, ...) (shared data: one; per-seed data: M^T is not used and holds M)
        self.kernel_arguments = (self.per_seed, self.X if self.per_seed else self.X[None],
                                 self.X if self.per_seed else self.XT[None], self.y, self.inv_n)
        M = self.X if self.per_seed else self.X[None]
        #: |m_i|^2 / n of every column: coordinate i adds h_i |m_i|^2 / n to trace(A)
        self.column_weights = np.einsum("skd,skd->sd", M, M) * self.inv_n
        #: ||M||_2, ||M||_F and ||b|| of every seed (one entry for shared data)
        self.norms = (np.linalg.norm(M, ord=2, axis=(1, 2)), np.sqrt(np.einsum("skd,skd->s", M, M)),
                      np.sqrt(np.einsum("sk,sk->s", self.y, self.y)))

    def describe(self) -> str:
        """Which form the dual state takes, in words (the run file's root attribute)."""
        if self.s_form:
            return (f"s-form: mu = Q^T nu in R^d of a thin QR X = Q R (d = {self.d} < n = "
                    f"{self.n}); /state/nu holds mu")
        return f"nu in R^n (n = {self.n} <= d = {self.d})"

    def losses(self, residuals, row_seeds) -> np.ndarray:
        """||X theta - y||^2 / (2n) of rows from their residuals M theta - b (rows, ``rows``)."""
        return np.einsum("ij,ij->i", residuals, residuals) / (2 * self.n) + self.offsets(row_seeds)

    def offsets(self, row_seeds) -> np.ndarray:
        """The loss offset ||y - Q Q^T y||^2 / (2n) of each row (zeros in the nu-form)."""
        return self.loss_offset[row_seeds if self.per_seed else np.zeros_like(row_seeds)]

    def clocks(self, Z, row_seeds, start, out, start_lo=None, out_lo=None):
        """out = M^T Z / n, or with a start the double-double (out, out_lo) = (start +
        start_lo)[row_seeds] + M^T Z / n. Z : (R, rows); out, out_lo : (R, d); start, start_lo :
        (S, d)."""
        if start is None:
            clocks_kernel(self.kernel_arguments, Z, row_seeds, False, out, out, out, out,
                          threads.SERIAL_STATE_WORK)
        else:
            clocks_kernel(self.kernel_arguments, Z, row_seeds, True, start, start_lo, out, out_lo,
                          threads.SERIAL_STATE_WORK)
        return out

    def _norm_rows(self, row_seeds):
        return row_seeds if self.per_seed else np.zeros_like(row_seeds)

    def residuals(self, theta, row_seeds, out):
        """out = M theta - b for rows of theta (R, d); out : (R, rows)."""
        residuals_kernel(self.kernel_arguments, theta, row_seeds, out, threads.SERIAL_STATE_WORK)
        return out

    def clock_noise_rate(self, seeds: int) -> np.ndarray:
        """eps (|M|^T |b|)_i / n of every seed, shape (S, d): the size of the rounding error of
        a clock derivative M^T (M theta - b) / n near a fit (where M theta cancels b), for the
        M and b actually multiplied."""
        X = np.abs(self.X)
        y = np.abs(self.y)
        rate = np.einsum("...ki,...k->...i", X, y if self.per_seed else y[0]) * self.inv_n
        return np.finfo(np.float64).eps * np.broadcast_to(rate, (seeds, self.d)).copy()

    def leave_out_small(self, h, seeds, step) -> np.ndarray:
        """The longest step each row's Jacobian serves after the coordinates whose share of
        A is negligible are set to zero in h (rows (m, d), in place): the smallest ones by
        h_i |m_i|^2 / n, as long as their sum, trace(E), stays within
        JACOBIAN_SLACK Re(mu) / (JACOBIAN_REACH step). The Newton matrices then move by at most
        JACOBIAN_SLACK of mu / h for steps up to JACOBIAN_SLACK Re(mu) / trace(E) (returned;
        inf when nothing was left out). At small scales most coordinates sit near zero with
        h_i ~ alpha^(2L - 2), and A has the rank of the active ones."""
        reach = np.empty(seeds.size)
        budget = JACOBIAN_SLACK * MU_COMPLEX_RE / (JACOBIAN_REACH * np.asarray(step, dtype=np.float64))
        _leave_out_small(h, self.column_weights, self._norm_rows(seeds), budget, reach)
        return reach

    def factor_jacobian(self, h, seed, basis, diag, off) -> int:
        """A = M diag(h) M^T / n of seed ``seed`` (the negative Jacobian; h >= 0, shape (d,)) as
        V B V^T, V with k orthonormal columns and B tridiagonal of order k: V^T into basis[:k],
        B's diagonal into diag[:k] and its subdiagonal into off[:k - 1]. Returns k.

        Only coordinates with h_i > 0 enter: a frozen coordinate (h = 0) adds nothing, nor does
        one that :meth:`leave_out_small` set to zero, and with fewer such coordinates than rows
        A has their rank k. With k < rows: a thin
        QR M_k diag(sqrt(h_k / n)) = U R, the rank-k matrix A = U (R R^T) U^T, and V = U P from
        R R^T = P B P^T (work k^2 rows instead of rows^3). Otherwise a symmetric rank-k update
        (two thirds of a general product: 0.25 against 0.40 ms at n = 100, d = 1000) and its
        tridiagonalization, V square."""
        X = self.X[seed] if self.per_seed else self.X
        # (non-finite h: everything in, so that the NaN shows in Newton rather than a rank 0)
        keep = np.flatnonzero(h > 0) if np.isfinite(h.max()) else np.arange(h.size)
        k = keep.size
        rows = self.rows
        if k == 0:
            return 0
        if k >= rows:
            root = np.sqrt(h)
            if k < h.size:
                X, root = X[:, keep], root[keep]
            # (X sqrt(h))^T is Fortran-ordered as it stands: syrk takes it without a copy
            # V is square: its transpose is written straight into the rows of the basis
            tridiagonalize(dsyrk(self.inv_n, (X * root).T, trans=1, lower=1), basis.T, diag, off)
            return rows
        # M_k diag(sqrt(h_k / n)), Fortran-ordered (rows, k) for LAPACK
        scaled = (X.T[keep] * np.sqrt(h[keep] * self.inv_n)[:, None]).T
        packed, tau, _, info = dgeqrf(scaled, overwrite_a=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"dgeqrf failed (info = {info})")
        R = np.triu(packed[:k, :k])
        U, _, info = dorgqr(packed, tau, overwrite_a=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"dorgqr failed (info = {info})")
        P = np.empty((k, k))
        tridiagonalize(dsyrk(1.0, R, trans=0, lower=1), P, diag[:k], off[:k])
        basis[:k] = (U @ P).T
        return k



def tridiagonalize(A, Q, diag, off) -> None:
    """A = Q B Q^T for the lower triangle of a symmetric A (Fortran-ordered; overwritten), B
    tridiagonal: Q, B's diagonal and subdiagonal (off[:n - 1]; off[n - 1] = 0) into the given
    arrays. LAPACK's dsytrd and, for Q, dorgqr on its reflectors (what dorgtr does; scipy wraps
    no dorgtr)."""
    n = A.shape[0]
    packed, d, e, tau, info = dsytrd(A, lower=1, overwrite_a=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"dsytrd failed (info = {info})")
    diag[:] = d
    # entries below the rounding of B decouple it (radau's module docstring: they would be
    # divided by pivots as small as mu / h at long steps)
    size = (np.abs(d).max() + 2.0 * np.abs(e).max()) if n > 1 else 0.0
    off[:n - 1] = np.where(np.abs(e) <= TRIDIAGONAL_DEFLATION * size, 0.0, e)
    off[n - 1:] = 0.0
    Q[0, :] = 0.0
    Q[:, 0] = 0.0
    Q[0, 0] = 1.0
    if n > 1:
        # the reflectors of a lower tridiagonalization sit one column left of a QR's
        q, _, info = dorgqr(packed[1:, :n - 1], tau, overwrite_a=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"dorgqr failed (info = {info})")
        Q[1:, 1:] = q
