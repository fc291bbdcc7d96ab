"""HDF5 storage of one run: the schema, a crash-safe streaming writer and a reader.

Crash safety (DESIGN.md, "Storage design"; the commit-counter pattern of emcee's HDFBackend with
its pitfall fixed, engineering.md section 3.3):

- Datasets along the checkpoint axis K grow one row per checkpoint; the one-element dataset
  ``/checkpoints/committed`` is written LAST, after the rows and the integrator state, and
  readers and resume trust only rows below it. Every cumulative quantity (nfev, step counters)
  lives in the rows or the state, never in a running total updated before the counter.
- The integrator state is double-buffered (``/state/slot0``, ``/state/slot1``). A new state goes
  to the slot that does not hold the latest one: its ``sequence`` is set to -1 (invalid), the
  arrays are written, then ``sequence`` gets the next number. Resume takes the valid slot with
  the highest sequence whose ``checkpoint_index`` is ``committed - 1``; at every instant at least
  one slot qualifies. Besides the state of each checkpoint, a stop request (SIGINT/SIGTERM)
  between checkpoints saves the state where it is (a safe point inside a long interval).
- Each phase ends with a flush, so the file's bytes follow the order above; a SIGKILL (which
  loses no written bytes, only the process) leaves every committed checkpoint readable.
- The file is created under ``OUT.h5.creating`` and renamed once its schema is complete, so
  ``OUT.h5`` never holds a half-made schema. Every later write access happens in SWMR mode
  (measured, HDF5 2.0: a writer killed in SWMR mode leaves a file that SWMR readers open, but a
  latest-format file killed while open in plain 'a' mode cannot be opened at all without
  h5clear). So ``complete`` is set in place (``attrs.modify``, same size) before the SWMR writer
  closes, not by reopening in plain mode.
- A crashed SWMR writer leaves the file flagged "open for writing"; :meth:`RunWriter.reopen`
  then copies it (read through SWMR) into ``OUT.h5.rebuild`` and renames that over the file.
- A POSIX byte-range lock (``lockf``, independent of HDF5's ``flock``) marks a live writer, so a
  second ``--resume`` of the same file refuses instead of rebuilding it under the first.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import uuid
from pathlib import Path

import h5py
import numpy as np

from .config import Config
from .errors import InputError
from .controller import STATUS_NAMES
from .problem import Problem

SCHEMA_VERSION = 1
CHUNK_BYTES = 2 * 1024 * 1024
STATE_SLOTS = 2
#: File format of SWMR run files: 1.10 is the oldest that has SWMR, and Debian 12's h5dump
#: (HDF5 1.10.8) cannot read the attributes HDF5 2.0 writes with "latest" (measured).
SWMR_LIBVER = ("v110", "v110")
#: Byte offset of the writer lock: far beyond any real file size, so it covers no data.
_LOCK_OFFSET = 1 << 62


class OutputError(OSError):
    """The output file cannot be written (disk full, permissions, I/O error); earlier committed
    checkpoints stay intact. The CLI reports it on one line with exit code 1."""


def _chunks(shape_per_checkpoint: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """One checkpoint along K; the rest split over the leading axis (seeds) and the last axis
    (coordinates) to at most about CHUNK_BYTES per chunk."""
    budget = max(1, CHUNK_BYTES // itemsize)
    shape = list(shape_per_checkpoint)
    middle = int(np.prod(shape[1:-1])) if len(shape) > 2 else 1
    if len(shape) == 1:
        return (1, min(shape[0], budget))
    last = min(shape[-1], max(1, budget // middle))
    lead = max(1, min(shape[0], budget // (middle * last)))
    return (1, lead, *shape[1:-1], last)


def _swmr_write_open(path: str) -> h5py.File:
    """Open an existing latest-format file for writing directly in SWMR mode (h5py's File()
    would open it in plain mode first, a window in which a kill leaves it unopenable)."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_fclose_degree(h5py.h5f.CLOSE_STRONG)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_V110, h5py.h5f.LIBVER_V110)
    fid = h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDWR | h5py.h5f.ACC_SWMR_WRITE, fapl=fapl)
    return h5py.File(fid)


class _WriterLock:
    """An exclusive ``lockf`` on one byte far past the end of the file: held by the process
    writing the file, released by the kernel when that process ends (also by SIGKILL)."""

    def __init__(self, path: str):
        try:
            self.fd = os.open(path, os.O_RDWR)
        except OSError as err:
            raise InputError(f"{path} cannot be opened for writing: {err.strerror}") from None
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _LOCK_OFFSET)
        except OSError as err:
            os.close(self.fd)
            self.fd = None
            if err.errno in (errno.EACCES, errno.EAGAIN):
                raise InputError(f"{path} is being written by another running ddln process; "
                                 f"stop it first (or wait for it to finish)") from None
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            # a file system without POSIX locks: carry on unprotected

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def check_not_being_written(path: str | Path) -> None:
    """Raise InputError if another process holds the writer lock of ``path``."""
    if Path(path).is_file():
        _WriterLock(str(path)).release()


class RunWriter:
    """Create a run file and stream checkpoints into it (see the module docstring)."""

    def __init__(self, file: h5py.File, path: str | None, swmr: bool, lock: _WriterLock | None = None):
        self.file = file
        self.path = path
        self.swmr = swmr
        self.lock = lock
        # Every dataset is opened once and kept open: no dataset closes (and flushes) happen
        # between the explicit flushes, so a write error surfaces there, in order.
        self.rows = {name: ds for name, ds in file["checkpoints"].items() if name != "committed"}
        self.counter = file["checkpoints/committed"]
        # datasets of fixed shape rewritten at every checkpoint (the dual method's /events)
        self.fixed = dict(file["events"].items()) if "events" in file else {}
        self.slots = [dict(file[f"state/slot{slot}"].items()) for slot in range(STATE_SLOTS)]
        self.lengths = {name: ds.shape[0] for name, ds in self.rows.items()}
        self.row_shapes = {name: ds.shape[1:] for name, ds in self.rows.items()}
        self.slot_shapes = [{name: ds.shape for name, ds in slot.items()} for slot in self.slots]
        self.committed = int(self.counter[0])
        self.latest_slot, self.sequence = None, -1
        for slot in range(STATE_SLOTS):
            seq = int(self.slots[slot]["sequence"][0])
            if seq > self.sequence:
                self.latest_slot, self.sequence = slot, seq

    # -- creation -------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path | None, config: Config, problem: Problem, u0: np.ndarray,
               provenance: dict, state_shapes: dict[str, tuple],
               extra_rows: dict[str, tuple] | None = None,
               fixed_shapes: dict[str, tuple] | None = None) -> "RunWriter":
        """Create every group, dataset and attribute (before SWMR starts, as SWMR requires),
        under ``path.creating``, then rename it to ``path``.

        ``path=None`` keeps the file in memory (Python API without an output file).
        ``extra_rows``: more checkpoint datasets, name -> (shape of one row, dtype, axis labels,
        meaning), e.g. the diagnostics a config switches on. ``fixed_shapes``: datasets of
        ``/events`` (name: (shape, dtype)), NaN-filled, rewritten in place by every
        :meth:`append` (the dual method's events).
        """
        if path is None:
            f = h5py.File(f"ddln-{uuid.uuid4().hex}.h5", "w", driver="core", backing_store=False)
            cls._write_schema(f, config, problem, u0, provenance, state_shapes, extra_rows,
                              fixed_shapes)
            return cls(f, None, False)
        path = str(path)
        check_not_being_written(path)
        tmp = f"{path}.creating"
        swmr = config.run.swmr
        lock = None
        try:
            f = h5py.File(tmp, "w", libver=SWMR_LIBVER if swmr else "earliest", track_order=True)
        except OSError as err:
            raise OutputError(f"cannot create the output file {tmp}: {_reason(err)}") from None
        try:
            cls._write_schema(f, config, problem, u0, provenance, state_shapes, extra_rows,
                              fixed_shapes)
            if swmr:
                f.swmr_mode = True
            f.flush()
            lock = _WriterLock(tmp)
            os.replace(tmp, path)
        except BaseException as err:
            if lock is not None:
                lock.release()
            Path(tmp).unlink(missing_ok=True)
            if isinstance(err, (OSError, RuntimeError)) and not isinstance(err, InputError):
                writer = cls.__new__(cls)
                writer.file, writer.path = f, tmp
                writer._fence()
                _FENCED.append(f)
                raise OutputError(f"cannot create the output file {path}: {_reason(err)}") from None
            _close_quietly(f)
            raise
        return cls(f, path, swmr, lock)

    @staticmethod
    def _write_schema(f, config, problem, u0, provenance, state_shapes, extra_rows=None,
                      fixed_shapes=None):
        S, L, d = u0.shape
        dtype = np.dtype(config.run.dtype)
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["config"] = config.to_toml()
        f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        # Written now with placeholder values: in SWMR mode they may only be modified in place.
        f.attrs["complete"] = False
        f.attrs["wall_seconds"] = np.nan
        for key, value in provenance.items():
            f.attrs[key] = value
        f.attrs["status_names"] = json.dumps(list(STATUS_NAMES))
        g = f.create_group("problem")
        g.create_dataset("X", data=problem.X)
        g.create_dataset("y", data=problem.y)
        if problem.theta_star is not None:
            g.create_dataset("theta_star", data=problem.theta_star)
        f.create_group("init").create_dataset("u", data=u0)
        seed_axis = ("seed",) if problem.per_seed else ()
        for name, labels in (("problem/X", (*seed_axis, "sample", "coordinate")),
                             ("problem/y", (*seed_axis, "sample")),
                             ("problem/theta_star", (*seed_axis, "coordinate")),
                             ("init/u", ("seed", "layer", "coordinate"))):
            if name in f:
                for axis, label in enumerate(labels):
                    f[name].dims[axis].label = label

        c = f.create_group("checkpoints")
        per_checkpoint = {
            "t": ((), np.float64), "t_seed": ((S,), np.float64), "loss": ((S,), np.float64),
            "theta": ((S, d), dtype), "invariant_drift": ((S,), np.float64),
            "nfev": ((S,), np.int64), "status": ((S,), np.int8),
        }
        if config.run.save_layers:
            per_checkpoint["u"] = ((S, L, d), dtype)
        labels = {"t": (), "t_seed": ("seed",), "loss": ("seed",), "theta": ("seed", "coordinate"),
                  "invariant_drift": ("seed",), "nfev": ("seed",), "status": ("seed",),
                  "u": ("seed", "layer", "coordinate")}
        meanings = {}
        for name, (shape, dt, axes, meaning) in (extra_rows or {}).items():
            per_checkpoint[name], labels[name], meanings[name] = (tuple(shape), dt), tuple(axes), meaning
        for name, (shape, dt) in per_checkpoint.items():
            chunks = _chunks(shape, np.dtype(dt).itemsize) if shape else (1024,)
            ds = c.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dt, chunks=chunks)
            for axis, label in enumerate(("checkpoint", *labels[name])):
                ds.dims[axis].label = label
            if name in meanings:
                ds.attrs["meaning"] = meanings[name]
        c["status"].attrs["names"] = json.dumps(list(STATUS_NAMES))
        c["t_seed"].attrs["meaning"] = "flow time of each seed's state (the time it stopped, if it did)"
        c.create_dataset("committed", data=np.zeros(1, dtype=np.int64))
        if fixed_shapes:
            events = f.create_group("events")
            for name, (shape, dt) in fixed_shapes.items():
                fill = np.nan if np.dtype(dt).kind == "f" else 0
                events.create_dataset(name, shape=shape, dtype=dt, fillvalue=fill)
        state = f.create_group("state")
        for slot in range(STATE_SLOTS):
            sg = state.create_group(f"slot{slot}")
            for name, (shape, dt) in state_shapes.items():
                sg.create_dataset(name, shape=shape, dtype=dt)
            sg.create_dataset("checkpoint_index", data=np.full(1, -1, dtype=np.int64))
            sg.create_dataset("sequence", data=np.full(1, -1, dtype=np.int64))

    @classmethod
    def reopen(cls, path: str, swmr: bool) -> "RunWriter":
        """Open an interrupted run to append to it.

        A file left by a killed writer (flagged as open for writing, or with rows past the
        commit counter) is first copied into a fresh one that replaces it (:func:`recover`).
        """
        recover(path)  # a killed writer's file: its committed content in a fresh file
        try:
            f = _swmr_write_open(path) if swmr else h5py.File(path, "r+")
        except OSError as err:
            raise InputError(f"run file {path} cannot be opened to resume ({_reason(err)})") from None
        try:
            lock = _WriterLock(path)
        except BaseException:
            f.close()
            raise
        return cls(f, path, swmr, lock)

    # -- streaming ------------------------------------------------------------------------------
    def _flush(self) -> None:
        self.file.flush()

    def _write_state(self, state: dict[str, np.ndarray], checkpoint_index: int) -> None:
        """Phases 1-3 of a state write (the caller may have queued rows before phase 1)."""
        slot_number = 0 if self.latest_slot is None else 1 - self.latest_slot
        slot = self.slots[slot_number]
        _write_all(slot["sequence"], -1)
        self._flush()
        shapes = self.slot_shapes[slot_number]
        for name, value in state.items():
            _write_all(slot[name], value, shapes[name])
        _write_all(slot["checkpoint_index"], checkpoint_index)
        self._flush()
        _write_all(slot["sequence"], self.sequence + 1)
        self._flush()
        self.latest_slot, self.sequence = slot_number, self.sequence + 1

    def append(self, row: dict[str, np.ndarray], state: dict[str, np.ndarray],
               fixed: dict[str, np.ndarray] | None = None) -> None:
        """Write checkpoint number ``committed``: its rows (and the ``fixed`` datasets), then the
        state, then the counter."""
        k = self.committed
        try:
            for name, value in row.items():
                ds = self.rows[name]
                if self.lengths[name] < k + 1:
                    ds.resize(k + 1, axis=0)
                    self.lengths[name] = k + 1
                _write_row(ds, k, value, self.row_shapes[name])
            for name, value in (fixed or {}).items():
                _write_all(self.fixed[name], value)
            self._write_state(state, k)
            _write_all(self.counter, k + 1)
            self._flush()
        except (OSError, RuntimeError) as err:  # h5py raises RuntimeError for a failed flush
            raise self._output_error(err, f"checkpoint {k}") from None
        self.committed = k + 1

    def save_state(self, state: dict[str, np.ndarray]) -> None:
        """Save the integrator state between checkpoints (a stop request's safe point); resume
        continues from it towards checkpoint ``committed``."""
        if self.committed == 0:
            return
        try:
            self._write_state(state, self.committed - 1)
        except (OSError, RuntimeError) as err:
            raise self._output_error(err, "the integrator state") from None

    def _output_error(self, err: Exception, what: str) -> OutputError:
        """Fence the file off (no later byte from HDF5 reaches it: after a failed write, HDF5
        would retry its dirty metadata on close, and a partly successful retry could damage the
        committed part), then describe the failure on one line."""
        self._fence()
        return OutputError(f"cannot write {what} to {self.path or 'memory'}: {_reason(err)}; the "
                           f"{self.committed} committed checkpoints are intact (fix that, e.g. free "
                           f"space, then resume the run)")

    def _fence(self) -> None:
        if self.path is None:
            return
        _silence_failed_closes()
        try:
            fd = self.file.id.get_vfd_handle()
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, fd)
            os.close(null)
        except Exception:  # noqa: BLE001 - best effort; the counter protocol still holds
            pass
        self.fenced = True

    def finish(self, extra_attrs: dict | None = None) -> None:
        """Mark the run complete in place (still in SWMR mode, see the module docstring), close."""
        try:
            self.file.attrs.modify("complete", True)
            for key, value in (extra_attrs or {}).items():
                self.file.attrs.modify(key, value)
            self._flush()
        except (OSError, RuntimeError) as err:
            raise self._output_error(err, "the completion mark") from None
        if self.path is not None:
            self.close()

    def close(self) -> None:
        """Close the file (quietly: after a write error the close may fail too) and unlock.

        A fenced file is not closed: h5py 3.16 / HDF5 2.0 crash (SIGSEGV) when objects of a file
        whose close failed are deallocated; the CLI ends the process with os._exit instead.
        """
        if getattr(self, "fenced", False):
            _FENCED.append(self.file)
        else:
            _close_quietly(self.file)
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _write_all(ds: h5py.Dataset, value, shape: tuple | None = None) -> None:
    """ds[...] = value through the low-level API (h5py's __setitem__ costs ~0.25 ms a call)."""
    shape = ds.shape if shape is None else shape
    data = np.asarray(value, dtype=ds.dtype)
    if data.shape != shape:
        data = np.broadcast_to(data, shape)
    ds.id.write(h5py.h5s.ALL, h5py.h5s.ALL, np.ascontiguousarray(data))


def _write_row(ds: h5py.Dataset, k: int, value, row_shape: tuple) -> None:
    """ds[k] = value (row k along the checkpoint axis) through the low-level API."""
    data = np.ascontiguousarray(np.asarray(value, dtype=ds.dtype).reshape((1, *row_shape)))
    file_space = ds.id.get_space()
    file_space.select_hyperslab((k,) + (0,) * len(row_shape), (1, *row_shape))
    ds.id.write(h5py.h5s.create_simple(data.shape), file_space, data)


#: Files fenced off after a write error, kept referenced (see RunWriter.close).
_FENCED: list = []


def _silence_failed_closes() -> None:
    """After a write error every h5py object of the file fails to close when it is freed, and
    h5py prints each failure as an ignored exception with a traceback: keep stderr to one line."""
    import sys

    previous = sys.unraisablehook
    if getattr(previous, "_ddln_quiet", False):
        return

    def hook(unraisable):
        if isinstance(unraisable.exc_value, RuntimeError) and "ref count" in str(unraisable.exc_value):
            return
        previous(unraisable)

    hook._ddln_quiet = True
    sys.unraisablehook = hook


def _reason(err: Exception) -> str:
    """The useful part of an OSError from the OS or from HDF5, on one line."""
    if getattr(err, "errno", None) and getattr(err, "strerror", None):
        return err.strerror
    text = " ".join(str(err).split())
    for code, name in ((errno.ENOSPC, "No space left on device"), (errno.EDQUOT, "Disk quota exceeded"),
                       (errno.EACCES, "Permission denied"), (errno.EROFS, "Read-only file system")):
        if name in text or f"errno = {code}," in text:
            return name
    return text


def _close_quietly(f: h5py.File) -> None:
    try:
        if f.id.valid:
            f.close()
    except Exception:  # after ENOSPC, closing flushes again and may fail again
        pass


def _rebuild(path: str, change=None) -> None:
    """Copy the committed content of a run file into a new file and rename it over the original
    (a kill during the copy leaves the original untouched). The copy is closed cleanly, so it
    carries no "open for writing" flag, and its checkpoint datasets end at the commit counter.
    ``change(copy)``, if given, edits the open copy before the rename (a new file is not in SWMR
    mode, so attributes may be added there)."""
    tmp = f"{path}.rebuild"
    kwargs = {"swmr": True, "libver": "latest"} if swmr_writer_flag(path) else {}
    try:
        src = h5py.File(path, "r", **kwargs)
    except OSError as err:
        raise InputError(f"run file {path} cannot be opened to recover it ({_reason(err)})") from None
    # the same format as the original: a file of a run without SWMR stays in the oldest
    # format, whose superblock has no "open for writing" flag that a killed writer leaves set
    libver = SWMR_LIBVER if _superblock_version(path) >= 2 else "earliest"
    with src, h5py.File(tmp, "w", libver=libver, track_order=True) as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        committed = int(src["checkpoints/committed"][0])
        for name in src:
            if name != "checkpoints":
                src.copy(src[name], dst, name=name)
        # the committed rows only, read row range by row range: a killed writer may have left
        # the index of uncommitted chunks half-written, and a SWMR reader retries such metadata
        # for minutes, so nothing past the commit counter is touched (H5Ocopy would touch it)
        rows = dst.create_group("checkpoints", track_order=True)
        for key, value in src["checkpoints"].attrs.items():
            rows.attrs[key] = value
        for name, ds in src["checkpoints"].items():
            if name == "committed":
                rows.create_dataset(name, data=ds[()])
            else:
                _copy_rows(ds, rows, name, committed)
        if change is not None:
            change(dst)
        dst.flush()
    os.replace(tmp, path)


def _copy_rows(ds: h5py.Dataset, group: h5py.Group, name: str, count: int) -> None:
    """A copy of the first ``count`` rows of the growing dataset ``ds`` into ``group`` (same dtype,
    chunks, growth and attributes), in blocks of rows of about CHUNK_BYTES."""
    out = group.create_dataset(name, shape=(count, *ds.shape[1:]), maxshape=ds.maxshape,
                               chunks=ds.chunks, dtype=ds.dtype)
    for key, value in ds.attrs.items():
        out.attrs[key] = value
    row_bytes = max(1, int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize)
    block = max(1, CHUNK_BYTES // row_bytes)
    for start in range(0, count, block):
        stop = min(count, start + block)
        out[start:stop] = ds[start:stop]


def extend_run(path: str | Path, config: Config, record: dict, revive: np.ndarray) -> None:
    """Prepare a run file to continue under relaxed limits (a larger t_end or max_steps, a
    smaller loss_tol), atomically (a copy renamed over it, see :func:`_rebuild`): the config
    becomes ``config``, ``complete`` false, ``record`` is appended to the JSON list in the root
    attribute ``extensions``, and the seeds in ``revive`` (shape (S,), bool) are set running in
    the state the run resumes from."""
    path = str(path)
    lock = _WriterLock(path)

    def change(f):
        f.attrs["config"] = config.to_toml()
        f.attrs["complete"] = False
        history = json.loads(f.attrs.get("extensions", "[]"))
        f.attrs["extensions"] = json.dumps([*history, record])
        slot = _resume_slot(f, int(f["checkpoints/committed"][0]))
        status, t_stop = slot["status"][()], slot["t_stop"][()]
        status[revive] = STATUS_NAMES.index("running")
        t_stop[revive] = np.nan
        slot["status"][...] = status
        slot["t_stop"][...] = t_stop

    try:
        _rebuild(path, change)
    finally:
        lock.release()


def recovery_needed(path: str | Path) -> str | None:
    """Why a run file no writer holds needs :func:`recover` (None: it does not): its superblock
    still says a writer has it open (a killed SWMR writer: plain HDF5 readers refuse it), or its
    checkpoint datasets hold rows past the commit counter (a writer killed mid-checkpoint)."""
    if swmr_writer_flag(path):
        return "a writer was killed while it had the file open"
    try:
        with h5py.File(path, "r") as f:
            committed = int(f["checkpoints/committed"][0])
            longest = max((ds.shape[0] for name, ds in f["checkpoints"].items() if name != "committed"),
                          default=committed)
    except (OSError, KeyError, ValueError):
        return None  # not a readable run file: the readers name the problem
    if longest > committed:
        return f"{longest - committed} uncommitted rows after the last committed checkpoint"
    return None


def recover(path: str | Path) -> str | None:
    """Make a crashed run file open in any HDF5 reader (h5py's defaults, h5dump, xarray): copy its
    committed content into a fresh file that replaces it. Returns what was wrong (None: nothing,
    the file is left alone). Refuses (InputError) a file that a running ddln process writes."""
    path = str(path)
    lock = _WriterLock(path)
    try:
        Path(f"{path}.rebuild").unlink(missing_ok=True)  # left by a recovery that was killed
        reason = recovery_needed(path)
        if reason is not None:
            _rebuild(path)
        return reason
    finally:
        lock.release()


def recover_for_reading(path: str | Path) -> str | None:
    """:func:`recover` for the read-only commands: a file that a running writer holds, that
    cannot be written here, or that is not a run file is left as it is (read through SWMR, or
    refused by :func:`open_h5` with its own message). Returns what was recovered, or None."""
    if not Path(path).is_file():
        return None
    try:
        return recover(path)
    except (InputError, OSError):
        return None


def _superblock_version(path: str | Path) -> int:
    """The superblock version of an HDF5 file without a user block (-1 if unreadable)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return -1
    return head[8] if len(head) == 9 and head[:8] == b"\x89HDF\r\n\x1a\n" else -1


def swmr_writer_flag(path: str | Path) -> bool:
    """Whether the superblock says a SWMR writer has the file open (or had, and was killed).

    Superblock versions 2 and 3 (HDF5 file format spec, "Superblock"): 8-byte signature, then
    version, size of offsets, size of lengths, and the file consistency flags, whose bit 2 is
    "SWMR write access". (No user block: ddln_fast never writes one.)"""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return False
    return (len(head) == 12 and head[:8] == b"\x89HDF\r\n\x1a\n" and head[8] >= 2
            and bool(head[11] & 0x04))


def open_h5(path: str | Path) -> h5py.File:
    """Open a run file for reading, also while it is being written (SWMR) or after a crash of a
    SWMR writer; raises InputError with one line for missing, foreign or broken files."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"run file {path} does not exist")
    if path.is_dir():
        raise InputError(f"run file {path} is a directory, expected an .h5 file")
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as err:
        raise InputError(f"run file {path} cannot be read ({_reason(err)})") from None
    if not is_hdf5:
        raise InputError(f"run file {path} is not an HDF5 file")
    last_error = None
    for kwargs in ({}, {"swmr": True, "libver": "latest"}):
        if kwargs and not swmr_writer_flag(path):
            # only a file flagged by a (live or killed) SWMR writer needs an SWMR reader: SWMR
            # skips the end-of-file check, and reading a truncated copy that way retries forever.
            # (A live writer's file can also fail the plain open as "truncated": its header may
            # already count bytes it is still writing.)
            break
        try:
            f = h5py.File(path, "r", **kwargs)
        except OSError as err:
            last_error = err
            continue
        try:
            valid = "schema_version" in f.attrs and "checkpoints/committed" in f and "state" in f
        except Exception:  # noqa: BLE001 - broken metadata of a truncated file
            valid = False
        if not valid:
            f.close()
            raise InputError(f"run file {path} is not a ddln_fast run (no schema_version, commit counter "
                             f"or state)")
        return f
    reason = " ".join(str(last_error).split())
    if "truncated file" in reason:
        raise InputError(f"run file {path} is truncated (shorter than its own header says; "
                         f"an incomplete copy?): {reason.split('(', 1)[-1].rstrip(')')}")
    raise InputError(f"run file {path} cannot be opened ({reason})")


class Run:
    """A run file, read back: only committed checkpoints are visible.

    Attributes (numpy arrays, read on access): ``t`` (K,), ``loss`` (K, S), ``theta`` (K, S, d),
    ``u`` (K, S, L, d) when layers were saved, ``invariant_drift`` (K, S), ``nfev`` (K, S),
    ``status`` (K, S) (codes, names in :attr:`status_names` / the root attribute
    ``status_names``), ``t_seed`` (K, S) (each seed's time; the time it stopped, if it did);
    ``X``, ``y``, ``theta_star``, ``u0``; ``config``.

    K is the number of checkpoints committed when the file was opened or last
    :meth:`refresh`-ed: every array read in between has the same K, even while a writer appends.
    """

    def __init__(self, file: h5py.File, path: str | None = None):
        self.file = file
        self.path = path
        self._committed = int(file["checkpoints/committed"][0])
        # Opens of one file in one process share HDF5's metadata cache, so a new handle can
        # still see the dataset shapes an older handle saw: refresh them (SWMR) from the start.
        self.refresh()

    def refresh(self) -> int:
        """See checkpoints committed since the file was opened or last refreshed (live runs,
        SWMR); returns the new count. The counter is read first, so every dataset, refreshed
        after it, holds at least that many rows."""
        if self.file.swmr_mode:
            counter = self.file["checkpoints/committed"]
            counter.refresh()
            self._committed = int(counter[0])
            for name, ds in self.file["checkpoints"].items():
                if name != "committed":
                    ds.refresh()
        return self._committed

    @property
    def committed(self) -> int:
        return self._committed

    @property
    def complete(self) -> bool:
        return bool(self.file.attrs["complete"])

    @property
    def config(self) -> Config:
        import tomllib

        try:
            return Config.from_dict(tomllib.loads(self.file.attrs["config"]))
        except (tomllib.TOMLDecodeError, KeyError, TypeError) as err:
            raise InputError(f"run file {self.path}: its stored config cannot be read ({err})") from None

    def __repr__(self) -> str:
        where = self.path or "in memory"
        if not self.file.id.valid:
            return f"<Run {where} (closed)>"
        config = self.config
        state = "complete" if self.complete else "incomplete"
        return (f"<Run {where}: {state}, {self._committed} committed checkpoints, "
                f"{config.run.seeds} seeds, depth {config.model.depth}, "
                f"{config.integrator.method}>")

    def checkpoint(self, name: str) -> np.ndarray:
        """Committed rows of ``/checkpoints/name``."""
        return np.asarray(self.file["checkpoints"][name][: self._committed])

    def __getattr__(self, name):
        if name in ("t", "loss", "theta", "u", "invariant_drift", "nfev", "status", "t_seed"):
            if name not in self.file["checkpoints"]:
                raise AttributeError(f"run has no /checkpoints/{name} (save_layers was false?)")
            return self.checkpoint(name)
        if name in ("X", "y", "theta_star"):
            key = f"problem/{name}"
            return np.asarray(self.file[key]) if key in self.file else None
        if name == "u0":
            return np.asarray(self.file["init/u"])
        raise AttributeError(name)

    def max_invariant_drift(self) -> np.ndarray:
        """Per seed, the largest invariant drift over the committed checkpoints (NaN rows, e.g.
        of a diverged seed, are skipped), shape (S,): what ``ddln run`` and ``ddln analyze``
        print as "max drift"."""
        drift = self.checkpoint("invariant_drift")
        finite_or_inf = np.where(np.isnan(drift), -np.inf, drift)
        out = finite_or_inf.max(axis=0) if drift.shape[0] else np.full(drift.shape[1:], np.nan)
        return np.where(np.isneginf(out), np.nan, out)

    def state(self) -> tuple[int, dict[str, np.ndarray]]:
        """The integrator state to resume from: (index of the last committed checkpoint, arrays).

        That is the state of the last committed checkpoint, or a later one saved by a stop
        request before the next checkpoint (the newest valid slot that follows that checkpoint).
        """
        k = self._committed
        if k == 0:
            raise InputError(f"run file {self.path} has no committed checkpoint to resume from")
        g = _resume_slot(self.file, k)
        if g is None:
            raise InputError(f"run file {self.path}: no saved integrator state matches its last "
                             f"committed checkpoint {k - 1}")
        skip = ("checkpoint_index", "sequence")
        return k - 1, {name: np.asarray(ds) for name, ds in g.items() if name not in skip}

    def status_names(self) -> list[str]:
        """Status name of every seed at the last committed checkpoint."""
        return [STATUS_NAMES[int(s)] for s in self.checkpoint("status")[-1]] if self._committed else []

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _resume_slot(f: h5py.File, committed: int):
    """The state slot a resume continues from: the valid slot with the highest sequence number
    that follows checkpoint ``committed - 1`` (None if there is none)."""
    best = None
    for slot in range(STATE_SLOTS):
        g = f[f"state/slot{slot}"]
        seq = int(g["sequence"][0]) if "sequence" in g else -1
        if seq >= 0 and int(g["checkpoint_index"][0]) == committed - 1 and (best is None or seq > best[0]):
            best = (seq, g)
    return None if best is None else best[1]


def open_run(path: str | Path) -> Run:
    """Open a run file (complete, still being written, or killed) for reading."""
    f = open_h5(path)
    try:
        return Run(f, str(path))
    except Exception as err:  # noqa: BLE001 - a counter that cannot be read: a broken file
        f.close()
        raise InputError(f"run file {path}: the commit counter cannot be read ({err})") from None


def provenance(threads: int) -> dict:
    """Versions, threads and BLAS: what bit-identical resume depends on."""
    import numba
    import threadpoolctl

    from . import __version__

    blas = [{k: info.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
            for info in threadpoolctl.threadpool_info() if info.get("user_api") == "blas"]
    blas.sort(key=lambda info: json.dumps(info, sort_keys=True))  # load order varies by process
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        layer = str(numba.config.THREADING_LAYER)
    return {
        "ddln_fast_version": __version__,
        "numpy_version": np.__version__,
        "numba_version": numba.__version__,
        "h5py_version": h5py.__version__,
        "hdf5_version": h5py.version.hdf5_version,
        "threads": threads,
        "threading_layer": layer,
        "blas": json.dumps(blas),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
    }
