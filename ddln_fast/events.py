"""Events of a run: when each coordinate activates, and when the loss falls below each decade.

Saddle-to-saddle dynamics at small scales (Pesme & Flammarion 2023; Labarrière et al.,
arXiv:2412.16765) are long plateaus separated by fast jumps in which one coordinate after the
other leaves the neighbourhood of zero. Two kinds of events measure that picture:

- **activation**: for seed s and coordinate i, the first flow time at which |theta_i| reaches
  the seed's activation level. Since theta_i = F_i(s_i) with F_i decreasing, |theta_i| >= level
  exactly when the clock s_i leaves the interval (c_up_i, c_down_i) with F_i(c_up_i) = +level
  and F_i(c_down_i) = -level, computed once per run. On each step the clock of every coordinate
  is a cubic in time (the Radau collocation polynomial mapped by X^T / n), so the crossing is
  located on it to the last bit of its argument: the event is as accurate as the dense output,
  i.e. the solver tolerance.
- **loss decades**: the first time f(theta(t)) < 10^k for k = 10, 9, ..., -30, located by a
  root search on the dense output (each evaluation: F at the interpolated clocks and one product
  with X).

The activation level is ``integrator.activation_level`` when it is positive; by default (0) it
is ``ACTIVATION_FRACTION`` times max_i |theta_inf,i|, the largest coordinate of the seed's
predicted limit (the Bregman projection of its initialization onto the interpolators); where
there is no prediction (an initialization violating assumption (A)) or it does not converge
(very small scales), of the minimum-l2 interpolator. A coordinate already at or above the level at t = 0 activates at 0.

In the run file (method ``dual``): ``/events/activation_level`` (S,), ``/events/activation_time``
(S, d) (NaN: not activated), ``/events/loss_decades`` (D,) (the exponents k) and
``/events/loss_decade_time`` (S, D) (NaN: not reached; 0: below from the start), rewritten at
every checkpoint. Readers keep only the events up to each seed's time at the last committed
checkpoint (:func:`read_events`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from . import threads
from .clock_series import two_sum
from .kernels import STRICT_JIT_OPTIONS, serial_and_parallel
from .radau import dense_coefficients

#: Default activation level: this fraction of max_i |theta_inf,i| of the seed.
ACTIVATION_FRACTION = 0.1
#: The predicted limit sets the default level only if its dual residual is below this.
PREDICTION_RESIDUAL = 1e-8
#: Exponents k of the loss decades 10^k whose first crossing is recorded.
LOSS_DECADES = np.arange(10, -31, -1, dtype=np.int64)
_DECADE_LEVELS = 10.0 ** LOSS_DECADES.astype(np.float64)
_BISECTIONS = 80
#: A loss crossing is found once log(f / level) along the dense output is this small: far below
#: the accuracy of the dense output itself (the solver tolerance).
LOSS_CROSSING_TOL = 1e-12


def _activation_crossings(s_old, coef, seeds, t_old, h, up, down, times):
    """First crossing of c_up (from above) or c_down (from below) by the cubic clock
    p(x) = s_old + coef[0] x + coef[1] x^2 + coef[2] x^3 on x in [0, 1], for every coordinate of
    every row not yet activated; times[seed, i] = t_old + x h.

    s_old : (R, d); coef : (R, 3, d); up, down, times : (S, d).
    """
    R, d = s_old.shape
    for item in prange(R * d):
        r = item // d
        i = item - r * d
        seed = seeds[r]
        if times[seed, i] == times[seed, i]:  # already activated (not NaN)
            continue
        lo_clock, hi_clock = up[seed, i], down[seed, i]
        p0, p1, p2, p3 = s_old[r, i], coef[r, 0, i], coef[r, 1, i], coef[r, 2, i]
        reach = abs(p1) + abs(p2) + abs(p3)  # |p(x) - p0| <= reach on [0, 1]
        if lo_clock < p0 - reach and p0 + reach < hi_clock:
            continue
        # monotone pieces of p on [0, 1], split at the roots of p' = p1 + 2 p2 x + 3 p3 x^2
        cuts = np.empty(4)
        count = 0
        cuts[count] = 0.0
        count += 1
        a, b, c = 3.0 * p3, 2.0 * p2, p1
        if a != 0.0:
            disc = b * b - 4.0 * a * c
            if disc > 0:
                q = -0.5 * (b + np.copysign(np.sqrt(disc), b))
                r1 = q / a
                r2 = c / q if q != 0 else r1
                first, second = min(r1, r2), max(r1, r2)
                if 0.0 < first < 1.0:
                    cuts[count] = first
                    count += 1
                if 0.0 < second < 1.0 and second != first:
                    cuts[count] = second
                    count += 1
        elif b != 0.0:
            root = -c / b
            if 0.0 < root < 1.0:
                cuts[count] = root
                count += 1
        cuts[count] = 1.0
        count += 1
        for j in range(count - 1):
            xa, xb = cuts[j], cuts[j + 1]
            vb = p0 + xb * (p1 + xb * (p2 + xb * p3))
            if vb <= lo_clock:
                target = lo_clock
            elif vb >= hi_clock:
                target = hi_clock
            else:
                continue
            va = p0 + xa * (p1 + xa * (p2 + xa * p3))
            rising = vb > va
            for _ in range(_BISECTIONS):
                xm = 0.5 * (xa + xb)
                if xm <= xa or xm >= xb:
                    break
                vm = p0 + xm * (p1 + xm * (p2 + xm * p3))
                if (vm >= target) == rising:
                    xb = xm
                else:
                    xa = xm
            times[seed, i] = t_old[r] + xb * h[r]
            break


ACTIVATION_CROSSINGS_KERNELS = serial_and_parallel(_activation_crossings)


@njit(**STRICT_JIT_OPTIONS)
def _decades_crossed(loss_old, loss_new, decade_time, seeds, crossed):
    """crossed[r, k]: the loss of row r went from above 10^LOSS_DECADES[k] (or at it) to below it
    in the step, and the seed had not crossed it before; returns whether each row crossed any."""
    rows, levels = crossed.shape
    any_crossed = np.zeros(rows, dtype=np.bool_)
    for r in range(rows):
        seed = seeds[r]
        for k in range(levels):
            level = _DECADE_LEVELS[k]
            hit = loss_new[r] < level and level <= loss_old[r] and decade_time[seed, k] != decade_time[seed, k]
            crossed[r, k] = hit
            any_crossed[r] |= hit
    return any_crossed


class EventRecorder:
    """Activation and loss-decade events of every seed, found step by step (module docstring).

    Parameters
    ----------
    clock : clock map
        With ``evaluate`` and ``clock_of(values (S, d)) -> clocks`` (NaN: never reached).
    levels : ndarray of shape (S,) or None
        Activation level of each seed (None or 0: no activation events for it).
    """

    def __init__(self, clock, levels, seeds: int, dim: int):
        self.clock = clock
        self.level = np.zeros(seeds) if levels is None else np.broadcast_to(
            np.asarray(levels, dtype=np.float64), (seeds,)).copy()
        self.activation_time = np.full((seeds, dim), np.nan)
        self.decade_time = np.full((seeds, LOSS_DECADES.size), np.nan)
        self.theta0, _ = clock.evaluate(np.zeros((seeds, dim)))
        self._clocks()

    def _clocks(self):
        level = self.level[:, None] * np.ones_like(self.theta0)
        # NaN: F never reaches the level on that side (e.g. a frozen coordinate)
        self.clock_up = np.nan_to_num(self.clock.clock_of(level), nan=-np.inf)
        self.clock_down = np.nan_to_num(self.clock.clock_of(-level), nan=np.inf)
        off = self.level <= 0
        self.clock_up[off] = -np.inf
        self.clock_down[off] = np.inf

    # -- state ----------------------------------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        return {"activation_level": self.level, "activation_time": self.activation_time,
                "loss_decade_time": self.decade_time}

    def state_shapes(self) -> dict[str, tuple]:
        return {name: (value.shape, value.dtype) for name, value in self.state_arrays().items()}

    def restore(self, arrays) -> None:
        self.level[...] = arrays["activation_level"]
        self.activation_time[...] = arrays["activation_time"]
        self.decade_time[...] = arrays["loss_decade_time"]
        self._clocks()

    def file_rows(self) -> dict[str, np.ndarray]:
        """The /events datasets (rewritten at every checkpoint)."""
        return {"activation_level": self.level, "activation_time": self.activation_time,
                "loss_decades": LOSS_DECADES, "loss_decade_time": self.decade_time}

    @staticmethod
    def file_shapes(seeds: int, dim: int) -> dict[str, tuple]:
        return {"activation_level": ((seeds,), np.float64), "activation_time": ((seeds, dim), np.float64),
                "loss_decades": ((LOSS_DECADES.size,), np.int64),
                "loss_decade_time": ((seeds, LOSS_DECADES.size), np.float64)}

    # -- detection ------------------------------------------------------------------------------
    def start(self, seeds, loss) -> None:
        """Events at t = 0 of fresh seeds: coordinates already at the level, decades above f(0)."""
        theta0 = self.theta0[seeds]
        on = (self.level[seeds, None] > 0) & (np.abs(theta0) >= self.level[seeds, None])
        self.activation_time[seeds] = np.where(on, 0.0, self.activation_time[seeds])
        below = loss[seeds, None] < _DECADE_LEVELS[None, :]
        self.decade_time[seeds] = np.where(below, 0.0, self.decade_time[seeds])

    def step(self, integrator, seeds, t_old, h, s_old, s_old_lo, sigma, sigma_lo, loss_old,
             loss_new) -> None:
        """Events inside the accepted steps of ``seeds`` (from t_old, size h): double-double
        clocks s_old + s_old_lo (m, d) at the start, stage clocks sigma + sigma_lo (m, 3, d),
        losses at both ends."""
        crossed = np.empty((seeds.size, _DECADE_LEVELS.size), dtype=np.bool_)
        crossing = np.nonzero(_events_in_steps(seeds, t_old, h, s_old, s_old_lo, sigma, sigma_lo, loss_old,
                                               loss_new, self.level, self.clock_up, self.clock_down,
                                               self.activation_time, self.decade_time, crossed,
                                               threads.SERIAL_STATE_WORK))[0]
        if crossing.size == 0:
            return
        coef = _dense_clocks(s_old[crossing], s_old_lo[crossing], sigma[crossing], sigma_lo[crossing])
        for c, r in enumerate(crossing):
            seed = seeds[r]
            for k in np.flatnonzero(crossed[r]):
                x = _loss_crossing(integrator, seed, s_old[r], s_old_lo[r], coef[c], _DECADE_LEVELS[k],
                                   loss_old[r], loss_new[r])
                self.decade_time[seed, k] = t_old[r] + x * h[r]


@njit(**STRICT_JIT_OPTIONS)
def _dense_clocks(s_old, s_old_lo, sigma, sigma_lo):
    """Coefficients (m, 3, d) of the cubic clocks p(x) = s_old + c0 x + c1 x^2 + c2 x^3 of a
    step through its stage clocks sigma + sigma_lo (m, 3, d), from the double-double start."""
    m, d = s_old.shape
    # the polynomial's increments from the start, exact to the clocks' double-double precision
    moved = np.empty((m, 3, d))
    for r in range(m):
        for k in range(3):
            for i in range(d):
                moved[r, k, i] = (sigma[r, k, i] - s_old[r, i]) + (sigma_lo[r, k, i] - s_old_lo[r, i])
    coef = np.empty((m, 3, d))
    dense_coefficients(np.zeros((m, d)), moved, coef)
    return coef


_activation_crossings_serial, _activation_crossings_parallel = ACTIVATION_CROSSINGS_KERNELS


@njit(**STRICT_JIT_OPTIONS)
def _events_in_steps(seeds, t_old, h, s_old, s_old_lo, sigma, sigma_lo, loss_old, loss_new, level, up, down,
                     activation_time, decade_time, crossed, serial_work):
    """The activations inside the accepted steps of ``seeds`` (rows of the other arrays; seeds
    with a level > 0), located on each step's dense clocks into activation_time; and which loss
    decades each row crossed (``crossed``, :func:`_decades_crossed`), returned as one flag per
    row: those the caller locates (:func:`_loss_crossing`)."""
    watched = np.nonzero(level[seeds] > 0)[0]
    if watched.size:
        coef = _dense_clocks(s_old[watched], s_old_lo[watched], sigma[watched], sigma_lo[watched])
        if watched.size * s_old.shape[1] > serial_work:
            _activation_crossings_parallel(s_old[watched], coef, seeds[watched], t_old[watched], h[watched], up,
                                           down, activation_time)
        else:
            _activation_crossings_serial(s_old[watched], coef, seeds[watched], t_old[watched], h[watched], up,
                                         down, activation_time)
    return _decades_crossed(loss_old, loss_new, decade_time, seeds, crossed)


def _loss_crossing(integrator, seed, s_old, s_old_lo, coef, level, loss_start, loss_end) -> float:
    """x in [0, 1] where the loss along the step's dense output equals ``level`` (Illinois
    regula falsi on log f, bracketed by the step's ends)."""
    rows = np.array([seed], dtype=np.int64)
    theta = np.empty((1, s_old.size))
    scratch = np.empty((1, s_old.size))  # h along the way, not used
    r = np.empty((1, integrator.n))
    offset = float(integrator.products.offsets(rows)[0])  # (the s-form's y beyond range(Q))

    def gap(x):
        moved = x * (coef[0] + x * (coef[1] + x * coef[2]))
        clocks, rounding = two_sum.py_func(s_old, moved)
        integrator.clock.evaluate_rows(clocks[None, :], (rounding + s_old_lo)[None, :], rows, theta,
                                       scratch)
        integrator.products.residuals(theta, rows, r)
        value = float(r[0] @ r[0]) / (2 * integrator.products.n) + offset
        return np.log(max(value, 1e-300)) - np.log(level)

    a, b = 0.0, 1.0
    fa, fb = np.log(loss_start) - np.log(level), np.log(max(loss_end, 1e-300)) - np.log(level)
    side = 0
    for _ in range(60):
        x = b - fb * (b - a) / (fb - fa) if fb != fa else 0.5 * (a + b)
        if not a < x < b:
            x = 0.5 * (a + b)
        fx = gap(x)
        if fx > 0:
            a, fa = x, fx
            if side == -1:
                fb *= 0.5
            side = -1
        else:
            b, fb = x, fx
            if side == 1:
                fa *= 0.5
            side = 1
        if abs(fx) <= LOSS_CROSSING_TOL:
            return x
        if b - a <= 1e-14:
            break
    return b


def activation_levels(config, problem, u0) -> np.ndarray:
    """The activation level of every seed, shape (S,) (module docstring)."""
    level = config.integrator.activation_level
    S = u0.shape[0]
    if level > 0:
        return np.full(S, level)
    from .parametrization import Parametrization
    from .prediction import bregman_projection, constraints, min_l2_interpolator
    from .theory import Geometry, assumption_a
    from .threads import serial_blas

    param = Parametrization.from_config(config)
    out = np.empty(S)
    with serial_blas():
        geometry = Geometry.from_layers(u0, param)
        shared = None if problem.per_seed else constraints(problem.X, problem.y)
        for s in range(S):
            data = problem.for_seed(s)
            cons = shared if shared is not None else constraints(data.X, data.y)
            limit = None
            # no prediction for a product initialization in the sign trap
            if param.name != "product" or assumption_a(u0[s]).holds:
                with np.errstate(all="ignore"):
                    prediction = bregman_projection(geometry, s, cons)
                if prediction.residual <= PREDICTION_RESIDUAL and np.all(np.isfinite(prediction.theta)):
                    limit = prediction.theta
            if limit is None:  # none, or not converged (tiny scales)
                limit = min_l2_interpolator(data.X, data.y)
            out[s] = ACTIVATION_FRACTION * float(np.max(np.abs(limit)))
    return out


@dataclass
class RunEvents:
    """The events of a run file up to its last committed checkpoint.

    Attributes
    ----------
    level : ndarray of shape (S,)
    activation_time : ndarray of shape (S, d)
        NaN where the coordinate had not activated by the seed's last committed time.
    decades : ndarray of shape (D,)
    decade_time : ndarray of shape (S, D)
    """

    level: np.ndarray
    activation_time: np.ndarray
    decades: np.ndarray
    decade_time: np.ndarray

    def as_dict(self) -> dict:
        def clean(a):
            return [None if not np.isfinite(v) else float(v) for v in a]

        seeds = []
        for s in range(self.level.size):
            order = np.argsort(self.activation_time[s])
            order = order[np.isfinite(self.activation_time[s, order])]
            seeds.append({"seed": s, "activation_level": float(self.level[s]),
                          "activated": [{"coordinate": int(i), "t": float(self.activation_time[s, i])}
                                        for i in order],
                          "loss_decade_time": {f"1e{int(k)}": v for k, v in
                                               zip(self.decades, clean(self.decade_time[s]))
                                               if v is not None}})
        return {"seeds": seeds}


def read_events(run) -> RunEvents | None:
    """The events of an open :class:`~ddln_fast.store.Run`, or None (not a dual run)."""
    f = run.file
    if "events" not in f or run.committed == 0:
        return None
    g = f["events"]
    for name in g:
        if hasattr(g[name], "refresh") and f.swmr_mode:
            g[name].refresh()
    t_last = run.t_seed[-1]
    activation = np.array(g["activation_time"])
    decade = np.array(g["loss_decade_time"])
    # events found after the last committed checkpoint (a run killed between the two writes)
    # are not part of the committed run
    activation = np.where(activation <= t_last[:, None], activation, np.nan)
    decade = np.where(decade <= t_last[:, None], decade, np.nan)
    return RunEvents(np.array(g["activation_level"]), activation, np.array(g["loss_decades"]), decade)


def format_events(events: RunEvents, shown: int = 8) -> list[str]:
    """Lines for ``ddln analyze``: per seed, the activation level, how many coordinates
    activated, the first activations in time order, and the loss-decade times."""
    lines = ["events (activation: first t with |theta_i| >= level; loss: first t with f < 10^k):"]
    for s in range(events.level.size):
        times = events.activation_time[s]
        order = np.argsort(times)
        order = order[np.isfinite(times[order])]
        first = ", ".join(f"{int(i)}@{times[i]:.4g}" for i in order[:shown])
        more = f", ... ({order.size - shown} more)" if order.size > shown else ""
        lines.append(f"  seed {s}: level {events.level[s]:.3g}, {order.size} activated: {first}{more}")
        dec = events.decade_time[s]
        reached = [(int(k), t) for k, t in zip(events.decades, dec) if np.isfinite(t) and t > 0]
        if reached:
            lines.append("    loss below " + ", ".join(f"1e{k}@{t:.4g}" for k, t in reached))
    return lines
