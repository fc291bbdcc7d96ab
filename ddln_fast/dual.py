"""The ``dual`` method: the layer flow integrated in dual coordinates by Radau IIA(5).

Along the layer flow every coordinate follows its own clock, theta_i(t) = F_i(s_i(t)), and the
clocks are s(t) = X^T nu(t) / n with nu(t) = int_0^t (X theta - y) (Labarrière et al.,
arXiv:2412.16765: the clock view of the layer flow). The whole flow is therefore the
n-dimensional ODE

    nu' = X F(X^T nu / n) - y,   nu(0) = 0,   J = -X diag(h) X^T / n   (h_i = -F_i' >= 0),

for every initialization (frozen coordinates have h = 0; a rank-deficient X makes J singular,
which the implicit step does not mind). J is symmetric negative semidefinite, and the flow is
stiff at small scales (h spans many decades), so the default scheme is the L-stable Radau IIA
method of order 5 (:mod:`ddln_fast.radau`) with the exact Jacobian, simplified Newton with the
Jacobian kept while Newton converges fast, and one tridiagonalization per Jacobian instead of
one factorization per step size. At small scales most coordinates sit near zero, and their part
of the Jacobian is below 1e-3 of what the Newton matrices add at the step size; they are left
out (:meth:`DualProducts.leave_out_small`), and the factorization has the rank of the others
(:meth:`DualProducts.factor_jacobian`). That changes how fast Newton converges, by that 1e-3 at
most, not what it converges to: configuration C at alpha = 1e-4, 5.0 -> 3.1 s. (Leaving out
those below eps max(h) instead, whatever the step, made a depth-4 run at alpha = 1e-6 stall in
its slow tail, where steps of 1e17 meet coordinates with h_i ~ 1e-17 max(h).)

When d < n only the part of nu in the range of X moves the clocks: with a thin QR factorization
X = Q R (Q of shape (n, d) with orthonormal columns), X^T nu = R^T Q^T nu, and mu = Q^T nu in
R^d follows the same ODE with the data (R, Q^T y) of d rows (the 1/n stays that of the n
samples). This s-form (a state of the size of the clocks) is used whenever d < n; the loss
adds the constant ||y - Q Q^T y||^2 / (2n) of the part of y that no theta reaches (see
:class:`DualProducts`). Below, "nu", "X" and "y" stand for mu, R and Q^T y in the s-form.

The right-hand side depends on nu only through the clocks, so the integrator carries the clocks
s (d numbers per seed) next to nu and advances them by the step's own increment,
s_new = s + X^T Z_3 / n: their rounding error then scales with the increments, not with |nu|
(which grows like t in plateaus and without bound when X theta = y has no solution).

Double-double clocks and time. At depth >= 3 a coordinate activates when its clock nears its
blow-up clock, of size about alpha^(2-L), and theta there depends on the distance to it: in
float64 a clock of 1e12 is known to 1e-4 only, far too coarse. The clocks are therefore kept as
double-doubles s + s_lo (each increment added by an error-free two-sum; the clock map takes the
pair), and so is the flow time (the steps of an activation are shorter than an ulp of t). What
remains is the rounding of the right-hand side itself (see the error norm below); it sets the
limit CLOCK_LIMIT.

Error norm. What the clocks must get right is each coordinate's clock: theta_i = F_i(s_i), and
the activation of coordinate i is the moment s_i reaches a fixed clock. Local errors are
therefore measured on the clocks, delta s = X^T delta nu / n, coordinate by coordinate, as an
RMS over the d coordinates of delta s_i / tol_i with

    tol_i = max(min(atol + rtol |s_i|, (atol + rtol |theta_i|) / h_i), 64 eps^2 |s_i|):

the clock relative to itself (which places activations to a relative rtol in time), and tight
enough that the induced change h_i delta s_i of theta_i stays within atol + rtol |theta_i|,
but never below what the double-double represents of s_i. Nor below the rounding of a step's
own increment: the clock derivative
X^T (X theta - y) / n is computed with an absolute error of about eps (|X|^T |y|)_i / n (near
a fit, X theta - y cancels), so a step of size h cannot place a clock better than h times that;
late in a run, where steps grow like t, a tolerance below this floor would make Newton chase
rounding noise. A norm on nu itself would let absolute errors ~ rtol |nu| through, which grow
with t in plateaus and move the clocks of coordinates about to activate. The tolerances at
both ends of a step are used (the smaller one).

No accepted step raises the loss beyond the tolerances. Once a run has converged, its steps
grow far beyond the flow's time scales, and Radau's error estimate, filtered by
(I - h gamma J)^-1, then sees almost nothing, while Newton's tolerance (raised to the rounding
floor above, which grows with h) lets the stiff components of the state off by far more than
the requested tolerance. Measured at depth
4, alpha = 1e-6, rtol 1e-10: steps of 1e15 accepted with the loss rising from 2.8e-15 to
5.8e-10, and theta off by 3e-5 in checkpoints long after the flow had converged. A gradient
flow's loss cannot rise, and the residual at a step's end is computed anyway (it is the next
step's f), so a step is rejected, as one whose error estimate failed, when ||X theta - y||
grows by more than a change of theta within the tolerances can make it grow,
||X||_2 ||atol + rtol |theta| ||, plus the residual's rounding
(:func:`ddln_fast.dual_products.residual_rises`). The residual is then evaluated for rejected
steps too: one evaluation more per rejection.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import numba
from numba import njit

from . import kernels, radau, threads
from .controller import (DIVERGED, RUNNING, SeedState, Trial, control_for, control_steps, first_trial_step,
                         propose_steps, reject_steps, screen_losses, starting_step)
from .errors import InputError
from .clock_series import dd_add
from .dual_products import DualProducts
from .dual_step import (CLOCK_TOLERANCE_KERNELS, _weighted_rms, clock_tolerance, error_estimates,
                        newton_iterations)
from .kernels import STRICT_JIT_OPTIONS, call_by_size
from .threads import blas_for_products, hot_loop_serial_blas, kernel_threads, serial_products
from .problem import Problem
from .solver import Solver

#: The largest blow-up clock (depth >= 3; about alpha^(2-L)) the method accepts. The clocks and
#: the time are double-doubles, but a step of length h still places a clock only to about
#: h eps (|X|^T |y|)_i / n (the right-hand side X theta - y cancels near a fit), and the steps
#: between activations are as long as the activation times. Measured with 4 seeds each, n = 40,
#: d = 200, to loss 1e-10: blow-up clocks up to 1.7e15 (depths 3-6, signed and jittered
#: layers) in 700-2100 steps per seed; at 1.5e16 still right but in 3-4 times the steps; at
#: 1.6e17 one seed of four no longer converged, at 8e17 none did.
CLOCK_LIMIT = 1e16
#: The time is a double-double (state.t + t_lo): a step stalls only at 16 of its ulps, 16 eps^2 |t|
#: (in the controller's unit eps |t|: 16 eps).
TIME_STALL_ULPS = 16.0 * float(np.finfo(np.float64).eps)
#: The rounding floor of a step's clock increments, in units of eps (|X|^T |y|)_i / n per unit
#: of flow time (see the module docstring).
CLOCK_NOISE_ULPS = 32.0


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
#: Columns of DualIntegrator.flags (per seed): started; has a previous accepted step; its
#: Jacobian is the one at its current state; it needs a new Jacobian before its next step.
STARTED, HAS_PREVIOUS, CURRENT_JAC, NEED_JAC = range(4)


@njit(**STRICT_JIT_OPTIONS)
def _accept_steps(seeds, accepted, t_old, h_step, Z, s_new, s_new_lo, theta_new, h_new, f_end, iterations,
                  rate, landing, t, t_lo, status, t_stop, nu, s, s_lo, theta, hvec, f, Z_prev, h_old, flags,
                  counters, tolerances, tol, tol_newton, serial_work):
    """Move every seed whose step the controller accepted (accepted[seed] = 1; row a of the
    step's arrays belongs to seeds[a]) to the step's end, and count the others' rejections.

    The time becomes the double-double t_old + h (the controller moved t to fl(t_old + h), or
    onto the target, where t_lo = 0: at tiny scales the steps of an activation are smaller
    than an ulp of t); a seed that stopped in this step (stalled, max_steps) gets its stop
    time. Clocks, theta, h, nu, f, the clock tolerances and the step's history move; the
    Jacobian is marked old, and to be rebuilt when Newton needed more than two iterations at
    a rate above 1e-3 (scipy's Radau rule: keep it while Newton converges fast).

    Returns (ok, s_old, s_old_lo): the rows accepted, and their clocks before the step.
    """
    n, d = nu.shape[1], s.shape[1]
    for seed in seeds:
        counters[seed, 2] += accepted[seed] == 0
    ok = np.nonzero(accepted[seeds] == 1)[0]
    s_old = np.empty((ok.size, d))
    s_old_lo = np.empty((ok.size, d))
    for a in range(ok.size):
        r = ok[a]
        seed = seeds[r]
        if landing[seed] == 1:
            t_lo[seed] = 0.0
        else:
            t[seed], t_lo[seed] = dd_add(t_old[r], t_lo[seed], h_step[r])
        if status[seed] != RUNNING:
            t_stop[seed] = t[seed]
        for i in range(d):
            s_old[a, i] = s[seed, i]
            s_old_lo[a, i] = s_lo[seed, i]
            s[seed, i] = s_new[r, i]
            s_lo[seed, i] = s_new_lo[r, i]
            theta[seed, i] = theta_new[r, i]
            hvec[seed, i] = h_new[r, i]
        for i in range(n):
            nu[seed, i] += Z[r, 2, i]
            f[seed, i] = f_end[r, i]
            for k in range(3):
                Z_prev[seed, k, i] = Z[r, k, i]
        h_old[seed] = h_step[r]
        flags[seed, HAS_PREVIOUS] = 1
        flags[seed, CURRENT_JAC] = 0
        if iterations[r] > 2 and rate[r] > 1e-3:
            flags[seed, NEED_JAC] = 1
    rtol, atol, newton_floor, _, _ = tolerances
    clock_tolerance(s_new[ok], theta_new[ok], h_new[ok], seeds[ok], rtol, atol, newton_floor, tol, tol_newton,
                    serial_work)
    return ok, s_old, s_old_lo


# ---------------------------------------------------------------------------------------------
# The solver
# ---------------------------------------------------------------------------------------------
class DualIntegrator(Solver):
    """Radau IIA(5) on the dual flow of every seed, one step size per seed, seeds batched: a
    :class:`ddln_fast.solver.Solver` (its state is the clocks and nu, not the layers, which are
    recovered from the clocks for checkpoints).

    Parameters
    ----------
    problem : Problem
    u0 : ndarray of shape (S, P, d)
        Initial layers (P rows of the parametrization).
    dt : float
        Upper bound of the first step.
    rtol, atol : float
        Tolerances of the clock error norm (module docstring).
    loss_tol, max_steps : stopping rules, as for the layer integrator.
    activation_level : ndarray of shape (S,), optional
        Level of |theta_i| whose first crossing is recorded per coordinate (see
        :mod:`ddln_fast.events`); zero or None: no activation events.
    clock_map : ClockMap, optional
        The clock map of ``u0`` (built when not given).
    parametrization : Parametrization, optional
        How theta is made of the layers (default: their product); the clock map is built for it.
    s_form : bool, optional
        Integrate mu = Q^T nu in R^d instead of nu in R^n (:class:`DualProducts`); None (the
        default): when d < n, where it is the smaller state. False forces the nu-form.

    Attributes
    ----------
    n : int
        The dimension of the dual state: the samples n, or d in the s-form (``products.n`` is
        always the samples). ``nu``, ``f`` and ``Z_prev`` have this length: in the s-form they
        hold mu = Q^T nu, its derivative and its stage increments.
    """

    method = "dual"
    #: The step-size control of the Radau solver: Gustafsson's predictive controller (RADAU5)
    #: with the exponent of the order-3 error estimate.
    control = control_for(radau.ERROR_ORDER, beta=0.0, predictive=True, stall_ulps=TIME_STALL_ULPS)

    def __init__(self, problem: Problem, u0, dt=0.01, rtol=1e-8, atol=1e-12, loss_tol=0.0,
                 max_steps=10_000_000, dtype=np.float64, activation_level=None, clock_map=None,
                 parametrization=None, s_form=None):
        from .clockmap import ClockMap
        from .events import EventRecorder
        from .parametrization import Parametrization

        super().__init__()
        self.dtype = np.dtype(dtype).type
        if self.dtype is not np.float64:
            raise InputError('integrator.method = "dual" runs in float64 only (set run.dtype = "float64")')
        if not atol > 0:
            raise InputError('integrator.atol = 0 with method "dual": the clocks start at 0, where a '
                             'purely relative tolerance is undefined; set atol > 0')
        self.u0 = np.array(u0, dtype=np.float64)
        S, L, d = self.u0.shape
        self.seeds, self.depth, self.dim = S, L, d
        self.parametrization = param = parametrization or Parametrization.of_layers("product", L)
        self.clock = clock_map if clock_map is not None else ClockMap.from_layers(
            self.u0, param.name, param.power if param.name == "power" else None)
        check_clock_range(self.clock, param.degree)
        if problem.per_seed and problem.X.shape[0] != S:
            raise ValueError(f"per-seed data of {problem.X.shape[0]} seeds for {S} initial layers")
        self.products = DualProducts(problem, s_form)
        n = self.products.rows
        self.n = n
        self.dt = float(dt)
        # The embedded estimate has order 3, the solution order 5: RADAU5's conversion of the
        # user's tolerances into those of the estimate, so that the error in theta is about rtol.
        self.requested = (float(rtol), float(atol))
        self.rtol, self.atol = radau.estimate_tolerances(float(rtol), float(atol))
        self.loss_tol, self.max_steps = float(loss_tol), int(max_steps)
        self.newton_tol = radau.newton_tolerance(self.rtol)
        # Newton increments need not be resolved below ~10 ulps of a (double-double) clock
        # (RADAU5's 10 eps / rtol term of its Newton tolerance, per coordinate): in tolerance
        # units that is a floor of 10 / newton_tol ulps
        self.newton_floor = 10.0 / self.newton_tol
        self._tolerances = (self.rtol, self.atol, self.newton_floor) + self.requested  # (dual_step)
        # the state (saved and restored)
        self.state = SeedState.fresh(S, self.dt)
        self.nu = np.zeros((S, n))
        self.s = np.zeros((S, d))
        self.s_lo = np.zeros((S, d))         # the clocks are double-doubles s + s_lo
        self.t_lo = np.zeros(S)              # and so is the time, state.t + t_lo
        self.f = np.zeros((S, n))            # nu' at the current state (the step start)
        self.Z_prev = np.zeros((S, 3, n))    # stage increments of the last accepted step
        self.h_old = np.zeros(S)             # its size
        self.faccon = np.ones(S)             # Newton contraction factor carried between steps
        self.jac_h = np.zeros((S, d))        # h at the point of each seed's Jacobian (0: left out)
        self.jac_reach = np.full(S, np.inf)  # the longest step it serves (DualProducts.leave_out_small)
        self.flags = np.zeros((S, 4), dtype=np.int8)  # started, has_previous, current_jac, need_jac
        self.counters = np.zeros((S, 3), dtype=np.int64)  # jacobians, newton failures, rejections
        # derived from the data or the state
        self.noise = CLOCK_NOISE_ULPS * self.products.clock_noise_rate(S)  # (module docstring)
        self.theta = np.zeros((S, d))
        self.hvec = np.zeros((S, d))
        self.tol = np.zeros((S, d))
        self.tol_newton = np.zeros((S, d))
        # each seed's Jacobian as A = V B V^T (B tridiagonal; DualProducts.factor_jacobian):
        # V^T in basis[s, :rank[s]]
        self.basis = np.zeros((S, n, n))
        self.rank = np.zeros(S, dtype=np.int64)
        self.tri_diag = np.zeros((S, n))
        self.tri_off = np.zeros((S, n))
        self.trial = Trial.empty(S)
        self.events = EventRecorder(self.clock, activation_level, S, d)
        self._threads_wanted = numba.get_num_threads()

    # -- what a checkpoint stores ---------------------------------------------------------------
    def theta_of_all(self) -> np.ndarray:
        theta, _ = self.clock.evaluate(self.s, s_lo=self.s_lo)
        return theta

    def layers(self) -> np.ndarray:
        """Layers recovered from the clocks, shape (S, L, d)."""
        return self.clock.layers(self.s, s_lo=self.s_lo)

    def current_losses(self, theta=None) -> np.ndarray:
        if theta is None:
            theta = self.theta_of_all()
        seeds = np.arange(self.seeds)
        r = np.empty((self.seeds, self.n))
        self.products.residuals(theta, seeds, r)
        return self.products.losses(r, seeds)

    def run_attributes(self) -> dict[str, str]:
        return {"dual_state": self.products.describe()}

    def invariant_drift(self) -> np.ndarray:
        """The layer methods' drift (:func:`ddln_fast.kernels.invariant_drift_blocks`: within each
        half; power: its conserved quantity) of the layers recovered from the clocks: computed,
        not assumed to be zero."""
        partial = np.zeros((self.seeds, kernels.n_blocks(self.dim)))
        kernels.invariant_drift_blocks(self.layers(), self.u0, self.parametrization.kernel(), partial)
        return partial.max(axis=1)

    # -- exact resume -------------------------------------------------------------------------------
    _ARRAYS = ("nu", "s", "s_lo", "t_lo", "f", "Z_prev", "h_old", "faccon", "jac_h", "jac_reach", "flags",
               "counters")

    def state_arrays(self) -> dict[str, np.ndarray]:
        arrays = {name: getattr(self, name) for name in self._ARRAYS}
        arrays.update(self.state.as_dict())
        arrays.update(self.events.state_arrays())
        return arrays

    def restore_state(self, arrays) -> None:
        """Continue from :meth:`state_arrays` of a saved run (bit-identical: the derived arrays
        are recomputed by the same code from the same numbers)."""
        for name in self._ARRAYS:
            getattr(self, name)[...] = arrays[name]
        self.state = SeedState.from_dict(arrays)
        self.events.restore(arrays)
        started = np.flatnonzero(self.flags[:, STARTED] == 1)
        if started.size:
            self._derive(started)
            self._factor_jacobians(started, self.jac_h[started])

    def _derive(self, seeds):
        """theta, h and the clock tolerance at the current clocks of ``seeds``."""
        theta = np.empty((seeds.size, self.dim))
        h = np.empty((seeds.size, self.dim))
        self.clock.evaluate(self.s[seeds], theta=theta, h=h, rows=seeds, s_lo=self.s_lo[seeds])
        self.theta[seeds] = theta
        self.hvec[seeds] = h
        call_by_size(CLOCK_TOLERANCE_KERNELS, theta.size, self.s[seeds], theta, h, seeds, self.rtol,
                     self.atol, self.newton_floor, self.tol, self.tol_newton)

    # -- Jacobians --------------------------------------------------------------------------------
    def _factor_jacobians(self, seeds, h, stepping=False):
        """A = X diag(h) X^T / n of ``seeds`` (h : (m, d)) as V B V^T, B tridiagonal, into
        self.basis (V^T), self.rank, self.tri_diag and self.tri_off (:mod:`ddln_fast.radau`);
        ``stepping``: called within :meth:`advance_to`."""
        # per-seed n x n algebra on one BLAS thread (threads.blas_for_products; within
        # advance_to, small products have it already)
        with nullcontext() if stepping and serial_products(self.n * self.dim) else hot_loop_serial_blas():
            for a, seed in enumerate(seeds):
                self.rank[seed] = self.products.factor_jacobian(
                    h[a], seed, self.basis[seed], self.tri_diag[seed], self.tri_off[seed])

    def _jacobian(self):
        """The factored Jacobians as the kernels of :mod:`ddln_fast.radau` take them."""
        return self.basis, self.tri_diag, self.tri_off, self.rank

    def _refresh_jacobians(self, seeds, step):
        """New Jacobians of ``seeds`` at their current state, for steps of size ``step``."""
        h = self.hvec[seeds].copy()
        self.jac_reach[seeds] = self.products.leave_out_small(h, seeds, step)
        self.jac_h[seeds] = h
        self._factor_jacobians(seeds, self.jac_h[seeds], stepping=True)
        self.flags[seeds, CURRENT_JAC] = 1
        self.flags[seeds, NEED_JAC] = 0
        self.counters[seeds, 0] += 1

    # -- start ------------------------------------------------------------------------------------
    def _start(self, seeds):
        """f(0), the loss, the Jacobian and Hairer's starting step of fresh seeds."""
        st = self.state
        m = seeds.size
        self._derive(seeds)
        r = np.empty((m, self.n))
        self.products.residuals(self.theta[seeds], seeds, r)
        self.f[seeds] = r
        st.loss[seeds] = self.products.losses(r, seeds)
        st.nfev[seeds] += 1
        bad = seeds[~np.isfinite(st.loss[seeds])]
        st.status[bad] = DIVERGED
        st.t_stop[bad] = st.t[bad]
        self.events.start(seeds, st.loss)
        # Hairer's starting step, measured in the clock norm: y0 is the clock s = 0, f0 its
        # derivative X^T f / n, and f1 the derivative after an Euler step of size h0
        never = np.zeros(m)
        g0 = np.empty((m, self.dim))
        self.products.clocks(np.ascontiguousarray(self.f[seeds]), seeds, None, g0)
        d1 = np.empty(m)
        _weighted_rms(g0[:, None, :], self.tol, seeds, g0, False, never, self.noise, d1)
        d0 = np.empty(m)
        _weighted_rms(self.s[seeds][:, None, :], self.tol, seeds, g0, False, never, self.noise, d0)
        h0 = first_trial_step(d0, d1, self.dt)
        theta1, _ = self.clock.evaluate(self.s[seeds] + h0[:, None] * g0, rows=seeds)
        f1 = np.empty((m, self.n))
        self.products.residuals(theta1, seeds, f1)
        st.nfev[seeds] += 1
        g1 = np.empty((m, self.dim))
        self.products.clocks(np.ascontiguousarray(f1 - self.f[seeds]), seeds, None, g1)
        d2 = np.empty(m)
        _weighted_rms((g1 / h0[:, None])[:, None, :], self.tol, seeds, g0, False, never, self.noise, d2)
        with np.errstate(invalid="ignore", over="ignore"):
            h = starting_step(h0, d1, d2, radau.ERROR_ORDER, self.dt)
        st.h[seeds] = np.where(np.isfinite(h), h, h0)
        self._refresh_jacobians(seeds, st.h[seeds])
        self.flags[seeds, STARTED] = 1

    # -- stepping ---------------------------------------------------------------------------------
    def _pick_threads(self, m: int) -> None:
        numba.set_num_threads(kernel_threads(m * 3 * max(self.dim, self.n), self._threads_wanted))

    def advance_to(self, t_target: float) -> bool:
        """Advance every running seed to flow time ``t_target`` (exactly), or until it stops;
        False if ``stop_check`` stopped it first (at a step boundary)."""
        self._threads_wanted = numba.get_num_threads()
        try:
            # Newton trial points may overflow F (rejected, with a smaller step): not a warning
            with np.errstate(over="ignore", invalid="ignore"), \
                    blas_for_products(self.n * self.dim):
                return self._advance(float(t_target))
        finally:
            numba.set_num_threads(self._threads_wanted)

    def _advance(self, t_target) -> bool:
        st = self.state
        fresh = np.flatnonzero((st.status == RUNNING) & (self.flags[:, STARTED] == 0))
        if fresh.size:
            self._start(fresh)
        targets = np.full(self.seeds, t_target)

        def step(active):
            self._pick_threads(active.size)
            propose_steps(active, targets, st, self.trial)
            # a step onto the target starts at the double-double t + t_lo
            landing = active[self.trial.landing[active] == 1]
            self.trial.h[landing] -= self.t_lo[landing]
            # (a Jacobian that leaves coordinates out serves steps up to its reach only)
            need = active[(self.flags[active, NEED_JAC] == 1) | (self.trial.h[active] > self.jac_reach[active])]
            if need.size:
                self._refresh_jacobians(need, self.trial.h[need])
            self._attempt(active, targets)

        return self.step_rounds(lambda: st.t < t_target, step)

    def _attempt(self, active, targets):
        """One step attempt of every active seed: Newton, error estimate, accept or reject."""
        st = self.state
        m = active.size
        n, d = self.n, self.dim
        h_step = self.trial.h[active]
        inv_h = 1.0 / h_step
        Z = np.empty((m, 3, n))
        W = np.empty((m, 3, n))
        sigma = np.empty((m, 3, d))
        sigma_lo = np.empty((m, 3, d))
        outcome = np.zeros(m, dtype=np.int8)
        iterations = np.zeros(m, dtype=np.int64)
        rate = np.zeros(m)
        h_factor = np.ones(m)
        newton_iterations(Z, W, sigma, sigma_lo, active, inv_h, h_step, self.s, self.s_lo, self.Z_prev,
                          self.h_old, self.flags[:, HAS_PREVIOUS], self.clock.kernel_arguments,
                          self.products.kernel_arguments, *self._jacobian(), self.tol_newton, self.noise,
                          self.newton_tol, self.faccon, outcome, iterations, h_factor, rate,
                          threads.SERIAL_STATE_WORK)
        st.nfev[active] += 3 * iterations  # (every row has finished by NEWTON_MAXITER)
        # Newton failed: a smaller step (RADAU5's factor), and a fresh Jacobian if this one was old
        for a in np.nonzero(outcome != radau.NEWTON_CONVERGED)[0]:
            reject_steps(active[a:a + 1], np.ones(1, dtype=np.uint8), h_factor[a], st, self.trial,
                         self.max_steps, self.control.stall_ulps)
            seed = active[a]
            self.counters[seed, 1] += 1
            if self.flags[seed, CURRENT_JAC] == 0:
                self.flags[seed, NEED_JAC] = 1
        done = np.nonzero(outcome == radau.NEWTON_CONVERGED)[0]
        if done.size:
            self._finish(active[done], Z[done], sigma[done], sigma_lo[done], h_step[done],
                         iterations[done], rate[done], targets)

    def _finish(self, seeds, Z, sigma, sigma_lo, h_step, iterations, rate, targets):
        """Error estimate, accept or reject, and the new state of the accepted ``seeds`` (rows of
        Z (c, 3, n), stage clocks sigma + sigma_lo (c, 3, d), step sizes h_step (c,))."""
        st = self.state
        c = seeds.size
        inv_h = 1.0 / h_step
        f_start = self.f[seeds]
        s_new, s_new_lo, theta_new, h_new, err, f_end, again, rose = error_estimates(
            f_start, Z, sigma, sigma_lo, seeds, inv_h, h_step, self.s, self.s_lo, st.rejected, *self._jacobian(),
            self.clock.kernel_arguments, self.products.kernel_arguments, self.products.norms, self._tolerances,
            self.tol, self.noise, threads.SERIAL_STATE_WORK)
        st.nfev[seeds[again == 1]] += 1  # (Hairer's second estimate after a rejection)
        # the loss of a gradient flow never rises: a step whose residual grew beyond what errors
        # within the tolerances explain is wrong however small its estimate (module docstring)
        st.nfev[seeds] += 1  # (the residual at the end)
        err[rose == 1] = np.inf
        t_old, loss_old = st.t[seeds].copy(), st.loss[seeds].copy()
        # the loss goes to the controller's stop checks below, for accepted seeds only: NaN here
        control_steps(seeds, np.ones(c, dtype=np.uint8), err, np.full(c, np.nan), targets, st,
                      self.trial, self.control, 0, self.loss_tol, self.max_steps)
        ok, s_old, s_old_lo = _accept_steps(
            seeds, self.trial.accepted, t_old, h_step, Z, s_new, s_new_lo, theta_new, h_new, f_end, iterations,
            rate, self.trial.landing, st.t, self.t_lo, st.status, st.t_stop, self.nu, self.s, self.s_lo,
            self.theta, self.hvec, self.f, self.Z_prev, self.h_old, self.flags, self.counters, self._tolerances,
            self.tol, self.tol_newton, threads.SERIAL_STATE_WORK)
        if ok.size == 0:
            return
        sa = seeds[ok]
        loss = self.products.losses(f_end[ok], sa)
        st.loss[sa] = loss
        self.events.step(self, sa, t_old[ok], h_step[ok], s_old, s_old_lo, sigma[ok], sigma_lo[ok],
                         loss_old[ok], loss)
        screen_losses(sa, (st.status[sa] == RUNNING).astype(np.uint8), loss, self.loss_tol, st)

def check_clock_range(clock, depth: float) -> None:
    """Refuse initializations whose blow-up clocks are beyond CLOCK_LIMIT (depth, or the power's
    exponent, above 2 at tiny scales: blow-up clocks ~ alpha^(2-L))."""
    if depth <= 2:
        return
    low, high = clock.blow_up
    finite = np.concatenate([np.abs(low[np.isfinite(low)]), np.abs(high[np.isfinite(high)])])
    if finite.size == 0:
        return
    worst = float(finite.max())
    if worst > CLOCK_LIMIT:
        raise InputError(
            f'integrator.method = "dual" at depth {depth}: a blow-up clock of {worst:.3g} (clocks '
            f"scale like alpha^(2-L)) is beyond the float64 limit {CLOCK_LIMIT:.0e} of the dual "
            f"method (about alpha^(L-2) >= 1e-16: the rounding of X theta - y over a step as long "
            f"as the activation times would misplace the clocks); raise model.alpha or use a "
            f"layer method")
