"""The summary metrics of one run of a sweep (one row of the summary table)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..controller import STATUS_NAMES

#: The metric columns of the summary, after the task id and the swept keys. Medians over the
#: seeds of a task, except final_loss_max and t_final (maxima) and nfev (a sum).
METRICS = ("final_loss_max", "final_loss_median", "t_final", "time_to_eps", "nfev", "l1_norm",
           "predicted_l1_norm", "gap_to_prediction", "fitted_rate", "seconds")
#: Metrics taken from ``ddln analyze`` (:mod:`ddln_fast.analysis`): column -> SeedAnalysis field.
ANALYSIS_METRICS = {"time_to_eps": "time_to_epsilon", "gap_to_prediction": "gap_to_prediction",
                    "fitted_rate": "fitted_rate", "predicted_l1_norm": "predicted_l1_norm"}


def analysis_metrics(run) -> dict:
    """The metrics of :data:`ANALYSIS_METRICS` (medians over seeds, NaN where a seed has none)
    and ``note``: what the analysis could not do (e.g. assumption (A) fails), or why it failed
    (then every one of them is NaN; the other metrics still count)."""
    from ..analysis import analyze_run
    from ..threads import serial_blas

    try:
        with serial_blas():
            seeds = analyze_run(run).seeds
    except Exception as err:  # noqa: BLE001 - a run the theory cannot speak about
        return {**{name: math.nan for name in ANALYSIS_METRICS}, "note": f"analysis: {' '.join(str(err).split())}"}
    notes = sorted({seed.note for seed in seeds} - {""})
    out = {"note": "; ".join(f"analysis: {note}" for note in notes)}
    for column, name in ANALYSIS_METRICS.items():
        out[column] = median(np.array([getattr(seed, name) for seed in seeds], dtype=float))
    return out


def median(values: np.ndarray) -> float:
    """The median of the values that are not NaN (NaN if none is)."""
    finite = values[~np.isnan(values)]
    return float(np.median(finite)) if finite.size else math.nan


def summarize_run(path: str | Path, seconds: float | None = None) -> dict:
    """The summary row of one complete run file: ``status`` (complete), the :data:`METRICS`,
    ``seed_status`` (e.g. ``3xt_end 1xdiverged``) and ``message``.

    A row the sweep stored in the file (the attribute ``sweep_summary``) is returned as it is.
    ``seconds``: the task's time (default: the attribute ``sweep_seconds``, else the run's
    ``wall_seconds``).
    """
    from ..store import open_run

    with open_run(path) as run:
        cached = run.file.attrs.get("sweep_summary")
        if cached is not None:  # written by the task, before the rename
            row = json.loads(cached)
            row.pop("analysis", None)  # a flag that earlier versions stored with the row
            return row
        attrs = run.file.attrs
        if seconds is None:
            seconds = float(attrs.get("sweep_seconds", attrs.get("wall_seconds", math.nan)))
        loss, t_seed, nfev, status = run.loss, run.t_seed, run.nfev, run.status
        theta = run.checkpoint("theta")[-1]
        theory = analysis_metrics(run)
    final = loss[-1]
    counts: dict[str, int] = {}
    for v in status[-1]:
        counts[STATUS_NAMES[int(v)]] = counts.get(STATUS_NAMES[int(v)], 0) + 1
    return {
        "status": "complete",
        "final_loss_max": float(np.max(final)),
        "final_loss_median": float(np.median(final)),
        "t_final": float(np.max(t_seed[-1])),
        "time_to_eps": theory["time_to_eps"],
        "nfev": int(np.sum(nfev[-1])),
        "l1_norm": float(np.median(np.abs(theta).sum(axis=-1))),
        "predicted_l1_norm": theory["predicted_l1_norm"],
        "gap_to_prediction": theory["gap_to_prediction"],
        "fitted_rate": theory["fitted_rate"],
        "seconds": float(seconds),
        "seed_status": " ".join(f"{c}x{name}" for name, c in counts.items()),
        "message": theory["note"],
    }
