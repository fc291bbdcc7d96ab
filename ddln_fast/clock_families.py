"""The clock map of one product half, per initialization family (scalar Numba functions).

A half with layers a_1..a_L follows du^j/ds = -prod_{k != j} u^k. Every family below returns,
at clock s (the half's own clock: +s for a u half, -s for a v half), theta = F(s), h = -F'(s)
and G(s) = int_0^s F, in true units. The parameters of a half are packed by
:mod:`ddln_fast.clockmap` into row ``row`` of a float array ``fp`` (columns ``P_*``), an int
array ``ip`` (``I_*``), and per-layer arrays ``lsign`` (sign of a_j), ``lgap`` (a_j^2 - a_{j*}^2
in normalized units, 0 for the smallest layer and the layers tied with it) and ``lzero`` (a_j).
The functions index those arrays in place and create no views: everything here is inlined into
the kernels, and every array view an inlined body creates (even on a branch not taken) cost a
reference-count call per coordinate (measured 40-60 ns of a 70-130 ns evaluation).

Normalized units: layers are divided by the scale f (a power of two for the table families),
clocks multiplied by kappa = f^(L-2) (homogeneity: F_{f c}(s) = f^L F_c(f^(L-2) s)), so that
tiny or huge initializations cost nothing and lose nothing.

Families:

- ``FROZEN``: two or more zero layers: nothing moves, theta = 0, h = 0, G = 0.
- ``LINEAR``: depth 1, theta = a - s.
- ``DEPTH2``: layers (a, b): with A = |a + b| / 2, B = |a - b| / 2, c = log(A / B) / 2,
  theta = 2 A B sinh 2(c - s), h = 4 A B cosh 2(c - s), G = 2 A B sinh(2c - s) sinh s
  (A or B zero: pure exponentials), in log form where sinh overflows or f^2 underflows.
- ``POWER``: m^(2-p) = 1 + sigma k (p - 2) s (normalized, p > 2) or m = e^(-sigma k s) (p = 2),
  theta = sigma m^p, h = k p m^(2(p-1)), G = (1 - m^2) / (2k): the balanced product
  (p = L, k = 1, sigma = product of the signs) and a half of theta = u^D - v^D (p = D, k = D).
- ``EQ3``, ``EQ4``: unique smallest layer r, all other gaps equal to c^2: psi(r) = atan(r/c)/c
  and psi(r) = r / (c^2 sqrt(r^2 + c^2)), inverted in closed form.
- ``ELLIPTIC3``: depth 3, unique smallest layer, other gaps g_1 < g_2 with g_2 / g_1 up to
  ``clock_elliptic.RATIO_LIMIT`` (jittered depth 3): r = sqrt(g_1) sc(sqrt(g_2) w | 1 - g_1 / g_2)
  through Jacobi's theta functions (:mod:`ddln_fast.clock_elliptic`).
- ``TABLE``: unique smallest layer, any gaps: :func:`ddln_fast.clock_tables.table_magnitude`.
- ``TIE``: mult >= 2 layers share the smallest |a| > 0: the table in log m.

For the families with a smallest layer r (EQ3, EQ4, ELLIPTIC3, TABLE, TIE) the clock moves
w = psi(r) linearly: w = psi0 - sigma s (TIE: T = T0 + sigma s), and the blow-up clocks B
(normalized, double-double) give the distance rem = sigma (s - B) to the blow-up exactly,
also for a clock passed as a double-double (s, s_lo): that is what resolves theta near the
blow-up to far below eps |s|.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .clock_elliptic import elliptic_clock, elliptic_magnitude
from .clock_series import INLINE_OPTIONS, dd_difference, dd_scale
from .clock_tables import table_clock, table_magnitude

FROZEN = 0
LINEAR = 1
DEPTH2 = 2
POWER = 3
EQ3 = 4
EQ4 = 5
TABLE = 6
TIE = 7
ELLIPTIC3 = 8
FAMILY_NAMES = ("frozen", "linear", "depth2", "power", "equal_gaps_3", "equal_gaps_4", "table", "tie",
                "elliptic_3")

# float parameters of a half
P_SCALE = 0      # f: true layer = normalized layer * f
P_KAPPA = 1      # normalized clock = kappa * clock
P_SIGMA = 2      # sign of the clock motion (psi0 - sigma s, T0 + sigma s, power's sigma)
P_R0 = 3         # normalized smallest layer at s = 0 (signed); LINEAR: a; DEPTH2: A
P_W0 = 4         # psi0 (EQ/TABLE), T0 (TIE); DEPTH2: B
P_BP_HI = 5      # blow-up clock where w = +b (TIE/POWER: the blow-up clock), double-double
P_BP_LO = 6
P_BM_HI = 7      # blow-up clock where w = -b
P_BM_LO = 8
P_B = 9          # b (EQ/TABLE); DEPTH2: c
P_C = 10         # c = sqrt(smallest positive gap); DEPTH2: sign(a + b)
P_P = 11         # POWER: exponent p; DEPTH2: sign(a - b); ELLIPTIC3: rho = (g_1 g_2)^(1/4)
P_K = 12         # POWER: clock factor k; DEPTH2: log2 f (an integer); ELLIPTIC3: q^2
P_SIGN = 13      # product of the signs of the layers other than j*
N_FLOAT = 14

# int parameters of a half
I_FAMILY = 0
I_DEPTH = 1      # layers in this half
I_JSTAR = 2      # index of the smallest layer (the tie's reference layer), -1 if none
I_TABLE = 3      # table id, -1 if none
N_INT = 4

LN2_HI = 0.6931471805599453
LN2_LO = 2.3190468138462996e-17
#: beyond this argument sinh/cosh of the depth-2 forms are taken in log form, and also when the
#: scale f = 2^k has |k| above LOG_SCALE_BITS (f^2 would leave the normal range)
LOG_FORM = 600.0
LOG_SCALE_BITS = 400.0
#: the mean-value form of G (and of the clock of a theta) is used while |r - r0| is below this
#: fraction of the distance to the nearest singularity of 1 / P: 8-point Gauss–Legendre is then
#: exact to (0.05)^16
MEAN_VALUE_FRACTION = 0.1

_GL_X, _GL_W = np.polynomial.legendre.leggauss(8)
GL_T = (_GL_X + 1.0) / 2.0
GL_W = _GL_W / 2.0


@njit(**INLINE_OPTIONS)
def _log_sinh(x):
    """log |sinh x| for x != 0."""
    a = abs(x)
    if a > 1.0:
        return a - LN2_HI + math.log1p(-math.exp(-2.0 * a))
    return math.log(math.sinh(a))


@njit(**INLINE_OPTIONS)
def _scaled_exp(log_mag, two_k):
    """exp(log_mag + two_k log 2), with the large cancelling parts added exactly first."""
    return math.exp((log_mag + two_k * LN2_HI) + two_k * LN2_LO)


@njit(**INLINE_OPTIONS)
def normalized_clock(fp, row, s, s_lo):
    """kappa (s + s_lo) as a double-double (hi, lo)."""
    return dd_scale(s, s_lo, fp[row, P_KAPPA])


@njit(**INLINE_OPTIONS)
def clock_distances(s_hi, s_lo, sigma, bp_hi, bp_lo, bm_hi, bm_lo, w0):
    """(rem_plus, rem_minus, w) at the normalized clock (s_hi, s_lo) of a unique smallest layer:
    the distances to the blow-ups at w = +b and w = -b (exact leading differences of the
    double-doubles) and the clock coordinate w = psi0 - sigma s."""
    rem_plus = sigma * dd_difference(s_hi, s_lo, bp_hi, bp_lo)
    rem_minus = sigma * dd_difference(bm_hi, bm_lo, s_hi, s_lo)
    return rem_plus, rem_minus, (w0 - sigma * s_hi) - sigma * s_lo


# ---------------------------------------------------------------------------------------------
# The smallest layer at clock s
# ---------------------------------------------------------------------------------------------
@njit(**INLINE_OPTIONS)
def smallest_layer(family, ip, fp, row, ti, ts, tb, tp, s_hi, s_lo):
    """Normalized signed smallest layer r at normalized clock (s_hi, s_lo) for EQ3, EQ4,
    ELLIPTIC3, TABLE and TIE (TIE: sign(a_ref) m); +-inf once blown up."""
    sigma = fp[row, P_SIGMA]
    if family == TIE:
        rem = sigma * dd_difference(s_hi, s_lo, fp[row, P_BP_HI], fp[row, P_BP_LO])
        sign = 1.0 if fp[row, P_R0] > 0 else -1.0
        return sign * table_magnitude(ti, ts, tb, tp, ip[row, I_TABLE], 0.0, rem)
    rem_plus, rem_minus, w = clock_distances(s_hi, s_lo, sigma, fp[row, P_BP_HI], fp[row, P_BP_LO],
                                             fp[row, P_BM_HI], fp[row, P_BM_LO], fp[row, P_W0])
    if rem_plus <= 0.0:
        return np.inf
    if rem_minus <= 0.0:
        return -np.inf
    sign = 1.0 if w >= 0.0 else -1.0
    w_abs = abs(w)
    rem = rem_plus if w >= 0.0 else rem_minus
    c = fp[row, P_C]
    b = fp[row, P_B]
    if family == ELLIPTIC3:
        return sign * elliptic_magnitude(w_abs, rem, b, fp[row, P_P], fp[row, P_K])
    if family == TABLE:
        return sign * table_magnitude(ti, ts, tb, tp, ip[row, I_TABLE], w_abs, rem)
    if family == EQ3:
        if w_abs <= 0.5 * b:
            return c * math.tan(c * w)
        return sign * c / math.tan(c * rem)
    # EQ4
    if w_abs <= 0.5 * b:
        t = c * c * w
        return c * t / math.sqrt((1.0 - t) * (1.0 + t))
    u = c * c * rem
    return sign * c * (1.0 - u) / math.sqrt(u * (2.0 - u))


@njit(**INLINE_OPTIONS)
def _inverse_p(r_abs, ip, lgap, row):
    """1 / prod_{j != j*} sqrt(r^2 + g_j)."""
    prod = 1.0
    jstar = ip[row, I_JSTAR]
    for j in range(ip[row, I_DEPTH]):
        if j != jstar:
            prod *= r_abs * r_abs + lgap[row, j]
    return 1.0 / math.sqrt(prod)


@njit(**INLINE_OPTIONS)
def _mean_inverse_p(r0, r, ip, lgap, row):
    """The mean of 1 / P over [r0, r] (8-point Gauss–Legendre; both of one sign for TIE)."""
    acc = 0.0
    for i in range(GL_T.shape[0]):
        acc += GL_W[i] * _inverse_p(abs(r0 + (r - r0) * GL_T[i]), ip, lgap, row)
    return acc


@njit(**INLINE_OPTIONS)
def _singularity_distance(family, fp, row, r0, r):
    """Distance from [r0, r] to the nearest singularity of 1 / P (scale of the mean-value form)."""
    dist = fp[row, P_C]
    if family == TIE:
        dist = min(dist, abs(r0), abs(r))
    return dist


@njit(**INLINE_OPTIONS)
def smallest_layer_outputs(family, ip, fp, lgap, row, r, s_hi, want_g):
    """theta, h, G in true units from the normalized smallest layer r (EQ3, EQ4, ELLIPTIC3,
    TABLE, TIE)."""
    f = fp[row, P_SCALE]
    sign_others = fp[row, P_SIGN]
    if math.isinf(r):
        return sign_others * r, np.inf, -np.inf
    a = abs(r)
    p_true = 1.0
    ratio_sum = 1.0
    jstar = ip[row, I_JSTAR]
    big = a > 1e150
    for j in range(ip[row, I_DEPTH]):
        if j == jstar:
            continue
        g = lgap[row, j]
        if big:
            rel = g / a / a
            p_true *= (a * math.sqrt(1.0 + rel)) * f
            ratio_sum += 1.0 / (1.0 + rel)
        else:
            q2 = a * a + g
            p_true *= math.sqrt(q2) * f
            ratio_sum += a * a / q2 if q2 > 0.0 else 1.0
    theta = sign_others * r * f * p_true
    h = p_true * p_true * ratio_sum
    G = 0.0
    if want_g:
        r0 = fp[row, P_R0]
        delta = r - r0
        if abs(delta) <= MEAN_VALUE_FRACTION * _singularity_distance(family, fp, row, r0, r):
            # G = (r0^2 - r^2) / 2 with r - r0 from the clock itself: full relative precision
            delta = -sign_others * s_hi / _mean_inverse_p(r0, r, ip, lgap, row)
        G = (-0.5 * delta * f) * ((r + r0) * f)
    return theta, h, G


# ---------------------------------------------------------------------------------------------
# Closed-form families
# ---------------------------------------------------------------------------------------------
@njit(**INLINE_OPTIONS)
def depth2_outputs(fp, row, s, want_g):
    """theta, h, G of a depth-2 half (log form where needed)."""
    A = fp[row, P_R0]
    B = fp[row, P_W0]
    f = fp[row, P_SCALE]
    two_k = 2.0 * fp[row, P_K]
    G = 0.0
    if A > 0.0 and B > 0.0:
        y = 2.0 * (fp[row, P_B] - s)
        ab2 = 2.0 * A * B
        if abs(y) < LOG_FORM and abs(fp[row, P_K]) < LOG_SCALE_BITS:
            theta = ab2 * math.sinh(y) * f * f
            h = 2.0 * ab2 * math.cosh(y) * f * f
        else:
            mag = _scaled_exp(math.log(A * B) + abs(y), two_k)
            theta = mag if y > 0 else -mag
            h = 2.0 * mag
        if want_g and s != 0.0:
            x = 2.0 * fp[row, P_B] - s
            if abs(x) < LOG_FORM and abs(s) < LOG_FORM and abs(fp[row, P_K]) < LOG_SCALE_BITS:
                G = ab2 * math.sinh(x) * math.sinh(s) * f * f
            elif x != 0.0:
                mag = _scaled_exp(math.log(ab2) + _log_sinh(x) + _log_sinh(s), two_k)
                G = mag if (x > 0) == (s > 0) else -mag
        return theta, h, G
    # one of the two combinations vanishes: a pure exponential
    if A > 0.0:
        amp, rate = A, -2.0
    else:
        amp, rate = B, 2.0
    sign = 1.0 if A > 0.0 else -1.0
    arg = rate * s
    direct = arg < LOG_FORM and abs(fp[row, P_K]) < LOG_SCALE_BITS
    if direct:
        mag = amp * amp * math.exp(arg) * f * f
    else:
        mag = _scaled_exp(2.0 * math.log(amp) + arg, two_k)
    if want_g and arg != 0.0:
        # G = int_0^s theta = sign amp^2 f^2 expm1(arg) / rate
        if direct:
            G = sign * amp * amp * math.expm1(arg) / rate * f * f
        else:
            log_e = arg + math.log1p(-math.exp(-arg)) if arg > 0 else math.log(-math.expm1(arg))
            mag_g = _scaled_exp(2.0 * math.log(amp) + log_e - math.log(abs(rate)), two_k)
            G = sign * mag_g * (1.0 if (arg > 0) == (rate > 0) else -1.0)
    return sign * mag, 2.0 * mag, G


@njit(**INLINE_OPTIONS)
def depth2_layers(fp, row, s):
    """The two layers of a depth-2 half at clock s (relative precision, log form where needed)."""
    A = fp[row, P_R0]
    B = fp[row, P_W0]
    f = fp[row, P_SCALE]
    if A > 0.0 and B > 0.0:
        half_y = fp[row, P_B] - s
        same = fp[row, P_C] == fp[row, P_P]
        if abs(half_y) < LOG_FORM and abs(fp[row, P_K]) < LOG_SCALE_BITS:
            root = math.sqrt(A * B) * f
            big = 2.0 * root * math.cosh(half_y)
            small = 2.0 * root * math.sinh(half_y)
        else:
            mag = _scaled_exp(0.5 * math.log(A * B) + abs(half_y), fp[row, P_K])
            big = mag
            small = mag if half_y > 0 else -mag
        sp = fp[row, P_C]
        if same:
            return sp * big, sp * small
        return sp * small, sp * big
    # u1 + u2 = p e^{-s} with u1 - u2 = 0 (B = 0), or u1 + u2 = 0 (A = 0)
    if A > 0.0:
        if -s < LOG_FORM and abs(fp[row, P_K]) < LOG_SCALE_BITS:
            v = fp[row, P_C] * A * math.exp(-s) * f
        else:
            v = fp[row, P_C] * _scaled_exp(math.log(A) - s, fp[row, P_K])
        return v, v
    if s < LOG_FORM and abs(fp[row, P_K]) < LOG_SCALE_BITS:
        v = fp[row, P_P] * B * math.exp(s) * f
    else:
        v = fp[row, P_P] * _scaled_exp(math.log(B) + s, fp[row, P_K])
    return v, -v


@njit(**INLINE_OPTIONS)
def _power(x, p):
    """x ** p for x >= 0; by repeated squaring when p is a whole number up to 32 (a few ulps,
    where a call of pow costs about 15 ns)."""
    if p == math.floor(p) and 0.0 <= p <= 32.0:
        n = int(p)
        result = 1.0
        while n > 0:
            if n & 1:
                result *= x
            n >>= 1
            if n > 0:
                x *= x
        return result
    return x ** p


@njit(**INLINE_OPTIONS)
def power_magnitude(fp, row, s_hi, s_lo):
    """Normalized m at normalized clock (s_hi, s_lo) (inf once blown up)."""
    p = fp[row, P_P]
    k = fp[row, P_K]
    sigma = fp[row, P_SIGMA]
    if p == 2.0:
        return math.exp(-sigma * k * (s_hi + s_lo))
    rem = sigma * dd_difference(s_hi, s_lo, fp[row, P_BP_HI], fp[row, P_BP_LO])
    if rem <= 0.0:
        return np.inf
    base = k * (p - 2.0) * rem
    if p == 3.0:
        return 1.0 / base
    if p == 4.0:
        return 1.0 / math.sqrt(base)
    return base ** (-1.0 / (p - 2.0))


@njit(**INLINE_OPTIONS)
def power_outputs(fp, row, m, s_hi, want_g):
    """theta, h, G of a POWER half from its normalized magnitude m."""
    p = fp[row, P_P]
    k = fp[row, P_K]
    sigma = fp[row, P_SIGMA]
    f = fp[row, P_SCALE]
    if math.isinf(m):
        return sigma * np.inf, np.inf, -np.inf
    mt = m * f
    theta = sigma * _power(mt, p)
    h = k * p * _power(mt, 2.0 * (p - 1.0))
    G = 0.0
    if want_g:
        eps = sigma * k * (p - 2.0) * s_hi
        if p == 2.0:
            one_minus = -math.expm1(-2.0 * sigma * k * s_hi)
        elif abs(eps) < 0.5:
            one_minus = -math.expm1(-(2.0 / (p - 2.0)) * math.log1p(eps))
        else:
            one_minus = 1.0 - m * m
        G = one_minus * f * f / (2.0 * k)
    return theta, h, G


# ---------------------------------------------------------------------------------------------
# One half: evaluate, layers, clock of a theta
# ---------------------------------------------------------------------------------------------
@njit(**INLINE_OPTIONS)
def half_evaluate(ip, fp, lgap, row, ti, ts, tb, tp, s, s_lo, want_g):
    """theta, h, G (true units) of one half at its clock s (+ s_lo, a low-order part)."""
    family = ip[row, I_FAMILY]
    if family == FROZEN:
        return fp[row, P_R0], 0.0, fp[row, P_R0] * s
    if family == LINEAR:
        a = fp[row, P_R0]
        return (a - s) - s_lo, 1.0, s * (a - 0.5 * s)
    if family == DEPTH2:
        return depth2_outputs(fp, row, s + s_lo, want_g)
    s_hi, s_lo_n = normalized_clock(fp, row, s, s_lo)
    if family == POWER:
        m = power_magnitude(fp, row, s_hi, s_lo_n)
        return power_outputs(fp, row, m, s_hi, want_g)
    r = smallest_layer(family, ip, fp, row, ti, ts, tb, tp, s_hi, s_lo_n)
    return smallest_layer_outputs(family, ip, fp, lgap, row, r, s_hi, want_g)


@njit(**INLINE_OPTIONS)
def half_layers(ip, fp, lsign, lgap, lzero, row, ti, ts, tb, tp, s, s_lo, out, out_row, out_col):
    """The layers of one half at its clock s into out[out_row + j, out_col] (true units)."""
    family = ip[row, I_FAMILY]
    depth = ip[row, I_DEPTH]
    f = fp[row, P_SCALE]
    if family == FROZEN:
        for j in range(depth):
            out[out_row + j, out_col] = lzero[row, j]
        return
    if family == LINEAR:
        out[out_row, out_col] = (fp[row, P_R0] - s) - s_lo
        return
    if family == DEPTH2:
        out[out_row, out_col], out[out_row + 1, out_col] = depth2_layers(fp, row, s + s_lo)
        return
    s_hi, s_lo_n = normalized_clock(fp, row, s, s_lo)
    if family == POWER:
        m = power_magnitude(fp, row, s_hi, s_lo_n)
        for j in range(depth):
            out[out_row + j, out_col] = lsign[row, j] * m * f
        return
    r = smallest_layer(family, ip, fp, row, ti, ts, tb, tp, s_hi, s_lo_n)
    jstar = ip[row, I_JSTAR]
    a = abs(r)
    for j in range(depth):
        if j == jstar:
            out[out_row + j, out_col] = r * f
        elif math.isinf(a):
            out[out_row + j, out_col] = lsign[row, j] * np.inf
        elif a > 1e150:
            out[out_row + j, out_col] = lsign[row, j] * (a * math.sqrt(1.0 + lgap[row, j] / a / a)) * f
        else:
            out[out_row + j, out_col] = lsign[row, j] * math.sqrt(a * a + lgap[row, j]) * f


@njit(**INLINE_OPTIONS)
def _smallest_from_theta(ip, fp, lgap, row, theta):
    """Normalized |r| with |r| P(|r|) = |theta| / f^L (Newton on log r^2, then one step in r),
    0 for theta = 0."""
    if theta == 0.0:
        return 0.0
    depth = ip[row, I_DEPTH]
    jstar = ip[row, I_JSTAR]
    log_t2 = 2.0 * (math.log(abs(theta)) - depth * math.log(fp[row, P_SCALE]))
    # upper bound of the root of F(u) = u + sum_j log(e^u + g_j) - log_t2 (F' in [1, L])
    sum_log_g = 0.0
    has_zero = False
    for j in range(depth):
        if j != jstar:
            if lgap[row, j] > 0.0:
                sum_log_g += math.log(lgap[row, j])
            else:
                has_zero = True
    u = log_t2 / depth
    if not has_zero:
        u = min(u, log_t2 - sum_log_g)
    for _ in range(200):
        e = math.exp(u)
        F = u - log_t2
        dF = 1.0
        for j in range(depth):
            if j != jstar:
                F += math.log(e + lgap[row, j])
                dF += e / (e + lgap[row, j])
        step = F / dF
        u -= step
        if abs(step) <= 1e-12:
            break
    a = math.exp(0.5 * u)
    # one Newton step on a P(a) = |theta| / f^L in a itself, in scaled form
    target_log = 0.5 * log_t2
    p_log = 0.0
    slope_rel = 1.0
    for j in range(depth):
        if j != jstar:
            q2 = a * a + lgap[row, j]
            p_log += 0.5 * math.log(q2)
            slope_rel += a * a / q2
    value_log = math.log(a) + p_log
    # a P(a) = exp(value_log); relative residual exp(value_log - target_log) - 1
    rel = math.expm1(value_log - target_log)
    return a - a * rel / slope_rel


@njit(**INLINE_OPTIONS)
def half_clock_of(ip, fp, lgap, row, ti, ts, tb, tp, theta):
    """The clock s of one product half with F(s) = theta; nan if theta is not reachable."""
    family = ip[row, I_FAMILY]
    if math.isnan(theta):
        return np.nan
    if family == FROZEN:
        return 0.0 if theta == fp[row, P_R0] else np.nan
    if family == LINEAR:
        return fp[row, P_R0] - theta
    if family == DEPTH2:
        A = fp[row, P_R0]
        B = fp[row, P_W0]
        two_k = 2.0 * fp[row, P_K]
        log_abs = math.log(abs(theta)) if theta != 0.0 else -np.inf
        if A > 0.0 and B > 0.0:
            # theta = 2AB f^2 sinh y, s = c - y / 2
            log_x = log_abs - math.log(2.0 * A * B) - two_k * LN2_HI - two_k * LN2_LO
            if log_x < 300.0:
                x = math.exp(log_x) if theta != 0.0 else 0.0
                y = math.asinh(x)
            else:
                y = log_x + LN2_HI + LN2_LO
            if theta < 0.0:
                y = -y
            return fp[row, P_B] - 0.5 * y
        if A > 0.0:
            if theta <= 0.0:
                return np.nan
            return 0.5 * ((2.0 * math.log(A) + two_k * LN2_HI + two_k * LN2_LO) - log_abs)
        if theta >= 0.0:
            return np.nan
        return 0.5 * (log_abs - (2.0 * math.log(B) + two_k * LN2_HI + two_k * LN2_LO))
    sigma = fp[row, P_SIGMA]
    kappa = fp[row, P_KAPPA]
    f = fp[row, P_SCALE]
    if family == POWER:
        p = fp[row, P_P]
        k = fp[row, P_K]
        if sigma * theta <= 0.0:
            return np.nan
        log_m = (math.log(sigma * theta) / p) - math.log(f)
        if p == 2.0:
            return -sigma * log_m / k / kappa
        return sigma * math.expm1((2.0 - p) * log_m) / (k * (p - 2.0)) / kappa
    a = _smallest_from_theta(ip, fp, lgap, row, theta)
    sign_others = fp[row, P_SIGN]
    r = a if theta * sign_others >= 0.0 else -a
    r0 = fp[row, P_R0]
    if family == TIE and r * r0 <= 0.0:
        return np.nan  # the tied layers never change sign
    delta = r - r0
    if abs(delta) <= MEAN_VALUE_FRACTION * _singularity_distance(family, fp, row, r0, r):
        return -sign_others * delta * _mean_inverse_p(r0, r, ip, lgap, row) / kappa
    c = fp[row, P_C]
    if family == TIE:
        _, rem = table_clock(ti, ts, tb, tp, ip[row, I_TABLE], a)
        return (fp[row, P_BP_HI] + sigma * rem) / kappa
    b = fp[row, P_B]
    if family == EQ3:
        w_abs = math.atan(a / c) / c
        rem = math.atan(c / a) / c if a > 0.0 else b
    elif family == EQ4:
        q = math.sqrt(a * a + c * c)
        w_abs = a / (c * c * q)
        rem = 1.0 / (q * (q + a))
    elif family == ELLIPTIC3:
        w_abs, rem = elliptic_clock(a, b, fp[row, P_P], fp[row, P_K])
    else:
        w_abs, rem = table_clock(ti, ts, tb, tp, ip[row, I_TABLE], a)
    if w_abs <= 0.5 * b:
        w = w_abs if r >= 0.0 else -w_abs
        return sigma * (fp[row, P_W0] - w) / kappa
    if r >= 0.0:
        return (fp[row, P_BP_HI] + sigma * rem) / kappa
    return (fp[row, P_BM_HI] - sigma * rem) / kappa
