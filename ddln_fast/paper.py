"""The paper's figures, regenerated from data/paper/ (``make paper``; a few minutes on 2 cores).

    python -m ddln_fast.paper [--configs data/paper] [--out figures]

(a) implicit_bias.png: l1 norm of the predicted limit and its distance to the minimum-l1
    interpolator against alpha, depths 2-5 (``predict``, no training);
(b) time_to_epsilon.png: flow time to a relative loss of 1e-6 against alpha, depths 2-5 (dopri5
    runs, analyzed);
(c) pl_bound.png: loss decay of a run against the PL bounds and D_Q(theta*, theta0) / t.
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


def implicit_bias(spec: dict, base_dir: Path, out: Path) -> dict:
    """Figure (a); returns the numbers it plots."""
    from .init import initial_layers
    from .problem import make_problem
    from .theory import min_l1_interpolator, predict_arrays

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
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"Implicit bias (predicted, no training): n = {problem.n}, d = {problem.d}, "
                 f"{base.problem.sparsity}-sparse, first layer zero")
    fig.tight_layout()
    fig.savefig(out / "implicit_bias.png", dpi=120)
    plt.close(fig)
    return {"alphas": alphas, "l1_norm_min_l1": float(np.abs(l1_ref).sum()),
            **{f"depth{d}": {"l1_norm": r[0], "relative_distance_to_min_l1": r[1]} for d, r in results.items()}}


def time_to_epsilon(spec: dict, base_dir: Path, out: Path) -> dict:
    """Figure (b)."""
    from .epsilon import time_to_epsilon
    from .simulate import simulate
    from .theory import constraints
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


def main(argv=None) -> None:
    import json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="data/paper", help="folder with figures.toml")
    parser.add_argument("--out", default="figures", help="output folder for the PNGs")
    parser.add_argument("--only", choices=["implicit_bias", "time_to_epsilon", "pl_bound"], action="append")
    args = parser.parse_args(argv)
    base_dir = Path(args.configs)
    spec = read_toml(base_dir / "figures.toml")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    numbers = {}
    for name, fn in (("implicit_bias", implicit_bias), ("time_to_epsilon", time_to_epsilon),
                     ("pl_bound", pl_bound)):
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        numbers[name] = fn(spec[name], base_dir, out)
        print(f"{out / (name + '.png')}: {time.perf_counter() - start:.1f} s", flush=True)
    (out / "numbers.json").write_text(json.dumps(numbers, indent=1))


if __name__ == "__main__":  # pragma: no cover
    main()
