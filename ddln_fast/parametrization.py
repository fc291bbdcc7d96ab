"""How theta is made of the layers: the product, difference and power parametrizations.

- ``"product"`` (the default): theta = u^1 ⊙ ... ⊙ u^L, layers of shape (L, d);
- ``"difference"``: theta = u^1 ⊙ ... ⊙ u^L - v^1 ⊙ ... ⊙ v^L, layers of shape (2L, d) with
  the u half first (rows 0..L-1) and the v half after it (rows L..2L-1);
- ``"power"``: theta = u^D - v^D with one layer per half and a real exponent D >= 2, layers
  of shape (2, d) (row 0 is u, row 1 is v), u, v > 0 (the flow keeps them positive).

Gradient flow on the layers moves every row by -g(theta) times the derivative of theta in that
row, so the v half runs the u half's flow with the sign of g reversed (Woodworth et al. 2020;
Labarrière et al., arXiv:2412.16765, for the product). The invariants are those of each half:
(u^j)^2 - (u^k)^2 and (v^j)^2 - (v^k)^2; the power parametrization conserves u v (D = 2) or
u^(2-D) + v^(2-D) (D > 2) instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The parametrizations, in the order of the ``model.parametrization`` choices.
PARAMETRIZATIONS = ("product", "difference", "power")


@dataclass(frozen=True)
class Parametrization:
    """One parametrization and its size.

    Attributes
    ----------
    name : {"product", "difference", "power"}
    depth : int
        Layers per half: L for product and difference, 1 for power.
    power : float
        The exponent D of ``"power"``; 0.0 for the others.
    """

    name: str = "product"
    depth: int = 1
    power: float = 0.0

    @classmethod
    def from_config(cls, config) -> "Parametrization":
        """The parametrization of ``config.model`` (``model.depth`` is not read by "power")."""
        m = config.model
        if m.parametrization == "power":
            return cls("power", 1, float(m.power))
        return cls(m.parametrization, m.depth, 0.0)

    @classmethod
    def of_layers(cls, name: str, layer_count: int, power: float = 0.0) -> "Parametrization":
        """The parametrization of ``name`` whose state has ``layer_count`` layer rows."""
        if name == "power":
            return cls("power", 1, float(power))
        return cls(name, layer_count // 2 if name == "difference" else layer_count, 0.0)

    @property
    def halves(self) -> int:
        """1 (product) or 2 (difference, power: the u half, then the v half)."""
        return 1 if self.name == "product" else 2

    @property
    def layer_count(self) -> int:
        """Layer rows of the state: L, 2L or 2."""
        return self.depth * self.halves

    @property
    def degree(self) -> float:
        """theta's degree in the layers: L (product, difference) or D (power)."""
        return self.power if self.name == "power" else float(self.depth)

    def kernel(self):
        """The :data:`ddln_fast.kernels.KernelParametrization` the compiled kernels take."""
        from .kernels import KernelParametrization

        return KernelParametrization(int(self.halves), float(self.power))

    def theta(self, layers: np.ndarray) -> np.ndarray:
        """theta of layers of shape (..., P, d), shape (..., d) (plain numpy)."""
        layers = np.asarray(layers)
        if self.name == "power":
            return layers[..., 0, :] ** self.power - layers[..., 1, :] ** self.power
        if self.name == "difference":
            L = self.depth
            return np.prod(layers[..., :L, :], axis=-2) - np.prod(layers[..., L:, :], axis=-2)
        return np.prod(layers, axis=-2)

    def describe(self) -> str:
        """One line for reports: ``depth 3``, ``difference, depth 3`` or ``power D = 2.5``."""
        if self.name == "power":
            return f"power D = {self.power:g}"
        if self.name == "difference":
            return f"difference, depth {self.depth}"
        return f"depth {self.depth}"

    def layer_axis(self) -> str:
        """What the layer axis of ``/init/u`` and ``/checkpoints/u`` holds, in words."""
        if self.name == "power":
            return "u, v (theta = u^D - v^D)"
        if self.name == "difference":
            return (f"u^1..u^{self.depth}, then v^1..v^{self.depth} "
                    f"(theta = u^1...u^{self.depth} - v^1...v^{self.depth})")
        return f"u^1..u^{self.depth} (theta = u^1...u^{self.depth})"

    def run_attributes(self) -> dict:
        """Root attributes of a run file that name the parametrization."""
        return {"parametrization": self.name, "power": self.power, "layer_axis": self.layer_axis()}

    def last_layers(self) -> list[int]:
        """The last layer row of each half (``model.signs = "random"`` flips these)."""
        return [self.depth * (h + 1) - 1 for h in range(self.halves)]

    def first_layers(self) -> list[int]:
        """The first layer row of each half (``init = "first_layer_zero"`` zeroes these)."""
        return [self.depth * h for h in range(self.halves)]
