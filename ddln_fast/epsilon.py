"""Time to epsilon: the first flow time at which a seed's relative excess loss
(f - f*) / (f(0) - f*) is at most epsilon.

The one definition behind ``ddln analyze`` (t(1e-6)), the sweep summary (``time_to_eps``) and
the paper's figure of time against the initialization scale.
"""

from __future__ import annotations

import numpy as np

#: The relative excess loss at which the time to epsilon is read off.
EPSILON = 1e-6


def time_to_epsilon(t: np.ndarray, loss: np.ndarray, f_star: float, epsilon: float = EPSILON) -> float:
    """The first time at which (loss - f_star) / (loss[0] - f_star) <= ``epsilon``.

    Between the two checkpoints around the crossing, log(excess) is interpolated linearly in
    t. A non-finite loss (a diverged seed) never counts as reached.

    Parameters
    ----------
    t : ndarray of shape (K,)
        The seed's checkpoint times, increasing (repeated times of a seed that stopped are
        allowed).
    loss : ndarray of shape (K,)
    f_star : float
        The minimum of the loss.

    Returns
    -------
    float
        The time; ``t[0]`` when the loss starts at its minimum; NaN when never reached.
    """
    excess = np.maximum(loss - f_star, 0.0)
    if not excess[0] > 0:
        return float(t[0])
    relative = excess / excess[0]
    below = np.flatnonzero(relative <= epsilon)
    if below.size == 0:
        return float("nan")
    k = below[0]
    if k == 0:
        return float(t[0])
    lo, hi = np.log(relative[k - 1]), np.log(max(relative[k], 1e-300))
    frac = (lo - np.log(epsilon)) / (lo - hi) if lo > hi else 1.0
    return float(t[k - 1] + frac * (t[k] - t[k - 1]))
