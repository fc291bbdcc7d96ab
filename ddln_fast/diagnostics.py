"""Diagnostics stored at every checkpoint by config switch, whatever the solver.

``run.sharpness = true``: ``sharpness`` (S,), the largest eigenvalue of the Hessian of the
training objective (the loss, plus weight_decay / 2 times the squared norm of the layers) in
layer space, by Lanczos on exact Hessian-vector products (:mod:`ddln_fast.sharpness`), and
``stability_threshold`` (S,), the largest curvature the method's next step is linearly stable
for: 2 / step for gradient descent (the edge of stability of Cohen et al. when the sharpness
reaches it), 2 (1 + beta) / step with heavy-ball momentum beta, 2 (1 + beta) / ((1 + 2 beta) step)
with Nesterov's, 2.785 / dt for rk4; NaN for adaptive methods (no fixed step). It costs up to
:data:`LANCZOS_ITERATIONS` Hessian-vector products (each two products with X) per checkpoint.
"""

from __future__ import annotations

import numpy as np

#: Relative change of the Lanczos estimate that ends it, and its largest number of iterations.
LANCZOS_RTOL = 1e-8
LANCZOS_ITERATIONS = 200


class CheckpointDiagnostics:
    """The diagnostics a config asks for, for one problem.

    Parameters
    ----------
    config : Config
    problem : Problem
    """

    def __init__(self, config, problem):
        from .config import DESCENT_METHODS
        from .methods import is_adaptive
        from .sharpness import STABILITY_BOUNDS
        from .stochastic import DescentOptions

        from .parametrization import Parametrization

        self.problem = problem
        self.parametrization = Parametrization.from_config(config)
        self.sharpness = config.run.sharpness
        integ = config.integrator
        self.weight_decay = integ.weight_decay
        self.dt = integ.dt
        self.options = None
        self.bound = np.nan
        if integ.method in DESCENT_METHODS:
            self.options = DescentOptions.from_config(config)
            self.bound = self.options.stability_bound
        elif not is_adaptive(integ.method):
            self.bound = STABILITY_BOUNDS[integ.method]

    def rows(self, seeds: int) -> dict[str, tuple]:
        """name -> (shape of one row, dtype, axis labels, meaning)."""
        if not self.sharpness:
            return {}
        return {"sharpness": ((seeds,), np.float64, ("seed",),
                              "largest eigenvalue of the Hessian of the loss (plus weight decay) in "
                              "the layers"),
                "stability_threshold": ((seeds,), np.float64, ("seed",),
                                        "largest curvature the next fixed step is linearly stable "
                                        "for (2 / step for gradient descent; NaN: adaptive)")}

    def values(self, solver) -> dict[str, np.ndarray]:
        """The diagnostics of the solver's current state."""
        if not self.sharpness:
            return {}
        from .sharpness import top_hessian_eigenvalue

        layers = np.asarray(solver.layers(), dtype=np.float64)
        S = layers.shape[0]
        finite = np.flatnonzero(np.all(np.isfinite(layers.reshape(S, -1)), axis=1))
        sharpness = np.full(S, np.nan)
        if finite.size:
            X, y = self.problem.X, self.problem.y
            if X.ndim == 3:
                X, y = X[finite], y[finite]
            sharpness[finite] = np.atleast_1d(top_hessian_eigenvalue(
                X, y, layers[finite], rtol=LANCZOS_RTOL, max_iter=LANCZOS_ITERATIONS,
                parametrization=self.parametrization)) + self.weight_decay
        steps = (self.options.step_sizes(self.dt, solver.state.steps) if self.options is not None
                 else np.full(S, self.dt))
        return {"sharpness": sharpness, "stability_threshold": self.bound / steps}
