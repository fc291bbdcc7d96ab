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

MODE_DERIVATIVE = 0  # stage derivative only
MODE_NEXT_INPUT = 1  # ... then the next stage input and its theta
MODE_ERROR = 2  # ... then the embedded error norm (adaptive methods)


@njit(**JIT_OPTIONS)
def n_blocks(d):
    """Blocks of ``BLOCK`` coordinates covering d (the last one may be partial)."""
    return (d + BLOCK - 1) // BLOCK


def stage_scratch(depth, dtype):
    """Per-thread scratch for the stage kernels, shape (threads, L + 1, BLOCK): the current
    stage derivative (rows 0..L-1) and a stage combination (row L). Each thread reuses its own
    rows, so they stay in the L1 cache and are never written back to memory."""
    import numba

    return np.zeros((numba.config.NUMBA_NUM_THREADS, depth + 1, BLOCK), dtype=dtype)


# -- per-block helpers (compiled into the kernels below) ------------------------------------------
# They work on 1-D contiguous row views (one layer, one block) indexed from 0 with the
# coordinate innermost: that is what lets LLVM vectorize them (2-D indexing with a variable
# depth did not, measured 3-4x slower).
@njit(inline="always")
def _k_row(K, scr, k, stage, keep, s, j, start, w):
    """Row j of stage derivative k over one block: in K, or in the thread's scratch for the
    current stage when it is not kept."""
    if k == stage and keep == 0:
        return scr[j, :w]
    return K[k, s, j, start:start + w]


@njit(inline="always")
def _suffix_rows(Y, s, start, w, rows, col):
    """rows[j, col:col + w] = prod_{k > j} Y[s, k] over one block (the suffix products of the
    all-but-one products; no division: layers may be exactly zero)."""
    L = Y.shape[1]
    nxt = rows[L - 1, col:col + w]
    for c in range(w):
        nxt[c] = 1.0
    for j in range(L - 2, -1, -1):
        cur = rows[j, col:col + w]
        yr = Y[s, j + 1, start:start + w]
        for c in range(w):
            cur[c] = nxt[c] * yr[c]
        nxt = cur


@njit(inline="always")
def _derivative_rows(Y, G, inv_n, a, s, start, w, rows, col):
    """rows[j, col:col + w] = -(G[a] / n) * prod_{k != j} Y[s, k] over one block: the suffix
    products, then a prefix sweep with -g/n folded in. The block of G[a] is the carry and is
    destroyed. ``rows``: K[stage, s] (col = start) or the thread's scratch (col = 0)."""
    _suffix_rows(Y, s, start, w, rows, col)
    carry = G[a, start:start + w]
    for c in range(w):
        carry[c] = -inv_n * carry[c]
    for j in range(Y.shape[1]):
        kr = rows[j, col:col + w]
        yr = Y[s, j, start:start + w]
        for c in range(w):
            kr[c] *= carry[c]
            carry[c] *= yr[c]


@njit(inline="always")
def _combination(acc, K, scr, stage, keep, coeffs, n_terms, s, j, start, w):
    """acc[:w] = sum_{k < n_terms} coeffs[k] K[k, s, j] over one block (the current stage's
    row from the thread's scratch when it is not kept)."""
    kr = _k_row(K, scr, 0, stage, keep, s, j, start, w)
    c0 = coeffs[0]
    for c in range(w):
        acc[c] = c0 * kr[c]
    for k in range(1, n_terms):
        kr = _k_row(K, scr, k, stage, keep, s, j, start, w)
        ck = coeffs[k]
        for c in range(w):
            acc[c] += ck * kr[c]


@njit(inline="always")
def _next_input_row(U, Y_out, th, acc, hs, s, j, start, w):
    """Y_out[s, j] = U[s, j] + h acc over one block, and theta *= it."""
    ur = U[s, j, start:start + w]
    yo = Y_out[s, j, start:start + w]
    for c in range(w):
        y = ur[c] + hs * acc[c]
        yo[c] = y
        th[c] *= y


@njit(inline="always")
def _error_row(total, U, Y, acc, hs, rtol, atol, tiny, s, j, start, w):
    """total + sum over one block of (h acc / (atol + rtol max(|U|, |Y|)))^2 (row j)."""
    ur = U[s, j, start:start + w]
    yr = Y[s, j, start:start + w]
    for c in range(w):
        scale = atol + rtol * max(abs(ur[c]), abs(yr[c]))
        ratio = hs * acc[c] / max(scale, tiny)
        total += ratio * ratio
    return total


@njit(inline="always")
def _work_item(item, nb, active, d):
    """Work item ``item`` of a kernel over (active seed, block): (a, s, block, start, width)."""
    a = item // nb
    block = item % nb
    start = block * BLOCK
    return a, active[a], block, start, min(BLOCK, d - start)


@njit(inline="always")
def _ones(th, w):
    for c in range(w):
        th[c] = 1.0


# -- one work item of each kernel (the parallel kernels and their serial twins share them) --------
@njit(inline="always")
def _layer_products_item(item, nb, U, active, theta):
    a, s, _, start, w = _work_item(item, nb, active, U.shape[2])
    th = theta[a, start:start + w]
    _ones(th, w)
    for j in range(U.shape[1]):
        ur = U[s, j, start:start + w]
        for c in range(w):
            th[c] *= ur[c]


@njit(inline="always")
def _stage_input_item(item, nb, U, K, coeffs, n_terms, h, active, Y, theta, scr):
    L = U.shape[1]
    a, s, _, start, w = _work_item(item, nb, active, U.shape[2])
    acc = scr[L, :w]
    th = theta[a, start:start + w]
    _ones(th, w)
    for j in range(L):
        _combination(acc, K, scr, -1, 1, coeffs, n_terms, s, j, start, w)
        _next_input_row(U, Y, th, acc, h[s], s, j, start, w)


@njit(inline="always")
def _rk_stage_item(item, nb, U, Y_in, G, K, stage, keep, inv_n, h, active, live, mode,
                   coeffs, n_terms, Y_out, theta, rtol, atol, err_partial, scr):
    L = U.shape[1]
    a, s, block, start, w = _work_item(item, nb, active, U.shape[2])
    if live[a] == 0:
        return
    if stage >= 0 and keep:
        _derivative_rows(Y_in, G, inv_n, a, s, start, w, K[stage, s], start)
    elif stage >= 0:
        _derivative_rows(Y_in, G, inv_n, a, s, start, w, scr, 0)
    if mode == MODE_DERIVATIVE:
        return
    hs = h[s]
    acc = scr[L, :w]
    th = theta[a, start:start + w]
    if mode == MODE_NEXT_INPUT:
        _ones(th, w)
    tiny = np.finfo(U.dtype).tiny
    total = 0.0
    for j in range(L):
        _combination(acc, K, scr, stage, keep, coeffs, n_terms, s, j, start, w)
        if mode == MODE_NEXT_INPUT:
            _next_input_row(U, Y_out, th, acc, hs, s, j, start, w)
        else:
            total = _error_row(total, U, Y_in, acc, hs, rtol, atol, tiny, s, j, start, w)
    if mode == MODE_ERROR:
        err_partial[a, block] = total


@njit(inline="always")
def _accept_item(item, nb, U, Y, K, src, dst, seeds):
    _, s, _, start, w = _work_item(item, nb, seeds, U.shape[2])
    stop = start + w
    for j in range(U.shape[1]):
        U[s, j, start:stop] = Y[s, j, start:stop]
        if src >= 0:
            K[dst, s, j, start:stop] = K[src, s, j, start:stop]


# -- kernels: parallel entry points, and serial twins for compiled loops (a cached serial function
# must not call a parallel one) ----------------------------------------------------------------
@njit(**PARALLEL_OPTIONS)
def layer_products(U, active, theta):
    """theta[a] = prod_j U[s, j] for the active seeds ``s = active[a]``."""
    nb = n_blocks(U.shape[2])
    for item in prange(active.shape[0] * nb):
        _layer_products_item(item, nb, U, active, theta)


@njit(**JIT_OPTIONS)
def layer_products_serial(U, active, theta):
    """:func:`layer_products` in the calling thread."""
    nb = n_blocks(U.shape[2])
    for item in range(active.shape[0] * nb):
        _layer_products_item(item, nb, U, active, theta)


@njit(**PARALLEL_OPTIONS)
def stage_input(U, K, coeffs, n_terms, h, active, Y, theta, scratch):
    """Y[s] = U[s] + h[s] * sum_{k < n_terms} coeffs[k] K[k, s] and theta[a] = prod_j Y[s, j]
    for the active seeds ``s = active[a]`` (n_terms >= 1). ``scratch``: :func:`stage_scratch`.
    """
    nb = n_blocks(U.shape[2])
    for item in prange(active.shape[0] * nb):
        _stage_input_item(item, nb, U, K, coeffs, n_terms, h, active, Y, theta,
                          scratch[get_thread_id()])


@njit(**JIT_OPTIONS)
def stage_input_serial(U, K, coeffs, n_terms, h, active, Y, theta, scratch):
    """:func:`stage_input` in the calling thread (scratch rows of thread 0)."""
    nb = n_blocks(U.shape[2])
    for item in range(active.shape[0] * nb):
        _stage_input_item(item, nb, U, K, coeffs, n_terms, h, active, Y, theta, scratch[0])


@njit(**PARALLEL_OPTIONS)
def rk_stage(U, Y_in, G, K, stage, keep, inv_n, h, active, live, mode,
             coeffs, n_terms, Y_out, theta, rtol, atol, err_partial, scratch):
    """One fused Runge–Kutta stage for the live active seeds.

    K[stage, s, j] = -(G[a] / n) * prod_{k != j} Y_in[s, k] (see :func:`_derivative_rows`;
    ``G`` rows are destroyed). With ``keep = 0`` the derivative is only used inside this call
    (Euler; the last stage of a method without FSAL) and lives in the thread's ``scratch``
    rows instead of K, never written back to memory. ``stage = -1`` computes no
    derivative (``G`` is not read): every term of the combination is in K already (the error
    of an embedded pair whose last stage is not at the new state). Then, by ``mode``:

    - ``MODE_NEXT_INPUT``: Y_out[s] = U[s] + h[s] * sum_{k < n_terms} coeffs[k] K[k, s] and its
      theta row (``Y_out`` may be ``Y_in`` or ``U``: each block is read before it is written);
    - ``MODE_ERROR``: err_partial[a, block] = sum over the block of
      (h[s] * sum_k coeffs[k] K[k, s] / (atol + rtol * max(|U|, |Y_in|)))^2.
    """
    nb = n_blocks(U.shape[2])
    for item in prange(active.shape[0] * nb):
        _rk_stage_item(item, nb, U, Y_in, G, K, stage, keep, inv_n, h, active, live, mode,
                       coeffs, n_terms, Y_out, theta, rtol, atol, err_partial,
                       scratch[get_thread_id()])


@njit(**JIT_OPTIONS)
def rk_stage_serial(U, Y_in, G, K, stage, keep, inv_n, h, active, live, mode,
                    coeffs, n_terms, Y_out, theta, rtol, atol, err_partial, scratch):
    """:func:`rk_stage` in the calling thread (scratch rows of thread 0)."""
    nb = n_blocks(U.shape[2])
    for item in range(active.shape[0] * nb):
        _rk_stage_item(item, nb, U, Y_in, G, K, stage, keep, inv_n, h, active, live, mode,
                       coeffs, n_terms, Y_out, theta, rtol, atol, err_partial, scratch[0])


@njit(**PARALLEL_OPTIONS)
def euler_step(U, G, inv_n, h, active, live, theta, scratch):
    """One explicit Euler step in place for the live active seeds, and theta of the new layers:
    U[s, j] += h[s] * (-(G[a] / n) * prod_{k != j} U[s, k]); theta[a] = prod_j U[s, j].

    The same arithmetic as :func:`rk_stage` with one stage, but for depths 1-4 each
    coordinate's layers stay in registers: the state is read and written once. Deeper networks
    keep the suffix products in the ``scratch`` rows. ``G`` rows are destroyed.
    """
    L, d = U.shape[1], U.shape[2]
    nb = n_blocks(d)
    for item in prange(active.shape[0] * nb):
        a, s, _, start, w = _work_item(item, nb, active, d)
        if live[a] == 0:
            continue
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
            # the prefix sweep fused with the update: the state is read and written once
            suffix = scratch[get_thread_id()]
            _suffix_rows(U, s, start, w, suffix, 0)
            for c in range(w):
                g[c] = -inv_n * g[c]
            _ones(th, w)
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
def residual_and_loss(R, y, y_rows, m, inv_2n, loss):
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
def one_seed_products(X, y, theta, r, g, inv_2n, gradient):
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
def per_seed_products(X, y, theta, active, R, G, inv_2n, loss, gradient):
    """Both products with per-seed data, one seed per work item: R[a] = X[s] theta[a] - y[s],
    loss[a] = ||R[a]||^2 / (2n), G[a] = X[s]^T R[a] (not yet divided by n; only if
    ``gradient``), ``s = active[a]``.

    One seed's design (n x d) is read from memory once: the second product finds it in the
    cache. Hand-written loops, not BLAS (no BLAS inside prange): each seed's sums run in one
    thread in a fixed order, so results depend neither on the thread count nor on the batch.
    """
    for a in prange(active.shape[0]):
        s = active[a]
        loss[a] = one_seed_products(X[s], y[s], theta[a], R[a], G[a], inv_2n, gradient)


@njit(**JIT_OPTIONS)
def shared_products_serial(X, y, theta, m, R, G, inv_2n, loss, gradient):
    """Both products with a shared X for the first ``m`` rows of ``theta``, in the calling
    thread (see :func:`one_seed_products`). For a few seeds there is too little work to pay
    for waking a thread team (Numba's or the BLAS's), which on a busy machine can cost more
    than the products."""
    for a in range(m):
        loss[a] = one_seed_products(X, y[0], theta[a], R[a], G[a], inv_2n, gradient)


@njit(**JIT_OPTIONS)
def rms_of_blocks(err_partial, m, size, out):
    """out[a] = sqrt(sum_block err_partial[a, block] / size): the RMS error norm of each seed."""
    for a in range(m):
        total = 0.0
        for b in range(err_partial.shape[1]):
            total += err_partial[a, b]
        out[a] = np.sqrt(total / size)


@njit(**PARALLEL_OPTIONS)
def accept_steps(U, Y, K, src, dst, seeds):
    """U[s] = Y[s] for the accepted seeds, and K[dst, s] = K[src, s] unless ``src < 0`` (FSAL:
    the last stage is the next step's first)."""
    nb = n_blocks(U.shape[2])
    for item in prange(seeds.shape[0] * nb):
        _accept_item(item, nb, U, Y, K, src, dst, seeds)


@njit(**JIT_OPTIONS)
def accept_steps_serial(U, Y, K, src, dst, seeds):
    """:func:`accept_steps` in the calling thread."""
    nb = n_blocks(U.shape[2])
    for item in range(seeds.shape[0] * nb):
        _accept_item(item, nb, U, Y, K, src, dst, seeds)


@njit(**PARALLEL_OPTIONS)
def invariant_drift_blocks(U, u0, partial):
    """partial[s, block] = max over the block's coordinates i of
    max_j D_ij - min_j D_ij, with D_ij = (u^j_i)^2 - (u0^j_i)^2: the largest change of any
    (u^j_i)^2 - (u^k_i)^2. Exact flows keep it at 0."""
    S, L, d = U.shape
    nb = n_blocks(d)
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
