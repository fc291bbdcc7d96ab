"""Reading run files: :func:`open_run` and :class:`Run`, also while the file is being written
(SWMR) and after its writer was killed; only committed checkpoints are ever visible."""

from __future__ import annotations

import json
import time
from pathlib import Path

import h5py
import numpy as np

from ..config import Config
from ..controller import STATUS_NAMES
from ..errors import InputError, existing_file
from .safety import committed_count, reason, swmr_writer_flag
from .schema import CHECKPOINT_AXIS, FIELDS, STATE_SLOTS, field, is_dimension_only, present_fields


#: Opening a file that changes while it is looked at (a writer closing it rewrites the flags in
#: its superblock) is tried this many times before the failure is reported.
OPEN_ATTEMPTS = 5


def open_h5(path: str | Path) -> h5py.File:
    """Open a run file for reading, also while it is being written (SWMR) or after a crash of a
    SWMR writer; raises InputError with one line for missing, foreign or broken files.

    A reader can catch a writer in the middle of closing the file: the superblock then says
    "open for write" to the plain open and no longer says so to the SWMR check after it (or
    is being rewritten). An open that fails while the file changed is therefore tried again."""
    path = existing_file(path, "run file", "an .h5 file")
    for attempt in range(OPEN_ATTEMPTS - 1):
        before = _signature(path)
        try:
            return _open_once(path)
        except InputError:
            if _signature(path) == before:
                raise
        time.sleep(0.01 * (attempt + 1))
    return _open_once(path)


def _signature(path: Path) -> tuple:
    """What changes when a file is written: modification time and size."""
    try:
        st = path.stat()
    except OSError:
        return ()
    return st.st_mtime_ns, st.st_size


def _open_once(path: Path) -> h5py.File:
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as err:
        raise InputError(f"run file {path} cannot be read ({reason(err)})") from None
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
    text = " ".join(str(last_error).split())
    if "truncated file" in text:
        raise InputError(f"run file {path} is truncated (shorter than its own header says; "
                         f"an incomplete copy?): {text.split('(', 1)[-1].rstrip(')')}")
    raise InputError(f"run file {path} cannot be opened ({text})")


#: Run attribute -> dataset path, from the schema table.
ATTRIBUTES = {fd.run_attribute: fd.path for fd in FIELDS}


class Run:
    """A run file, read back: only committed checkpoints are visible.

    Attributes (numpy arrays, read on access), one per dataset of the schema table
    (:data:`ddln_fast.store.schema.FIELDS`): the checkpoint datasets by name, ``t`` (K,),
    ``loss`` (K, S), ``theta`` (K, S, d), ``u`` (K, S, L, d) when layers were saved,
    ``invariant_drift`` (K, S), ``nfev`` (K, S), ``status`` (K, S) (codes, names in
    :meth:`status_names` / the root attribute ``status_names``), ``t_seed`` (K, S) (each seed's
    time; the time it stopped, if it did); ``X``, ``y``, ``theta_star`` (None when unknown),
    ``u0``; and ``config``.

    K is the number of checkpoints committed when the file was opened or last
    :meth:`refresh`-ed: every array read in between has the same K, even while a writer appends.
    """

    def __init__(self, file: h5py.File, path: str | None = None):
        self.file = file
        self.path = path
        self._committed = committed_count(file["checkpoints/committed"])
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
            self._committed = committed_count(counter)
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
        path = ATTRIBUTES.get(name)
        if path is None or name.startswith("_"):
            raise AttributeError(name)
        if path not in self.file:
            if field(path).grows:
                raise AttributeError(f"run has no /{path} (save_layers was false?)")
            return None
        return self.checkpoint(field(path).name) if field(path).grows else np.asarray(self.file[path])

    def datasets(self) -> dict[str, h5py.Dataset]:
        """The data of the file by path (``checkpoints/loss``, ...), without the dimension
        markers and the integrator state."""
        found = {}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and not name.startswith("state/") and not is_dimension_only(obj):
                found[name] = obj

        self.file.visititems(visit)
        return found

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
        g = resume_slot(self.file, k)
        if g is None:
            raise InputError(f"run file {self.path}: no saved integrator state matches its last "
                             f"committed checkpoint {k - 1}")
        return k - 1, slot_arrays(g, self.file)

    def status_names(self) -> list[str]:
        """Status name of every seed at the last committed checkpoint."""
        return [STATUS_NAMES[int(s)] for s in self.checkpoint("status")[-1]] if self._committed else []

    def to_xarray(self):
        """The committed checkpoints and the data as an ``xarray.Dataset`` (needs xarray):
        dimensions named as in the file (``t``, ``seed``, ``layer``, ``coordinate``,
        ``sample``), ``t`` the coordinate of the checkpoint axis, the schema's meaning and units
        as attributes of each variable, and the run's config, status names and completeness as
        attributes of the dataset."""
        try:
            import xarray
        except ImportError:
            raise InputError("Run.to_xarray needs xarray: pip install xarray") from None
        t = self.t
        variables = {}
        for fd, _ in present_fields(self.file):
            if fd.path == "checkpoints/t":
                continue
            values = getattr(self, fd.run_attribute) if fd.run_attribute in ATTRIBUTES else self.checkpoint(fd.name)
            dims = tuple("t" if axis == CHECKPOINT_AXIS else axis for axis in fd.axes_for(values.ndim))
            attrs = {"long_name": fd.meaning, **({"units": fd.units} if fd.units else {})}
            if fd.name == "status":
                attrs.update(flag_values=np.arange(len(STATUS_NAMES)), flag_meanings=" ".join(STATUS_NAMES))
            variables[fd.run_attribute] = xarray.Variable(dims, values, attrs)
        t_field = field("checkpoints/t")
        coords = {"t": xarray.Variable(("t",), t, {"long_name": t_field.meaning, "units": t_field.units})}
        attrs = {"config": str(self.file.attrs["config"]), "complete": int(self.complete),
                 "committed_checkpoints": self._committed,
                 "status_names": json.dumps(list(STATUS_NAMES)), "source": str(self.path or "memory")}
        return xarray.Dataset(variables, coords, attrs)

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def resume_slot(f: h5py.File, committed: int):
    """The state slot a resume continues from: the valid slot with the highest sequence number
    that follows checkpoint ``committed - 1`` (None if there is none)."""
    best = None
    for slot in range(STATE_SLOTS):
        g = f[f"state/slot{slot}"]
        seq = int(g["sequence"][0]) if "sequence" in g else -1
        if seq >= 0 and int(g["checkpoint_index"][0]) == committed - 1 and (best is None or seq > best[0]):
            best = (seq, g)
    return None if best is None else best[1]


def slot_arrays(g: h5py.Group, f: h5py.File) -> dict[str, np.ndarray]:
    """The state arrays of a slot; an array the slot flags in ``from_rows`` is the checkpoint
    row it refers to (row ``checkpoint_index`` of its dataset)."""
    skip = ("checkpoint_index", "sequence", "from_rows")
    arrays = {name: np.asarray(ds) for name, ds in g.items() if name not in skip}
    if "from_rows" in g:
        index = int(g["checkpoint_index"][0])
        for (name, row), flag in zip(json.loads(g["from_rows"].attrs["names"]), g["from_rows"][()]):
            if flag:
                arrays[name] = np.asarray(f["checkpoints"][row][index])
    return arrays


def open_run(path: str | Path) -> Run:
    """Open a run file (complete, still being written, or killed) for reading."""
    f = open_h5(path)
    try:
        return Run(f, str(path))
    except Exception as err:  # noqa: BLE001 - a counter that cannot be read: a broken file
        f.close()
        raise InputError(f"run file {path}: the commit counter cannot be read ({err})") from None
