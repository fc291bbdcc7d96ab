"""Per-shape tables that invert the clock integral of a product half (depth >= 3).

A product half with layers a_1..a_L moves along its invariant manifold: every (u^k)^2 - a_k^2 is
the same, so one scalar carries the state. Two shapes need a table (normalized units: the gaps
are divided by a power of two so that the smallest positive gap lies in [1, 4)):

- kind ``UNIQUE`` (assumption (A)): the smallest layer r is unique, gaps g_k = a_k^2 - r^2 > 0
  (k over the L - 1 other layers, ascending), c = sqrt(g_1). With r = c sinh x,

      psi(x) = int_0^x f,   f(x) = prod_{k >= 2} (c^2 sinh^2 x + g_k)^(-1/2),
      rem(x) = b - psi(x) = int_x^inf f,   b = psi(inf) (finite for depth >= 3).

  The clock moves psi linearly, so inverting psi is the whole work.
- kind ``TIE``: mult >= 2 layers share the smallest |a| = m > 0 (it never reaches 0); with the
  mult - 1 zero gaps and the positive gaps g_k, y = log m and

      T(y) = int_m^inf dm / (m^(mult-1) prod_k sqrt(m^2 + g_k)),

  the clock distance to the blow-up (T -> 0) and, as m -> 0, T -> inf.

Representation (built once per distinct shape, shared by every coordinate with that shape):

- the forward integral on uniform panels in y (width <= 0.5; the integrand is analytic in the
  strip |Im y| < pi/2, so ``FORWARD_NODES`` Chebyshev nodes per panel reach rounding);
- the inverse y(eta), eta = log(rem), as Chebyshev interpolants on panels in eta, split by
  bisection until the trailing coefficients reach rounding; kind ``UNIQUE`` has a first panel
  x(w) = w p(w^2) in w itself, so that r keeps full relative precision through r = 0;
- past r^2 = ``SERIES_RATIO`` g_max (towards the blow-up) an exact series: with z = 1 / r^2,
  (L - 2) rem = z^((L-2)/2) A(z), A(z) = sum_n e_n (L - 2) / (L - 2 + 2n) z^n where
  sum_n e_n z^n = prod_k (1 + g_k z)^(-1/2); it is reverted to z = v K(v) with
  v = ((L - 2) rem)^(2 / (L - 2)), so the blow-up side costs one power and a Horner sum;
- kind ``TIE``, past m^2 = 1e-18 g_1 (towards m -> 0): the leading term of T, exact to rounding.
"""

from __future__ import annotations

import math
from collections import namedtuple
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from .clock_series import (STRICT_OPTIONS, antiderivative, chebyshev_matrix, chebyshev_nodes,
                           clenshaw, clenshaw_row, horner, horner_row, series_power,
                           to_coefficients)

UNIQUE = 0
TIE = 1

FORWARD_NODES = 20
INVERSE_NODES = 17
SERIES_TERMS = 18
#: the series region starts at r^2 = SERIES_RATIO * g_max, where (g_max z)^n <= SERIES_RATIO^-n
SERIES_RATIO = 64.0
FORWARD_WIDTH = 0.5
#: kind TIE: the table ends at m^2 = TIE_LEFT_RATIO * g_1; past it the neglected terms of T are
#: O(m^2) relative (below rounding)
TIE_LEFT_LOG = 0.5 * math.log(1e-18)
MAX_FORWARD_PANELS = 160
MAX_INVERSE_PANELS = 320
#: an inverse panel is accepted when its interpolant's error at the n - 1 interior points
#: between the nodes is below this (absolute in y, which is the log of r or m up to O(1) terms,
#: so it is the relative error of r). The error there is the residual of eta = log(rem) at the
#: interpolated y times |dy / d eta| = rem / f (first order; an exact solve per point cost 40 %
#: of a table and moved the estimate by a few 1e-16). The residual carries the rounding of rem
#: (eps relative, i.e. eps / (L - 2) in y): measured noise 2-4e-16.
INVERSE_TOLERANCE = 1e-15
#: bisection stops at this fraction of the starting panel (then the panel is flagged)
MIN_SPLIT = 1.0 / 4096.0
GAUSS_NODES = 20


@njit(**STRICT_OPTIONS)
def _integrand(kind, y, gaps, L, mult, c):
    """f(y) of the table kinds (see the module docstring)."""
    if kind == UNIQUE:
        sh = math.sinh(y)
        sh2 = c * c * sh * sh
        prod = 1.0
        for k in range(1, L - 1):
            prod *= sh2 + gaps[k]
        return 1.0 / math.sqrt(prod)
    m2 = math.exp(2.0 * y)
    prod = 1.0
    for k in range(mult - 1, L - 1):
        prod *= m2 + gaps[k]
    return math.exp((2 - mult) * y) / math.sqrt(prod)


@njit(**STRICT_OPTIONS)
def _series_coefficients(gaps, L, work, e_out, k_out):
    """e_out: coefficients of A(z) (a_0 = 1); k_out: those of K(v) with z = v K(v)."""
    n_terms = e_out.shape[0]
    # poly(z) = prod_k (1 + g_k z), degree L - 1, in work[:L]
    poly = work[0]
    for j in range(poly.shape[0]):
        poly[j] = 0.0
    poly[0] = 1.0
    for k in range(L - 1):
        for j in range(L - 1, 0, -1):
            poly[j] += gaps[k] * poly[j - 1]
    e = work[1][:n_terms]
    series_power(poly[:L], -0.5, e)
    for n in range(n_terms):
        e_out[n] = e[n] * (L - 2) / (L - 2 + 2.0 * n)
    q = 2.0 / (L - 2)
    power = work[2][:n_terms]
    for n in range(n_terms):
        series_power(e_out, -q * (n + 1), power)
        k_out[n] = power[n] / (n + 1)


@njit(**dict(STRICT_OPTIONS, inline="always"))
def series_rem(e_coef, L, z):
    """rem(z) = z^((L-2)/2) A(z) / (L - 2) on the series side (z = 1 / r^2)."""
    return z ** (0.5 * (L - 2)) * horner(e_coef, z) / (L - 2)


@njit(**dict(STRICT_OPTIONS, inline="always"))
def series_z(k_coef, L, rem):
    """z = 1 / r^2 from rem on the series side: v = ((L-2) rem)^(2/(L-2)), z = v K(v)."""
    v = ((L - 2) * rem) ** (2.0 / (L - 2))
    return v * horner(k_coef, v)


@dataclass
class TableSet:
    """Clock tables of several shapes, packed flat for the kernels.

    T tables, P inverse panels in all, n = ``INVERSE_NODES``. Table t owns panels
    ``panel_start[t] .. panel_start[t] + panel_count[t] - 1`` and the panel_count[t] + 1 boundary
    entries of ``rem_bounds``/``y_bounds`` from ``panel_start[t] + t`` on.

    Attributes
    ----------
    kind, depth, mult : ndarray of shape (T,), int64
    c : ndarray of shape (T,)
        sqrt of the smallest positive gap (normalized units).
    b : ndarray of shape (T,)
        psi(inf) for kind UNIQUE (half the clock range between the two blow-ups), nan for TIE.
    first_w, first_p0, first_coef : ndarray of shape (T,), (T,), (T, n)
        kind UNIQUE: x(w) = w (p0 + q(w^2)) for 0 <= w <= first_w, q Chebyshev in w^2 on
        [0, first_w^2], p0 = 1 / f(0).
    rem_bounds, y_bounds : ndarray of shape (P + T,)
        Panel boundaries: rem descending, y ascending. Past the last one: the series.
    inv_ref, span, y_ref, sinh_ref, cosh_ref : ndarray of shape (P,)
        Panel p: eta = log(rem * inv_ref[p]) runs over [span[p], 0]; the interpolant gives
        delta = y - y_ref[p] (y_ref is the start of the forward panel, so delta is small and
        exact); sinh/cosh of y_ref (kind UNIQUE, r = c sinh y) or exp(y_ref) (kind TIE, m = e^y).
    coef : ndarray of shape (P, n)
        delta(eta) in Chebyshev form, t = 2 eta / span - 1.
    series_e, series_k : ndarray of shape (T, SERIES_TERMS)
        A(z) and K(v) of the series side.
    left_c, left_p0, left_y : ndarray of shape (T,)
        kind TIE, m -> 0 (y < left_y): T = C - p0 log m (mult 2), C + p0 m^(2-mult) / (mult - 2).
    gaps : ndarray of shape (T, Lmax - 1)
        The normalized gaps the table was built from.
    worst_error : ndarray of shape (T,)
        The largest interpolation error found at the check points, in units of the rounding
        that rem itself carries there (inf: the table ran out of panels and is refused).
    """

    kind: np.ndarray
    depth: np.ndarray
    mult: np.ndarray
    c: np.ndarray
    b: np.ndarray
    first_w: np.ndarray
    first_p0: np.ndarray
    first_coef: np.ndarray
    panel_start: np.ndarray
    panel_count: np.ndarray
    rem_bounds: np.ndarray
    y_bounds: np.ndarray
    inv_ref: np.ndarray
    span: np.ndarray
    y_ref: np.ndarray
    sinh_ref: np.ndarray
    cosh_ref: np.ndarray
    coef: np.ndarray
    series_e: np.ndarray
    series_k: np.ndarray
    left_c: np.ndarray
    left_p0: np.ndarray
    left_y: np.ndarray
    gaps: np.ndarray
    worst_error: np.ndarray

    def packed(self) -> "TableArrays":
        """The tables as four arrays (Numba increments a reference count per array passed to
        a function; with 23 separate arrays that cost 250 ns per coordinate)."""
        n = self.kind.size
        lmax1 = self.gaps.shape[1] if self.gaps.ndim == 2 else 0
        ints = np.column_stack([self.kind, self.depth, self.mult, self.panel_start,
                                self.panel_count]).astype(np.int64).reshape(n, 5)
        scalars = np.zeros((n, SCALAR_COLUMNS + lmax1))
        scalars[:, T_C] = self.c
        scalars[:, T_B] = self.b
        scalars[:, T_FIRST_W] = self.first_w
        scalars[:, T_FIRST_P0] = self.first_p0
        scalars[:, T_LEFT_C] = self.left_c
        scalars[:, T_LEFT_P0] = self.left_p0
        scalars[:, T_LEFT_Y] = self.left_y
        scalars[:, T_SERIES_E:T_SERIES_E + SERIES_TERMS] = self.series_e
        scalars[:, T_SERIES_K:T_SERIES_K + SERIES_TERMS] = self.series_k
        scalars[:, T_FIRST_COEF:T_FIRST_COEF + INVERSE_NODES] = self.first_coef
        scalars[:, T_GAPS:] = self.gaps
        panels = np.zeros((self.coef.shape[0], PANEL_COEF + INVERSE_NODES))
        panels[:, PANEL_INV_REF] = self.inv_ref
        panels[:, PANEL_SPAN] = self.span
        panels[:, PANEL_Y_REF] = self.y_ref
        panels[:, PANEL_SINH] = self.sinh_ref
        panels[:, PANEL_COSH] = self.cosh_ref
        panels[:, PANEL_COEF:] = self.coef
        bounds = np.column_stack([self.rem_bounds, self.y_bounds]).reshape(-1, 2)
        # Numba wants at least one row to type the arrays of an empty table set
        return TableArrays(np.ascontiguousarray(ints) if n else np.zeros((1, 5), dtype=np.int64),
                           scalars if n else np.zeros((1, SCALAR_COLUMNS + 1)),
                           np.ascontiguousarray(bounds) if bounds.size else np.zeros((1, 2)),
                           panels if panels.size else np.zeros((1, PANEL_COEF + INVERSE_NODES)))


#: ints (T, 5): kind, depth, mult, first panel, panel count
T_KIND, T_DEPTH, T_MULT, T_START, T_COUNT = range(5)
#: scalars (T, SCALAR_COLUMNS + Lmax - 1)
T_C, T_B, T_FIRST_W, T_FIRST_P0, T_LEFT_C, T_LEFT_P0, T_LEFT_Y = range(7)
T_SERIES_E = 7
T_SERIES_K = T_SERIES_E + SERIES_TERMS
T_FIRST_COEF = T_SERIES_K + SERIES_TERMS
T_GAPS = T_FIRST_COEF + INVERSE_NODES
SCALAR_COLUMNS = T_GAPS
#: panels (P, PANEL_COEF + n): 1 / rem at the start, log-span, y_ref, sinh/exp y_ref, cosh y_ref
PANEL_INV_REF, PANEL_SPAN, PANEL_Y_REF, PANEL_SINH, PANEL_COSH = range(5)
PANEL_COEF = 5

#: The tables as the kernels take them: ints, scalars, bounds (rem, y per boundary), panels.
#: Kernels unpack them once and pass the four arrays on: Numba's reference-count pruning
#: handles arrays but not tuples of arrays (a tuple passed into the per-coordinate code cost
#: 30 ns per coordinate, measured).
TableArrays = namedtuple("TableArrays", ["ints", "scalars", "bounds", "panels"])


# ---------------------------------------------------------------------------------------------
# Building one table
# ---------------------------------------------------------------------------------------------
@njit(**STRICT_OPTIONS)
def _local_rem(e, delta, width, fwd, fwd_end, rem_b):
    """rem at y = y_e + delta inside forward panel e (delta in [0, width])."""
    return rem_b[e + 1] + 0.5 * width * (fwd_end[e] - clenshaw(fwd[e], 2.0 * delta / width - 1.0))


@njit(**STRICT_OPTIONS)
def _solve_local(eta_loc, inv_ref, e, d_lo, d_hi, guess, kind, gaps, L, mult, c, y0, width,
                 fwd, fwd_end, rem_b):
    """delta in [d_lo, d_hi] with log(rem(y_e + delta) * inv_ref) = eta_loc, safeguarded Newton
    (log rem is decreasing in delta)."""
    d = min(max(guess, d_lo), d_hi)
    lo, hi = d_lo, d_hi
    y_e = y0 + e * width
    for _ in range(100):
        rem = _local_rem(e, d, width, fwd, fwd_end, rem_b)
        res = math.log(rem * inv_ref) - eta_loc
        if res > 0.0:
            lo = d
        elif res < 0.0:
            hi = d
        else:
            return d
        d_new = d + res * rem / _integrand(kind, y_e + d, gaps, L, mult, c)
        if not (d_new > lo and d_new < hi):
            d_new = 0.5 * (lo + hi)
        if abs(d_new - d) <= 2e-17 * max(width, abs(d)) or hi - lo <= 2e-17 * width:
            return d_new
        d = d_new
    return d


@njit(**STRICT_OPTIONS)
def _psi_gauss(x, gaps, L, c, gl_t, gl_w):
    """psi(x) = int_0^x f by Gauss–Legendre (relative precision for small x; x <= panel width)."""
    acc = 0.0
    for i in range(gl_t.shape[0]):
        acc += gl_w[i] * _integrand(UNIQUE, x * gl_t[i], gaps, L, 1, c)
    return x * acc


@njit(**STRICT_OPTIONS)
def _invert_psi_gauss(w, x_max, gaps, L, c, gl_t, gl_w):
    """x in [0, x_max] with psi(x) = w (Newton with bisection; relative precision)."""
    x = min(w / _integrand(UNIQUE, 0.0, gaps, L, 1, c), x_max)
    lo, hi = 0.0, x_max
    for _ in range(100):
        res = _psi_gauss(x, gaps, L, c, gl_t, gl_w) - w
        if res > 0.0:
            hi = x
        elif res < 0.0:
            lo = x
        else:
            return x
        x_new = x - res / _integrand(UNIQUE, x, gaps, L, 1, c)
        if not (x_new > lo and x_new < hi):
            x_new = 0.5 * (lo + hi)
        if abs(x_new - x) <= 2e-17 * x:
            return x_new
        x = x_new
    return x


@njit(**dict(STRICT_OPTIONS, inline="always"))
def _max_or_inf(worst, estimate):
    """max(worst, estimate), inf for a nan estimate (Numba's max drops a nan: a check point
    whose residual cannot be formed must fail the panel, not pass it)."""
    if estimate != estimate:
        return np.inf
    return max(worst, estimate)


@njit(**STRICT_OPTIONS)
def _first_panel(x1, gaps, L, c, cheb_i, nodes_i, gl_t, gl_w, vals, out_coef):
    """x(w) / w - 1 / f(0) as Chebyshev in u = w^2 on [0, psi(x1)^2] (the constant is taken out
    so that the coefficient rounding is relative to the small remainder); returns (w1, worst
    relative error of x at the interior check points)."""
    n_i = nodes_i.shape[0]
    w1 = _psi_gauss(x1, gaps, L, c, gl_t, gl_w)
    p0 = 1.0 / _integrand(UNIQUE, 0.0, gaps, L, 1, c)
    for j in range(n_i):
        w = math.sqrt(0.5 * w1 * w1 * (nodes_i[j] + 1.0))
        vals[j] = _invert_psi_gauss(w, x1, gaps, L, c, gl_t, gl_w) / w - p0
    to_coefficients(cheb_i, vals[:n_i], out_coef)
    # check points between the nodes: the error of x is the residual of psi over f(x) (to first
    # order; one quadrature per point instead of an inversion)
    worst = 0.0
    for k in range(1, n_i):
        t = math.cos(math.pi * k / n_i)
        w = math.sqrt(0.5 * w1 * w1 * (t + 1.0))
        x = w * (p0 + clenshaw(out_coef, t))
        residual = _psi_gauss(x, gaps, L, c, gl_t, gl_w) - w
        worst = _max_or_inf(worst, abs(residual) / (_integrand(UNIQUE, x, gaps, L, 1, c) * x))
    return w1, p0, worst


@njit(**STRICT_OPTIONS)
def _build_one(kind, L, mult, gaps, c, cheb_f, nodes_f, cheb_i, nodes_i, gl_t, gl_w,
               fwd, fwd_end, rem_b, vals, acoef, work, stack,
               out_scalars, out_first_coef, out_rem, out_y, out_panel, out_coef, out_e, out_k):
    """Build the table of one shape into the ``out_*`` rows (see :class:`TableSet`).

    out_scalars: [b, first_w, panel count, worst check error, left C, left p0, left y, first p0];
    out_panel rows: [1 / rem at the panel start, log-span, y_ref, sinh y_ref (exp for TIE),
    cosh y_ref]."""
    n_f = nodes_f.shape[0]
    n_i = nodes_i.shape[0]
    g_max = gaps[L - 2]
    _series_coefficients(gaps, L, work, out_e, out_k)
    r_t = math.sqrt(SERIES_RATIO * g_max)
    if kind == UNIQUE:
        y0 = 0.0
        y_end = math.asinh(r_t / c)
    else:
        y0 = math.log(c) + TIE_LEFT_LOG
        y_end = math.log(r_t)
    n_fwd = int(math.ceil((y_end - y0) / FORWARD_WIDTH))
    n_fwd = min(max(n_fwd, 2), MAX_FORWARD_PANELS)
    width = (y_end - y0) / n_fwd
    # forward panels: Chebyshev antiderivatives of f, tail sums from the series end
    for e in range(n_fwd):
        lo = y0 + e * width
        for j in range(n_f):
            vals[j] = _integrand(kind, lo + 0.5 * width * (nodes_f[j] + 1.0), gaps, L, mult, c)
        to_coefficients(cheb_f, vals[:n_f], acoef[:n_f])
        antiderivative(acoef[:n_f], fwd[e])
        end = 0.0
        for k in range(n_f + 1):
            end += fwd[e, k]
        fwd_end[e] = end
    rem_b[n_fwd] = series_rem(out_e, L, 1.0 / (r_t * r_t))
    for e in range(n_fwd - 1, -1, -1):
        rem_b[e] = rem_b[e + 1] + 0.5 * width * fwd_end[e]
    worst = 0.0
    start_delta = 0.0
    if kind == UNIQUE:
        out_scalars[0] = rem_b[0]
        # the first panel must reach y ~ 1 at least: past it, the panels' absolute precision in
        # y is relative precision in r = c sinh y
        x1 = width
        for _ in range(3):
            w1, p0, err = _first_panel(x1, gaps, L, c, cheb_i, nodes_i, gl_t, gl_w, vals,
                                       out_first_coef)
            if err <= INVERSE_TOLERANCE:
                break
            x1 *= 0.5
        worst = max(worst, err)
        out_scalars[1] = w1
        out_scalars[7] = p0
        start_delta = x1
    else:
        out_scalars[0] = np.nan
        p0 = 1.0
        for k in range(mult - 1, L - 1):
            p0 /= math.sqrt(gaps[k])
        if mult == 2:
            out_scalars[4] = rem_b[0] + p0 * y0
        else:
            out_scalars[4] = rem_b[0] - p0 * math.exp((2 - mult) * y0) / (mult - 2)
        out_scalars[5] = p0
        out_scalars[6] = y0
    # inverse panels: records (rem_hi, rem_lo, e, delta at rem_hi, delta at rem_lo)
    n_stack = 0
    for e in range(n_fwd - 1, -1, -1):
        d_hi = 0.0
        rem_hi = rem_b[e]
        if e == 0 and start_delta > 0.0:
            if start_delta >= width:
                continue
            d_hi = start_delta
            rem_hi = _local_rem(0, d_hi, width, fwd, fwd_end, rem_b)
        stack[n_stack, 0] = rem_hi
        stack[n_stack, 1] = rem_b[e + 1]
        stack[n_stack, 2] = e
        stack[n_stack, 3] = d_hi
        stack[n_stack, 4] = width
        n_stack += 1
    count = 0
    out_rem[0] = stack[n_stack - 1, 0]
    out_y[0] = y0 + stack[n_stack - 1, 2] * width + stack[n_stack - 1, 3]
    capacity = out_coef.shape[0]
    while n_stack > 0 and count < capacity:
        n_stack -= 1
        rem_hi, rem_lo = stack[n_stack, 0], stack[n_stack, 1]
        e = int(stack[n_stack, 2])
        d_hi, d_lo = stack[n_stack, 3], stack[n_stack, 4]
        inv_ref = 1.0 / rem_hi
        span = math.log(rem_lo * inv_ref)  # < 0
        for j in range(n_i):
            eta = 0.5 * span * (nodes_i[j] + 1.0)
            guess = d_hi + (d_lo - d_hi) * eta / span
            vals[j] = _solve_local(eta, inv_ref, e, d_hi, d_lo, guess, kind, gaps, L, mult, c,
                                   y0, width, fwd, fwd_end, rem_b)
        to_coefficients(cheb_i, vals[:n_i], acoef[:n_i])
        # y moves by rem / f per unit of eta: rem's rounding costs that much precision in y
        cond = 1.0
        for j in range(n_i):
            eta = 0.5 * span * (nodes_i[j] + 1.0)
            f = _integrand(kind, y0 + e * width + vals[j], gaps, L, mult, c)
            cond = max(cond, math.exp(eta) / (inv_ref * f))
        # check points between the nodes: the error of delta is the residual of eta times
        # |d delta / d eta| = rem / f (to first order; one evaluation per point, not a solve)
        err = 0.0
        for k in range(1, n_i):
            t = math.cos(math.pi * k / n_i)
            eta = 0.5 * span * (t + 1.0)
            delta = clenshaw(acoef[:n_i], t)
            rem = _local_rem(e, delta, width, fwd, fwd_end, rem_b)
            f = _integrand(kind, y0 + e * width + delta, gaps, L, mult, c)
            err = _max_or_inf(err, abs(math.log(rem * inv_ref) - eta) * rem / f)
        err /= cond
        if err > INVERSE_TOLERANCE and d_lo - d_hi > MIN_SPLIT * width and n_stack + 2 <= stack.shape[0]:
            eta = 0.5 * span
            d_mid = _solve_local(eta, inv_ref, e, d_hi, d_lo, 0.5 * (d_hi + d_lo), kind, gaps, L,
                                 mult, c, y0, width, fwd, fwd_end, rem_b)
            rem_mid = _local_rem(e, d_mid, width, fwd, fwd_end, rem_b)
            # the far half (smaller rem) first, so that the near half is processed next
            stack[n_stack, 0], stack[n_stack, 1], stack[n_stack, 2] = rem_mid, rem_lo, e
            stack[n_stack, 3], stack[n_stack, 4] = d_mid, d_lo
            stack[n_stack + 1, 0], stack[n_stack + 1, 1], stack[n_stack + 1, 2] = rem_hi, rem_mid, e
            stack[n_stack + 1, 3], stack[n_stack + 1, 4] = d_hi, d_mid
            n_stack += 2
            continue
        worst = max(worst, err)
        y_ref = y0 + e * width
        out_panel[count, 0] = inv_ref
        out_panel[count, 1] = span
        out_panel[count, 2] = y_ref
        if kind == UNIQUE:
            out_panel[count, 3] = math.sinh(y_ref)
            out_panel[count, 4] = math.cosh(y_ref)
        else:
            out_panel[count, 3] = math.exp(y_ref)
            out_panel[count, 4] = 0.0
        for k in range(n_i):
            out_coef[count, k] = acoef[k]
        count += 1
        out_rem[count] = rem_lo
        out_y[count] = y_ref + d_lo
    out_scalars[2] = count
    if n_stack > 0:
        worst = np.inf  # ran out of panel capacity: flagged, the caller refuses the table
    out_scalars[3] = worst


@njit(**dict(STRICT_OPTIONS, parallel=True))
def _build_many(kinds, depths, mults, gaps, cs, cheb_f, nodes_f, cheb_i, nodes_i, gl_t, gl_w,
                out_scalars, out_first_coef, out_rem, out_y, out_panel, out_coef, out_e, out_k):
    n_tables = kinds.shape[0]
    n_f = nodes_f.shape[0]
    n_i = nodes_i.shape[0]
    lmax = gaps.shape[1] + 1
    for t in prange(n_tables):
        fwd = np.empty((MAX_FORWARD_PANELS, n_f + 1))
        fwd_end = np.empty(MAX_FORWARD_PANELS)
        rem_b = np.empty(MAX_FORWARD_PANELS + 1)
        vals = np.empty(max(n_f, n_i))
        acoef = np.empty(max(n_f, n_i) + 1)
        work = np.zeros((3, max(SERIES_TERMS, lmax + 1)))
        stack = np.zeros((MAX_INVERSE_PANELS + 8, 5))
        _build_one(kinds[t], depths[t], mults[t], gaps[t], cs[t], cheb_f, nodes_f, cheb_i,
                   nodes_i, gl_t, gl_w, fwd, fwd_end, rem_b, vals, acoef, work, stack,
                   out_scalars[t], out_first_coef[t], out_rem[t], out_y[t], out_panel[t],
                   out_coef[t], out_e[t], out_k[t])


def _gauss_legendre_unit(n: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.legendre.leggauss(n)
    return (x + 1) / 2, w / 2


def build_tables(kinds: np.ndarray, depths: np.ndarray, mults: np.ndarray, gaps: np.ndarray,
                 chunk: int = 512) -> TableSet:
    """Build the tables of T shapes.

    Parameters
    ----------
    kinds, depths, mults : ndarray of shape (T,), int
        ``UNIQUE`` or ``TIE``; the depth L >= 3; the number of tied smallest layers (1 for UNIQUE).
    gaps : ndarray of shape (T, Lmax - 1)
        Normalized gaps per shape, ascending, the first L - 1 entries used (mult - 1 leading
        zeros for TIE); the smallest positive gap in [1, 4).
    """
    kinds = np.ascontiguousarray(kinds, dtype=np.int64)
    depths = np.ascontiguousarray(depths, dtype=np.int64)
    mults = np.ascontiguousarray(mults, dtype=np.int64)
    gaps = np.ascontiguousarray(gaps, dtype=np.float64)
    n = kinds.shape[0]
    cs = np.array([math.sqrt(gaps[t, mults[t] - 1]) for t in range(n)], dtype=np.float64)
    cheb_f, nodes_f = chebyshev_matrix(FORWARD_NODES), chebyshev_nodes(FORWARD_NODES)
    cheb_i, nodes_i = chebyshev_matrix(INVERSE_NODES), chebyshev_nodes(INVERSE_NODES)
    gl_t, gl_w = _gauss_legendre_unit(GAUSS_NODES)
    scalars, first, rems, ys, panels, coefs, es, ks = [], [], [], [], [], [], [], []
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        m = sl.stop - sl.start
        o_scalars = np.zeros((m, 8))
        o_first = np.zeros((m, INVERSE_NODES))
        o_rem = np.zeros((m, MAX_INVERSE_PANELS + 1))
        o_y = np.zeros((m, MAX_INVERSE_PANELS + 1))
        o_panel = np.zeros((m, MAX_INVERSE_PANELS, 5))
        o_coef = np.zeros((m, MAX_INVERSE_PANELS, INVERSE_NODES))
        o_e = np.zeros((m, SERIES_TERMS))
        o_k = np.zeros((m, SERIES_TERMS))
        _build_many(kinds[sl], depths[sl], mults[sl], gaps[sl], cs[sl], cheb_f, nodes_f, cheb_i,
                    nodes_i, gl_t, gl_w, o_scalars, o_first, o_rem, o_y, o_panel, o_coef, o_e, o_k)
        for i in range(m):
            count = int(o_scalars[i, 2])
            rems.append(o_rem[i, :count + 1])
            ys.append(o_y[i, :count + 1])
            panels.append(o_panel[i, :count])
            coefs.append(o_coef[i, :count])
        scalars.append(o_scalars)
        first.append(o_first)
        es.append(o_e)
        ks.append(o_k)

    def cat(parts, shape):
        return np.ascontiguousarray(np.concatenate(parts)) if parts else np.zeros(shape)

    scalars = cat(scalars, (0, 8))
    counts = scalars[:, 2].astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if n else counts
    panel = cat(panels, (0, 5))
    return TableSet(
        kind=kinds, depth=depths, mult=mults, c=cs, b=np.ascontiguousarray(scalars[:, 0]),
        first_w=np.ascontiguousarray(scalars[:, 1]),
        first_p0=np.ascontiguousarray(scalars[:, 7]), first_coef=cat(first, (0, INVERSE_NODES)),
        panel_start=starts, panel_count=counts, rem_bounds=cat(rems, (0,)), y_bounds=cat(ys, (0,)),
        inv_ref=np.ascontiguousarray(panel[:, 0]), span=np.ascontiguousarray(panel[:, 1]),
        y_ref=np.ascontiguousarray(panel[:, 2]), sinh_ref=np.ascontiguousarray(panel[:, 3]),
        cosh_ref=np.ascontiguousarray(panel[:, 4]), coef=cat(coefs, (0, INVERSE_NODES)),
        series_e=cat(es, (0, SERIES_TERMS)), series_k=cat(ks, (0, SERIES_TERMS)),
        left_c=np.ascontiguousarray(scalars[:, 4]), left_p0=np.ascontiguousarray(scalars[:, 5]),
        left_y=np.ascontiguousarray(scalars[:, 6]), gaps=gaps, worst_error=np.ascontiguousarray(scalars[:, 3]))


# ---------------------------------------------------------------------------------------------
# Evaluation (scalar, for the kernels)
# ---------------------------------------------------------------------------------------------
INLINE = dict(STRICT_OPTIONS, inline="always")


@njit(**INLINE)
def _sinh_cosh_small(delta):
    """(sinh, cosh) of a small delta with full relative precision (one expm1)."""
    em = math.expm1(delta)
    ratio = em / (1.0 + em)
    return 0.5 * (em + ratio), 1.0 + 0.5 * em * ratio


@njit(**INLINE)
def _find_panel(bounds, base, count, rem):
    """p in [0, count) with bounds[base + p, 0] >= rem >= bounds[base + p + 1, 0] (clamped)."""
    lo, hi = 0, count - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if bounds[base + mid, 0] >= rem:
            lo = mid
        else:
            hi = mid - 1
    return lo


@njit(**INLINE)
def table_magnitude(ti, ts, tb, tp, t, w_abs, rem):
    """|r| (kind UNIQUE, from |w| or rem = b - |w|) or m (kind TIE, rem = T), normalized units.

    inf when rem <= 0 (blown up). Indexes the tables in place (no views: see
    :mod:`ddln_fast.clock_families`)."""
    if rem <= 0.0:
        return np.inf
    ints = ti
    sc = ts
    kind = ints[t, T_KIND]
    c = sc[t, T_C]
    if kind == UNIQUE and w_abs <= sc[t, T_FIRST_W]:
        u = w_abs / sc[t, T_FIRST_W]
        q = clenshaw_row(sc, t, T_FIRST_COEF, INVERSE_NODES, 2.0 * u * u - 1.0)
        return c * math.sinh(w_abs * (sc[t, T_FIRST_P0] + q))
    count = ints[t, T_COUNT]
    start = ints[t, T_START]
    base = start + t
    if rem < tb[base + count, 0]:
        depth = ints[t, T_DEPTH]
        v = ((depth - 2) * rem) ** (2.0 / (depth - 2))
        z = v * horner_row(sc, t, T_SERIES_K, SERIES_TERMS, v)
        return 1.0 / math.sqrt(z)
    if kind == TIE and rem > tb[base, 0]:
        p0 = sc[t, T_LEFT_P0]
        mult = ints[t, T_MULT]
        if mult == 2:
            return math.exp((sc[t, T_LEFT_C] - rem) / p0)
        return ((mult - 2) * (rem - sc[t, T_LEFT_C]) / p0) ** (-1.0 / (mult - 2))
    q = start + _find_panel(tb, base, count, rem)
    panels = tp
    eta = math.log(rem * panels[q, PANEL_INV_REF])
    delta = clenshaw_row(panels, q, PANEL_COEF, INVERSE_NODES, 2.0 * eta / panels[q, PANEL_SPAN] - 1.0)
    if kind == UNIQUE:
        sh, ch = _sinh_cosh_small(delta)
        return c * (panels[q, PANEL_SINH] * ch + panels[q, PANEL_COSH] * sh)
    return panels[q, PANEL_SINH] * math.exp(delta)


@njit(**STRICT_OPTIONS)
def table_integrand(ti, ts, tb, tp, t, y):
    """f(y) of table t (d rem / dy = -f)."""
    ints = ti[t]
    sc = ts[t]
    return _integrand(ints[T_KIND], y, sc[T_GAPS:], ints[T_DEPTH], ints[T_MULT], sc[T_C])


@njit(**STRICT_OPTIONS)
def table_clock(ti, ts, tb, tp, t, magnitude):
    """(|w|, rem) at |r| = magnitude (kind UNIQUE) or rem = T at m = magnitude (kind TIE; |w| is
    then nan): the forward map, by Newton on the inverse interpolants."""
    ints = ti[t]
    sc = ts[t]
    c = sc[T_C]
    kind = ints[T_KIND]
    count = ints[T_COUNT]
    start = ints[T_START]
    base = start + t
    b = sc[T_B]
    if kind == UNIQUE:
        if magnitude == 0.0:
            return 0.0, b
        y = math.asinh(magnitude / c)
        if y <= tb[base, 1]:
            # first panel: x = w (p0 + q(w^2)), dx/dw = 1 / f(x)
            w1 = sc[T_FIRST_W]
            p0 = sc[T_FIRST_P0]
            coef = sc[T_FIRST_COEF:T_FIRST_COEF + INVERSE_NODES]
            w = min(y / p0, w1)
            lo, hi = 0.0, w1
            for _ in range(60):
                x = w * (p0 + clenshaw(coef, 2.0 * (w / w1) * (w / w1) - 1.0))
                res = x - y
                if res > 0.0:
                    hi = w
                elif res < 0.0:
                    lo = w
                else:
                    break
                w_new = w - res * table_integrand(ti, ts, tb, tp, t, x)
                if not (w_new > lo and w_new < hi):
                    w_new = 0.5 * (lo + hi)
                done = abs(w_new - w) <= 1e-16 * w
                w = w_new
                if done:
                    break
            return w, b - w
    else:
        if magnitude == 0.0:
            return np.nan, np.inf
        y = math.log(magnitude)
        if y < sc[T_LEFT_Y]:
            mult = ints[T_MULT]
            if mult == 2:
                return np.nan, sc[T_LEFT_C] - sc[T_LEFT_P0] * y
            return np.nan, sc[T_LEFT_C] + sc[T_LEFT_P0] * magnitude ** (2 - mult) / (mult - 2)
    if y >= tb[base + count, 1]:
        z = (1.0 / magnitude) / magnitude
        rem = series_rem(sc[T_SERIES_E:T_SERIES_E + SERIES_TERMS], ints[T_DEPTH], z)
        return (b - rem if kind == UNIQUE else np.nan), rem
    # panel p with bounds[base + p, 1] <= y <= bounds[base + p + 1, 1]
    lo_p, hi_p = 0, count - 1
    while lo_p < hi_p:
        mid = (lo_p + hi_p + 1) // 2
        if tb[base + mid, 1] <= y:
            lo_p = mid
        else:
            hi_p = mid - 1
    panel = tp[start + lo_p]
    coef = panel[PANEL_COEF:]
    target = y - panel[PANEL_Y_REF]
    span = panel[PANEL_SPAN]
    eta_lo, eta_hi = span, 0.0
    eta = span * 0.5
    for _ in range(60):
        delta = clenshaw(coef, 2.0 * eta / span - 1.0)
        res = delta - target  # delta decreases with eta
        if res > 0.0:
            eta_lo = eta
        elif res < 0.0:
            eta_hi = eta
        else:
            break
        rem = math.exp(eta) / panel[PANEL_INV_REF]
        slope = -rem / table_integrand(ti, ts, tb, tp, t, panel[PANEL_Y_REF] + delta)
        eta_new = eta - res / slope
        if not (eta_new > eta_lo and eta_new < eta_hi):
            eta_new = 0.5 * (eta_lo + eta_hi)
        done = abs(eta_new - eta) <= 1e-16 * max(1.0, abs(eta))
        eta = eta_new
        if done:
            break
    rem = math.exp(eta) / panel[PANEL_INV_REF]
    return (b - rem if kind == UNIQUE else np.nan), rem
