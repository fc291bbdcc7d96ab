"""The HDF5 file of a run against its documented layout.

Reference: the list of required names, shapes, dtypes, attributes and axis labels of the
interface specification ("HDF5 file of one run"), copied into REQUIRED below; the package's
schema table (ddln_fast.store.schema.FIELDS) must contain it, and every file must hold what
that table says; an independent reader (plain h5py in another process, opened with
swmr=True) for reading while the run is written; xarray with h5netcdf for the dimension scales.
Stored values are checked against numpy recomputations (loss of the stored theta, theta as the
product of the stored layers), never against earlier outputs of the code.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import tomllib

import h5py
import numpy as np
import pytest

import ddln_fast
from ddln_fast import Config, open_run, simulate
from ddln_fast.simulate import run_simulation
from references import loss

S, L, D, N, K = 3, 2, 12, 10, 5

# The interface specification: name -> (shape, dtype kind, axis labels). "run" dtype: float64 or float32 as
# run.dtype says; "f8": always float64; "int": any integer type.
REQUIRED = {
    "problem/X": ((N, D), "f8", ("sample", "coordinate")),
    "problem/y": ((N,), "f8", ("sample",)),
    "problem/theta_star": ((D,), "f8", ("coordinate",)),
    "init/u": ((S, L, D), "f8", ("seed", "layer", "coordinate")),
    "checkpoints/t": ((K,), "f8", ("checkpoint",)),
    "checkpoints/loss": ((K, S), "f8", ("checkpoint", "seed")),
    "checkpoints/theta": ((K, S, D), "run", ("checkpoint", "seed", "coordinate")),
    "checkpoints/u": ((K, S, L, D), "run", ("checkpoint", "seed", "layer", "coordinate")),
    "checkpoints/invariant_drift": ((K, S), "f8", ("checkpoint", "seed")),
    "checkpoints/nfev": ((K, S), "int", ("checkpoint", "seed")),
}
PER_SEED_SHAPES = {"problem/X": (S, N, D), "problem/y": (S, N), "problem/theta_star": (S, D)}
PER_SEED_LABELS = {"problem/X": ("seed", "sample", "coordinate"), "problem/y": ("seed", "sample"),
                   "problem/theta_star": ("seed", "coordinate")}


def _config(make_config, dtype="float64", per_seed_data=False, save_layers=True):
    return make_config({"problem.n": N, "problem.d": D, "model.depth": L, "run.seeds": S,
                        "run.checkpoints": K, "run.dtype": dtype, "run.save_layers": save_layers,
                        "problem.per_seed_data": per_seed_data,
                        # float32 cannot resolve rtol 1e-10; 1e-6 is what it can do
                        "integrator.rtol": 1e-10 if dtype == "float64" else 1e-6})


@pytest.mark.parametrize("dtype,per_seed_data", [("float64", False), ("float32", True)])
def test_file_has_every_required_name_shape_dtype_and_label(make_config, tmp_path, dtype, per_seed_data):
    config = _config(make_config, dtype, per_seed_data)
    path = tmp_path / "run.h5"
    simulate(config, out=path).close()
    with h5py.File(path, "r") as f:
        for name, (shape, kind, labels) in REQUIRED.items():
            if per_seed_data and name in PER_SEED_SHAPES:
                shape, labels = PER_SEED_SHAPES[name], PER_SEED_LABELS[name]
            assert name in f, f"missing /{name}"
            ds = f[name]
            assert ds.shape == shape, f"/{name}: shape {ds.shape}, expected {shape}"
            if kind == "int":
                assert np.issubdtype(ds.dtype, np.integer), f"/{name}: dtype {ds.dtype}"
            else:
                expected = np.dtype(dtype) if kind == "run" else np.dtype(np.float64)
                assert ds.dtype == expected, f"/{name}: dtype {ds.dtype}, expected {expected}"
            assert tuple(dim.label for dim in ds.dims) == labels, f"/{name}: axis labels"
            if name.startswith("checkpoints/"):
                # grows along K: resizable and chunked; one checkpoint per chunk for per-seed rows
                # (docs/design.md, "Chunks"; the scalar times share a chunk)
                assert ds.maxshape[0] is None and ds.chunks is not None
                assert ds.ndim == 1 or ds.chunks[0] == 1
        assert isinstance(f["state"], h5py.Group) and len(f["state"]) > 0

        attrs = f.attrs
        assert int(attrs["schema_version"]) >= 1
        assert attrs["ddln_fast_version"] == ddln_fast.__version__
        assert bool(attrs["complete"]) is True
        datetime.datetime.fromisoformat(str(attrs["created"]))  # an ISO time
        stored = Config.from_dict(tomllib.loads(attrs["config"]))
        assert stored == config  # the full resolved config, every key

        # stored values are what they claim to be
        t = f["checkpoints/t"][:]
        np.testing.assert_allclose(t, np.linspace(0, config.integrator.t_end, K), rtol=1e-15)
        u, theta = f["checkpoints/u"][:], f["checkpoints/theta"][:]
        np.testing.assert_array_equal(u[0], f["init/u"][:].astype(dtype))
        np.testing.assert_allclose(theta, np.prod(u.astype(np.float64), axis=2),
                                   rtol=4 * np.finfo(dtype).eps, atol=0)
        X, y = f["problem/X"][:], f["problem/y"][:]
        for s in range(S):
            Xs, ys = (X[s], y[s]) if per_seed_data else (X, y)
            expected_loss = [loss(Xs, ys, th.astype(np.float64)) for th in theta[:, s]]
            # float32 runs evaluate the residual in float32: a few eps32 relative on this loss
            np.testing.assert_allclose(f["checkpoints/loss"][:, s], expected_loss,
                                       rtol=1e-12 if dtype == "float64" else 1e-5)
        nfev = f["checkpoints/nfev"][:]
        assert np.all(nfev[0] == 0)  # t = 0 is written before any step
        assert np.all(np.diff(nfev, axis=0) > 0)


def test_float32_run_is_close_to_float64(make_config):
    """float32 stores float32 layers; at rtol 1e-6 it follows the float64 flow to ~1e-5."""
    r64 = simulate(_config(make_config, "float64"))
    r32 = simulate(_config(make_config, "float32"))
    assert r32.theta.dtype == np.float32 and r64.theta.dtype == np.float64
    np.testing.assert_allclose(r32.theta, r64.theta, rtol=0, atol=1e-4)


def test_without_save_layers_there_is_no_u(make_config, tmp_path):
    path = tmp_path / "run.h5"
    simulate(_config(make_config, save_layers=False), out=path).close()
    with open_run(path) as run:
        assert "checkpoints/u" not in run.file
        assert run.theta.shape == (K, S, D)
        with pytest.raises(AttributeError):
            run.u


def test_file_and_memory_runs_agree(make_config, tmp_path):
    """The storage does not change the numbers: in-memory and on-disk runs are bit-identical."""
    config = _config(make_config)
    memory = simulate(config)
    with open_run(simulate(config, out=tmp_path / "run.h5").path) as disk:
        for name in ("t", "loss", "theta", "u", "invariant_drift", "nfev"):
            np.testing.assert_array_equal(getattr(memory, name), getattr(disk, name), err_msg=name)
        assert disk.complete and disk.committed == K


READER = """
import json, sys
import h5py
with h5py.File(sys.argv[1], "r", swmr=True, libver="latest") as f:
    c = f["checkpoints"]
    k = int(c["committed"][0])
    print(json.dumps({"committed": k, "t": c["t"][:k].tolist(), "loss": c["loss"][:k].tolist(),
                      "complete": bool(f.attrs["complete"])}))
"""


def test_readable_while_being_written(make_config, tmp_path):
    """Another process opens the file with swmr=True from inside the run (at checkpoints 1 and 3)
    and sees every committed checkpoint, with complete still false."""
    config = _config(make_config)
    path = tmp_path / "live.h5"
    seen = {}

    def on_checkpoint(k, t, integrator):
        if k in (1, 3):
            out = subprocess.run([sys.executable, "-c", READER, str(path)], capture_output=True,
                                 text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            seen[k] = (json.loads(out.stdout), integrator.current_losses())

    report = run_simulation(config, path, on_checkpoint=on_checkpoint)
    report.run.close()
    assert sorted(seen) == [1, 3]
    times = np.linspace(0, config.integrator.t_end, K)
    for k, (view, losses) in seen.items():
        assert view["committed"] == k + 1
        np.testing.assert_allclose(view["t"], times[: k + 1], rtol=1e-15)
        np.testing.assert_array_equal(view["loss"][-1], losses)  # the row of the live state
        assert view["complete"] is False
    with open_run(path) as run:
        assert run.complete and run.committed == K


@pytest.mark.parametrize("shape", [(8,), (64, 100_000), (64, 4, 100_000), (3, 2, 12), (1_000_000,),
                                   (2, 64, 5_000)])
def test_chunks_hold_one_checkpoint_and_at_most_a_few_mib(shape):
    """docs/design.md, "Chunks": one checkpoint along K, split over seeds/coordinates to about 1-4
    MiB per chunk (small rows stay whole)."""
    from ddln_fast.store.writer import chunks_for

    chunks = chunks_for(shape, 8)
    assert len(chunks) == len(shape) + 1 and chunks[0] == 1
    assert all(1 <= c <= s for c, s in zip(chunks[1:], shape))
    nbytes = 8 * int(np.prod(chunks))
    assert nbytes <= 4 * 2**20
    if 8 * int(np.prod(shape)) <= 2**20:
        assert chunks[1:] == shape  # a small row is one chunk


def test_schema_table_holds_the_required_layout():
    """The one table the writer, the reader and these tests read contains every required
    dataset with its axes and dtype (REQUIRED, copied from the specification, is the reference)."""
    from ddln_fast.store.schema import FIELDS, field

    for name, (shape, kind, labels) in REQUIRED.items():
        fd = field(name)
        assert fd.axes_for(len(shape)) == labels, name
        assert fd.dtype == {"run": "run", "f8": "float64", "int": fd.dtype}[kind], name
        if kind == "int":
            assert np.issubdtype(np.dtype(fd.dtype), np.integer)
    assert len({fd.path for fd in FIELDS}) == len(FIELDS)


@pytest.mark.parametrize("save_layers, per_seed_data", [(True, False), (False, True)])
def test_file_holds_exactly_the_fields_of_the_schema_table(make_config, tmp_path, save_layers, per_seed_data):
    """Every field the table gives this run, with the shape and dtype it says, and nothing else
    in /problem, /init and /checkpoints (besides the commit counter)."""
    from ddln_fast.store.schema import Layout, fields

    config = _config(make_config, save_layers=save_layers, per_seed_data=per_seed_data)
    path = tmp_path / "run.h5"
    simulate(config, out=path).close()
    with open_run(path) as run:
        layout = Layout.of(config, ddln_fast.problem.Problem(run.X, run.y, run.theta_star))
        expected = {fd.path: fd for fd in fields(layout)}
        present = {name for name in run.datasets() if name != "checkpoints/committed"}
        assert present == set(expected)
        for name, fd in expected.items():
            ds = run.file[name]
            rows = (K,) if fd.grows else ()
            assert ds.shape == rows + fd.row_shape(layout), name
            assert ds.dtype == fd.numpy_dtype(layout), name
            assert getattr(run, fd.run_attribute).shape == ds.shape


@pytest.mark.parametrize("per_seed_data", [False, True])
def test_xarray_sees_named_dimensions_and_t_as_coordinate(make_config, tmp_path, per_seed_data):
    """xarray with h5netcdf, without phony_dims: every variable has the dimension names of the
    table, t is the coordinate of the checkpoint axis; Run.to_xarray gives the same."""
    xarray = pytest.importorskip("xarray")
    pytest.importorskip("h5netcdf")
    config = _config(make_config, per_seed_data=per_seed_data)
    path = tmp_path / "run.h5"
    simulate(config, out=path).close()
    with h5py.File(path, "r") as f:
        t, loss, u = f["checkpoints/t"][:], f["checkpoints/loss"][:], f["checkpoints/u"][:]
    with xarray.open_dataset(path, group="checkpoints", engine="h5netcdf") as ds:
        assert ds["loss"].dims == ("t", "seed") and ds["theta"].dims == ("t", "seed", "coordinate")
        assert ds["u"].dims == ("t", "seed", "layer", "coordinate")
        assert "t" in ds.coords and ds.sizes == {"t": K, "seed": S, "coordinate": D, "layer": L, "counter": 1}
        np.testing.assert_array_equal(ds["t"].values, t)
        assert ds["loss"].values.tobytes() == loss.tobytes()
        assert ds["loss"].sel(t=t[2]).values.tobytes() == loss[2].tobytes()
    with xarray.open_dataset(path, group="problem", engine="h5netcdf") as ds:
        lead = ("seed",) if per_seed_data else ()
        assert ds["X"].dims == (*lead, "sample", "coordinate") and ds["y"].dims == (*lead, "sample")
    with xarray.open_dataset(path, group="init", engine="h5netcdf") as ds:
        assert ds["u"].dims == ("seed", "layer", "coordinate")
    with open_run(path) as run:
        ds = run.to_xarray()
    assert ds["loss"].dims == ("t", "seed") and ds["u0"].dims == ("seed", "layer", "coordinate")
    np.testing.assert_array_equal(ds["t"].values, t)
    assert ds["u"].values.tobytes() == u.tobytes()
    assert ds["X"].dims == ((("seed",) if per_seed_data else ()) + ("sample", "coordinate"))
    assert Config.from_dict(tomllib.loads(ds.attrs["config"])) == config


@pytest.mark.parametrize("method", ["euler", "dopri5"])
def test_state_at_a_checkpoint_refers_to_its_layers_row(make_config, tmp_path, method):
    """At a checkpoint the saved layers are the row u of that checkpoint (one copy in the
    file): the slot's from_rows flag is set and Run.state() returns that row; the layers of
    the resumed state are the stored ones (a bitwise resume is tested in test_resume.py). A
    fixed-step method's theta cache is the row theta too; an adaptive method's is not (its
    cache holds stage values, which differ) is stored in the slot."""
    config = _config(make_config).with_overrides({"integrator.method": method})
    path = tmp_path / "run.h5"
    simulate(config, out=path).close()
    with open_run(path) as run:
        index, state = run.state()
        with h5py.File(path, "r") as f:
            slots = [f[f"state/slot{i}"] for i in range(2)]
            latest = max(slots, key=lambda g: int(g["sequence"][0]))
            names = dict(json.loads(latest["from_rows"].attrs["names"]))
            assert names == {"U": "u", "theta_cache": "theta"}
            flags = dict(zip(names, latest["from_rows"][:]))
            assert flags == {"U": 1, "theta_cache": 1 if method == "euler" else 0}
            assert int(latest["checkpoint_index"][0]) == index == K - 1
            u_last, theta_last = f["checkpoints/u"][K - 1], f["checkpoints/theta"][K - 1]
    assert state["U"].tobytes() == u_last.tobytes()
    if method == "euler":
        assert state["theta_cache"].tobytes() == theta_last.tobytes()


def test_every_root_attribute_is_in_the_schema_table(make_config, tmp_path):
    """A run file's root attributes are all documented in ROOT_ATTRIBUTES (an attribute added
    without its meaning fails here)."""
    from ddln_fast.store.schema import ROOT_ATTRIBUTES

    path = tmp_path / "run.h5"
    simulate(_config(make_config), out=path).close()
    with h5py.File(path, "r") as f:
        assert set(f.attrs) <= set(ROOT_ATTRIBUTES), set(f.attrs) - set(ROOT_ATTRIBUTES)
        assert {"schema_version", "config", "complete", "status_names", "blas"} <= set(f.attrs)


def test_open_tries_again_only_when_the_file_changed_while_it_was_opened(tmp_path, monkeypatch):
    """A writer closing its file rewrites the superblock while a reader looks at it: an open
    that failed while the file changed is tried again; one that failed on an unchanged file is
    reported at once (a foreign file costs no waiting)."""
    import os

    from ddln_fast.errors import InputError
    from ddln_fast.store import reader

    path = tmp_path / "f.h5"
    path.write_bytes(b"x")
    calls = []

    def failing_once_while_written(p):
        calls.append(p)
        if len(calls) == 1:
            stamp = os.stat(p).st_mtime_ns + 1_000_000
            os.utime(p, ns=(stamp, stamp))  # the writer touched the file meanwhile
            raise InputError("run file f.h5 cannot be opened (file is already open for write)")
        return "opened"

    monkeypatch.setattr(reader, "_open_once", failing_once_while_written)
    assert reader.open_h5(path) == "opened" and len(calls) == 2

    calls.clear()

    def always_failing(p):
        calls.append(p)
        raise InputError("run file f.h5 is not an HDF5 file")

    monkeypatch.setattr(reader, "_open_once", always_failing)
    with pytest.raises(InputError, match="not an HDF5 file"):
        reader.open_h5(path)
    assert len(calls) == 1
