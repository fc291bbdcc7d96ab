"""One task of a sweep, as a Dask worker runs it: the run file, its resume, its summary row.

Output of a task in OUTDIR::

    OUTDIR/runs/TASK.h5        a complete run (renamed from TASK.h5.part when it finished)
    OUTDIR/runs/TASK.h5.part   a run being written, or left by a killed worker (resumed on rerun)
    OUTDIR/sweep.log           one line per task event (start, resume, done, failed), all workers

Why one file per task and a rename: a run file is either complete (``TASK.h5``) or not there, so
"what is done" is a directory listing; a task that is run twice (a lost worker's task retried
elsewhere) finds its own ``.part`` or final file and resumes, overwrites or returns it, so writes
are idempotent.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Mapping

from ..config import Config
from ..errors import AlreadyComplete, InputError
from .metrics import summarize_run


def log_event(log_path: str, event: str, tid: str, detail: str = "") -> None:
    """Append one line to OUTDIR/sweep.log (O_APPEND: whole lines from concurrent processes)."""
    line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {event} {tid} {socket.gethostname()} {os.getpid()}"
    line += f" {detail}" if detail else ""
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (" ".join(line.split()) + "\n").encode())
    finally:
        os.close(fd)


def run_task(tid: str, config: Config, outdir: str, threads: int | None = None,
             slots_per_host: Mapping[str, int] | None = None) -> dict:
    """Run one task to ``OUTDIR/runs/TASK.h5`` and return its summary row (without swept keys).

    Idempotent: a complete file is summarized, not rerun; a ``.part`` file (a killed worker, an
    interrupted sweep) is resumed from its last committed checkpoint, or restarted if it cannot
    be resumed. Bad input (e.g. an unreadable data file) is returned as a failed row; any other
    exception propagates so that Dask retries the task. The task's provenance (``sweep_task``,
    ``sweep_seconds``, ``sweep_threads``) and its summary row (``sweep_summary``, so that a
    rerun need not recompute it) are added to the run file's attributes before the rename.
    """
    from ..simulate import run_simulation
    from ..store import annotate
    from ..threads import limit_threads, task_threads

    runs = Path(outdir) / "runs"
    final = runs / f"{tid}.h5"
    part = runs / f"{tid}.h5.part"
    log_path = str(Path(outdir) / "sweep.log")
    if final.exists():  # finished by an earlier attempt whose result never reached the client
        log_event(log_path, "found", tid)
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
                        log_event(log_path, "restart", tid, f"threads={used} no committed checkpoint")
                    else:
                        notes.append(f"resumed from checkpoint {report.resumed_from}")
                        log_event(log_path, "resume", tid, f"threads={used} from={report.resumed_from}")
                except AlreadyComplete:  # killed between the run's end and the rename
                    report = None
                    notes.append("found complete .part")
                    log_event(log_path, "resume", tid, "complete .part: summary and rename only")
                except Exception as err:  # a .part that cannot be resumed: start it again
                    reason = " ".join(str(err).split())
                    notes.append(f"restarted (could not resume: {reason})")
                    log_event(log_path, "restart", tid, reason)
                    report = run_simulation(config, part, overwrite=True, threads=used)
            else:
                log_event(log_path, "start", tid, f"threads={used}")
                report = run_simulation(config, part, threads=used)
        except InputError as err:
            message = " ".join(str(err).split())
            log_event(log_path, "failed", tid, message)
            return {"status": "failed", "message": message}
        if report is not None:
            report.run.close()
            if report.interrupted:
                raise RuntimeError(f"task {tid} was stopped by {report.interrupted}")
    seconds = time.perf_counter() - start  # this attempt (a resumed task: the rest of the run)
    with limit_threads(n_threads):
        row = summarize_run(part, seconds=seconds)
    notes += [f"warning: {' '.join(str(w.message).split())}" for w in caught]
    row["message"] = "; ".join(n for n in [*notes, row.get("message", "")] if n)
    annotate(part, {"sweep_task": tid, "sweep_seconds": seconds, "sweep_threads": used,
                    "sweep_summary": json.dumps(row)})
    os.replace(part, final)  # the atomic "done"
    log_event(log_path, "done", tid, f"seconds={seconds:.3f}")
    return row
