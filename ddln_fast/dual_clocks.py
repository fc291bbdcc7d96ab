"""Clock maps theta_i = F_i(s_i) for the dual method: the interim implementation.

INTERIM: the package's clock-map module (``ddln_fast.clockmap``, every family, tables, tails
near the blow-up) replaces this module; the dual solver only uses the narrow interface below.

Every coordinate of a product network follows the clock flow du^j/ds = -prod_{k != j} u^k
from its initial layers, so theta_i = F_i(s_i) with F_i decreasing and
h_i = -F_i' = sum_j prod_{k != j} (u^k_i)^2 >= 0 (Labarrière et al., arXiv:2412.16765; the
clock view of the layer flow). The families evaluated here, per coordinate:

- depth 1: theta = a - s, h = 1;
- depth 2, layers (a, b): theta = ((a + b)^2 e^{-2s} - (a - b)^2 e^{2s}) / 4 and
  h = ((a + b)^2 e^{-2s} + (a - b)^2 e^{2s}) / 2, evaluated from log|a +- b| so that scales
  down to 1e-300 work (values that underflow are truly that small);
- depth >= 3, two or more layers zero: frozen (theta constant, h = 0);
- depth >= 3, all |layers| equal (balanced, any signs, product of signs sigma):
  theta = sigma rho^L, rho^{2-L} = rho_0^{2-L} + sigma (L - 2) s, h = L rho^{2(L-1)};
- depth 3 and 4, one layer zero and the others of equal magnitude c (first layer zero, any
  signs): theta = -c^3 tan(c s) sec^2(c s) (depth 3) and theta = -c^4 t / (1 - t^2)^2 with
  t = c^2 s (depth 4), independent of the signs;
- any other initialization satisfying assumption (A) (jittered, random shapes, depth >= 5
  with a zero layer): through :class:`ddln_fast.theory.MirrorGeometry`
  (F(s) = phi^{-1}(phi(theta_0) - s)), in numpy: exact but slow.

Depth >= 3 blows up in finite clock time; ``low``/``high`` hold the blow-up clocks of every
coordinate (-inf/+inf where there is none). Trial clocks are clamped inside (low, high).

Interface used by the dual solver, that of ``ddln_fast.clockmap.ClockMap`` (``rows`` are seed
indices, one per row of ``s``): ``evaluate(s, theta=None, h=None, rows=None)``,
``layers(s, rows=None)``, ``clock_of(values, rows=None)``, ``blow_up``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .errors import InputError
from .kernels import call_by_size, serial_and_parallel

FROZEN, DEPTH1, DEPTH2, FIRST_ZERO3, FIRST_ZERO4, BALANCED, GENERAL = range(7)
FAMILY_NAMES = ("frozen", "depth 1", "depth 2", "one zero layer (depth 3)",
                "one zero layer (depth 4)", "balanced", "general (A)")
LOG4 = math.log(4.0)
HALF_PI = math.pi / 2


def _evaluate(s, rows, family, params, low, high, theta, h, want_h):
    """theta[r] = F(s[r]) (and h) for the seed rows[r]; GENERAL columns are left untouched.

    s, theta, h : (R, d); rows : (R,); family : (S, d) int8; params : (S, d, 3); low, high : (S, d).
    Clocks outside (low, high) are clamped to the nearest float inside.
    """
    R, d = s.shape
    for item in prange(R * d):
        r = item // d
        i = item - r * d
        seed = rows[r]
        fam = family[seed, i]
        if fam == GENERAL:
            continue
        x = s[r, i]
        lo = low[seed, i]
        hi = high[seed, i]
        if x <= lo:
            x = np.nextafter(lo, np.inf)
        elif x >= hi:
            x = np.nextafter(hi, -np.inf)
        p0 = params[seed, i, 0]
        p1 = params[seed, i, 1]
        p2 = params[seed, i, 2]
        if fam == FROZEN:
            th = p0
            hh = 0.0
        elif fam == DEPTH1:
            th = p0 - x
            hh = 1.0
        elif fam == DEPTH2:
            a = 2.0 * p0 - 2.0 * x - LOG4
            b = 2.0 * p1 + 2.0 * x - LOG4
            if a == -np.inf and b == -np.inf:
                th = 0.0
                hh = 0.0
            elif a >= b:
                th = np.exp(a) * -np.expm1(b - a)
                hh = 2.0 * (np.exp(a) + np.exp(b))
            else:
                th = -np.exp(b) * -np.expm1(a - b)
                hh = 2.0 * (np.exp(a) + np.exp(b))
        elif fam == FIRST_ZERO3:
            c = p0
            cs = c * x
            inv_cos = 1.0 / np.cos(cs)  # sin and cos: cheaper than tan and cos (measured 1.7x)
            tn = np.sin(cs) * inv_cos
            sec2 = inv_cos * inv_cos
            th = -c * c * c * tn * sec2
            hh = c * c * c * c * sec2 * (sec2 + 2.0 * tn * tn)
        elif fam == FIRST_ZERO4:
            c2 = p0 * p0
            t = c2 * x
            q = (1.0 - t) * (1.0 + t)
            th = -c2 * c2 * t / (q * q)
            hh = c2 * c2 * c2 * (1.0 + 3.0 * t * t) / (q * q * q)
        else:  # BALANCED: p0 = rho0^(2-L), p1 = sigma, p2 = L
            depth = p2
            base = p0 + p1 * (depth - 2.0) * x
            rho = base ** (-1.0 / (depth - 2.0))
            th = p1 * rho ** depth
            hh = depth * rho ** (2.0 * (depth - 1.0))
        theta[r, i] = th
        if want_h:
            h[r, i] = hh


EVALUATE_KERNELS = serial_and_parallel(_evaluate)


class InterimClockMap:
    """F, h and the layers of every seed and coordinate, from the initial layers.

    Parameters
    ----------
    u0 : ndarray of shape (S, L, d)

    Attributes
    ----------
    low, high : ndarray of shape (S, d)
        Blow-up clocks (-inf / +inf where F stays finite).
    theta0 : ndarray of shape (S, d)
    families : ndarray of shape (S, d), int8
    """

    def __init__(self, u0: np.ndarray):
        u0 = np.asarray(u0, dtype=np.float64)
        self.u0 = u0
        S, L, d = u0.shape
        self.seeds, self.depth, self.dim = S, L, d
        self.theta0 = np.prod(u0, axis=1)
        self.family = np.full((S, d), GENERAL, dtype=np.int8)
        self.params = np.zeros((S, d, 3))
        self.low = np.full((S, d), -np.inf)
        self.high = np.full((S, d), np.inf)
        self.general = [None] * S  # per seed: (columns, MirrorGeometry) of the GENERAL family
        mag = np.abs(u0)
        if L == 1:
            self.family[:] = DEPTH1
            self.params[..., 0] = u0[:, 0]
        elif L == 2:
            a, b = u0[:, 0], u0[:, 1]
            with np.errstate(divide="ignore"):
                self.params[..., 0] = np.log(np.abs(a + b))
                self.params[..., 1] = np.log(np.abs(a - b))
            self.family[:] = DEPTH2
        else:
            self._classify_deep(u0, mag)
        self._bounds_for_general()
        self.has_general = any(g is not None for g in self.general)

    def _classify_deep(self, u0, mag):
        S, L, d = u0.shape
        zeros = np.sum(mag == 0, axis=1)
        signs = np.prod(np.where(u0 < 0, -1.0, 1.0), axis=1)
        largest = mag.max(axis=1)
        smallest = mag.min(axis=1)
        frozen = zeros >= 2
        balanced = (smallest == largest) & (largest > 0)
        nonzero_max = np.where(mag > 0, mag, np.inf).min(axis=1)  # smallest nonzero magnitude
        one_zero_equal = (zeros == 1) & (nonzero_max == largest)
        ties = np.sum(mag == smallest[:, None, :], axis=1) > 1
        self.family[frozen] = FROZEN
        self.params[frozen, 0] = self.theta0[frozen]
        self.family[balanced] = BALANCED
        rho0 = np.where(balanced, largest, 1.0)
        self.params[balanced, 0] = rho0[balanced] ** (2.0 - L)
        self.params[balanced, 1] = signs[balanced]
        self.params[balanced, 2] = L
        edge = -signs * rho0 ** (2.0 - L) / (L - 2.0)  # base = 0 there
        self.low = np.where(balanced & (signs > 0), edge, self.low)
        self.high = np.where(balanced & (signs < 0), edge, self.high)
        if L in (3, 4):
            fam = FIRST_ZERO3 if L == 3 else FIRST_ZERO4
            c = np.where(one_zero_equal, largest, 1.0)
            self.family[one_zero_equal] = fam
            self.params[one_zero_equal, 0] = c[one_zero_equal]
            edge = HALF_PI / c if L == 3 else 1.0 / (c * c)
            self.low = np.where(one_zero_equal, -edge, self.low)
            self.high = np.where(one_zero_equal, edge, self.high)
        partial = ties & ~frozen & ~balanced
        if np.any(partial):
            s, i = np.argwhere(partial)[0]
            raise InputError(
                f"seed {s}, coordinate {i}: two or more (but not all) layers share the smallest "
                f"nonzero |u_i(0)|; the dual method cannot handle this initialization yet (use "
                f"jitter, another init, or a layer method)")

    def _bounds_for_general(self):
        from .theory import MirrorGeometry

        for s in range(self.seeds):
            cols = np.flatnonzero(self.family[s] == GENERAL)
            if cols.size == 0:
                continue
            geometry = MirrorGeometry.from_layers(self.u0[s][:, cols])
            self.general[s] = (cols, geometry)
            self.low[s, cols] = geometry.phi0 - geometry.bound
            self.high[s, cols] = geometry.phi0 + geometry.bound


    @property
    def blow_up(self) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) blow-up clocks, each (S, d); -inf / inf where F stays finite."""
        return self.low, self.high

    def evaluate(self, s, theta=None, h=None, rows=None, s_lo=None):
        """theta = F(s) (and h = -F'(s) when an array is given for it), row by row.

        s, theta, h : ndarray of shape (R, d); rows : ndarray of shape (R,), the seed of each row
        (default 0..R-1). Returns (theta, h)."""
        if s_lo is not None:
            raise NotImplementedError("the interim clock map has no double-double clocks")
        s = np.ascontiguousarray(s, dtype=np.float64)
        rows = np.arange(s.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
        theta = np.empty(s.shape) if theta is None else theta
        want_h = h is not None
        call_by_size(EVALUATE_KERNELS, s.size, s, rows, self.family, self.params, self.low, self.high,
                     theta, h if want_h else theta, want_h)
        if self.has_general:
            self._evaluate_general(s, rows, theta, h)
        return theta, h

    def _evaluate_general(self, s, rows, theta, h):
        for r, seed in enumerate(rows):
            entry = self.general[seed]
            if entry is None:
                continue
            cols, geometry = entry
            clocks = np.clip(s[r, cols], np.nextafter(self.low[seed, cols], np.inf),
                             np.nextafter(self.high[seed, cols], -np.inf))
            with np.errstate(over="ignore", invalid="ignore"):
                values, _ = geometry.clock_map(clocks)
                theta[r, cols] = values
                if h is not None:
                    h[r, cols] = geometry.h(values)

    def layers(self, s: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """The layers at clocks ``s`` (R, d) of seeds ``rows``: shape (R, L, d)."""
        R, d = s.shape
        rows = np.arange(R) if rows is None else rows
        L = self.depth
        out = np.empty((R, L, d))
        theta, _ = self.evaluate(s, rows=rows)
        for r, seed in enumerate(rows):
            u0 = self.u0[seed]
            fam = self.family[seed]
            x = s[r]
            out[r] = u0
            if L == 1:
                out[r, 0] = u0[0] - x
                continue
            if L == 2:
                p0, p1 = self.params[seed, :, 0], self.params[seed, :, 1]
                plus = np.sign(u0[0] + u0[1]) * np.exp(p0 - x)
                minus = np.sign(u0[0] - u0[1]) * np.exp(p1 + x)
                out[r, 0] = (plus + minus) / 2
                out[r, 1] = (plus - minus) / 2
                continue
            sign = np.where(u0 < 0, -1.0, 1.0)
            sigma = np.prod(sign, axis=0)
            for fam_code in (FIRST_ZERO3, FIRST_ZERO4):
                cols = np.flatnonzero(fam == fam_code)
                if cols.size == 0:
                    continue
                c = self.params[seed, cols, 0]
                if fam_code == FIRST_ZERO3:
                    sinh_y, cosh_y = np.tan(c * x[cols]), 1.0 / np.cos(c * x[cols])
                else:
                    t = c * c * x[cols]
                    root = np.sqrt((1.0 - t) * (1.0 + t))
                    sinh_y, cosh_y = t / root, 1.0 / root
                zero_layer = np.argmin(np.abs(u0[:, cols]), axis=0)
                for j in range(L):
                    value = sign[j, cols] * c * cosh_y
                    out[r, j, cols] = np.where(zero_layer == j, -sigma[cols] * c * sinh_y, value)
            cols = np.flatnonzero(fam == BALANCED)
            if cols.size:
                rho = np.abs(theta[r, cols]) ** (1.0 / L)
                out[r][:, cols] = sign[:, cols] * rho
            entry = self.general[seed]
            if entry is not None:
                gcols, geometry = entry
                out[r][:, gcols] = geometry.layers(theta[r, gcols])
        return out

    def clock_of(self, values: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Clocks s with F(s) = values, shape (R, d); NaN where F never takes the value.

        F is decreasing: bisection between 0 and the blow-up clock (or a doubling bracket),
        to the last bit."""
        values = np.asarray(values, dtype=np.float64)
        R, d = values.shape
        rows = np.arange(R) if rows is None else np.asarray(rows)
        low, high, theta0 = self.low[rows], self.high[rows], self.theta0[rows]
        up = values > theta0  # F(s) = value needs s < 0
        lo = np.where(up, np.maximum(low, -1.0), 0.0)
        hi = np.where(up, 0.0, np.minimum(high, 1.0))

        def F(x):
            return self.evaluate(x, rows=rows)[0]

        # widen the bracket until it holds the value (F unbounded or past the value)
        for _ in range(2100):
            short_lo = up & (F(lo) < values) & (lo > low) & np.isfinite(lo)
            short_hi = ~up & (F(hi) > values) & (hi < high) & np.isfinite(hi)
            if not (short_lo.any() or short_hi.any()):
                break
            with np.errstate(over="ignore"):
                lo = np.where(short_lo, np.maximum(2 * lo, low), lo)
                hi = np.where(short_hi, np.minimum(2 * hi, high), hi)
        found = np.where(up, F(lo) >= values, F(hi) <= values) | (values == theta0)
        lo = np.where(np.isfinite(lo), lo, np.nextafter(low, np.inf))
        hi = np.where(np.isfinite(hi), hi, np.nextafter(high, -np.inf))
        for _ in range(2200):
            with np.errstate(over="ignore"):
                mid = 0.5 * lo + 0.5 * hi
            if not np.any((mid > lo) & (mid < hi)):
                break
            above = F(mid) > values
            lo = np.where(above, mid, lo)
            hi = np.where(above, hi, mid)
        clock = np.where(values == theta0, 0.0, 0.5 * lo + 0.5 * hi)
        return np.where(found, clock, np.nan)
