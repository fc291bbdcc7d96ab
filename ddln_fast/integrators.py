"""Batched integrators of the layer flow du^j/dt = -g(theta) * prod_{k != j} u^k.

A method is its Butcher tableau (as in scipy.integrate._ivp): ``euler``, ``rk4`` and the
adaptive Dormand–Prince 5(4) pair ``dopri5`` drive the same fused stage kernel. All seeds are
advanced together so that the products with X stay matrix-matrix products; ``dopri5`` keeps one
step size per seed (Hairer's PI controller, accept/reject per seed, FSAL).

The state of every seed lives in :class:`SeedState`; :class:`Integrator` owns the buffers and
advances all running seeds to a target time (a checkpoint), landing on it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numba
from numba import njit

from . import controller, kernels
from .controller import (DIVERGED, LOSS_TOL, MAX_STEPS, RUNNING, STALLED, STATUS_NAMES, T_END,
                         SeedState, Trial)
from .kernels import JIT_OPTIONS
from .problem import Problem


@dataclass(frozen=True)
class Tableau:
    """Explicit Runge–Kutta coefficients: ``A`` (stages, stages), ``B`` (stages,), ``C``,
    and for embedded pairs the error weights ``E`` (stages,) = b - b_hat and the order ``q``
    of the error estimate."""

    A: np.ndarray
    B: np.ndarray
    C: np.ndarray
    E: np.ndarray | None = None
    error_order: int = 0

    @property
    def stages(self) -> int:
        return len(self.B)

    @property
    def adaptive(self) -> bool:
        return self.E is not None


def _tableau(A, B, C, E=None, error_order=0) -> Tableau:
    return Tableau(np.array(A, dtype=np.float64), np.array(B, dtype=np.float64),
                   np.array(C, dtype=np.float64),
                   None if E is None else np.array(E, dtype=np.float64), error_order)


EULER = _tableau([[0.0]], [1.0], [0.0])
RK4 = _tableau(
    [[0, 0, 0, 0], [0.5, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 1, 0]],
    [1 / 6, 1 / 3, 1 / 3, 1 / 6],
    [0, 0.5, 0.5, 1],
)
# Dormand & Prince (1980); HNW I, Table 5.2. The 7th stage is f(y_{n+1}) (FSAL).
DOPRI5 = _tableau(
    [
        [0, 0, 0, 0, 0, 0, 0],
        [1 / 5, 0, 0, 0, 0, 0, 0],
        [3 / 40, 9 / 40, 0, 0, 0, 0, 0],
        [44 / 45, -56 / 15, 32 / 9, 0, 0, 0, 0],
        [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729, 0, 0, 0],
        [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656, 0, 0],
        [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0],
    ],
    [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0],
    [0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1],
    [-71 / 57600, 0, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40],
    error_order=4,
)
TABLEAUS = {"euler": EULER, "rk4": RK4, "dopri5": DOPRI5}

class Products:
    """The two products with X of one gradient evaluation, for the active seeds.

    Shared X: R = Theta @ X^T and G = R @ X as GEMMs over all active seeds at once. Per-seed
    data: both products of a seed in one work item of a parallel kernel (its X is read from
    memory once; a seed's result depends neither on the batch nor on the thread count).
    """

    def __init__(self, problem: Problem, dtype, seeds: int):
        self.X = np.ascontiguousarray(problem.X, dtype=dtype)
        self.per_seed = problem.per_seed
        y = np.asarray(problem.y, dtype=dtype)
        self.y = np.ascontiguousarray(y if self.per_seed else y[None, :])
        self.n = problem.n
        self.inv_n = dtype(1.0 / self.n)
        self.inv_2n = 0.5 / self.n
        self.shared_rows = np.zeros(seeds, dtype=np.int64)

    def residual_and_gradient(self, theta, active, R, G, loss, gradient=True):
        """R[a] = X theta[a] - y, loss[a] = f, G[a] = X^T R[a] (not yet divided by n; skipped
        with ``gradient=False``: a loss alone needs only the first product)."""
        m = len(active)
        if self.per_seed:
            kernels._per_seed_products(self.X, self.y, theta, active, R, G, self.inv_2n, loss,
                                       1 if gradient else 0)
        elif m * self.X.size <= kernels.SERIAL_PRODUCT_WORK:
            kernels._shared_products_serial(self.X, self.y, theta, m, R, G, self.inv_2n, loss,
                                            1 if gradient else 0)
        else:
            np.matmul(theta[:m], self.X.T, out=R[:m])
            kernels._residual_and_loss(R, self.y, self.shared_rows, m, self.inv_2n, loss)
            if gradient:
                np.matmul(R[:m], self.X, out=G[:m])


# Per-step bookkeeping of the fixed-step loop, compiled: as Python loops over 64 seeds it cost
# about 0.3 ms per step (measured), as much as a whole stage kernel at moderate d.
@njit(**JIT_OPTIONS)
def _finish_fixed(active, live, dt, stages, max_steps, steps, accepted, nfev, t, loss, status,
                  t_stop):
    """After a fixed step: count it for the seeds that moved (their loss is now unknown) and stop
    those at ``max_steps``. Returns whether every active seed moved."""
    all_live = True
    for a in range(active.shape[0]):
        if live[a] == 0:
            all_live = False
            continue
        s = active[a]
        steps[s] += 1
        accepted[s] += 1
        nfev[s] += stages
        t[s] = steps[s] * dt
        loss[s] = np.nan
        if steps[s] >= max_steps and status[s] == RUNNING:
            status[s] = MAX_STEPS
            t_stop[s] = t[s]
    return all_live


class Integrator:
    """Advances a batch of seeds of the layer flow, one method, preallocated buffers.

    Parameters
    ----------
    method : {"euler", "rk4", "dopri5"}
    problem : Problem
    u0 : ndarray of shape (S, L, d)
        Initial layers (copied, cast to ``dtype``).
    dt : float
        Step (fixed-step methods); upper bound of the first step (dopri5).
    rtol, atol : float
        Tolerances of dopri5's error control (per seed RMS norm over all L*d components).
    loss_tol : float
        A seed stops once its loss is below this (0: never).
    max_steps : int
        A seed stops after this many attempted steps.
    """

    def __init__(self, method, problem: Problem, u0, dt=0.01, rtol=1e-8, atol=1e-12,
                 loss_tol=0.0, max_steps=10_000_000, dtype=np.float64):
        self.method = method
        self.tableau = TABLEAUS[method]
        self.dtype = np.dtype(dtype).type
        self.U = np.array(u0, dtype=self.dtype, order="C")
        S, L, d = self.U.shape
        self.seeds, self.depth, self.dim = S, L, d
        # u0 is only read (invariant drift): keep the caller's array when no cast is needed, a
        # read-only view, rather than one more state-sized copy (memory at d = 10^6).
        self.u0 = np.asarray(u0, dtype=self.dtype, order="C").view()
        self.u0.flags.writeable = False
        self.dt, self.rtol, self.atol = float(dt), float(rtol), float(atol)
        self.loss_tol, self.max_steps = float(loss_tol), int(max_steps)
        self.products = Products(problem, self.dtype, S)
        stages = self.tableau.stages
        # Euler's stage derivative never leaves its kernel: no state-sized K (memory at large d)
        self.K = np.zeros((stages, S if stages > 1 else 0, L, d), dtype=self.dtype)
        self.Y = np.zeros_like(self.U) if stages > 1 else self.U
        self.theta = np.zeros((S, d), dtype=self.dtype)
        self.G = np.zeros((S, d), dtype=self.dtype)
        self.R = np.zeros((S, self.products.n), dtype=self.dtype)
        self.stage_loss = np.zeros(S)
        self.err = np.zeros(S)
        self.err_partial = np.zeros((S, kernels._n_blocks(d)))
        self.live = np.ones(S, dtype=np.uint8)
        # the step of each seed in the kernels' dtype (fixed-step methods: always dt)
        self.h_work = np.full(S, self.dt, dtype=self.dtype)
        self.scratch = kernels.stage_scratch(L, self.dtype)
        self.A = [row.astype(self.dtype) for row in self.tableau.A]
        self.one = np.ones(1, dtype=self.dtype)
        self.B = self.tableau.B.astype(self.dtype)
        self.E = None if self.tableau.E is None else self.tableau.E.astype(self.dtype)
        self.state = SeedState.fresh(S, self.dt)
        self.fsal_ready = False
        self._theta_rows = None
        #: callable -> bool, asked before every step: True stops advance_to early (a safe point
        #: for SIGINT/SIGTERM: the state then is a step boundary, resumable bit-identically)
        self.stop_check = None
        self.stopped_early = False

    # -- state ----------------------------------------------------------------------------------
    def restore(self, U, state: SeedState, fsal=None, theta_cache=None):
        """Continue from a saved state (resume): layers, per-seed state and FSAL stage.

        ``theta_cache`` is :meth:`theta_cache` of the saved integrator: between two checkpoints
        the fixed-step loop reuses the theta its last step computed, whose bits may differ from
        theta recomputed from U, so a resume there restores it to stay bit-identical."""
        self.U[...] = U
        self.state = state
        if fsal is not None and self.tableau.adaptive:
            self.K[0][...] = fsal
            self.fsal_ready = True
        self._theta_rows = None
        if theta_cache is not None:
            rows, theta = theta_cache
            rows = np.asarray(rows)[np.asarray(rows) >= 0]
            if rows.size:
                self.theta[: rows.size] = theta[: rows.size]
                self._theta_rows = rows.astype(np.int64)

    def theta_cache(self):
        """(rows, theta): the seeds (``active`` order, padded with -1 to S) whose theta the next
        fixed step reuses, and the (S, d) theta buffer; rows all -1 when nothing is reused."""
        rows = np.full(self.seeds, -1, dtype=np.int64)
        if self._theta_rows is not None:
            rows[: len(self._theta_rows)] = self._theta_rows
        return rows, self.theta

    @property
    def fsal(self):
        """The stage that dopri5 reuses as the first stage of its next step, shape (S, L, d)."""
        return self.K[0]

    @property
    def running(self) -> np.ndarray:
        return self.state.status == RUNNING

    def _evaluate(self, active, Y, stage, mode, coeffs=None, n_terms=0, Y_out=None):
        """Products for the rows in ``self.theta`` (theta of ``Y``), then the fused stage."""
        self.products.residual_and_gradient(self.theta, active, self.R, self.G, self.stage_loss)
        kernels._rk_stage(self.U, Y, self.G, self.K, stage, 1, self.products.inv_n, self.h_work,
                          active, self.live, mode, coeffs if coeffs is not None else self.B,
                          n_terms, Y_out if Y_out is not None else Y, self.theta,
                          self.rtol, self.atol, self.err_partial, self.scratch)

    def _theta_of_U(self, active):
        kernels._stage_input(self.U, self.K, self.B, 0, self.h_work, active, self.U, self.theta,
                             self.scratch)
        self._theta_rows = active

    def current_losses(self, theta=None) -> np.ndarray:
        """Loss of every seed at its current layers (one exact residual evaluation).

        ``theta``: :meth:`theta_of_all` of the current layers, when the caller has it already
        (a checkpoint stores both: the product over the layers is then taken once)."""
        active = np.arange(self.seeds)
        if theta is None:
            theta = self.theta_of_all()
        self.products.residual_and_gradient(theta, active, self.R, self.G, self.stage_loss,
                                            gradient=False)
        self._theta_rows = None  # a checkpoint starts the next interval from a clean slate
        return self.stage_loss[: self.seeds].copy()

    def invariant_drift(self) -> np.ndarray:
        partial = np.zeros((self.seeds, kernels._n_blocks(self.dim)))
        kernels._invariant_drift(self.U, self.u0, partial)
        return partial.max(axis=1)

    def theta_of_all(self) -> np.ndarray:
        out = np.empty((self.seeds, self.dim), dtype=self.dtype)
        kernels._stage_input(self.U, self.K, self.B, 0, self.h_work, np.arange(self.seeds), self.U, out,
                             self.scratch)
        return out

    # -- time stepping --------------------------------------------------------------------------
    def advance_to(self, t_target: float) -> None:
        """Advance every running seed to flow time ``t_target`` (exactly), or until it stops,
        or until ``stop_check`` asks to stop (then ``stopped_early`` is True)."""
        self.stopped_early = False
        threads = self._threads_wanted = numba.get_num_threads()
        try:
            if self.tableau.adaptive:
                self._advance_adaptive(float(t_target))
            else:
                self._advance_fixed(int(round(t_target / self.dt)))
        finally:
            numba.set_num_threads(threads)
        if not self.stopped_early:  # (a stop keeps the cache: it is saved, see theta_cache)
            self._theta_rows = None  # the next interval starts from a clean slate (exact resume)

    def _pick_threads(self, m: int) -> None:
        """One thread for the parallel kernels while the active state is small (see
        kernels.SERIAL_STATE_WORK), else the caller's setting (restored by advance_to).
        Results do not change: per-seed sums never depend on the thread count."""
        small = m * self.depth * self.dim <= kernels.SERIAL_STATE_WORK
        numba.set_num_threads(1 if small else self._threads_wanted)

    def _advance_fixed(self, target_step: int) -> None:
        st = self.state
        tab = self.tableau
        while True:
            if self.stop_check is not None and self.stop_check():
                self.stopped_early = True
                return
            active = np.flatnonzero((st.status == RUNNING) & (st.steps < target_step))
            if active.size == 0:
                return
            self._pick_threads(active.size)
            if self._theta_rows is None or not np.array_equal(self._theta_rows, active):
                self._theta_of_U(active)
            self.products.residual_and_gradient(self.theta, active, self.R, self.G, self.stage_loss)
            self.live[: active.size] = 1
            controller.screen_losses(active, self.live, self.stage_loss, self.loss_tol, st)
            if tab.stages == 1:
                kernels._euler_step(self.U, self.G, self.products.inv_n, self.h_work, active,
                                    self.live, self.theta, self.scratch)
            for i in range(tab.stages if tab.stages > 1 else 0):
                last = i == tab.stages - 1
                coeffs = self.B if last else self.A[i + 1]
                Y_in = self.U if i == 0 else self.Y
                Y_out = self.U if last else self.Y
                if i > 0:
                    self.products.residual_and_gradient(self.theta, active, self.R, self.G, self.stage_loss)
                # the last stage's derivative is only needed inside its own call (no FSAL)
                kernels._rk_stage(self.U, Y_in, self.G, self.K, i, 0 if last else 1,
                                  self.products.inv_n, self.h_work, active, self.live,
                                  kernels.MODE_NEXT_INPUT, coeffs, i + 1, Y_out,
                                  self.theta, self.rtol, self.atol, self.err_partial, self.scratch)
            all_live = _finish_fixed(active, self.live, self.dt, tab.stages, self.max_steps,
                                     st.steps, st.accepted, st.nfev, st.t, st.loss, st.status,
                                     st.t_stop)
            # theta rows now hold theta of the new layers, for the live seeds
            self._theta_rows = active if all_live else None

    def _start_adaptive(self, active) -> None:
        """f(u0) (FSAL stage and initial loss), then Hairer's starting step per seed."""
        st = self.state
        m = active.size
        self.live[:m] = 1
        self._theta_of_U(active)
        self._evaluate(active, self.U, 0, kernels.MODE_DERIVATIVE)
        st.nfev[active] += 1
        controller.screen_losses(active, self.live, self.stage_loss, 0.0, st)  # diverged only
        U, f0 = self.U[active].astype(np.float64), self.K[0][active].astype(np.float64)
        scale = self.atol + self.rtol * np.abs(U)
        scale = np.maximum(scale, np.finfo(np.float64).tiny)
        rms = lambda v: np.sqrt(np.mean((v / scale) ** 2, axis=(1, 2)))  # noqa: E731
        d1 = rms(f0)
        h0 = controller.first_trial_step(rms(U), d1, self.dt)
        self.h_work[active] = h0
        kernels._stage_input(self.U, self.K, self.one, 1, self.h_work, active, self.Y, self.theta,
                             self.scratch)
        self._evaluate(active, self.Y, 1, kernels.MODE_DERIVATIVE)
        st.nfev[active] += 1
        d2 = rms(self.K[1][active].astype(np.float64) - f0) / h0
        st.h[active] = controller.starting_step(h0, d1, d2, self.tableau.error_order, self.dt)
        self.fsal_ready = True

    def _advance_adaptive(self, t_target: float) -> None:
        st = self.state
        A, E = self.A, self.E
        if not self.fsal_ready:
            self._start_adaptive(np.flatnonzero(st.status == RUNNING))
        trial = Trial.empty(self.seeds)
        targets = np.full(self.seeds, t_target)
        expo1 = controller.control_for(self.tableau.error_order).expo1
        while True:
            if self.stop_check is not None and self.stop_check():
                self.stopped_early = True
                return
            active = np.flatnonzero((st.status == RUNNING) & (st.t < t_target))
            if active.size == 0:
                return
            m = active.size
            self.live[:m] = 1
            self._pick_threads(m)
            # land on the checkpoint (Hairer: stretch by up to 1% rather than take a tiny step)
            controller.propose_steps_fastmath(active, targets, st, trial, self.h_work)
            kernels._stage_input(self.U, self.K, A[1], 1, self.h_work, active, self.Y, self.theta,
                                 self.scratch)
            for i in range(1, 6):
                self._evaluate(active, self.Y, i, kernels.MODE_NEXT_INPUT, A[i + 1], i + 1)
            self._evaluate(active, self.Y, 6, kernels.MODE_ERROR, E, 7)
            kernels._sum_blocks(self.err_partial, m, float(self.depth * self.dim), self.err)
            controller.control_steps_fastmath(active, self.live, self.err, self.stage_loss, targets,
                                              st, trial, expo1, 6, self.loss_tol, self.max_steps)
            accepted = active[trial.accepted[active] == 1]
            if accepted.size:
                kernels._accept_steps(self.U, self.Y, self.K, 6, 0, accepted)
