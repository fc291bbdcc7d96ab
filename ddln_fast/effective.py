"""Gradient descent at depth 2 is gradient flow from another initialization (Even, Pesme,
Gunasekar & Flammarion 2023, "(S)GD over diagonal linear networks").

At depth 2 one step of (stochastic) gradient descent with step gamma_k and gradient g_k (of the
step's batch: it lies in range(X^T)) multiplies, coordinate by coordinate, u^1 + u^2 by 1 - x_k
and u^1 - u^2 by 1 + x_k, where x_k = gamma_k g_k. Splitting (1 -/+ x)^2 = e^{-/+2x} e^{-q_+/-(x)}
with q_+(x) = -2x - ln((1 - x)^2) and q_-(x) = 2x - ln((1 + x)^2), both >= 0 for |x| < 1, the
layers after k steps are those of the gradient flow at clock s = sum_m x_m, started from the
effective initialization (a', b') with

    a' + b' = (a + b) exp(-Q_+ / 2),   a' - b' = (a - b) exp(-Q_- / 2),   Q_+/- = sum_m q_+/-(x_m),

(a, b) = (u^1, u^2) at the start. The gain of Even et al. is the mean (Q_+ + Q_-) / 2 =
sum_m q(x_m), q(x) = -ln(1 - x^2). Since s stays in range(X^T), a run that converges to an
interpolator ends at the Bregman projection of its effective initialization onto {X theta = y}
(the theory of :mod:`ddln_fast.theory`, with a' and b' as the initial layers), not at that of its
true initialization: the difference is the implicit bias of the step size and of the noise.
This needs |x_m| < 1 at every step (else a factor is not positive); the run file keeps the
largest |x_m| so far in ``max_step_gradient``.

``run.gain = true`` accumulates Q_+ and Q_- at every step (:func:`ddln_fast.stochastic_kernels.
accumulate_gain`) and stores, per checkpoint, ``gain`` (S, d), ``effective_init`` (S, 2, d) and
``max_step_gradient`` (S,). :func:`step_size_bias` puts the resulting prediction next to the
gradient-flow prediction for ``ddln analyze``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

#: Relative dual residual of the predictions (as ``ddln predict``).
PREDICTION_TOL = 1e-12


def effective_initialization(u0: np.ndarray, gain_plus: np.ndarray, gain_minus: np.ndarray) -> np.ndarray:
    """The effective initial layers (a', b') of depth-2 gradient descent.

    Parameters
    ----------
    u0 : ndarray of shape (S, 2, d)
        The true initial layers (a, b).
    gain_plus, gain_minus : ndarray of shape (S, d)
        Q_+ and Q_- accumulated over the steps (NaN where a step had |gamma g| >= 1).

    Returns
    -------
    ndarray of shape (S, 2, d), float64
    """
    u0 = np.asarray(u0, dtype=np.float64)
    a, b = u0[:, 0], u0[:, 1]
    plus = (a + b) * np.exp(-0.5 * np.asarray(gain_plus))
    minus = (a - b) * np.exp(-0.5 * np.asarray(gain_minus))
    return np.stack([0.5 * (plus + minus), 0.5 * (plus - minus)], axis=1)


def gain_rows(dim: int) -> dict[str, tuple]:
    """The checkpoint datasets of ``run.gain``: name -> (shape of one seed's row, dtype, axis
    labels, meaning)."""
    return {
        "gain": ((dim,), np.float64, ("seed", "coordinate"),
                 "sum over the steps of q(x) = -ln(1 - x^2), x = step size * gradient coordinate "
                 "(the mean of the sums of q_+ and q_-; Even et al. 2023)"),
        "effective_init": ((2, dim), np.float64, ("seed", "layer", "coordinate"),
                           "the initial layers from which gradient flow passes through the current "
                           "layers (depth-2 gradient descent; NaN once |step * gradient| >= 1)"),
        "max_step_gradient": ((), np.float64, ("seed",),
                              "largest |step size * gradient coordinate| so far: the effective "
                              "initialization needs it below 1"),
    }


@dataclass
class StepSizeBias:
    """What ``ddln analyze`` reports about the effective initialization of one seed.

    ``gap_to_descent_prediction``: |theta_K - theta_GD| / |theta_GD|, theta_GD the Bregman
    projection of the effective initialization at the last checkpoint; ``gap_to_flow_prediction``:
    the same with the gradient-flow prediction theta_GF (of the true initialization);
    ``flow_vs_descent``: |theta_GF - theta_GD| / |theta_GD|, the implicit bias of the steps.
    """

    seed: int
    max_step_gradient: float
    gap_to_descent_prediction: float
    gap_to_flow_prediction: float
    flow_vs_descent: float
    descent_l1_norm: float
    flow_l1_norm: float
    note: str = ""

    def as_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                for k, v in asdict(self).items()}


def step_size_bias(run) -> list[StepSizeBias] | None:
    """Per seed of an open :class:`~ddln_fast.store.Run`, the prediction from the effective
    initialization of its last committed checkpoint next to the gradient-flow prediction.

    None when the run has no ``effective_init`` rows (not a depth-2 descent run with
    ``run.gain = true``)."""
    from .prediction import predict_arrays
    from .theory import assumption_a

    if "effective_init" not in run.file["checkpoints"] or run.committed == 0:
        return None
    effective = run.checkpoint("effective_init")[-1]
    largest = run.checkpoint("max_step_gradient")[-1]
    theta = run.checkpoint("theta")[-1].astype(np.float64)
    X, y, u0 = run.X, run.y, run.u0
    out = []
    for s in range(u0.shape[0]):
        Xs, ys = (X[s], y[s]) if X.ndim == 3 else (X, y)
        nan = float("nan")
        if not largest[s] < 1 or not np.all(np.isfinite(effective[s])):
            out.append(StepSizeBias(s, float(largest[s]), nan, nan, nan, nan, nan,
                                    note=f"a step had |step size * gradient| = {largest[s]:.3g} >= 1: "
                                         f"no effective initialization (a factor 1 -/+ x was not positive)"))
            continue
        if not (assumption_a(u0[s]).holds and assumption_a(effective[s]).holds):
            out.append(StepSizeBias(s, float(largest[s]), nan, nan, nan, nan, nan,
                                    note="assumption (A) fails (sign trap): no predicted limit"))
            continue
        descent = predict_arrays(Xs, ys, effective[s][None], PREDICTION_TOL).theta[0]
        flow = predict_arrays(Xs, ys, u0[s][None], PREDICTION_TOL).theta[0]
        scale = max(float(np.linalg.norm(descent)), 1e-300)
        out.append(StepSizeBias(
            s, float(largest[s]),
            gap_to_descent_prediction=float(np.linalg.norm(theta[s] - descent)) / scale,
            gap_to_flow_prediction=float(np.linalg.norm(theta[s] - flow)) / max(float(np.linalg.norm(flow)), 1e-300),
            flow_vs_descent=float(np.linalg.norm(flow - descent)) / scale,
            descent_l1_norm=float(np.abs(descent).sum()), flow_l1_norm=float(np.abs(flow).sum())))
    return out
