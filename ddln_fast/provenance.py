"""What produced a run, recorded in its file: versions, threads, threading layer and BLAS (what
bit-identical resume depends on), host and process."""

from __future__ import annotations

import json
import os
import socket

import h5py
import numpy as np


def provenance(threads: int) -> dict:
    """Root attributes of a new run file: the versions of ddln_fast, numpy, numba, h5py and
    HDF5, the thread count, Numba's threading layer, the BLAS libraries (as JSON), the host
    name and the process id."""
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


def blas_identity(blas_json: str) -> str:
    """What of the BLAS decides its rounding: library, version and kernel architecture."""
    try:
        infos = json.loads(blas_json) if blas_json else []
    except ValueError:
        return "unknown"
    return ", ".join(f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')}"
                     for i in infos) or "none"
