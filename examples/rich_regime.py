"""The rich regime in pictures: saddle-to-saddle plateaus of theta_i(t) and the activation times,
with the dual method (a few seconds).

    python examples/rich_regime.py [OUT.png]

Depth 2 and depth 3, first layer zero at a small scale, n = 40, d = 200, one seed: the loss
stays on a plateau while one coordinate after the other leaves zero (the activation times, found
on the dual method's dense output, are the dotted lines), then drops to the next plateau. The
time axis ends shortly after the last activation; the runs go on to loss 1e-12.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ddln_fast import Config, simulate
from ddln_fast.events import read_events


def run(depth: int, alpha: float, **changes):
    tables = {
        "problem": {"n": 40, "d": 200, "sparsity": 5, "seed": 0},
        "model": {"depth": depth, "alpha": alpha, "init": "first_layer_zero"},
        "integrator": {"method": "dual", "t_end": 1e12, "loss_tol": 1e-12, "rtol": 1e-9},
        "run": {"seeds": 1, "checkpoints": 600, "spacing": "log"},
    }
    for key, value in changes.items():
        section, name = key.split(".")
        tables[section][name] = value
    run = simulate(Config.from_dict(tables))
    return run, read_events(run)


def zoomed_run(depth: int, alpha: float):
    """The run to loss 1e-12 (its events), then again with linear checkpoints up to 1.4 times
    the last activation, for the picture."""
    _, events = run(depth, alpha)
    last = np.nanmax(events.activation_time[0])
    return run(depth, alpha, **{"integrator.t_end": 1.4 * last, "integrator.loss_tol": 0.0,
                                "run.spacing": "linear", "run.checkpoints": 800})[0], events


def main(out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [(2, 1e-12), (3, 1e-3)]
    fig, axes = plt.subplots(2, len(cases), figsize=(11, 6.4), sharex="col",
                             gridspec_kw={"height_ratios": [2, 1]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for col, (depth, alpha) in enumerate(cases):
        result, events = zoomed_run(depth, alpha)
        t, theta, loss = result.t, result.theta[:, 0], result.loss[:, 0]
        keep = t > 0
        times = events.activation_time[0]
        order = np.argsort(times)
        order = order[np.isfinite(times[order])]
        top, bottom = axes[0, col], axes[1, col]
        for k, i in enumerate(order):
            color = colors[k % len(colors)]
            top.plot(t[keep], theta[keep, i], color=color, lw=1.6, label=f"theta_{i}")
            top.axvline(times[i], color=color, ls=":", lw=1)
            bottom.axvline(times[i], color=color, ls=":", lw=1)
        top.axhline(events.level[0], color="0.5", lw=0.6)
        top.axhline(-events.level[0], color="0.5", lw=0.6)
        top.set_title(f"depth {depth}, alpha = {alpha:g}: {order.size} activations")
        top.set_ylabel("theta_i(t)")
        top.legend(fontsize=7, ncol=2)
        bottom.semilogy(t[keep], loss[keep], color="k", lw=1.6)
        bottom.set_xlim(0, t[-1])
        bottom.set_xlabel("flow time t")
        bottom.set_ylabel("loss")
    fig.suptitle("Saddle to saddle: plateaus of the loss, one coordinate activating after another "
                 "(dotted: activation times, |theta_i| = level)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).with_suffix(".png")))
