"""Running a sweep: the output directory, the Dask cluster, submitting the tasks, the summary.

Output directory::

    OUTDIR/sweep.toml          copy of the sweep file
    OUTDIR/runs/               one run file per task (see :mod:`ddln_fast.sweep.task`)
    OUTDIR/sweep.log           one line per task event (start, resume, done, failed), all workers
    OUTDIR/summary.csv, .h5    one row per task (see :mod:`ddln_fast.sweep.summary`)

Tasks are submitted with their id as Dask key, so a task retried after a lost worker is the
same task, and resumes its own file.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..threads import available_cores
from .metrics import summarize_run
from .spec import Sweep, load_sweep
from .summary import write_summary
from .task import run_task

#: Retries of a task that raised something other than bad input (e.g. a full disk, a flaky mount).
TASK_RETRIES = 2


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

    cores = available_cores()
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
