"""The numbers the commands print, computed from a run or a prediction (the command line only
formats them): per-seed rows of ``ddln run``, status counts, and the rows of ``ddln predict``."""

from __future__ import annotations

import numpy as np

from .controller import STATUS_NAMES

#: Statuses of a seed that did not finish normally.
FAILED_STATUSES = ("diverged", "stalled")
#: A coordinate is in the support of theta when |theta_i| > SUPPORT_THRESHOLD * max_i |theta_i|.
SUPPORT_THRESHOLD = 1e-6


def status_counts(codes: np.ndarray) -> dict[str, int]:
    """Status name -> number of seeds, in the order of the status codes, for codes (S,)."""
    codes = np.asarray(codes)
    return {STATUS_NAMES[int(v)]: int(np.sum(codes == v)) for v in np.unique(codes)}


def any_seed_finished(run) -> bool:
    """Whether some seed of a run ended by t_end, loss_tol or max_steps (not diverged or
    stalled), at its last committed checkpoint."""
    return any(STATUS_NAMES[int(v)] not in FAILED_STATUSES for v in run.status[-1])


def seed_rows(run) -> list[dict]:
    """Per seed, at the last committed checkpoint: ``seed``, ``status`` (name), ``t`` (its
    time), ``loss``, ``nfev``, ``max_drift`` (largest invariant drift over the checkpoints) and
    ``distance_to_theta_star`` (|theta - theta*| / |theta*|; None without a planted vector;
    inf for a diverged seed)."""
    loss, t_seed, nfev, status = run.loss[-1], run.t_seed[-1], run.nfev[-1], run.status[-1]
    drift, star, theta = run.max_invariant_drift(), run.theta_star, run.theta[-1]
    rows = []
    for s in range(loss.shape[0]):
        row = {"seed": s, "status": STATUS_NAMES[int(status[s])], "t": float(t_seed[s]),
               "loss": float(loss[s]), "nfev": int(nfev[s]), "max_drift": float(drift[s]),
               "distance_to_theta_star": None}
        if star is not None:
            ref = star[s] if star.ndim == 2 else star
            with np.errstate(over="ignore", invalid="ignore"):  # a diverged seed: inf, said so
                row["distance_to_theta_star"] = float(np.linalg.norm(theta[s] - ref)
                                                      / max(np.linalg.norm(ref), 1e-300))
        rows.append(row)
    return rows


def loss_quantiles(loss: np.ndarray) -> list[float]:
    """min, median and max of the finite losses (NaN if none is finite)."""
    if not np.any(np.isfinite(loss)):
        return [float("nan")] * 3
    return [float(q) for q in np.nanquantile(loss, [0.0, 0.5, 1.0])]


def prediction_rows(prediction) -> list[dict]:
    """Per seed of a prediction (:func:`ddln_fast.theory.predict` with interpolators): the l1
    norm and support of the predicted limit, its distances to the minimum-l1 and minimum-l2
    interpolators, the minimum l1 norm, the dual residual and the Newton iterations."""
    rows = []
    for s in range(prediction.theta.shape[0]):
        theta = prediction.theta[s]
        scale = max(float(np.max(np.abs(theta))), 1e-300)
        rows.append({
            "seed": s, "l1_norm": float(np.abs(theta).sum()),
            "support": int(np.sum(np.abs(theta) > SUPPORT_THRESHOLD * scale)),
            "distance_to_min_l1": float(np.linalg.norm(theta - prediction.min_l1[s])),
            "distance_to_min_l2": float(np.linalg.norm(theta - prediction.min_l2[s])),
            "min_l1_norm": float(np.abs(prediction.min_l1[s]).sum()),
            "dual_residual": float(prediction.residual[s]),
            "newton_iterations": int(prediction.iterations[s]),
        })
    return rows


def descent_summary(integ) -> str:
    """What makes a gradient-descent run more than plain gradient descent, for the header line."""
    parts = [f"batch {integ.batch_size}" + (", with replacement" if integ.sampling == "with_replacement" else "")
             ] if integ.method == "sgd" else []
    if integ.momentum:
        parts.append(f"{'Nesterov' if integ.nesterov else 'heavy-ball'} momentum {integ.momentum:g}")
    if integ.label_noise:
        parts.append(f"label noise {integ.label_noise:g}")
    if integ.weight_decay:
        parts.append(f"weight decay {integ.weight_decay:g}")
    if integ.schedule == "step":
        parts.append(f"step x {integ.decay_factor:g} every {integ.decay_every} steps")
    return "".join(f", {part}" for part in parts)


def analyze_report(run_path):
    """What ``ddln analyze`` shows, read from one opening of the run file (so that every part of
    a live file's report is read at the same committed checkpoint): the per-seed analysis, the
    dual method's events (None for other runs), and :func:`step_size_bias_report`'s section and
    notes."""
    from .analysis import analyze_run
    from .events import read_events
    from .store import open_run
    from .store.safety import check_not_truncated
    from .threads import serial_blas

    check_not_truncated(run_path)
    with open_run(run_path) as run, serial_blas():
        result = analyze_run(run)
        bias, notes = step_size_bias_report(run)
        return result, read_events(run), bias, notes


def step_size_bias_report(run):
    """The effective-initialization section of ``ddln analyze`` for an open run (depth-2
    gradient descent or sgd with ``run.gain = true``, else None) and notes on what the theory
    means for a descent run."""
    from .analysis import follows_gradient_flow
    from .config import DESCENT_METHODS
    from .effective import step_size_bias

    config = run.config
    bias = step_size_bias(run)
    i, notes = config.integrator, []
    if not follows_gradient_flow(config):
        notes.append(f"{i.method}{descent_summary(i)}: the gap and the kkt residual are about gradient "
                     f"flow, which these steps follow only approximately; the bounds (theorems about "
                     f"the flow) are not checked (n/a)")
    if (bias is None and config.model.depth == 2 and config.model.parametrization == "product"
            and i.method in DESCENT_METHODS and not (i.momentum or i.weight_decay)):
        notes.append("run.gain = true would add each seed's prediction from its effective initialization "
                     "(the implicit bias of the steps)")
    return bias, notes
