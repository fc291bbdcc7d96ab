"""Sweeps: many runs from one sweep file, executed as independent tasks on Dask distributed.

A sweep file (INTERFACE.md, "Sweep file") is a base run config, fixed overrides ``[set]``, a
cartesian ``[grid]`` and lists varied together ``[zip]``. Every task is one fully resolved
:class:`~ddln_fast.config.Config`; its id is a hash of the resolved config, so the same task has
the same id (and file name, and Dask key) in every rerun, on every machine.

Output directory::

    OUTDIR/sweep.toml          copy of the sweep file
    OUTDIR/runs/TASK.h5        a complete run (renamed from TASK.h5.part when it finished)
    OUTDIR/runs/TASK.h5.part   a run being written, or left by a killed worker (resumed on rerun)
    OUTDIR/sweep.log           one line per task event (start, resume, done, failed), all workers
    OUTDIR/summary.csv, .h5    one row per task

Why one file per task and a rename: a run file is either complete (``TASK.h5``) or not there, so
"what is done" is a directory listing; a task that is run twice (a lost worker's task retried
elsewhere) finds its own ``.part`` or final file and resumes, overwrites or returns it, so writes
are idempotent.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import itertools
import json
import logging
import math
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .config import ADDED_KEYS, SECTIONS, Config, _suggest, read_toml
from .errors import InputError

SWEEP_KEYS = ("base", "set", "grid", "zip")
#: The metric columns of the summary, after the task id and the swept keys.
METRICS = ("final_loss_max", "final_loss_median", "t_final", "time_to_eps", "nfev", "l1_norm",
           "predicted_l1_norm", "gap_to_prediction", "fitted_rate", "seconds")
#: Relative loss (to the loss at t = 0) that defines "time to epsilon" when integrator.loss_tol = 0.
RELATIVE_EPS = 1e-6
#: Retries of a task that raised something other than bad input (e.g. a full disk, a flaky mount).
TASK_RETRIES = 2


# -- the sweep file ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """One run of a sweep: its id, the swept values that define it and the resolved config."""

    id: str
    point: dict
    config: Config


@dataclass(frozen=True)
class Sweep:
    """A parsed and validated sweep file: every task's config is already built."""

    path: Path
    text: str
    fixed: dict
    grid: dict
    zipped: dict
    tasks: list = field(default_factory=list)

    @property
    def swept_keys(self) -> list[str]:
        return list(self.grid) + list(self.zipped)


def task_id(config: Config) -> str:
    """A stable id from the resolved config: the first 16 hex digits of SHA-256 of its TOML.

    ``run.threads`` is left out: it changes how fast a task runs, not which run it is, and the
    sweep sets the threads of every task itself. So are the keys of ``config.ADDED_KEYS`` at
    their defaults (a sweep from before they existed keeps its ids).
    """
    tables = config.to_dict()
    tables["run"].pop("threads", None)
    defaults = Config().to_dict()
    for dotted in ADDED_KEYS:
        section, key = dotted.split(".")
        if tables[section][key] == defaults[section][key]:
            del tables[section][key]
    import tomli_w

    return hashlib.sha256(tomli_w.dumps(tables).encode()).hexdigest()[:16]


def _flatten(table: Mapping, where: str, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"depth": [2, 3]}}`` (unquoted dotted keys in TOML) -> ``{"model.depth": [2, 3]}``."""
    flat = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, where, dotted + "."))
        else:
            flat[dotted] = value
    for dotted in flat:
        section, _, key = dotted.partition(".")
        if not key or "." in key:
            raise InputError(f'[{where}] key "{dotted}": expected SECTION.KEY, e.g. "model.depth"')
        if section not in SECTIONS:
            raise InputError(f'[{where}] key "{dotted}": unknown config table [{section}]'
                             f"{_suggest(section, SECTIONS)}")
        fields = Config().to_dict()[section]
        if key not in fields:
            raise InputError(f'[{where}] key "{dotted}": unknown config key{_suggest(key, fields)}')
    return flat


def _format_point(point: Mapping) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in point.items()) or "(no swept keys)"


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file and build every task's config (nothing runs here).

    Raises
    ------
    InputError
        One line naming the file and what is wrong: unknown top-level keys, a key in two
        sections, empty or non-list values, zip lists of unequal length, and any value that fails
        the run-config validation for any task.
    """
    path = Path(path)
    tables = read_toml(path)
    where = f"sweep file {path}"
    unknown = [k for k in tables if k not in SWEEP_KEYS]
    if unknown:
        key = unknown[0]
        hint = (f'; put fixed values in [set], e.g. "{key}.KEY" = VALUE' if key in SECTIONS
                else _suggest(key, SWEEP_KEYS))
        raise InputError(f"{where}: unknown top-level key {key!r}{hint} "
                         f"(expected base, [set], [grid], [zip])")
    sweep_dir = path.resolve().parent
    base = tables.get("base", "")
    if not isinstance(base, str):
        raise InputError(f"{where}: base = {base!r}: expected a path to a run config (string)")
    for name in ("set", "grid", "zip"):
        if name in tables and not isinstance(tables[name], Mapping):
            raise InputError(f"{where}: {name} must be a table [{name}], got {type(tables[name]).__name__}")
    try:
        fixed = _flatten(tables.get("set", {}), "set")
        grid = _flatten(tables.get("grid", {}), "grid")
        zipped = _flatten(tables.get("zip", {}), "zip")
    except InputError as err:
        raise InputError(f"{where}: {err}") from None
    seen: dict[str, str] = {}
    for name, table in (("set", fixed), ("grid", grid), ("zip", zipped)):
        for key in table:
            if key in seen:
                raise InputError(f"{where}: {key} is in both [{seen[key]}] and [{name}]; give it in one")
            seen[key] = name
    for name, table in (("grid", grid), ("zip", zipped)):
        if "run.threads" in table:
            raise InputError(f"{where}: [{name}] run.threads cannot be swept: the sweep gives every task "
                             f"cores // workers threads (choose the number of workers instead)")
        for key, values in table.items():
            if not isinstance(values, list):
                raise InputError(f"{where}: [{name}] {key} = {values!r}: expected a list of values")
            if not values:
                raise InputError(f"{where}: [{name}] {key} is an empty list: expected at least one value")
    lengths = {key: len(values) for key, values in zipped.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{k} has {n}" for k, n in lengths.items())
        raise InputError(f"{where}: [zip] lists must have equal lengths, but {listed}")

    if base:
        base_path = Path(base) if Path(base).is_absolute() else sweep_dir / base
        try:
            base_config = Config.from_toml(base_path)
        except InputError as err:
            raise InputError(f"{where}: base = {base!r}: {err}") from None
    else:
        base_config = Config()

    points = []
    grid_values = itertools.product(*grid.values()) if grid else [()]
    zip_length = next(iter(lengths.values())) if lengths else 1
    for values in grid_values:
        for i in range(zip_length):
            point = dict(zip(grid, values))
            point.update({key: vals[i] for key, vals in zipped.items()})
            points.append(point)
    tasks = []
    by_id: dict[str, dict] = {}
    for point in points:
        try:
            config = base_config.with_overrides({**fixed, **point}, base_dir=sweep_dir)
        except InputError as err:
            raise InputError(f"{where}: task {_format_point(point)}: {err}") from None
        tid = task_id(config)
        if tid in by_id:
            raise InputError(f"{where}: tasks {_format_point(by_id[tid])} and {_format_point(point)} "
                             f"are the same run (a repeated value?)")
        by_id[tid] = point
        tasks.append(Task(tid, point, config))
    return Sweep(path, path.read_text(encoding="utf-8"), fixed, grid, zipped, tasks)


# -- one task, on a worker ------------------------------------------------------------------------
def _log(log_path: str, event: str, tid: str, detail: str = "") -> None:
    """Append one line to OUTDIR/sweep.log (O_APPEND: whole lines from concurrent processes)."""
    line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {event} {tid} {socket.gethostname()} {os.getpid()}"
    line += f" {detail}" if detail else ""
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (" ".join(line.split()) + "\n").encode())
    finally:
        os.close(fd)


def task_threads(slots_per_host: Mapping[str, int] | None, threads: int | None) -> int:
    """Numba + BLAS threads for one task: given, or the cores here over the task slots here."""
    if threads:
        return threads
    cores = default_cores()
    slots = 1
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # not on a Dask worker
        return cores
    host = worker.address.split("://")[-1].rsplit(":", 1)[0]
    if slots_per_host and host in slots_per_host:
        slots = slots_per_host[host]
    else:  # a worker that joined after the sweep started (adaptive scaling): ask the scheduler
        from distributed import get_client

        info = get_client().scheduler_info()["workers"].values()
        slots = sum(int(w["nthreads"]) for w in info if w["host"] == host) or worker.state.nthreads
    return max(1, cores // max(1, slots))


def run_task(tid: str, config: Config, outdir: str, threads: int | None = None,
             slots_per_host: Mapping[str, int] | None = None) -> dict:
    """Run one task to ``OUTDIR/runs/TASK.h5`` and return its summary row (without swept keys).

    Idempotent: a complete file is summarized, not rerun; a ``.part`` file (a killed worker, an
    interrupted sweep) is resumed from its last committed checkpoint, or restarted if it cannot
    be resumed. Bad input (e.g. an unreadable data file) is returned as a failed row; any other
    exception propagates so that Dask retries the task.
    """
    from .errors import AlreadyComplete
    from .simulate import run_simulation
    from .threads import limit_threads

    runs = Path(outdir) / "runs"
    final = runs / f"{tid}.h5"
    part = runs / f"{tid}.h5.part"
    log_path = str(Path(outdir) / "sweep.log")
    if final.exists():  # finished by an earlier attempt whose result never reached the client
        _log(log_path, "found", tid)
        return summarize_run(final)
    n_threads = task_threads(slots_per_host, threads)
    notes = []
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, limit_threads(n_threads) as used:
        warnings.simplefilter("always")
        try:
            if part.exists():
                try:
                    report = run_simulation(config, part, resume=True, threads=used)
                    if report.resumed_from is None:  # killed before its first checkpoint
                        notes.append("restarted (the .part had no committed checkpoint)")
                        _log(log_path, "restart", tid, f"threads={used} no committed checkpoint")
                    else:
                        notes.append(f"resumed from checkpoint {report.resumed_from}")
                        _log(log_path, "resume", tid, f"threads={used} from={report.resumed_from}")
                except AlreadyComplete:  # killed between the run's end and the rename
                    report = None
                    notes.append("found complete .part")
                    _log(log_path, "resume", tid, "complete .part: summary and rename only")
                except Exception as err:  # a .part that cannot be resumed: start it again
                    reason = " ".join(str(err).split())
                    notes.append(f"restarted (could not resume: {reason})")
                    _log(log_path, "restart", tid, reason)
                    report = run_simulation(config, part, overwrite=True, threads=used)
            else:
                _log(log_path, "start", tid, f"threads={used}")
                report = run_simulation(config, part, threads=used)
        except InputError as err:
            message = " ".join(str(err).split())
            _log(log_path, "failed", tid, message)
            return {"status": "failed", "message": message}
        if report is not None:
            report.run.close()
            if report.interrupted:
                raise RuntimeError(f"task {tid} was stopped by {report.interrupted}")
    seconds = time.perf_counter() - start
    import h5py

    with h5py.File(part, "a") as f:  # provenance of the task
        f.attrs["sweep_task"] = tid
        f.attrs["sweep_seconds"] = seconds  # this attempt (a resumed task: the rest of the run)
        f.attrs["sweep_threads"] = used
    with limit_threads(n_threads):
        row = summarize_run(part)
    notes += [f"warning: {' '.join(str(w.message).split())}" for w in caught]
    row["message"] = "; ".join(n for n in [*notes, row.get("message", "")] if n)
    with h5py.File(part, "a") as f:  # the summary row, so that a rerun need not recompute it
        f.attrs["sweep_summary"] = json.dumps(row)
    os.replace(part, final)  # the atomic "done"
    _log(log_path, "done", tid, f"seconds={seconds:.3f}")
    row.pop("analysis", None)
    return row


# -- metrics of one run ----------------------------------------------------------------------------
def _theory_metrics(run) -> dict:
    """Gap to the predicted limit, fitted rate and predicted l1 norm (medians over seeds) from
    the analysis module (``ddln analyze``), NaN with a note when it is not there or fails."""
    nan = {"gap_to_prediction": math.nan, "fitted_rate": math.nan, "predicted_l1_norm": math.nan}
    try:
        from . import analysis
    except ImportError:
        return {**nan, "analysis": False,
                "note": "no ddln_fast.analysis: gap_to_prediction and fitted_rate left NaN"}
    try:
        if hasattr(analysis, "analyze_run"):
            result = analysis.analyze_run(run)
        else:
            result = analysis.analyze(run.path)
        seeds = list(getattr(result, "seeds", []))
    except Exception as err:  # e.g. assumption (A) fails: the other metrics still count
        return {**nan, "analysis": True, "note": f"analysis: {' '.join(str(err).split())}"}
    notes = sorted({getattr(seed, "note", "") for seed in seeds} - {""})
    out = {"analysis": True, "note": "; ".join(f"analysis: {note}" for note in notes)}
    for name in nan:
        values = np.array([getattr(seed, name, math.nan) for seed in seeds], dtype=float)
        out[name] = _median(values)
    return out


def _median(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(np.median(finite)) if finite.size else math.nan


def time_to_eps(t_seed: np.ndarray, loss: np.ndarray, status_final: np.ndarray, loss_tol: float) -> np.ndarray:
    """Per seed, the first checkpoint time at which the loss is at most epsilon (inf: never).

    epsilon = ``integrator.loss_tol`` when set (the seed's stop time, exact), else
    RELATIVE_EPS times the loss at t = 0.

    Parameters
    ----------
    t_seed, loss : ndarray of shape (K, S)
    status_final : ndarray of shape (S,)
    """
    from .integrators import STATUS_NAMES

    eps = loss_tol if loss_tol > 0 else RELATIVE_EPS * loss[0]
    out = np.full(loss.shape[1], np.inf)
    reached = loss <= eps
    for s in range(loss.shape[1]):
        if STATUS_NAMES[int(status_final[s])] == "loss_tol":
            out[s] = t_seed[-1, s]
        elif reached[:, s].any():
            out[s] = t_seed[int(np.argmax(reached[:, s])), s]
    return out


def summarize_run(path: str | Path) -> dict:
    """The summary metrics of one complete run file (medians and maxima over its seeds)."""
    from .integrators import STATUS_NAMES
    from .store import open_run

    with open_run(path) as run:
        cached = run.file.attrs.get("sweep_summary")
        if cached is not None:  # written by the task, before the rename
            row = json.loads(cached)
            if row.pop("analysis", False) or importlib.util.find_spec("ddln_fast.analysis") is None:
                return row
        loss, t_seed, nfev, status = run.loss, run.t_seed, run.nfev, run.status
        theta = run.checkpoint("theta")[-1]
        config = run.config
        seconds = float(run.file.attrs.get("sweep_seconds", run.file.attrs.get("wall_seconds", math.nan)))
        theory = _theory_metrics(run)
    final = loss[-1]
    counts: dict[str, int] = {}
    for v in status[-1]:
        counts[STATUS_NAMES[int(v)]] = counts.get(STATUS_NAMES[int(v)], 0) + 1
    with np.errstate(invalid="ignore"):
        tte = time_to_eps(t_seed, loss, status[-1], config.integrator.loss_tol)
    return {
        "status": "complete",
        "final_loss_max": float(np.max(final)),
        "final_loss_median": float(np.median(final)),
        "t_final": float(np.max(t_seed[-1])),
        "time_to_eps": float(np.median(tte)),
        "nfev": int(np.sum(nfev[-1])),
        "l1_norm": float(np.median(np.abs(theta).sum(axis=-1))),
        "predicted_l1_norm": theory["predicted_l1_norm"],
        "gap_to_prediction": theory["gap_to_prediction"],
        "fitted_rate": theory["fitted_rate"],
        "seconds": seconds,
        "seed_status": " ".join(f"{c}x{name}" for name, c in counts.items()),
        "message": theory["note"],
        "analysis": theory["analysis"],
    }


# -- the summary table ------------------------------------------------------------------------------
def summary_columns(swept_keys) -> list[str]:
    return ["task", *swept_keys, "status", *METRICS, "seed_status", "message"]


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else
                                                         ("inf" if value > 0 else "-inf"))
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return str(value)


def write_summary(outdir: str | Path, rows: list[dict], swept_keys: list[str]) -> None:
    """``summary.csv`` and ``summary.h5`` (a compound dataset ``/summary``, same columns), each
    written to a temporary name and renamed, so a reader never sees half a table."""
    import h5py

    outdir = Path(outdir)
    columns = summary_columns(swept_keys)
    tmp = outdir / "summary.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_value(row.get(c)) for c in columns])
    os.replace(tmp, outdir / "summary.csv")

    dtypes = []
    for c in columns:
        values = [row.get(c) for row in rows]
        present = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
        if c in METRICS and c != "nfev":
            dtypes.append((c, "f8"))
        elif present and all(isinstance(v, bool) for v in present):
            dtypes.append((c, "?"))
        elif c == "nfev" or (present and all(isinstance(v, int) and not isinstance(v, bool) for v in present)):
            dtypes.append((c, "i8"))
        elif present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
            dtypes.append((c, "f8"))
        else:
            dtypes.append((c, h5py.string_dtype()))
    table = np.zeros(len(rows), dtype=np.dtype(dtypes))
    for i, row in enumerate(rows):
        for c, kind in dtypes:
            value = row.get(c)
            if kind == "f8":
                table[c][i] = math.nan if value is None else float(value)
            elif kind == "i8":
                table[c][i] = -1 if value is None else int(value)
            elif kind == "?":
                table[c][i] = bool(value)
            else:
                table[c][i] = _csv_value(value)
    tmp = outdir / "summary.h5.tmp"
    with h5py.File(tmp, "w") as f:
        ds = f.create_dataset("summary", data=table)
        ds.attrs["swept_keys"] = json.dumps(list(swept_keys))
        ds.attrs["columns"] = json.dumps(columns)
        ds.attrs["note"] = ("one row per task; medians over seeds except final_loss_max, t_final "
                            "(max) and nfev (sum); -1 in nfev and NaN in metrics: no value")
    os.replace(tmp, outdir / "summary.h5")


def _parse_cell(text: str):
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_summary(outdir: str | Path) -> tuple[list[str], list[dict]]:
    """(swept keys, rows) of ``OUTDIR/summary.csv``; numbers parsed back."""
    path = Path(outdir) / "summary.csv"
    if not Path(outdir).is_dir():
        raise InputError(f"sweep output {outdir} does not exist or is not a directory")
    if not path.exists():
        raise InputError(f"{path} does not exist: run ddln sweep SWEEP.toml -o {outdir} first")
    with open(path, newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise InputError(f"{path} is empty") from None
        if "task" not in header or "status" not in header:
            raise InputError(f"{path} is not a ddln sweep summary (no task/status columns)")
        swept = header[header.index("task") + 1:header.index("status")]
        rows = [{c: _parse_cell(v) for c, v in zip(header, line)} for line in reader]
    return swept, rows


# -- running a sweep ------------------------------------------------------------------------------
@dataclass
class SweepResult:
    """What :func:`run_sweep` did: the summary rows and the task counts."""

    rows: list
    swept_keys: list
    ran: int
    skipped: int
    failed: int
    seconds: float
    interrupted: bool = False
    engine: str = ""


def default_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _check_outdir(sweep: Sweep, outdir: Path, resume: bool) -> None:
    """Refuse an OUTDIR that holds something else (nothing is written here)."""
    if outdir.exists() and not outdir.is_dir():
        raise InputError(f"output {outdir} is a file, expected a directory for the sweep")
    copy = outdir / "sweep.toml"
    if copy.exists():
        previous = copy.read_text(encoding="utf-8")
        if previous != sweep.text and not resume:
            raise InputError(f"{outdir} holds a different sweep (its sweep.toml differs from {sweep.path}); "
                             f"pass resume=True to continue it with the new sweep file, or use another OUTDIR",
                             f"{outdir} holds a different sweep (its sweep.toml differs from {sweep.path}); "
                             f"pass --resume to continue it with the new sweep file, or use another OUTDIR")
    elif outdir.exists() and any(p.name != ".lock" and not (p.name == "runs" and not any(p.iterdir()))
                                 for p in outdir.iterdir()):
        raise InputError(f"{outdir} is not empty and holds no sweep.toml: expected a new or empty "
                         f"directory, or the OUTDIR of an earlier ddln sweep")
    elif resume:
        raise InputError(f"resume: {outdir} holds no sweep to resume (no sweep.toml)",
                         f"--resume: {outdir} holds no sweep to resume (no sweep.toml)")


def _claim_outdir(sweep: Sweep, outdir: Path):
    """Create OUTDIR/runs, lock OUTDIR and write the copy of the sweep file; returns the lock."""
    copy = outdir / "sweep.toml"
    try:
        (outdir / "runs").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create the sweep output {outdir}: {err.strerror}") from None
    lock = _lock(outdir)
    tmp = outdir / "sweep.toml.tmp"
    tmp.write_text(sweep.text, encoding="utf-8")
    os.replace(tmp, copy)
    return lock


def _lock(outdir: Path):
    """An exclusive lock on OUTDIR/.lock for the client's lifetime: two sweeps writing one
    OUTDIR would run the same tasks twice and overwrite each other's summary."""
    import fcntl

    f = open(outdir / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise InputError(f"another ddln sweep is running on {outdir} (it holds {outdir / '.lock'}); "
                         f"wait for it or use another OUTDIR") from None
    return f


def _connect(scheduler: str | None, workers: int | None, cores: int):
    """A Dask client: to an existing scheduler, or to a new LocalCluster (returned to close)."""
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            return Client(scheduler, timeout="10s"), None
        except (OSError, TimeoutError, ValueError) as err:
            reason = " ".join(str(err).split())
            raise InputError(f"scheduler {scheduler}: cannot connect ({reason})",
                             f"--scheduler {scheduler}: cannot connect ({reason})") from None
    # Workers are spawned processes (numba's omp layer is not fork-safe), one thread each; the
    # task itself sets Numba and BLAS to cores // workers threads.
    cluster = LocalCluster(n_workers=workers or cores, threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=logging.ERROR)
    return Client(cluster), cluster


def run_sweep(sweep: Sweep | str | Path, outdir: str | Path, *, scheduler: str | None = None,
              workers: int | None = None, client=None, resume: bool = False,
              progress: bool | None = None, echo=None) -> SweepResult:
    """Run every task of a sweep that is not complete yet and write the summary.

    Parameters
    ----------
    sweep : Sweep or path
        A sweep (see :func:`load_sweep`) or the path of a sweep file.
    outdir : path
        The output directory (created; an earlier sweep's OUTDIR is continued).
    scheduler : str, optional
        ``tcp://HOST:PORT`` of a running Dask scheduler (e.g. dask-jobqueue's).
    workers : int, optional
        Worker processes of the LocalCluster (default: one per core).
    client : distributed.Client, optional
        Use this client (e.g. of a ``SLURMCluster``) instead of ``scheduler``/``workers``.
    resume : bool
        Allow continuing an OUTDIR whose sweep.toml differs from this sweep file.
    progress : bool or None
        Progress bar over tasks (``None``: only on a terminal).
    echo : callable, optional
        Receives the lines to print (default: stdout).
    """
    echo = echo or print
    start = time.perf_counter()
    if not isinstance(sweep, Sweep):
        sweep = load_sweep(sweep)
    if workers is not None and workers < 1:
        raise InputError(f"workers = {workers}: expected an integer >= 1",
                         f"--workers {workers}: expected an integer >= 1")
    if scheduler and workers:
        raise InputError("scheduler and workers exclude each other (the cluster has its workers)",
                         "--scheduler and --workers exclude each other (the cluster has its workers)")
    outdir = Path(outdir)
    _check_outdir(sweep, outdir, resume)
    own_client = client is None
    if own_client and scheduler:  # a bad address is reported before OUTDIR is touched
        client, _ = _connect(scheduler, None, 0)
    try:
        lock = _claim_outdir(sweep, outdir)
        try:
            return _run_tasks(sweep, outdir, workers, client, progress, echo, start)
        finally:
            lock.close()  # releases the flock
    finally:
        if own_client and client is not None:
            client.close()


def _run_tasks(sweep: Sweep, outdir: Path, workers, client, progress, echo, start) -> SweepResult:
    """Summarize the complete tasks, run the others on ``client`` (None: a new LocalCluster)."""
    from tqdm import tqdm

    runs = outdir / "runs"
    swept = sweep.swept_keys
    rows: dict[str, dict] = {}
    todo = []
    for task in sweep.tasks:
        if (runs / f"{task.id}.h5").exists():
            try:
                rows[task.id] = summarize_run(runs / f"{task.id}.h5")
                continue
            except InputError:  # an unreadable "complete" file: run the task again
                os.replace(runs / f"{task.id}.h5", runs / f"{task.id}.h5.part")
        todo.append(task)
    skipped = len(rows)
    parts = sum((runs / f"{t.id}.h5.part").exists() for t in todo)
    echo(f"ddln sweep: {len(sweep.tasks)} tasks ({skipped} complete, {len(todo)} to run"
         f"{f', {parts} of them to resume' if parts else ''}) -> {outdir}")

    def finish(interrupted=False, engine=""):
        ordered = [{"task": t.id, **t.point, **(rows.get(t.id) or _unreported_row(runs, t.id))}
                   for t in sweep.tasks]
        write_summary(outdir, ordered, swept)
        failed = sum(r["status"] == "failed" for r in ordered)
        return SweepResult(ordered, swept, len(todo), skipped, failed, time.perf_counter() - start,
                           interrupted, engine)

    if not todo:
        return finish()

    cores = default_cores()
    own_cluster = None
    if client is None:
        client, own_cluster = _connect(None, workers, cores)
    interrupted = False
    try:
        threads = None
        slots = None
        if own_cluster is not None:
            n_workers = workers or cores
            threads = max(1, cores // n_workers)
            engine = f"LocalCluster of {n_workers} workers x 1 thread, {threads} Numba/BLAS threads per task"
        else:
            info = client.scheduler_info()["workers"]
            slots = {}
            for w in info.values():
                slots[w["host"]] = slots.get(w["host"], 0) + int(w["nthreads"])
            engine = (f"scheduler {client.scheduler.address}: {len(info)} workers, "
                      f"{sum(slots.values())} task slots")
        echo(f"engine: {engine}")
        from distributed import as_completed

        futures = {}
        for task in todo:
            fut = client.submit(run_task, task.id, task.config, str(outdir.resolve()), threads, slots,
                                key=f"ddln-sweep-{task.id}", retries=TASK_RETRIES)
            futures[fut] = task
        bar = tqdm(total=len(sweep.tasks), initial=skipped, disable=None if progress is None else not progress,
                   unit="task", desc="ddln sweep", dynamic_ncols=True)
        last_write = time.monotonic()
        try:
            for fut in as_completed(list(futures)):
                task = futures[fut]
                if fut.status == "finished":
                    rows[task.id] = fut.result()
                else:
                    err = fut.exception()
                    message = " ".join(f"{type(err).__name__}: {err}".split())
                    rows[task.id] = {"status": "failed", "message": message}
                bar.update(1)
                if time.monotonic() - last_write > 10:  # a crash of the client keeps most of the table
                    finish()
                    last_write = time.monotonic()
        except KeyboardInterrupt:
            interrupted = True
            for fut in futures:
                fut.cancel()
        finally:
            bar.close()
    finally:
        if own_cluster is not None:
            client.close()
            own_cluster.close()
    return finish(interrupted, engine)


def _unreported_row(runs: Path, tid: str) -> dict:
    """The summary row of a task whose result never reached the client (an interrupted sweep):
    read from its file, which a worker may have completed or left partly written."""
    final, part = runs / f"{tid}.h5", runs / f"{tid}.h5.part"
    if final.exists():
        try:
            return summarize_run(final)
        except InputError as err:
            return {"status": "failed", "message": " ".join(str(err).split())}
    if part.exists():
        return {"status": "interrupted", "message": "partly run (.part file); rerun the sweep to resume it"}
    return {"status": "not run"}


# -- the report ------------------------------------------------------------------------------------
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
