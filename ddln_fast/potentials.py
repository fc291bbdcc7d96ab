"""Closed forms of the mirror map phi and the potential Q (Woodworth et al. 2020, "Kernel and rich
regimes in overparametrized models"; Labarrière et al., arXiv:2412.16765, for the product).

Normalized by phi(0) = Q(0) = 0, with Q' = phi and Q'' = 1 / h. The clock map route
(:class:`ddln_fast.theory.Geometry`, normalized at theta0 instead) gives the same geometry for
every initialization; these closed forms exist where the flow is elementary:

- depth 2 (product or difference, any init) and power D = 2 (any u, v > 0): along the clock s,
  theta = A cosh(k s) - B sinh(k s) with B > |A|, so h = k sqrt(theta^2 + beta^2) with
  beta^2 = B^2 - A^2, and Q is the hyperbolic entropy
      phi(theta) = arcsinh(theta / beta) / k,
      Q(theta) = (theta arcsinh(theta / beta) - sqrt(theta^2 + beta^2) + beta) / k;
  product (a, b): k = 2, beta = |a^2 - b^2| / 2; difference (a, b | c, e): k = 2, A = a b - c e,
  B = (a^2 + b^2 + c^2 + e^2) / 2; power (u, v): k = 4, beta = 2 u v.
- exponent p >= 3 from the standard init u = v = alpha (every layer of both halves alpha_i,
  per coordinate): difference of depth p or power D = p (real) give
      theta = alpha^p h_p(-z),  h_p(z) = (1 - z)^(-p/(p-2)) - (1 + z)^(-p/(p-2)),
  with z = c alpha^(p-2) s, c = p - 2 (difference) or p (p - 2) (power); so
      phi(theta) = h_p^{-1}(theta / alpha^p) / (c alpha^(p-2)),
      Q(theta) = alpha^2 q_p(theta / alpha^p) / c,  q_p(x) = int_0^x h_p^{-1}
  (Woodworth's h_D and q_D; their Q^D_alpha is this Q up to the constant factor of the time
  scale).
"""

from __future__ import annotations

import numpy as np

from .errors import InputError
from .parametrization import Parametrization


def hyperbolic_mirror_map(theta, beta, k=2.0) -> np.ndarray:
    """arcsinh(theta / beta) / k (depth 2 and power D = 2)."""
    return np.arcsinh(np.asarray(theta, dtype=np.float64) / beta) / k


def hyperbolic_potential(theta, beta, k=2.0) -> np.ndarray:
    """The hyperbolic entropy (theta arcsinh(theta / beta) - sqrt(theta^2 + beta^2) + beta) / k,
    per coordinate."""
    theta = np.asarray(theta, dtype=np.float64)
    return (theta * np.arcsinh(theta / beta) - np.hypot(theta, beta) + beta) / k


def woodworth_h(z, p: float) -> np.ndarray:
    """h_p(z) = (1 - z)^(-p/(p-2)) - (1 + z)^(-p/(p-2)) on (-1, 1), odd and increasing (p > 2)."""
    z = np.asarray(z, dtype=np.float64)
    e = p / (p - 2.0)
    return (1.0 - z) ** -e - (1.0 + z) ** -e


def _distance_to_one(x, p: float) -> np.ndarray:
    """delta = 1 - h_p^{-1}(|x|) in (0, 1], solving delta^-e - (2 - delta)^-e = |x| (e = p/(p-2))
    by bisection in log delta inside [(|x| + 1)^(-1/e), min(1, |x|^(-1/e))]: delta keeps its
    full relative precision where h_p^{-1} is within rounding of 1."""
    x = np.abs(np.asarray(x, dtype=np.float64))
    e = p / (p - 2.0)
    with np.errstate(divide="ignore"):
        lo = np.log1p(x) / -e
        hi = np.minimum(0.0, np.log(x) / -e)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        delta = np.exp(mid)
        too_small = delta ** -e - (2.0 - delta) ** -e > x  # h too large: delta must grow
        lo, hi = np.where(too_small, mid, lo), np.where(too_small, hi, mid)
        if np.all(hi - lo <= 1e-16 * np.maximum(np.abs(lo), 1.0)):
            break
    return np.exp(0.5 * (lo + hi))


def woodworth_h_inverse(x, p: float) -> np.ndarray:
    """w in (-1, 1) with h_p(w) = x."""
    x = np.asarray(x, dtype=np.float64)
    return np.sign(x) * (1.0 - _distance_to_one(x, p))


def woodworth_q(x, p: float) -> np.ndarray:
    """q_p(x) = int_0^x h_p^{-1} = x w - int_0^w h_p at w = h_p^{-1}(x), with
    int_0^w h_p = ((1 - w)^(1-e) + (1 + w)^(1-e) - 2) / (e - 1), e = p / (p - 2) (even in x)."""
    x = np.abs(np.asarray(x, dtype=np.float64))
    e = p / (p - 2.0)
    delta = _distance_to_one(x, p)
    return x * (1.0 - delta) - (delta ** (1.0 - e) + (2.0 - delta) ** (1.0 - e) - 2.0) / (e - 1.0)


class ClosedForm:
    """phi and Q of one seed's initialization in closed form (see the module docstring).

    Build with :meth:`from_layers`; raises InputError where no closed form is provided.
    """

    def __init__(self, kind: str, scale: np.ndarray, rate: float, exponent: float = 0.0):
        self.kind = kind            # "hyperbolic" or "woodworth"
        self.scale = scale          # beta (hyperbolic) or alpha (woodworth), shape (d,)
        self.rate = rate            # k (hyperbolic) or c (woodworth)
        self.exponent = exponent    # p (woodworth)

    @classmethod
    def from_layers(cls, u0: np.ndarray, parametrization: Parametrization) -> "ClosedForm":
        """The closed form for initial layers ``u0`` of shape (P, d)."""
        u0 = np.asarray(u0, dtype=np.float64)
        name, L = parametrization.name, parametrization.depth
        if name == "power" and parametrization.power == 2.0:
            return cls("hyperbolic", 2.0 * u0[0] * u0[1], 4.0)
        if name in ("product", "difference") and L == 2:
            if name == "product":
                beta = np.abs(u0[0] ** 2 - u0[1] ** 2) / 2.0
            else:
                A = u0[0] * u0[1] - u0[2] * u0[3]
                B = np.sum(u0 ** 2, axis=0) / 2.0
                beta = np.sqrt((B - A) * (B + A))
            if np.any(beta <= 0):
                raise InputError("no hyperbolic entropy where beta = 0 (a sign-trapped coordinate)")
            return cls("hyperbolic", beta, 2.0)
        p = parametrization.power if name == "power" else float(L)
        if name != "product" and p > 2 and np.all(u0 == u0[:1]):
            rate = p * (p - 2.0) if name == "power" else p - 2.0
            return cls("woodworth", u0[0].copy(), rate, p)
        raise InputError(f"no closed-form potential for the {parametrization.describe()} "
                         f"parametrization from this initialization (closed forms: depth 2, power D = 2, "
                         f"or u = v = alpha); use ddln_fast.theory.Geometry")

    def mirror_map(self, theta) -> np.ndarray:
        """phi(theta), phi(0) = 0 (theta of shape (..., d))."""
        if self.kind == "hyperbolic":
            return hyperbolic_mirror_map(theta, self.scale, self.rate)
        a, p = self.scale, self.exponent
        return woodworth_h_inverse(np.asarray(theta) / a ** p, p) / (self.rate * a ** (p - 2.0))

    def potential(self, theta) -> np.ndarray:
        """Q(theta) per coordinate, Q(0) = 0."""
        if self.kind == "hyperbolic":
            return hyperbolic_potential(theta, self.scale, self.rate)
        a, p = self.scale, self.exponent
        return a ** 2 * woodworth_q(np.asarray(theta) / a ** p, p) / self.rate
