"""The driver: config -> data and layers -> integrator -> checkpoints streamed to HDF5.

Everything that can be wrong with the input (config, data files, init files, output path) is
checked before the output file is created, so bad input never leaves a half-written file.
"""

from __future__ import annotations

import os
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import DESCENT_METHODS, Config, check_batch_size
from .controller import DIVERGED, LOSS_TOL, MAX_STEPS, RUNNING, T_END
from .diagnostics import CheckpointDiagnostics
from .errors import AlreadyComplete, InputError
from .init import initial_layers, sign_trap_coordinates
from .methods import METHODS, is_adaptive
from .parametrization import Parametrization
from .problem import make_problem
# imported with the package, not inside limit_threads: scipy's own OpenBLAS, loaded by it, then
# gets the thread limit like numpy's (a library loaded inside the limit keeps its default pool)
from .sharpness import STABILITY_BOUNDS, stability_limits
from .solver import Solver
from .provenance import blas_identity, provenance
from .store import Run, RunWriter, extend_run, open_h5
from .threads import limit_threads


class SignTrapWarning(UserWarning):
    """The initialization violates assumption (A): some coordinates cannot change sign."""


class UnderflowWarning(UserWarning):
    """The initial effective parameter underflows the dtype."""


class CheckpointWarning(UserWarning):
    """The checkpoint times differ from what the config asks (fixed-step methods)."""


def checkpoint_times(config: Config) -> np.ndarray:
    """Checkpoint times (flow time), t = 0 first and the end of the run last, strictly increasing.

    ``log`` spacing is geometric from min(dt, t_end / (checkpoints - 1)) up to t_end. Fixed-step
    methods store whole steps only: ``checkpoints`` distinct step indices (geometric in the step
    index for ``log``), or every step when the run has fewer steps than that, and the run ends
    at the last whole step that is not after t_end; both are warned about
    (:class:`CheckpointWarning`).

    Returns
    -------
    ndarray of shape (K,)
        K = ``run.checkpoints``, or fewer for a fixed-step run of fewer steps.
    """
    integ, run = config.integrator, config.run
    t_end, count = integ.t_end, run.checkpoints
    if is_adaptive(integ.method):  # adaptive methods land on any time
        if run.spacing == "linear":
            return np.linspace(0.0, t_end, count)
        if count == 2:  # geomspace of one point would be its start, not t_end
            return np.array([0.0, t_end])
        start = min(integ.dt, t_end / (count - 1))
        return np.concatenate([[0.0], np.geomspace(start, t_end, count - 1)])
    steps = whole_steps(integ.t_end, integ.dt)
    if abs(steps * integ.dt - t_end) > 1e-9 * t_end:
        warnings.warn(f"integrator.t_end = {t_end:g} is not a whole number of steps of integrator.dt "
                      f"= {integ.dt:g}: the run ends after {steps} steps, at t = {steps * integ.dt:.10g}",
                      CheckpointWarning, stacklevel=2)
    if steps < count - 1:
        warnings.warn(f"run.checkpoints = {count} but the run has only {steps} steps of "
                      f"integrator.dt = {integ.dt:g}: storing every step ({steps + 1} checkpoints)",
                      CheckpointWarning, stacklevel=2)
        return np.arange(steps + 1) * integ.dt
    if run.spacing == "linear":
        targets = np.linspace(0.0, steps, count)
    else:
        targets = np.concatenate([[0.0], np.geomspace(1.0, steps, count - 1)])
    return _strictly_increasing_steps(targets, steps) * integ.dt


def whole_steps(t_end: float, dt: float) -> int:
    """The number of fixed steps of size ``dt`` in [0, t_end] (t_end = k dt up to rounding
    counts as k steps)."""
    return int(np.floor(t_end / dt * (1 + 1e-9)))


def _strictly_increasing_steps(targets: np.ndarray, last: int) -> np.ndarray:
    """Distinct step indices near the increasing ``targets`` (0 first, ``last`` last): rounded,
    pushed up where they collide, then down where they pass ``last``. Needs len(targets) - 1
    <= last."""
    steps = np.floor(targets + 0.5).astype(np.int64)
    steps[0], steps[-1] = 0, last
    for k in range(1, len(steps)):
        steps[k] = max(steps[k], steps[k - 1] + 1)
    steps[-1] = last
    for k in range(len(steps) - 2, -1, -1):
        steps[k] = min(steps[k], steps[k + 1] - 1)
    return steps


def check_initialization(config: Config, u0: np.ndarray) -> None:
    """Warn about the sign trap (violated assumption (A); the product parametrization only: the
    difference and power forms change sign through their two halves) and about underflow of
    theta."""
    param = Parametrization.from_config(config)
    if param.name == "product" and config.model.depth > 1:
        trapped = sign_trap_coordinates(u0)
        count = int(trapped.sum())
        if count:
            warnings.warn(
                f"{count} of {trapped.size} coordinates (seeds x d) violate assumption (A) (two or "
                f"more layers share the smallest |u_i(0)|): theta_i cannot change sign there and "
                f"0 is absorbing (the sign trap, docs/theory.md, \"Assumption (A) and the sign "
                f"trap\"); use first_layer_zero or jitter",
                SignTrapWarning, stacklevel=3)
    tiny = np.finfo(np.dtype(config.run.dtype)).tiny
    nonzero = np.abs(u0[u0 != 0])
    if nonzero.size and config.integrator.method != "dual":  # dual: clock maps in log form
        # in log10, so that the number can be printed even below float64's range
        exponent = float(np.log10(nonzero.min())) * param.degree
        if exponent < np.log10(tiny):
            whole = int(np.floor(exponent))
            warnings.warn(
                f"alpha^depth = {10 ** (exponent - whole):.3g}e{whole} (smallest |u0|^depth) is "
                f"below the smallest normal {config.run.dtype} ({tiny:.3g}): theta underflows; "
                f"raise model.alpha or use float64", UnderflowWarning, stacklevel=3)


class IdenticalSeedsWarning(UserWarning):
    """Every seed has the same data and the same initial layers: the seeds are one run repeated."""


def check_seeds_differ(config: Config, problem, u0: np.ndarray) -> None:
    """Warn when the S > 1 seeds are copies of one run (shared data and equal u0), naming the
    keys that make them differ.

    Parameters
    ----------
    problem : Problem
        ``problem.per_seed`` tells whether each seed has its own X, y.
    u0 : ndarray of shape (S, L, d)
    """
    seeds = u0.shape[0]
    integ = config.integrator
    # each seed draws its own batches or label noise: the seeds differ through those
    own_draws = integ.label_noise > 0 or (integ.method == "sgd" and (
        integ.batch_size < problem.n or integ.sampling == "with_replacement"))
    if seeds < 2 or problem.per_seed or own_draws or not np.all(u0 == u0[:1]):
        return
    fixes = ["problem.per_seed_data = true"] if config.problem.kind == "gaussian" else [
        "a data file with X of shape (S, n, d)"]
    fixes += ["model.jitter > 0", 'model.signs = "random"']
    warnings.warn(f"all {seeds} seeds are the same run (the same data and the same initial layers); "
                  f"for seeds that differ set {', '.join(fixes[:-1])} or {fixes[-1]}, or run.seeds = 1",
                  IdenticalSeedsWarning, stacklevel=3)


class StabilityWarning(UserWarning):
    """A fixed step is above the method's linear stability limit at the initialization."""


def check_step_stability(config: Config, problem, u0: np.ndarray) -> None:
    """Warn when a fixed-step method's dt exceeds its stability limit at the initialization,
    bound / lambda_max (gradient descent: 2 / lambda_max, lambda_max the largest eigenvalue of
    the loss Hessian in layer space), and print the limit. Large steps stay allowed (the edge
    of stability is a regime worth simulating)."""
    integ = config.integrator
    method, dt = integ.method, integ.dt
    if is_adaptive(method):
        return
    bound, what = STABILITY_BOUNDS.get(method), method
    if method in DESCENT_METHODS:
        from .stochastic import DescentOptions

        bound = DescentOptions.from_config(config).stability_bound
        if integ.momentum:
            what += f" with {'Nesterov' if integ.nesterov else 'heavy-ball'} momentum {integ.momentum:g}"
    limits = stability_limits(method, problem.X, problem.y, u0, bound=bound, shift=integ.weight_decay,
                              rtol=1e-6, max_iter=100, parametrization=Parametrization.from_config(config))
    above = np.flatnonzero(dt > limits)
    if above.size:
        worst = int(np.argmin(limits))
        hessian = "the loss Hessian" + (" plus weight decay" if integ.weight_decay else "")
        warnings.warn(f"integrator.dt = {dt:g} is above the stability limit of {what} at the "
                      f"initialization, {bound:.4g}/lambda_max = {limits[worst]:.4g} (seed {worst}; "
                      f"lambda_max: largest eigenvalue of {hessian} in the layers), for "
                      f"{above.size} of {limits.size} seeds: expect oscillation or divergence",
                      StabilityWarning, stacklevel=3)


@dataclass
class RunReport:
    """What a finished (or interrupted) call to :func:`simulate` did."""

    run: Run
    wall_seconds: float
    checkpoints_written: int
    interrupted: str | None = None  # the signal's name (SIGINT, SIGTERM) if stopped by one
    resumed_from: int | None = None


class _StopRequests:
    """SIGINT/SIGTERM set a flag; the integrator stops before its next step (a safe point) and
    the driver saves the state there."""

    def __init__(self):
        self.requested = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread (e.g. a Dask task): no handlers
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def pending(self) -> bool:
        """For the integrator's loop: whether to stop before the next step."""
        return self.requested is not None

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _prepare_output(out, overwrite: bool, resume: bool) -> Path | None:
    if out is None:
        return None
    path = Path(out)
    if path.is_dir():
        raise InputError(f"output {path} is a directory, expected a file name like run.h5")
    if path.exists() and not (overwrite or resume):
        raise InputError(f"output {path} exists: continue it with resume=True or replace it with overwrite=True",
                         f"output {path} exists; pass --resume to continue it or --overwrite to replace it")
    if resume and not path.exists():
        raise InputError(f"cannot resume {path}: the file does not exist (start the run without resume)",
                         f"cannot resume {path}: the file does not exist (run without --resume to start it)")
    if not path.parent.exists():
        # Created only once the data and init are known good: bad input leaves nothing behind.
        ancestor = next(p for p in path.parent.parents if p.exists())
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
            raise InputError(f"cannot create the output folder {path.parent}: {ancestor} is not a writable folder")
    elif not path.exists():
        try:
            path.touch()
            path.unlink()
        except OSError as err:
            raise InputError(f"cannot write the output file {path}: {err.strerror}") from None
    return path


def simulate(config: Config | str | Path, out: str | Path | None = None, *, progress: bool | None = False,
             overwrite: bool = False, resume: bool = False, threads: int | None = None) -> Run:
    """Integrate the layer flow of every seed and stream checkpoints to HDF5.

    Parameters
    ----------
    config : Config, or the path of a TOML config file
        The run configuration.
    out : path, optional
        Output .h5 file; ``None`` keeps the run in memory.
    progress : bool or None
        Progress bar (``None``: only on a terminal).
    overwrite, resume : bool
        Replace an existing ``out``, or continue it from its last committed checkpoint.
    threads : int, optional
        Overrides ``run.threads`` (0: all cores) for Numba and BLAS together.

    Returns
    -------
    Run
        A handle on the file, for reading the checkpoints back.
    """
    if isinstance(config, (str, os.PathLike)):
        config = Config.from_toml(config)
    elif not isinstance(config, Config):
        raise InputError(f"config: expected a Config or the path of a TOML file, got {type(config).__name__}")
    return run_simulation(config, out, progress=progress, overwrite=overwrite, resume=resume,
                          threads=threads).run


def run_simulation(config: Config, out=None, *, progress=False, overwrite=False, resume=False,
                   threads=None, on_checkpoint=None) -> RunReport:
    """:func:`simulate`, returning a :class:`RunReport` (used by the CLI).

    SIGINT/SIGTERM handlers are installed from here on (before the file is created), so a stop
    request at any moment after this call ends in a consistent, resumable file."""
    path = _prepare_output(out, overwrite, resume)
    with _StopRequests() as stops:
        return _start_or_resume(config, path, progress, resume, threads, on_checkpoint, stops)


def _start_or_resume(config, path, progress, resume, threads, on_checkpoint, stops) -> RunReport:
    if resume and path is not None and path.exists():
        report = _resume(config, path, progress, threads, on_checkpoint, stops)
        if report is not None:
            return report
        # killed before its first checkpoint was committed: nothing to keep, start again
    problem = make_problem(config)
    check_batch_size(config, problem.n)
    u0 = initial_layers(config, problem.d)
    check_initialization(config, u0)
    check_seeds_differ(config, problem, u0)
    n_threads = config.run.threads if threads is None else threads
    times = checkpoint_times(config)
    with limit_threads(n_threads) as used_threads:
        check_step_stability(config, problem, u0)
        integrator = _make_integrator(config, problem, u0)
        diagnostics = CheckpointDiagnostics(config, problem)
        shapes = integrator.state_shapes()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        # the parametrization travels with the provenance: root attributes written at creation
        attributes = {**provenance(used_threads), **Parametrization.from_config(config).run_attributes(),
                      **integrator.run_attributes()}
        writer = RunWriter.create(path, config, problem, u0, attributes, shapes,
                                  {**integrator.checkpoint_rows(), **diagnostics.rows(u0.shape[0])},
                                  _fixed_shapes(integrator))
        return _drive(config, integrator, diagnostics, writer, times, 0, progress, on_checkpoint,
                      stops)


def _make_integrator(config: Config, problem, u0) -> Solver:
    from .stochastic import DescentOptions

    integ = config.integrator
    descent = DescentOptions.from_config(config) if integ.method in DESCENT_METHODS else None
    options = dict(descent=descent, dt=integ.dt, rtol=integ.rtol, atol=integ.atol,
                   loss_tol=integ.loss_tol, max_steps=integ.max_steps,
                   dtype=np.dtype(config.run.dtype).type,
                   parametrization=Parametrization.from_config(config))
    if integ.method == "dual":  # it records activation events, at a level set from the config
        from .events import activation_levels

        options["activation_level"] = activation_levels(config, problem, u0)
    return METHODS[integ.method].build(problem, u0, **options)


def _fixed_shapes(integrator: Solver) -> dict:
    """Datasets rewritten in place at every checkpoint: the dual method's events."""
    events = getattr(integrator, "events", None)
    return {} if events is None else events.file_shapes(integrator.seeds, integrator.dim)


def _fixed_rows(integrator: Solver) -> dict:
    events = getattr(integrator, "events", None)
    return {} if events is None else events.file_rows()


#: Keys a finished or interrupted run may be resumed with, when they relax the limit (the
#: direction each may move in): the run then continues in the same file.
EXTENSION_KEYS = {"integrator.t_end": "larger", "integrator.max_steps": "larger",
                  "integrator.loss_tol": "smaller"}


def _extension(stored: Config, config: Config, path: Path) -> dict:
    """The limits ``config`` relaxes with respect to the run's ``stored`` config,
    ``{key: [old, new]}``; InputError if anything else differs or a limit is tightened."""
    # threads change only the last bits (warned about on resume), not what is computed
    differing = stored.differing_keys(config, ignore=("run.threads",))
    others = [k for k in differing if k not in EXTENSION_KEYS]
    if others:
        hint = "integrator.t_end, max_steps and loss_tol may be relaxed to extend a run"
        raise InputError(f"cannot resume {path}: the config differs in {', '.join(others)} ({hint}; "
                         f"use the config of the run, or overwrite=True to start a new one)",
                         f"cannot resume {path}: the config differs in {', '.join(others)} ({hint}; "
                         f"use the config of the run, or --overwrite to start a new one)")
    old, new = stored.flat(), config.flat()
    for key in differing:
        larger = new[key] > old[key]
        if larger != (EXTENSION_KEYS[key] == "larger"):
            raise InputError(f"cannot resume {path} with {key} = {new[key]:g}: a resume may only make "
                             f"it {EXTENSION_KEYS[key]} than the run's {old[key]:g}")
    return {key: [old[key], new[key]] for key in differing}


def _revivable(config: Config, state: dict, last_loss: np.ndarray, t_end: float) -> np.ndarray:
    """Seeds stopped by a limit that ``config`` no longer imposes, shape (S,) bool: t_end (before
    the new end ``t_end``), max_steps (fewer steps than the new maximum) or loss_tol (a loss at
    the last checkpoint not below the new tolerance)."""
    status, t = state["status"], state["t"]
    before_end = t < t_end
    return before_end & ((status == T_END)
                         | ((status == MAX_STEPS) & (state["steps"] < config.integrator.max_steps))
                         | ((status == LOSS_TOL) & (last_loss >= config.integrator.loss_tol)))


def _resume(config: Config, path: Path, progress, threads, on_checkpoint, stops) -> RunReport:
    """Continue ``path`` from its last committed checkpoint (bit-identical at equal threads and
    BLAS); ``None`` if the file has no committed checkpoint yet (the caller starts afresh).

    A config that relaxes t_end, max_steps or loss_tol extends the run in the same file: the
    seeds those limits stopped continue, new checkpoints follow the old ones (the new schedule's
    times after the last stored one; one more row at t_end when t_end did not grow), and the root
    attribute ``extensions`` records the change."""
    from .problem import Problem

    schedule = checkpoint_times(config)
    with open_h5(path) as f:
        run = Run(f, str(path))
        changed = _extension(run.config, config, path)
        if run.committed == 0:
            return None
        index, state = run.state()
        stored_times = run.t
        if changed:
            revive = _revivable(config, state, run.loss[-1], schedule[-1])
            if run.complete and not revive.any():
                raise AlreadyComplete(f"{path} is complete and no seed was stopped by a limit that "
                                      f"{', '.join(changed)} relaxes: nothing to extend")
            record = {"at_checkpoint": run.committed, "t": float(run.t[-1]), "changed": changed,
                      "continued_seeds": np.flatnonzero(revive).tolist(),
                      "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        elif run.complete:
            raise AlreadyComplete(f"{path} is already complete: nothing to resume")
        problem = Problem(run.X, run.y, run.theta_star)
        u0 = run.u0
        stored_threads = int(f.attrs.get("threads", -1))
        stored_blas = str(f.attrs.get("blas", ""))
    n_threads = config.run.threads if threads is None else threads
    with limit_threads(n_threads) as used_threads:
        now = provenance(used_threads)
        mismatch = [f"threads {stored_threads} -> {used_threads}"] if stored_threads != used_threads else []
        if blas_identity(stored_blas) != blas_identity(now["blas"]):
            mismatch.append(f"BLAS {blas_identity(stored_blas)} -> {blas_identity(now['blas'])}")
        integrator = _make_integrator(config, problem, u0)
        # before the file is touched (an extension writes to it): refused, it stays as it was
        _check_saved_state(path, config, integrator, state)
        if mismatch:
            warnings.warn(f"resuming {path} with {'; '.join(mismatch)}: the rest of the run will not be "
                          f"bit-identical to an uninterrupted run", ResumeMismatchWarning, stacklevel=2)
        if changed:
            extend_run(path, config, record, revive)
            with open_h5(path) as f:  # the continued seeds' status and the times it recorded
                run = Run(f, str(path))
                index, state = run.state()
                stored_times = run.t
        rest = schedule[schedule > stored_times[-1]]
        if rest.size == 0 and np.any(state["status"] == RUNNING):  # continued seeds, same t_end
            rest = schedule[-1:]
        times = np.concatenate([stored_times, rest])
        integrator.restore_state(state)
        writer = RunWriter.reopen(str(path), config.run.swmr)
        return _drive(config, integrator, CheckpointDiagnostics(config, problem), writer, times,
                      index + 1, progress, on_checkpoint, stops, resumed_from=index)


def _check_saved_state(path, config: Config, integrator: Solver, state: dict) -> None:
    """Refuse a file whose saved solver state is not the one this solver saves (written by a
    version of ddln_fast whose solver keeps other arrays, e.g. the dual method before its
    clocks became double-doubles): it cannot continue bit-identically, nor at all."""
    expected = integrator.state_shapes()
    differ = sorted(name for name in set(expected) | set(state)
                    if name not in expected or name not in state
                    or tuple(np.shape(state[name])) != tuple(expected[name][0]))
    if differ:
        raise InputError(f"{path}: its saved {config.integrator.method} state ({', '.join(differ)}) is not "
                         f"what this version's solver keeps (the file was written by another version "
                         f"of ddln_fast); it cannot be resumed: run it again without --resume")


class OrthantWarning(UserWarning):
    """A seed of the power parametrization has a u or v at or below zero."""


class OrthantWatch:
    """For ``parametrization = "power"`` (u, v > 0): warn once per seed whose layers reach zero
    or below at a checkpoint. The flow itself keeps them positive; a large step (or momentum)
    can carry them across, and an integer D then runs on silently while the theory of the
    parametrization (prediction, bounds) no longer describes the seed."""

    def __init__(self, config: Config):
        self.active = config.model.parametrization == "power"
        self.warned: set[int] = set()

    def check(self, integrator: Solver, row: dict, t: float) -> None:
        """``row``: the checkpoint's row; its layers ``u`` are used when it stores them (the dual
        method would otherwise rebuild them from the clocks a second time)."""
        if not self.active:
            return
        layers = np.asarray(row["u"] if "u" in row else integrator.layers())
        crossed = np.flatnonzero(np.any(layers.reshape(layers.shape[0], -1) <= 0, axis=1)
                                 & (integrator.state.status != DIVERGED))  # already reported
        new = [int(s) for s in crossed if int(s) not in self.warned]
        if new:
            self.warned.update(new)
            warnings.warn(f"seed{'s' if len(new) > 1 else ''} {', '.join(map(str, new))}: u or v is at "
                          f"or below 0 at t = {t:g} (the power parametrization needs u, v > 0; a step "
                          f"this large carried it across): the prediction and the bounds do not apply "
                          f"to {'them' if len(new) > 1 else 'it'}; use a smaller integrator.dt",
                          OrthantWarning, stacklevel=4)


class ResumeMismatchWarning(UserWarning):
    """A run is resumed with another thread count or BLAS than it started with."""


def _checkpoint_row(integrator: Solver, diagnostics: CheckpointDiagnostics, t: float,
                    save_layers: bool) -> dict:
    """The checkpoint's row, one value per dataset of ``/checkpoints``: the solver's
    checkpoint values (it marks a running seed whose loss is not finite as diverged first, or
    one that reached loss_tol as converged: ``t_seed`` and ``status`` are read after it), the
    time, each seed's time, evaluations and status, and the diagnostics. (The writer copies
    every value: the solver's own arrays may be passed.)"""
    values = integrator.checkpoint_values(save_layers)
    st = integrator.state
    row = {"t": t, "t_seed": st.t_seed(), "nfev": st.nfev, "status": st.status, **values}
    row.update(diagnostics.values(integrator))
    return row


#: A seed's overflow is detected and reported in its status (diverged, stalled), so numpy's
#: floating-point warnings on the way there would only repeat it, without naming the seed.
_NON_FINITE_IS_A_STATUS = dict(over="ignore", invalid="ignore", divide="ignore")


def _drive(config, integrator: Solver, diagnostics: CheckpointDiagnostics, writer: RunWriter,
           times, first_index, progress, on_checkpoint, stops, resumed_from=None) -> RunReport:
    """Advance checkpoint by checkpoint, appending each one (rows, state, then the counter).

    The writer writes a checkpoint in its own thread while the next interval is computed. A
    stop request (SIGINT/SIGTERM), or a failed write, is honoured at a step boundary, not only
    at the next checkpoint: the integrator checks it between steps (see Solver.stop_check). The
    state where a stop request stopped it is saved (a long interval between checkpoints would
    otherwise outlast a scheduler's grace time). ``on_checkpoint(k, t, integrator)`` is called
    once checkpoint k is committed to the file.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    save_layers = config.run.save_layers
    bar = tqdm(total=len(times), initial=first_index, disable=None if progress is None else not progress,
               unit="ckpt", desc="ddln run", leave=False, dynamic_ncols=True)
    written = 0
    interrupted = None
    orthant = OrthantWatch(config)
    try:
        integrator.stop_check = lambda: stops.pending() or writer.failed
        for k in range(first_index, len(times)):
            if k > 0:
                if not np.any(integrator.running):  # every seed stopped: no more rows
                    break
                with np.errstate(**_NON_FINITE_IS_A_STATUS):
                    reached = integrator.advance_to(times[k])
                if not reached:  # a stop request or a failed write, between two steps
                    writer.save_state(integrator.state_arrays())  # (raises the write error)
                    interrupted = stops.requested
                    break
            if k == len(times) - 1:
                integrator.finish()
            with np.errstate(**_NON_FINITE_IS_A_STATUS):
                row = _checkpoint_row(integrator, diagnostics, times[k], save_layers)
            writer.append(row, integrator.state_arrays(), _fixed_rows(integrator))
            orthant.check(integrator, row, times[k])
            written += 1
            bar.update(1)
            if on_checkpoint is not None:
                writer.wait()
                on_checkpoint(k, times[k], integrator)
            if stops.requested and k < len(times) - 1 and np.any(integrator.running):
                interrupted = stops.requested
                break
        integrator.stop_check = None
        writer.wait()
        wall = time.perf_counter() - start
        if interrupted:
            writer.close()
            run = Run(writer.file, None) if writer.path is None else Run(open_h5(writer.path), writer.path)
            return RunReport(run, wall, written, interrupted=interrupted, resumed_from=resumed_from)
        writer.finish({"wall_seconds": wall})
    except BaseException:
        integrator.stop_check = None
        writer.close()
        raise
    finally:
        bar.close()
    run = Run(writer.file, None) if writer.path is None else Run(open_h5(writer.path), writer.path)
    return RunReport(run, wall, written, resumed_from=resumed_from)
