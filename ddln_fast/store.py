"""HDF5 storage of one run: the schema, a streaming writer and a reader.

Crash safety (DESIGN.md, "Storage design"): datasets along the checkpoint axis K grow one row
per checkpoint; the one-element dataset ``/checkpoints/committed`` is written LAST, after the
rows and the integrator state, and readers trust only rows below it. The integrator state is
double-buffered (``/state/slot0``, ``/state/slot1``): checkpoint k writes slot k % 2, so a crash
while writing it leaves the slot of the last committed checkpoint intact.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import fields
from pathlib import Path

import h5py
import numpy as np

from .config import Config
from .errors import InputError
from .integrators import STATUS_NAMES, SeedState
from .problem import Problem

SCHEMA_VERSION = 1
CHUNK_BYTES = 2 * 1024 * 1024
STATE_SLOTS = 2


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


class RunWriter:
    """Create a run file and stream checkpoints into it (emcee's HDFBackend, grown up)."""

    def __init__(self, file: h5py.File, path: str | None, swmr: bool):
        self.file = file
        self.path = path
        self.swmr = swmr
        self.committed = int(file["checkpoints/committed"][0])

    # -- creation -------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path | None, config: Config, problem: Problem, u0: np.ndarray,
               provenance: dict, state_shapes: dict[str, tuple]) -> "RunWriter":
        """Create every group and dataset (before SWMR starts, as SWMR requires).

        ``path=None`` keeps the file in memory (Python API without an output file).
        """
        if path is None:
            f = h5py.File(f"ddln-{uuid.uuid4().hex}.h5", "w", driver="core", backing_store=False)
            swmr = False
        else:
            swmr = config.run.swmr
            f = h5py.File(path, "w", libver="latest" if swmr else "earliest", track_order=True)
        try:
            cls._write_schema(f, config, problem, u0, provenance, state_shapes)
            if swmr:
                f.swmr_mode = True
        except BaseException:
            f.close()
            if path is not None:
                Path(path).unlink(missing_ok=True)
            raise
        return cls(f, None if path is None else str(path), swmr)

    @staticmethod
    def _write_schema(f, config, problem, u0, provenance, state_shapes):
        S, L, d = u0.shape
        dtype = np.dtype(config.run.dtype)
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["config"] = config.to_toml()
        f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        f.attrs["complete"] = False
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
        for name, (shape, dt) in per_checkpoint.items():
            chunks = _chunks(shape, np.dtype(dt).itemsize) if shape else (1024,)
            ds = c.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dt, chunks=chunks)
            for axis, label in enumerate(("checkpoint", *labels[name])):
                ds.dims[axis].label = label
        c.create_dataset("committed", data=np.zeros(1, dtype=np.int64))
        state = f.create_group("state")
        for slot in range(STATE_SLOTS):
            sg = state.create_group(f"slot{slot}")
            for name, (shape, dt) in state_shapes.items():
                sg.create_dataset(name, shape=shape, dtype=dt)
            sg.create_dataset("checkpoint_index", data=np.full(1, -1, dtype=np.int64))

    @classmethod
    def reopen(cls, path: str, swmr: bool) -> "RunWriter":
        """Open an interrupted run to append to it, dropping rows past the commit counter.

        A SWMR writer killed mid-run leaves the file flagged as open for writing; then the
        committed content is copied into a fresh file (read with SWMR) that replaces it.
        """
        try:
            f = h5py.File(path, "a", libver="latest" if swmr else "earliest")
        except OSError:
            _rebuild(path)
            f = h5py.File(path, "a", libver="latest" if swmr else "earliest")
        committed = int(f["checkpoints/committed"][0])
        for name, ds in f["checkpoints"].items():
            if name != "committed" and ds.shape[0] != committed:
                ds.resize(committed, axis=0)
        if swmr:
            f.swmr_mode = True
        return cls(f, path, swmr)

    # -- streaming ------------------------------------------------------------------------------
    def append(self, row: dict[str, np.ndarray], state: dict[str, np.ndarray]) -> None:
        """Write checkpoint number ``committed``: its rows, then the state, then the counter."""
        k = self.committed
        c = self.file["checkpoints"]
        for name, value in row.items():
            ds = c[name]
            ds.resize(k + 1, axis=0)
            ds[k] = value
        slot = self.file[f"state/slot{k % STATE_SLOTS}"]
        for name, value in state.items():
            slot[name][...] = value
        slot["checkpoint_index"][0] = k
        self.file.flush()
        c["committed"][0] = k + 1
        self.file.flush()
        self.committed = k + 1

    def finish(self, extra_attrs: dict | None = None) -> None:
        """Close, then mark the file complete (attributes are written outside SWMR mode)."""
        if self.path is None:
            self.file.attrs["complete"] = True
            for key, value in (extra_attrs or {}).items():
                self.file.attrs[key] = value
            return
        self.file.close()
        with h5py.File(self.path, "a") as f:
            f.attrs["complete"] = True
            for key, value in (extra_attrs or {}).items():
                f.attrs[key] = value

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()


def _rebuild(path: str) -> None:
    """Copy a run file that cannot be opened for writing (crashed SWMR writer) into a new one."""
    tmp = f"{path}.rebuild"
    with h5py.File(path, "r", swmr=True, libver="latest") as src, h5py.File(tmp, "w", libver="latest") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        for name in src:
            src.copy(src[name], dst, name=name)
    os.replace(tmp, path)


def open_h5(path: str | Path) -> h5py.File:
    """Open a run file for reading, also while it is being written (SWMR) or after a crash of a
    SWMR writer; raises InputError with one line for missing, foreign or broken files."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"run file {path} does not exist")
    if path.is_dir():
        raise InputError(f"run file {path} is a directory, expected an .h5 file")
    if not h5py.is_hdf5(path):
        raise InputError(f"run file {path} is not an HDF5 file")
    last_error = None
    for kwargs in ({}, {"swmr": True, "libver": "latest"}):
        try:
            f = h5py.File(path, "r", **kwargs)
        except OSError as err:
            last_error = err
            continue
        if "schema_version" not in f.attrs or "checkpoints/committed" not in f:
            f.close()
            raise InputError(f"run file {path} is not a ddln_fast run (no schema_version or commit counter)")
        return f
    raise InputError(f"run file {path} cannot be opened ({last_error})")


class Run:
    """A run file, read back: only committed checkpoints are visible.

    Attributes (numpy arrays, read on access): ``t`` (K,), ``loss`` (K, S), ``theta`` (K, S, d),
    ``u`` (K, S, L, d) when layers were saved, ``invariant_drift`` (K, S), ``nfev`` (K, S),
    ``status`` (K, S), ``t_seed`` (K, S); ``X``, ``y``, ``theta_star``, ``u0``; ``config``.
    """

    def __init__(self, file: h5py.File, path: str | None = None):
        self.file = file
        self.path = path

    def refresh(self) -> None:
        """See checkpoints committed since the file was opened (live runs, SWMR)."""
        if self.file.swmr_mode:
            for ds in self.file["checkpoints"].values():
                ds.refresh()

    @property
    def committed(self) -> int:
        return int(self.file["checkpoints/committed"][0])

    @property
    def complete(self) -> bool:
        return bool(self.file.attrs["complete"])

    @property
    def config(self) -> Config:
        import tomllib

        return Config.from_dict(tomllib.loads(self.file.attrs["config"]))

    def checkpoint(self, name: str) -> np.ndarray:
        """Committed rows of ``/checkpoints/name``."""
        k = self.committed
        return np.asarray(self.file["checkpoints"][name][:k])

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

    def state(self) -> tuple[int, dict[str, np.ndarray]]:
        """The integrator state of the last committed checkpoint: (checkpoint index, arrays)."""
        k = self.committed
        if k == 0:
            raise InputError(f"run file {self.path} has no committed checkpoint to resume from")
        slot = self.file[f"state/slot{(k - 1) % STATE_SLOTS}"]
        if int(slot["checkpoint_index"][0]) != k - 1:
            raise InputError(f"run file {self.path}: the saved state does not match the last checkpoint")
        return k - 1, {name: np.asarray(ds) for name, ds in slot.items()}

    def status_names(self) -> list[str]:
        return [STATUS_NAMES[int(s)] for s in self.checkpoint("status")[-1]] if self.committed else []

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_run(path: str | Path) -> Run:
    """Open a run file (complete, still being written, or killed) for reading."""
    return Run(open_h5(path), str(path))


def state_shapes(seeds: int, depth: int, dim: int, dtype, adaptive: bool) -> dict[str, tuple]:
    """Shapes and dtypes of everything needed to resume bit-identically."""
    shapes = {"U": ((seeds, depth, dim), dtype)}
    if adaptive:
        shapes["fsal"] = ((seeds, depth, dim), dtype)
    template = SeedState.fresh(seeds, 0.0)
    for f in fields(SeedState):
        value = getattr(template, f.name)
        shapes[f.name] = (value.shape, value.dtype)
    return shapes


def provenance(threads: int) -> dict:
    """Versions, threads and BLAS: what bit-identical resume depends on."""
    import numba
    import threadpoolctl

    from . import __version__

    blas = [{k: info.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
            for info in threadpoolctl.threadpool_info() if info.get("user_api") == "blas"]
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
