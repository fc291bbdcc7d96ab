"""The clock map of every coordinate: theta = F(s), h = -F'(s), G(s) = int_0^s F, exactly.

Along the layer gradient flow each coordinate i moves on one autonomous curve in its own clock
s_i(t) = int_0^t g_i (Labarrière et al., arXiv:2412.16765): du^j/ds = -prod_{k != j} u^k, so
theta_i(t) = F_i(s_i(t)). This module evaluates F, h and G (and the layers, and the inverse
s(theta)) for every coordinate of every seed, for the three parametrizations:

- ``"product"``: theta = u^1 ... u^L, u0 of shape (S, L, d);
- ``"difference"``: theta = u^1 ... u^L - v^1 ... v^L, u0 of shape (S, 2L, d) (the u half
  first); the v half runs the same flow at clock -s, so theta = F^u(s) - F^v(-s),
  h = h^u(s) + h^v(-s), G = G^u(s) + G^v(-s);
- ``"power"``: theta = u^D - v^D with real D >= 2 and u, v > 0, u0 of shape (S, 2, d):
  du/ds = -D u^(D-1), the same structure with closed forms.

Usage::

    cm = ClockMap.from_layers(u0, parametrization="product")
    theta, h = cm.evaluate(s)                    # s of shape (m, d), rows 0..m-1 = seeds
    theta, h, G = cm.evaluate(s, G=True)
    cm.evaluate(s, theta=out1, h=out2, rows=active)   # into preallocated (m, d) arrays
    cm.layers(s)                                 # (m, L', d)
    cm.clock_of(theta)                           # s with F(s) = theta (nan: unreachable)
    lower, upper = cm.blow_up                    # (S, d) each, -inf / inf where none

Every coordinate gets a family (see :mod:`ddln_fast.clock_families`): closed forms for depth 1
and 2 (log-scaled: initializations down to 1e-300, or below through ``log_scale``), balanced
layers, a unique smallest layer with equal other gaps at depth 3 and 4 (first layer zero, signed
or not), or with any two other gaps at depth 3 (Jacobi's elliptic functions, up to a gap ratio
of 1e4), frozen coordinates (two zero layers); tables built once per distinct normalized shape
(:mod:`ddln_fast.clock_tables`) for a unique smallest layer with any gaps and for partial ties.
Depth >= 3 blows up in finite clock time in both directions (balanced and tied layers: in one):
``blow_up`` gives those clocks and ``evaluate`` returns theta = +-inf, h = inf, G = -inf at and
beyond them.

Double-double clocks: ``s_lo`` (same shape as s) is an optional low-order part, the clock being
s + s_lo. Near a blow-up the distance to it is formed exactly from (s, s_lo) and the
double-double blow-up clock, so theta stays smooth at resolutions far below eps |s| (needed at
depth >= 3 with small scales, where clocks ~ alpha^(2-L) must be resolved to << 1).

Inside compiled code: ``cm.packed`` holds the arrays (``packed.tab`` is the four table arrays,
passed on unpacked) and ``clock_kernels.evaluate_serial`` (no threads; call it from another
compiled per-seed loop) or ``evaluate_parallel`` (from Python; small calls stay on one thread)
the loop::

    p = cm.packed
    evaluate_serial(s, s_lo, rows, p.ip, p.fp, p.lsign, p.lgap, *p.tab, p.half_sign, skip, want_g,
                    theta, h, G)

(``skip``: a uint8 mask of coordinates to leave alone, ``NO_SKIP`` for none.)

Accuracy (measured in the tests against DOP853 at rtol 1e-13, scipy quad, and closed forms):
theta and h to about 1e-14 relative, G to about 1e-14 relative (to eps (r0^2 + r^2) absolute
where r0^2 - r^2 cancels without a small clock), up to the conditioning of the problem itself
(eps |s F'(s) / F(s)|).
"""

from __future__ import annotations

import math
from collections import namedtuple
from dataclasses import dataclass

import numpy as np
from numba import njit

from . import clock_families as fam
from . import clock_fast
from .clock_elliptic import RATIO_LIMIT, elliptic_clocks, elliptic_constants
from .clock_kernels import clock_of_parallel, evaluate_parallel, layers_parallel
from .clock_series import STRICT_OPTIONS, two_product, two_sum
from .clock_tables import TIE, UNIQUE, TableSet, build_tables, table_clock
from .errors import InputError

#: the general loop's coordinate mask when it evaluates every coordinate
NO_SKIP = np.zeros(0, dtype=np.uint8)

PARAMETRIZATIONS = ("product", "difference", "power")
#: depth >= 3: the normalized clock scale alpha^(L-2) must lie within 10^(+-CLOCK_DECADES)
CLOCK_DECADES = 100.0

PackedClockMap = namedtuple("PackedClockMap", ["ip", "fp", "lsign", "lgap", "lzero", "half_sign", "tab"])


@dataclass
class _Half:
    ip: np.ndarray      # (N, N_INT)
    fp: np.ndarray      # (N, N_FLOAT)
    lsign: np.ndarray   # (N, Lh)
    lgap: np.ndarray    # (N, Lh)
    lzero: np.ndarray   # (N, Lh)
    lower: np.ndarray   # (N,) blow-up clocks of this half in its own clock
    upper: np.ndarray
    lower_lo: np.ndarray = None  # their low-order parts (double-double)
    upper_lo: np.ndarray = None

    def __post_init__(self):
        if self.lower_lo is None:
            self.lower_lo = np.zeros_like(self.lower)
            self.upper_lo = np.zeros_like(self.upper)


def _signs(x):
    return np.where(x < 0, -1.0, 1.0)


@njit(**STRICT_OPTIONS)
def _table_clocks(ti, ts, tb, tp, ids, magnitudes, w_out, rem_out):
    for i in range(ids.shape[0]):
        w_out[i], rem_out[i] = table_clock(ti, ts, tb, tp, ids[i], magnitudes[i])


def _check_clock_scale(exponent_log2, depth, what):
    """Depth >= 3: the clock scale 2^exponent must stay within 10^(+-CLOCK_DECADES)."""
    decades = exponent_log2 * math.log10(2.0)
    bad = np.abs(decades) > CLOCK_DECADES
    if np.any(bad):
        worst = float(decades[bad][np.argmax(np.abs(decades[bad]))])
        raise InputError(
            f"{what}: the clock scale alpha^(L-2) of a depth-{depth} coordinate is 1e{worst:.0f}, "
            f"outside the supported range 1e-{CLOCK_DECADES:.0f} .. 1e{CLOCK_DECADES:.0f} (float64 "
            f"cannot resolve its activation clocks)")


def _pack_product_half(u: np.ndarray, shift: np.ndarray, what: str, requests: list) -> _Half:
    """Family and parameters of every coordinate of a product half: layers 2^shift * u, u of
    shape (N, Lh), shift (N,) integer exponents (zero unless a log scale was given)."""
    n, lh = u.shape
    true_u = np.ldexp(u, shift[:, None])
    ip = np.zeros((n, fam.N_INT), dtype=np.int64)
    fp = np.zeros((n, fam.N_FLOAT))
    ip[:, fam.I_DEPTH] = lh
    ip[:, fam.I_JSTAR] = -1
    ip[:, fam.I_TABLE] = -1
    fp[:, fam.P_SCALE] = 1.0
    fp[:, fam.P_KAPPA] = 1.0
    fp[:, fam.P_SIGMA] = 1.0
    fp[:, fam.P_SIGN] = 1.0
    lsign = _signs(u)
    lgap = np.zeros((n, lh))
    lower = np.full(n, -np.inf)
    upper = np.full(n, np.inf)
    absu = np.abs(u)
    zeros = np.sum(absu == 0, axis=1)
    if lh == 1:
        ip[:, fam.I_FAMILY] = fam.LINEAR
        fp[:, fam.P_R0] = true_u[:, 0]
        return _Half(ip, fp, lsign, lgap, true_u, lower, upper)
    frozen = zeros >= 2
    ip[frozen, fam.I_FAMILY] = fam.FROZEN
    fp[frozen, fam.P_R0] = np.prod(true_u[frozen], axis=1)
    live = ~frozen
    if lh == 2:
        idx = np.flatnonzero(live)
        _, k = np.frexp(np.max(absu[idx], axis=1))
        a = np.ldexp(u[idx, 0], -k)
        b = np.ldexp(u[idx, 1], -k)
        k = k + shift[idx]
        A = np.abs(a + b) / 2
        B = np.abs(a - b) / 2
        ip[idx, fam.I_FAMILY] = fam.DEPTH2
        fp[idx, fam.P_R0] = A
        fp[idx, fam.P_W0] = B
        with np.errstate(divide="ignore"):
            fp[idx, fam.P_B] = np.where((A > 0) & (B > 0), 0.5 * np.log(A / np.where(B > 0, B, 1.0)), 0.0)
        fp[idx, fam.P_C] = np.where(a + b < 0, -1.0, 1.0)
        fp[idx, fam.P_P] = np.where(a - b < 0, -1.0, 1.0)
        fp[idx, fam.P_K] = k
        fp[idx, fam.P_SCALE] = np.ldexp(1.0, k)
        return _Half(ip, fp, lsign, lgap, true_u, lower, upper)
    smallest = absu.min(axis=1)
    count_min = np.sum(absu == smallest[:, None], axis=1)
    balanced = live & (count_min == lh)
    if np.any(balanced):
        idx = np.flatnonzero(balanced)
        rho = np.ldexp(smallest[idx], shift[idx])
        sigma = np.prod(lsign[idx], axis=1)
        kappa = rho ** (lh - 2)
        _check_clock_scale(np.log2(kappa), lh, what)
        ip[idx, fam.I_FAMILY] = fam.POWER
        fp[idx, fam.P_SCALE] = rho
        fp[idx, fam.P_KAPPA] = kappa
        fp[idx, fam.P_SIGMA] = sigma
        fp[idx, fam.P_R0] = 1.0
        fp[idx, fam.P_P] = lh
        fp[idx, fam.P_K] = 1.0
        _power_blow_up(fp, idx, sigma, 1.0, float(lh), lower, upper)
    shaped = live & ~balanced
    if np.any(shaped):
        _pack_smallest_layer(u, absu, shift, np.flatnonzero(shaped), count_min, ip, fp, lsign,
                             lgap, what, requests)
    return _Half(ip, fp, lsign, lgap, true_u, lower, upper)


def _power_blow_up(fp, idx, sigma, k, p, lower, upper):
    """POWER halves: blow-up clock B = -sigma / (k (p - 2)) (normalized, double-double)."""
    if p == 2.0:
        return
    denom = np.full(idx.size, k * (p - 2.0))
    hi, lo = _dd_divide(-sigma * np.ones(idx.size), np.zeros(idx.size), denom)
    fp[idx, fam.P_BP_HI] = hi
    fp[idx, fam.P_BP_LO] = lo
    clock = hi / fp[idx, fam.P_KAPPA]
    # rem = sigma (s - B) >= 0: sigma = +1 blows up below B, sigma = -1 above it
    lower[idx] = np.where(sigma > 0, clock, -np.inf)
    upper[idx] = np.where(sigma > 0, np.inf, clock)


def _pack_smallest_layer(u, absu, shift, idx, count_min, ip, fp, lsign, lgap, what, requests):
    """EQ3 / EQ4 / ELLIPTIC3 / TABLE / TIE coordinates ``idx`` (a smallest layer that moves)."""
    lh = u.shape[1]
    uu = u[idx]
    au = absu[idx]
    _, k0 = np.frexp(au.max(axis=1))
    un = np.ldexp(uu, -k0[:, None])
    an = np.abs(un)
    jstar = np.argmin(an, axis=1)
    rows = np.arange(idx.size)
    amin = an[rows, jstar]
    gaps = (an - amin[:, None]) * (an + amin[:, None])
    # two distinct layers whose gap a_j^2 - a_min^2 leaves the normal range (layers within 1e-154
    # of each other relative to the largest): the gap would count as a tie or lose its digits
    lost = (an != amin[:, None]) & (gaps < np.finfo(np.float64).tiny)
    if np.any(lost):
        raise InputError(f"{what}: two layers of a coordinate differ by less than 1e-154 of its "
                         f"largest layer (a_j^2 - a_min^2 below the float64 range); make them "
                         f"equal (a tie) or further apart")
    positive = np.where(gaps > 0, gaps, np.inf)
    gmin = positive.min(axis=1)
    _, e = np.frexp(gmin)
    k1 = np.floor((e - 1) / 2).astype(np.int64)
    gaps = np.ldexp(gaps, -2 * k1[:, None])
    un = np.ldexp(un, -k1[:, None])
    k = k0 + k1 + shift[idx]
    _check_clock_scale(k * (lh - 2), lh, what)
    r0 = un[rows, jstar]
    mult = count_min[idx]
    others = np.ones((idx.size, lh), dtype=bool)
    others[rows, jstar] = False
    sign_others = np.prod(np.where(others, lsign[idx], 1.0), axis=1)
    c = np.sqrt(np.where(np.isfinite(gmin), np.ldexp(gmin, -2 * k1), 1.0))
    ip[idx, fam.I_JSTAR] = jstar
    fp[idx, fam.P_SCALE] = np.ldexp(1.0, k)
    fp[idx, fam.P_KAPPA] = np.ldexp(1.0, k * (lh - 2))
    fp[idx, fam.P_R0] = r0
    fp[idx, fam.P_C] = c
    fp[idx, fam.P_SIGN] = sign_others
    lgap[idx] = gaps
    tie = mult > 1
    other_gaps = np.where(others, gaps, np.inf)
    sorted_gaps = np.sort(other_gaps, axis=1)[:, :lh - 1]
    equal = ~tie & (sorted_gaps[:, -1] == sorted_gaps[:, 0])
    family = np.where(tie, fam.TIE, fam.TABLE)
    if lh == 3:
        family = np.where(equal, fam.EQ3, family)
        with np.errstate(invalid="ignore"):
            elliptic = ~tie & ~equal & (sorted_gaps[:, 1] <= RATIO_LIMIT * sorted_gaps[:, 0])
        family = np.where(elliptic, fam.ELLIPTIC3, family)
    elif lh == 4:
        family = np.where(equal, fam.EQ4, family)
    ip[idx, fam.I_FAMILY] = family
    fp[idx, fam.P_SIGMA] = np.where(tie, sign_others * _signs(r0), sign_others)
    for code in (fam.TABLE, fam.TIE):
        sel = family == code
        if np.any(sel):
            kind = TIE if code == fam.TIE else UNIQUE
            requests.append((idx[sel], kind, lh, mult[sel], sorted_gaps[sel], ip, fp))
    for code in (fam.EQ3, fam.EQ4):
        sel = np.flatnonzero(family == code)
        if sel.size:
            cc = c[sel]
            a = np.abs(r0[sel])
            g = cc * cc
            if code == fam.EQ3:
                # b = pi / (2c) to double-double (pi itself to 2^-106)
                b, b_lo = _dd_divide(PI_HI, PI_LO, 2.0 * cc)
                w = np.arctan(a / cc) / cc
                with np.errstate(divide="ignore"):
                    rem = np.where(a > 0, np.arctan(cc / np.where(a > 0, a, 1.0)) / cc, b)
            else:
                b, b_lo = _dd_divide(np.ones_like(g), np.zeros_like(g), g)
                q = np.sqrt(a * a + g)
                w = a / (g * q)
                rem = 1.0 / (q * (q + a))
            rem_lo = np.where(a > 0, 0.0, b_lo)
            _set_unique_clocks(fp, idx[sel], r0[sel], w, rem, b, rem_lo, b_lo)
    sel = np.flatnonzero(family == fam.ELLIPTIC3)
    if sel.size:
        b, rho, q2 = elliptic_constants(sorted_gaps[sel, 0], sorted_gaps[sel, 1])
        fp[idx[sel], fam.P_P] = rho
        fp[idx[sel], fam.P_K] = q2
        w = np.empty(sel.size)
        rem = np.empty(sel.size)
        elliptic_clocks(np.abs(r0[sel]), b, rho, q2, w, rem)
        _set_unique_clocks(fp, idx[sel], r0[sel], w, rem, b)


def _set_unique_clocks(fp, idx, r0, w_abs, rem, b, rem_lo=0.0, b_lo=0.0):
    """psi0, b and the two double-double blow-up clocks of a unique smallest layer (rem = b - |psi0|
    and b given as double-doubles where known that precisely)."""
    sigma = fp[idx, fam.P_SIGMA]
    positive = r0 >= 0
    # psi0 from |w| where it is the precise one (w small), else from b - rem
    psi_abs = np.where(w_abs <= 0.5 * b, w_abs, b - rem)
    fp[idx, fam.P_W0] = np.where(positive, psi_abs, -psi_abs)
    fp[idx, fam.P_B] = b
    far_hi, far_lo = two_sum.py_func(2.0 * b, -rem)
    far_hi, far_lo = two_sum.py_func(far_hi, far_lo + 2.0 * b_lo - rem_lo)
    # r0 >= 0: B+ = -sigma rem0, B- = sigma (2b - rem0); r0 < 0: B+ = -sigma (2b - rem0), B- = sigma rem0
    fp[idx, fam.P_BP_HI] = np.where(positive, -sigma * rem, -sigma * far_hi)
    fp[idx, fam.P_BP_LO] = np.where(positive, -sigma * rem_lo, -sigma * far_lo)
    fp[idx, fam.P_BM_HI] = np.where(positive, sigma * far_hi, sigma * rem)
    fp[idx, fam.P_BM_LO] = np.where(positive, sigma * far_lo, sigma * rem_lo)


PI_HI = 3.141592653589793
PI_LO = 1.2246467991473532e-16


def _dd_divide(x_hi, x_lo, y):
    """(x_hi + x_lo) / y to double-double (y a float array)."""
    q = x_hi / y
    p, e = two_product.py_func(q, y)  # the scalar code works elementwise
    return q, ((x_hi - p) - e + x_lo) / y


def _build_requested_tables(requests, what) -> TableSet:
    """One table per distinct (kind, depth, mult, normalized gaps); fills I_TABLE, psi0/T0 and
    the blow-up clocks of the requesting coordinates."""
    if not requests:
        return build_tables(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros((0, 2)))
    lmax = max(req[2] for req in requests)
    keys = []
    for _, kind, lh, mult, gaps, _, _ in requests:
        padded = np.zeros((gaps.shape[0], lmax - 1))
        padded[:, :lh - 1] = gaps
        keys.append(np.column_stack([np.full(gaps.shape[0], kind), np.full(gaps.shape[0], lh), mult, padded]))
    all_keys = np.concatenate(keys)
    unique, first, inverse = np.unique(all_keys, axis=0, return_index=True, return_inverse=True)
    # tables numbered in the order their first coordinate comes: a pass over the coordinates then
    # walks the table memory forwards (prefetched) instead of jumping (a cache miss per lookup
    # once the tables outgrow the cache: measured 400 ns per coordinate at 64 x 1000 shapes)
    order = np.argsort(first, kind="stable")
    unique = unique[order]
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    inverse = rank[inverse.reshape(-1)]
    tables = build_tables(unique[:, 0].astype(np.int64), unique[:, 1].astype(np.int64),
                          unique[:, 2].astype(np.int64), unique[:, 3:])
    if not np.all(np.isfinite(tables.worst_error)):
        raise InputError(f"{what}: a clock table of an initialization shape did not converge "
                         f"(extreme layer ratios); use a less degenerate initialization")
    tab = tables.packed()
    start = 0
    for idx, kind, lh, mult, gaps, ip, fp in requests:
        ids = inverse[start:start + idx.size].astype(np.int64)
        start += idx.size
        ip[idx, fam.I_TABLE] = ids
        r0 = fp[idx, fam.P_R0]
        w_abs = np.empty(idx.size)
        rem = np.empty(idx.size)
        _table_clocks(*tab, ids, np.ascontiguousarray(np.abs(r0)), w_abs, rem)
        if kind == UNIQUE:
            _set_unique_clocks(fp, idx, r0, w_abs, rem, tables.b[ids])
        else:
            sigma = fp[idx, fam.P_SIGMA]
            fp[idx, fam.P_W0] = rem
            fp[idx, fam.P_BP_HI] = -sigma * rem
            fp[idx, fam.P_BP_LO] = 0.0
    return tables


def _unique_blow_up(half: _Half):
    """Blow-up clocks (true units) of the EQ3/EQ4/ELLIPTIC3/TABLE/TIE coordinates of a half."""
    family = half.ip[:, fam.I_FAMILY]
    kappa = half.fp[:, fam.P_KAPPA]
    unique = np.isin(family, (fam.EQ3, fam.EQ4, fam.ELLIPTIC3, fam.TABLE))
    bp = half.fp[:, fam.P_BP_HI] / kappa
    bm = half.fp[:, fam.P_BM_HI] / kappa
    half.lower[unique] = np.minimum(bp, bm)[unique]
    half.upper[unique] = np.maximum(bp, bm)[unique]
    bp_lo = half.fp[:, fam.P_BP_LO] / kappa
    bm_lo = half.fp[:, fam.P_BM_LO] / kappa
    half.lower_lo[unique] = np.where(bp <= bm, bp_lo, bm_lo)[unique]
    half.upper_lo[unique] = np.where(bp <= bm, bm_lo, bp_lo)[unique]
    tie = family == fam.TIE
    sigma = half.fp[:, fam.P_SIGMA]
    half.lower[tie] = np.where(sigma > 0, bp, -np.inf)[tie]
    half.upper[tie] = np.where(sigma > 0, np.inf, bp)[tie]
    power = (family == fam.POWER) & (half.fp[:, fam.P_P] > 2)
    bp_lo = half.fp[:, fam.P_BP_LO] / kappa
    half.lower_lo[tie | power] = np.where(sigma > 0, bp_lo, 0.0)[tie | power]
    half.upper_lo[tie | power] = np.where(sigma > 0, 0.0, bp_lo)[tie | power]


class ClockMap:
    """theta = F(s), h = -F'(s), G = int_0^s F per seed and coordinate (see the module docstring).

    Attributes
    ----------
    parametrization : str
    depth : int
        Layers per half (L for product/difference, 1 for power).
    power : float or None
    seeds, dim : int
    packed : PackedClockMap
        The arrays the kernels of :mod:`ddln_fast.clock_kernels` take (per-half rows
        (seed H + half) d + coordinate).
    tables : TableSet
    family : ndarray of shape (S, H, d), int
        The family code of every half (names in ``clock_families.FAMILY_NAMES``).
    theta0 : ndarray of shape (S, d)
    """

    def __init__(self, parametrization, depth, power, halves, tables, u0):
        self.parametrization = parametrization
        self.depth = depth
        self.power = power
        self.seeds, self.dim = u0.shape[0], u0.shape[2]
        n_halves = len(halves)
        S, d = self.seeds, self.dim

        def stack(name):
            # rows (seed, half, coordinate) in that order: row = (seed H + half) d + coordinate
            arrays = [getattr(hf, name).reshape((S, d) + getattr(hf, name).shape[1:]) for hf in halves]
            stacked = np.stack(arrays, axis=1)
            return np.ascontiguousarray(stacked.reshape((S * n_halves * d,) + stacked.shape[3:]))

        half_sign = np.array([1.0, -1.0][:n_halves])
        self.packed = PackedClockMap(stack("ip"), stack("fp"), stack("lsign"), stack("lgap"),
                                     stack("lzero"), half_sign, tables.packed())
        self.tables = tables
        self.family = self.packed.ip[:, fam.I_FAMILY].reshape(S, n_halves, d)
        lower = np.full((S, d), -np.inf)
        upper = np.full((S, d), np.inf)
        lower_lo = np.zeros((S, d))
        upper_lo = np.zeros((S, d))
        for k, hf in enumerate(halves):
            lo, hi = hf.lower.reshape(S, d), hf.upper.reshape(S, d)
            lo_lo, hi_lo = hf.lower_lo.reshape(S, d), hf.upper_lo.reshape(S, d)
            if half_sign[k] < 0:
                lo, hi, lo_lo, hi_lo = -hi, -lo, -hi_lo, -lo_lo
            take = lo > lower
            lower, lower_lo = np.where(take, lo, lower), np.where(take, lo_lo, lower_lo)
            take = hi < upper
            upper, upper_lo = np.where(take, hi, upper), np.where(take, hi_lo, upper_lo)
        self._blow_up = (lower, upper)
        #: low-order parts of the blow-up clocks (double-double), (S, d) each
        self.blow_up_lo = (lower_lo, upper_lo)
        self.layer_count = u0.shape[1]
        self.theta0 = self._theta_from_layers(u0)
        #: the arrays of the SIMD path (:mod:`ddln_fast.clock_fast`): None until the first
        #: evaluation, False where it does not apply
        self._fast = None
        self._kernel_arguments = None

    def _theta_from_layers(self, u0):
        if self.parametrization == "power":
            return u0[:, 0] ** self.power - u0[:, 1] ** self.power
        if self.parametrization == "difference":
            L = self.depth
            return np.prod(u0[:, :L], axis=1) - np.prod(u0[:, L:], axis=1)
        return np.prod(u0, axis=1)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_layers(cls, u0, parametrization: str = "product", power: float | None = None,
                    log_scale=None) -> "ClockMap":
        """Build the clock map of initial layers ``u0``.

        Parameters
        ----------
        u0 : ndarray of shape (S, L, d) (product), (S, 2L, d) (difference, u half first) or
            (S, 2, d) (power)
        parametrization : {"product", "difference", "power"}
        power : float
            D >= 2 for ``"power"`` (required there, refused elsewhere).
        log_scale : ndarray of shape (S,) or (S, d), optional
            Natural log of a scale alpha: the initialization is alpha * u0 (u0 is then a shape),
            for scales beyond float64 (e.g. alpha = 1e-400 at depth 2).
        """
        what = "clock map"
        if parametrization not in PARAMETRIZATIONS:
            raise InputError(f"parametrization = {parametrization!r}: expected one of "
                             f"{', '.join(PARAMETRIZATIONS)}")
        u0 = np.asarray(u0, dtype=np.float64)
        if u0.ndim != 3 or u0.shape[0] < 1 or u0.shape[1] < 1 or u0.shape[2] < 1:
            raise InputError(f"{what}: initial layers of shape {u0.shape}, expected (S, layers, d)")
        if not np.all(np.isfinite(u0)):
            raise InputError(f"{what}: initial layers contain nan or inf")
        S, n_layers, d = u0.shape
        if log_scale is not None:
            log_scale = np.broadcast_to(np.asarray(log_scale, dtype=np.float64).reshape(
                (S, 1) if np.ndim(log_scale) == 1 else np.shape(log_scale)), (S, d))
            if not np.all(np.isfinite(log_scale)):
                raise InputError(f"{what}: log_scale contains nan or inf")
        if parametrization == "power":
            if power is None or not np.isfinite(power) or power < 2:
                raise InputError(f"{what}: power = {power}: expected a finite number >= 2")
            if n_layers != 2:
                raise InputError(f"{what}: the power parametrization takes u0 of shape (S, 2, d), got {u0.shape}")
            if np.any(u0 <= 0):
                raise InputError(f"{what}: the power parametrization needs u, v > 0 at initialization")
        elif power is not None:
            raise InputError(f"{what}: power = {power} is only meaningful for parametrization = \"power\"")
        if parametrization == "difference" and n_layers % 2:
            raise InputError(f"{what}: the difference parametrization takes 2L layers (u half, "
                             f"then v half), got {n_layers}")
        if parametrization == "power":
            halves = [cls._pack_power_half(u0[:, j], float(power), log_scale, what) for j in range(2)]
            for hf in halves:
                _unique_blow_up(hf)
            layers0 = np.stack([hf.lzero.reshape(S, d) for hf in halves], axis=1)
            return cls(parametrization, 1, float(power), halves, build_tables(
                np.zeros(0), np.zeros(0), np.zeros(0), np.zeros((0, 2))), layers0)
        L = n_layers // 2 if parametrization == "difference" else n_layers
        parts = [u0[:, :L], u0[:, L:]] if parametrization == "difference" else [u0]
        requests: list = []
        halves = []
        shift = np.zeros(S * d, dtype=np.int64)
        residual = np.ones(S * d)
        if log_scale is not None:
            # alpha = 2^shift * residual: the power of two goes into the normalization exactly,
            # so alpha itself may lie beyond float64
            shift = np.round(log_scale.reshape(-1) / math.log(2.0)).astype(np.int64)
            residual = np.exp(log_scale.reshape(-1) - shift * math.log(2.0))
        for part in parts:
            flat = np.ascontiguousarray(part.transpose(0, 2, 1).reshape(S * d, L)) * residual[:, None]
            halves.append(_pack_product_half(flat, shift, what, requests))
        tables = _build_requested_tables(requests, what)
        for hf in halves:
            _unique_blow_up(hf)
        layers0 = np.concatenate([hf.lzero.reshape(S, d, L).transpose(0, 2, 1) for hf in halves], axis=1)
        return cls(parametrization, L, None, halves, tables, layers0)

    @staticmethod
    def _pack_power_half(u, D, log_scale, what) -> _Half:
        n = u.size
        flat = u.reshape(-1).copy()
        ip = np.zeros((n, fam.N_INT), dtype=np.int64)
        fp = np.zeros((n, fam.N_FLOAT))
        ip[:, fam.I_FAMILY] = fam.POWER
        ip[:, fam.I_DEPTH] = 1
        ip[:, fam.I_JSTAR] = -1
        ip[:, fam.I_TABLE] = -1
        log_rho = np.log(flat) + (log_scale.reshape(-1) if log_scale is not None else 0.0)
        if np.any(np.abs(log_rho) > 600):
            raise InputError(f"{what}: a power-parametrization layer of scale e^{log_rho[np.argmax(np.abs(log_rho))]:.0f} "
                             f"is outside the float64 range")
        flat = np.exp(log_rho)
        kappa = np.exp((D - 2.0) * log_rho)
        if D > 2:
            _check_clock_scale((D - 2.0) * log_rho / math.log(2.0), D, what)
        fp[:, fam.P_SCALE] = flat
        fp[:, fam.P_KAPPA] = kappa
        fp[:, fam.P_SIGMA] = 1.0
        fp[:, fam.P_SIGN] = 1.0
        fp[:, fam.P_R0] = 1.0
        fp[:, fam.P_P] = D
        fp[:, fam.P_K] = D
        lower = np.full(n, -np.inf)
        upper = np.full(n, np.inf)
        _power_blow_up(fp, np.arange(n), np.ones(n), D, D, lower, upper)
        ones = np.ones((n, 1))
        return _Half(ip, fp, ones, np.zeros((n, 1)), flat[:, None].copy(), lower, upper)

    # -- evaluation ------------------------------------------------------------------------------
    @property
    def blow_up(self) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper), each (S, d): F is finite exactly on lower < s < upper."""
        return self._blow_up

    def _rows_and_clock(self, s, rows, s_lo):
        s = np.ascontiguousarray(s, dtype=np.float64)
        if s.ndim != 2 or s.shape[1] != self.dim:
            raise InputError(f"clocks of shape {s.shape}: expected (rows, {self.dim})")
        if rows is None:
            if s.shape[0] > self.seeds:
                raise InputError(f"{s.shape[0]} rows of clocks for {self.seeds} seeds: pass rows=")
            rows = np.arange(s.shape[0], dtype=np.int64)
        else:
            rows = np.ascontiguousarray(rows, dtype=np.int64)
            if rows.shape != (s.shape[0],) or (rows.size and (rows.min() < 0 or rows.max() >= self.seeds)):
                raise InputError(f"rows must be {s.shape[0]} seed indices in 0..{self.seeds - 1}")
        if s_lo is None:
            s_lo = np.zeros_like(s)
        else:
            s_lo = np.ascontiguousarray(s_lo, dtype=np.float64)
            if s_lo.shape != s.shape:
                raise InputError(f"s_lo of shape {s_lo.shape}: expected {s.shape}")
        return s, rows, s_lo

    @staticmethod
    def _out(array, shape):
        if array is None or array is True or array is False:
            return np.empty(shape)
        if array.shape != shape or array.dtype != np.float64 or not array.flags.c_contiguous:
            raise InputError(f"output array of shape {array.shape}: expected a C-contiguous float64 {shape}")
        return array

    def evaluate(self, s, theta=None, h=None, G=None, rows=None, s_lo=None):
        """theta = F(s) and h = -F'(s) (and G(s) = int_0^s F when ``G`` is True or an array).

        Parameters
        ----------
        s : ndarray of shape (m, d)
            Clocks; row a belongs to seed ``rows[a]`` (default: rows 0..m-1).
        theta, h, G : ndarray of shape (m, d), optional
            Outputs to fill (no allocation then).
        s_lo : ndarray of shape (m, d), optional
            Low-order part of a double-double clock s + s_lo.

        Returns
        -------
        theta, h[, G] : ndarray of shape (m, d)
        """
        s, rows, s_lo = self._rows_and_clock(s, rows, s_lo)
        want_g = G is not None and G is not False
        theta = self._out(theta, s.shape)
        h = self._out(h, s.shape)
        if want_g:
            G_out = self._out(G, s.shape)
            p = self.packed
            evaluate_parallel(s, s_lo, rows, p.ip, p.fp, p.lsign, p.lgap, *p.tab, p.half_sign, NO_SKIP, True,
                              theta, h, G_out)
            return theta, h, G_out
        if self.fast_path and not self._fast.every and any(
                np.may_share_memory(out, x) for out in (theta, h) for x in (s, s_lo)):
            # the general loop reads the clocks of the coordinates it does after the SIMD loop
            # has written every coordinate's outputs: an output over the clocks (evaluate in
            # place) needs the clocks kept
            s, s_lo = s.copy(), s_lo.copy()
        self.evaluate_rows(s, s_lo, rows, theta, h)
        return theta, h

    def evaluate_rows(self, s, s_lo, rows, theta, h) -> None:
        """theta = F(s + s_lo) and h = -F'(s + s_lo), as :meth:`evaluate` computes them, for a
        caller that hands over exactly the arrays it needs (a solver's inner loop, where the
        checks cost as much as 200 coordinates): s, s_lo, theta and h C-contiguous float64
        (m, d), rows int64 (m,) seed indices, the outputs not overlapping the clocks. Nothing is
        checked or allocated. (Compiled code calls :func:`evaluate_rows_kernel` with
        :attr:`kernel_arguments`.)"""
        evaluate_rows_kernel(s, s_lo, rows, self.kernel_arguments, theta, h)

    @property
    def kernel_arguments(self) -> tuple:
        """Everything :func:`evaluate_rows_kernel` needs of this map, as one tuple: whether the
        SIMD loop applies and to every coordinate, its arrays (empty where it does not apply),
        and the packed arrays of the general loop."""
        if self._kernel_arguments is None:
            if self.fast_path:
                P, gap_a, gap_b, eligible, every = self._fast
                fast = (True, every, P, gap_a, gap_b, eligible)
            else:
                fast = (False, False, np.zeros((len(clock_fast.COLUMNS), 0)), np.zeros(0), np.zeros(0),
                        NO_SKIP)
            p = self.packed
            self._kernel_arguments = fast + (p.ip, p.fp, p.lsign, p.lgap, *p.tab, p.half_sign)
        return self._kernel_arguments

    @property
    def fast_path(self) -> bool:
        """Whether theta and h are evaluated by the SIMD loop of :mod:`ddln_fast.clock_fast`
        (a one-half map with at least half its coordinates depth-3 elliptic; the general loop
        then does the others)."""
        if self._fast is None:
            self._fast = clock_fast.elliptic_arrays(self.packed) or False
        return self._fast is not False

    def layers(self, s, rows=None, s_lo=None, out=None) -> np.ndarray:
        """The layers at clocks s: shape (m, L', d) with L' = L (product), 2L (difference,
        u half first) or 2 (power: u, v)."""
        s, rows, s_lo = self._rows_and_clock(s, rows, s_lo)
        p = self.packed
        lh = p.lsign.shape[1]
        n_halves = p.half_sign.shape[0]
        shape = (s.shape[0], n_halves * lh, self.dim)
        out = self._out(out, shape)
        layers_parallel(s, s_lo, rows, p.ip, p.fp, p.lsign, p.lgap, p.lzero, *p.tab, p.half_sign, out)
        return out

    def clock_of(self, theta, rows=None) -> np.ndarray:
        """s with F(s) = theta, shape of theta (m, d); nan where theta is out of reach (a frozen
        coordinate, the wrong sign for balanced or tied layers, or beyond a depth-2 asymptote)."""
        theta, rows, _ = self._rows_and_clock(theta, rows, None)
        p = self.packed
        out = np.empty(theta.shape)
        lower, upper = self._blow_up
        clock_of_parallel(theta, rows, p.ip, p.fp, p.lsign, p.lgap, *p.tab, p.half_sign,
               np.ascontiguousarray(lower), np.ascontiguousarray(upper), out)
        return out

    def family_counts(self) -> dict:
        """How many halves fall in each family (for reports)."""
        codes, counts = np.unique(self.family, return_counts=True)
        return {fam.FAMILY_NAMES[c]: int(n) for c, n in zip(codes, counts)}


@njit(**STRICT_OPTIONS)
def evaluate_rows_kernel(s, s_lo, rows, arguments, theta, h):
    """:meth:`ClockMap.evaluate_rows` for compiled callers: ``arguments`` is the map's
    :attr:`ClockMap.kernel_arguments`. The SIMD loop fills every coordinate where it applies,
    then the general loop overwrites the coordinates it does not serve (all of them when it
    does not apply: ``eligible`` is then empty, the general loop's "skip nothing")."""
    (use_fast, every, P, gap_a, gap_b, eligible, ip, fp, lsign, lgap, ti, ts, tb, tp,
     half_sign) = arguments
    if use_fast:
        clock_fast.evaluate_parallel(s, s_lo, rows, P, gap_a, gap_b, theta, h)
        if every:
            return
    evaluate_parallel(s, s_lo, rows, ip, fp, lsign, lgap, ti, ts, tb, tp, half_sign, eligible, False, theta, h,
                      theta)
