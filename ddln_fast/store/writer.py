"""The crash-safe streaming writer of run files, and the atomic edits of a closed run file.

Crash safety (the commit-counter pattern of emcee's HDFBackend, with its pitfall fixed: every
cumulative quantity lives in the rows or the state, never in a running total updated before
the counter):

- Datasets along the checkpoint axis K grow one row per checkpoint; the one-element dataset
  ``/checkpoints/committed`` is written LAST, after the rows and the integrator state, and
  readers and resume trust only rows below it.
- The integrator state is double-buffered (``/state/slot0``, ``/state/slot1``). A new state goes
  to the slot that does not hold the latest one: its ``sequence`` is set to -1 (invalid), the
  arrays are written, then ``sequence`` gets the next number. Resume takes the valid slot with
  the highest sequence whose ``checkpoint_index`` is ``committed - 1``; at every instant at least
  one slot qualifies. A state array equal to a row of the same checkpoint (the layers ``U`` and
  the row ``u``) is not written twice: the slot's ``from_rows`` flag says to read that row.
  Besides the state of each checkpoint, a stop request (SIGINT/SIGTERM) between checkpoints
  saves the state where it is (a safe point inside a long interval), every array in the slot.
- Each phase ends with a flush, so the file's bytes follow the order above; a SIGKILL (which
  loses no written bytes, only the process) leaves every committed checkpoint readable.
- The file is created under ``OUT.h5.creating`` and renamed once its layout is complete, so
  ``OUT.h5`` never holds a half-made layout. Every later write access happens in SWMR mode
  (measured, HDF5 2.0: a writer killed in SWMR mode leaves a file that SWMR readers open, but a
  latest-format file killed while open in plain 'a' mode cannot be opened at all without
  h5clear). So ``complete`` is set in place (``attrs.modify``, same size) before the SWMR writer
  closes, and attributes are added to a closed file only by an atomic copy (:func:`annotate`).

Writing runs in one background thread, so that the integrator computes the next interval
while a checkpoint is written: h5py releases the GIL inside H5Dwrite and H5Fflush (h5py >= 3.0;
measured here: a pure-Python loop keeps running at 2/3 of its speed on a loaded 2-core machine
while another thread writes 4 MB rows and flushes back to back). :meth:`RunWriter.append`
copies the row and the state into the writer's buffers (the integrator goes on changing its own
arrays) and hands them to the thread; one checkpoint is in flight at most, so the next
``append`` first waits for it. The thread does exactly the sequence above, in the same order,
so a kill at any instant leaves the file as the synchronous writer would have.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np

from ..config import Config
from ..controller import STATUS_NAMES
from ..errors import InputError
from ..problem import Problem
from .safety import (CHUNK_BYTES, SWMR_LIBVER, WriterLock, check_not_being_written, close_quietly,
                     committed_count, fence, reason, rebuild, recover)
from .schema import (CHECKPOINT_AXIS, PLACEHOLDERS, SCHEMA_VERSION, STATE_FROM_ROWS, STATE_SLOTS,
                     Layout, attach_dimensions, checkpoint_fields, fields, mark_extra_field)


class OutputError(OSError):
    """The output file cannot be written (disk full, permissions, I/O error); earlier committed
    checkpoints stay intact. The CLI reports it on one line with exit code 1."""


def chunks_for(row_shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunks of a growing dataset: one checkpoint along K; the rest split over the leading
    axis (seeds) and the last axis (coordinates) to at most about CHUNK_BYTES per chunk."""
    budget = max(1, CHUNK_BYTES // itemsize)
    shape = list(row_shape)
    if not shape:
        return (1024,)  # a scalar per checkpoint (t): many rows share a chunk
    middle = int(np.prod(shape[1:-1])) if len(shape) > 2 else 1
    if len(shape) == 1:
        return (1, min(shape[0], budget))
    last = min(shape[-1], max(1, budget // middle))
    lead = max(1, min(shape[0], budget // (middle * last)))
    return (1, lead, *shape[1:-1], last)


def swmr_write_open(path: str) -> h5py.File:
    """Open an existing latest-format file for writing directly in SWMR mode (h5py's File()
    would open it in plain mode first, a window in which a kill leaves it unopenable)."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_fclose_degree(h5py.h5f.CLOSE_STRONG)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_V110, h5py.h5f.LIBVER_V110)
    fid = h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDWR | h5py.h5f.ACC_SWMR_WRITE, fapl=fapl)
    return h5py.File(fid)


def write_layout(f: h5py.File, config: Config, problem: Problem, u0: np.ndarray, provenance: dict,
                 state_shapes: dict[str, tuple], extra_rows: dict[str, tuple] | None = None,
                 fixed_shapes: dict[str, tuple] | None = None) -> None:
    """Create every group, dataset and attribute of a new run file (before SWMR starts, as
    SWMR requires): the fields of the schema, the commit counter, the state slots, and the
    dimension scales.

    Parameters
    ----------
    u0 : ndarray of shape (S, P, d)
        P layer rows (L for the product parametrization, 2L or 2 for the others).
    state_shapes : dict
        name -> (shape, dtype) of the solver's state arrays.
    extra_rows : dict, optional
        More checkpoint datasets that only some runs have (a solver's or a diagnostic's), name
        -> (shape of one row, dtype, axis names, meaning); see :func:`schema.extra_field`.
    fixed_shapes : dict, optional
        Datasets of ``/events``, name -> (shape, dtype): NaN-filled (0 for integers) and
        rewritten in place at every checkpoint (the dual method's events).
    """
    layout = Layout.of(config, problem)
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["config"] = config.to_toml()
    f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for key, value in PLACEHOLDERS.items():  # in SWMR mode they may only be modified in place
        f.attrs[key] = value
    for key, value in provenance.items():
        f.attrs[key] = value
    f.attrs["status_names"] = json.dumps(list(STATUS_NAMES))
    values = {"problem/X": problem.X, "problem/y": problem.y, "problem/theta_star": problem.theta_star,
              "init/u": u0}
    for fd in fields(layout):
        group = f.require_group(fd.group)
        dtype = fd.numpy_dtype(layout)
        shape = fd.row_shape(layout)
        if fd.grows:
            ds = group.create_dataset(fd.name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
                                      chunks=chunks_for(shape, dtype.itemsize))
        else:
            ds = group.create_dataset(fd.name, data=np.asarray(values[fd.path], dtype=dtype))
        ds.attrs["long_name"] = fd.meaning
        if fd.units:
            ds.attrs["units"] = fd.units
    for name, (shape, dtype, axes, meaning) in (extra_rows or {}).items():
        dtype, shape = np.dtype(dtype), tuple(shape)
        ds = f["checkpoints"].create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
                                             chunks=chunks_for(shape, dtype.itemsize))
        mark_extra_field(ds, (CHECKPOINT_AXIS, *axes), meaning)
    if fixed_shapes:
        events = f.create_group("events")
        for name, (shape, dtype) in fixed_shapes.items():
            fill = np.nan if np.dtype(dtype).kind == "f" else 0
            events.create_dataset(name, shape=shape, dtype=dtype, fillvalue=fill)
    status = f["checkpoints/status"]
    status.attrs["names"] = json.dumps(list(STATUS_NAMES))
    # CF conventions: what netCDF tools show for a coded variable
    status.attrs["flag_values"] = np.arange(len(STATUS_NAMES), dtype=np.int8)
    status.attrs["flag_meanings"] = " ".join(STATUS_NAMES)
    f["checkpoints"].create_dataset("committed", data=np.zeros(1, dtype=np.int64))
    f["checkpoints/committed"].attrs["long_name"] = "checkpoints whose rows are complete"
    aliases = {name: row for name, row in STATE_FROM_ROWS.items()
               if name in state_shapes and f"checkpoints/{row}" in f
               and np.dtype(state_shapes[name][1]) == f[f"checkpoints/{row}"].dtype
               and tuple(state_shapes[name][0]) == f[f"checkpoints/{row}"].shape[1:]}
    state = f.create_group("state")
    for slot in range(STATE_SLOTS):
        sg = state.create_group(f"slot{slot}")
        for name, (shape, dt) in state_shapes.items():
            sg.create_dataset(name, shape=shape, dtype=dt)
        sg.create_dataset("checkpoint_index", data=np.full(1, -1, dtype=np.int64))
        sg.create_dataset("sequence", data=np.full(1, -1, dtype=np.int64))
        if aliases:
            flags = sg.create_dataset("from_rows", data=np.zeros(len(aliases), dtype=np.int8))
            flags.attrs["names"] = json.dumps(list(aliases.items()))
    attach_dimensions(f)


def write_all(ds: h5py.Dataset, value, shape: tuple | None = None) -> None:
    """ds[...] = value through the low-level API (h5py's __setitem__ costs ~0.25 ms a call)."""
    shape = ds.shape if shape is None else shape
    data = np.asarray(value, dtype=ds.dtype)
    if data.shape != shape:
        data = np.broadcast_to(data, shape)
    ds.id.write(h5py.h5s.ALL, h5py.h5s.ALL, np.ascontiguousarray(data))


def write_row(ds: h5py.Dataset, k: int, data: np.ndarray) -> None:
    """ds[k] = data (row k along the checkpoint axis; ``data`` C-contiguous, of the dataset's
    dtype and row shape) through the low-level API."""
    data = data.reshape((1, *data.shape))
    file_space = ds.id.get_space()
    file_space.select_hyperslab((k,) + (0,) * (data.ndim - 1), data.shape)
    ds.id.write(h5py.h5s.create_simple(data.shape), file_space, data)


class Buffers:
    """Arrays the writer owns, one per name, of fixed dtype and shape: the values handed to
    :meth:`RunWriter.append` are copied (cast) into them, then written by the writer thread."""

    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}

    def copy(self, name: str, value, dtype: np.dtype, shape: tuple) -> np.ndarray:
        out = self.arrays.get(name)
        if out is None:
            out = self.arrays[name] = np.empty(shape, dtype=dtype)
        np.copyto(out, np.reshape(np.asarray(value), shape), casting="unsafe")
        return out


class RunWriter:
    """Stream checkpoints into a run file (see the module docstring).

    ``append``, ``save_state`` and ``finish`` return before the data is in the file; a write
    error is raised (as :class:`OutputError`) by the next call, or by :meth:`wait`.
    """

    def __init__(self, file: h5py.File, path: str | None, lock: WriterLock | None = None):
        self.file = file
        self.path = path
        self.lock = lock
        # Every dataset is opened once and kept open: no dataset closes (and flushes) happen
        # between the explicit flushes, so a write error surfaces there, in order.
        self.rows = {name: ds for name, ds in file["checkpoints"].items() if name != "committed"}
        self.counter = file["checkpoints/committed"]
        #: datasets of fixed shape rewritten at every checkpoint (the dual method's /events)
        self.fixed = dict(file["events"].items()) if "events" in file else {}
        self.slots = [dict(file[f"state/slot{slot}"].items()) for slot in range(STATE_SLOTS)]
        self.lengths = {name: ds.shape[0] for name, ds in self.rows.items()}
        self.row_shapes = {name: ds.shape[1:] for name, ds in self.rows.items()}
        flags = self.slots[0].get("from_rows")
        #: state name -> row name, in the order of the slots' ``from_rows`` flags
        self.aliases = dict(json.loads(flags.attrs["names"])) if flags is not None else {}
        self.state_names = [name for name in self.slots[0]
                            if name not in ("checkpoint_index", "sequence", "from_rows")]
        self.committed = committed_count(self.counter)
        self.latest_slot, self.sequence = None, -1
        for slot in range(STATE_SLOTS):
            seq = int(self.slots[slot]["sequence"][0])
            if seq > self.sequence:
                self.latest_slot, self.sequence = slot, seq
        self.fenced = False
        self.row_buffers, self.state_buffers = Buffers(), Buffers()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ddln-writer")
        self._pending: Future | None = None
        self._failure: OutputError | None = None

    # -- creation -------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path | None, config: Config, problem: Problem, u0: np.ndarray,
               provenance: dict, state_shapes: dict[str, tuple], extra_rows: dict[str, tuple] | None = None,
               fixed_shapes: dict[str, tuple] | None = None) -> "RunWriter":
        """Create the file under ``path.creating`` (the layout of :func:`write_layout`, which
        describes the arguments), then rename it to ``path``.

        ``path=None`` keeps the file in memory (Python API without an output file).
        """
        if path is None:
            f = h5py.File(f"ddln-{uuid.uuid4().hex}.h5", "w", driver="core", backing_store=False)
            write_layout(f, config, problem, u0, provenance, state_shapes, extra_rows, fixed_shapes)
            return cls(f, None)
        path = str(path)
        check_not_being_written(path)
        tmp = f"{path}.creating"
        swmr = config.run.swmr
        lock = None
        try:
            f = h5py.File(tmp, "w", libver=SWMR_LIBVER if swmr else "earliest", track_order=True)
        except OSError as err:
            raise OutputError(f"cannot create the output file {tmp}: {reason(err)}") from None
        try:
            write_layout(f, config, problem, u0, provenance, state_shapes, extra_rows, fixed_shapes)
            if swmr:
                f.swmr_mode = True
            f.flush()
            lock = WriterLock(tmp)
            os.replace(tmp, path)
        except BaseException as err:
            if lock is not None:
                lock.release()
            Path(tmp).unlink(missing_ok=True)
            if isinstance(err, (OSError, RuntimeError)) and not isinstance(err, InputError):
                fence(f)
                close_quietly(f)
                raise OutputError(f"cannot create the output file {path}: {reason(err)}") from None
            close_quietly(f)
            raise
        return cls(f, path, lock)

    @classmethod
    def reopen(cls, path: str, swmr: bool) -> "RunWriter":
        """Open an interrupted run to append to it.

        A file left by a killed writer (flagged as open for writing, or with rows past the
        commit counter) is first copied into a fresh one that replaces it (:func:`recover`).
        """
        recover(path)
        try:
            f = swmr_write_open(path) if swmr else h5py.File(path, "r+")
        except OSError as err:
            raise InputError(f"run file {path} cannot be opened to resume ({reason(err)})") from None
        try:
            lock = WriterLock(path)
        except BaseException:
            f.close()
            raise
        return cls(f, path, lock)

    # -- the caller's side ------------------------------------------------------------------------
    def append(self, row: dict, state: dict, fixed: dict | None = None) -> None:
        """Queue checkpoint number ``committed`` (after any queued before): its rows (and the
        ``fixed`` datasets of ``/events``), then the state, then the counter. All are copied:
        the caller may change its arrays on return.

        Parameters
        ----------
        row : dict
            One value per dataset of ``/checkpoints`` (without ``committed``), each of the
            dataset's row shape: ``t`` a scalar, ``loss`` (S,), ``theta`` (S, d), ...
        state : dict
            The solver's state arrays (its ``state_arrays()``).
        fixed : dict, optional
            The new values of datasets of ``/events``, each of the dataset's shape.
        """
        self.wait()
        if set(row) != set(self.rows):
            missing, extra = sorted(set(self.rows) - set(row)), sorted(set(row) - set(self.rows))
            raise ValueError(f"checkpoint row names differ from the datasets of the file: missing "
                             f"{missing}, not in the file {extra} (a new dataset is a Field of "
                             f"ddln_fast/store/schema.py)")
        rows = {name: self.row_buffers.copy(name, value, self.rows[name].dtype, self.row_shapes[name])
                for name, value in row.items()}
        events = {name: self.row_buffers.copy(f"events/{name}", value, self.fixed[name].dtype,
                                              self.fixed[name].shape)
                  for name, value in (fixed or {}).items()}
        from_rows = [state[name] is row[row_name] or _same_bytes(state[name], rows[row_name])
                     for name, row_name in self.aliases.items()]
        skip = {name for name, same in zip(self.aliases, from_rows) if same}
        arrays = self._copy_state(state, skip)
        self._submit(self._write_checkpoint, rows, arrays, np.array(from_rows, dtype=np.int8), events)

    def save_state(self, state: dict) -> None:
        """Queue the integrator state between checkpoints (a stop request's safe point); resume
        continues from it towards checkpoint ``committed``."""
        self.wait()
        arrays = self._copy_state(state, set())
        self._submit(self._write_state_only, arrays)

    def wait(self) -> None:
        """Return once everything queued is in the file; raise the write error if one
        happened."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        if self._failure is not None:
            raise self._failure

    @property
    def failed(self) -> bool:
        """Whether a queued write failed (then every later call raises)."""
        return self._failure is not None

    def finish(self, extra_attrs: dict | None = None) -> None:
        """Mark the run complete in place (still in SWMR mode, see the module docstring), and
        close the file once everything is written."""
        self.wait()
        self._submit(self._mark_complete, extra_attrs or {})
        try:
            self.wait()
        finally:
            if self.path is not None:
                self.close()
            else:
                self._thread.shutdown(wait=True)

    def close(self) -> None:
        """Wait for queued writes, close the file and unlock (an in-memory file is kept open:
        it is the run's only copy)."""
        if self._pending is not None:
            self._pending.exception()  # wait; a failure was recorded and fenced
            self._pending = None
        self._thread.shutdown(wait=True)
        if self.path is not None or self.fenced:
            close_quietly(self.file)
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # -- the writer thread's side -----------------------------------------------------------------
    def _copy_state(self, state: dict, skip: set) -> dict:
        if set(state) != set(self.state_names):
            raise ValueError(f"state arrays {sorted(state)} differ from the file's {sorted(self.state_names)}")
        slot = self.slots[0]
        return {name: self.state_buffers.copy(name, value, slot[name].dtype, slot[name].shape)
                for name, value in state.items() if name not in skip}

    def _submit(self, job, *args) -> None:
        self._pending = self._thread.submit(self._guarded, job, *args)

    def _guarded(self, job, *args) -> None:
        """Run a write job unless an earlier one failed; a failure fences the file and is kept
        for the caller's next call."""
        if self._failure is not None:
            return
        try:
            job(*args)
        except (OSError, RuntimeError) as err:  # h5py raises RuntimeError for a failed flush
            what = {self._write_checkpoint: f"checkpoint {self.committed}",
                    self._write_state_only: "the integrator state",
                    self._mark_complete: "the completion mark"}.get(job, "the run file")
            self._failure = self._output_error(err, what)

    def _flush(self) -> None:
        self.file.flush()

    def _write_checkpoint(self, rows: dict, state: dict, from_rows: np.ndarray, events: dict) -> None:
        k = self.committed
        for name, data in rows.items():
            ds = self.rows[name]
            if self.lengths[name] < k + 1:
                ds.resize(k + 1, axis=0)
                self.lengths[name] = k + 1
            write_row(ds, k, data)
        for name, data in events.items():
            write_all(self.fixed[name], data)
        self._write_state(state, k, from_rows)
        write_all(self.counter, k + 1)
        self._flush()
        self.committed = k + 1

    def _write_state_only(self, state: dict) -> None:
        if self.committed == 0:
            return
        self._write_state(state, self.committed - 1, np.zeros(len(self.aliases), dtype=np.int8))

    def _write_state(self, state: dict, checkpoint_index: int, from_rows: np.ndarray) -> None:
        """Phases 1-3 of a state write (the rows of its checkpoint may precede phase 1)."""
        slot_number = 0 if self.latest_slot is None else 1 - self.latest_slot
        slot = self.slots[slot_number]
        write_all(slot["sequence"], -1)
        self._flush()
        for name, value in state.items():
            write_all(slot[name], value)
        if self.aliases:
            write_all(slot["from_rows"], from_rows)
        write_all(slot["checkpoint_index"], checkpoint_index)
        self._flush()
        write_all(slot["sequence"], self.sequence + 1)
        self._flush()
        self.latest_slot, self.sequence = slot_number, self.sequence + 1

    def _mark_complete(self, extra_attrs: dict) -> None:
        self.file.attrs.modify("complete", True)
        for key, value in extra_attrs.items():
            self.file.attrs.modify(key, value)
        self._flush()

    def _output_error(self, err: Exception, what: str) -> OutputError:
        """Fence the file off (no later byte from HDF5 reaches it: after a failed write, HDF5
        would retry its dirty metadata on close, and a partly successful retry could damage the
        committed part), then describe the failure on one line."""
        if self.path is not None:
            fence(self.file)
            self.fenced = True
        return OutputError(f"cannot write {what} to {self.path or 'memory'}: {reason(err)}; the "
                           f"{self.committed} committed checkpoints are intact (fix that, e.g. free "
                           f"space, then resume the run)")


def _same_bytes(value, buffer: np.ndarray) -> bool:
    """Whether ``value`` equals ``buffer`` bit for bit (same dtype and shape)."""
    value = np.asarray(value)
    return (value.dtype == buffer.dtype and value.shape == buffer.shape
            and np.array_equal(value.reshape(-1).view(np.uint8), buffer.reshape(-1).view(np.uint8)))


# -- atomic edits of a closed run file ------------------------------------------------------------
def annotate(path: str | Path, attrs: dict) -> None:
    """Add (or replace) root attributes of a run file that no process is writing, atomically:
    a copy with the attributes is renamed over the file (a kill leaves the old file or the new
    one; a closed SWMR file never gets new attributes in place). Costs one copy of the file."""
    path = str(path)
    lock = WriterLock(path)
    try:
        rebuild(path, lambda f: f.attrs.update(attrs))
    finally:
        lock.release()


def extend_run(path: str | Path, config: Config, record: dict, revive: np.ndarray) -> None:
    """Prepare a run file to continue under relaxed limits (a larger t_end or max_steps, a
    smaller loss_tol), atomically (a copy renamed over it): the config becomes ``config``,
    ``complete`` false, ``record`` is appended to the JSON list in the root attribute
    ``extensions``, and the seeds in ``revive`` (shape (S,), bool) are set running in the state
    the run resumes from."""
    from .reader import resume_slot

    path = str(path)
    lock = WriterLock(path)

    def change(f):
        f.attrs["config"] = config.to_toml()
        f.attrs["complete"] = False
        history = json.loads(f.attrs.get("extensions", "[]"))
        f.attrs["extensions"] = json.dumps([*history, record])
        slot = resume_slot(f, committed_count(f["checkpoints/committed"]))
        status, t_stop = slot["status"][()], slot["t_stop"][()]
        status[revive] = STATUS_NAMES.index("running")
        t_stop[revive] = np.nan
        slot["status"][...] = status
        slot["t_stop"][...] = t_stop

    try:
        rebuild(path, change)
    finally:
        lock.release()
