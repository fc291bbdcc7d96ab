"""Numba kernels: layer products, fused Runge–Kutta stages, residuals, error norms, drift.

Every ``parallel=True`` kernel here is a top-level entry point called from Python (a cached
serial function calling a parallel one can crash, numba#8578). The products with X are BLAS
calls made from Python between these kernels, never inside ``prange``.

Work is split into items (active seed, block of ``BLOCK`` coordinates) over one flat ``prange``
index, so a single seed still uses every thread. Per-seed reductions are first summed per item,
then over blocks in a fixed order: results do not depend on the thread count.

Arrays, for S seeds, L layers, d coordinates, n samples, m active seeds:

- ``U``, ``Y``: (S, L, d) layers (state, stage input);
- ``K``: (stages, S, L, d) stage derivatives;
- ``theta``, ``G``: (S, d) rows 0..m-1 hold the active seeds in the order of ``active``;
- ``R``: (S, n) residuals, same row order.
"""

from __future__ import annotations

import numpy as np
from numba import get_thread_id, njit, prange

#: Fast-math without ``nnan``/``ninf``: those would delete the divergence (non-finite) checks.
FASTMATH_FLAGS = {"nsz", "arcp", "contract", "afn", "reassoc"}
JIT_OPTIONS = dict(cache=True, fastmath=FASTMATH_FLAGS, error_model="numpy", nogil=True)
PARALLEL_OPTIONS = dict(JIT_OPTIONS, parallel=True)
#: IEEE arithmetic: for code whose results must equal a Python transcription (step control).
STRICT_JIT_OPTIONS = dict(cache=True, error_model="numpy", nogil=True)

#: Coordinates per work item; a stage's rows for one item stay in the L1/L2 cache.
BLOCK = 512

#: Below these sizes (multiply-adds of one product with X; elements of the active state) the
#: integrators run in the calling thread: waking two threads costs tens of microseconds, and
#: on a loaded machine far more, while the work takes less (a straggler seed of dopri5).
SERIAL_PRODUCT_WORK = 1_000_000
SERIAL_STATE_WORK = 32_768

MODE_DERIVATIVE = 0  # stage derivative only
MODE_NEXT_INPUT = 1  # ... then the next stage input and its theta
MODE_ERROR = 2  # ... then the embedded error norm (adaptive methods)


@njit(**JIT_OPTIONS)
def _n_blocks(d):
    return (d + BLOCK - 1) // BLOCK


def stage_scratch(depth, dtype):
    """Per-thread scratch for the stage kernels, shape (threads, L + 1, BLOCK): a stage
    derivative that is not kept (rows 0..L-1) and the stage combination (row L). Each thread
    reuses its own rows, so they stay in the L1 cache and are never written back to memory."""
    import numba

    return np.zeros((numba.config.NUMBA_NUM_THREADS, depth + 1, BLOCK), dtype=dtype)


@njit(**JIT_OPTIONS)
def _k_row(K, scr, k, stage, keep, s, j, start, w):
    """Row j of stage derivative k over one block: in K, or in the thread's scratch for the
    current stage when it is not kept."""
    if k == stage and keep == 0:
        return scr[j, :w]
    return K[k, s, j, start:start + w]


# The kernels work on 1-D contiguous row views (one layer, one block) indexed from 0 with the
# coordinate innermost: that is what lets LLVM vectorize them (2-D indexing with a variable
# depth did not, measured 3-4x slower).
@njit(**PARALLEL_OPTIONS)
def _stage_input(U, K, coeffs, n_terms, h, active, Y, theta, scratch):
    """Y[s] = U[s] + h[s] * sum_k coeffs[k] K[k, s] and theta[a] = prod_j Y[s, j] for the active
    seeds ``s = active[a]``. With ``n_terms = 0`` it computes theta of U (then ``Y`` may be ``U``).
    ``scratch`` is :func:`stage_scratch`.
    """
    L, d = U.shape[1], U.shape[2]
    nb = _n_blocks(d)
    for item in prange(active.shape[0] * nb):
        a = item // nb
        s = active[a]
        start = (item % nb) * BLOCK
        w = min(BLOCK, d - start)
        hs = h[s]
        acc = scratch[get_thread_id(), L, :w]
        th = theta[a, start:start + w]
        for c in range(w):
            th[c] = 1.0
        for j in range(L):
            ur = U[s, j, start:start + w]
            if n_terms > 0:
                kr = K[0, s, j, start:start + w]
                c0 = coeffs[0]
                for c in range(w):
                    acc[c] = c0 * kr[c]
                for k in range(1, n_terms):
                    kr = K[k, s, j, start:start + w]
                    ck = coeffs[k]
                    for c in range(w):
                        acc[c] += ck * kr[c]
                yo = Y[s, j, start:start + w]
                for c in range(w):
                    y = ur[c] + hs * acc[c]
                    yo[c] = y
                    th[c] *= y
            else:
                for c in range(w):
                    th[c] *= ur[c]


@njit(**PARALLEL_OPTIONS)
def _rk_stage(U, Y_in, G, K, stage, keep, inv_n, h, active, live, mode,
              coeffs, n_terms, Y_out, theta, rtol, atol, err_partial, scratch):
    """One fused Runge–Kutta stage for the live active seeds.

    K[stage, s, j] = -(G[a] / n) * prod_{k != j} Y_in[s, k]   (prefix/suffix products, no
    division: layers may be exactly zero). ``G`` rows are used as scratch and destroyed.
    With ``keep = 0`` the stage derivative is only used inside this call (Euler; the last stage
    of a method without FSAL) and lives in the thread's ``scratch`` rows instead of K, which
    saves writing a state-sized array back to memory. Then, by ``mode``:

    - ``MODE_NEXT_INPUT``: Y_out[s] = U[s] + h[s] * sum_k coeffs[k] K[k, s] and its theta row
      (``Y_out`` may be ``Y_in`` or ``U``: each coordinate is read before it is written);
    - ``MODE_ERROR``: err_partial[a, block] = sum over the block of
      (h[s] * sum_k coeffs[k] K[k, s] / (atol + rtol * max(|U|, |Y_in|)))^2.
    """
    L, d = U.shape[1], U.shape[2]
    nb = _n_blocks(d)
    tiny = np.finfo(U.dtype).tiny
    for item in prange(active.shape[0] * nb):
        a = item // nb
        if live[a] == 0:
            continue
        s = active[a]
        block = item % nb
        start = block * BLOCK
        w = min(BLOCK, d - start)
        scr = scratch[get_thread_id()]
        # suffix products prod_{k > j} into the stage rows, then sweep the prefix (with -g/n
        # folded in).
        nxt = _k_row(K, scr, stage, stage, keep, s, L - 1, start, w)
        for c in range(w):
            nxt[c] = 1.0
        for j in range(L - 2, -1, -1):
            cur = _k_row(K, scr, stage, stage, keep, s, j, start, w)
            yr = Y_in[s, j + 1, start:start + w]
            for c in range(w):
                cur[c] = nxt[c] * yr[c]
            nxt = cur
        carry = G[a, start:start + w]
        for c in range(w):
            carry[c] = -inv_n * carry[c]
        for j in range(L):
            kr = _k_row(K, scr, stage, stage, keep, s, j, start, w)
            yr = Y_in[s, j, start:start + w]
            for c in range(w):
                kr[c] *= carry[c]
                carry[c] *= yr[c]
        if mode == MODE_DERIVATIVE:
            continue
        hs = h[s]
        acc = scr[L, :w]
        th = theta[a, start:start + w]
        if mode == MODE_NEXT_INPUT:
            for c in range(w):
                th[c] = 1.0
        total = 0.0
        for j in range(L):
            kr = _k_row(K, scr, 0, stage, keep, s, j, start, w)
            c0 = coeffs[0]
            for c in range(w):
                acc[c] = c0 * kr[c]
            for k in range(1, n_terms):
                kr = _k_row(K, scr, k, stage, keep, s, j, start, w)
                ck = coeffs[k]
                for c in range(w):
                    acc[c] += ck * kr[c]
            ur = U[s, j, start:start + w]
            if mode == MODE_NEXT_INPUT:
                yo = Y_out[s, j, start:start + w]
                for c in range(w):
                    y = ur[c] + hs * acc[c]
                    yo[c] = y
                    th[c] *= y
            else:
                yr = Y_in[s, j, start:start + w]
                for c in range(w):
                    scale = atol + rtol * max(abs(ur[c]), abs(yr[c]))
                    ratio = hs * acc[c] / max(scale, tiny)
                    total += ratio * ratio
        if mode == MODE_ERROR:
            err_partial[a, block] = total


@njit(**PARALLEL_OPTIONS)
def _euler_step(U, G, inv_n, h, active, live, theta, scratch):
    """One explicit Euler step in place for the live active seeds, and theta of the new layers:
    U[s, j] += h[s] * (-(G[a] / n) * prod_{k != j} U[s, k]); theta[a] = prod_j U[s, j].

    The same arithmetic as :func:`_rk_stage` with one stage and ``keep = 0`` (suffix products,
    then the prefix sweep with -g/n folded in), but for depths 1-4 each coordinate's layers stay
    in registers: the state is read and written once. Deeper networks take the
    ``scratch`` rows. ``G`` rows are destroyed.
    """
    L, d = U.shape[1], U.shape[2]
    nb = _n_blocks(d)
    for item in prange(active.shape[0] * nb):
        a = item // nb
        if live[a] == 0:
            continue
        s = active[a]
        start = (item % nb) * BLOCK
        w = min(BLOCK, d - start)
        hs = h[s]
        g = G[a, start:start + w]
        th = theta[a, start:start + w]
        if L == 1:
            u0 = U[s, 0, start:start + w]
            for c in range(w):
                y0 = u0[c] + hs * (-inv_n * g[c])
                u0[c] = y0
                th[c] = y0
        elif L == 2:
            u0 = U[s, 0, start:start + w]
            u1 = U[s, 1, start:start + w]
            for c in range(w):
                a0, a1 = u0[c], u1[c]
                carry = -inv_n * g[c]
                y0 = a0 + hs * (a1 * carry)
                y1 = a1 + hs * (carry * a0)
                u0[c], u1[c] = y0, y1
                th[c] = y0 * y1
        elif L == 3:
            u0 = U[s, 0, start:start + w]
            u1 = U[s, 1, start:start + w]
            u2 = U[s, 2, start:start + w]
            for c in range(w):
                a0, a1, a2 = u0[c], u1[c], u2[c]
                carry = -inv_n * g[c]
                y0 = a0 + hs * ((a2 * a1) * carry)
                carry *= a0
                y1 = a1 + hs * (a2 * carry)
                y2 = a2 + hs * (carry * a1)
                u0[c], u1[c], u2[c] = y0, y1, y2
                th[c] = (y0 * y1) * y2
        elif L == 4:
            u0 = U[s, 0, start:start + w]
            u1 = U[s, 1, start:start + w]
            u2 = U[s, 2, start:start + w]
            u3 = U[s, 3, start:start + w]
            for c in range(w):
                a0, a1, a2, a3 = u0[c], u1[c], u2[c], u3[c]
                carry = -inv_n * g[c]
                s1 = a3 * a2
                y0 = a0 + hs * ((s1 * a1) * carry)
                carry *= a0
                y1 = a1 + hs * (s1 * carry)
                carry *= a1
                y2 = a2 + hs * (a3 * carry)
                y3 = a3 + hs * (carry * a2)
                u0[c], u1[c], u2[c], u3[c] = y0, y1, y2, y3
                th[c] = ((y0 * y1) * y2) * y3
        else:
            suffix = scratch[get_thread_id()]
            nxt = suffix[L - 1, :w]
            for c in range(w):
                nxt[c] = 1.0
            for j in range(L - 2, -1, -1):
                cur = suffix[j, :w]
                ur = U[s, j + 1, start:start + w]
                for c in range(w):
                    cur[c] = nxt[c] * ur[c]
                nxt = cur
            for c in range(w):
                g[c] = -inv_n * g[c]
                th[c] = 1.0
            for j in range(L):
                ur = U[s, j, start:start + w]
                sr = suffix[j, :w]
                for c in range(w):
                    u = ur[c]
                    y = u + hs * (sr[c] * g[c])
                    g[c] *= u
                    ur[c] = y
                    th[c] *= y

# Serial: S x n values are far too few to pay for waking the thread team (tens of us).
@njit(**JIT_OPTIONS)
def _residual_and_loss(R, y, y_rows, m, inv_2n, loss):
    """R[a] -= y[y_rows[a]] in place and loss[a] = ||R[a]||^2 / (2n), for a < m (float64 sums
    in a fixed order)."""
    n = R.shape[1]
    for a in range(m):
        target = y[y_rows[a]]
        total = 0.0
        for i in range(n):
            r = R[a, i] - target[i]
            R[a, i] = r
            total += np.float64(r) * np.float64(r)
        loss[a] = total * inv_2n


@njit(**JIT_OPTIONS)
def _one_seed_products(X, y, theta, r, g, inv_2n, gradient):
    """Both products of one seed, in the calling thread, sums in a fixed order:
    r = X theta - y, g = X^T r (not yet divided by n; only if ``gradient``); returns
    ||r||^2 / (2n). ``X`` (n, d), ``y`` (n,), ``theta`` and ``g`` (d,), ``r`` (n,)."""
    n, d = X.shape
    total = 0.0
    for i in range(n):
        xi = X[i]
        acc = 0.0
        for c in range(d):
            acc += xi[c] * theta[c]
        ri = acc - y[i]
        r[i] = ri
        total += np.float64(ri) * np.float64(ri)
    if gradient != 0:
        for c in range(d):
            g[c] = 0.0
        for i in range(n):
            xi = X[i]
            ri = r[i]
            for c in range(d):
                g[c] += ri * xi[c]
    return total * inv_2n


@njit(**PARALLEL_OPTIONS)
def _per_seed_products(X, y, theta, active, R, G, inv_2n, loss, gradient):
    """Both products with per-seed data, one seed per work item: R[a] = X[s] theta[a] - y[s],
    loss[a] = ||R[a]||^2 / (2n), G[a] = X[s]^T R[a] (not yet divided by n; only if
    ``gradient``), ``s = active[a]``.

    One seed's design (n x d) is read from memory once: the second product finds it in the
    cache. Hand-written loops, not BLAS (no BLAS inside prange): each seed's sums run in one
    thread in a fixed order, so results depend neither on the thread count nor on the batch.
    """
    for a in prange(active.shape[0]):
        s = active[a]
        loss[a] = _one_seed_products(X[s], y[s], theta[a], R[a], G[a], inv_2n, gradient)


@njit(**JIT_OPTIONS)
def _shared_products_serial(X, y, theta, m, R, G, inv_2n, loss, gradient):
    """Both products with a shared X for the first ``m`` rows of ``theta``, in the calling
    thread (see :func:`_one_seed_products`). For a few seeds there is too little work to pay
    for waking a thread team (Numba's or the BLAS's), which on a busy machine can cost more
    than the products."""
    for a in range(m):
        loss[a] = _one_seed_products(X, y[0], theta[a], R[a], G[a], inv_2n, gradient)


@njit(**JIT_OPTIONS)
def _sum_blocks(err_partial, m, size, out):
    """out[a] = sqrt(sum_block err_partial[a, block] / size): the RMS error norm of each seed."""
    for a in range(m):
        total = 0.0
        for b in range(err_partial.shape[1]):
            total += err_partial[a, b]
        out[a] = np.sqrt(total / size)


@njit(**PARALLEL_OPTIONS)
def _accept_steps(U, Y, K, src, dst, seeds):
    """U[s] = Y[s] and K[dst, s] = K[src, s] for the accepted seeds (FSAL)."""
    L, d = U.shape[1], U.shape[2]
    nb = _n_blocks(d)
    for item in prange(seeds.shape[0] * nb):
        s = seeds[item // nb]
        start = (item % nb) * BLOCK
        stop = min(start + BLOCK, d)
        for j in range(L):
            U[s, j, start:stop] = Y[s, j, start:stop]
            K[dst, s, j, start:stop] = K[src, s, j, start:stop]


@njit(**PARALLEL_OPTIONS)
def _invariant_drift(U, u0, partial):
    """partial[s, block] = max over the block's coordinates i of
    max_j D_ij - min_j D_ij, with D_ij = (u^j_i)^2 - (u0^j_i)^2: the largest change of any
    (u^j_i)^2 - (u^k_i)^2. Exact flows keep it at 0."""
    S, L, d = U.shape
    nb = _n_blocks(d)
    for item in prange(S * nb):
        s = item // nb
        block = item % nb
        start = block * BLOCK
        stop = min(start + BLOCK, d)
        worst = 0.0
        for c in range(start, stop):
            lo = np.inf
            hi = -np.inf
            for j in range(L):
                v = np.float64(U[s, j, c])
                w = np.float64(u0[s, j, c])
                change = (v - w) * (v + w)
                lo = min(lo, change)
                hi = max(hi, change)
            spread = hi - lo
            if not spread <= worst:  # also carries NaN forward
                worst = spread
        partial[s, block] = worst
