"""Loops of the clock map over (rows of seeds) x coordinates: evaluate, layers, clock of theta.

Each loop is written once, over a range [start, stop) of the flattened row x coordinate index,
and inlined into two entry points: ``*_parallel`` (a ``prange`` over blocks of ``BLOCK`` items,
one block for small calls: a top-level entry point called from Python, the only one
:class:`ddln_fast.clockmap.ClockMap` uses) and ``*_serial`` (the whole range without threads, to
be called from inside another compiled per-seed loop). Numba compiles an entry point at its first
call, and a loop body (every family inlined) is most of the compile time: a session that only
goes through ``ClockMap`` compiles each body once. They allocate nothing.
Arguments (H halves per coordinate, Lh layers per half, S seeds, d coordinates, m rows):

- ``s``, ``s_lo`` : (m, d) clocks and their low-order parts (double-double; zeros if unused);
- ``rows`` : (m,) int64, the seed of each row;
- ``ip`` : (S H d, N_INT) int64 and ``fp`` : (S H d, N_FLOAT) float64, per-half parameters
  (:mod:`ddln_fast.clock_families`), row (seed H + half) d + coordinate;
- ``lsign``, ``lgap``, ``lzero`` : (S H d, Lh) per-layer sign, normalized gap, initial value;
- ``half_sign`` : (H,) +1 for a u half (clock s), -1 for a v half (clock -s, theta subtracted);
- ``ti, ts, tb, tp`` : the four arrays of :class:`ddln_fast.clock_tables.TableArrays`.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .clock_families import half_clock_of, half_evaluate, half_layers
from .clock_series import INLINE_OPTIONS, STRICT_OPTIONS
from .threads import SERIAL_CLOCK_ITEMS

#: The loops run without Numba's reference counting (``_nrt=False``, as Numba's own
#: allocation-free helpers do): they allocate nothing, and the reference-count updates that the
#: inlined helpers emit for their array arguments (on every branch, taken or not) were most of
#: the cost of a closed-form coordinate (measured 98 -> 26 ns at depth 3, first layer zero).
#: Compiling an allocation in here fails, which keeps the kernels allocation-free.
KERNEL_OPTIONS = dict(STRICT_OPTIONS, _nrt=False)
INLINE_KERNEL_OPTIONS = dict(KERNEL_OPTIONS, inline="always")
PARALLEL_OPTIONS = dict(KERNEL_OPTIONS, parallel=True)
#: items (row x coordinate) per parallel work item; calls of fewer than
#: threads.SERIAL_CLOCK_ITEMS items run in the calling thread (waking the others costs more than
#: they save)
BLOCK = 256
# (the entry points pass start = np.int64(0), not 0: a literal 0 would type as Literal[int] and
# compile the whole loop body a second time)


@njit(**INLINE_OPTIONS)
def _item(item, d, rows):
    """(row a, coordinate i, seed) of a flattened row x coordinate index."""
    a = item // d
    return a, item - a * d, rows[a]


@njit(**KERNEL_OPTIONS)
def _evaluate_items(s, s_lo, rows, ip, fp, lsign, lgap, ti, ts, tb, tp, half_sign, skip, want_g, theta, h,
                    G, start, stop):
    """theta, h (and G if ``want_g``) at the clocks s of the given rows, into (m, d) arrays;
    coordinates i of seed k with skip[k d + i] != 0 are left as they are (``skip`` of size 0:
    none; :mod:`ddln_fast.clock_fast` has filled them)."""
    d = s.shape[1]
    n_halves = half_sign.shape[0]
    skipping = skip.shape[0] > 0
    if start >= stop:
        return
    # (row, coordinate) advanced by counting: a 64-bit division per item cost 3.5 ns of the
    # 27-37 ns of a closed-form coordinate
    a, i, seed = _item(start, d, rows)
    for _ in range(start, stop):
        if i == d:
            a += 1
            i = 0
            seed = rows[a]
        if skipping and skip[seed * d + i] != 0:
            i += 1
            continue
        th = 0.0
        hh = 0.0
        gg = 0.0
        for k in range(n_halves):
            sg = half_sign[k]
            row = (seed * n_halves + k) * d + i
            t_k, h_k, g_k = half_evaluate(ip, fp, lgap, row, ti, ts, tb, tp, sg * s[a, i], sg * s_lo[a, i],
                                          want_g)
            th += sg * t_k
            hh += h_k
            gg += g_k
        theta[a, i] = th
        h[a, i] = hh
        if want_g:
            G[a, i] = gg
        i += 1


@njit(**KERNEL_OPTIONS)
def _layers_items(s, s_lo, rows, ip, fp, lsign, lgap, lzero, ti, ts, tb, tp, half_sign, out, start, stop):
    """Layers (m, H * Lh, d) at the clocks s: half k fills rows k * Lh .. k * Lh + depth - 1."""
    d = s.shape[1]
    n_halves = half_sign.shape[0]
    lh = lsign.shape[1]
    for item in range(start, stop):
        a, i, seed = _item(item, d, rows)
        for k in range(n_halves):
            sg = half_sign[k]
            row = (seed * n_halves + k) * d + i
            half_layers(ip, fp, lsign, lgap, lzero, row, ti, ts, tb, tp, sg * s[a, i], sg * s_lo[a, i],
                        out[a], k * lh, i)


@njit(**KERNEL_OPTIONS)
def _clock_of_items(theta, rows, ip, fp, lsign, lgap, ti, ts, tb, tp, half_sign, lower, upper, out,
                    start, stop):
    """s with F(s) = theta (nan where theta is out of reach): closed forms for one half, a
    safeguarded Newton iteration on the monotone F for two halves."""
    d = theta.shape[1]
    n_halves = half_sign.shape[0]
    for item in range(start, stop):
        a, i, seed = _item(item, d, rows)
        target = theta[a, i]
        if n_halves == 1:
            out[a, i] = half_clock_of(ip, fp, lgap, seed * d + i, ti, ts, tb, tp, target)
            continue
        out[a, i] = _sum_clock_of(ip, fp, lgap, seed * n_halves * d + i, d, ti, ts, tb, tp, half_sign,
                                  lower[seed, i], upper[seed, i], target)


@njit(**KERNEL_OPTIONS)
def _sum_value(ip, fp, lgap, first_row, stride, ti, ts, tb, tp, half_sign, s):
    th = 0.0
    hh = 0.0
    for k in range(half_sign.shape[0]):
        sg = half_sign[k]
        t_k, h_k, _ = half_evaluate(ip, fp, lgap, first_row + k * stride, ti, ts, tb, tp, sg * s, 0.0, False)
        th += sg * t_k
        hh += h_k
    return th, hh


@njit(**KERNEL_OPTIONS)
def _sum_clock_of(ip, fp, lgap, first_row, stride, ti, ts, tb, tp, half_sign, lower, upper, target):
    """Root of F(s) = target for F = sum of halves (decreasing; h = -F' > 0 unless frozen)."""
    if math.isnan(target):
        return np.nan
    lo, hi = lower, upper
    s = 0.0
    value, slope = _sum_value(ip, fp, lgap, first_row, stride, ti, ts, tb, tp, half_sign, s)
    if value == target:
        return 0.0
    # bracket: F decreasing, so the root lies above s when F(s) > target
    step = 1.0
    for _ in range(2000):
        res = value - target
        if res > 0.0:
            lo = s
        else:
            hi = s
        if math.isinf(lo) or math.isinf(hi):
            if slope > 0.0 and math.isfinite(value):
                guess = s + res / slope
            else:
                guess = s + (step if res > 0.0 else -step)
            if not (guess > lo and guess < hi) or abs(guess - s) < step:
                guess = s + (step if res > 0.0 else -step)
                step *= 2.0
            s_new = guess
        else:
            s_new = s + res / slope if slope > 0.0 else 0.5 * (lo + hi)
            if not (s_new > lo and s_new < hi) or not math.isfinite(value):
                s_new = 0.5 * (lo + hi)
        if s_new == s or (math.isfinite(lo) and math.isfinite(hi) and hi - lo <= 4e-16 * max(abs(lo), abs(hi))):
            return s_new
        s = s_new
        value, slope = _sum_value(ip, fp, lgap, first_row, stride, ti, ts, tb, tp, half_sign, s)
        if value == target:
            return s
        if math.isfinite(value) and abs(value - target) <= 1e-16 * abs(target) and slope > 0.0 \
                and abs(value - target) / slope <= 1e-16 * max(1.0, abs(s)):
            return s
        if step > 1e300:
            return np.nan
    return np.nan


@njit(**KERNEL_OPTIONS)
def evaluate_serial(s, s_lo, rows, ip, fp, lsign, lgap, ti, ts, tb, tp, half_sign, skip, want_g, theta, h, G):
    _evaluate_items(s, s_lo, rows, ip, fp, lsign, lgap, ti, ts, tb, tp, half_sign, skip, want_g, theta, h, G,
                    np.int64(0), s.size)


@njit(**PARALLEL_OPTIONS)
def evaluate_parallel(s, s_lo, rows, ip, fp, lsign, lgap, ti, ts, tb, tp, half_sign, skip, want_g, theta, h, G):
    n = s.size
    if n < SERIAL_CLOCK_ITEMS:
        _evaluate_items(s, s_lo, rows, ip, fp, lsign, lgap, ti, ts, tb, tp, half_sign, skip, want_g, theta, h, G,
                        np.int64(0), n)
        return
    for block in prange((n + BLOCK - 1) // BLOCK):
        _evaluate_items(s, s_lo, rows, ip, fp, lsign, lgap, ti, ts, tb, tp, half_sign, skip, want_g, theta, h, G,
                        block * BLOCK, min(n, (block + 1) * BLOCK))


@njit(**KERNEL_OPTIONS)
def layers_serial(s, s_lo, rows, ip, fp, lsign, lgap, lzero, ti, ts, tb, tp, half_sign, out):
    _layers_items(s, s_lo, rows, ip, fp, lsign, lgap, lzero, ti, ts, tb, tp, half_sign, out, np.int64(0), s.size)


@njit(**PARALLEL_OPTIONS)
def layers_parallel(s, s_lo, rows, ip, fp, lsign, lgap, lzero, ti, ts, tb, tp, half_sign, out):
    n = s.size
    if n < SERIAL_CLOCK_ITEMS:
        _layers_items(s, s_lo, rows, ip, fp, lsign, lgap, lzero, ti, ts, tb, tp, half_sign, out, np.int64(0), n)
        return
    for block in prange((n + BLOCK - 1) // BLOCK):
        _layers_items(s, s_lo, rows, ip, fp, lsign, lgap, lzero, ti, ts, tb, tp, half_sign, out,
                      block * BLOCK, min(n, (block + 1) * BLOCK))


@njit(**KERNEL_OPTIONS)
def clock_of_serial(theta, rows, ip, fp, lsign, lgap, ti, ts, tb, tp, half_sign, lower, upper, out):
    _clock_of_items(theta, rows, ip, fp, lsign, lgap, ti, ts, tb, tp, half_sign, lower, upper, out,
                    np.int64(0), theta.size)


@njit(**PARALLEL_OPTIONS)
def clock_of_parallel(theta, rows, ip, fp, lsign, lgap, ti, ts, tb, tp, half_sign, lower, upper, out):
    n = theta.size
    if n < SERIAL_CLOCK_ITEMS:
        _clock_of_items(theta, rows, ip, fp, lsign, lgap, ti, ts, tb, tp, half_sign, lower, upper, out, np.int64(0), n)
        return
    for block in prange((n + BLOCK - 1) // BLOCK):
        _clock_of_items(theta, rows, ip, fp, lsign, lgap, ti, ts, tb, tp, half_sign, lower, upper, out,
                        block * BLOCK, min(n, (block + 1) * BLOCK))
