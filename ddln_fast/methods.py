"""Which solver runs each ``integrator.method``, and the tableau it steps with.

The driver and the command line ask this table, never a method's name: whether a method is
adaptive (it lands on any checkpoint time; a fixed-step method only on whole steps) is
``METHODS[name].tableau.adaptive``. A new method is one entry here plus its solver (a
:class:`ddln_fast.solver.Solver`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .radau import RADAU_IIA5
from .tableaus import DOPRI5, TABLEAUS, Tableau


@dataclass(frozen=True)
class Method:
    """``tableau``: what the solver steps with (``tableau.adaptive``: step-size control);
    ``build(problem, u0, descent=, dt=, rtol=, atol=, loss_tol=, max_steps=, dtype=,
    parametrization=)``: the solver (``descent``: the :class:`ddln_fast.stochastic.DescentOptions`
    of gradient descent and sgd, None for the other methods; ``parametrization``: a
    :class:`ddln_fast.parametrization.Parametrization`)."""

    tableau: Tableau
    build: Callable


def _layer_method(name: str) -> Method:
    def build(problem, u0, descent=None, **options):
        from .integrators import Integrator

        if descent is not None and not descent.plain:  # momentum, label noise, ...: SGD's solver
            from .stochastic import StochasticGradientDescent

            return StochasticGradientDescent(name, problem, u0, descent, **options)
        return Integrator(name, problem, u0, **options)

    return Method(TABLEAUS[name], build)


def _sgd(problem, u0, descent=None, **options):
    from .stochastic import StochasticGradientDescent

    return StochasticGradientDescent("sgd", problem, u0, descent, **options)


def _mirror(problem, u0, descent=None, **options):
    from .mirror import MirrorIntegrator  # imports the theory (scipy): only when asked for

    return MirrorIntegrator(problem, u0, **options)


def _dual(problem, u0, descent=None, **options):
    from .dual import DualIntegrator  # builds clock maps: only when asked for

    return DualIntegrator(problem, u0, **options)


METHODS = {name: _layer_method(name) for name in ("euler", "rk4", "dopri5")}
#: minibatch gradient descent: Euler steps on each step's batch loss
METHODS["sgd"] = Method(TABLEAUS["euler"], _sgd)
#: dopri5 on theta in the mirror geometry (an independent reference route, one seed at a time)
METHODS["mirror"] = Method(DOPRI5, _mirror)
#: Radau IIA(5) on the n-dimensional dual flow (the rich regime: small scales, stiff)
METHODS["dual"] = Method(RADAU_IIA5, _dual)


def is_adaptive(method: str) -> bool:
    """Whether ``method`` chooses its steps (and lands on any time) or takes fixed steps dt."""
    return METHODS[method].tableau.adaptive
