"""Numba kernels of stochastic and accelerated gradient descent on the layers.

- :func:`gathered_products`: the gradient of each seed's minibatch loss, from the rows of X its
  batch gathers (no copy of them), one seed per work item;
- :func:`momentum_step`: heavy-ball or Nesterov momentum and weight decay fused into one pass over
  the layers and the velocity (plain steps use :func:`ddln_fast.kernels.euler_step`);
- :func:`accumulate_gain`: the depth-2 gain sums of Even, Pesme, Gunasekar & Flammarion (2023),
  in IEEE arithmetic (fast-math may approximate the logarithms, whose small differences they are).

Arrays, for S seeds, P layer rows, d coordinates, n samples, batch size b and m active seeds
(rows 0..m-1 of ``theta`` and ``G`` hold the seeds of ``active`` in that order, as in
:mod:`ddln_fast.kernels`): ``U``, ``V`` (S, P, d) layers and velocity; ``theta``, ``G`` (S, d).

The parametrization is an argument of :func:`momentum_step`, as in the kernels of
:mod:`ddln_fast.kernels`: the product, the difference of two products (each half stepped as a
product whose loss gradient has the sign of its half) and the power u^D - v^D.
"""

from __future__ import annotations

import numpy as np
from numba import get_thread_id, njit, prange

from .kernels import BLOCK, PARALLEL_OPTIONS, STRICT_JIT_OPTIONS, integer_exponent, n_blocks, real_power

_STRICT_PARALLEL_OPTIONS = dict(STRICT_JIT_OPTIONS, parallel=True)


@njit(**PARALLEL_OPTIONS)
def gathered_products(X, y, per_seed, theta, active, order, starts, batch, noise, noise_starts,
                      label_noise, G, inv_2b, loss):
    """Minibatch products of the active seeds, one seed per work item, sums in a fixed order.

    Seed ``s = active[a]`` uses the samples ``order[s, starts[s] + i]``, i < ``batch``, with
    labels y_i + label_noise * noise[s, noise_starts[s] + i] (``noise`` is not read when
    ``label_noise`` is 0):
    G[a] = sum_i r_i x_i (X^T r of the batch, not yet divided by the batch size), with
    r_i = x_i . theta[a] - label_i, and loss[a] = sum_i r_i^2 * inv_2b (the batch loss).

    Each gathered row is read from memory once: its residual and its share of G are computed
    while it is in the cache. Hand-written loops, no BLAS inside ``prange``: results depend on
    neither the thread count nor the other seeds.

    Parameters
    ----------
    X : ndarray of shape (S, n, d) (``per_seed``) or (1, n, d)
    y : ndarray of shape (S, n) or (1, n)
    order : int64 ndarray of shape (S, w)
        Sample indices; each seed's batch is ``batch`` consecutive entries of its row.
    starts : int64 ndarray of shape (S,)
    noise : float64 ndarray of shape (S, w') (or any, with ``label_noise`` 0)
    noise_starts : int64 ndarray of shape (S,)
    """
    d = X.shape[2]
    for a in prange(active.shape[0]):
        s = active[a]
        k = s if per_seed else 0
        th = theta[a]
        g = G[a]
        for c in range(d):
            g[c] = 0.0
        total = 0.0
        for i in range(batch):
            row = order[s, starts[s] + i]
            xi = X[k, row]
            acc = 0.0
            for c in range(d):
                acc += xi[c] * th[c]
            label = y[k, row]
            if label_noise != 0.0:
                label = label + label_noise * noise[s, noise_starts[s] + i]
            r = acc - label
            total += np.float64(r) * np.float64(r)
            for c in range(d):
                g[c] += r * xi[c]
        loss[a] = total * inv_2b


@njit(inline="always")
def _layer_gradient_rows(U, g, coef, s, j0, count, start, w, rows, prefix):
    """rows[j, :w] = coef * g * prod_{k != j} U[s, k] over one block, for the layers j, k of one
    half, j0 .. j0 + count - 1: the gradient of the batch loss in layer j when coef is 1/b
    (the u half) or -1/b (the v half). Products of the layers after j first (rows from the
    last up), then those before j as a running ``prefix`` row; nothing is divided by a layer
    (layers may be exactly zero)."""
    last = j0 + count - 1
    row = rows[last, :w]
    for c in range(w):
        row[c] = coef * g[c]
    for j in range(last, j0, -1):
        later = rows[j, :w]
        cur = rows[j - 1, :w]
        ur = U[s, j, start:start + w]
        for c in range(w):
            cur[c] = later[c] * ur[c]
    for c in range(w):
        prefix[c] = 1.0
    for j in range(j0 + 1, j0 + count):
        gr = rows[j, :w]
        ur = U[s, j - 1, start:start + w]
        for c in range(w):
            prefix[c] *= ur[c]
            gr[c] *= prefix[c]


@njit(inline="always")
def _descend(u, grad, vr, c, hs, momentum, weight_decay, velocity, nesterov):
    """The new value of one layer entry u with gradient ``grad`` of the loss: weight decay, then
    (``velocity``) the momentum update of v = vr[c], then the step. ``velocity`` and
    ``nesterov`` are compile-time constants of each kernel (a branch in the coordinate loop
    measured 1.7x slower in a memory-bound step)."""
    grad = grad + weight_decay * u
    if not velocity:
        return u - hs * grad
    v = momentum * vr[c] + grad
    vr[c] = v
    if nesterov:
        return u - hs * (grad + momentum * v)
    return u - hs * v


@njit(inline="always")
def _descend_half(U, V, g, coef, s, j0, count, start, w, hs, momentum, weight_decay, velocity,
                  nesterov, prod, rows, prefix):
    """One step of the layers j0 .. j0 + count - 1 of one half over one block, and prod = the
    product of the new layers. The loss gradient in layer j is coef * g times the product of
    the half's other layers (coef = 1/b for the u half, -1/b for the v half). Halves of 1-4
    layers keep a coordinate's layers in registers (at depth 3 2.6x faster than gradient rows
    in scratch, measured); deeper halves keep the gradient rows of the block in ``rows``."""
    n = start + w
    u0 = U[s, j0, start:n]
    v0 = V[s, j0, start:n] if velocity else V[s, j0, :0]
    if count == 1:
        for c in range(w):
            y0 = _descend(u0[c], coef * g[c], v0, c, hs, momentum, weight_decay, velocity, nesterov)
            u0[c] = y0
            prod[c] = y0
        return
    u1 = U[s, j0 + 1, start:n]
    v1 = V[s, j0 + 1, start:n] if velocity else V[s, j0 + 1, :0]
    if count == 2:
        for c in range(w):
            a0, a1, gc = u0[c], u1[c], coef * g[c]
            y0 = _descend(a0, gc * a1, v0, c, hs, momentum, weight_decay, velocity, nesterov)
            y1 = _descend(a1, gc * a0, v1, c, hs, momentum, weight_decay, velocity, nesterov)
            u0[c], u1[c] = y0, y1
            prod[c] = y0 * y1
        return
    u2 = U[s, j0 + 2, start:n]
    v2 = V[s, j0 + 2, start:n] if velocity else V[s, j0 + 2, :0]
    if count == 3:
        for c in range(w):
            a0, a1, a2, gc = u0[c], u1[c], u2[c], coef * g[c]
            y0 = _descend(a0, gc * (a1 * a2), v0, c, hs, momentum, weight_decay, velocity, nesterov)
            y1 = _descend(a1, gc * (a0 * a2), v1, c, hs, momentum, weight_decay, velocity, nesterov)
            y2 = _descend(a2, gc * (a0 * a1), v2, c, hs, momentum, weight_decay, velocity, nesterov)
            u0[c], u1[c], u2[c] = y0, y1, y2
            prod[c] = (y0 * y1) * y2
        return
    if count == 4:
        u3 = U[s, j0 + 3, start:n]
        v3 = V[s, j0 + 3, start:n] if velocity else V[s, j0 + 3, :0]
        for c in range(w):
            a0, a1, a2, a3, gc = u0[c], u1[c], u2[c], u3[c], coef * g[c]
            front, back = a0 * a1, a2 * a3
            y0 = _descend(a0, gc * (a1 * back), v0, c, hs, momentum, weight_decay, velocity, nesterov)
            y1 = _descend(a1, gc * (a0 * back), v1, c, hs, momentum, weight_decay, velocity, nesterov)
            y2 = _descend(a2, gc * (front * a3), v2, c, hs, momentum, weight_decay, velocity, nesterov)
            y3 = _descend(a3, gc * (front * a2), v3, c, hs, momentum, weight_decay, velocity, nesterov)
            u0[c], u1[c], u2[c], u3[c] = y0, y1, y2, y3
            prod[c] = ((y0 * y1) * y2) * y3
        return
    _layer_gradient_rows(U, g, coef, s, j0, count, start, w, rows, prefix)
    for c in range(w):
        prod[c] = 1.0
    for j in range(j0, j0 + count):
        ur = U[s, j, start:n]
        gr = rows[j, :w]
        vr = V[s, j, start:n] if velocity else V[s, j, :0]
        for c in range(w):
            y = _descend(ur[c], gr[c], vr, c, hs, momentum, weight_decay, velocity, nesterov)
            ur[c] = y
            prod[c] *= y


@njit(inline="always")
def _descend_power_block(ur, vr, mu, mv, g, gscale, hs, D, km, k, momentum, weight_decay, velocity,
                         nesterov, th, w):
    """The coordinate loop of :func:`_descend_power` (exponents D - 1 and D as km, k of
    :func:`ddln_fast.kernels.integer_exponent`)."""
    for c in range(w):
        gc = gscale * g[c]
        u, v = ur[c], vr[c]
        y = _descend(u, gc * real_power(u, D - 1.0, km), mu, c, hs, momentum, weight_decay,
                     velocity, nesterov)
        z = _descend(v, -gc * real_power(v, D - 1.0, km), mv, c, hs, momentum, weight_decay,
                     velocity, nesterov)
        ur[c], vr[c] = y, z
        th[c] = real_power(y, D, k) - real_power(z, D, k)


@njit(inline="always")
def _descend_power(U, V, g, inv_b, s, start, w, hs, D, momentum, weight_decay, velocity,
                   nesterov, th):
    """One step of the power parametrization over one block: the loss gradient is
    +(g/b) D u^(D-1) in u and -(g/b) D v^(D-1) in v; th = u^D - v^D of the new layers.
    D = 2 and 3 pass their exponents as constants, so that the loop vectorizes (a branch on
    the exponent inside it did not)."""
    n = start + w
    ur, vr = U[s, 0, start:n], U[s, 1, start:n]
    mu = V[s, 0, start:n] if velocity else V[s, 0, :0]
    mv = V[s, 1, start:n] if velocity else V[s, 1, :0]
    gscale = inv_b * D
    if D == 2.0:
        _descend_power_block(ur, vr, mu, mv, g, gscale, hs, 2.0, 1, 2, momentum, weight_decay,
                             velocity, nesterov, th, w)
    elif D == 3.0:
        _descend_power_block(ur, vr, mu, mv, g, gscale, hs, 3.0, 2, 3, momentum, weight_decay,
                             velocity, nesterov, th, w)
    else:
        _descend_power_block(ur, vr, mu, mv, g, gscale, hs, D, integer_exponent(D - 1.0),
                             integer_exponent(D), momentum, weight_decay, velocity, nesterov, th, w)


def _momentum_step_kernel(velocity: bool, nesterov: bool):
    """The compiled :func:`momentum_step` of one variant (a closure: the flags are constants)."""

    @njit(**PARALLEL_OPTIONS)
    def kernel(U, V, G, inv_b, h, param, active, live, momentum, weight_decay, theta, scratch):
        P, d = U.shape[1], U.shape[2]
        count = P // param.halves
        nb = n_blocks(d)
        for item in prange(active.shape[0] * nb):
            a = item // nb
            start = (item % nb) * BLOCK
            w = min(BLOCK, d - start)
            if live[a] == 0:
                continue
            s = active[a]
            hs = h[s]
            g = G[a, start:start + w]
            th = theta[a, start:start + w]
            if param.power > 0.0:
                _descend_power(U, V, g, inv_b, s, start, w, hs, param.power, momentum,
                               weight_decay, velocity, nesterov, th)
                continue
            rows = scratch[get_thread_id()]
            _descend_half(U, V, g, inv_b, s, 0, count, start, w, hs, momentum, weight_decay,
                          velocity, nesterov, th, rows, rows[P, :w])
            if param.halves == 2:
                v_prod = rows[P + 2, :w]
                _descend_half(U, V, g, -inv_b, s, count, count, start, w, hs, momentum,
                              weight_decay, velocity, nesterov, v_prod, rows, rows[P, :w])
                for c in range(w):
                    th[c] -= v_prod[c]

    return kernel


#: The compiled variants of :func:`momentum_step`, by (velocity, nesterov).
MOMENTUM_STEP_KERNELS = {(velocity, nesterov): _momentum_step_kernel(velocity, nesterov)
                         for velocity, nesterov in ((False, False), (True, False), (True, True))}


def momentum_step(U, V, G, inv_b, h, param, active, live, momentum, nesterov, weight_decay,
                  theta, scratch):
    """One step of (stochastic) gradient descent with heavy-ball or Nesterov momentum and weight
    decay, in place, for the live active seeds, and theta of the new layers (PyTorch's SGD):

        grad = (G[a] / b) * d theta / d u^j + weight_decay * u^j,
        v^j <- momentum * v^j + grad,
        u^j <- u^j - h[s] * (grad + momentum * v^j)   (Nesterov)   or   u^j - h[s] * v^j,

    for every layer row u^j of the parametrization ``param``
    (:data:`ddln_fast.kernels.KernelParametrization`): d theta / d u^j is the product of the
    other layers of its half (negated in the v half of "difference") or +-D u^(D-1) ("power").

    ``V`` is neither read nor written when ``momentum`` is 0 (weight decay alone). One pass over
    U and V: for halves of 1-4 layers a coordinate's layers stay in registers (as in
    :func:`ddln_fast.kernels.euler_step`), deeper halves keep the gradient rows of a block in
    the thread's ``scratch`` rows (:func:`ddln_fast.kernels.stage_scratch`: P + 3 rows for P
    layer rows). ``G`` is only read. Each variant (weight decay alone, heavy ball, Nesterov)
    is its own compiled kernel.
    """
    kernel = MOMENTUM_STEP_KERNELS[(momentum != 0, bool(nesterov) and momentum != 0)]
    kernel(U, V, G, inv_b, h, param, active, live, momentum, weight_decay, theta, scratch)


@njit(**_STRICT_PARALLEL_OPTIONS)
def accumulate_gain(G, inv_b, h, active, live, gain_plus, gain_minus, largest):
    """Add q_+(x) = -2x - ln((1 - x)^2) and q_-(x) = 2x - ln((1 + x)^2), x = h[s] G[a] / b (the
    step times the gradient of this step), to gain_plus[s] and gain_minus[s], for the live
    active seeds, and keep in largest[s] the largest |x| so far.

    Depth 2 only: then (u^1 + u^2) is multiplied by 1 - x and (u^1 - u^2) by 1 + x per step,
    which the gain sums turn into an effective initialization (Even et al. 2023). For |x| >= 1
    a factor is not positive and the sums are undefined: they become NaN (and stay so).

    ``gain_plus``, ``gain_minus`` : float64 (S, d); ``largest`` : float64 (S,). ``G`` is only read.
    """
    d = G.shape[1]
    for a in prange(active.shape[0]):
        if live[a] == 0:
            continue
        s = active[a]
        step = np.float64(h[s]) * np.float64(inv_b)
        top = largest[s]
        for c in range(d):
            x = step * np.float64(G[a, c])
            size = abs(x)
            if not size <= top:  # also carries NaN forward
                top = size
            if size < 1.0:
                gain_plus[s, c] += -2.0 * x - 2.0 * np.log1p(-x)
                gain_minus[s, c] += 2.0 * x - 2.0 * np.log1p(x)
            else:
                gain_plus[s, c] = np.nan
                gain_minus[s, c] = np.nan
        largest[s] = top
