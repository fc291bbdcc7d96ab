"""The mirror geometry of the layer flow, read off the exact clock map.

Along the layer gradient flow each coordinate i follows one curve in its own clock
s_i(t) = int_0^t g_i (Labarrière et al., arXiv:2412.16765): theta_i = F_i(s_i), with F, h = -F'
and G(s) = int_0^s F given exactly for every parametrization and initialization by
:class:`ddln_fast.clockmap.ClockMap`. Since s(t) = X^T int r / n lies in range(X^T), the flow is a
mirror flow whose geometry is the clock map's inverse s(theta):

    phi(theta) - phi(theta0) = -s(theta)                     (the mirror map),
    D_Q(theta, theta0) = G(s(theta)) - theta s(theta)          (the Bregman divergence),
    h(theta) = h(s(theta)),  Q'' = 1 / h.

:class:`Geometry` is that view, per seed and coordinate; the implicit-bias limit built on it is
in :mod:`ddln_fast.prediction`, the convergence bounds in :mod:`ddln_fast.bounds`, Woodworth's
closed forms of phi and Q (depth 2, and the standard init u = v = alpha) in
:mod:`ddln_fast.potentials`. The product parametrization needs assumption (A) for a mirror
geometry on all of R (else the sign trap: theta_i cannot change sign); :func:`assumption_a`
checks it. :func:`clock_flow` integrates the clock ODE itself, a route that needs no clock map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .parametrization import Parametrization


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
# The mirror geometry on the clock map
# ---------------------------------------------------------------------------------------------
class Geometry:
    """The mirror geometry of the initializations of S seeds (a thin view of their clock map).

    Every method takes points of shape (m, d) (or (d,)) and ``seed``: ``None`` for rows 0..m-1
    (one row per seed), an int for one seed (every row), or an array of m seed indices.

    Normalization: phi(theta0) = 0 and Q(theta0) = 0 (so Q(theta) = D_Q(theta, theta0)); the
    closed forms of :mod:`ddln_fast.potentials` use phi(0) = Q(0) = 0 instead, which differs by
    an affine function (the same Bregman divergence).

    Attributes
    ----------
    clock_map : ClockMap
    parametrization : Parametrization
    theta0 : ndarray of shape (S, d)
    blow_up : tuple of two ndarrays of shape (S, d)
        The clocks (lower, upper) beyond which F is infinite (-inf / inf where none): the range
        of -phi, i.e. phi(theta) - phi(theta0) lies in (-upper, -lower).
    """

    def __init__(self, clock_map, parametrization: Parametrization):
        self.clock_map = clock_map
        self.parametrization = parametrization
        self.seeds, self.dim = clock_map.seeds, clock_map.dim
        self.theta0 = clock_map.theta0
        self.blow_up = clock_map.blow_up

    @classmethod
    def from_layers(cls, u0, parametrization: Parametrization | None = None, log_scale=None) -> "Geometry":
        """The geometry of initial layers ``u0`` of shape (S, P, d) (or (P, d): one seed).

        ``parametrization`` defaults to the product of the P layers; ``log_scale``: see
        :meth:`ddln_fast.clockmap.ClockMap.from_layers`."""
        from .clockmap import ClockMap

        u0 = np.asarray(u0, dtype=np.float64)
        if u0.ndim == 2:
            u0 = u0[None]
        param = parametrization or Parametrization.of_layers("product", u0.shape[1])
        power = param.power if param.name == "power" else None
        return cls(ClockMap.from_layers(u0, param.name, power, log_scale), param)

    # -- rows ------------------------------------------------------------------------------------
    @staticmethod
    def _points(x, seed):
        """(x as a C-contiguous (m, d) array, seed rows (m,), whether x was one point (d,))."""
        x = np.asarray(x, dtype=np.float64)
        single = x.ndim == 1
        x = np.ascontiguousarray(np.atleast_2d(x))
        if seed is None:
            rows = np.arange(x.shape[0])
        elif np.ndim(seed) == 0:
            rows = np.full(x.shape[0], int(seed))
        else:
            rows = np.asarray(seed, dtype=np.int64)
        return x, rows, single

    # -- the clock and what it gives -------------------------------------------------------------
    def clock(self, theta, seed=None) -> np.ndarray:
        """s(theta), the clock at which F(s) = theta (nan where theta is out of reach: the
        sign trap of the product, a frozen coordinate)."""
        theta, rows, single = self._points(theta, seed)
        out = self.clock_map.clock_of(theta, rows=rows)
        return out[0] if single else out

    def evaluate(self, s, seed=None, G=False) -> tuple:
        """(theta, h) = (F(s), -F'(s)), and G(s) = int_0^s F with ``G=True``, at clocks s."""
        s, rows, single = self._points(s, seed)
        out = self.clock_map.evaluate(s, G=G, rows=rows)
        return tuple(a[0] for a in out) if single else out

    def mirror_map(self, theta, seed=None) -> np.ndarray:
        """phi(theta) - phi(theta0) = -s(theta)."""
        return -self.clock(theta, seed)

    def potential(self, theta, seed=None) -> np.ndarray:
        """Q(theta) per coordinate, normalized by Q(theta0) = phi(theta0) = 0: G(s) - theta s at
        s = s(theta) (= D_Q(theta, theta0) coordinate by coordinate)."""
        s = self.clock(theta, seed)
        G = self.evaluate(s, seed, G=True)[2]
        return G - np.asarray(theta) * s

    def bregman_divergence(self, theta, reference, seed=None) -> np.ndarray:
        """D_Q(theta, reference) = sum_i G(s_i) - G(s'_i) - theta_i (s_i - s'_i) with s = s(theta),
        s' = s(reference), summed over the last axis."""
        reference = np.broadcast_to(reference, np.shape(theta))
        s, s_ref = self.clock(theta, seed), self.clock(reference, seed)
        G, G_ref = self.evaluate(s, seed, G=True)[2], self.evaluate(s_ref, seed, G=True)[2]
        return np.sum(G - G_ref - np.asarray(theta) * (s - s_ref), axis=-1)

    def h(self, theta, seed=None) -> np.ndarray:
        """h(theta) = -F'(s(theta)): d theta / dt = -h(theta) g(theta) along the flow."""
        return self.evaluate(self.clock(theta, seed), seed)[1]

    def layers(self, theta, seed=None) -> np.ndarray:
        """The layers, (m, P, d) (or (P, d)), that carry theta on the invariant manifold of the
        seeds' initializations."""
        s, rows, single = self._points(self.clock(theta, seed), seed)
        out = self.clock_map.layers(s, rows=rows)
        return out[0] if single else out

    # -- what the small-scale limit and the bounds need ------------------------------------------
    def small_init_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """Weights (w+, w-), each (S, d), of the weighted-l1 problem the limit approaches at small
        scale where the clock map blows up (product depth >= 3, power D > 2): theta_i > 0 needs
        s_i near its lower blow-up clock, theta_i < 0 near the upper one, so w+ = -lower and
        w- = upper (inf where there is no blow-up)."""
        lower, upper = self.blow_up
        return -lower, upper.copy()

    def min_h(self, iterations: int = 200) -> np.ndarray:
        """The smallest h_i over all clocks, shape (S, d): a lower bound of h along any trajectory.

        h is convex in the clock (a product half: with r = -2 G(s) every (u^j)^2 is a_j + r, h is
        P'(r) for P(r) = prod_j (a_j + r) and h'' = 2 h P'' + 4 theta^2 P''' >= 0; a power half is
        a negative power of a linear function of s), so its minimum is bracketed by doubling from
        s = 0 (inside the blow-up clocks) and found by golden-section search. Product under (A):
        attained at theta = 0, where h = prod_k delta_k."""
        S, d = self.seeds, self.dim
        lower, upper = (b.reshape(-1) for b in self.blow_up)

        def h_at(s):
            with np.errstate(invalid="ignore", over="ignore"):
                return self.clock_map.evaluate(np.ascontiguousarray(s.reshape(S, d)))[1].reshape(-1)

        h0 = h_at(np.zeros(S * d))
        w = np.ones(S * d)
        for _ in range(2100):  # 2^2100 > any float: the bracket stops at the blow-up or at inf
            a, b = np.maximum(-w, lower), np.minimum(w, upper)
            grow = ((h_at(a) < h0) & (a > lower)) | ((h_at(b) < h0) & (b < upper))
            grow &= w < 1e300
            if not grow.any():
                break
            w = np.where(grow, 2.0 * w, w)
        a, b = np.maximum(-w, lower), np.minimum(w, upper)
        ratio = (np.sqrt(5.0) - 1.0) / 2.0
        x1, x2 = b - ratio * (b - a), a + ratio * (b - a)
        f1, f2 = h_at(x1), h_at(x2)
        for _ in range(iterations):
            left = f1 <= f2  # the minimum lies in [a, x2]
            a, b = np.where(left, a, x1), np.where(left, x2, b)
            x1, x2 = (np.where(left, b - ratio * (b - a), x2), np.where(left, x1, a + ratio * (b - a)))
            f_new = h_at(np.where(left, x1, x2))
            f1, f2 = np.where(left, f_new, f2), np.where(left, f1, f_new)
            if np.all(b - a <= 1e-14 * np.maximum(np.abs(a) + np.abs(b), 1e-300)):
                break
        return np.minimum(np.minimum(f1, f2), h0).reshape(S, d)


# ---------------------------------------------------------------------------------------------
# The clock flow by direct integration (an independent route to F)
# ---------------------------------------------------------------------------------------------
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
