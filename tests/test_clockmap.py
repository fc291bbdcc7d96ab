"""The clock map theta = F(s), h = -F'(s), G = int_0^s F of every coordinate (clockmap.py).

References, all written here from the equations (no ddln_fast code in them):

- the clock flow itself, du^j/ds = -prod_{k != j} u^k (v half: +prod v^k), with dG/ds = theta
  appended, by scipy's DOP853 at rtol 1e-13 and a negligible atol, one coordinate at a time;
- scipy ``quad`` + ``brentq`` on psi(r) = int_0^r dr / prod_k sqrt(r^2 + g_k) (assumption (A));
- the closed forms: depth 1 and 2, first layer zero at depths 3 and 4 (tan sec^2 and the
  rational form), any depth through int_0^x sech^(L-2) = alpha^(L-2) s, balanced layers with
  signs, Woodworth's difference and power forms from u = v = alpha;
- for the Bregman identity D_Q(theta, theta0) = G(s) - theta s: d D_Q(F(s), theta0) / ds = s h(s),
  integrated along the clock flow by DOP853 with h = sum_j prod_{k != j} (u^k)^2 of its layers.

Tolerances: 1e-13 relative against closed forms and quadrature (the code reaches about 1e-15
away from ill-conditioned points); 3e-12 against DOP853, whose own global error at rtol 1e-13 is
about 1e-12 on these intervals. Where the problem itself is ill-conditioned (theta near a zero
crossing, G near a zero, clocks near a blow-up) the tolerance is the conditioning times eps.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.integrate import quad, solve_ivp
from scipy.optimize import brentq

from ddln_fast import clock_families
from ddln_fast.clockmap import ClockMap
from ddln_fast.errors import InputError

EPS = np.finfo(float).eps
# quad reports "roundoff" when asked for 1.2e-14 on integrals it gets right to rounding
pytestmark = pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------
def clock_flow_reference(layers: np.ndarray, s: float, signs=None, atol=None):
    """Layers and G at clock s for one coordinate by DOP853: du^j/ds = -sign_j prod_{k != j}
    u^k over the layers of each half (sign +1 for a u half, -1 for a v half); theta is
    sum_half sign_half prod(half) and dG/ds = theta."""
    layers = np.asarray(layers, dtype=float)
    if signs is None:
        groups = [(1.0, np.arange(layers.size))]
    else:
        groups = signs

    def rhs(_, z):
        u = z[:-1]
        out = np.empty_like(z)
        theta = 0.0
        for sign, idx in groups:
            part = u[idx]
            theta += sign * np.prod(part)
            for j, k in enumerate(idx):
                out[k] = -sign * np.prod(np.delete(part, j))
        out[-1] = theta
        return out

    z0 = np.concatenate([layers, [0.0]])
    if s == 0:
        return layers, 0.0
    # atol far below every layer's scale, but not zero: a layer that crosses zero would otherwise
    # force steps below the spacing of the clocks
    scale = np.abs(layers).max()
    atol = np.full(z0.size, 1e-17 * scale if atol is None else atol)
    atol[-1] = 1e-17 * scale ** 2  # G starts at 0: an absolute floor far below its scale
    sol = solve_ivp(rhs, (0.0, s), z0, method="DOP853", rtol=1e-13, atol=atol)
    assert sol.success, sol.message
    z = sol.y[:, -1]
    return z[:-1], z[-1]


def theta_h_of_layers(layers, groups=None):
    """theta and h = sum_j prod_{k != j} u_k^2 (summed over halves)."""
    layers = np.asarray(layers)
    if groups is None:
        groups = [(1.0, np.arange(layers.size))]
    theta = 0.0
    h = 0.0
    for sign, idx in groups:
        part = layers[idx]
        theta += sign * np.prod(part)
        h += sum(np.prod(np.delete(part, j) ** 2) for j in range(part.size))
    return theta, h


def psi_quad(r, gaps):
    """int_0^r dr / prod_k sqrt(r^2 + g_k), odd in r, by scipy quad split at the scales."""
    f = lambda x: 1.0 / np.prod(np.sqrt(x * x + gaps))  # noqa: E731
    a = abs(r)
    # the integrand changes on the scales sqrt(g_k): split there and geometrically in between
    # (a near tie puts a feature of width sqrt(g_1) << 1 next to O(1) ones)
    marks = np.sqrt(np.min(gaps)) * 2.0 ** np.arange(0, 200)
    edges = [0.0] + sorted(set(float(m) for m in marks if m < a)) + [a]
    total = sum(quad(f, lo, hi, epsabs=0, epsrel=1.2e-14, limit=200)[0] for lo, hi in zip(edges[:-1], edges[1:]))
    return math.copysign(total, r)


def quadrature_reference(layers, s):
    """theta, h, G at clock s under assumption (A) by quad + brentq on psi."""
    layers = np.asarray(layers, dtype=float)
    j = int(np.argmin(np.abs(layers)))
    r0 = layers[j]
    others = np.delete(layers, j)
    gaps = (np.abs(others) - abs(r0)) * (np.abs(others) + abs(r0))  # no cancellation at near ties
    sigma = np.prod(np.sign(others))
    w = psi_quad(r0, gaps) - sigma * s
    hi = 1.0
    while psi_quad(hi, gaps) < abs(w):
        hi *= 4.0
    r = brentq(lambda x: psi_quad(x, gaps) - abs(w), 0.0, hi, xtol=1e-300, rtol=4 * EPS, maxiter=500)
    r = math.copysign(r, w)
    u = np.concatenate([[r], np.sign(others) * np.sqrt(r * r + gaps)])
    theta, h = theta_h_of_layers(u)
    return theta, h, (r0 * r0 - r * r) / 2


def relative_error(got, want):
    return abs(got - want) / abs(want)


def evaluate_one(cm, s, seed=0, coordinate=None, want_g=True):
    """Evaluate a one-seed clock map at clocks s for every coordinate (s of shape (d,))."""
    s = np.asarray(s, dtype=float).reshape(1, -1)
    out = cm.evaluate(s, rows=np.array([seed]), G=want_g)
    return tuple(o[0] for o in out)


# ---------------------------------------------------------------------------------------------
# Depth 1 and 2
# ---------------------------------------------------------------------------------------------
def test_depth_one_is_linear():
    u0 = np.array([[[0.7, -1.2, 0.0]]])
    cm = ClockMap.from_layers(u0)
    s = np.array([0.3, -2.0, 5.0])
    theta, h, G = evaluate_one(cm, s)
    np.testing.assert_allclose(theta, u0[0, 0] - s, rtol=1e-15)
    np.testing.assert_array_equal(h, 1.0)
    np.testing.assert_allclose(G, u0[0, 0] * s - s * s / 2, rtol=1e-15)
    assert cm.family_counts() == {"linear": 3}


@pytest.mark.parametrize("a, b", [(0.7, 0.2), (-0.4, 0.9), (0.0, 0.3), (0.5, 0.5), (0.5, -0.5),
                                  (1e-3, -2.0), (3.0, 2.0)])
def test_depth_two_closed_form(a, b):
    """theta = a b cosh 2s - (a^2 + b^2)/2 sinh 2s; h = sqrt((a^2 - b^2)^2 + 4 theta^2); G by
    quad of that theta."""
    cm = ClockMap.from_layers(np.array([[[a], [b]]]))
    for s in (-3.0, -0.4, 1e-9, 0.3, 2.5):
        want = a * b * math.cosh(2 * s) - (a * a + b * b) / 2 * math.sinh(2 * s)
        want_h = math.sqrt((a * a - b * b) ** 2 + 4 * want ** 2)
        want_g = quad(lambda x: a * b * math.cosh(2 * x) - (a * a + b * b) / 2 * math.sinh(2 * x),
                      0, s, epsabs=0, epsrel=1.2e-14)[0]
        theta, h, G = evaluate_one(cm, [s])
        # the reference itself cancels: a b cosh - (a^2+b^2)/2 sinh loses eps (a^2+b^2) cosh 2s
        scale = (a * a + b * b) * math.cosh(2 * s)
        assert abs(theta[0] - want) <= 1e-13 * abs(want) + 4 * EPS * scale
        assert abs(h[0] - want_h) <= 1e-13 * want_h + 8 * EPS * scale
        assert abs(G[0] - want_g) <= 1e-13 * abs(want_g) + 4 * EPS * scale * max(abs(s), 1e-300)


def test_depth_two_layers_and_dop853():
    rng = np.random.default_rng(5)
    u0 = rng.standard_normal((1, 2, 6))
    cm = ClockMap.from_layers(u0)
    s = rng.uniform(-1.5, 1.5, 6)
    theta, h, G = evaluate_one(cm, s)
    layers = cm.layers(s[None])[0]
    for i in range(6):
        ref_u, ref_g = clock_flow_reference(u0[0, :, i], s[i])
        ref_theta, ref_h = theta_h_of_layers(ref_u)
        np.testing.assert_allclose(layers[:, i], ref_u, rtol=3e-12)
        assert relative_error(theta[i], ref_theta) <= 3e-12
        assert relative_error(h[i], ref_h) <= 3e-12
        assert relative_error(G[i], ref_g) <= 3e-12


@pytest.mark.parametrize("log_alpha", [math.log(1e-300), math.log(1e-60), -1000.0])
def test_depth_two_tiny_scale_log_form(log_alpha):
    """First layer zero, the other alpha: log|theta| = 2 log alpha - log 2 + log sinh 2|s|,
    theta = -sign(s) |theta|, at clocks where theta is O(1) (alpha = e^-1000 through log_scale)."""
    s = np.array([1.0, 50.0, -300.0, -log_alpha - 2.0, -log_alpha + 3.0, log_alpha + 1.0])
    if log_alpha > -700:
        cm = ClockMap.from_layers(np.array([[[0.0] * 6, [math.exp(log_alpha)] * 6]]))
    else:
        cm = ClockMap.from_layers(np.array([[[0.0] * 6, [1.0] * 6]]), log_scale=[log_alpha])
    theta, h, G = evaluate_one(cm, s)
    for k, sk in enumerate(s):
        a2s = abs(2 * sk)
        log_sinh = a2s - math.log(2) + math.log1p(-math.exp(-2 * a2s))
        log_theta = 2 * log_alpha - math.log(2) + log_sinh
        want = -math.copysign(math.exp(log_theta), sk) if log_theta > -745 else 0.0
        # condition: exp of a sum of terms ~ |2 log alpha| carries eps * that much
        tol = 8 * EPS * (abs(2 * log_alpha) + a2s)
        if want == 0.0:
            assert abs(theta[k]) <= 1e-300
            continue
        assert relative_error(theta[k], want) <= tol, (sk, theta[k], want)
        # h = sqrt(delta^2 + 4 theta^2) with delta = alpha^2: 2|theta| coth 2|s|
        want_h = 2 * abs(want) / math.tanh(a2s)
        assert relative_error(h[k], want_h) <= tol


# ---------------------------------------------------------------------------------------------
# Depth >= 3: closed forms
# ---------------------------------------------------------------------------------------------
def first_layer_zero(depth, alpha, d, signs=None):
    u0 = np.full((1, depth, d), alpha)
    u0[0, 0] = 0.0
    if signs is not None:
        u0[0, 1:] *= signs
    return u0


@pytest.mark.parametrize("alpha", [0.7, 1.3e-2])
def test_first_layer_zero_depth_three_and_four(alpha):
    """docs/theory.md, "Closed forms": L = 3: theta = -alpha^3 tan(alpha s) sec^2(alpha s); L = 4:
    theta = -alpha^4 t / (1 - t^2)^2, t = alpha^2 s; both blow up at |s*| = B(1/2, (L-2)/2) / (2
    alpha^(L-2))."""
    for depth in (3, 4):
        star = math.pi / 2 / alpha if depth == 3 else 1 / alpha ** 2
        fractions = np.array([-0.999, -0.7, -1e-7, 0.0, 1e-9, 0.3, 0.9, 0.99999])
        s = fractions * star
        cm = ClockMap.from_layers(first_layer_zero(depth, alpha, s.size))
        assert cm.family_counts() == {f"equal_gaps_{depth}": s.size}
        np.testing.assert_allclose(cm.blow_up[1][0], star, rtol=2 * EPS)
        np.testing.assert_allclose(cm.blow_up[0][0], -star, rtol=2 * EPS)
        theta, h, G = evaluate_one(cm, s)
        for k, sk in enumerate(s):
            if depth == 3:
                x = alpha * sk
                want = -alpha ** 3 * math.tan(x) / math.cos(x) ** 2
            else:
                t = alpha ** 2 * sk
                want = -alpha ** 4 * t / (1 - t * t) ** 2
            # conditioning near the blow-up: the rounding of s, eps |s| / |s* - s| per unit of
            # the exponent L / (L - 2)
            cond = 1 + depth / (depth - 2) * abs(sk) / abs(star - abs(sk))
            if want == 0:
                assert theta[k] == 0 and G[k] == 0
                continue
            assert relative_error(theta[k], want) <= 1e-13 * cond, (depth, sk)


@pytest.mark.parametrize("depth", [5, 6])
def test_first_layer_zero_any_depth(depth):
    """theta = -alpha^L sinh x cosh^(L-1) x with int_0^x sech^(L-2) = alpha^(L-2) s (quad +
    brentq in the test); h from the layers (0 -> -alpha sinh x, alpha -> alpha cosh x)."""
    alpha = 0.6
    sech = lambda y: 2 * math.exp(-y) / (1 + math.exp(-2 * y))  # noqa: E731
    b = quad(lambda x: sech(x) ** (depth - 2), 0, np.inf, epsabs=0, epsrel=1.2e-14)[0]
    fractions = np.array([-0.95, -0.2, 1e-6, 0.5, 0.999])
    s = fractions * b / alpha ** (depth - 2)
    cm = ClockMap.from_layers(first_layer_zero(depth, alpha, s.size, signs=np.array([1, -1, 1, 1, 1][:depth - 1])[:, None]))
    theta, h, G = evaluate_one(cm, s)
    sigma = -1.0  # one negative layer among the others
    for k, sk in enumerate(s):
        target = abs(alpha ** (depth - 2) * sk)
        I = lambda x: quad(lambda y: sech(y) ** (depth - 2), 0, x, epsabs=0, epsrel=1.2e-14)[0]  # noqa: E731
        x = brentq(lambda x: I(x) - target, 0, 40, xtol=1e-300, rtol=4 * EPS)
        x = math.copysign(x, -sigma * sk)
        r = alpha * math.sinh(x)
        others = alpha * math.cosh(x)
        want = sigma * r * others ** (depth - 1)
        want_h = others ** (2 * depth - 4) * (others ** 2 + (depth - 1) * r * r)
        cond = 1 + 2 * depth * abs(sk) * alpha ** (depth - 2) / max(b - target, 1e-300)
        assert relative_error(theta[k], want) <= 1e-13 * cond, (sk, theta[k], want)
        assert relative_error(h[k], want_h) <= 1e-13 * cond
        assert relative_error(G[k], -r * r / 2) <= 1e-13 * cond


@pytest.mark.parametrize("depth", [3, 4, 5])
@pytest.mark.parametrize("sign_pattern", [(1, 1, 1, 1, 1), (1, -1, 1, 1, 1), (-1, -1, -1, 1, 1)])
def test_balanced_with_signs(depth, sign_pattern):
    """theta = sigma (alpha^(2-L) + sigma (L - 2) s)^(-L/(L-2)), blow-up on one side only."""
    alpha = 0.8
    signs = np.array(sign_pattern[:depth], dtype=float)
    sigma = np.prod(signs)
    star = -sigma * alpha ** (2 - depth) / (depth - 2)
    s = np.array([-3.0, -0.5, 1e-8, 0.7, 4.0]) * abs(star)
    s = s[sigma * (s - star) > 0]
    u0 = np.broadcast_to((alpha * signs)[None, :, None], (1, depth, s.size)).copy()
    cm = ClockMap.from_layers(u0)
    assert cm.family_counts() == {"power": s.size}
    theta, h, G = evaluate_one(cm, s)
    for k, sk in enumerate(s):
        base = alpha ** (2 - depth) + sigma * (depth - 2) * sk
        m = base ** (-1 / (depth - 2))
        want = sigma * m ** depth
        assert relative_error(theta[k], want) <= 1e-13
        assert relative_error(h[k], depth * m ** (2 * depth - 2)) <= 1e-13
        # G = int_0^s theta (quad; the difference (alpha^2 - m^2) / 2 cancels at small s)
        want_g = quad(lambda x: sigma * (alpha ** (2 - depth) + sigma * (depth - 2) * x) ** (-depth / (depth - 2)),
                      0, sk, epsabs=0, epsrel=1.2e-14)[0]
        assert relative_error(G[k], want_g) <= 1e-13
    lower, upper = cm.blow_up
    if sigma > 0:
        assert np.allclose(lower, star, rtol=2 * EPS) and np.all(np.isinf(upper))
    else:
        assert np.allclose(upper, star, rtol=2 * EPS) and np.all(np.isinf(lower))


# ---------------------------------------------------------------------------------------------
# Depth >= 3: tables, ties, frozen coordinates, tiny scales
# ---------------------------------------------------------------------------------------------
def jittered(depth, d, seed, alpha=0.5, jitter=0.3, zero_first=False):
    rng = np.random.default_rng(seed)
    u0 = alpha * (1 + jitter * rng.standard_normal((1, depth, d)))
    u0 *= np.where(rng.random((1, depth, d)) < 0.3, -1.0, 1.0)
    if zero_first:
        u0[0, 0, : d // 2] = 0.0
    return u0


def clock_points(cm, d, seed, reach=0.97):
    """Clocks spread over (lower, upper) of every coordinate, both directions."""
    rng = np.random.default_rng(seed)
    lower, upper = cm.blow_up
    frac = rng.uniform(-reach, reach, d)
    return np.where(frac > 0, frac * upper[0], -frac * lower[0])


@pytest.mark.parametrize("depth", [3, 4, 5, 6])
def test_jittered_signed_against_quadrature_and_dop853(depth):
    d = 8
    u0 = jittered(depth, d, seed=depth, zero_first=True)
    cm = ClockMap.from_layers(u0)
    assert set(cm.family_counts()) == ({"elliptic_3"} if depth == 3 else {"table"})
    s = clock_points(cm, d, seed=depth)
    theta, h, G = evaluate_one(cm, s)
    layers = cm.layers(s[None])[0]
    lower, upper = cm.blow_up
    for i in range(d):
        q_theta, q_h, q_g = quadrature_reference(u0[0, :, i], s[i])
        # near the blow-up (|theta| large) eps |s| of the clock costs that much, in units of
        # L / (L - 2) per relative distance
        dist = min(upper[0, i] - s[i], s[i] - lower[0, i])
        cond = 1 + depth / (depth - 2) * abs(s[i]) / dist
        assert relative_error(theta[i], q_theta) <= 1e-13 * cond, (i, theta[i], q_theta)
        assert relative_error(h[i], q_h) <= 1e-13 * cond
        assert abs(G[i] - q_g) <= 1e-13 * cond * (abs(q_g) + u0[0, :, i].min() ** 2)
        ref_u, ref_g = clock_flow_reference(u0[0, :, i], s[i])
        np.testing.assert_allclose(layers[:, i], ref_u, rtol=3e-12 * cond)
        assert relative_error(G[i], ref_g) <= 3e-12 * cond + 1e-15 * abs(u0[0, :, i]).max() ** 2 / abs(ref_g)


@pytest.mark.parametrize("layers", [
    (0.2, 0.2, 0.5), (0.3, -0.3, 0.3, 0.7), (-0.25, 0.25, 0.4, 0.9), (0.3, 0.3, 0.3, 0.5, 0.6),
    (0.4, 0.4, 0.4)])
def test_ties_and_balanced_against_dop853(layers):
    """Two or more layers share the smallest |a| > 0: they never reach 0; one blow-up side."""
    layers = np.array(layers)
    cm = ClockMap.from_layers(layers[None, :, None] * np.ones((1, 1, 6)))
    lower, upper = cm.blow_up
    finite = np.isfinite(lower[0, 0]) != np.isfinite(upper[0, 0])
    assert finite  # exactly one blow-up
    side = lower[0, 0] if np.isfinite(lower[0, 0]) else upper[0, 0]
    s = np.array([0.98, 0.6, 1e-7, -0.5, -3.0, -40.0]) * side
    theta, h, G = evaluate_one(cm, s)
    for i in range(s.size):
        # no layer crosses zero here, and the tied ones decay exponentially: pure relative control
        ref_u, ref_g = clock_flow_reference(layers, s[i], atol=1e-300)
        ref_theta, ref_h = theta_h_of_layers(ref_u)
        cond = 1 + layers.size * abs(s[i] / (side - s[i]))
        assert relative_error(theta[i], ref_theta) <= 3e-12 * cond, (i, theta[i], ref_theta)
        assert relative_error(h[i], ref_h) <= 3e-12 * cond
        assert relative_error(G[i], ref_g) <= 3e-12 * cond
    np.testing.assert_allclose(cm.layers(s[None])[0][:, 0], clock_flow_reference(layers, s[0])[0], rtol=3e-12 * 60)


def test_two_zero_layers_are_frozen():
    u0 = np.array([[[0.0, 0.0], [0.0, 0.5], [0.7, 0.0]]])
    cm = ClockMap.from_layers(u0)
    assert cm.family_counts() == {"frozen": 2}
    theta, h, G = evaluate_one(cm, [3.0, -7.0])
    np.testing.assert_array_equal(theta, 0.0)
    np.testing.assert_array_equal(h, 0.0)
    np.testing.assert_array_equal(G, 0.0)
    np.testing.assert_array_equal(cm.layers(np.array([[3.0, -7.0]]))[0], u0[0])
    ref_u, _ = clock_flow_reference(u0[0, :, 1], 3.0)
    np.testing.assert_array_equal(ref_u, u0[0, :, 1])


@pytest.mark.parametrize("depth", [3, 4, 5])
def test_tiny_scale_against_dop853(depth):
    """alpha^(L-2) = 1e-12: clocks ~ 1e12, theta from alpha^L up to O(1), against DOP853 run on
    the unscaled flow."""
    alpha = 1e-12 ** (1 / (depth - 2))
    d = 5
    u0 = jittered(depth, d, seed=11 + depth, alpha=alpha, jitter=0.2)
    cm = ClockMap.from_layers(u0)
    s = clock_points(cm, d, seed=depth, reach=0.9)
    assert np.all(np.abs(s) > 1e9)
    theta, h, G = evaluate_one(cm, s)
    for i in range(d):
        ref_u, ref_g = clock_flow_reference(u0[0, :, i], s[i])
        ref_theta, ref_h = theta_h_of_layers(ref_u)
        assert relative_error(theta[i], ref_theta) <= 3e-11, (i, theta[i], ref_theta)
        assert relative_error(h[i], ref_h) <= 3e-11
        assert relative_error(G[i], ref_g) <= 3e-11


@pytest.mark.parametrize("gaps_case", ["near_tie", "huge_ratio", "deep"])
def test_table_extreme_shapes(gaps_case):
    """Nearly tied smallest layers (r0 far in the series region), a gap ratio of 1e12, depth 6."""
    if gaps_case == "near_tie":
        layers = np.array([0.5, 0.5 * (1 + 1e-9), 0.9])
    elif gaps_case == "huge_ratio":
        layers = np.array([1e-6, -2e-6, 1.0])
    else:
        layers = np.array([0.31, 0.5, -0.55, 0.8, 1.1, 0.42])
    cm = ClockMap.from_layers(layers[None, :, None] * np.ones((1, 1, 7)))
    assert cm.family_counts() == {"table": 7}
    s = np.array([-0.999, -0.5, -1e-3, 1e-9, 0.2, 0.7, 0.9999])
    s = np.where(s > 0, s * cm.blow_up[1][0], -s * cm.blow_up[0][0])
    theta, h, G = evaluate_one(cm, s)
    for i in range(7):
        # quadrature (DOP853 at rtol 1e-13 loses 4e-7 through the near tie's narrow crossing)
        ref_theta, ref_h, _ = quadrature_reference(layers, s[i])
        dist = min(cm.blow_up[1][0, i] - s[i], s[i] - cm.blow_up[0][0, i])
        cond = 1 + layers.size * abs(s[i]) / dist
        assert relative_error(theta[i], ref_theta) <= 1e-13 * cond, (i, theta[i], ref_theta)
        assert relative_error(h[i], ref_h) <= 1e-13 * cond


def test_double_double_clock_near_the_blow_up():
    """First layer zero, depth 3, alpha = 1: theta = -cos(d) / sin(d)^3 at s = pi/2 - d. With the
    clock passed as (hi, lo) = pi/2 - d to double-double, theta is right for d down to 1e-30,
    far below eps |s| = 3e-16."""
    d_values = np.logspace(-30, -14, 17)
    cm = ClockMap.from_layers(first_layer_zero(3, 1.0, d_values.size))
    pi2_hi, pi2_lo = 1.5707963267948966, 6.123233995736766e-17
    s = np.full(d_values.size, pi2_hi)[None]
    s_lo = (pi2_lo - d_values)[None]
    # the distance the clock really has (pi2_lo - s_lo is exact): d up to the rounding of s_lo,
    # and pi/2 itself is known to 2^-107 relative
    d_exact = pi2_lo - s_lo[0]
    theta, h = cm.evaluate(s, s_lo=s_lo)
    want = -np.cos(d_exact) / np.sin(d_exact) ** 3
    np.testing.assert_allclose(theta[0], want, rtol=1e-14 + 3 * 1e-32 / d_exact.min())
    np.testing.assert_allclose(theta[0, d_exact > 1e-25], want[d_exact > 1e-25], rtol=1e-14)
    np.testing.assert_allclose(cm.blow_up_lo[1][0], pi2_lo, rtol=1e-15)
    # beyond the blow-up: -inf, not garbage
    theta, h, G = cm.evaluate(s, s_lo=np.full_like(s, pi2_lo + 1e-25), G=True)
    assert np.all(theta == -np.inf) and np.all(h == np.inf) and np.all(G == -np.inf)


@pytest.mark.parametrize("depth, family", [(3, "elliptic_3"), (4, "table")])
def test_double_double_clock_smooth_for_jittered_layers(depth, family):
    """A jittered coordinate near its upper blow-up: with the double-double clock, log |theta|
    against log(distance) has the slope -L / (L - 2) of the exact tail."""
    u0 = np.repeat(jittered(depth, 1, seed=3), 9, axis=2)
    cm = ClockMap.from_layers(u0)
    assert cm.family_counts() == {family: 9}
    hi, lo = cm.blow_up[1][0, 0], cm.blow_up_lo[1][0, 0]
    s_lo = lo - np.logspace(-26, -18, 9) * abs(hi)
    dist = lo - s_lo  # exact
    theta, _ = cm.evaluate(np.full((1, dist.size), hi), s_lo=s_lo[None])
    slope = np.diff(np.log(np.abs(theta[0]))) / np.diff(np.log(dist))
    np.testing.assert_allclose(slope, -depth / (depth - 2), rtol=1e-12)


@pytest.mark.parametrize("ratio", [1 + 1e-12, 1.3, 2.5, 100.0, 9.9e3])
@pytest.mark.parametrize("r0", [0.0, 0.2, -0.35])
def test_elliptic_depth_three_against_quadrature(ratio, r0):
    """Depth 3, unique smallest layer r0, other gaps g_1 < g_2 = ratio g_1 (Jacobi's sc through
    theta functions, up to the gap ratio where the tables take over): theta and h on both sides
    of the middle and near both blow-ups, against quadrature; the clock of theta back."""
    a2 = 0.5
    a3 = math.sqrt(ratio * (a2 * a2 - r0 * r0) + r0 * r0)
    layers = np.array([r0, -a2, a3])
    cm = ClockMap.from_layers(layers[None, :, None] * np.ones((1, 1, 7)))
    assert cm.family_counts() == {"elliptic_3": 7}
    lower, upper = cm.blow_up
    frac = np.array([-0.9999, -0.5, -1e-3, 1e-9, 0.2, 0.7, 0.9999])
    s = np.where(frac > 0, frac * upper[0], -frac * lower[0])
    theta, h, G = evaluate_one(cm, s)
    # theta and h alone go through the SIMD loop (clock_fast)
    assert cm.fast_path
    theta_f, h_f = evaluate_one(cm, s, want_g=False)
    for i in range(s.size):
        ref_theta, ref_h, ref_g = quadrature_reference(layers, s[i])
        dist = min(upper[0, i] - s[i], s[i] - lower[0, i])
        cond = 1 + 3 * abs(s[i]) / dist
        for got_theta, got_h in ((theta[i], h[i]), (theta_f[i], h_f[i])):
            assert relative_error(got_theta, ref_theta) <= 1e-13 * cond, (i, got_theta, ref_theta)
            assert relative_error(got_h, ref_h) <= 1e-13 * cond
        assert abs(G[i] - ref_g) <= 1e-13 * cond * (abs(ref_g) + a2 ** 2)
    back = cm.clock_of(theta[None])[0]
    np.testing.assert_allclose(back, s, rtol=1e-12, atol=1e-15 * np.abs(s).max())
    # at and beyond both blow-ups: infinite, with the sign of the side
    edges = np.array([upper[0, 0], 2 * upper[0, 0], lower[0, 0], 2 * lower[0, 0], 0.0, 0.0, 0.0])
    theta_e, h_e = evaluate_one(cm, edges, want_g=False)
    sign = np.sign(theta_f[-1])  # the sign theta takes towards the upper blow-up
    assert np.all(theta_e[:2] == sign * np.inf) and np.all(theta_e[2:4] == -sign * np.inf)
    assert np.all(h_e[:4] == np.inf) and np.all(np.isfinite(theta_e[4:]))


def test_mostly_elliptic_map_mixes_both_loops():
    """A depth-3 map whose coordinates are mostly elliptic but not all (balanced, equal gaps,
    two zero layers, a near tie on a table): theta and h alone take the SIMD loop for the
    elliptic ones and the general loop for the others. The others equal the general loop's
    values bitwise (the same code), the elliptic ones to quadrature."""
    rng = np.random.default_rng(11)
    u0 = 0.4 * (1 + 0.1 * rng.standard_normal((2, 3, 40)))
    u0 *= np.where(rng.random((2, 3, 40)) < 0.3, -1.0, 1.0)
    u0[:, :, 0] = 0.4                       # balanced
    u0[:, :, 1] = [0.0, 0.3, -0.3]          # first layer zero, equal gaps
    u0[:, :2, 2] = 0.0                      # two zero layers: frozen
    u0[:, :, 3] = [0.01, 0.01 + 1e-5, 0.5]  # the two smallest layers nearly tied: a table
    cm = ClockMap.from_layers(u0)
    counts = cm.family_counts()
    assert counts == {"elliptic_3": 72, "power": 2, "equal_gaps_3": 2, "frozen": 2, "table": 2}, counts
    assert cm.fast_path
    lower, upper = cm.blow_up
    frac = rng.uniform(-0.999, 0.999, (2, 40))
    s = np.where(frac > 0, frac * np.minimum(upper, 1e3), -frac * np.maximum(lower, -1e3))
    theta, h = cm.evaluate(s)
    theta_g, h_g, _ = cm.evaluate(s, G=True)  # the general loop for every coordinate
    others = cm.family[:, 0] != clock_families.ELLIPTIC3
    np.testing.assert_array_equal(theta[others], theta_g[others])
    np.testing.assert_array_equal(h[others], h_g[others])
    # in place (theta over the clocks, h over their low-order parts): the same
    clocks, low = s.copy(), np.zeros_like(s)
    cm.evaluate(clocks, theta=clocks, h=low, s_lo=low)
    np.testing.assert_array_equal(clocks, theta)
    np.testing.assert_array_equal(low, h)
    for k, i in [(0, 5), (0, 17), (1, 4), (1, 39)]:
        ref_theta, ref_h, _ = quadrature_reference(u0[k, :, i], s[k, i])
        cond = 1 + 3 * abs(s[k, i]) / min(upper[k, i] - s[k, i], s[k, i] - lower[k, i])
        assert relative_error(theta[k, i], ref_theta) <= 1e-13 * cond
        assert relative_error(h[k, i], ref_h) <= 1e-13 * cond


@pytest.mark.parametrize("layers", [(0.0, 0.01, 1.5), (0.004, -0.01, 1.5)])
def test_gap_ratios_beyond_the_elliptic_limit_use_tables(layers):
    """g_2 / g_1 = 22500 and 26786 (signed, r0 != 0): depth-3 tables, both sides, both blow-ups."""
    layers = np.array(layers)
    cm = ClockMap.from_layers(layers[None, :, None] * np.ones((1, 1, 6)))
    assert cm.family_counts() == {"table": 6}
    lower, upper = cm.blow_up
    frac = np.array([-0.999, -0.4, -1e-6, 0.3, 0.6, 0.999])
    s = np.where(frac > 0, frac * upper[0], -frac * lower[0])
    theta, h, _ = evaluate_one(cm, s)
    for i in range(s.size):
        ref_theta, ref_h, _ = quadrature_reference(layers, s[i])
        cond = 1 + 3 * abs(s[i]) / min(upper[0, i] - s[i], s[i] - lower[0, i])
        assert relative_error(theta[i], ref_theta) <= 1e-13 * cond, (i, theta[i], ref_theta)
        assert relative_error(h[i], ref_h) <= 1e-13 * cond


# ---------------------------------------------------------------------------------------------
# Difference and power parametrizations
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [2, 3, 4, 5])
def test_difference_from_equal_halves(depth):
    """docs/theory.md, "The difference and power parametrizations": L = 2: theta = -2 alpha^2 sinh
    2s; L >= 3: alpha^L [(1+z)^(-L/(L-2)) - (1-z)^(-L/(L-2))], z = (L-2) alpha^(L-2) s."""
    alpha = 0.4
    if depth == 2:
        s = np.array([-2.0, -1e-8, 0.3, 1.7])
    else:
        star = 1 / ((depth - 2) * alpha ** (depth - 2))
        s = np.array([-0.99, -0.3, 1e-8, 0.5, 0.999]) * star
    cm = ClockMap.from_layers(np.full((1, 2 * depth, s.size), alpha), parametrization="difference")
    theta, h, G = evaluate_one(cm, s)
    for k, sk in enumerate(s):
        if depth == 2:
            halves = (alpha ** 2 * math.exp(-2 * sk), alpha ** 2 * math.exp(2 * sk))
            want = -2 * alpha ** 2 * math.sinh(2 * sk)
            cond = 1
        else:
            z = (depth - 2) * alpha ** (depth - 2) * sk
            halves = (alpha ** depth * (1 + z) ** (-depth / (depth - 2)), alpha ** depth * (1 - z) ** (-depth / (depth - 2)))
            want = halves[0] - halves[1]
            cond = 1 + depth * abs(z) / (1 - abs(z))
        # the two halves are evaluated apart: theta carries eps of each (and so does `want`)
        assert abs(theta[k] - want) <= 1e-13 * cond * abs(want) + 4 * EPS * cond * sum(halves), (sk, theta[k], want)


@pytest.mark.parametrize("D", [2.0, 2.5, 3.0, 4.0])
def test_power_from_equal_halves(D):
    """docs/theory.md, "The difference and power parametrizations": D = 2: theta = -2 alpha^2 sinh
    4s; D > 2: alpha^D [(1+z)^(-D/(D-2)) - (1-z)^(-D/(D-2))], z = D (D-2) alpha^(D-2) s."""
    alpha = 0.3
    if D == 2:
        s = np.array([-1.0, 1e-9, 0.4])
    else:
        star = 1 / (D * (D - 2) * alpha ** (D - 2))
        s = np.array([-0.99, 1e-9, 0.3, 0.9999]) * star
    cm = ClockMap.from_layers(np.full((1, 2, s.size), alpha), parametrization="power", power=D)
    theta, h, G = evaluate_one(cm, s)
    for k, sk in enumerate(s):
        if D == 2:
            want = -2 * alpha ** 2 * math.sinh(4 * sk)
            want_h = 8 * alpha ** 2 * math.cosh(4 * sk)
            halves = 2 * alpha ** 2 * math.cosh(4 * sk)
            cond = 1
        else:
            z = D * (D - 2) * alpha ** (D - 2) * sk
            e = -D / (D - 2)
            want = alpha ** D * ((1 + z) ** e - (1 - z) ** e)
            # h = -dtheta/ds
            want_h = -alpha ** D * e * D * (D - 2) * alpha ** (D - 2) * ((1 + z) ** (e - 1) + (1 - z) ** (e - 1))
            halves = alpha ** D * ((1 + z) ** e + (1 - z) ** e)
            cond = 1 + D * abs(z) / (1 - abs(z))
        assert abs(theta[k] - want) <= 1e-13 * cond * abs(want) + 4 * EPS * cond * halves, (D, sk, theta[k], want)
        assert relative_error(h[k], want_h) <= 1e-13 * cond


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_difference_jittered_against_dop853(depth):
    rng = np.random.default_rng(depth)
    d = 5
    u0 = 0.6 * (1 + 0.3 * rng.standard_normal((1, 2 * depth, d)))
    u0 *= np.where(rng.random(u0.shape) < 0.25, -1.0, 1.0)
    cm = ClockMap.from_layers(u0, parametrization="difference")
    lower, upper = cm.blow_up
    frac = rng.uniform(-0.9, 0.9, d)
    s = np.where(frac > 0, frac * np.minimum(upper[0], 3.0), -frac * np.maximum(lower[0], -3.0))
    theta, h, G = evaluate_one(cm, s)
    layers = cm.layers(s[None])[0]
    groups = [(1.0, np.arange(depth)), (-1.0, np.arange(depth, 2 * depth))]
    for i in range(d):
        ref_u, ref_g = clock_flow_reference(u0[0, :, i], s[i], signs=groups)
        ref_theta, ref_h = theta_h_of_layers(ref_u, groups)
        np.testing.assert_allclose(layers[:, i], ref_u, rtol=1e-11)
        assert abs(theta[i] - ref_theta) <= 1e-11 * ref_h * max(abs(s[i]), 1)  # theta crosses 0
        assert relative_error(h[i], ref_h) <= 1e-11
        assert abs(G[i] - ref_g) <= 1e-11 * (abs(ref_g) + abs(ref_theta * s[i]) + 1e-3)


def test_power_jittered_against_dop853():
    """du/ds = -D u^(D-1), dv/ds = +D v^(D-1), theta = u^D - v^D, D = 2.5."""
    D = 2.5
    rng = np.random.default_rng(4)
    u0 = rng.uniform(0.2, 0.8, (1, 2, 4))
    cm = ClockMap.from_layers(u0, parametrization="power", power=D)
    s = np.array([-0.3, 0.1, 0.5, -0.05]) * np.minimum(cm.blow_up[1][0], -cm.blow_up[0][0])
    theta, h, G = evaluate_one(cm, s)
    layers = cm.layers(s[None])[0]

    for i in range(4):
        def rhs(_, z):
            u, v = z[0], z[1]
            return [-D * u ** (D - 1), D * v ** (D - 1), u ** D - v ** D]

        sol = solve_ivp(rhs, (0, s[i]), [u0[0, 0, i], u0[0, 1, i], 0.0], method="DOP853",
                        rtol=1e-13, atol=[1e-300, 1e-300, 1e-18])
        assert sol.success, sol.message
        u, v, g = sol.y[:, -1]
        np.testing.assert_allclose(layers[:, i], [u, v], rtol=3e-12)
        assert abs(theta[i] - (u ** D - v ** D)) <= 3e-12 * h[i] * abs(s[i])
        assert relative_error(h[i], D * D * (u ** (2 * D - 2) + v ** (2 * D - 2))) <= 3e-12
        assert abs(G[i] - g) <= 3e-12 * (abs(g) + 1e-3)


# ---------------------------------------------------------------------------------------------
# The inverse, the Bregman identity, bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("parametrization, depth", [("product", 1), ("product", 2), ("product", 3),
                                                    ("product", 5), ("difference", 3), ("power", 3)])
def test_clock_of_inverts_evaluate(parametrization, depth):
    rng = np.random.default_rng(depth)
    d = 12
    if parametrization == "power":
        u0 = rng.uniform(0.3, 0.9, (2, 2, d))
        cm = ClockMap.from_layers(u0, parametrization="power", power=float(depth))
    else:
        n_layers = depth * (2 if parametrization == "difference" else 1)
        u0 = 0.5 * (1 + 0.3 * rng.standard_normal((2, n_layers, d)))
        u0 *= np.where(rng.random(u0.shape) < 0.3, -1.0, 1.0)
        cm = ClockMap.from_layers(u0, parametrization=parametrization)
    lower, upper = cm.blow_up
    frac = rng.uniform(-0.95, 0.95, (2, d))
    s = np.where(frac > 0, frac * np.minimum(upper, 4.0), -frac * np.maximum(lower, -4.0))
    theta, h = cm.evaluate(s)
    back = cm.clock_of(theta)
    # |ds| = |dtheta| / h: theta's rounding eps |theta| moves s by eps |theta| / h
    tol = 1e-14 * (np.abs(s) + np.abs(theta) / h + 1e-300)
    assert np.all(np.abs(back - s) <= 8 * tol), np.max(np.abs(back - s) / tol)


def test_clock_of_unreachable_is_nan():
    u0 = np.array([[[0.0, 0.4, 0.3], [0.0, 0.4, 0.3], [0.7, 0.4, 0.3]]])  # frozen, balanced
    cm = ClockMap.from_layers(u0)
    out = cm.clock_of(np.array([[0.1, -0.2, 0.3]]))
    assert np.isnan(out[0, 0]) and np.isnan(out[0, 1])  # frozen; balanced > 0 never < 0
    theta, _ = cm.evaluate(out[:, 2:3].repeat(3, axis=1) * 0 + np.array([[0.0, 0.0, out[0, 2]]]))
    assert abs(theta[0, 2] - 0.3) <= 1e-15


@pytest.mark.parametrize("depth", [2, 3, 4, 5])
def test_bregman_identity_along_the_clock_flow(depth):
    """D_Q(theta, theta0) = G(s) - theta s at s = s(theta), per coordinate (assumption (A)
    inits, signed), against int_0^s r h(r) dr carried by DOP853 along the clock flow."""
    rng = np.random.default_rng(20 + depth)
    d = 6
    u0 = 0.5 * (1 + 0.3 * rng.standard_normal((1, depth, d)))
    u0 *= np.where(rng.random(u0.shape) < 0.3, -1.0, 1.0)
    cm = ClockMap.from_layers(u0)
    theta0 = np.prod(u0[0], axis=0)
    target = theta0 * rng.uniform(-3, 3, d)
    s = cm.clock_of(target[None])[0]
    _, _, G = evaluate_one(cm, s)
    ours = G - target * s

    def rhs(r, z):
        u = z[:-1]
        others = np.array([np.prod(np.delete(u, j)) for j in range(depth)])
        return np.concatenate([-others, [r * np.sum(others ** 2)]])

    theirs = [solve_ivp(rhs, (0.0, s[i]), np.concatenate([u0[0, :, i], [0.0]]), method="DOP853",
                        rtol=1e-13, atol=1e-16).y[-1, -1] for i in range(d)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("kwargs, message", [
    (dict(u0=np.ones((1, 3, 2)), parametrization="sum"), "parametrization"),
    (dict(u0=np.ones((1, 2, 2)), parametrization="power", power=1.5), "power = 1.5"),
    (dict(u0=-np.ones((1, 2, 2)), parametrization="power", power=3.0), "u, v > 0"),
    (dict(u0=np.ones((1, 3, 2)), parametrization="power", power=3.0), "(S, 2, d)"),
    (dict(u0=np.ones((1, 3, 2)), parametrization="difference"), "2L layers"),
    (dict(u0=np.ones((3, 2))), "expected (S, layers, d)"),
    (dict(u0=np.full((1, 3, 2), np.nan)), "nan"),
    (dict(u0=np.ones((1, 3, 2)), power=3.0), "only meaningful"),
    (dict(u0=np.full((1, 3, 2), 1e-120) * np.array([[[0.0], [1.0], [1.5]]])), "clock scale"),
    # a gap a_j^2 - a_min^2 of 4e-356 (relative to the largest layer) underflows: it used to be
    # taken for a tie of unequal layers and gave theta = nan silently
    (dict(u0=np.array([1e-170, 1e-170 * (1 + 2.0 ** -52), 1.0])[None, :, None] * np.ones((1, 1, 2))),
     "differ by less than 1e-154"),
])
def test_bad_input_is_one_line(kwargs, message):
    with pytest.raises(InputError) as err:
        ClockMap.from_layers(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_evaluate_checks_shapes_and_fills_outputs():
    cm = ClockMap.from_layers(jittered(3, 4, seed=1))
    with pytest.raises(InputError):
        cm.evaluate(np.zeros((1, 5)))
    with pytest.raises(InputError):
        cm.evaluate(np.zeros((1, 4)), rows=np.array([1]))
    theta = np.empty((1, 4))
    h = np.empty((1, 4))
    out = cm.evaluate(np.full((1, 4), 0.1), theta=theta, h=h)
    assert out[0] is theta and out[1] is h


CONTRACT_SCRIPT = """
import json
import numpy as np
from numba.core.runtime import rtsys
from ddln_fast import clock_fast as cf
from ddln_fast import clock_kernels as ck
from ddln_fast.clockmap import NO_SKIP, ClockMap

rng = np.random.default_rng(0)
u0 = 0.3 * (1 + 0.2 * rng.standard_normal((3, 4, 50)))
u0[0, :, :3] = 0.3  # balanced
u0[1, 0, :5] = 0.0  # first layer zero (jittered others: tables)
results = {}
for name, cm in [("product", ClockMap.from_layers(u0)),
                 ("difference", ClockMap.from_layers(np.concatenate([u0, u0[:, ::-1]], axis=1),
                                                     parametrization="difference"))]:
    p = cm.packed
    s = 0.3 * np.minimum(cm.blow_up[1], 2.0)
    z = np.zeros_like(s)
    rows = np.arange(3)
    theta, h, G = np.empty_like(s), np.empty_like(s), np.empty_like(s)
    layers = np.empty((3, p.lsign.shape[1] * p.half_sign.size, 50))
    calls = [
        (ck.evaluate_serial, (s, z, rows, p.ip, p.fp, p.lsign, p.lgap, *p.tab, p.half_sign, NO_SKIP, True, theta,
                              h, G)),
        (ck.evaluate_parallel, (s, z, rows, p.ip, p.fp, p.lsign, p.lgap, *p.tab, p.half_sign, NO_SKIP, True,
                                theta, h, G)),
        (ck.layers_serial, (s, z, rows, p.ip, p.fp, p.lsign, p.lgap, p.lzero, *p.tab, p.half_sign, layers)),
    ]
    if name == "product":  # the SIMD loop of depth-3 elliptic maps
        u3 = 0.3 * (1 + 0.1 * rng.standard_normal((3, 3, 1000)))
        u3[:, 0] = 0.0
        fast = ClockMap.from_layers(u3)
        assert fast.fast_path
        s3 = 0.3 * fast.blow_up[1]
        big = [np.zeros_like(s3), np.empty_like(s3), np.empty_like(s3)]
        calls += [(fn, (s3, big[0], rows, *fast._fast[:3], big[1], big[2]))
                  for fn in (cf.evaluate_serial, cf.evaluate_parallel)]
    for fn, args in calls:
        fn(*args)  # compile
        before = rtsys.get_allocation_stats().alloc
        for _ in range(5):
            fn(*args)
        inside = (rtsys.get_allocation_stats().alloc - before) / 5
        arrays = sum(isinstance(a, np.ndarray) for a in args)
        results[name + ":" + fn.__name__ + str(id(fn) % 7)] = inside - arrays
sigs = {n: len(getattr(ck, n).signatures) for n in ("evaluate_serial", "evaluate_parallel", "layers_serial")}
sigs.update({"fast_" + n: len(getattr(cf, n).signatures) for n in ("evaluate_serial", "evaluate_parallel")})
print(json.dumps(dict(excess=results, signatures=sigs)))
"""


def test_kernels_allocate_nothing_and_compile_once():
    """Numba's allocation counter (NUMBA_NRT_STATS=1, in a fresh interpreter): a call allocates
    nothing beyond the MemInfo of each array argument (none at all once the kernels run without
    reference counting); one signature per kernel for product and difference maps alike."""
    import json
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", CONTRACT_SCRIPT], capture_output=True, text=True,
                          env=dict(os.environ, NUMBA_NRT_STATS="1"), timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for name, extra in result["excess"].items():
        assert extra <= 0, f"{name} allocates {extra} array(s) per call"
    for name, count in result["signatures"].items():
        assert count == 1, f"{name} compiled {count} times"


@pytest.mark.parametrize("parametrization", ["product", "difference"])
def test_large_calls_run_the_same_loop_on_blocks(parametrization):
    """Calls of at least threads.SERIAL_CLOCK_ITEMS items go through the threaded blocks of the parallel entry
    points: every output equals the single-threaded loop's bitwise (a block boundary that skips
    or repeats an item, or a wrong row, would show)."""
    from ddln_fast import clock_fast as cf
    from ddln_fast import clock_kernels as ck
    from ddln_fast.clockmap import NO_SKIP

    rng = np.random.default_rng(3)
    u0 = 0.1 * (1 + 0.1 * rng.standard_normal((6, 3, 701)))
    u0[:3, 0] = 0.0
    if parametrization == "difference":
        u0 = np.concatenate([u0, 1.1 * u0[:, ::-1]], axis=1)
    cm = ClockMap.from_layers(u0, parametrization=parametrization)
    lower, upper = cm.blow_up
    s = 0.6 * np.clip(np.where(rng.random((6, 701)) < 0.5, upper, lower), -3.0, 3.0)
    assert s.size >= ck.SERIAL_CLOCK_ITEMS and s.size % ck.BLOCK != 0
    p = cm.packed
    rows = np.arange(6)
    zero = np.zeros_like(s)
    theta, h, G = cm.evaluate(s, G=True)
    expected = [np.full_like(s, np.nan) for _ in range(3)]
    ck.evaluate_serial(s, zero, rows, p.ip, p.fp, p.lsign, p.lgap, *p.tab, p.half_sign, NO_SKIP, True, *expected)
    for got, want in zip((theta, h, G), expected):
        np.testing.assert_array_equal(got, want)
    if parametrization == "product":  # theta and h alone: the SIMD loop, then the general one
        assert cm.fast_path
        P, gap_a, gap_b, eligible, _ = cm._fast
        fast = [np.full_like(s, np.nan) for _ in range(2)]
        cf.evaluate_serial(s, zero, rows, P, gap_a, gap_b, *fast)
        ck.evaluate_serial(s, zero, rows, p.ip, p.fp, p.lsign, p.lgap, *p.tab, p.half_sign, eligible, False,
                           *fast, fast[0])
        for got, want in zip(cm.evaluate(s), fast):
            np.testing.assert_array_equal(got, want)
    layers = cm.layers(s)
    want_layers = np.full_like(layers, np.nan)
    ck.layers_serial(s, zero, rows, p.ip, p.fp, p.lsign, p.lgap, p.lzero, *p.tab, p.half_sign, want_layers)
    np.testing.assert_array_equal(layers, want_layers)
    clocks = cm.clock_of(theta)
    want_clocks = np.full_like(s, np.nan)
    ck.clock_of_serial(theta, rows, p.ip, p.fp, p.lsign, p.lgap, *p.tab, p.half_sign,
                       np.ascontiguousarray(lower), np.ascontiguousarray(upper), want_clocks)
    np.testing.assert_array_equal(clocks, want_clocks)
    assert np.all(np.isfinite(clocks))
