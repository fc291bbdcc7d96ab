"""The mirror-flow view of the layer flow: assumption (A), h, the mirror map phi, the potential Q,
the clock map F, the implicit-bias limit (Bregman projection) and the convergence bounds.

Notation of THEORY.md, per coordinate i (vectorized over coordinates): under (A) the smallest
layer j*_i is unique, s_i = u^{j*}_i(t) is the only layer that can cross zero, the others are
u^k_i = sign(u^k_i(0)) sqrt(s_i^2 + delta^k_i) with the gaps delta^k_i > 0, and

    theta_i = sigma_i s_i P_i(s_i),   P_i(s) = prod_{k != j*} sqrt(s^2 + delta^k_i),
    phi_i(theta_i) = sign(theta_i) psi_i(|s_i|),   psi_i(s) = int_0^s dr / P_i(r),
    Q_i(theta_i) = theta_i phi_i(theta_i) - s_i^2 / 2          (conjugate identity),
    Q_i^*(v) = s_i(v)^2 / 2                                    (so the dual is cheap).

The clock map is the inverse of the mirror map shifted by the clock (``MirrorGeometry.clock_map``;
``clock_flow`` integrates the clock ODE itself with the package's Dormand–Prince tableau, an
independent route that needs no mirror map):
theta_i(tau) = F_i(tau) = phi_i^{-1}(phi_i(theta_i(0)) - tau), which blows up in finite clock
time when |phi_i(theta_i(0)) - tau| reaches b_i = psi_i(inf) (finite for depth >= 3).

psi: depth 1 and 2 in closed form, depth 3 with incomplete elliptic integrals (F and Jacobi's
amplitude), all gaps equal with Gauss's 2F1, anything else by Gauss–Legendre quadrature in
x = arcsinh(s / sqrt(delta_min)) (the integrand is analytic in the strip |Im x| < pi/2 there),
tabulated once per coordinate so that inverting psi costs a few panel evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy import special

from .errors import InputError
from .threads import serial_blas

# Gauss–Legendre nodes per panel; panels at most PANEL_WIDTH wide in x (and 1.5 / (L - 2) so that
# the e^{-(L-2) x} decay of the integrand is resolved): the integrand is analytic in
# |Im x| < pi/2, so the error per panel is about (2 pi / width)^(-2 * GL_NODES) < 1e-16.
GL_NODES = 10
PANEL_WIDTH = 0.5
# The table stops where s^2 > TAIL_RATIO * delta_max: there the tail int_s^inf dr / P(r) equals
# s^(2-L) / (L-2) to a relative 1 / TAIL_RATIO.
TAIL_RATIO = 1e17


@lru_cache(maxsize=None)
def _gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights on [0, 1]."""
    x, w = np.polynomial.legendre.leggauss(n)
    return (x + 1) / 2, w / 2


# ---------------------------------------------------------------------------------------------
# Assumption (A)
# ---------------------------------------------------------------------------------------------
@dataclass
class AssumptionA:
    """Assumption (A) for one seed's initial layers.

    Attributes
    ----------
    j_star : ndarray of shape (d,)
        Index of the layer with the smallest |u^j_i(0)| (the first one on ties).
    gaps : ndarray of shape (L - 1, d)
        delta^k_i = (u^k_i(0))^2 - (u^{j*}_i(0))^2 for the other layers, ascending per coordinate.
    sigma : ndarray of shape (d,)
        prod_{k != j*} sign(u^k_i(0)) (+1 for depth 1).
    violating : ndarray of shape (d,), bool
        Coordinates where the smallest |u^j_i(0)| is shared by two layers (a zero gap).
    """

    j_star: np.ndarray
    gaps: np.ndarray
    sigma: np.ndarray
    violating: np.ndarray

    @property
    def holds(self) -> bool:
        return not bool(self.violating.any())


def assumption_a(u0: np.ndarray) -> AssumptionA:
    """Check (A) per coordinate for initial layers ``u0`` of shape (L, d)."""
    u0 = np.asarray(u0, dtype=np.float64)
    L, d = u0.shape
    magnitudes = np.abs(u0)
    j_star = np.argmin(magnitudes, axis=0)
    cols = np.arange(d)
    others = np.ones((L, d), dtype=bool)
    others[j_star, cols] = False
    rest = u0.T[others.T].reshape(d, L - 1).T  # (L-1, d), layer order kept
    smallest = u0[j_star, cols]
    gaps = np.sort(rest ** 2 - smallest ** 2, axis=0)
    # product of the signs of the other layers (zero layers other than j* only occur on ties)
    sigma = np.prod(np.where(rest < 0, -1.0, 1.0), axis=0) if L > 1 else np.ones(d)
    violating = np.sum(magnitudes == magnitudes[j_star, cols], axis=0) > 1
    return AssumptionA(j_star, gaps, sigma, violating)


def require_assumption_a(u0: np.ndarray, what: str = "the theory") -> AssumptionA:
    """(A) for ``u0`` (L, d) or raise an InputError naming the violating coordinates."""
    report = assumption_a(u0)
    if not report.holds:
        bad = np.flatnonzero(report.violating)
        shown = ", ".join(str(i) for i in bad[:5]) + (", ..." if bad.size > 5 else "")
        raise InputError(
            f"the initialization violates assumption (A) at {bad.size} of {report.violating.size} "
            f"coordinates ({shown}): two layers share the smallest |u_i(0)| (e.g. init = \"balanced\"), "
            f"so {what} is undefined there (sign trap); use init = \"first_layer_zero\", jitter > 0 or another shape")
    return report


# ---------------------------------------------------------------------------------------------
# The geometry of one seed: h, phi, Q, b, the clock map
# ---------------------------------------------------------------------------------------------
@dataclass
class MirrorGeometry:
    """Everything about one seed's initialization that the mirror flow depends on.

    Build with :meth:`from_layers`; then ``h``, ``mirror_map``, ``potential``,
    ``inverse_mirror_map``, ``clock_map`` and ``bregman_divergence`` act on arrays of shape
    (..., d) (any leading shape).

    Attributes
    ----------
    depth : int
    u0 : ndarray of shape (L, d)
    a : AssumptionA
    theta0 : ndarray of shape (d,)
    bound : ndarray of shape (d,)
        b_i, the bound of the dual range |phi_i| < b_i (inf for depth <= 2).
    """

    depth: int
    u0: np.ndarray
    a: AssumptionA
    theta0: np.ndarray = field(init=False)
    bound: np.ndarray = field(init=False)
    phi0: np.ndarray = field(init=False)

    @classmethod
    def from_layers(cls, u0: np.ndarray) -> "MirrorGeometry":
        """Geometry of initial layers ``u0`` (L, d); raises InputError when (A) fails."""
        u0 = np.asarray(u0, dtype=np.float64)
        return cls(u0.shape[0], u0, require_assumption_a(u0))

    def __post_init__(self):
        self.theta0 = np.prod(self.u0, axis=0)
        gaps = self.a.gaps
        L = self.depth
        self._equal_gaps = L >= 4 and bool(np.all(gaps[-1] - gaps[0] <= 1e-14 * gaps[-1]))
        self._table = None
        if L <= 2:
            self.bound = np.full(self.u0.shape[1], np.inf)
        elif L == 3:
            C2, m = gaps[1], 1.0 - gaps[0] / gaps[1]
            self.bound = special.ellipk(m) / np.sqrt(C2)
        else:
            self._build_table()
            self.bound = self._table["b"]
        self.phi0 = self.mirror_map(self.theta0)

    # -- theta <-> smallest layer ----------------------------------------------------------------
    def smallest_layer(self, theta: np.ndarray) -> np.ndarray:
        """s_i, the value of the unique smallest layer for which theta_i = sigma_i s_i P_i(s_i).

        Newton on the convex increasing F(u) = u + sum_k log(e^u + delta_k) - log theta^2 in
        u = log s^2, from an upper bound of the root (monotone convergence, F' in [1, L])."""
        theta = np.asarray(theta, dtype=np.float64)
        gaps = self.a.gaps
        if self.depth == 1:
            return theta.copy()
        mag = np.abs(theta)
        with np.errstate(divide="ignore"):
            log_t2 = 2 * np.log(mag)
            upper = np.minimum(log_t2 / self.depth, log_t2 - np.sum(np.log(gaps), axis=0))
        u = np.where(mag > 0, upper, 0.0)
        gaps_b = gaps.reshape(gaps.shape[:1] + (1,) * (theta.ndim - 1) + gaps.shape[1:])
        for _ in range(200):
            e = np.exp(u)
            F = u + np.sum(np.log(e + gaps_b), axis=0) - log_t2
            dF = 1.0 + np.sum(e / (e + gaps_b), axis=0)
            step = np.where(mag > 0, F / dF, 0.0)
            u = u - step
            # F' in [1, L] and F'' bounded: a step below 1e-9 leaves an error far below rounding,
            # and the final Newton step in s restores full relative precision
            if np.all(np.abs(step) <= 1e-9):
                break
        s = np.where(mag > 0, np.exp(0.5 * u), 0.0)
        # one Newton step on s P(s) = |theta| in s itself: full relative precision
        factors = s[None] ** 2 + gaps_b
        P = np.sqrt(np.prod(factors, axis=0))
        slope = P * (1.0 + s ** 2 * np.sum(1.0 / factors, axis=0))
        s = np.where(mag > 0, s - (s * P - mag) / np.where(mag > 0, slope, 1.0), 0.0)
        return np.sign(theta) * self.a.sigma * s

    def theta_of_smallest(self, s: np.ndarray) -> np.ndarray:
        """theta = sigma s P(s)."""
        return self.a.sigma * self.magnitude(s)

    def magnitude(self, s: np.ndarray) -> np.ndarray:
        """s P(s) = s prod_k sqrt(s^2 + delta_k) (inf stays inf)."""
        s = np.asarray(s, dtype=np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            return s * np.sqrt(np.prod(s[None] ** 2 + self._gaps_like(s), axis=0))

    def _gaps_like(self, x):
        gaps = self.a.gaps
        return gaps.reshape(gaps.shape[:1] + (1,) * (np.ndim(x) - 1) + gaps.shape[1:])

    def layers(self, theta: np.ndarray) -> np.ndarray:
        """The layers (L, ..., d) that carry theta (..., d) on this seed's invariant manifold."""
        s = self.smallest_layer(theta)
        L = self.depth
        out = np.empty((L,) + np.shape(theta))
        cols = np.arange(self.u0.shape[1])
        signs = np.where(self.u0 < 0, -1.0, 1.0)
        u0_sq = self.u0 ** 2
        s0_sq = self.u0[self.a.j_star, cols] ** 2
        for j in range(L):
            gap = u0_sq[j] - s0_sq  # zero at j*
            out[j] = signs[j] * np.sqrt(s ** 2 + gap)
        # layer j* is s itself (with its sign, which the formula above cannot know)
        mask = np.arange(L)[:, None] == self.a.j_star[None, :]
        mask = mask.reshape((L,) + (1,) * (np.ndim(theta) - 1) + (-1,))
        return np.where(mask, s[None], out)

    # -- h, phi, Q -------------------------------------------------------------------------------
    def h(self, theta: np.ndarray) -> np.ndarray:
        """h_i(theta_i) = sum_j prod_{k != j} (u^k_i)^2 from theta alone (shape of theta)."""
        if self.depth == 1:
            return np.ones_like(np.asarray(theta, dtype=np.float64))
        s2 = self.smallest_layer(theta) ** 2
        factors = s2[None] + self._gaps_like(s2)
        P2 = np.prod(factors, axis=0)
        return P2 + s2 * np.sum(P2[None] / factors, axis=0) if self.depth > 1 else P2

    def psi(self, s: np.ndarray) -> np.ndarray:
        """psi_i(s) = int_0^s dr / prod_k sqrt(r^2 + delta^k_i), odd in s."""
        s = np.asarray(s, dtype=np.float64)
        a = np.abs(s)
        gaps = self.a.gaps
        L = self.depth
        if L == 1:
            out = a
        elif L == 2:
            out = np.arcsinh(a / np.sqrt(gaps[0]))
        elif L == 3:
            A2, C2 = gaps[0], gaps[1]
            out = special.ellipkinc(np.arctan(a / np.sqrt(A2)), 1.0 - A2 / C2) / np.sqrt(C2)
        elif self._equal_gaps:
            delta = gaps[0]
            p = (L - 1) / 2
            out = a * delta ** (-p) * special.hyp2f1(0.5, p, 1.5, -a ** 2 / delta)
        else:
            out = self._table_psi(a)
        return np.sign(s) * out

    def mirror_map(self, theta: np.ndarray) -> np.ndarray:
        """phi(theta) = grad Q(theta), with phi(0) = 0 (shape of theta)."""
        s = self.smallest_layer(theta)
        return np.sign(theta) * self.psi(np.abs(s))

    def potential(self, theta: np.ndarray) -> np.ndarray:
        """Q_i(theta_i) with Q_i(0) = 0, by the conjugate identity theta phi - Q = s^2 / 2."""
        theta = np.asarray(theta, dtype=np.float64)
        s = self.smallest_layer(theta)
        return theta * np.sign(theta) * self.psi(np.abs(s)) - s ** 2 / 2

    def bregman_divergence(self, theta: np.ndarray, theta_ref: np.ndarray) -> np.ndarray:
        """D_Q(theta, theta_ref) = sum_i Q_i(theta_i) - Q_i(ref_i) - phi_i(ref_i)(theta_i - ref_i)."""
        terms = (self.potential(theta) - self.potential(theta_ref)
                 - self.mirror_map(theta_ref) * (np.asarray(theta) - theta_ref))
        return np.sum(terms, axis=-1)

    # -- the inverse and the clock map -----------------------------------------------------------
    def inverse_psi(self, w: np.ndarray) -> np.ndarray:
        """s >= 0 with psi(s) = w for w >= 0 (inf where w >= b: finite-time blow-up)."""
        w = np.asarray(w, dtype=np.float64)
        gaps = self.a.gaps
        L = self.depth
        if L == 1:
            return w.copy()
        if L == 2:
            return np.sqrt(gaps[0]) * np.sinh(w)
        blown = w >= self.bound
        if L == 3:
            A2, C2 = gaps[0], gaps[1]
            ww = np.where(blown, 0.0, w)
            _, _, _, amplitude = special.ellipj(ww * np.sqrt(C2), 1.0 - A2 / C2)
            s = np.sqrt(A2) * np.tan(amplitude)
        else:
            s = self._table_inverse(np.where(blown, 0.0, w))
        return np.where(blown, np.inf, s)

    def inverse_mirror_map(self, v: np.ndarray) -> np.ndarray:
        """theta with phi(theta) = v; +-inf where |v_i| >= b_i (outside the dual range)."""
        v = np.asarray(v, dtype=np.float64)
        s = self.inverse_psi(np.abs(v))
        return np.sign(v) * np.where(np.isinf(s), np.inf, self.magnitude(s))

    def clock_map(self, tau: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """theta(tau) = F(tau) = phi^{-1}(phi(theta0) - tau) per coordinate.

        Returns
        -------
        theta : ndarray, shape of tau
            +-inf where the clock flow has blown up.
        blown_up : ndarray of bool
            tau_i outside (phi0_i - b_i, phi0_i + b_i): the layer ODE du^j/dtau = -prod_{k!=j} u^k
            leaves every bounded set before clock time tau_i (depth >= 3, either direction).
        """
        v = self.phi0 - np.asarray(tau, dtype=np.float64)
        blown = np.abs(v) >= self.bound
        return self.inverse_mirror_map(v), blown

    def dual_objective(self, v: np.ndarray) -> np.ndarray:
        """Q^*(v) summed over coordinates: sum_i s_i(v)^2 / 2 (inf outside the dual range)."""
        s = self.inverse_psi(np.abs(v))
        return 0.5 * np.sum(s ** 2, axis=-1)

    # -- the quadrature table (depth >= 4, unequal gaps) ---------------------------------------
    def _integrand(self, x: np.ndarray, cols=slice(None)) -> np.ndarray:
        """G(x) = d psi / dx at s = c sinh x, c^2 = delta_min: prod_{k >= 2} (c^2 sinh^2 x + delta_k)^(-1/2).

        ``x`` has shape (..., m) for the coordinates ``cols`` (default: all d)."""
        gaps = self.a.gaps[:, cols]
        sh2 = np.sinh(x) ** 2
        prod = gaps[0] * sh2 + gaps[1]
        for k in range(2, gaps.shape[0]):
            prod = prod * (gaps[0] * sh2 + gaps[k])
        return 1.0 / np.sqrt(prod)

    def _build_table(self):
        gaps = self.a.gaps
        L = self.depth
        c = np.sqrt(gaps[0])
        x_max = np.arcsinh(np.sqrt(TAIL_RATIO * gaps[-1] / gaps[0]))
        width = min(PANEL_WIDTH, 1.5 / (L - 2))
        M = int(np.ceil(x_max.max() / width))
        panel = x_max / M  # (d,), every coordinate gets M panels
        nodes, weights = _gauss_legendre(GL_NODES)
        x = (np.arange(M)[:, None, None] + nodes[None, :, None]) * panel[None, None, :]  # (M, N, d)
        integrand = np.stack([self._integrand(x[m]) for m in range(M)])
        pieces = np.einsum("mnd,n->md", integrand, weights) * panel  # (M, d)
        head = np.concatenate([np.zeros((1, pieces.shape[1])), np.cumsum(pieces, axis=0)])
        s_end = c * np.sinh(x_max)
        tail_end = s_end ** (2.0 - L) / (L - 2)
        tail = np.concatenate([np.cumsum(pieces[::-1], axis=0)[::-1], np.zeros((1, pieces.shape[1]))]) + tail_end
        self._table = {"M": M, "panel": panel, "x_max": x_max, "head": head, "tail": tail,
                       "b": head[-1] + tail_end, "c": c}

    def _panel_integral(self, lo, hi, cols=slice(None)):
        """int_lo^hi G(x) dx per coordinate (lo, hi inside one panel)."""
        nodes, weights = _gauss_legendre(GL_NODES)
        x = lo[None] + nodes[:, None] * (hi - lo)[None]
        return (hi - lo) * (weights @ self._integrand(x, cols))

    def _locate(self, x):
        t = self._table
        e = np.clip(np.floor(x / t["panel"]).astype(np.int64), 0, t["M"] - 1)
        return e

    def _table_psi(self, a):
        """psi(a) for a >= 0 of shape (d,) or (K, d) from the table."""
        a = np.asarray(a, dtype=np.float64)
        if a.ndim > 1:
            return np.stack([self._table_psi(row) for row in a.reshape(-1, a.shape[-1])]).reshape(a.shape)
        t = self._table
        x = np.arcsinh(a / t["c"])
        cols = np.arange(a.shape[0])
        beyond = x >= t["x_max"]
        xc = np.minimum(x, t["x_max"])
        e = self._locate(xc)
        lo = e * t["panel"]
        hi = (e + 1) * t["panel"]
        head = t["head"][e, cols] + self._panel_integral(lo, xc)
        with np.errstate(divide="ignore", over="ignore"):
            far = t["b"] - a ** (2.0 - self.depth) / (self.depth - 2)
        del hi
        return np.where(beyond, far, head)

    def _table_inverse(self, w):
        """s >= 0 with psi(s) = w, for 0 <= w < b, shape (d,) (or (K, d) row by row)."""
        w = np.asarray(w, dtype=np.float64)
        if w.ndim > 1:
            return np.stack([self._table_inverse(row) for row in w.reshape(-1, w.shape[-1])]).reshape(w.shape)
        t = self._table
        L = self.depth
        d = w.shape[0]
        cols = np.arange(d)
        head, tail, panel = t["head"], t["tail"], t["panel"]
        remaining = t["b"] - w  # the tail the point must leave
        # panel e with head[e] <= w < head[e+1]
        e = np.clip(np.sum(head[1:-1] <= w[None], axis=0), 0, t["M"] - 1)
        beyond = w >= head[-1]
        lo = e * panel
        hi = (e + 1) * panel
        # Newton in x inside the panel, safeguarded by bisection
        use_tail = w > 0.5 * t["b"]
        frac = np.where(head[e + 1, cols] > head[e, cols],
                        (w - head[e, cols]) / np.maximum(head[e + 1, cols] - head[e, cols], 1e-300), 0.5)
        x = lo + np.clip(frac, 0.0, 1.0) * panel
        a_lo, a_hi = lo.copy(), hi.copy()
        head_e, tail_e = head[e, cols], tail[e + 1, cols]
        todo = np.flatnonzero(~beyond & (w > 0))
        for _ in range(100):
            if todo.size == 0:
                break
            xt, lt, ht = x[todo], lo[todo], hi[todo]
            g = self._integrand(xt, todo)
            up = head_e[todo] + self._panel_integral(lt, xt, todo)
            down = tail_e[todo] + self._panel_integral(xt, ht, todo)
            # residual of the better-conditioned equation (head for small w, tail near b),
            # increasing in x either way
            res = np.where(use_tail[todo], remaining[todo] - down, up - w[todo])
            a_lo[todo] = np.where(res < 0, xt, a_lo[todo])
            a_hi[todo] = np.where(res > 0, xt, a_hi[todo])
            x_new = xt - res / g
            bad = ~((x_new > a_lo[todo]) & (x_new < a_hi[todo]))
            x_new = np.where(bad, 0.5 * (a_lo[todo] + a_hi[todo]), x_new)
            # quadratic convergence: once a Newton step is below 1e-10 panel widths the next
            # error is below rounding
            done = (((np.abs(x_new - xt) <= 1e-10 * panel[todo]) & ~bad)
                    | (a_hi[todo] - a_lo[todo] <= 1e-15 * np.maximum(a_hi[todo], panel[todo])))
            x[todo] = x_new
            todo = todo[~done]
        s = t["c"] * np.sinh(x)
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            s_far = ((L - 2) * remaining) ** (-1.0 / (L - 2))
        return np.where(beyond, s_far, np.where(w <= 0, 0.0, s))


def _all_but_one(u: np.ndarray) -> np.ndarray:
    """prod_{k != j} u^k for every j by prefix/suffix products (no division: u^j may be 0)."""
    L = u.shape[0]
    prefix = np.ones_like(u)
    suffix = np.ones_like(u)
    for j in range(1, L):
        prefix[j] = prefix[j - 1] * u[j - 1]
        suffix[L - 1 - j] = suffix[L - j] * u[L - j]
    return prefix * suffix


def clock_flow(u0: np.ndarray, tau: np.ndarray, rtol: float = 1e-11, atol: float = 1e-13,
               max_steps: int = 100_000, blow_up: float = 1e100) -> tuple[np.ndarray, np.ndarray]:
    """theta(tau) by integrating the clock flow du^j/dtau = -prod_{k != j} u^k, any depth.

    The route that needs no mirror map: the package's Dormand–Prince tableau and step-size
    controller (:mod:`ddln_fast.controller`), vectorized over coordinates with one step size
    per coordinate, each coordinate integrated to its own clock time tau_i (of either sign). A
    coordinate whose layers exceed ``blow_up``, whose error is not finite or whose step size
    collapses (stalled) before reaching tau_i has blown up (finite-time blow-up of depth >= 3,
    both directions).

    Parameters
    ----------
    u0 : ndarray of shape (L, d)
    tau : ndarray of shape (d,)
    max_steps : int
        Attempted steps per coordinate; a coordinate that needs more raises RuntimeError.

    Returns
    -------
    theta : ndarray of shape (d,)
        +-inf where blown up.
    blown_up : ndarray of shape (d,), bool
    """
    from . import controller
    from .tableaus import DOPRI5

    A, B, E = DOPRI5.A, DOPRI5.B, DOPRI5.E
    u = np.array(u0, dtype=np.float64)
    L, d = u.shape
    tau = np.broadcast_to(np.asarray(tau, dtype=np.float64), (d,))
    direction = np.sign(tau)
    target = np.abs(tau)  # each coordinate runs forward in |tau|, its field times sign(tau)

    def field(v, sign):
        return -sign * _all_but_one(v)

    def rms(v, scale):
        return np.sqrt(np.mean((v / scale) ** 2, axis=0))

    state = controller.SeedState.fresh(d, 0.0)
    trial = controller.Trial.empty(d)
    control = controller.control_for(DOPRI5.error_order)
    live = np.ones(d, dtype=np.uint8)
    no_loss = np.full(d, np.nan)
    blown = np.zeros(d, dtype=bool)
    derivative = field(u, direction)  # f at the current layers (FSAL)
    active = np.flatnonzero(target > 0)
    if active.size:
        ua, fa, sa = u[:, active], derivative[:, active], direction[active]
        scale = atol + rtol * np.abs(ua)
        d1 = rms(fa, scale)
        h0 = controller.first_trial_step(rms(ua, scale), d1, target[active])
        d2 = rms(field(ua + h0 * fa, sa) - fa, scale) / h0
        state.h[active] = controller.starting_step(h0, d1, d2, DOPRI5.error_order, target[active])
    K = np.zeros((DOPRI5.stages, L, d))
    while active.size:
        controller.propose_steps(active, target, state, trial)
        ua, sa, step = u[:, active], direction[active], trial.h[active]
        Ka = K[:, :, : active.size]
        Ka[0] = derivative[:, active]
        for i in range(1, DOPRI5.stages):
            Ka[i] = field(ua + step * np.tensordot(A[i, :i], Ka[:i], axes=1), sa)
        u_new = ua + step * np.tensordot(B, Ka, axes=1)
        with np.errstate(over="ignore", invalid="ignore"):
            scale = atol + rtol * np.maximum(np.abs(ua), np.abs(u_new))
            norm = rms(step * np.tensordot(E, Ka, axes=1), scale)
        controller.control_steps(active, live, norm, no_loss, target, state, trial, control,
                                 DOPRI5.stages - 1, 0.0, max_steps)
        ok = trial.accepted[active] == 1
        u[:, active[ok]] = u_new[:, ok]
        derivative[:, active[ok]] = Ka[-1][:, ok]
        status = state.status[active]
        if np.any(status == controller.MAX_STEPS):
            raise RuntimeError(f"clock_flow: {int(np.sum(status == controller.MAX_STEPS))} coordinates "
                               f"need more than max_steps = {max_steps} steps")
        exploded = (np.max(np.abs(u[:, active]), axis=0) > blow_up) | ~np.isfinite(norm)
        exploded |= status == controller.STALLED
        blown[active[exploded]] = True
        going = (status == controller.RUNNING) & ~exploded & (state.t[active] < target[active])
        active = active[going]
    theta = np.prod(u, axis=0)
    theta = np.where(blown, np.sign(theta) * np.inf, theta)
    return theta, blown


# ---------------------------------------------------------------------------------------------
# Reference integrals (1-D quadrature with scipy; slow, for checks and single coordinates)
# ---------------------------------------------------------------------------------------------
def psi_quadrature(s: float, gaps: np.ndarray) -> float:
    """psi(s) = int_0^s dr / prod_k sqrt(r^2 + delta_k) by scipy.integrate.quad (s may be inf)."""
    from scipy.integrate import quad

    gaps = np.asarray(gaps, dtype=np.float64)
    f = lambda r: 1.0 / np.prod(np.sqrt(r * r + gaps))  # noqa: E731
    a = abs(s)
    # split at the scales sqrt(delta_k) so quad sees each transition of the integrand
    edges = [0.0] + sorted(p for p in set(np.sqrt(gaps)) if p < a) + [a]
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        total += quad(f, lo, hi, limit=500, epsabs=0, epsrel=1e-13)[0]
    return float(np.sign(s) * total)


# ---------------------------------------------------------------------------------------------
# Interpolators and the implicit-bias prediction
# ---------------------------------------------------------------------------------------------
@dataclass
class Constraints:
    """{theta : A theta = c} = argmin f, with A of orthonormal rows spanning range(X^T).

    ``projected`` is True when X has rank < n (no interpolator in general): the set is then the
    set of least-squares minimizers, not {X theta = y}.
    """

    A: np.ndarray  # (r, d)
    c: np.ndarray  # (r,)
    rank: int
    n: int
    f_star: float
    projected: bool


def constraints(X: np.ndarray, y: np.ndarray, rcond: float = 1e-12) -> Constraints:
    """Orthonormal description of argmin f for f = ||X theta - y||^2 / (2n) by a thin SVD."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = X.shape[0]
    U, sv, Vt = np.linalg.svd(X, full_matrices=False)
    r = int(np.sum(sv > rcond * sv[0])) if sv.size and sv[0] > 0 else 0
    coef = U[:, :r].T @ y
    residual = y - U[:, :r] @ coef
    f_star = float(residual @ residual / (2 * n))
    return Constraints(Vt[:r], coef / sv[:r], r, n, f_star, r < n)


def min_l2_interpolator(X, y) -> np.ndarray:
    """argmin ||theta||_2 over argmin f (pseudo-inverse)."""
    return np.linalg.lstsq(np.asarray(X, float), np.asarray(y, float), rcond=None)[0]


def weighted_l1_interpolator(X, y, w_plus, w_minus=None) -> np.ndarray:
    """argmin sum_i w+_i max(theta_i, 0) + w-_i max(-theta_i, 0) over argmin f (an LP, HiGHS).

    theta = theta+ - theta-, both >= 0, on X theta = y when X has full row rank, else on the
    orthonormal description of argmin f. (Column generation from the predicted support was
    tried: 17 rounds and 29 s against 6-16 s for the full LP with presolve at d = 10^4, n = 200.)
    """
    from scipy.optimize import linprog

    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    cons = constraints(X, y)
    A, c = (X, y) if not cons.projected else (cons.A, cons.c)
    d = A.shape[1]
    w_plus = np.broadcast_to(np.asarray(w_plus, float), (d,))
    w_minus = w_plus if w_minus is None else np.broadcast_to(np.asarray(w_minus, float), (d,))
    # presolve off: on a dense X it only costs (d = 10^4, n = 200: 1.4 s without, 5.9 s with)
    res = linprog(np.concatenate([w_plus, w_minus]), A_eq=np.hstack([A, -A]), b_eq=c,
                  bounds=(0, None), method="highs", options={"presolve": False})
    if res.status != 0:
        raise RuntimeError(f"the l1 linear program failed: {res.message}")
    return res.x[:d] - res.x[d:]


def min_l1_interpolator(X, y) -> np.ndarray:
    """argmin ||theta||_1 over argmin f (an LP, scipy's HiGHS)."""
    return weighted_l1_interpolator(X, y, 1.0)


def small_init_weights(geometry: MirrorGeometry) -> tuple[np.ndarray, np.ndarray]:
    """Weights of the small-scale limit (THEORY.md): b_i - sign(theta_i) phi_i(theta_0,i), for
    theta_i > 0 (w+) and theta_i < 0 (w-)."""
    return geometry.bound - geometry.phi0, geometry.bound + geometry.phi0


@dataclass
class Limit:
    """The Bregman projection of one seed's initialization onto argmin f.

    Attributes
    ----------
    theta : ndarray of shape (d,)
    mu : ndarray of shape (r,)
        Dual variable: phi(theta) = phi(theta0) - A^T mu.
    residual : float
        ||A theta - c|| / max(1, ||c||) at the end.
    iterations : int
    projected : bool
        X has rank < n: the limit is the projection onto the least-squares minimizers.
    """

    theta: np.ndarray
    mu: np.ndarray
    residual: float
    iterations: int
    projected: bool
    rank: int


def bregman_projection(geometry: MirrorGeometry, cons: Constraints, tol: float = 1e-12,
                       max_iter: int = 500) -> Limit:
    """theta_inf = argmin {D_Q(theta, theta0) : A theta = c} by damped Newton on the dual.

    Minimizes the convex dual Psi(mu) = sum_i Q_i^*(phi0_i - (A^T mu)_i) + mu . c, whose gradient
    is c - A theta(mu) and Hessian A diag(h(theta)) A^T; Armijo backtracking also rejects steps
    that leave the dual range |phi0 - A^T mu| < b (the clock flow would blow up there).
    """
    A, c = cons.A, cons.c
    scale = max(1.0, float(np.linalg.norm(c)))
    mu = np.zeros(A.shape[0])

    def evaluate(mu):
        with np.errstate(over="ignore", invalid="ignore"):
            return _evaluate(mu)

    def _evaluate(mu):
        v = geometry.phi0 - A.T @ mu
        if np.any(np.abs(v) >= geometry.bound):
            return np.inf, None
        s = geometry.inverse_psi(np.abs(v))
        theta = np.sign(v) * geometry.magnitude(s)
        return 0.5 * float(s @ s) + float(mu @ c), theta

    psi_val, theta = evaluate(mu)
    best = (np.inf, theta, mu)
    stalled = 0
    progress = True  # the last step decreased the dual by more than its rounding
    it = 0
    for it in range(1, max_iter + 1):
        grad = c - A @ theta
        residual = float(np.linalg.norm(grad)) / scale
        if residual < 0.5 * best[0] or progress:
            stalled = 0
        else:
            stalled += 1
        if residual < best[0]:
            best = (residual, theta, mu)
        # stop at the tolerance, or at the floor rounding sets: when the limit sits close to
        # the bound of the dual range (small alpha, depth >= 3), phi ~ b is huge and b - |phi|
        # carries only eps * b of absolute precision
        if residual <= tol or stalled >= 6:
            break
        step = _newton_step(A, geometry.h(theta), grad)
        slope = float(grad @ step)
        if not slope < 0:  # rounding beat the Newton direction: steepest descent on Psi
            step = -grad
            slope = -float(grad @ grad)
        t = 1.0
        accepted = False
        for _ in range(80):
            trial_val, trial_theta = evaluate(mu + t * step)
            if np.isfinite(trial_val):
                # Armijo on the dual; where its decrease is below the rounding of Psi, the
                # residual norm decides (Newton on grad Psi = 0)
                if trial_val <= psi_val + 1e-4 * t * slope:
                    accepted = True
                elif trial_val <= psi_val + 1e-14 * abs(psi_val):
                    trial_res = float(np.linalg.norm(c - A @ trial_theta)) / scale
                    accepted = trial_res < (1 - 1e-4 * t) * residual
                if accepted:
                    break
            t *= 0.5
        if not accepted:
            break
        mu = mu + t * step
        progress = psi_val - trial_val > 1e-12 * max(1.0, abs(psi_val))
        psi_val, theta = trial_val, trial_theta
    grad = c - A @ theta
    residual = float(np.linalg.norm(grad)) / scale
    if best[0] < residual:
        residual, theta, mu = best
    return Limit(theta, mu, residual, it, cons.projected, cons.rank)


class PredictionWarning(UserWarning):
    """The dual Newton iteration of the implicit-bias limit stopped above its tolerance."""


def warn_if_not_converged(limit: Limit, seed: int, tol: float) -> None:
    """Warn (one line, naming the seed) when ``limit.residual`` is above ``tol``: the predicted
    theta_inf then satisfies the constraints only to that relative residual."""
    if not limit.residual <= tol:
        import warnings

        warnings.warn(f"seed {seed}: the implicit-bias limit is not at tolerance: dual residual "
                      f"{limit.residual:.2g} > {tol:.2g} after {limit.iterations} Newton iterations "
                      f"(rounding near the edge of the dual range, e.g. at a tiny alpha); theta_inf "
                      f"is accurate to about that relative residual", PredictionWarning, stacklevel=3)


def _newton_step(A: np.ndarray, H: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """Solve (A diag(H) A^T) step = -grad through a QR of diag(sqrt H) A^T: h spans up to 17
    decades for small alpha, and squaring that condition number in the normal matrix made the
    Newton direction point uphill (measured at depth 5, alpha 0.01)."""
    from scipy.linalg import solve_triangular

    B = np.sqrt(H)[:, None] * A.T
    R = np.linalg.qr(B, mode="r")
    try:
        z = solve_triangular(R, -grad, trans="T", check_finite=False)
        return solve_triangular(R, z, check_finite=False)
    except (np.linalg.LinAlgError, ValueError):
        return -np.linalg.lstsq(B.T @ B, grad, rcond=None)[0]


@dataclass
class Prediction:
    """``predict`` for every seed of a config (arrays have a leading seed axis S)."""

    theta: np.ndarray          # (S, d)
    residual: np.ndarray       # (S,)
    iterations: np.ndarray     # (S,)
    projected: bool
    rank: int
    n: int
    min_l1: np.ndarray | None = None   # (S, d)
    min_l2: np.ndarray | None = None   # (S, d)
    seconds: float = 0.0               # the Bregman projections (and the SVDs of X)
    interpolator_seconds: float = 0.0  # the minimum-l1 LPs and minimum-l2 solutions

    @property
    def message(self) -> str:
        if self.projected:
            return (f"X has rank {self.rank} < n = {self.n}: no exact interpolator in general; "
                    f"predicted the Bregman projection onto the least-squares minimizers (argmin f)")
        return "Bregman projection of the initialization onto {X theta = y}"


def predict_arrays(X: np.ndarray, y: np.ndarray, u0: np.ndarray, tol: float = 1e-12,
                   interpolators: bool = False) -> Prediction:
    """The implicit-bias limit of every seed from arrays.

    Parameters
    ----------
    X : ndarray of shape (n, d) or (S, n, d)
    y : ndarray of shape (n,) or (S, n)
    u0 : ndarray of shape (S, L, d)
    interpolators : bool
        Also compute the minimum-l1 (LP) and minimum-l2 interpolators.
    """
    with serial_blas():
        return _predict_arrays(X, y, u0, tol, interpolators)


def _predict_arrays(X, y, u0, tol, interpolators):
    import time

    start = time.perf_counter()
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    u0 = np.asarray(u0, dtype=np.float64)
    S = u0.shape[0]
    per_seed = X.ndim == 3
    for s in range(S):
        require_assumption_a(u0[s], what=f"the implicit-bias limit of seed {s}")
    shared = None if per_seed else constraints(X, y)
    thetas, residuals, iterations, l1s, l2s = [], [], [], [], []
    projected, rank = False, 0
    for s in range(S):
        cons = constraints(X[s], y[s]) if per_seed else shared
        limit = bregman_projection(MirrorGeometry.from_layers(u0[s]), cons, tol)
        warn_if_not_converged(limit, s, tol)
        thetas.append(limit.theta)
        residuals.append(limit.residual)
        iterations.append(limit.iterations)
        projected |= limit.projected
        rank = cons.rank
    seconds = time.perf_counter() - start
    if interpolators:
        for s in range(S if per_seed else 1):
            Xs, ys = (X[s], y[s]) if per_seed else (X, y)
            l1s.append(min_l1_interpolator(Xs, ys))
            l2s.append(min_l2_interpolator(Xs, ys))
        if not per_seed:
            l1s, l2s = l1s * S, l2s * S
    return Prediction(np.array(thetas), np.array(residuals), np.array(iterations), projected,
                      rank, X.shape[-2], np.array(l1s) if interpolators else None,
                      np.array(l2s) if interpolators else None, seconds,
                      time.perf_counter() - start - seconds)


def predict(config, interpolators: bool = False, tol: float = 1e-12) -> Prediction:
    """:func:`predict_arrays` on the data and initialization a config describes."""
    from .init import initial_layers
    from .problem import make_problem

    problem = make_problem(config)
    u0 = initial_layers(config, problem.d)
    return predict_arrays(problem.X, problem.y, u0, tol, interpolators)


def predict_limit(config) -> np.ndarray:
    """Where gradient flow on the layers ends, without training: theta_inf of shape (S, d).

    The Bregman projection of each seed's initialization onto {X theta = y} (onto argmin f when
    X has rank < n), under assumption (A) (else InputError)."""
    return predict(config).theta


# ---------------------------------------------------------------------------------------------
# Convergence bounds
# ---------------------------------------------------------------------------------------------
def pl_constant(X: np.ndarray) -> float:
    """mu = lambda_min^+(X X^T) / n: the PL constant of f = ||X theta - y||^2 / (2n) on the row
    space (the smallest nonzero eigenvalue when X is rank deficient)."""
    X = np.asarray(X, dtype=np.float64)
    sv = np.linalg.svd(X, compute_uv=False)
    sv = sv[sv > 1e-12 * sv[0]]
    return float(sv[-1] ** 2 / X.shape[0])


def c_a(geometry: MirrorGeometry) -> float:
    """c_A = min_i h_i(0) = min_i prod_k delta^k_i."""
    return float(np.min(np.prod(geometry.a.gaps, axis=0))) if geometry.depth > 1 else 1.0


def pl_bound(t, f0_gap, mu, rate_integral):
    """(f(theta_0) - f*) exp(-2 mu int_0^t min_i h_i): ``rate_integral`` is that integral."""
    return f0_gap * np.exp(-2.0 * mu * np.asarray(rate_integral))


def sublinear_bound(t, bregman_gap):
    """D_Q(theta*, theta_0) / t (inf at t = 0)."""
    t = np.asarray(t, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(t > 0, bregman_gap / np.where(t > 0, t, 1.0), np.inf)
