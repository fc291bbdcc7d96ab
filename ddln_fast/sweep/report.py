"""The report of a sweep: a metric pivoted against two swept keys, printed and plotted."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def report_table(rows: list[dict], metric: str, x: str, by: str | None) -> tuple[list, list, np.ndarray]:
    """Pivot one metric: (x values, by values, array (len(x), len(by)) of medians over the
    tasks at each (x, by); NaN where no complete task).

    Tasks that differ only in keys other than ``x`` and ``by`` (e.g. zipped seeds) are pooled.
    """
    done = [r for r in rows if r.get("status") == "complete"]
    xs = sorted({r[x] for r in rows}, key=_sort_key)
    bys = sorted({r[by] for r in rows}, key=_sort_key) if by else [None]
    table = np.full((len(xs), len(bys)), np.nan)
    for i, xv in enumerate(xs):
        for j, bv in enumerate(bys):
            vals = [float(r[metric]) for r in done if r[x] == xv and (by is None or r[by] == bv)
                    and isinstance(r.get(metric), (int, float))]
            vals = [v for v in vals if not math.isnan(v)]
            if vals:
                table[i, j] = float(np.median(vals))
    return xs, bys, table


def _sort_key(value):
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


#: The swept key whose report marks the largest value at which every seed converged.
STEP_SIZE_KEY = "integrator.dt"


def largest_converged_step(rows: list[dict], x: str, by: str | None) -> dict:
    """For each value of ``by`` (the key None without one): the largest ``x`` (a step size) at
    which every task is complete and every seed of every task reached integrator.loss_tol
    (status loss_tol only; tasks that differ in other keys are pooled), or None when no x
    qualifies. A step above it may still have converged for some seeds: it is not marked."""
    def converged(row):
        counts = [part.split("x", 1) for part in str(row.get("seed_status", "")).split()]
        return row.get("status") == "complete" and bool(counts) and all(name == "loss_tol" for _, name in counts)

    out = {}
    for bv in sorted({r[by] for r in rows}, key=_sort_key) if by else [None]:
        group = [r for r in rows if by is None or r[by] == bv]
        good = [xv for xv in {r[x] for r in group}
                if isinstance(xv, (int, float)) and all(converged(r) for r in group if r[x] == xv)]
        out[bv] = max(good) if good else None
    return out


def plot_report(xs, bys, table, metric: str, x: str, by: str | None, out: Path,
                converged: dict | None = None) -> Path:
    """metric against x, one line per value of ``by`` (log axes when the values span decades);
    ``converged`` (by value -> x, see :func:`largest_converged_step`): a dashed vertical line at
    the largest step of each line at which every seed converged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    numeric_x = all(isinstance(v, (int, float)) for v in xs)
    xpos = np.asarray(xs, dtype=float) if numeric_x else np.arange(len(xs))
    for j, bv in enumerate(bys):
        line, = ax.plot(xpos, table[:, j], marker="o", label=f"{by} = {bv}" if by else None)
        if converged and converged.get(bv) is not None and numeric_x:
            ax.axvline(converged[bv], color=line.get_color(), ls="--", lw=1,
                       label=f"largest {x} with every seed at loss_tol" + (f" ({by} = {bv})" if by else ""))
    finite = table[np.isfinite(table)]
    if finite.size and np.all(finite > 0) and finite.max() / finite.min() >= 10:  # a decade or more
        ax.set_yscale("log")
    if numeric_x and np.all(xpos > 0) and xpos.max() / xpos.min() >= 10:
        ax.set_xscale("log")
    if numeric_x and len(xs) <= 12:  # the swept values themselves, not log-axis minor labels
        ax.set_xticks(xpos, [f"{v:g}" for v in xs])
        ax.minorticks_off()
    if not numeric_x:
        ax.set_xticks(xpos, [str(v) for v in xs])
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} against {x}" + (f", one line per {by}" if by else "") + " (median over tasks)")
    if by or converged:  # outside the axes: the legend never hides a curve
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
