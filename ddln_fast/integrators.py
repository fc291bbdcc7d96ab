"""The batched integrator of the layer flow du^j/dt = -g(theta) * d theta / d u^j.

theta is the product of the layers, or the difference or power form of
:mod:`ddln_fast.parametrization` (for the product, d theta / d u^j = prod_{k != j} u^k).

A method is its Butcher tableau (:mod:`ddln_fast.tableaus`): ``euler``, ``rk4`` and the
adaptive Dormand–Prince 5(4) pair ``dopri5`` drive the same fused stage kernel, and the
adaptive loop reads from the tableau its stages, whether the last stage is the next first one
(FSAL), its evaluations per step and its error order. All seeds are advanced together so that
the products with X stay matrix-matrix products; an embedded pair keeps one step size per seed
(:mod:`ddln_fast.controller`: accept or reject per seed, landing exactly on each checkpoint).
Once the active state is small (few seeds left at small d: the stragglers of an adaptive run),
runs of adaptive steps are one compiled call, with the same kernels in the same order.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numba
from numba import njit

from . import controller, kernels, threads
from .controller import MAX_STEPS, RUNNING, STATUS_NAMES, SeedState, Trial
from .kernels import JIT_OPTIONS
from .parametrization import Parametrization
from .problem import Problem
from .solver import Solver
from .tableaus import TABLEAUS

# STATUS_NAMES and SeedState live in controller; importing them from here keeps working.
__all__ = ["Integrator", "Products", "STATUS_NAMES", "SeedState"]


class Products:
    """The two products with X of one gradient evaluation, for the active seeds.

    Shared X: R = Theta @ X^T and G = R @ X as GEMMs over all active seeds at once. Per-seed
    data: both products of a seed in one work item of a parallel kernel (its X is read from
    memory once; a seed's result depends neither on the batch nor on the thread count).
    """

    def __init__(self, problem: Problem, dtype, seeds: int):
        self.X = np.ascontiguousarray(problem.X, dtype=dtype)
        self.per_seed = problem.per_seed
        #: X of every seed, (S, n, d), or the shared X as (1, n, d): for compiled loops
        self.X_by_seed = self.X if self.per_seed else self.X[None]
        y = np.asarray(problem.y, dtype=dtype)
        self.y = np.ascontiguousarray(y if self.per_seed else y[None, :])
        self.n = problem.n
        self.inv_n = dtype(1.0 / self.n)
        self.inv_2n = 0.5 / self.n
        self.shared_rows = np.zeros(seeds, dtype=np.int64)

    def serial(self, m: int) -> bool:
        """Whether the products of ``m`` seeds run seed by seed in the calling thread (no
        GEMM): per-seed data always, a shared X when it is small (threads.SERIAL_PRODUCT_WORK)."""
        return self.per_seed or m * self.X.size <= threads.SERIAL_PRODUCT_WORK

    def residual_and_gradient(self, theta, active, R, G, loss, gradient=True, labels=None):
        """R[a] = X theta[a] - y, loss[a] = f, G[a] = X^T R[a] (not yet divided by n; skipped
        with ``gradient=False``: a loss alone needs only the first product).

        ``labels``: targets of shape (S, n) to use instead of y, row ``s`` for seed ``s`` (e.g.
        labels with noise)."""
        m = len(active)
        y, y_rows = (self.y, self.shared_rows) if labels is None else (labels, active)
        if self.per_seed:
            kernels.per_seed_products(self.X, y, theta, active, R, G, self.inv_2n, loss,
                                      1 if gradient else 0)
        elif self.serial(m):
            kernels.shared_products_serial(self.X, y, y_rows, theta, m, R, G, self.inv_2n, loss,
                                           1 if gradient else 0)
        else:
            np.matmul(theta[:m], self.X.T, out=R[:m])
            kernels.residual_and_loss(R, y, y_rows, m, self.inv_2n, loss)
            if gradient:
                np.matmul(R[:m], self.X, out=G[:m])


# Per-step bookkeeping of the fixed-step loop, compiled: as Python loops over 64 seeds it cost
# about 0.3 ms per step (measured), as much as a whole stage kernel at moderate d.
@njit(**JIT_OPTIONS)
def _finish_fixed(active, live, dt, stages, max_steps, st):
    """After a fixed step: count it for the seeds that moved (their loss is now unknown) and stop
    those at ``max_steps``. Returns whether every active seed moved."""
    all_live = True
    for a in range(active.shape[0]):
        if live[a] == 0:
            all_live = False
            continue
        s = active[a]
        st.steps[s] += 1
        st.accepted[s] += 1
        st.nfev[s] += stages
        st.t[s] = st.steps[s] * dt
        st.loss[s] = np.nan
        if st.steps[s] >= max_steps and st.status[s] == RUNNING:
            st.status[s] = MAX_STEPS
            st.t_stop[s] = st.t[s]
    return all_live


class StagePlan(NamedTuple):
    """The stage calls of one step of an embedded pair, read from its tableau: call p computes
    stage ``stage[p]`` (-1: none) then, by ``mode[p]``, the combination of the first
    ``terms[p]`` stages with ``coeffs[p]`` (the next stage input, or the error). FSAL pairs
    start from stage 1 (stage 0 is the last stage of the previous step)."""

    stage: np.ndarray
    mode: np.ndarray
    coeffs: np.ndarray
    terms: np.ndarray


def stage_plan(tableau, dtype) -> StagePlan:
    """The :class:`StagePlan` of an embedded pair: stages 1 (FSAL) or 0 up to the last, each
    forming the next stage input; the last one forms the error (FSAL: its input is the new
    state) or the new state, whose error is then a combination of its own."""
    A, last = tableau.A, tableau.stages - 1
    calls = [(i, kernels.MODE_NEXT_INPUT, A[i + 1], i + 1) for i in range(1 if tableau.fsal else 0, last)]
    if tableau.fsal:
        calls.append((last, kernels.MODE_ERROR, tableau.E, tableau.stages))
    else:
        calls += [(last, kernels.MODE_NEXT_INPUT, tableau.B, tableau.stages),
                  (-1, kernels.MODE_ERROR, tableau.E, tableau.stages)]
    stage, mode, coeffs, terms = zip(*calls)
    return StagePlan(np.array(stage, dtype=np.int64), np.array(mode, dtype=np.int64),
                     np.array(coeffs, dtype=dtype), np.array(terms, dtype=np.int64))


#: Steps per call of the compiled loop: a stop request (a signal) waits for the call's end, a
#: few milliseconds at the state sizes that take the loop (threads.SERIAL_STATE_WORK elements).
STEPS_PER_CALL = 32


@njit(**JIT_OPTIONS)
def _adaptive_steps_serial(U, Y, K, theta, G, R, X, y, per_seed, inv_n, inv_2n, param, h_work, live,
                           stage_loss, err, err_partial, scratch, first_input, plan, fsal,
                           evaluations, expo1, t_target, targets, st, trial, loss_tol, max_steps,
                           rtol, atol, seeds_buffer, accepted_buffer):
    """Up to STEPS_PER_CALL steps of an embedded pair for the seeds running short of
    ``t_target``, all in the calling thread: the same calls, in the same order, as
    :meth:`Integrator._adaptive_step` (its serial twins, products seed by seed), for states
    small enough that calling them from Python would cost more than they do. Returns whether
    every running seed is at ``t_target``."""
    size = float(U.shape[1] * U.shape[2])
    for _ in range(STEPS_PER_CALL):
        m = 0
        for s in range(U.shape[0]):
            if st.status[s] == RUNNING and st.t[s] < t_target:
                seeds_buffer[m] = s
                m += 1
        if m == 0:
            return True
        active = seeds_buffer[:m]
        live[:m] = 1
        controller.propose_steps_fastmath(active, targets, st, trial, h_work)
        if fsal:
            kernels.stage_input_serial(U, K, first_input, 1, h_work, param, active, Y, theta, scratch)
        else:
            kernels.layer_products_serial(U, param, active, theta)
        for p in range(plan.stage.shape[0]):
            stage = plan.stage[p]
            if stage >= 0:
                for a in range(m):
                    k = active[a] if per_seed else 0
                    stage_loss[a] = kernels.one_seed_products(X[k], y[k], theta[a], R[a], G[a],
                                                              inv_2n, 1)
            kernels.rk_stage_serial(U, U if stage == 0 else Y, G, K, stage, 1 if stage >= 0 else 0,
                                    inv_n, h_work, param, active, live, plan.mode[p], plan.coeffs[p],
                                    plan.terms[p], Y, theta, rtol, atol, err_partial, scratch)
            if stage == 0:
                controller.screen_losses(active, live, stage_loss, loss_tol, st)
        if not fsal:
            stage_loss[:m] = np.nan
        kernels.rms_of_blocks(err_partial, m, size, err)
        controller.control_steps_fastmath(active, live, err, stage_loss, targets, st, trial, expo1,
                                          evaluations, loss_tol, max_steps)
        n_accepted = 0
        for a in range(m):
            if trial.accepted[active[a]]:
                accepted_buffer[n_accepted] = active[a]
                n_accepted += 1
        if n_accepted:
            kernels.accept_steps_serial(U, Y, K, plan.stage[-1] if fsal else -1, 0,
                                        accepted_buffer[:n_accepted])
    return False


class Integrator(Solver):
    """Advances a batch of seeds of the layer flow, one method, preallocated buffers.

    Parameters
    ----------
    method : str
        A key of :data:`ddln_fast.tableaus.TABLEAUS` ("euler", "rk4", "dopri5", ...).
    problem : Problem
    u0 : ndarray of shape (S, P, d)
        Initial layers (copied, cast to ``dtype``): P = L (product), 2L (difference: the u
        half, then the v half) or 2 (power: u, v).
    dt : float
        Step (fixed-step methods); upper bound of the first step (embedded pairs).
    rtol, atol : float
        Tolerances of an embedded pair's error control (per seed RMS norm over all L*d
        components).
    loss_tol : float
        A seed stops once its loss is below this (0: never).
    max_steps : int
        A seed stops after this many attempted steps.
    parametrization : Parametrization, optional
        How theta is made of the P layer rows (default: their product).
    """

    #: Whether the fixed step (:meth:`_fixed_step`) starts with the products of all seeds at the
    #: current layers, so that a checkpoint's loss evaluation can also compute them for it (a
    #: subclass whose step evaluates something else, e.g. a batch, sets False).
    REUSES_CHECKPOINT_GRADIENT = True

    def __init__(self, method, problem: Problem, u0, dt=0.01, rtol=1e-8, atol=1e-12,
                 loss_tol=0.0, max_steps=10_000_000, dtype=np.float64,
                 parametrization: Parametrization | None = None):
        super().__init__()
        self.method = method
        self.tableau = TABLEAUS[method]
        self.dtype = np.dtype(dtype).type
        self.U = np.array(u0, dtype=self.dtype, order="C")
        S, L, d = self.U.shape
        self.seeds, self.depth, self.dim = S, L, d
        self.parametrization = parametrization or Parametrization.of_layers("product", L)
        if self.parametrization.layer_count != L:
            raise ValueError(f"u0 has {L} layer rows, the {self.parametrization.describe()} "
                             f"parametrization {self.parametrization.layer_count}")
        #: the parametrization as the kernels take it
        self.param = self.parametrization.kernel()
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
        self.err_partial = np.zeros((S, kernels.n_blocks(d)))
        self.live = np.ones(S, dtype=np.uint8)
        # the step of each seed in the kernels' dtype (fixed-step methods: always dt)
        self.h_work = np.full(S, self.dt, dtype=self.dtype)
        self.scratch = kernels.stage_scratch(L, self.dtype)
        self.A = [row.astype(self.dtype) for row in self.tableau.A]
        self.one = np.ones(1, dtype=self.dtype)
        self.B = self.tableau.B.astype(self.dtype)
        #: the stage calls of one adaptive step (None for fixed-step methods)
        self.plan = stage_plan(self.tableau, self.dtype) if self.tableau.adaptive else None
        #: largest active state (m L d elements) whose adaptive steps run as one compiled loop
        #: (results are the same either way; the loop saves the calls from Python per step)
        self.compiled_loop_work = threads.SERIAL_STATE_WORK
        self.state = SeedState.fresh(S, self.dt)
        #: an embedded pair has chosen its starting steps (and, FSAL, holds f(U) in K[0])
        self.started = False
        self._theta_rows = None
        #: seeds whose R, G and stage_loss hold the products at their current layers (a
        #: checkpoint of a fixed-step run computes them for its loss; the next step uses them)
        self._gradient_rows = None

    # -- the state of a resumable run -----------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        """``U`` (S, L, d); ``theta_rows`` (S,) and ``theta_cache`` (S, d): between two
        checkpoints the fixed-step loop reuses the theta its last step computed (the seeds in
        ``active`` order, padded with -1), whose bits may differ from theta recomputed from U;
        for embedded pairs ``fsal`` (S, L, d), the first stage of the next step, and
        ``fsal_ready`` (1,), whether the starting steps are chosen; then the SeedState arrays."""
        rows = np.full(self.seeds, -1, dtype=np.int64)
        if self._theta_rows is not None:
            rows[: len(self._theta_rows)] = self._theta_rows
        arrays = {"U": self.U, "theta_rows": rows, "theta_cache": self.theta}
        if self.tableau.adaptive:
            arrays["fsal"] = self.K[0]
            arrays["fsal_ready"] = np.array([self.started], dtype=np.int8)
        return {**arrays, **self.state.as_dict()}

    def restore_state(self, arrays) -> None:
        self._gradient_rows = None
        self.U[...] = arrays["U"]
        self.state = SeedState.from_dict(arrays)
        # files written before fsal_ready existed always held a started state
        if self.tableau.adaptive and "fsal" in arrays and bool(arrays.get("fsal_ready", np.ones(1))[0]):
            self.K[0][...] = arrays["fsal"]
            self.started = True
        self._theta_rows = None
        if "theta_rows" in arrays:
            rows = np.asarray(arrays["theta_rows"])
            rows = rows[rows >= 0]
            if rows.size:
                self.theta[: rows.size] = arrays["theta_cache"][: rows.size]
                self._theta_rows = rows.astype(np.int64)

    # -- checkpoint values ----------------------------------------------------------------------
    def current_losses(self, theta=None) -> np.ndarray:
        """Loss of every seed at its current layers (one exact residual evaluation).

        ``theta``: :meth:`theta_of_all` of the current layers, when the caller has it already
        (a checkpoint stores both: the product over the layers is then taken once)."""
        active = np.arange(self.seeds)
        if theta is None:
            theta = self.theta_of_all()
        # A fixed step starts with these products at the same layers: computing the gradient
        # here too moves the second product from that step to the checkpoint, which then costs
        # no product of its own. Its bits are those the step would compute (theta of U by the
        # same kernel, the same products of all seeds), so resumed runs stay bit-identical.
        fixed = not self.tableau.adaptive
        reuse = self.REUSES_CHECKPOINT_GRADIENT and fixed
        self.products.residual_and_gradient(theta, active, self.R, self.G, self.stage_loss,
                                            gradient=reuse)
        self._gradient_rows = active if reuse else None
        if fixed:
            # The next fixed step starts from theta of these layers, as _theta_of_U computes it:
            # keep it. The state saved with the checkpoint then holds, as its theta cache, the
            # row the checkpoint stores (written once: store.schema.STATE_FROM_ROWS).
            self.theta[: self.seeds] = theta
            self._theta_rows = active
        else:
            self._theta_rows = None
        return self.stage_loss[: self.seeds].copy()

    def invariant_drift(self) -> np.ndarray:
        partial = np.zeros((self.seeds, kernels.n_blocks(self.dim)))
        kernels.invariant_drift_blocks(self.U, self.u0, self.param, partial)
        return partial.max(axis=1)

    def theta_of_all(self) -> np.ndarray:
        out = np.empty((self.seeds, self.dim), dtype=self.dtype)
        kernels.layer_products(self.U, self.param, np.arange(self.seeds), out)
        return out

    def layers(self) -> np.ndarray:
        return self.U

    # -- time stepping --------------------------------------------------------------------------
    def advance_to(self, t_target: float) -> bool:
        wanted = self._threads_wanted = numba.get_num_threads()
        try:
            if self.tableau.adaptive:
                done = self._advance_adaptive(float(t_target))
            else:
                done = self._advance_fixed(int(round(t_target / self.dt)))
        finally:
            numba.set_num_threads(wanted)
        if done:  # (a stop keeps the cache: it is saved, see state_arrays)
            self._theta_rows = None  # the next interval starts from a clean slate (exact resume)
        return done

    def _pick_threads(self, m: int) -> None:
        """The threads of the parallel kernels for ``m`` active seeds (threads.kernel_threads;
        the caller's setting is restored by advance_to)."""
        numba.set_num_threads(threads.kernel_threads(m * self.depth * self.dim, self._threads_wanted))

    def _evaluate(self, active, Y, stage, mode, coeffs, n_terms, Y_out=None, keep=1):
        """Products for the rows in ``self.theta`` (theta of ``Y``), then the fused stage."""
        self.products.residual_and_gradient(self.theta, active, self.R, self.G, self.stage_loss)
        kernels.rk_stage(self.U, Y, self.G, self.K, stage, keep, self.products.inv_n, self.h_work,
                         self.param, active, self.live, mode, coeffs, n_terms, Y if Y_out is None else Y_out,
                         self.theta, self.rtol, self.atol, self.err_partial, self.scratch)

    def _theta_of_U(self, active):
        kernels.layer_products(self.U, self.param, active, self.theta)
        self._theta_rows = active

    def _advance_fixed(self, target_step: int) -> bool:
        st = self.state

        def step(active):
            self._pick_threads(active.size)
            if self._theta_rows is None or not np.array_equal(self._theta_rows, active):
                self._theta_of_U(active)
            self._fixed_step(active)
            all_live = _finish_fixed(active, self.live, self.dt, self.tableau.stages,
                                     self.max_steps, st)
            # theta rows now hold theta of the new layers, for the live seeds
            self._theta_rows = active if all_live else None

        return self.step_rounds(lambda: st.steps < target_step, step)

    def _fixed_step(self, active) -> None:
        """One step of the active seeds from U (theta rows of U in ``self.theta``): seeds whose
        loss stops them get ``live = 0``; the others move, with theta of their new layers left
        in ``self.theta``. Subclasses replace this step (e.g. stochastic gradient descent)."""
        st, tab = self.state, self.tableau
        if self._gradient_rows is None or not np.array_equal(self._gradient_rows, active):
            self.products.residual_and_gradient(self.theta, active, self.R, self.G, self.stage_loss)
        self._gradient_rows = None
        self.live[: active.size] = 1
        controller.screen_losses(active, self.live, self.stage_loss, self.loss_tol, st)
        if tab.stages == 1:
            kernels.euler_step(self.U, self.G, self.products.inv_n, self.h_work, self.param,
                               active, self.live, self.theta, self.scratch)
        for i in range(tab.stages if tab.stages > 1 else 0):
            last = i == tab.stages - 1
            if i > 0:
                self.products.residual_and_gradient(self.theta, active, self.R, self.G, self.stage_loss)
            # the last stage's derivative is only needed inside its own call (no FSAL)
            kernels.rk_stage(self.U, self.U if i == 0 else self.Y, self.G, self.K, i,
                             0 if last else 1, self.products.inv_n, self.h_work, self.param,
                             active, self.live, kernels.MODE_NEXT_INPUT,
                             self.B if last else self.A[i + 1], i + 1,
                             self.U if last else self.Y, self.theta, self.rtol, self.atol,
                             self.err_partial, self.scratch)

    def _start_adaptive(self, active) -> None:
        """f(u0) (the first stage and the initial loss), then Hairer's starting step per seed."""
        st = self.state
        m = active.size
        self.live[:m] = 1
        self._theta_of_U(active)
        self._evaluate(active, self.U, 0, kernels.MODE_DERIVATIVE, self.B, 0)
        st.nfev[active] += 1
        controller.screen_losses(active, self.live, self.stage_loss, 0.0, st)  # diverged only
        # norms in numpy: once per seed, and their bits decide every later step
        U, f0 = self.U[active].astype(np.float64), self.K[0][active].astype(np.float64)
        scale = self.atol + self.rtol * np.abs(U)
        scale = np.maximum(scale, np.finfo(np.float64).tiny)
        rms = lambda v: np.sqrt(np.mean((v / scale) ** 2, axis=(1, 2)))  # noqa: E731
        d1 = rms(f0)
        h0 = controller.first_trial_step(rms(U), d1, self.dt)
        self.h_work[active] = h0
        kernels.stage_input(self.U, self.K, self.one, 1, self.h_work, self.param, active, self.Y,
                            self.theta, self.scratch)
        self._evaluate(active, self.Y, 1, kernels.MODE_DERIVATIVE, self.B, 0)
        st.nfev[active] += 1
        d2 = rms(self.K[1][active].astype(np.float64) - f0) / h0
        st.h[active] = controller.starting_step(h0, d1, d2, self.tableau.error_order, self.dt)
        self.started = True

    def _advance_adaptive(self, t_target: float) -> bool:
        """Steps of the embedded pair, all active seeds together, until every running seed is
        at ``t_target``. While the active state is small (the products seed by seed, the state
        within threads.SERIAL_STATE_WORK) whole runs of steps are one compiled call."""
        st, tab = self.state, self.tableau
        if not self.started:
            self._start_adaptive(np.flatnonzero(st.status == RUNNING))
        trial = Trial.empty(self.seeds)
        targets = np.full(self.seeds, t_target)
        expo1 = controller.control_for(tab.error_order).expo1
        buffers = (np.zeros(self.seeds, dtype=np.int64), np.zeros(self.seeds, dtype=np.int64))

        def step(active):
            m = active.size
            if self.products.serial(m) and m * self.depth * self.dim <= self.compiled_loop_work:
                p = self.products
                _adaptive_steps_serial(self.U, self.Y, self.K, self.theta, self.G, self.R,
                                       p.X_by_seed, p.y, p.per_seed, p.inv_n, p.inv_2n, self.param,
                                       self.h_work,
                                       self.live, self.stage_loss, self.err, self.err_partial,
                                       self.scratch, self.A[1], self.plan, tab.fsal,
                                       tab.evaluations, expo1, t_target, targets, st, trial,
                                       self.loss_tol, self.max_steps, self.rtol, self.atol,
                                       *buffers)
            else:
                self._pick_threads(m)
                self._adaptive_step(active, targets, trial, expo1)

        return self.step_rounds(lambda: st.t < t_target, step)

    def _adaptive_step(self, active, targets, trial, expo1) -> None:
        """One step of every active seed: FSAL, the first stage is the last one of the
        previous accepted step; otherwise it is evaluated first, and the loss of the current
        layers is screened there (loss_tol, divergence) before the step. Then the stages of
        :attr:`plan`, the error norms and the controller."""
        st, tab, plan = self.state, self.tableau, self.plan
        m = active.size
        self.live[:m] = 1
        controller.propose_steps_fastmath(active, targets, st, trial, self.h_work)
        if tab.fsal:
            kernels.stage_input(self.U, self.K, self.A[1], 1, self.h_work, self.param, active,
                                self.Y, self.theta, self.scratch)
        else:
            kernels.layer_products(self.U, self.param, active, self.theta)
        for p, stage in enumerate(plan.stage):
            if stage >= 0:
                self.products.residual_and_gradient(self.theta, active, self.R, self.G,
                                                    self.stage_loss)
            kernels.rk_stage(self.U, self.U if stage == 0 else self.Y, self.G, self.K, stage,
                             1 if stage >= 0 else 0, self.products.inv_n, self.h_work, self.param,
                             active, self.live, plan.mode[p], plan.coeffs[p], plan.terms[p], self.Y,
                             self.theta, self.rtol, self.atol, self.err_partial, self.scratch)
            if stage == 0:
                controller.screen_losses(active, self.live, self.stage_loss, self.loss_tol, st)
        if not tab.fsal:  # the loss of the new state is known at the next step's first stage
            self.stage_loss[:m] = np.nan
        kernels.rms_of_blocks(self.err_partial, m, float(self.depth * self.dim), self.err)
        controller.control_steps_fastmath(active, self.live, self.err, self.stage_loss, targets,
                                          st, trial, expo1, tab.evaluations, self.loss_tol,
                                          self.max_steps)
        accepted = active[trial.accepted[active] == 1]
        if accepted.size:
            kernels.accept_steps(self.U, self.Y, self.K, plan.stage[-1] if tab.fsal else -1, 0,
                                 accepted)
