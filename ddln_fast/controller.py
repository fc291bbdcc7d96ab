"""The step-size controller of every adaptive integrator, and the per-seed state it steers.

One controller serves the batched layer integrator (one step size per seed, all seeds
together), the mirror method (one seed at a time), :func:`ddln_fast.theory.clock_flow` (one
step size per coordinate) and implicit solvers (error order 3, Newton failures). It is
Hairer's: the PI control of ``dopri5.f`` (Hairer, Nørsett & Wanner I, §II.4, and Hairer &
Wanner II, §IV.2), optionally Gustafsson's predictive control of ``radau5.f``, the starting
step ``HINIT``, and landing exactly on a target time (checkpoint) by stretching the last step
by up to 1 % rather than taking a tiny one.

State
-----
:class:`SeedState`, a NamedTuple of arrays with one entry per seed (or per coordinate):
``t``, ``h`` (the next proposed step), ``facold`` (previous accepted error, floored),
``rejected`` (the last attempt was rejected: no growth on the next acceptance), ``steps``
(attempts), ``accepted``, ``nfev``, ``loss``, ``status`` and ``t_stop``. Compiled functions
take it as one argument. :class:`Trial` (also a NamedTuple of per-seed arrays) holds the step
being attempted: ``h`` (used), ``h_proposed`` (before clipping), ``landing`` and ``accepted``.

Parameters
----------
:func:`control_for` ``(error_order, beta=0.04, predictive=False)`` gives a :class:`Control`:
error exponent 1/(q + 1) of an embedded estimate of order q (dopri5: q = 4, 0.2; a Radau IIA
estimate: q = 3, 1/4), PI exponent ``expo1 = 1/(q + 1) - 0.75 beta``, safety 0.9, step ratio
h_new/h in [0.2, 10]. ``beta = 0`` is the plain (I) controller; ``predictive=True``
Gustafsson's (``facold`` then holds h_acc / max(err_acc, 1e-2)^(1/(q+1))).

Calls (all loops run over ``active``, an int64 array of seed indices; ``err``, ``loss_new`` and
``live`` are indexed by position in ``active``, everything else by seed)
-----------------------------------------------------------------------------------------
1. ``propose_steps(active, targets, state, trial)``: the step each seed tries, its proposal
   or exactly ``targets[s] - t[s]`` when the proposal would reach ``targets[s]``.
2. The integrator attempts ``trial.h[s]`` and measures each seed's error norm ``err[a]``
   (RMS of error / (atol + rtol max(|y|, |y_new|)); NaN or inf: reject) and the loss at the
   new state ``loss_new[a]`` (NaN if unknown).
3. ``control_steps(active, live, err, loss_new, targets, state, trial, control, evaluations,
   loss_tol, max_steps)``: accepts (err <= 1) or rejects each live seed, sets ``t`` (exactly
   ``targets[s]`` when landing), the next proposal (no growth after a rejection; a landing
   step proposes at least its unclipped proposal again), ``trial.accepted[s]``, adds
   ``evaluations`` to ``nfev`` and stops seeds: ``loss_tol`` (accepted ``loss_new`` below it),
   ``max_steps`` (attempts), ``stalled`` (h <= 16 eps |t|). The integrator then moves the
   accepted seeds to their new state.
4. ``reject_steps(active, reject, factor, state, trial, max_steps)``: reject the marked seeds'
   attempts with h_new = factor * h (an implicit solver's Newton failure), no error norm.
5. ``screen_losses(active, live, losses, loss_tol, state)``: record the loss at the current
   state; seeds whose loss is not finite stop as diverged, those below ``loss_tol`` as
   converged (``live[a] = 0`` for both).
6. Starting step, vectorized numpy (arrays of seeds or coordinates, or scalars):
   ``h0 = first_trial_step(d0, d1, h_max)`` from the norms of y0 and f0, then, after the
   integrator evaluates f at y0 + h0 f0 and measures d2 = ||f1 - f0|| / h0,
   ``starting_step(h0, d1, d2, error_order, h_max)``.

Arithmetic: these functions are compiled with IEEE semantics, so a per-seed Python caller gets
exactly what a Python transcription of Hairer's formulas gives. The batched explicit
Runge–Kutta kernels use ``propose_steps_fastmath`` and ``control_steps_fastmath``: the same
source (the scalar helpers below are inlined into both) compiled with the package's fast-math
flags and Hairer's constants as compile-time constants, under which LLVM folds the divisions by
constants into products (the arithmetic the layer integrator's run files are made with).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from .kernels import JIT_OPTIONS, STRICT_JIT_OPTIONS

# Status of a seed (stored per checkpoint in the run file).
RUNNING, T_END, LOSS_TOL, MAX_STEPS, DIVERGED, STALLED = range(6)
STATUS_NAMES = ("running", "t_end", "loss_tol", "max_steps", "diverged", "stalled")

# Hairer's dopri5.f: safety factor, bounds of h_new / h, PI gain.
SAFETY, RATIO_MIN, RATIO_MAX, BETA = 0.9, 0.2, 10.0, 0.04
#: Floor of the previous error in the PI term (dopri5.f) and in Gustafsson's (radau5.f).
FACOLD_FLOOR, PREDICTIVE_FLOOR = 1e-4, 1e-2
#: A step stretched by up to this factor lands on the target instead of stopping just short.
LANDING_STRETCH = 1.01
#: A step of at most this many ulps of t no longer moves a float64 time: the seed has stalled.
STALL_ULPS = 16.0
_EPS = float(np.finfo(np.float64).eps)


class SeedState(NamedTuple):
    """Where each seed is, all arrays of shape (S,).

    ``t`` is flow time; ``h`` the proposed next step (adaptive) or dt; ``facold`` the previous
    accepted error (PI control); ``rejected`` 1 after a rejected attempt; ``steps`` counts
    attempted steps, ``accepted`` accepted ones; ``nfev`` gradient evaluations; ``loss`` is f at
    the current state (NaN if unknown); ``status`` one of :data:`STATUS_NAMES`; ``t_stop`` the
    time a seed stopped (NaN while running).
    """

    t: np.ndarray
    h: np.ndarray
    facold: np.ndarray
    rejected: np.ndarray
    steps: np.ndarray
    accepted: np.ndarray
    nfev: np.ndarray
    loss: np.ndarray
    status: np.ndarray
    t_stop: np.ndarray

    @classmethod
    def fresh(cls, seeds: int, h0: float) -> "SeedState":
        return cls(
            t=np.zeros(seeds), h=np.full(seeds, h0), facold=np.full(seeds, FACOLD_FLOOR),
            rejected=np.zeros(seeds, dtype=np.int8), steps=np.zeros(seeds, dtype=np.int64),
            accepted=np.zeros(seeds, dtype=np.int64), nfev=np.zeros(seeds, dtype=np.int64),
            loss=np.full(seeds, np.nan), status=np.zeros(seeds, dtype=np.int8),
            t_stop=np.full(seeds, np.nan),
        )

    def as_dict(self) -> dict[str, np.ndarray]:
        return self._asdict()

    @classmethod
    def from_dict(cls, arrays) -> "SeedState":
        """Copies of the named arrays (a saved state), cast to the dtypes of :meth:`fresh`."""
        template = cls.fresh(1, 0.0)
        return cls(**{name: np.array(arrays[name], dtype=getattr(template, name).dtype)
                      for name in cls._fields})

    @property
    def running(self) -> np.ndarray:
        return self.status == RUNNING

    def t_seed(self) -> np.ndarray:
        """Each seed's time: where it stopped, or where it is."""
        return np.where(np.isnan(self.t_stop), self.t, self.t_stop)

    def finish(self) -> None:
        """Seeds still running have reached the end time (status t_end)."""
        done = self.status == RUNNING
        self.status[done] = T_END
        self.t_stop[done] = self.t[done]


class Trial(NamedTuple):
    """The step each seed attempts, arrays of shape (S,): ``h`` (used), ``h_proposed`` (the
    controller's proposal before clipping to the target), ``landing`` (1: the step ends on the
    target) and ``accepted`` (1: the attempt was accepted, set by the control functions)."""

    h: np.ndarray
    h_proposed: np.ndarray
    landing: np.ndarray
    accepted: np.ndarray

    @classmethod
    def empty(cls, seeds: int) -> "Trial":
        return cls(np.zeros(seeds), np.zeros(seeds), np.zeros(seeds, dtype=np.uint8),
                   np.zeros(seeds, dtype=np.uint8))


class Control(NamedTuple):
    """Constants of the controller; build with :func:`control_for`."""

    exponent: float  # 1 / (q + 1)
    expo1: float  # exponent - 0.75 beta (PI)
    beta: float
    safety: float
    ratio_min: float  # smallest h_new / h
    ratio_max: float  # largest h_new / h
    predictive: bool  # Gustafsson's predictive control instead of PI
    stall_ulps: float  # a step of at most stall_ulps eps |t| stalls the seed


def control_for(error_order: int, beta: float = BETA, predictive: bool = False,
                safety: float = SAFETY, ratio_min: float = RATIO_MIN,
                ratio_max: float = RATIO_MAX, stall_ulps: float = STALL_ULPS) -> Control:
    """The controller of an error estimate of order ``error_order`` (q): exponent 1/(q + 1).

    ``beta = 0`` gives the I controller. ``predictive``: Gustafsson's control (radau5.f), the
    larger of the I control's ratio and one predicted from the last accepted step (``beta`` is
    then not used); ``SeedState.facold`` then holds h_acc / max(err_acc, 1e-2)^(1/(q+1)) of
    the last accepted step. ``stall_ulps``: a seed whose step falls to stall_ulps eps |t| (that
    many ulps of a float64 time) stops as stalled; a solver that carries its time as a
    double-double passes far less."""
    if error_order < 1:
        raise ValueError(f"error_order {error_order}: an adaptive method needs an error estimate of order >= 1")
    exponent = 1.0 / (error_order + 1)
    return Control(exponent, exponent - beta * 0.75, float(beta), float(safety), float(ratio_min),
                   float(ratio_max), bool(predictive), float(stall_ulps))


# -- the scalar arithmetic (inlined: it takes the arithmetic flags of each caller) ---------------
@njit(inline="always")
def _clamp_ratio(ratio, c):
    return max(1.0 / c.ratio_max, min(1.0 / c.ratio_min, ratio))


@njit(inline="always")
def _pi_ratio(err, facold, c):
    """h / h_new after an accepted step (dopri5.f's PI control)."""
    fac11 = err ** c.expo1
    fac = fac11 / facold ** c.beta
    return _clamp_ratio(fac / c.safety, c)


@njit(inline="always")
def _predictive_ratio(err, memory, h, has_memory, c):
    """h / h_new after an accepted step with Gustafsson's prediction (radau5.f): the larger of
    the I control's ratio and (h_acc / h) (err^2 / err_acc)^(1/(q+1)) / safety, where
    ``memory`` = h_acc / err_acc^(1/(q+1)) of the last accepted step (if ``has_memory``)."""
    ratio = _clamp_ratio(err ** c.exponent / c.safety, c)
    if has_memory:
        predicted = (memory / h) * (err * err) ** c.exponent / c.safety
        ratio = max(ratio, _clamp_ratio(predicted, c))
    return ratio


@njit(inline="always")
def _reject_ratio(err, c):
    """h / h_new after a rejected step; a non-finite error shrinks by the largest ratio."""
    fac11 = err ** c.expo1 if err == err and err < np.inf else np.inf
    return min(1.0 / c.ratio_min, fac11 / c.safety)


@njit(inline="always")
def _propose(s, target, st, trial):
    proposal = st.h[s]
    landing = st.t[s] + LANDING_STRETCH * proposal >= target
    h_used = target - st.t[s] if landing else proposal
    trial.landing[s] = landing
    trial.h_proposed[s] = proposal
    trial.h[s] = h_used
    return h_used


@njit(inline="always")
def _accept(s, ratio, loss_new, target, st, trial, loss_tol):
    hs = trial.h[s]
    h_new = hs / ratio
    if st.rejected[s]:
        h_new = min(h_new, hs)
    st.rejected[s] = 0
    if trial.landing[s]:
        st.t[s] = target
        h_new = max(h_new, trial.h_proposed[s])
    else:
        st.t[s] = st.t[s] + hs
    st.h[s] = h_new
    st.accepted[s] += 1
    st.loss[s] = loss_new
    trial.accepted[s] = 1
    if loss_new < loss_tol:
        st.status[s] = LOSS_TOL
        st.t_stop[s] = st.t[s]


@njit(inline="always")
def _reject(s, h_new, st):
    st.h[s] = h_new
    st.rejected[s] = 1


@njit(inline="always")
def _stop_checks(s, st, max_steps, stall_ulps):
    """After an attempt: stop a running seed at max_steps, or when its step no longer changes
    its time (stalled)."""
    if st.status[s] == RUNNING:
        if st.steps[s] >= max_steps:
            st.status[s] = MAX_STEPS
            st.t_stop[s] = st.t[s]
        elif not st.h[s] > stall_ulps * _EPS * max(abs(st.t[s]), 1e-280):
            st.status[s] = STALLED
            st.t_stop[s] = st.t[s]


@njit(inline="always")
def _control_all(active, live, err, loss_new, targets, st, trial, c, evaluations, loss_tol,
                 max_steps):
    for a in range(active.shape[0]):
        s = active[a]
        trial.accepted[s] = 0
        if live[a] == 0:
            continue
        e = err[a]
        st.steps[s] += 1
        st.nfev[s] += evaluations
        if e <= 1.0:  # NaN and inf fail this test: reject
            if c.predictive:
                hs = trial.h[s]
                ratio = _predictive_ratio(e, st.facold[s], hs, st.accepted[s] > 0, c)
                st.facold[s] = hs / max(e, PREDICTIVE_FLOOR) ** c.exponent
            else:
                ratio = _pi_ratio(e, st.facold[s], c)
                st.facold[s] = max(e, FACOLD_FLOOR)
            _accept(s, ratio, loss_new[a], targets[s], st, trial, loss_tol)
        else:
            _reject(s, trial.h[s] / _reject_ratio(e, c), st)
        _stop_checks(s, st, max_steps, c.stall_ulps)


# -- IEEE entry points (per-seed callers, implicit solvers, clock_flow) ---------------------------
@njit(**STRICT_JIT_OPTIONS)
def propose_steps(active, targets, state, trial):
    """Fill ``trial`` with the step each active seed attempts towards ``targets[s]``."""
    for a in range(active.shape[0]):
        s = active[a]
        _propose(s, targets[s], state, trial)


@njit(**STRICT_JIT_OPTIONS)
def control_steps(active, live, err, loss_new, targets, state, trial, control, evaluations,
                  loss_tol, max_steps):
    """Accept or reject each live active seed's attempt by its error norm ``err[a]`` (PI or
    predictive control, by ``control``), move its time, propose the next step and stop it if it
    is done (see the module docstring). ``trial.accepted[s]`` tells the caller which seeds to
    move."""
    _control_all(active, live, err, loss_new, targets, state, trial, control, evaluations,
                 loss_tol, max_steps)


@njit(**STRICT_JIT_OPTIONS)
def reject_steps(active, reject, factor, state, trial, max_steps, stall_ulps=STALL_ULPS):
    """Reject the attempt of each active seed with ``reject[a]`` set, proposing
    ``factor * trial.h[s]`` next (e.g. a Newton iteration that did not converge): counted as an
    attempt, stop checks applied (``stall_ulps`` as in :func:`control_for`). ``trial.accepted``
    is cleared for those seeds."""
    for a in range(active.shape[0]):
        if reject[a] == 0:
            continue
        s = active[a]
        trial.accepted[s] = 0
        state.steps[s] += 1
        _reject(s, factor * trial.h[s], state)
        _stop_checks(s, state, max_steps, stall_ulps)


@njit(**STRICT_JIT_OPTIONS)
def screen_losses(active, live, losses, loss_tol, state):
    """Record ``losses[a]``, the loss at each live active seed's current state; a seed whose
    loss is not finite stops as diverged, one below ``loss_tol`` as converged (then
    ``live[a] = 0``; neither moves)."""
    for a in range(active.shape[0]):
        if live[a] == 0:
            continue
        s = active[a]
        f = losses[a]
        state.loss[s] = f
        if not np.isfinite(f):
            live[a] = 0
            state.status[s] = DIVERGED
            state.t_stop[s] = state.t[s]
        elif f < loss_tol:
            live[a] = 0
            state.status[s] = LOSS_TOL
            state.t_stop[s] = state.t[s]


# -- fast-math entry points (the batched explicit Runge–Kutta integrator) -----------------------
@njit(**JIT_OPTIONS)
def propose_steps_fastmath(active, targets, state, trial, h_kernel):
    """:func:`propose_steps` under the kernels' fast-math flags; also writes each step into
    ``h_kernel`` (the kernels' dtype). Compiled: as a dozen numpy calls it cost ~50 us per step,
    a third of a step of one straggler seed at d = 1000."""
    for a in range(active.shape[0]):
        s = active[a]
        h_kernel[s] = _propose(s, targets[s], state, trial)


@njit(**JIT_OPTIONS)
def control_steps_fastmath(active, live, err, loss_new, targets, state, trial, expo1,
                           evaluations, loss_tol, max_steps):
    """:func:`control_steps` under the kernels' fast-math flags with Hairer's constants
    (``expo1`` = 1/(q + 1) - 0.75 beta from :func:`control_for`)."""
    control = Control(0.0, expo1, BETA, SAFETY, RATIO_MIN, RATIO_MAX, False, STALL_ULPS)
    _control_all(active, live, err, loss_new, targets, state, trial, control, evaluations,
                 loss_tol, max_steps)


# -- starting step (once per seed: numpy) --------------------------------------------------------
def first_trial_step(d0, d1, h_max):
    """Hairer's starting step, first half (HINIT): h0 = 0.01 d0 / d1, or 1e-6 when either
    norm is below 1e-5, at most ``h_max``. ``d0``, ``d1``: norms of y0 and f(y0) (arrays of
    seeds or coordinates, or scalars)."""
    h0 = np.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / np.maximum(d1, 1e-300))
    return np.minimum(h0, h_max)


def starting_step(h0, d1, d2, error_order, h_max):
    """Hairer's starting step, second half: with d2 = ||f(y0 + h0 f0) - f0|| / h0 (a second
    derivative estimate), h1 = (0.01 / max(d1, d2))^(1/(q+1)) (or max(1e-6, h0 / 1000) when
    both are below 1e-15), and the step min(100 h0, h1, h_max)."""
    big = np.maximum(d1, d2)
    h1 = np.where(big <= 1e-15, np.maximum(1e-6, h0 * 1e-3),
                  (0.01 / np.maximum(big, 1e-300)) ** (1.0 / (error_order + 1)))
    return np.minimum(np.minimum(100 * h0, h1), h_max)
