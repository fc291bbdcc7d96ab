"""Read a run and put the theory next to it: the predicted limit, the KKT residual, the rates and
the convergence bounds (:mod:`ddln_fast.bounds`), checked at every committed checkpoint; and the
plots. Every parametrization; the product's needs assumption (A).

The bounds are theorems about the exact gradient flow: a dopri5 or rk4 run follows it to its
tolerance, gradient descent (euler) only to O(dt), so a "violated" bound on an euler run with a
large step says that the run is not the flow.

Works on a run that is still being written: only committed checkpoints are read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np

from . import bounds
from .errors import InputError
from .parametrization import Parametrization
from .prediction import bregman_projection, constraints, warn_if_not_converged
from .epsilon import EPSILON, time_to_epsilon
from .theory import Geometry, assumption_a
from .threads import serial_blas
# Relative residual of the dual Newton iteration for the predicted limit (as ``ddln predict``).
PREDICTION_TOL = 1e-12


@dataclass
class SeedAnalysis:
    """What ``ddln analyze`` reports for one seed (times are flow time)."""

    seed: int
    status: str
    t_final: float
    final_loss: float
    f_star: float
    max_invariant_drift: float       # largest drift of the invariants over the checkpoints
    gap_to_prediction: float          # ||theta_K - theta_inf|| / ||theta_inf||
    kkt_residual: float               # ||P_null(X) (phi(theta_K) - phi(theta_0))||
    fitted_rate: float                # slope of -log(f - f*) over its last decades
    pl_rate: float                    # 2 mu c_A, c_A = min_i min_theta h_i
    pl_rate_at_limit: float           # 2 mu min_i h_i(theta_inf): the asymptotic PL rate
    time_to_epsilon: float            # first t with (f - f*) / (f0 - f*) <= EPSILON (nan: not reached)
    bound_pl_c_a_held: bool | None   # None: not defined (assumption (A) fails)
    bound_pl_trajectory_held: bool | None
    bound_sublinear_held: bool | None
    l1_norm: float
    predicted_l1_norm: float
    note: str = ""                    # what could not be analyzed, and why
    # curves for the plots, not in the JSON
    curves: dict = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict:
        out = asdict(self)
        out.pop("curves")
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in out.items()}


@dataclass
class RunAnalysis:
    path: str
    complete: bool
    committed: int
    depth: int
    mu: list
    projected: bool
    seeds: list[SeedAnalysis]
    parametrization: Parametrization = field(default_factory=Parametrization)

    def as_dict(self) -> dict:
        return {"path": self.path, "complete": self.complete, "committed_checkpoints": self.committed,
                "depth": self.depth, "parametrization": self.parametrization.name,
                "power": self.parametrization.power, "pl_constant": self.mu,
                "projected_onto_argmin_f": self.projected, "epsilon": EPSILON,
                "seeds": [s.as_dict() for s in self.seeds]}


def _distinct_rows(t_seed: np.ndarray) -> np.ndarray:
    """Indices of checkpoints where the seed had moved (a stopped seed repeats its last row)."""
    keep = [0]
    for k in range(1, len(t_seed)):
        if t_seed[k] > t_seed[keep[-1]]:
            keep.append(k)
    return np.array(keep)


def _fitted_rate(t, gap, gap0):
    """Least-squares slope of -log(f - f*) where 1e-14 <= (f - f*) / (f0 - f*) <= 1e-5: late
    enough for the slowest mode to dominate, above the floor that rounding and the integrator's
    tolerance leave."""
    rel = gap / gap0
    window = (rel <= 1e-5) & (rel >= 1e-14) & (gap > 0)
    if window.sum() < 3:
        return float("nan")
    slope = np.polyfit(t[window], np.log(gap[window]), 1)[0]
    return float(-slope)


def analyze_seed(s, t, loss, theta, u0, X, y, drift, status, cons=None, mu=None,
                 parametrization: Parametrization | None = None) -> SeedAnalysis:
    """Analysis of one seed from its checkpoints.

    Everything is computed, except for a product run whose initialization violates assumption
    (A) (a sign trap, e.g. ``balanced``): its mirror geometry does not cover R, so only what the
    losses give (f - f*, drift, fitted rate, time to epsilon) is, and the rest is NaN (bounds:
    None) with ``note`` saying why.

    Parameters
    ----------
    t : ndarray of shape (K,)
        The seed's own times (``t_seed``).
    loss : ndarray of shape (K,)
    theta : ndarray of shape (K, d)
    u0 : ndarray of shape (P, d)
    X, y : ndarray of shape (n, d), (n,)
    parametrization : Parametrization, optional
        Default: the product of the P layers.
    """
    param = parametrization or Parametrization.of_layers("product", u0.shape[0])
    cons = constraints(X, y) if cons is None else cons
    mu = bounds.pl_constant(X) if mu is None else mu
    f_star = cons.f_star
    rows = _distinct_rows(t)
    # a diverged seed's last rows are not finite: the theory speaks about the rows before
    rows = rows[np.isfinite(loss[rows]) & np.all(np.isfinite(theta[rows]), axis=1)]
    if rows.size == 0:
        rows = np.array([0])
    t, loss, theta = t[rows], loss[rows], theta[rows]
    gap = np.maximum(loss - f_star, 0.0)
    gap0 = gap[0]
    common = dict(seed=s, status=status, t_final=float(t[-1]), final_loss=float(loss[-1]), f_star=f_star,
                  max_invariant_drift=float(drift), fitted_rate=_fitted_rate(t, gap, gap0),
                  time_to_epsilon=time_to_epsilon(t, loss, f_star, EPSILON),
                  l1_norm=float(np.abs(theta[-1]).sum()))
    trap = assumption_a(u0) if param.name == "product" else None
    if trap is not None and not trap.holds:
        nan = float("nan")
        return SeedAnalysis(
            **common, gap_to_prediction=nan, kkt_residual=nan, pl_rate=nan, pl_rate_at_limit=nan,
            bound_pl_c_a_held=None, bound_pl_trajectory_held=None, bound_sublinear_held=None,
            predicted_l1_norm=nan,
            note=f"assumption (A) fails at {int(trap.violating.sum())} of {trap.violating.size} coordinates "
                 f"(sign trap): no predicted limit, KKT residual, PL rates or bounds",
            curves={"t": t, "gap": gap, "theta": theta})
    geo = Geometry.from_layers(u0[None], param)
    limit = bregman_projection(geo, 0, cons, PREDICTION_TOL)
    warn_if_not_converged(limit, s, PREDICTION_TOL)
    # PL bounds: with c_A, and with the integral of min_i h_i(theta(s)) along the checkpoints
    cA = float(bounds.c_a(geo)[0])
    h_min = np.min(geo.h(theta, 0), axis=1)
    bound_ca = bounds.pl_bound(gap0, mu, cA * t)
    bound_traj = bounds.pl_bound(gap0, mu, bounds.rate_integral(t, h_min))
    # D_Q(theta*, theta0) = G(s*) - theta* s* with the limit's clocks s* = A^T mu
    s_star = cons.A.T @ limit.mu
    d_q = float(np.sum(geo.evaluate(s_star, 0, G=True)[2] - limit.theta * s_star))
    bound_sub = bounds.sublinear_bound(t, d_q)
    v = geo.mirror_map(theta[-1], 0)  # phi(theta_K) - phi(theta_0)
    kkt = float(np.linalg.norm(v - cons.A.T @ (cons.A @ v)))
    ref = max(float(np.linalg.norm(limit.theta)), 1e-300)
    gaps_t = np.linalg.norm(theta - limit.theta, axis=1) / ref
    h_limit = geo.evaluate(s_star, 0)[1]
    return SeedAnalysis(
        **common, gap_to_prediction=float(gaps_t[-1]), kkt_residual=kkt,
        pl_rate=float(2 * mu * cA), pl_rate_at_limit=float(2 * mu * np.min(h_limit)),
        bound_pl_c_a_held=bounds.bound_held(gap, bound_ca),
        bound_pl_trajectory_held=bounds.bound_held(gap, bound_traj),
        bound_sublinear_held=bounds.bound_held(gap, bound_sub), predicted_l1_norm=float(np.abs(limit.theta).sum()),
        curves={"t": t, "gap": gap, "bound_pl_c_a": bound_ca, "bound_pl_trajectory": bound_traj,
                "bound_sublinear": bound_sub, "theta": theta, "limit": limit.theta, "gap_t": gaps_t})


def analyze_run(run) -> RunAnalysis:
    """Analyze every seed of an open :class:`~ddln_fast.store.Run` (committed rows only)."""
    from .integrators import STATUS_NAMES

    run.refresh()
    k = run.committed
    if k == 0:
        raise InputError(f"run file {run.path} has no committed checkpoint yet")
    u0 = run.u0
    S = u0.shape[0]
    config = run.config
    param = Parametrization.from_config(config)
    X, y = run.X, run.y
    t_seed, loss, theta = run.t_seed, run.loss, run.theta
    drift, status = run.max_invariant_drift(), run.status
    per_seed = X.ndim == 3
    shared = None if per_seed else (constraints(X, y), bounds.pl_constant(X))
    seeds, mus = [], []
    projected = False
    for s in range(S):
        Xs, ys = (X[s], y[s]) if per_seed else (X, y)
        cons, mu = shared if shared else (constraints(Xs, ys), bounds.pl_constant(Xs))
        projected |= cons.projected
        mus.append(mu)
        seeds.append(analyze_seed(s, t_seed[:, s], loss[:, s], theta[:, s].astype(np.float64), u0[s], Xs, ys,
                                  float(drift[s]), STATUS_NAMES[int(status[-1, s])], cons, mu, param))
    if not follows_gradient_flow(config):
        # the bounds are theorems about gradient flow: a stochastic or momentum run can break them
        # without anything being wrong, so they are not checked (n/a), not reported as VIOLATED
        seeds = [replace(sa, bound_pl_c_a_held=None, bound_pl_trajectory_held=None,
                         bound_sublinear_held=None) for sa in seeds]
    return RunAnalysis(str(run.path), run.complete, k, config.model.depth, mus if per_seed else mus[:1],
                       projected, seeds, param)


def follows_gradient_flow(config) -> bool:
    """Whether a run approximates gradient flow: a flow method, or full-batch gradient descent
    with a constant step and nothing else (no batches, momentum, label noise, weight decay or
    schedule)."""
    from .config import DESCENT_METHODS
    from .stochastic import DescentOptions

    if config.integrator.method not in DESCENT_METHODS:
        return True
    return DescentOptions.from_config(config.with_overrides({"run.gain": False})).plain


def analyze(path) -> RunAnalysis:
    """Open a run file (complete or still being written) and analyze it."""
    from .store import open_run
    from .store.safety import check_not_truncated

    check_not_truncated(path)
    run = open_run(path)
    try:
        with serial_blas():
            return analyze_run(run)
    finally:
        run.close()


#: Seeds the plots show when none are chosen.
DEFAULT_PLOTTED_SEEDS = 4


def plotted_seeds(analysis: RunAnalysis, seeds=None) -> list[int]:
    """The seeds the plots show: ``seeds`` (checked against the run), or the first
    :data:`DEFAULT_PLOTTED_SEEDS`."""
    count = len(analysis.seeds)
    if seeds is None:
        return list(range(min(DEFAULT_PLOTTED_SEEDS, count)))
    bad = [s for s in seeds if not 0 <= s < count]
    if bad:
        raise InputError(f"seeds {', '.join(map(str, bad))}: the run has seeds 0 to {count - 1}")
    return sorted(set(seeds))


def plot(analysis: RunAnalysis, folder, seeds=None) -> list[str]:
    """The plots of the chosen seeds (default: the first four, see :func:`plotted_seeds`):
    loss.png (f - f* with the PL and sublinear bounds, log axes), theta_seed{S}.png for each
    seed (its largest coordinates over time, with the predicted limit), gap.png (distance to the
    prediction over time; left out when no shown seed has a prediction)."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shown = [analysis.seeds[s] for s in plotted_seeds(analysis, seeds)]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []
    listed = ", ".join(str(sa.seed) for sa in shown)

    def save(fig, ax, name):
        if ax.get_legend_handles_labels()[0]:  # outside the axes: a legend never hides a curve
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
        fig.tight_layout()
        written.append(str(folder / name))
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(8.4, 4.4))
    for i, sa in enumerate(shown):
        c, color = sa.curves, colors[i % len(colors)]
        pos = c["t"] > 0
        ax.loglog(c["t"][pos], np.maximum(c["gap"][pos], 1e-300), color=color, lw=2,
                  label=f"seed {sa.seed}: f - f*")
        for key, style, label in (("bound_pl_trajectory", "--", "PL bound, $\\int \\min_i h_i$"),
                                  ("bound_pl_c_a", ":", "PL bound, $c_A t$"),
                                  ("bound_sublinear", "-.", "$D_Q(\\theta^*, \\theta_0) / t$")):
            if key in c:
                ax.loglog(c["t"][pos], c[key][pos], color=color, ls=style, lw=1,
                          label=f"seed {sa.seed}: {label}")
    floor = min(max(np.min(sa.curves["gap"][sa.curves["gap"] > 0], initial=1.0), 1e-30) for sa in shown)
    ax.set_ylim(bottom=max(floor / 10, 1e-32))
    ax.set_xlabel("flow time t")
    ax.set_ylabel("f(theta(t)) - f*")
    ax.set_title(f"loss and convergence bounds ({analysis.parametrization.describe()}; seeds {listed})")
    save(fig, ax, "loss.png")

    for sa in shown:
        c = sa.curves
        magnitude = np.abs(c["limit"]) if "limit" in c else np.abs(c["theta"][-1])
        order = np.argsort(-magnitude)[:8]
        fig, ax = plt.subplots(figsize=(8.4, 4.4))
        pos = c["t"] > 0
        for i, j in enumerate(order):
            color = colors[i % len(colors)]
            ax.semilogx(c["t"][pos], c["theta"][pos, j], color=color, lw=1.5, label=f"theta_{j}")
            if "limit" in c:
                ax.axhline(c["limit"][j], color=color, ls="--", lw=0.8)
        ax.set_xlabel("flow time t")
        ax.set_ylabel("theta_i(t)")
        what = "dashed: predicted limit" if "limit" in c else "no predicted limit: assumption (A) fails"
        ax.set_title(f"seed {sa.seed}: the 8 largest coordinates; {what}")
        save(fig, ax, f"theta_seed{sa.seed}.png")

    predicted = [sa for sa in shown if "gap_t" in sa.curves]
    if predicted:
        fig, ax = plt.subplots(figsize=(8.4, 4.4))
        for i, sa in enumerate(predicted):
            c = sa.curves
            pos = c["t"] > 0
            ax.loglog(c["t"][pos], np.maximum(c["gap_t"][pos], 1e-17), color=colors[i % len(colors)],
                      label=f"seed {sa.seed}")
        ax.set_xlabel("flow time t")
        ax.set_ylabel("||theta(t) - theta_inf|| / ||theta_inf||")
        ax.set_title("distance to the predicted limit")
        save(fig, ax, "gap.png")
    return written
