"""Butcher tableaus of the explicit Runge–Kutta methods (a method is its tableau, as in
scipy.integrate._ivp): the integrators read everything from here, so a new method, fixed-step
or embedded pair, FSAL or not, is a new entry and nothing else.

The flows integrated here are autonomous, so the nodes ``C`` do not enter the stage
evaluations; they are checked against the rows of ``A`` and decide, with ``A``'s last row,
whether the last stage is evaluated at the new state (FSAL).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tableau:
    """Explicit Runge–Kutta coefficients.

    Attributes
    ----------
    A : ndarray of shape (stages, stages)
        Strictly lower triangular.
    B : ndarray of shape (stages,)
        Weights of the solution that is propagated.
    C : ndarray of shape (stages,)
        Nodes, C[i] = sum_k A[i, k].
    E : ndarray of shape (stages,) or None
        Embedded pairs: B - B_hat, the weights of the local error estimate.
    error_order : int
        Order q of the error estimate (its local error is O(h^(q+1))); the step-size controller's
        exponent is 1 / (q + 1).
    """

    A: np.ndarray
    B: np.ndarray
    C: np.ndarray
    E: np.ndarray | None = None
    error_order: int = 0

    def __post_init__(self):
        s = len(self.B)
        if self.A.shape != (s, s) or self.C.shape != (s,) or np.any(np.triu(self.A) != 0):
            raise ValueError("an explicit tableau needs A strictly lower triangular, of shape (stages, stages)")
        if not np.allclose(self.A.sum(axis=1), self.C, rtol=0, atol=1e-15):
            raise ValueError("tableau nodes C are not the row sums of A")
        if abs(self.B.sum() - 1) > 1e-15:
            raise ValueError("tableau weights B do not sum to 1")
        if self.E is not None and (self.E.shape != (s,) or abs(self.E.sum()) > 1e-15 or self.error_order < 1):
            raise ValueError("an embedded pair needs E of shape (stages,) summing to 0 and an error order >= 1")

    @property
    def stages(self) -> int:
        return len(self.B)

    @property
    def adaptive(self) -> bool:
        """An embedded pair: step sizes are chosen by the error estimate."""
        return self.E is not None

    @property
    def fsal(self) -> bool:
        """First same as last: the last stage is evaluated at the new state (its row of A is B,
        its node 1), so it is the first stage of the next step."""
        return self.adaptive and self.C[-1] == 1.0 and np.array_equal(self.A[-1], self.B)

    @property
    def evaluations(self) -> int:
        """Gradient evaluations per attempted step (one fewer with FSAL)."""
        return self.stages - 1 if self.fsal else self.stages


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
# Bogacki & Shampine (1989), the 3(2) pair of scipy's RK23: FSAL, third-order propagation.
BOGACKI_SHAMPINE = _tableau(
    [[0, 0, 0, 0], [1 / 2, 0, 0, 0], [0, 3 / 4, 0, 0], [2 / 9, 1 / 3, 4 / 9, 0]],
    [2 / 9, 1 / 3, 4 / 9, 0],
    [0, 1 / 2, 3 / 4, 1],
    [2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8],
    error_order=2,
)
# Cash & Karp (1990), ACM TOMS 16(3): a 5(4) pair without FSAL, fifth-order propagation.
_CASH_KARP_B = [37 / 378, 0, 250 / 621, 125 / 594, 0, 512 / 1771]
_CASH_KARP_B_HAT = [2825 / 27648, 0, 18575 / 48384, 13525 / 55296, 277 / 14336, 1 / 4]
CASH_KARP = _tableau(
    [
        [0, 0, 0, 0, 0, 0],
        [1 / 5, 0, 0, 0, 0, 0],
        [3 / 40, 9 / 40, 0, 0, 0, 0],
        [3 / 10, -9 / 10, 6 / 5, 0, 0, 0],
        [-11 / 54, 5 / 2, -70 / 27, 35 / 27, 0, 0],
        [1631 / 55296, 175 / 512, 575 / 13824, 44275 / 110592, 253 / 4096, 0],
    ],
    _CASH_KARP_B,
    [0, 1 / 5, 3 / 10, 3 / 5, 1, 7 / 8],
    np.subtract(_CASH_KARP_B, _CASH_KARP_B_HAT),
    error_order=4,
)

#: The layer integrator's methods. ``bogacki_shampine`` and ``cash_karp`` are not config
#: choices: they show (and the tests check) that an embedded pair is only data.
TABLEAUS = {"euler": EULER, "rk4": RK4, "dopri5": DOPRI5, "bogacki_shampine": BOGACKI_SHAMPINE,
            "cash_karp": CASH_KARP}
