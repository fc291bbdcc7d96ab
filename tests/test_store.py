"""The HDF5 file of a run against the schema of INTERFACE.md.

Reference: the list of required names, shapes, dtypes, attributes and axis labels copied from
INTERFACE.md ("HDF5 file of one run") into REQUIRED below, and an independent reader (plain
h5py in another process, opened with swmr=True) for reading while the run is written. Stored
values are checked against numpy recomputations (loss of the stored theta, theta as the product
of the stored layers), never against earlier outputs of the code.
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

# INTERFACE.md: name -> (shape, dtype kind, axis labels). "run" dtype: float64 or float32 as
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
                # (DESIGN.md; the scalar times share a chunk)
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
    """DESIGN.md: one checkpoint along K, split over seeds/coordinates to about 1-4 MiB per
    chunk (small rows stay whole)."""
    from ddln_fast.store import _chunks

    chunks = _chunks(shape, 8)
    assert len(chunks) == len(shape) + 1 and chunks[0] == 1
    assert all(1 <= c <= s for c, s in zip(chunks[1:], shape))
    nbytes = 8 * int(np.prod(chunks))
    assert nbytes <= 4 * 2**20
    if 8 * int(np.prod(shape)) <= 2**20:
        assert chunks[1:] == shape  # a small row is one chunk
