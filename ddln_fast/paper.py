"""The paper's figures, regenerated from data/paper/ (``make paper``; a few minutes on 2 cores).

    python -m ddln_fast.paper [--configs data/paper] [--out figures]

(a) implicit_bias.png: l1 norm of the predicted limit and its distance to the minimum-l1
    interpolator against alpha, depths 2-5 (``predict``, no training);
(b) time_to_epsilon.png: flow time to a relative loss of 1e-6 against alpha, depths 2-5 (dopri5
    runs, analyzed);
(c) pl_bound.png: loss decay of a run against the PL bounds and D_Q(theta*, theta0) / t;
(d) which_l1_minimizer.png: on a problem with a segment of minimum-l1 interpolators, where the
    predicted limit of theta = u^D - v^D (u = v = alpha) lands as alpha^D -> 0, D in 2, 2.5, 3,
    4 (``predict``; dopri5 runs at three alphas as a cross-check).
(e) step_size.png: l1 norm of the limit of gradient descent and of SGD at depth 2 against the
    step size, next to the gradient-flow prediction and the minimum l1 norm (runs, and the
    prediction from each run's effective initialization).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from .config import Config, read_toml


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, axes, path: Path, title: str) -> None:
    """Legends and grids on ``axes``, the title over them, then the PNG at ``path``."""
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def implicit_bias(spec: dict, base_dir: Path, out: Path) -> dict:
    """Figure (a); returns the numbers it plots."""
    from .init import initial_layers
    from .problem import make_problem
    from .prediction import min_l1_interpolator, predict_arrays

    base = Config.from_toml(base_dir / spec["config"])
    problem = make_problem(base)
    l1_ref = min_l1_interpolator(problem.X, problem.y)
    results = {}
    for depth in spec["depths"]:
        norms, dists = [], []
        for alpha in spec["alphas"]:
            cfg = base.with_overrides({"model.depth": depth, "model.alpha": alpha})
            theta = predict_arrays(problem.X, problem.y, initial_layers(cfg, problem.d)).theta
            norms.append(float(np.mean(np.abs(theta).sum(axis=1))))
            dists.append(float(np.mean(np.linalg.norm(theta - l1_ref, axis=1)) / np.linalg.norm(l1_ref)))
        results[depth] = (norms, dists)
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    alphas = spec["alphas"]
    for depth, (norms, dists) in results.items():
        axes[0].semilogx(alphas, norms, "o-", label=f"depth {depth}")
        axes[1].loglog(alphas, dists, "o-", label=f"depth {depth}")
    axes[0].axhline(np.abs(l1_ref).sum(), color="k", ls="--", lw=1, label="minimum l1 norm")
    # HiGHS solves the LP to ~1e-9 and the dual Newton stops at ~eps * b for tiny alpha: below
    # this band the distances are numerical noise
    axes[1].axhspan(1e-11, 1e-8, color="0.85", zorder=0, label="solver accuracy")
    axes[0].set_xlabel("initialization scale alpha")
    axes[0].set_ylabel("||theta_inf||_1")
    axes[0].set_title("l1 norm of the limit")
    axes[1].set_xlabel("initialization scale alpha")
    axes[1].set_ylabel("||theta_inf - theta_l1|| / ||theta_l1||")
    axes[1].set_title("distance to the minimum-l1 interpolator")
    _save(plt, fig, axes, out / "implicit_bias.png",
          f"Implicit bias (predicted, no training): n = {problem.n}, d = {problem.d}, "
          f"{base.problem.sparsity}-sparse, first layer zero")
    return {"alphas": alphas, "l1_norm_min_l1": float(np.abs(l1_ref).sum()),
            **{f"depth{d}": {"l1_norm": r[0], "relative_distance_to_min_l1": r[1]} for d, r in results.items()}}


def time_to_epsilon(spec: dict, base_dir: Path, out: Path) -> dict:
    """Figure (b)."""
    from .epsilon import time_to_epsilon
    from .simulate import simulate
    from .prediction import constraints
    from .threads import serial_blas

    base = Config.from_toml(base_dir / spec["config"])
    eps = float(spec.get("epsilon", 1e-6))
    results = {}
    for depth in spec["depths"]:
        times = []
        for alpha in spec["alphas"]:
            cfg = base.with_overrides({"model.depth": depth, "model.alpha": alpha})
            run = simulate(cfg)
            X, y = run.X, run.y
            with serial_blas():
                f_star = constraints(X, y).f_star
            per_seed = []
            for s in range(cfg.run.seeds):
                per_seed.append(time_to_epsilon(run.t_seed[:, s], run.loss[:, s], f_star, eps))
            times.append(float(np.mean(per_seed)))
            run.close() if hasattr(run, "close") else None
        results[depth] = times
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    alphas = spec["alphas"]
    for depth, times in results.items():
        ax.loglog(alphas, times, "o-", label=f"depth {depth}")
    ax.axvline(1.0, color="k", ls=":", lw=1)
    ax.set_xlabel("initialization scale alpha (first layer zero, others alpha)")
    ax.set_ylabel(f"flow time to (f - f*) / (f0 - f*) = {eps:g}")
    ax.set_title("Depth slows training for alpha < 1 and speeds it up for alpha > 1")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out / "time_to_epsilon.png", dpi=120)
    plt.close(fig)
    return {"alphas": alphas, **{f"depth{d}": t for d, t in results.items()}}


def pl_bound(spec: dict, base_dir: Path, out: Path) -> dict:
    """Figure (c)."""
    from .analysis import analyze_run
    from .simulate import simulate
    from .threads import serial_blas

    cfg = Config.from_toml(base_dir / spec["config"])
    run = simulate(cfg)
    with serial_blas():
        result = analyze_run(run)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, sa in enumerate(result.seeds):
        c = sa.curves
        pos = c["t"] > 0
        t = c["t"][pos]
        ax.loglog(t, np.maximum(c["gap"][pos], 1e-300), color=colors[i], lw=2.2, label=f"seed {sa.seed}: f - f*")
        ax.loglog(t, c["bound_pl_trajectory"][pos], color=colors[i], ls="--", lw=1.2,
                  label="PL bound with $\\int_0^t \\min_i h_i$" if i == 0 else None)
        ax.loglog(t, c["bound_pl_c_a"][pos], color=colors[i], ls=":", lw=1.2,
                  label="PL bound with $c_A t$" if i == 0 else None)
        ax.loglog(t, c["bound_sublinear"][pos], color=colors[i], ls="-.", lw=1,
                  label="$D_Q(\\theta^*, \\theta_0) / t$" if i == 0 else None)
    floor = min(np.min(sa.curves["gap"][sa.curves["gap"] > 0]) for sa in result.seeds)
    ax.set_ylim(max(floor / 10, 1e-30), None)
    m = cfg.model
    ax.set_xlabel("flow time t")
    ax.set_ylabel("f(theta(t)) - f*")
    ax.set_title(f"Loss vs the convergence bounds (depth {m.depth}, alpha {m.alpha:g})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out / "pl_bound.png", dpi=120)
    plt.close(fig)
    return {"seeds": [sa.as_dict() for sa in result.seeds]}


def tied_l1_problem(n: int, d: int, ratio: float, seed: int):
    """X (n, d), y (n,) whose minimum-l1 interpolators form a segment: column 2 is
    (x_0 + ratio x_1) / (1 + ratio) and y = x_0 + ratio x_1, so every
    theta(t) = (1 - t) (e_0 + ratio e_1) + t (1 + ratio) e_2, t in [0, 1], interpolates with the
    same l1 norm 1 + ratio (the other columns are Gaussian)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    X[:, 2] = (X[:, 0] + ratio * X[:, 1]) / (1 + ratio)
    return X, X[:, 0] + ratio * X[:, 1]


def tie_break_position(power: float, ratio: float) -> float:
    """t*(D): where on the segment of :func:`tied_l1_problem` the small-alpha limit of theta =
    u^D - v^D from u = v = alpha ends.

    At small alpha the potential is (a scale times) the l1 norm plus a next-order term that
    breaks the tie: sum theta log theta for D = 2 (the hyperbolic entropy, theta arcsinh(theta /
    beta) ~ theta log(2 theta / beta)), -(D/2) sum theta^(2/D) for D > 2 (Woodworth's
    q_D(x) ~ x - (D/2) x^(2/D)). Its stationary point on ((1-t), ratio (1-t), (1+ratio) t):
    t / (1 - t) = ratio^(ratio/(1+ratio)) / (1 + ratio) for D = 2, and
    (t / (1 - t))^(1 - 2/D) = (1 + ratio)^(2/D) / (1 + ratio^(2/D)) for D > 2."""
    k = ratio
    if power == 2:
        odds = k ** (k / (1 + k)) / (1 + k)
    else:
        e = 2.0 / power
        odds = ((1 + k) ** e / (1 + k ** e)) ** (1.0 / (1.0 - e))
    return odds / (1 + odds)


def l1_distance_to_minimizers(X, y, theta, l1_min: float) -> float:
    """min ||theta - x||_1 over the minimum-l1 interpolators {X x = y, ||x||_1 <= l1_min} (an LP,
    HiGHS; the l1 bound loosened by 1e-9 relative for the LP's own tolerance)."""
    from scipy.optimize import linprog

    d = X.shape[1]
    eye, one = np.eye(d), np.ones(d)
    A_ub = np.block([[eye, -eye, -eye], [-eye, eye, -eye],
                     [one[None], one[None], np.zeros((1, d))]])
    b_ub = np.concatenate([theta, -theta, [l1_min * (1 + 1e-9)]])
    A_eq = np.hstack([X, -X, np.zeros_like(X)])
    res = linprog(np.concatenate([np.zeros(2 * d), one]), A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=y,
                  bounds=(0, None), method="highs")
    if res.status != 0:
        raise RuntimeError(f"the l1 distance LP failed: {res.message}")
    return float(res.fun)


#: Relative l1 distances below this are within the tolerance of the distance LP.
LP_FLOOR = 1e-9


def which_l1_minimizer(spec: dict, base_dir: Path, out: Path) -> dict:
    """Figure (d): on a problem whose minimum-l1 interpolator is not unique, the predicted limit
    of theta = u^D - v^D from u = v = alpha against alpha^D, for several D (each point one
    prediction), cross-checked by dopri5 runs at three alphas."""
    import tempfile

    from .parametrization import Parametrization
    from .prediction import min_l1_interpolator, predict_arrays, weighted_l1_interpolator
    from .simulate import simulate

    del base_dir
    ratio = float(spec["tie_ratio"])
    X, y = tied_l1_problem(int(spec["n"]), int(spec["d"]), ratio, int(spec["seed"]))
    d = X.shape[1]
    l1_min = float(np.abs(min_l1_interpolator(X, y)).sum())
    # non-uniqueness: two tie-breaking weightings pick different minimum-l1 interpolators
    ends = []
    for favoured in ([2], [0, 1]):
        weights = np.ones(d)
        weights[favoured] = 1 + 1e-3
        ends.append(weighted_l1_interpolator(X, y, weights))
    norms = [float(np.abs(e).sum()) for e in ends]
    if max(abs(m - l1_min) for m in norms) > 1e-8 * l1_min or np.abs(ends[0] - ends[1]).sum() < 1e-3 * l1_min:
        raise RuntimeError(f"the constructed problem has a unique minimum-l1 interpolator (l1 norms "
                           f"{norms}, minimum {l1_min}): change which_l1.seed or n, d")
    scales = np.asarray(spec["scales"], dtype=np.float64)
    powers = [float(p) for p in spec["powers"]]
    curves = {}
    for D in powers:
        param = Parametrization("power", 1, D)
        u0 = np.ones((len(scales), 2, d)) * (scales ** (1.0 / D))[:, None, None]
        theta = predict_arrays(X, y, u0, parametrization=param).theta
        curves[D] = {"position": (theta[:, 2] / (1 + ratio)).tolist(),
                     "distance": [l1_distance_to_minimizers(X, y, th, l1_min) / l1_min for th in theta],
                     "tie_break": tie_break_position(D, ratio)}
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "tied_l1.npz"
        np.savez(data, X=X, y=y)
        for D in powers:
            for scale in spec["run_scales"]:
                cfg = Config.from_dict({
                    "problem": {"path": str(data)},
                    "model": {"parametrization": "power", "power": D, "alpha": scale ** (1.0 / D),
                              "init": "balanced"},
                    "integrator": {"rtol": 1e-10, "atol": 1e-14, "t_end": 1e6, "loss_tol": 1e-16},
                    "run": {"seeds": 1, "checkpoints": 2}})
                run = simulate(cfg)
                theta_run = run.theta[-1, 0]
                predicted = predict_arrays(X, y, run.u0, parametrization=Parametrization("power", 1, D)).theta[0]
                runs.setdefault(D, []).append({
                    "scale": scale, "position": float(theta_run[2] / (1 + ratio)),
                    "distance": l1_distance_to_minimizers(X, y, theta_run, l1_min) / l1_min,
                    "max_difference_to_prediction": float(np.abs(theta_run - predicted).max()),
                    "t": float(run.t_seed[-1, 0]), "loss": float(run.loss[-1, 0])})
                run.close()
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, D in enumerate(powers):
        c, color = curves[D], colors[i % len(colors)]
        axes[0].loglog(scales, np.maximum(c["distance"], LP_FLOOR), "o-", color=color, label=f"D = {D:g}")
        axes[1].semilogx(scales, c["position"], "o-", color=color, label=f"D = {D:g}")
        axes[1].axhline(c["tie_break"], color=color, ls="--", lw=1)
        r = runs[D]
        axes[0].loglog([x["scale"] for x in r], [max(x["distance"], LP_FLOOR) for x in r], "s", mfc="none", ms=10,
                       color=color, label="dopri5 runs" if i == 0 else None)
        axes[1].semilogx([x["scale"] for x in r], [x["position"] for x in r], "s", mfc="none", ms=10,
                         color=color, label="dopri5 runs" if i == 0 else None)
    # the LP's l1 bound is loosened by 1e-9 relative: closer than that is a distance of 0
    axes[0].axhspan(LP_FLOOR / 10, LP_FLOOR, color="0.85", zorder=0, label="LP tolerance")
    axes[0].set_ylabel("l1 distance to the minimum-l1 set / min l1 norm")
    axes[0].set_title("the limit reaches the set of l1 minimizers")
    axes[1].set_ylabel("t: theta_2 / (1 + r) along the segment of minimizers")
    axes[1].set_title("which l1 minimizer (dashed: small-alpha tie-break)")
    for ax in axes:
        ax.set_xlabel("alpha^D (theta = u^D - v^D from u = v = alpha)")
        ax.invert_xaxis()
    _save(plt, fig, axes, out / "which_l1_minimizer.png",
          f"Non-unique minimum-l1 interpolator: n = {X.shape[0]}, d = {d}, column 2 = "
          f"(x_0 + {ratio:g} x_1) / {1 + ratio:g}; each point one predict")
    return {"scales": scales.tolist(), "l1_min": l1_min, "lp_ends": [e[:3].tolist() for e in ends],
            **{f"D{D:g}": {**curves[D], "runs": runs[D]} for D in powers}}


def step_size(spec: dict, base_dir: Path, out: Path) -> dict:
    """Figure (d); returns the numbers it plots."""
    import warnings

    from .effective import step_size_bias
    from .init import initial_layers
    from .problem import make_problem
    from .simulate import simulate
    from .prediction import min_l1_interpolator, predict_arrays

    base = Config.from_toml(base_dir / spec["config"])
    problem = make_problem(base)
    u0 = initial_layers(base, problem.d)
    flow_l1 = float(np.abs(predict_arrays(problem.X, problem.y, u0[:1]).theta[0]).sum())
    min_l1 = float(np.abs(min_l1_interpolator(problem.X, problem.y)).sum())
    batch = spec["batch_size"]
    methods = {"gradient descent": ({"integrator.method": "euler", "run.seeds": 1}, spec["gd_steps"]),
               f"SGD, batch {batch}": ({"integrator.method": "sgd", "integrator.batch_size": batch},
                                       spec["sgd_steps"])}
    results = {}
    for name, (overrides, steps) in methods.items():
        rows = []
        for dt in steps:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # steps near the stability limit are the point
                run = simulate(base.with_overrides({**overrides, "integrator.dt": dt}))
            converged = np.array(run.status_names()) == "loss_tol"
            l1 = np.abs(run.theta[-1]).sum(axis=-1)
            bias = step_size_bias(run)
            predicted = np.array([b.descent_l1_norm for b in bias])[converged]
            rows.append({"dt": dt, "converged": int(converged.sum()), "seeds": int(converged.size),
                         "l1_norm": float(l1[converged].mean()) if converged.any() else None,
                         # undefined (NaN) for a seed with a step of |step * gradient| >= 1
                         "predicted_l1_norm": float(predicted.mean())
                         if predicted.size and np.all(np.isfinite(predicted)) else None})
        results[name] = rows
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10.5, 4.8))
    for name, rows in results.items():
        done = [r for r in rows if r["l1_norm"] is not None]
        line, = ax.semilogx([r["dt"] for r in done], [r["l1_norm"] for r in done], "o-", label=f"{name}: runs")
        ax.semilogx([r["dt"] for r in done], [np.nan if r["predicted_l1_norm"] is None else r["predicted_l1_norm"]
                                              for r in done], "x", ms=9, color=line.get_color(),
                    label=f"{name}: prediction from the effective initialization (none once |step g| >= 1)")
        partial = [r for r in done if r["converged"] < r["seeds"]]
        if partial:
            ax.semilogx([r["dt"] for r in partial], [r["l1_norm"] for r in partial], "o", mfc="white",
                        color=line.get_color(), label=f"{name}: some seeds diverged (mean of the others)")
        stable = [r["dt"] for r in rows if r["converged"] == r["seeds"]]
        if stable:
            ax.axvline(max(stable), color=line.get_color(), ls=":", lw=1,
                       label=f"{name}: largest step with every seed converged")
    ax.axhline(flow_l1, color="k", ls="--", lw=1, label="gradient flow (predicted)")
    ax.axhline(min_l1, color="0.5", ls="-.", lw=1, label="minimum l1 norm")
    m = base.model
    ticks = spec["gd_steps"]  # (all steps would crowd the axis)
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("step size")
    ax.set_ylabel("||theta_inf||_1 (mean over the converged seeds)")
    ax.set_title(f"Step size and the implicit bias: depth 2, alpha {m.alpha:g}, n = {problem.n}, d = {problem.d}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out / "step_size.png", dpi=120)
    plt.close(fig)
    return {"gradient_flow_l1_norm": flow_l1, "min_l1_norm": min_l1, **results}


def main(argv=None) -> None:
    import json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="data/paper", help="folder with figures.toml")
    parser.add_argument("--out", default="figures", help="output folder for the PNGs")
    parser.add_argument("--only", choices=list(FIGURES), action="append")
    args = parser.parse_args(argv)
    base_dir = Path(args.configs)
    spec = read_toml(base_dir / "figures.toml")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    numbers = {}
    for name, fn in FIGURES.items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        numbers[name] = fn(spec[name], base_dir, out)
        print(f"{out / (name + '.png')}: {time.perf_counter() - start:.1f} s", flush=True)
    (out / "numbers.json").write_text(json.dumps(numbers, indent=1))


FIGURES = {"implicit_bias": implicit_bias, "time_to_epsilon": time_to_epsilon, "pl_bound": pl_bound,
           "which_l1_minimizer": which_l1_minimizer, "step_size": step_size}


if __name__ == "__main__":  # pragma: no cover
    main()
