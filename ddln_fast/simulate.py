"""The driver: config -> data and layers -> integrator -> checkpoints streamed to HDF5.

Everything that can be wrong with the input (config, data files, init files, output path) is
checked before the output file is created, so bad input never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import Config
from .errors import AlreadyComplete, InputError
from .init import initial_layers, sign_trap_coordinates
from .methods import METHODS, is_adaptive
from .problem import make_problem
from .solver import Solver
from .store import Run, RunWriter, open_h5, provenance
from .threads import limit_threads


class SignTrapWarning(UserWarning):
    """The initialization violates assumption (A): some coordinates cannot change sign."""


class UnderflowWarning(UserWarning):
    """The initial effective parameter underflows the dtype."""


def checkpoint_times(config: Config) -> np.ndarray:
    """Checkpoint times, t = 0 first and t_end last; for fixed-step methods, whole steps.

    ``log`` spacing starts at min(dt, t_end) and is geometric up to t_end.
    """
    integ, run = config.integrator, config.run
    t_end, count = integ.t_end, run.checkpoints
    if run.spacing == "linear":
        times = np.linspace(0.0, t_end, count)
    else:
        times = np.concatenate([[0.0], np.geomspace(min(integ.dt, t_end), t_end, count - 1)])
    if not is_adaptive(integ.method):  # adaptive methods land on any time
        steps = np.unique(np.round(times / integ.dt).astype(np.int64))
        times = steps * integ.dt
    return times


def check_initialization(config: Config, u0: np.ndarray) -> None:
    """Warn about the sign trap (violated assumption (A)) and about underflow of theta."""
    if config.model.depth > 1:
        trapped = sign_trap_coordinates(u0)
        count = int(trapped.sum())
        if count:
            warnings.warn(
                f"{count} of {trapped.size} coordinates (seeds x d) violate assumption (A) (two or "
                f"more layers share the smallest |u_i(0)|): theta_i cannot change sign there and "
                f"0 is absorbing (the sign trap of THEORY.md); use first_layer_zero or jitter",
                SignTrapWarning, stacklevel=3)
    tiny = np.finfo(np.dtype(config.run.dtype)).tiny
    nonzero = np.abs(u0[u0 != 0])
    if nonzero.size:
        # in log10, so that the number can be printed even below float64's range
        exponent = float(np.log10(nonzero.min())) * config.model.depth
        if exponent < np.log10(tiny):
            whole = int(np.floor(exponent))
            warnings.warn(
                f"alpha^depth = {10 ** (exponent - whole):.3g}e{whole} (smallest |u0|^depth) is "
                f"below the smallest normal {config.run.dtype} ({tiny:.3g}): theta underflows; "
                f"raise model.alpha or use float64", UnderflowWarning, stacklevel=3)


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
        raise InputError(f"output {path} exists; pass --resume to continue it or --overwrite to replace it")
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


def simulate(config: Config, out: str | Path | None = None, *, progress: bool | None = False,
             overwrite: bool = False, resume: bool = False, threads: int | None = None) -> Run:
    """Integrate the layer flow of every seed and stream checkpoints to HDF5.

    Parameters
    ----------
    config : Config
        The resolved run configuration.
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
    u0 = initial_layers(config, problem.d)
    check_initialization(config, u0)
    n_threads = config.run.threads if threads is None else threads
    times = checkpoint_times(config)
    with limit_threads(n_threads) as used_threads:
        integrator = _make_integrator(config, problem, u0)
        shapes = integrator.state_shapes()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        writer = RunWriter.create(path, config, problem, u0, provenance(used_threads), shapes)
        return _drive(config, integrator, writer, times, 0, progress, on_checkpoint, stops)


def _make_integrator(config: Config, problem, u0) -> Solver:
    integ = config.integrator
    return METHODS[integ.method].build(problem, u0, dt=integ.dt, rtol=integ.rtol, atol=integ.atol,
                                       loss_tol=integ.loss_tol, max_steps=integ.max_steps,
                                       dtype=np.dtype(config.run.dtype).type)


def _resume(config: Config, path: Path, progress, threads, on_checkpoint, stops) -> RunReport:
    """Continue ``path`` from its last committed checkpoint (bit-identical at equal threads and
    BLAS); ``None`` if the file has no committed checkpoint yet (the caller starts afresh)."""
    from .problem import Problem

    with open_h5(path) as f:
        run = Run(f, str(path))
        stored = run.config
        # threads change only the last bits (warned about below), not what is computed
        differing = stored.differing_keys(config, ignore=("run.threads",))
        if differing:
            raise InputError(f"cannot resume {path}: the config differs in {', '.join(differing)} "
                             f"(use the config of the run, or --overwrite to start a new one)")
        if run.complete:
            raise AlreadyComplete(str(path))
        if run.committed == 0:
            return None
        index, state = run.state()
        problem = Problem(run.X, run.y, run.theta_star)
        u0 = run.u0
        stored_threads = int(f.attrs.get("threads", -1))
        stored_blas = str(f.attrs.get("blas", ""))
    n_threads = config.run.threads if threads is None else threads
    times = checkpoint_times(config)
    with limit_threads(n_threads) as used_threads:
        now = provenance(used_threads)
        mismatch = [f"threads {stored_threads} -> {used_threads}"] if stored_threads != used_threads else []
        if _blas_identity(stored_blas) != _blas_identity(now["blas"]):
            mismatch.append(f"BLAS {_blas_identity(stored_blas)} -> {_blas_identity(now['blas'])}")
        if mismatch:
            warnings.warn(f"resuming {path} with {'; '.join(mismatch)}: the rest of the run will not be "
                          f"bit-identical to an uninterrupted run", ResumeMismatchWarning, stacklevel=2)
        integrator = _make_integrator(config, problem, u0)
        integrator.restore_state(state)
        writer = RunWriter.reopen(str(path), config.run.swmr)
        return _drive(config, integrator, writer, times, index + 1, progress, on_checkpoint, stops,
                      resumed_from=index)


class ResumeMismatchWarning(UserWarning):
    """A run is resumed with another thread count or BLAS than it started with."""


def _blas_identity(blas_json: str) -> str:
    """What of the BLAS decides its rounding: library, version and kernel architecture."""
    try:
        infos = json.loads(blas_json) if blas_json else []
    except ValueError:
        return "unknown"
    return ", ".join(f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')}"
                     for i in infos) or "none"


def _checkpoint_row(integrator: Solver, t: float, save_layers: bool) -> dict:
    """The checkpoint's rows (the solver marks a running seed whose loss is not finite here as
    diverged first: ``t_seed`` and ``status`` are read after it)."""
    values = integrator.checkpoint_values(save_layers)
    st = integrator.state
    row = {"t": t, "t_seed": st.t_seed(), "loss": values["loss"], "theta": values["theta"],
           "invariant_drift": values["invariant_drift"], "nfev": st.nfev.copy(),
           "status": st.status.copy()}
    if save_layers:
        row["u"] = values["u"]
    return row


#: A seed's overflow is detected and reported in its status (diverged, stalled), so numpy's
#: floating-point warnings on the way there would only repeat it, without naming the seed.
_NON_FINITE_IS_A_STATUS = dict(over="ignore", invalid="ignore", divide="ignore")


def _drive(config, integrator: Solver, writer: RunWriter, times, first_index, progress,
           on_checkpoint, stops, resumed_from=None) -> RunReport:
    """Advance checkpoint by checkpoint, appending each one (rows, state, then the counter).

    A stop request (SIGINT/SIGTERM) is honoured at a step boundary, not only at the next
    checkpoint: the integrator checks it between steps (see Solver.stop_check), and the state
    where it stopped is
    saved (a long interval between checkpoints would otherwise outlast a scheduler's grace time).
    """
    from tqdm import tqdm

    start = time.perf_counter()
    save_layers = config.run.save_layers
    bar = tqdm(total=len(times), initial=first_index, disable=None if progress is None else not progress,
               unit="ckpt", desc="ddln run", leave=False, dynamic_ncols=True)
    written = 0
    interrupted = None
    try:
        integrator.stop_check = stops.pending
        for k in range(first_index, len(times)):
            if k > 0:
                if not np.any(integrator.running):  # every seed stopped: no more rows
                    break
                with np.errstate(**_NON_FINITE_IS_A_STATUS):
                    reached = integrator.advance_to(times[k])
                if not reached:  # a stop request, between two steps
                    writer.save_state(integrator.state_arrays())
                    interrupted = stops.requested
                    break
            if k == len(times) - 1:
                integrator.finish()
            with np.errstate(**_NON_FINITE_IS_A_STATUS):
                row = _checkpoint_row(integrator, times[k], save_layers)
            writer.append(row, integrator.state_arrays())
            written += 1
            bar.update(1)
            if on_checkpoint is not None:
                on_checkpoint(k, times[k], integrator)
            if stops.requested and k < len(times) - 1 and np.any(integrator.running):
                interrupted = stops.requested
                break
        integrator.stop_check = None
        wall = time.perf_counter() - start
        if interrupted:
            if writer.path is None:
                run = Run(writer.file, None)
            else:
                writer.close()
                run = Run(open_h5(writer.path), writer.path)
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
