"""ddln_fast: fast, checked simulations of deep diagonal linear networks.

    from ddln_fast import Config, simulate, open_run
    cfg = Config.from_toml("data/default.toml", overrides={"model.depth": 4})
    run = simulate(cfg, out="run.h5")
    run.t, run.loss, run.theta
"""

import os as _os

# Measured on 2 cores: with libgomp's default spin-waiting, Numba's OpenMP threads and
# OpenBLAS's threads steal each other's cores between the GEMMs and the kernels (17.8 ms per
# default-size Euler step against 0.5 ms with passive waiting). Set before libgomp loads.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba as _numba  # noqa: E402

# omp: ~2 us per parallel launch and thread-safe (workqueue: ~90 us and aborts on concurrent
# use; pip's tbb does not load from a venv). Must be set before the first parallel compile.
if "NUMBA_THREADING_LAYER" not in _os.environ:
    _numba.config.THREADING_LAYER = "omp"

__version__ = "0.1.0"

from .config import Config  # noqa: E402
from .errors import InputError  # noqa: E402
from .simulate import simulate  # noqa: E402
from .store import open_run  # noqa: E402
from .prediction import predict_limit  # noqa: E402

__all__ = ["Config", "InputError", "simulate", "open_run", "predict_limit", "__version__"]
