"""The interface between the driver (:mod:`ddln_fast.simulate`) and every integrator.

A solver advances S seeds of one flow from checkpoint to checkpoint and owns everything about
them: their per-seed state and status (:class:`ddln_fast.controller.SeedState`), the values a
checkpoint stores, and the arrays that resume it exactly. The driver only calls what is below;
it never writes the state, never re-derives step targets and never knows a solver's internals.

Subclasses set ``method`` (the ``integrator.method`` name), ``seeds``, ``depth``, ``dim``,
``dtype`` and ``state`` (a SeedState of S seeds), call ``Solver.__init__`` and implement:

- :meth:`advance_to` (time stepping, with ``stop_check`` asked between steps);
- :meth:`theta_of_all`, :meth:`current_losses`, :meth:`invariant_drift`, :meth:`layers`
  (what a checkpoint stores; :meth:`checkpoint_values` calls them in that order);
- :meth:`state_arrays` and :meth:`restore_state` (exact resume; the run file's ``/state``
  datasets are created from :meth:`state_shapes`, which reads :meth:`state_arrays`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import numpy as np

from .controller import DIVERGED, RUNNING, SeedState


class Solver(ABC):
    """Base class of the integrators: S seeds, one flow, checkpoint to checkpoint."""

    method: str
    seeds: int
    depth: int
    dim: int
    dtype: type
    state: SeedState

    def __init__(self):
        #: callable -> bool, asked between steps (before each one, or before each run of steps
        #: a compiled loop takes in one call: a few milliseconds of work); True stops
        #: :meth:`advance_to` at that step boundary (a safe point for SIGINT/SIGTERM: the state
        #: there resumes bit-identically)
        self.stop_check: Callable[[], bool] | None = None

    # -- time stepping ----------------------------------------------------------------------------
    @abstractmethod
    def advance_to(self, t_target: float) -> bool:
        """Advance every running seed to flow time ``t_target`` exactly, or until it stops
        (its status says why).

        Returns
        -------
        bool
            True when no running seed is left short of ``t_target``; False when ``stop_check``
            stopped it first (the state is then a step boundary between checkpoints).
        """

    def stop_requested(self) -> bool:
        """Whether ``stop_check`` asks to stop now (never without one)."""
        return self.stop_check is not None and self.stop_check()

    def step_rounds(self, unfinished: Callable[[], np.ndarray], step: Callable[[np.ndarray], None]) -> bool:
        """Call ``step(active)`` with the running seeds for which ``unfinished()`` (a fresh bool
        mask of shape (S,) each round) holds, until there are none (True) or ``stop_check``
        asks to stop (False, between two rounds)."""
        while True:
            active = np.nonzero((self.state.status == RUNNING) & unfinished())[0]
            if active.size == 0:
                return True
            if self.stop_requested():
                return False
            step(active)

    @property
    def running(self) -> np.ndarray:
        """Seeds still running, bool array of shape (S,)."""
        return self.state.status == RUNNING

    def finish(self) -> None:
        """The end time is reached: seeds still running stop with status ``t_end``."""
        self.state.finish()

    # -- checkpoints --------------------------------------------------------------------------------
    @abstractmethod
    def theta_of_all(self) -> np.ndarray:
        """theta of every seed at its current state, shape (S, d)."""

    @abstractmethod
    def current_losses(self, theta: np.ndarray | None = None) -> np.ndarray:
        """Loss of every seed at its current state, shape (S,); ``theta`` is
        :meth:`theta_of_all` when the caller has it already."""

    @abstractmethod
    def invariant_drift(self) -> np.ndarray:
        """Largest change of any (u^j_i)^2 - (u^k_i)^2 since u0, per seed, shape (S,)."""

    @abstractmethod
    def layers(self) -> np.ndarray:
        """The layers of every seed, shape (S, L, d) (may be the solver's own array: copy it to
        keep it)."""

    def checkpoint_values(self, save_layers: bool) -> dict[str, np.ndarray]:
        """What a checkpoint stores of the seeds' states: ``theta`` (S, d), ``loss`` (S,),
        ``invariant_drift`` (S,) and, with ``save_layers``, ``u`` (S, L, d).

        A running seed whose loss is not finite here (its last step overflowed) stops now as
        diverged, at its current time, as its next step would."""
        theta = self.theta_of_all()
        loss = self.current_losses(theta)
        st = self.state
        blown = (st.status == RUNNING) & ~np.isfinite(loss)
        st.status[blown] = DIVERGED
        st.t_stop[blown] = st.t[blown]
        values = {"loss": loss, "theta": theta, "invariant_drift": self.invariant_drift()}
        if save_layers:
            values["u"] = self.layers()
        return values

    def checkpoint_rows(self) -> dict[str, tuple]:
        """Datasets a checkpoint stores besides those of :meth:`checkpoint_values`' base keys,
        by name: (shape of one row, dtype, axis labels, meaning); their values come with
        :meth:`checkpoint_values`. None by default."""
        return {}

    def run_attributes(self) -> dict[str, str]:
        """Root attributes of the run file that describe the solver (e.g. the seed material of
        its random draws). None by default."""
        return {}

    # -- exact resume -----------------------------------------------------------------------------
    @abstractmethod
    def state_arrays(self) -> dict[str, np.ndarray]:
        """Everything needed to continue bit-identically, by name (the per-seed state included);
        the same names, shapes and dtypes at every call."""

    @abstractmethod
    def restore_state(self, arrays) -> None:
        """Continue from :meth:`state_arrays` of a solver built with the same arguments
        (``arrays``: a mapping of name to array, e.g. read back from a run file)."""

    def state_shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Name -> (shape, dtype) of :meth:`state_arrays` (the run file's ``/state`` layout)."""
        return {name: (np.shape(value), np.asarray(value).dtype)
                for name, value in self.state_arrays().items()}
