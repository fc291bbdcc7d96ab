"""The ``mirror`` method: dopri5 on the mirror flow d theta/dt = -h(theta) * g(theta) in theta space.

An independent route to the trajectory of the layer flow: the layers are a function of theta on
the invariant manifold of the initialization (the product parametrization needs assumption (A)
for that), so the integrator advances theta (S, d), takes h(theta) from the clock map
(:class:`ddln_fast.theory.Geometry`) and rebuilds the layers (S, P, d) from it for the run file,
which keeps its schema. A :class:`ddln_fast.solver.Solver` in plain numpy, one seed at a time,
with the package's step-size controller (a reference method, not a fast one).
"""

from __future__ import annotations

import numpy as np

from . import controller, kernels
from .controller import DIVERGED, RUNNING, SeedState, Trial
from .errors import InputError
from .parametrization import Parametrization
from .problem import Problem
from .solver import Solver
from .tableaus import DOPRI5
from .theory import Geometry, assumption_a


class MirrorIntegrator(Solver):
    """Dormand–Prince 5(4) on theta with Hairer's PI controller, one step size per seed.

    Parameters
    ----------
    problem : Problem
    u0 : ndarray of shape (S, P, d)
        Initial layers; for the product every seed must satisfy (A) (else InputError).
    dt : float
        Upper bound of the first step.
    rtol, atol : float
        Error control on theta (RMS norm over the d coordinates).
    loss_tol, max_steps : stopping rules, as for :class:`ddln_fast.integrators.Integrator`.
    parametrization : Parametrization, optional
        Default: the product of the P layers.
    """

    tableau = DOPRI5
    method = "mirror"

    def __init__(self, problem: Problem, u0, dt=0.01, rtol=1e-8, atol=1e-12, loss_tol=0.0,
                 max_steps=10_000_000, dtype=np.float64, parametrization=None):
        super().__init__()
        self.dtype = np.dtype(dtype).type
        if self.dtype is not np.float64:
            raise InputError('integrator.method = "mirror" runs in float64 only (set run.dtype = "float64")')
        self.u0 = np.array(u0, dtype=np.float64)
        S, L, d = self.u0.shape
        self.seeds, self.depth, self.dim = S, L, d
        self.parametrization = parametrization or Parametrization.of_layers("product", L)
        for s in range(S if self.parametrization.name == "product" else 0):
            if not assumption_a(self.u0[s]).holds:
                count = int(assumption_a(self.u0[s]).violating.sum())
                raise InputError(f'integrator.method = "mirror" needs assumption (A): seed {s} has {count} '
                                 f"coordinates where two layers share the smallest |u_i(0)| (sign trap); "
                                 f"use another init or method")
        self.geometry = Geometry.from_layers(self.u0, self.parametrization)
        self.problem = problem
        self.dt, self.rtol, self.atol = float(dt), float(rtol), float(atol)
        self.loss_tol, self.max_steps = float(loss_tol), int(max_steps)
        self.theta = self.parametrization.theta(self.u0)
        self.derivative = np.zeros((S, d))
        self._ready = np.zeros(S, dtype=bool)  # FSAL derivative computed, per seed
        self.state = SeedState.fresh(S, self.dt)

    # -- the vector field --------------------------------------------------------------------------
    def _data(self, s):
        p = self.problem.for_seed(s)
        return p.X, p.y

    def _loss_and_gradient(self, s, theta):
        X, y = self._data(s)
        r = X @ theta - y
        return float(r @ r) / (2 * len(y)), X.T @ r / len(y)

    def _field(self, s, theta):
        loss, g = self._loss_and_gradient(s, theta)
        return -self.geometry.h(theta, s) * g, loss

    # -- the Solver interface ------------------------------------------------------------------
    def layers(self) -> np.ndarray:
        """Layers rebuilt from theta through the invariants, shape (S, P, d)."""
        return self.geometry.layers(self.theta)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The layer integrator's names and shapes (one run-file layout for every method):
        ``U`` the layers, ``theta_rows`` all -1 and ``theta_cache`` theta (nothing is reused
        between steps), ``fsal`` d theta/dt in layer 0, ``fsal_ready`` whether every running
        seed has it, then the SeedState arrays."""
        fsal = np.zeros((self.seeds, self.depth, self.dim))
        fsal[:, 0] = self.derivative
        ready = bool(np.all(self._ready[self.running]))
        return {"U": self.layers(), "theta_rows": np.full(self.seeds, -1, dtype=np.int64),
                "theta_cache": self.theta.copy(), "fsal": fsal,
                "fsal_ready": np.array([ready], dtype=np.int8), **self.state.as_dict()}

    def restore_state(self, arrays) -> None:
        # theta itself: the product of the rebuilt layers differs from it in the last bits
        self.theta = np.array(arrays["theta_cache"], dtype=np.float64)
        self.state = SeedState.from_dict(arrays)
        # a seed has its derivative once its start evaluated it (its first evaluation)
        self._ready = self.state.nfev > 0
        self.derivative = np.array(arrays["fsal"])[:, 0]

    def current_losses(self, theta=None) -> np.ndarray:
        # theta (from theta_of_all) is self.theta already here: nothing to reuse
        return np.array([self._loss_and_gradient(s, self.theta[s])[0] for s in range(self.seeds)])

    def theta_of_all(self) -> np.ndarray:
        return self.theta.copy()

    def invariant_drift(self) -> np.ndarray:
        """Zero up to rounding by construction (the layers are rebuilt on the invariant manifold)."""
        partial = np.zeros((self.seeds, kernels.n_blocks(self.dim)))
        kernels.invariant_drift_blocks(self.layers(), self.u0, self.parametrization.kernel(), partial)
        return partial.max(axis=1)

    def advance_to(self, t_target: float) -> bool:
        for s in range(self.seeds):
            if self.state.status[s] == RUNNING and self.state.t[s] < t_target:
                if not self._advance_seed(s, float(t_target)):
                    return False
        return True

    # -- dopri5 per seed ---------------------------------------------------------------------------
    def _error_norm(self, err, theta, theta_new):
        scale = self.atol + self.rtol * np.maximum(np.abs(theta), np.abs(theta_new))
        return float(np.sqrt(np.mean((err / scale) ** 2)))

    def _start(self, s):
        st = self.state
        theta = self.theta[s]
        f0, loss = self._field(s, theta)
        st.nfev[s] += 1
        st.loss[s] = loss
        if not np.isfinite(loss):
            st.status[s], st.t_stop[s] = DIVERGED, st.t[s]
            return
        scale = self.atol + self.rtol * np.abs(theta)
        scale = np.maximum(scale, np.finfo(np.float64).tiny)
        d0, d1 = np.sqrt(np.mean((theta / scale) ** 2)), np.sqrt(np.mean((f0 / scale) ** 2))
        h0 = controller.first_trial_step(d0, d1, self.dt)
        f1, _ = self._field(s, theta + h0 * f0)
        st.nfev[s] += 1
        d2 = np.sqrt(np.mean(((f1 - f0) / scale) ** 2)) / h0
        st.h[s] = controller.starting_step(h0, d1, d2, DOPRI5.error_order, self.dt)
        self.derivative[s] = f0
        self._ready[s] = True

    def _advance_seed(self, s, t_target) -> bool:
        """Steps of seed ``s`` until it is at ``t_target`` or stops; False if ``stop_check``
        stopped it first."""
        st = self.state
        A, B, E = DOPRI5.A, DOPRI5.B, DOPRI5.E
        if not self._ready[s]:
            self._start(s)
        control = controller.control_for(DOPRI5.error_order)
        seed = np.array([s])
        targets = np.full(self.seeds, t_target)
        live = np.ones(1, dtype=np.uint8)
        trial = Trial.empty(self.seeds)
        K = np.zeros((DOPRI5.stages, self.dim))
        while st.status[s] == RUNNING and st.t[s] < t_target:
            if self.stop_requested():
                return False
            theta = self.theta[s]
            controller.propose_steps(seed, targets, st, trial)
            h = trial.h[s]
            K[0] = self.derivative[s]
            for i in range(1, DOPRI5.stages):
                K[i], loss_new = self._field(s, theta + h * (A[i, :i] @ K[:i]))
            theta_new = theta + h * (B @ K)  # B[6] = 0; stage 6 is f(theta_new) (FSAL)
            err = self._error_norm(h * (E @ K), theta, theta_new)
            controller.control_steps(seed, live, np.array([err]), np.array([loss_new]), targets, st,
                                     trial, control, DOPRI5.stages - 1, self.loss_tol, self.max_steps)
            if trial.accepted[s]:
                self.theta[s] = theta_new
                self.derivative[s] = K[-1]
                # a step that overflows theta ends the seed (after the controller's own stops)
                if st.status[s] == RUNNING and not np.all(np.isfinite(theta_new)):
                    st.status[s], st.t_stop[s] = DIVERGED, st.t[s]
        return True
