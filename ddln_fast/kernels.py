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
from numba import njit, prange

#: Fast-math without ``nnan``/``ninf``: those would delete the divergence (non-finite) checks.
FASTMATH_FLAGS = {"nsz", "arcp", "contract", "afn", "reassoc"}
JIT_OPTIONS = dict(cache=True, fastmath=FASTMATH_FLAGS, error_model="numpy", nogil=True)
PARALLEL_OPTIONS = dict(JIT_OPTIONS, parallel=True)

#: Coordinates per work item; a stage's rows for one item stay in the L1/L2 cache.
BLOCK = 512

MODE_DERIVATIVE = 0  # stage derivative only
MODE_NEXT_INPUT = 1  # ... then the next stage input and its theta
MODE_ERROR = 2  # ... then the embedded error norm (adaptive methods)


@njit(**JIT_OPTIONS)
def _n_blocks(d):
    return (d + BLOCK - 1) // BLOCK


@njit(**PARALLEL_OPTIONS)
def _stage_input(U, K, coeffs, n_terms, h, active, Y, theta):
    """Y[s] = U[s] + h[s] * sum_k coeffs[k] K[k, s] and theta[a] = prod_j Y[s, j] for the active
    seeds ``s = active[a]``. With ``n_terms = 0`` it computes theta of U (then ``Y`` may be ``U``).
    """
    L, d = U.shape[1], U.shape[2]
    nb = _n_blocks(d)
    for item in prange(active.shape[0] * nb):
        a = item // nb
        s = active[a]
        start = (item % nb) * BLOCK
        stop = min(start + BLOCK, d)
        hs = h[s]
        th = theta[a]
        for c in range(start, stop):
            th[c] = 1.0
        for j in range(L):
            for c in range(start, stop):
                y = U[s, j, c]
                if n_terms > 0:
                    acc = coeffs[0] * K[0, s, j, c]
                    for k in range(1, n_terms):
                        acc += coeffs[k] * K[k, s, j, c]
                    y = y + hs * acc
                Y[s, j, c] = y
                th[c] *= y


@njit(**PARALLEL_OPTIONS)
def _rk_stage(U, Y_in, G, K, stage, inv_n, h, active, live, mode,
              coeffs, n_terms, Y_out, theta, rtol, atol, err_partial):
    """One fused Runge–Kutta stage for the live active seeds.

    K[stage, s, j] = -(G[a] / n) * prod_{k != j} Y_in[s, k]   (prefix/suffix products, no
    division: layers may be exactly zero). ``G`` rows are used as scratch and destroyed.
    Then, by ``mode``:

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
        stop = min(start + BLOCK, d)
        Ks = K[stage, s]
        Ys = Y_in[s]
        carry = G[a]
        # suffix products prod_{k > j} into K, then sweep the prefix (with -g/n folded in).
        for c in range(start, stop):
            Ks[L - 1, c] = 1.0
        for j in range(L - 2, -1, -1):
            for c in range(start, stop):
                Ks[j, c] = Ks[j + 1, c] * Ys[j + 1, c]
        for c in range(start, stop):
            carry[c] = -inv_n * carry[c]
        for j in range(L):
            for c in range(start, stop):
                Ks[j, c] *= carry[c]
                carry[c] *= Ys[j, c]
        if mode == MODE_NEXT_INPUT:
            hs = h[s]
            th = theta[a]
            for c in range(start, stop):
                th[c] = 1.0
            for j in range(L):
                for c in range(start, stop):
                    acc = coeffs[0] * K[0, s, j, c]
                    for k in range(1, n_terms):
                        acc += coeffs[k] * K[k, s, j, c]
                    y = U[s, j, c] + hs * acc
                    Y_out[s, j, c] = y
                    th[c] *= y
        elif mode == MODE_ERROR:
            hs = h[s]
            total = 0.0
            for j in range(L):
                for c in range(start, stop):
                    acc = coeffs[0] * K[0, s, j, c]
                    for k in range(1, n_terms):
                        acc += coeffs[k] * K[k, s, j, c]
                    scale = atol + rtol * max(abs(U[s, j, c]), abs(Ys[j, c]))
                    ratio = hs * acc / max(scale, tiny)
                    total += ratio * ratio
            err_partial[a, block] = total


@njit(**PARALLEL_OPTIONS)
def _residual_and_loss(R, y, y_rows, m, inv_2n, loss):
    """R[a] -= y[y_rows[a]] in place and loss[a] = ||R[a]||^2 / (2n), for a < m (float64 sums
    in a fixed order)."""
    n = R.shape[1]
    for a in prange(m):
        target = y[y_rows[a]]
        total = 0.0
        for i in range(n):
            r = R[a, i] - target[i]
            R[a, i] = r
            total += np.float64(r) * np.float64(r)
        loss[a] = total * inv_2n


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
            for c in range(start, stop):
                U[s, j, c] = Y[s, j, c]
                K[dst, s, j, c] = K[src, s, j, c]


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
