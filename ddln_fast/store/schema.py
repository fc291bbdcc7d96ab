"""The layout of a run file, in one table: every dataset, its axes, dtype, meaning and units.

The writer creates the datasets of :data:`FIELDS` that a run has, the reader (:class:`Run`)
exposes them as attributes, the tests check files against this table, and
:func:`attach_dimensions` turns the axis names into HDF5 dimension scales, so that netCDF
tools (xarray with h5netcdf, ``ncdump``) see named dimensions and ``t`` as the coordinate of
the checkpoint axis.

Dimensions (sizes S seeds, L layers, d coordinates, n samples, K checkpoints):

- ``checkpoint``: the growing axis of ``/checkpoints``; its coordinate is ``/checkpoints/t``
  (a dimension scale, so netCDF readers name this dimension ``t``);
- ``seed``, ``layer``, ``coordinate``, ``sample``: dimensions without coordinate values
  (empty datasets at the root marked as netCDF dimensions; they take no space in the file);
- ``counter``: the one element of ``/checkpoints/committed``.

Datasets that only some solvers or diagnostics have (the gain of depth-2 gradient descent, the
sharpness, ...) are not in the table: the solver declares them (``checkpoint_rows``), and the
writer marks each with its axis names (:func:`mark_extra_field`), so that the dimension scales
and the readers work from the file alone. ``/events`` holds datasets of fixed shape rewritten at
every checkpoint (the dual method's events).

Adding a dataset: append a :class:`Field` to :data:`FIELDS` (with ``when`` if only some runs
have it; a new axis name also needs its size in :meth:`Layout.size`). A checkpoint field (``checkpoints/NAME``) is then created with the file, grows one row
per checkpoint, and its row is the value ``NAME`` that the driver's checkpoint row holds (the
solver's :meth:`~ddln_fast.solver.Solver.checkpoint_values` may return it); the writer refuses
a row that lacks a field of the file or has a name that is not one. A field of ``/problem`` or
``/init`` is written when the file is created. Integrator state (``/state``) is not in this
table: its arrays are whatever the solver's ``state_arrays`` returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import json

import h5py
import numpy as np

#: 2: HDF5 dimension scales; ``/state/slotN/from_rows`` (a state array stored as a checkpoint
#: row). Files of version 1 are read, resumed and recovered as before.
SCHEMA_VERSION = 2

CHECKPOINT_AXIS = "checkpoint"
#: The dataset whose values are the coordinate of the checkpoint axis.
CHECKPOINT_COORDINATE = "checkpoints/t"
COUNTER_DIMENSION = "counter"
#: netCDF's mark of a dimension that is not a variable (netCDF-4 format specification; followed
#: by the size in ten characters), read by h5netcdf and netCDF-C.
NETCDF_DIMENSION_ONLY = b"This is a netCDF dimension but not a netCDF variable."


@dataclass(frozen=True)
class Layout:
    """What decides which datasets a run file has, and their sizes."""

    seeds: int
    depth: int
    dim: int
    samples: int
    per_seed_data: bool
    save_layers: bool
    theta_star: bool
    run_dtype: np.dtype
    #: the run's Config (for fields that exist only for some configs)
    config: object = None

    @classmethod
    def of(cls, config, problem) -> "Layout":
        """The layout of a run of ``config`` on ``problem`` (``depth``: the layer rows of the
        parametrization, L, 2L or 2)."""
        from ..parametrization import Parametrization

        layers = Parametrization.from_config(config).layer_count
        return cls(seeds=config.run.seeds, depth=layers, dim=problem.d, samples=problem.n,
                   per_seed_data=problem.per_seed, save_layers=config.run.save_layers,
                   theta_star=problem.theta_star is not None, run_dtype=np.dtype(config.run.dtype),
                   config=config)

    def size(self, axis: str) -> int:
        return {"seed": self.seeds, "layer": self.depth, "coordinate": self.dim,
                "sample": self.samples}[axis]


def always(layout: Layout) -> bool:
    return True


def with_layers(layout: Layout) -> bool:
    """``run.save_layers``: the layers at every checkpoint."""
    return layout.save_layers


def with_theta_star(layout: Layout) -> bool:
    """Data with a known planted vector."""
    return layout.theta_star


@dataclass(frozen=True)
class Field:
    """One dataset of a run file.

    ``axes`` name the dimensions (``checkpoint`` first for the growing datasets of
    ``/checkpoints``); ``per_seed_data``: a leading ``seed`` axis when every seed has its own
    data. ``dtype`` is a numpy dtype name or ``"run"`` (``run.dtype``: float64 or float32).
    ``attribute``: its name on :class:`~ddln_fast.store.reader.Run` (default: the last part
    of the path).
    """

    path: str
    axes: tuple[str, ...]
    dtype: str
    meaning: str
    units: str = ""
    when: Callable[[Layout], bool] = always
    per_seed_data: bool = False
    attribute: str = ""

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def group(self) -> str:
        return self.path.rsplit("/", 1)[0]

    @property
    def run_attribute(self) -> str:
        return self.attribute or self.name

    @property
    def grows(self) -> bool:
        """One row per checkpoint."""
        return self.axes[:1] == (CHECKPOINT_AXIS,)

    def axes_for(self, ndim: int) -> tuple[str, ...]:
        """The axis names of a dataset of this field with ``ndim`` axes (per-seed data has one
        more)."""
        if self.per_seed_data and ndim == len(self.axes) + 1:
            return ("seed", *self.axes)
        return self.axes

    def numpy_dtype(self, layout: Layout) -> np.dtype:
        return layout.run_dtype if self.dtype == "run" else np.dtype(self.dtype)

    def row_shape(self, layout: Layout) -> tuple[int, ...]:
        """Shape of one checkpoint's row (growing fields) or of the whole dataset."""
        axes = self.axes[1:] if self.grows else self.axes
        if self.per_seed_data and layout.per_seed_data:
            axes = ("seed", *axes)
        return tuple(layout.size(axis) for axis in axes)


FIELDS: tuple[Field, ...] = (
    Field("problem/X", ("sample", "coordinate"), "float64", "design matrix", per_seed_data=True),
    Field("problem/y", ("sample",), "float64", "targets", per_seed_data=True),
    Field("problem/theta_star", ("coordinate",), "float64", "planted vector (when known)",
          when=with_theta_star, per_seed_data=True),
    Field("init/u", ("seed", "layer", "coordinate"), "float64", "initial layers", attribute="u0"),
    Field("checkpoints/t", (CHECKPOINT_AXIS,), "float64", "checkpoint time", "flow time"),
    Field("checkpoints/t_seed", (CHECKPOINT_AXIS, "seed"), "float64",
          "flow time of each seed's state (the time it stopped, if it did)", "flow time"),
    Field("checkpoints/loss", (CHECKPOINT_AXIS, "seed"), "float64",
          "loss ||X theta - y||^2 / (2 n) of each seed"),
    Field("checkpoints/theta", (CHECKPOINT_AXIS, "seed", "coordinate"), "run",
          "effective parameter theta = u^1 * ... * u^L"),
    Field("checkpoints/u", (CHECKPOINT_AXIS, "seed", "layer", "coordinate"), "run", "layers",
          when=with_layers),
    Field("checkpoints/invariant_drift", (CHECKPOINT_AXIS, "seed"), "float64",
          "largest change of any (u^j_i)^2 - (u^k_i)^2 since the initialization"),
    Field("checkpoints/nfev", (CHECKPOINT_AXIS, "seed"), "int64",
          "gradient evaluations so far", "evaluations"),
    Field("checkpoints/status", (CHECKPOINT_AXIS, "seed"), "int8",
          "seed status code (names in the attribute names)"),
)

#: Root attributes: name -> meaning. Every attribute a run file's root may carry is here (a
#: test checks it); the writer creates them before SWMR starts, with the placeholder values of
#: PLACEHOLDERS for those that get their value when the run ends (changed in place, which SWMR
#: allows), and atomic copies add the others to closed files (extensions, sweep_*).
ROOT_ATTRIBUTES = {
    "schema_version": "version of this layout",
    "config": "the resolved config (TOML)",
    "created": "creation time (ISO 8601)",
    "complete": "whether the run reached its end",
    "wall_seconds": "wall time of the run (NaN until it ends)",
    "status_names": "JSON list: status code -> name",
    "ddln_fast_version": "provenance: ddln_fast's version",
    "numpy_version": "provenance: numpy's version",
    "numba_version": "provenance: Numba's version",
    "h5py_version": "provenance: h5py's version",
    "hdf5_version": "provenance: the HDF5 library's version",
    "threads": "provenance: Numba and BLAS threads of the run",
    "threading_layer": "provenance: Numba's threading layer",
    "blas": "provenance: JSON list of the BLAS libraries (API, version, kernel architecture)",
    "hostname": "provenance: the machine",
    "pid": "provenance: the writing process",
    "parametrization": "the model: product, difference or power",
    "power": "D of the power parametrization (0 for the others)",
    "layer_axis": "what the layer axis of the layers holds (the halves of difference and power)",
    "random_streams": "sgd and label noise: the seed material and the draw protocol (JSON)",
    "dual_state": "dual method: the state it integrates (nu in R^n, or mu = Q^T nu in R^d when d < n)",
    "extensions": "JSON list of the extensions of a finished run (written by a resume that "
                  "relaxed t_end, max_steps or loss_tol)",
    "sweep_task": "sweep: the task id",
    "sweep_seconds": "sweep: wall time of the task's last attempt",
    "sweep_threads": "sweep: threads of the task",
    "sweep_summary": "sweep: the task's summary row (JSON)",
}
PLACEHOLDERS = {"complete": False, "wall_seconds": np.nan}

#: State arrays that may be stored as the checkpoint row they equal: state name -> checkpoint
#: field name. At a checkpoint the layers of the state are the row ``u`` just written (and the
#: theta cache of a fixed-step method the row ``theta``), so the state refers to it instead of
#: holding a second copy (``/state/slotN/from_rows``).
STATE_FROM_ROWS = {"U": "u", "theta_cache": "theta"}
#: The integrator-state slots (double buffering, see the writer).
STATE_SLOTS = 2


def field(path: str) -> Field:
    """The field of ``path`` (KeyError if it is not in the table)."""
    for f in FIELDS:
        if f.path == path:
            return f
    raise KeyError(path)


def fields(layout: Layout, group: str | None = None) -> list[Field]:
    """The fields a run of ``layout`` has (of one group if given), in table order."""
    return [f for f in FIELDS if f.when(layout) and (group is None or f.group == group)]


def checkpoint_fields(layout: Layout) -> list[Field]:
    return fields(layout, "checkpoints")


#: Attribute of a checkpoint dataset outside the table: its axis names (JSON list).
AXES_ATTRIBUTE = "axes"


def mark_extra_field(ds: h5py.Dataset, axes: tuple[str, ...], meaning: str) -> None:
    """Describe a checkpoint dataset that is not in :data:`FIELDS` in the file itself."""
    ds.attrs["long_name"] = meaning
    ds.attrs[AXES_ATTRIBUTE] = json.dumps(list(axes))


def present_fields(f: h5py.File) -> list[tuple[Field, h5py.Dataset]]:
    """The datasets of ``f`` with their fields: those of the table, then the extra checkpoint
    datasets described by :func:`mark_extra_field`."""
    present = [(fd, f[fd.path]) for fd in FIELDS if fd.path in f]
    group = f.get("checkpoints")
    for ds in group.values() if group is not None else ():
        if isinstance(ds, h5py.Dataset) and AXES_ATTRIBUTE in ds.attrs:
            axes = tuple(json.loads(ds.attrs[AXES_ATTRIBUTE]))
            present.append((Field(ds.name.lstrip("/"), axes, ds.dtype.name, str(ds.attrs.get("long_name", ""))), ds))
    return present


# -- dimension scales -----------------------------------------------------------------------------
def attach_dimensions(f: h5py.File) -> None:
    """Make the axis names of every dataset of ``f`` with a field HDF5 dimension scales (and
    labels).

    Reads only the file: the sizes come from its datasets, so it also serves a copy made by
    recovery. Must run before SWMR starts (it creates datasets and attributes).
    """
    present = present_fields(f)
    sizes: dict[str, int] = {}
    for fd, ds in present:
        for axis, size in zip(fd.axes_for(ds.ndim), ds.shape):
            if axis != CHECKPOINT_AXIS:
                sizes.setdefault(axis, size)
    scales = {name: _dimension_only(f, name, size) for name, size in sizes.items()}
    coordinate = f.get(CHECKPOINT_COORDINATE)
    if coordinate is not None and not h5py.h5ds.is_scale(coordinate.id):
        coordinate.make_scale(coordinate.name.rsplit("/", 1)[-1])
    scales[CHECKPOINT_AXIS] = coordinate
    for fd, ds in present:
        for axis, name in enumerate(fd.axes_for(ds.ndim)):
            ds.dims[axis].label = name
            if ds.name != getattr(scales[name], "name", None):  # a scale is not attached to itself
                ds.dims[axis].attach_scale(scales[name])
    counter = f.get("checkpoints/committed")
    if counter is not None:
        counter.dims[0].attach_scale(_dimension_only(f, COUNTER_DIMENSION, counter.shape[0]))


def _dimension_only(f: h5py.File, name: str, size: int) -> h5py.Dataset:
    """The root dataset ``name`` marking a dimension of ``size`` without coordinate values
    (never written: its storage is never allocated)."""
    if name in f:
        return f[name]
    ds = f.create_dataset(name, shape=(size,), dtype="f4")
    ds.make_scale(NETCDF_DIMENSION_ONLY + f"{size:10d}".encode())
    return ds


def is_dimension_only(ds: h5py.Dataset) -> bool:
    """Whether ``ds`` is one of the dimension markers made by :func:`attach_dimensions`."""
    name = ds.attrs.get("NAME", b"")
    return isinstance(name, bytes) and name.startswith(NETCDF_DIMENSION_ONLY)


#: Attributes of the dimension-scale machinery (HDF5 DS specification): object references
#: into one file, rebuilt by :func:`attach_dimensions` in a copy rather than copied.
DIMENSION_SCALE_ATTRIBUTES = frozenset({"CLASS", "NAME", "DIMENSION_LIST", "REFERENCE_LIST",
                                        "DIMENSION_LABELS"})


__all__ = ["SCHEMA_VERSION", "Layout", "Field", "FIELDS", "ROOT_ATTRIBUTES", "PLACEHOLDERS",
           "STATE_FROM_ROWS", "STATE_SLOTS", "field", "fields", "checkpoint_fields",
           "attach_dimensions", "mark_extra_field", "present_fields", "AXES_ATTRIBUTE", "is_dimension_only", "DIMENSION_SCALE_ATTRIBUTES",
           "always", "with_layers", "with_theta_star"]
