"""Numba kernels: layer products, fused Runge–Kutta stages, residuals, error norms, drift.

Every ``parallel=True`` kernel here is a top-level entry point called from Python (a cached
serial function calling a parallel one can crash, numba#8578). The products with X are BLAS
calls made from Python between these kernels, never inside ``prange``.

Work is split into items (active seed, block of ``BLOCK`` coordinates) over one flat ``prange``
index, so a single seed still uses every thread. Per-seed reductions are first summed per item,
then over blocks in a fixed order: results do not depend on the thread count.

Arrays, for S seeds, P layer rows, d coordinates, n samples, m active seeds:

- ``U``, ``Y``: (S, P, d) layers (state, stage input);
- ``K``: (stages, S, P, d) stage derivatives;
- ``theta``, ``G``: (S, d) rows 0..m-1 hold the active seeds in the order of ``active``;
- ``R``: (S, n) residuals, same row order.

The parametrization (how theta is made of the layer rows) is one argument of the kernels that
touch layers, a :data:`KernelParametrization` ``(halves, power)``:

- ``(1, 0.0)``: product, theta = u^1 ... u^P;
- ``(2, 0.0)``: difference, theta = u^1 ... u^L - v^1 ... v^L with P = 2L rows, the u half first;
- ``(2, D)``: power, theta = u^D - v^D with P = 2 rows (u, v > 0), real D >= 2.

Every layer row moves by -g/n times the derivative of theta in that row (the gradient flow of
f(theta(U))), so the v half runs with the sign of g reversed.
"""

from __future__ import annotations

import types
from collections import namedtuple

import numpy as np
from numba import get_thread_id, njit, prange

from . import threads

#: Fast-math without ``nnan``/``ninf``: those would delete the divergence (non-finite) checks.
FASTMATH_FLAGS = {"nsz", "arcp", "contract", "afn", "reassoc"}
JIT_OPTIONS = dict(cache=True, fastmath=FASTMATH_FLAGS, error_model="numpy", nogil=True)
PARALLEL_OPTIONS = dict(JIT_OPTIONS, parallel=True)
#: IEEE arithmetic: for code whose results must equal a Python transcription (step control).
STRICT_JIT_OPTIONS = dict(cache=True, error_model="numpy", nogil=True)

#: Coordinates per work item; a stage's rows for one item stay in the L1/L2 cache.
BLOCK = 512

#: How theta is made of the layer rows (see the module docstring); build it with ``int`` halves
#: and ``float`` power so that every parametrization shares one compiled signature.
KernelParametrization = namedtuple("KernelParametrization", ["halves", "power"])
PRODUCT = KernelParametrization(1, 0.0)

#: Integer exponents up to this are powers by repeated multiplication (exact for D = 2, and
#: far cheaper than ``pow``, which does not vectorize here).
MAX_INTEGER_POWER = 16

MODE_DERIVATIVE = 0  # stage derivative only
MODE_NEXT_INPUT = 1  # ... then the next stage input and its theta
MODE_ERROR = 2  # ... then the embedded error norm (adaptive methods)


@njit(**JIT_OPTIONS)
def n_blocks(d):
    """Blocks of ``BLOCK`` coordinates covering d (the last one may be partial)."""
    return (d + BLOCK - 1) // BLOCK


def stage_scratch(layers, dtype):
    """Per-thread scratch for the stage kernels, shape (threads, P + 3, BLOCK) for P layer rows:
    the current stage derivative (rows 0..P-1), a stage combination (row P), the carry of the
    prefix products (row P + 1) and the product of the v half (row P + 2). Each thread reuses
    its own rows, so they stay in the L1 cache and are never written back to memory."""
    import numba

    return np.zeros((numba.config.NUMBA_NUM_THREADS, layers + SCRATCH_EXTRA_ROWS, BLOCK), dtype=dtype)


#: Scratch rows after the P derivative rows: combination, carry, v-half product.
SCRATCH_EXTRA_ROWS = 3


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
def _half_rows(param, layers):
    """Layer rows per half: P for the product, P / 2 for difference and power."""
    return layers // param.halves


@njit(inline="always")
def integer_exponent(exponent):
    """``exponent`` as an int when it is a whole number in 0..MAX_INTEGER_POWER, else -1."""
    k = int(exponent)
    if k == exponent and 0 <= k <= MAX_INTEGER_POWER:
        return k
    return -1


@njit(inline="always")
def real_power(y, exponent, k):
    """y ** exponent, by k - 1 multiplications when ``k = integer_exponent(exponent) >= 0``."""
    if k < 0:
        return y ** exponent
    if k == 0:
        return 1.0
    p = y
    for _ in range(k - 1):
        p *= y
    return p


@njit(inline="always")
def _suffix_rows(Y, s, start, w, rows, col, j0, count):
    """rows[j, col:col + w] = prod_{j < k < j0 + count} Y[s, k] for the layers j0 .. j0 + count - 2
    of one half over one block: the suffix products of the all-but-one products (the last
    layer's is empty: callers use 1); no division (layers may be exactly zero)."""
    last = j0 + count - 1
    if count < 2:
        return
    nxt = rows[last - 1, col:col + w]
    yl = Y[s, last, start:start + w]
    for c in range(w):
        nxt[c] = yl[c]
    for j in range(last - 2, j0 - 1, -1):
        cur = rows[j, col:col + w]
        yr = Y[s, j + 1, start:start + w]
        for c in range(w):
            cur[c] = nxt[c] * yr[c]
        nxt = cur


@njit(inline="always")
def _derivative_rows(Y, G, inv_n, param, a, s, start, w, rows, col, carry):
    """rows[j, col:col + w] = -(G[a] / n) * d theta / d Y[s, j] over one block.

    Product and difference halves: the suffix products, then a prefix sweep with -g/n (the u
    half) or +g/n (the v half) folded into ``carry`` (a scratch row of the block's width); the
    last layer's row is the carry itself. Power: -+(g/n) D y^(D-1). ``rows``: K[stage, s]
    (col = start) or the thread's scratch (col = 0). ``G`` is only read."""
    g = G[a, start:start + w]
    if param.power > 0.0:
        D = param.power
        k = integer_exponent(D - 1.0)
        for half in range(2):
            kr = rows[half, col:col + w]
            yr = Y[s, half, start:start + w]
            coef = -inv_n * D if half == 0 else inv_n * D
            for c in range(w):
                kr[c] = (coef * g[c]) * real_power(yr[c], D - 1.0, k)
        return
    count = _half_rows(param, Y.shape[1])
    for half in range(param.halves):
        j0 = half * count
        last = j0 + count - 1
        neg = -inv_n if half == 0 else inv_n
        if count == 1:
            kr = rows[j0, col:col + w]
            for c in range(w):
                kr[c] = neg * g[c]
            continue
        _suffix_rows(Y, s, start, w, rows, col, j0, count)
        for j in range(j0, last):
            kr = rows[j, col:col + w]
            yr = Y[s, j, start:start + w]
            if j == j0:  # the carry starts as -+g/n: set while the first row is scaled
                for c in range(w):
                    first = neg * g[c]
                    kr[c] *= first
                    carry[c] = first * yr[c]
            else:
                for c in range(w):
                    kr[c] *= carry[c]
                    carry[c] *= yr[c]
        kr = rows[last, col:col + w]
        for c in range(w):
            kr[c] = carry[c]


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


#: How :func:`_next_input_row` folds the new row y into the running product ``th``.
SET, MULTIPLY, SUBTRACT_PRODUCT, SUBTRACT = 0, 1, 2, 3


@njit(inline="always")
def _next_input_row(U, Y_out, th, acc, hs, s, j, start, w, fold, prod):
    """Y_out[s, j] = U[s, j] + h acc over one block, folded into th by ``fold``: th = y (SET,
    the first row of a product), th *= y (MULTIPLY), th -= prod y (SUBTRACT_PRODUCT, the last
    row of a v half), th -= y (SUBTRACT, a v half of one row)."""
    ur = U[s, j, start:start + w]
    yo = Y_out[s, j, start:start + w]
    if fold == SET:
        for c in range(w):
            y = ur[c] + hs * acc[c]
            yo[c] = y
            th[c] = y
    elif fold == MULTIPLY:
        for c in range(w):
            y = ur[c] + hs * acc[c]
            yo[c] = y
            th[c] *= y
    elif fold == SUBTRACT_PRODUCT:
        for c in range(w):
            y = ur[c] + hs * acc[c]
            yo[c] = y
            th[c] -= prod[c] * y
    else:
        for c in range(w):
            y = ur[c] + hs * acc[c]
            yo[c] = y
            th[c] -= y


@njit(inline="always")
def _next_inputs(U, K, scr, stage, keep, coeffs, n_terms, Y_out, prod, acc, hs, s, j0, count,
                 start, w):
    """Y_out[s, j] = U[s, j] + h sum_k coeffs[k] K[k, s, j] for the layers j0 .. j0 + count - 1
    over one block, and prod = their product (count >= 1)."""
    for j in range(j0, j0 + count):
        _combination(acc, K, scr, stage, keep, coeffs, n_terms, s, j, start, w)
        _next_input_row(U, Y_out, prod, acc, hs, s, j, start, w, SET if j == j0 else MULTIPLY, prod)


@njit(inline="always")
def _power_theta(Y, s, start, w, th, D):
    """th = Y[s, 0]^D - Y[s, 1]^D over one block (the power parametrization)."""
    k = integer_exponent(D)
    ur = Y[s, 0, start:start + w]
    vr = Y[s, 1, start:start + w]
    for c in range(w):
        th[c] = real_power(ur[c], D, k) - real_power(vr[c], D, k)


@njit(inline="always")
def _next_inputs_and_theta(U, K, scr, stage, keep, coeffs, n_terms, Y_out, th, hs, param, s,
                           start, w):
    """Every layer row of the next stage input over one block, and theta of it in ``th``."""
    P = U.shape[1]
    acc = scr[P, :w]
    if param.halves == 1:
        _next_inputs(U, K, scr, stage, keep, coeffs, n_terms, Y_out, th, acc, hs, s, 0, P, start, w)
        return
    count = _half_rows(param, P)
    v_prod = scr[P + 2, :w]
    _next_inputs(U, K, scr, stage, keep, coeffs, n_terms, Y_out, th, acc, hs, s, 0, count, start, w)
    if param.power > 0.0:
        _next_inputs(U, K, scr, stage, keep, coeffs, n_terms, Y_out, v_prod, acc, hs, s, 1, 1, start, w)
        _power_theta(Y_out, s, start, w, th, param.power)
        return
    # the v half: its product is subtracted from theta as its last row is formed
    if count > 1:
        _next_inputs(U, K, scr, stage, keep, coeffs, n_terms, Y_out, v_prod, acc, hs, s, count,
                     count - 1, start, w)
    last = 2 * count - 1
    _combination(acc, K, scr, stage, keep, coeffs, n_terms, s, last, start, w)
    _next_input_row(U, Y_out, th, acc, hs, s, last, start, w,
                    SUBTRACT_PRODUCT if count > 1 else SUBTRACT, v_prod)


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
def _layer_products_item(item, nb, U, param, active, theta):
    a, s, _, start, w = _work_item(item, nb, active, U.shape[2])
    th = theta[a, start:start + w]
    if param.power > 0.0:
        _power_theta(U, s, start, w, th, param.power)
        return
    count = _half_rows(param, U.shape[1])
    _ones(th, w)
    for j in range(count):
        ur = U[s, j, start:start + w]
        for c in range(w):
            th[c] *= ur[c]
    if param.halves == 2:
        for c in range(w):
            v_prod = U[s, count, start + c]
            for j in range(count + 1, 2 * count):
                v_prod *= U[s, j, start + c]
            th[c] -= v_prod


@njit(inline="always")
def _stage_input_item(item, nb, U, K, coeffs, n_terms, h, param, active, Y, theta, scr):
    a, s, _, start, w = _work_item(item, nb, active, U.shape[2])
    _next_inputs_and_theta(U, K, scr, -1, 1, coeffs, n_terms, Y, theta[a, start:start + w], h[s],
                           param, s, start, w)


@njit(inline="always")
def _rk_stage_item(item, nb, U, Y_in, G, K, stage, keep, inv_n, h, param, active, live, mode,
                   coeffs, n_terms, Y_out, theta, rtol, atol, err_partial, scr):
    P = U.shape[1]
    a, s, block, start, w = _work_item(item, nb, active, U.shape[2])
    if live[a] == 0:
        return
    carry = scr[P + 1, :w]
    if stage >= 0 and keep:
        _derivative_rows(Y_in, G, inv_n, param, a, s, start, w, K[stage, s], start, carry)
    elif stage >= 0:
        _derivative_rows(Y_in, G, inv_n, param, a, s, start, w, scr, 0, carry)
    if mode == MODE_DERIVATIVE:
        return
    hs = h[s]
    if mode == MODE_NEXT_INPUT:
        _next_inputs_and_theta(U, K, scr, stage, keep, coeffs, n_terms, Y_out,
                               theta[a, start:start + w], hs, param, s, start, w)
        return
    acc = scr[P, :w]
    tiny = np.finfo(U.dtype).tiny
    total = 0.0
    for j in range(P):
        _combination(acc, K, scr, stage, keep, coeffs, n_terms, s, j, start, w)
        total = _error_row(total, U, Y_in, acc, hs, rtol, atol, tiny, s, j, start, w)
    err_partial[a, block] = total


@njit(inline="always")
def _accept_item(item, nb, U, Y, K, src, dst, seeds):
    _, s, _, start, w = _work_item(item, nb, seeds, U.shape[2])
    stop = start + w
    for j in range(U.shape[1]):
        U[s, j, start:stop] = Y[s, j, start:stop]
        if src >= 0:
            K[dst, s, j, start:stop] = K[src, s, j, start:stop]


# One Euler update of the layers of one half at one coordinate, in registers: a_j moves by
# h * cr * (the product of the half's other layers), cr = -g/n (u half) or +g/n (v half).
@njit(inline="always")
def _step1(a0, cr, hs):
    return a0 + hs * cr


@njit(inline="always")
def _step2(a0, a1, cr, hs):
    return a0 + hs * (a1 * cr), a1 + hs * (cr * a0)


@njit(inline="always")
def _step3(a0, a1, a2, cr, hs):
    y0 = a0 + hs * ((a2 * a1) * cr)
    cr = cr * a0
    return y0, a1 + hs * (a2 * cr), a2 + hs * (cr * a1)


@njit(inline="always")
def _step4(a0, a1, a2, a3, cr, hs):
    s1 = a3 * a2
    y0 = a0 + hs * ((s1 * a1) * cr)
    cr = cr * a0
    y1 = a1 + hs * (s1 * cr)
    cr = cr * a1
    return y0, y1, a2 + hs * (a3 * cr), a3 + hs * (cr * a2)


@njit(inline="always")
def _euler_registers(U, s, count, halves, g, neg_inv_n, hs, th, start, w):
    """One Euler step over one block for halves of 1-4 layers, every layer of both halves in
    registers: the state is read and written once, and th = theta of the new layers."""
    n = start + w
    if count == 1:
        u0 = U[s, 0, start:n]
        if halves == 1:
            for c in range(w):
                y0 = _step1(u0[c], neg_inv_n * g[c], hs)
                u0[c] = y0
                th[c] = y0
        else:
            v0 = U[s, 1, start:n]
            for c in range(w):
                cr = neg_inv_n * g[c]
                y0, z0 = _step1(u0[c], cr, hs), _step1(v0[c], -cr, hs)
                u0[c], v0[c] = y0, z0
                th[c] = y0 - z0
    elif count == 2:
        u0, u1 = U[s, 0, start:n], U[s, 1, start:n]
        if halves == 1:
            for c in range(w):
                y0, y1 = _step2(u0[c], u1[c], neg_inv_n * g[c], hs)
                u0[c], u1[c] = y0, y1
                th[c] = y0 * y1
        else:
            v0, v1 = U[s, 2, start:n], U[s, 3, start:n]
            for c in range(w):
                cr = neg_inv_n * g[c]
                y0, y1 = _step2(u0[c], u1[c], cr, hs)
                z0, z1 = _step2(v0[c], v1[c], -cr, hs)
                u0[c], u1[c], v0[c], v1[c] = y0, y1, z0, z1
                th[c] = y0 * y1 - z0 * z1
    elif count == 3:
        u0, u1, u2 = U[s, 0, start:n], U[s, 1, start:n], U[s, 2, start:n]
        if halves == 1:
            for c in range(w):
                y0, y1, y2 = _step3(u0[c], u1[c], u2[c], neg_inv_n * g[c], hs)
                u0[c], u1[c], u2[c] = y0, y1, y2
                th[c] = (y0 * y1) * y2
        else:
            v0, v1, v2 = U[s, 3, start:n], U[s, 4, start:n], U[s, 5, start:n]
            for c in range(w):
                cr = neg_inv_n * g[c]
                y0, y1, y2 = _step3(u0[c], u1[c], u2[c], cr, hs)
                z0, z1, z2 = _step3(v0[c], v1[c], v2[c], -cr, hs)
                u0[c], u1[c], u2[c], v0[c], v1[c], v2[c] = y0, y1, y2, z0, z1, z2
                th[c] = (y0 * y1) * y2 - (z0 * z1) * z2
    else:
        u0, u1, u2, u3 = U[s, 0, start:n], U[s, 1, start:n], U[s, 2, start:n], U[s, 3, start:n]
        if halves == 1:
            for c in range(w):
                y0, y1, y2, y3 = _step4(u0[c], u1[c], u2[c], u3[c], neg_inv_n * g[c], hs)
                u0[c], u1[c], u2[c], u3[c] = y0, y1, y2, y3
                th[c] = ((y0 * y1) * y2) * y3
        else:
            v0, v1, v2, v3 = U[s, 4, start:n], U[s, 5, start:n], U[s, 6, start:n], U[s, 7, start:n]
            for c in range(w):
                cr = neg_inv_n * g[c]
                y0, y1, y2, y3 = _step4(u0[c], u1[c], u2[c], u3[c], cr, hs)
                z0, z1, z2, z3 = _step4(v0[c], v1[c], v2[c], v3[c], -cr, hs)
                u0[c], u1[c], u2[c], u3[c] = y0, y1, y2, y3
                v0[c], v1[c], v2[c], v3[c] = z0, z1, z2, z3
                th[c] = ((y0 * y1) * y2) * y3 - ((z0 * z1) * z2) * z3


@njit(inline="always")
def _euler_half(U, s, j0, count, g, neg_inv_n, hs, th, subtract, prod, carry, suffix, start, w):
    """One Euler step of the layers j0 .. j0 + count - 1 (count >= 2) of one half over one
    block, each moving by h * neg_inv_n * g * (the product of the half's other layers), the
    suffix products in the ``suffix`` rows and the running prefix in ``carry``; the prefix
    sweep is fused with the update, so the state is read and written once. Then prod = the
    product of the new layers and, with ``subtract``, th -= prod."""
    _suffix_rows(U, s, start, w, suffix, 0, j0, count)
    for c in range(w):
        carry[c] = neg_inv_n * g[c]
    _ones(prod, w)
    last = j0 + count - 1
    for j in range(j0, last):
        ur = U[s, j, start:start + w]
        sr = suffix[j, :w]
        for c in range(w):
            u = ur[c]
            y = u + hs * (sr[c] * carry[c])
            carry[c] *= u
            ur[c] = y
            prod[c] *= y
    ur = U[s, last, start:start + w]
    for c in range(w):
        y = ur[c] + hs * carry[c]
        ur[c] = y
        prod[c] *= y
    if subtract:
        for c in range(w):
            th[c] -= prod[c]


@njit(inline="always")
def _euler_power(U, s, g, inv_n, hs, D, th, start, w):
    """One Euler step of the power parametrization over one block: u moves by
    -h (g/n) D u^(D-1), v by +h (g/n) D v^(D-1); th = u^D - v^D."""
    km = integer_exponent(D - 1.0)
    k = integer_exponent(D)
    ur = U[s, 0, start:start + w]
    vr = U[s, 1, start:start + w]
    for c in range(w):
        step = hs * ((inv_n * D) * g[c])
        u = ur[c] - step * real_power(ur[c], D - 1.0, km)
        v = vr[c] + step * real_power(vr[c], D - 1.0, km)
        ur[c], vr[c] = u, v
        th[c] = real_power(u, D, k) - real_power(v, D, k)


@njit(inline="always")
def _euler_item(item, nb, U, G, inv_n, h, param, active, live, theta, scr):
    P = U.shape[1]
    a, s, _, start, w = _work_item(item, nb, active, U.shape[2])
    if live[a] == 0:
        return
    hs = h[s]
    g = G[a, start:start + w]
    th = theta[a, start:start + w]
    if param.power > 0.0:
        _euler_power(U, s, g, inv_n, hs, param.power, th, start, w)
        return
    count = _half_rows(param, P)
    if count <= 4:
        _euler_registers(U, s, count, param.halves, g, -inv_n, hs, th, start, w)
        return
    carry = scr[P + 1, :w]
    _euler_half(U, s, 0, count, g, -inv_n, hs, th, False, th, carry, scr, start, w)
    if param.halves == 2:
        _euler_half(U, s, count, count, g, inv_n, hs, th, True, scr[P + 2, :w], carry, scr, start, w)


# -- kernels: parallel entry points, and serial twins for compiled loops (a cached serial function
# must not call a parallel one) ----------------------------------------------------------------
@njit(**PARALLEL_OPTIONS)
def layer_products(U, param, active, theta):
    """theta[a] = theta of the layers U[s] for the active seeds ``s = active[a]``."""
    nb = n_blocks(U.shape[2])
    for item in prange(active.shape[0] * nb):
        _layer_products_item(item, nb, U, param, active, theta)


@njit(**JIT_OPTIONS)
def layer_products_serial(U, param, active, theta):
    """:func:`layer_products` in the calling thread."""
    nb = n_blocks(U.shape[2])
    for item in range(active.shape[0] * nb):
        _layer_products_item(item, nb, U, param, active, theta)


@njit(**PARALLEL_OPTIONS)
def stage_input(U, K, coeffs, n_terms, h, param, active, Y, theta, scratch):
    """Y[s] = U[s] + h[s] * sum_{k < n_terms} coeffs[k] K[k, s] and theta[a] of Y[s] for the
    active seeds ``s = active[a]`` (n_terms >= 1). ``scratch``: :func:`stage_scratch`.
    """
    nb = n_blocks(U.shape[2])
    for item in prange(active.shape[0] * nb):
        _stage_input_item(item, nb, U, K, coeffs, n_terms, h, param, active, Y, theta,
                          scratch[get_thread_id()])


@njit(**JIT_OPTIONS)
def stage_input_serial(U, K, coeffs, n_terms, h, param, active, Y, theta, scratch):
    """:func:`stage_input` in the calling thread (scratch rows of thread 0)."""
    nb = n_blocks(U.shape[2])
    for item in range(active.shape[0] * nb):
        _stage_input_item(item, nb, U, K, coeffs, n_terms, h, param, active, Y, theta, scratch[0])


@njit(**PARALLEL_OPTIONS)
def rk_stage(U, Y_in, G, K, stage, keep, inv_n, h, param, active, live, mode,
             coeffs, n_terms, Y_out, theta, rtol, atol, err_partial, scratch):
    """One fused Runge–Kutta stage for the live active seeds.

    K[stage, s, j] = -(G[a] / n) * d theta / d Y_in[s, j] (see :func:`_derivative_rows`). With
    ``keep = 0`` the derivative is only used inside this call (Euler; the last stage of a method
    without FSAL) and lives in the thread's ``scratch`` rows instead of K, never written back to
    memory. ``stage = -1`` computes no derivative (``G`` is not read): every term of the
    combination is in K already (the error of an embedded pair whose last stage is not at the
    new state). Then, by ``mode``:

    - ``MODE_NEXT_INPUT``: Y_out[s] = U[s] + h[s] * sum_{k < n_terms} coeffs[k] K[k, s] and its
      theta row (``Y_out`` may be ``Y_in`` or ``U``: each block is read before it is written);
    - ``MODE_ERROR``: err_partial[a, block] = sum over the block of
      (h[s] * sum_k coeffs[k] K[k, s] / (atol + rtol * max(|U|, |Y_in|)))^2.
    """
    nb = n_blocks(U.shape[2])
    for item in prange(active.shape[0] * nb):
        _rk_stage_item(item, nb, U, Y_in, G, K, stage, keep, inv_n, h, param, active, live, mode,
                       coeffs, n_terms, Y_out, theta, rtol, atol, err_partial,
                       scratch[get_thread_id()])


@njit(**JIT_OPTIONS)
def rk_stage_serial(U, Y_in, G, K, stage, keep, inv_n, h, param, active, live, mode,
                    coeffs, n_terms, Y_out, theta, rtol, atol, err_partial, scratch):
    """:func:`rk_stage` in the calling thread (scratch rows of thread 0)."""
    nb = n_blocks(U.shape[2])
    for item in range(active.shape[0] * nb):
        _rk_stage_item(item, nb, U, Y_in, G, K, stage, keep, inv_n, h, param, active, live, mode,
                       coeffs, n_terms, Y_out, theta, rtol, atol, err_partial, scratch[0])


@njit(**PARALLEL_OPTIONS)
def euler_step(U, G, inv_n, h, param, active, live, theta, scratch):
    """One explicit Euler step in place for the live active seeds, and theta of the new layers:
    U[s, j] += h[s] * (-(G[a] / n) * d theta / d U[s, j]).

    The same arithmetic as :func:`rk_stage` with one stage, but for halves of 1-4 layers every
    layer of a coordinate stays in registers (:func:`_euler_registers`), and deeper halves fuse
    the prefix sweep with the update (:func:`_euler_half`): the state is read and written once.
    ``G`` is only read.
    """
    nb = n_blocks(U.shape[2])
    for item in prange(active.shape[0] * nb):
        _euler_item(item, nb, U, G, inv_n, h, param, active, live, theta, scratch[get_thread_id()])

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
def transposed_product(A, x, out):
    """out = A^T x for A of shape (n, d), x (n,), out (d,): row by row (row-major friendly),
    each sum in the order of the rows."""
    n, d = A.shape
    for c in range(d):
        out[c] = 0.0
    for i in range(n):
        row = A[i]
        xi = x[i]
        for c in range(d):
            out[c] += xi * row[c]


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
        transposed_product(X, r, g)
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
def shared_products_serial(X, y, y_rows, theta, m, R, G, inv_2n, loss, gradient):
    """Both products with a shared X for the first ``m`` rows of ``theta`` (targets
    ``y[y_rows[a]]``), in the calling thread (see :func:`one_seed_products`). For a few seeds
    there is too little work to pay for waking a thread team (Numba's or the BLAS's), which on
    a busy machine can cost more than the products."""
    for a in range(m):
        loss[a] = one_seed_products(X, y[y_rows[a]], theta[a], R[a], G[a], inv_2n, gradient)


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


@njit(inline="always")
def _spread_of_half(U, u0, s, c, j0, count):
    """max_j D_j - min_j D_j over the layers j0 .. j0 + count - 1 of coordinate c, with
    D_j = (u^j)^2 - (u0^j)^2 (float64)."""
    lo = np.inf
    hi = -np.inf
    for j in range(j0, j0 + count):
        v = np.float64(U[s, j, c])
        w = np.float64(u0[s, j, c])
        change = (v - w) * (v + w)
        lo = min(lo, change)
        hi = max(hi, change)
    return hi - lo


@njit(inline="always")
def _power_invariant(u, v, D):
    """The conserved quantity of the power parametrization: u v for D = 2 (d log u = -d log v),
    u^(2-D) + v^(2-D) for D > 2 (float64)."""
    if D == 2.0:
        return u * v
    return u ** (2.0 - D) + v ** (2.0 - D)


@njit(**PARALLEL_OPTIONS)
def invariant_drift_blocks(U, u0, param, partial):
    """partial[s, block] = the largest drift of the invariants over the block's coordinates.

    Product and difference: max_j D_ij - min_j D_ij within each half, D_ij = (u^j_i)^2 -
    (u0^j_i)^2: the largest change of any (u^j_i)^2 - (u^k_i)^2 of one half. Power: the
    relative change |c_i / c0_i - 1| of c = u v (D = 2) or u^(2-D) + v^(2-D) (D > 2). Exact
    flows keep it at 0."""
    S, P, d = U.shape
    nb = n_blocks(d)
    count = P // param.halves
    for item in prange(S * nb):
        s = item // nb
        block = item % nb
        start = block * BLOCK
        stop = min(start + BLOCK, d)
        worst = 0.0
        for c in range(start, stop):
            if param.power > 0.0:
                now = _power_invariant(np.float64(U[s, 0, c]), np.float64(U[s, 1, c]), param.power)
                then = _power_invariant(np.float64(u0[s, 0, c]), np.float64(u0[s, 1, c]), param.power)
                spread = abs(now / then - 1.0)
            else:
                spread = _spread_of_half(U, u0, s, c, 0, count)
                if param.halves == 2:
                    other = _spread_of_half(U, u0, s, c, count, count)
                    if other > spread or other != other:  # a NaN wins
                        spread = other
            if not spread <= worst:  # also carries NaN forward
                worst = spread
        partial[s, block] = worst


def _renamed(function, suffix):
    """A copy of ``function`` named ``<name><suffix>``: Numba's on-disk cache names an entry by
    the function's module, qualified name and line, not by its options, so two builds of one
    function object would load each other's machine code from the cache (measured: the
    "serial" kernel ran on two threads once the parallel one was cached)."""
    copy = types.FunctionType(function.__code__, function.__globals__, f"{function.__name__}{suffix}",
                              function.__defaults__, function.__closure__)
    copy.__qualname__ = f"{function.__qualname__}{suffix}"
    copy.__module__ = function.__module__
    copy.__doc__ = function.__doc__
    return copy


def serial_and_parallel(loop, strict=False):
    """``loop`` (a function whose outer loop is a ``prange``) compiled twice: serial, for small
    batches (no thread start-up; callable from other compiled code), and parallel (a copy named
    ``<name>_parallel``: see :func:`_renamed`); ``strict``: IEEE arithmetic (no fast-math), for
    error-free transformations such as a two-sum, and for results that must not depend on how
    a kernel was compiled."""
    options = STRICT_JIT_OPTIONS if strict else JIT_OPTIONS
    return njit(**options)(loop), njit(**dict(options, parallel=True))(_renamed(loop, "_parallel"))


def strict_twin(kernel):
    """The compiled ``kernel`` again with IEEE arithmetic (a copy named ``<name>_strict``), for
    strict code that calls it: fast-math flags travel with the callee's instructions into the
    caller, and with them the freedom to contract and reorder differently in each build."""
    return njit(**STRICT_JIT_OPTIONS)(_renamed(kernel.py_func, "_strict"))


def call_by_size(kernels, items, *args):
    """Call the serial kernel of a :func:`serial_and_parallel` pair for at most
    ``threads.SERIAL_STATE_WORK`` items of work, else the parallel one."""
    return kernels[items > threads.SERIAL_STATE_WORK](*args)
