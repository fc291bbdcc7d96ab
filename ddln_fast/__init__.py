"""ddln_fast: fast, checked simulations of deep diagonal linear networks.

    from ddln_fast import Config, simulate, open_run
    cfg = Config.from_toml("data/default.toml", overrides={"model.depth": 4})
    run = simulate(cfg, out="run.h5")
    run.t, run.loss, run.theta
"""

from .threads import configure_openmp as _configure_openmp

# Before any kernel runs: passive OpenMP waiting, Numba's omp layer bound to its own libgomp.
_configure_openmp()

__version__ = "0.1.0"

from .config import Config  # noqa: E402
from .errors import InputError  # noqa: E402
from .simulate import simulate  # noqa: E402
from .store import open_run  # noqa: E402
from .prediction import predict_limit  # noqa: E402

__all__ = ["Config", "InputError", "simulate", "open_run", "predict_limit", "__version__"]
