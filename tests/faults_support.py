"""Helpers of the fault-tolerance tests (test_faults.py, test_resume.py, test_bad_input_run.py).

The reference of every "bit-identical" check is an uninterrupted run of the same config at the
same thread count (threads = 1 everywhere): docs/design.md, "Crash safety" promises resume equals
that run bit for bit. Comparisons are on raw bytes (``tobytes``), so NaN payloads and the sign of
zero count.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DDLN = [sys.executable, "-m", "ddln_fast.cli"]

#: Attributes that legitimately differ between two runs of the same config.
VOLATILE_ATTRS = {"created", "wall_seconds", "pid", "hostname"}


def cli_env() -> dict:
    """The environment of a ``ddln`` subprocess: the same Numba cache as this process."""
    env = dict(os.environ)
    env.setdefault("NUMBA_CACHE_DIR", str(REPO / ".numba_cache"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def toml_text(tables: dict) -> str:
    import tomli_w

    return tomli_w.dumps(tables)


def write_config(path: Path, tables: dict) -> Path:
    path.write_text(toml_text(tables))
    return path


def ddln(*args, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    """Run ``ddln ARGS`` to completion (the CLI module, so that no console script is needed)."""
    return subprocess.run([*DDLN, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=cli_env(), **kwargs)


def start_ddln(*args) -> subprocess.Popen:
    return subprocess.Popen([*DDLN, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=cli_env())


def committed_arrays(path) -> tuple[int, dict[str, np.ndarray], bool]:
    """(committed count, committed rows of every /checkpoints dataset, complete) of a run file,
    read the way a user would (ddln_fast.open_run)."""
    from ddln_fast import open_run

    with open_run(path) as run:
        names = [n for n in run.file["checkpoints"] if n != "committed"]
        return run.committed, {n: run.checkpoint(n) for n in names}, run.complete


def assert_prefix_equal(reference: dict[str, np.ndarray], arrays: dict[str, np.ndarray], k: int):
    """The first k rows of every dataset equal the reference's, bit for bit."""
    assert set(arrays) == set(reference)
    for name, ref in reference.items():
        got = arrays[name]
        assert got.shape[0] == k, (name, got.shape, k)
        assert got.dtype == ref.dtype, name
        assert got.tobytes() == ref[:k].tobytes(), f"/checkpoints/{name} differs in its first {k} rows"


def assert_same_run_file(reference_path, path) -> None:
    """Two complete run files hold the same content: every dataset outside /state in full
    (shapes included, so no stray rows), the resume state, and the non-volatile attributes."""
    from ddln_fast import open_run

    with h5py.File(reference_path, "r") as a, h5py.File(path, "r") as b:
        names = []
        a.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) and not n.startswith("state/") else None)
        other = []
        b.visititems(lambda n, o: other.append(n) if isinstance(o, h5py.Dataset) and not n.startswith("state/") else None)
        assert sorted(names) == sorted(other)
        for name in names:
            x, y = a[name][()], b[name][()]
            assert x.shape == y.shape, (name, x.shape, y.shape)
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), f"/{name} differs"
        keys = (set(a.attrs) | set(b.attrs)) - VOLATILE_ATTRS
        for key in keys:
            va, vb = a.attrs.get(key), b.attrs.get(key)
            assert np.array_equal(va, vb) or va == vb, f"attribute {key}: {va!r} != {vb!r}"
        assert bool(b.attrs["complete"])
    with open_run(reference_path) as ra, open_run(path) as rb:
        ka, sa = ra.state()
        kb, sb = rb.state()
        assert ka == kb and set(sa) == set(sb)
        for name in sa:
            assert sa[name].tobytes() == sb[name].tobytes(), f"state {name} differs"


def file_fingerprint(path) -> tuple | None:
    """(mtime_ns, size, sha256) of a file, or None if it does not exist."""
    p = Path(path)
    if not p.exists():
        return None
    st = p.stat()
    return st.st_mtime_ns, st.st_size, hashlib.sha256(p.read_bytes()).hexdigest()


def wait_for_writing(path: Path, proc: subprocess.Popen, since: tuple | None, timeout=60.0) -> bool:
    """Wait until ``path`` exists and has changed since ``since`` (a run is writing it), or the
    process ended; True if writing started."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            return False
        if path.exists():
            st = path.stat()
            if since is None or (st.st_mtime_ns, st.st_size) != since:
                return True
        time.sleep(0.005)
    return False
