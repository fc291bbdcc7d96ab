"""Numba's on-disk cache of the compiled kernels: whether a run will have to compile first."""

from __future__ import annotations

import os
from pathlib import Path


def kernels_cached() -> bool:
    """Whether Numba's cache (``NUMBA_CACHE_DIR``, else the package's ``__pycache__``) holds
    compiled stage kernels (index files ``kernels.rk_stage*.nbi``); if not, the first run
    compiles them."""
    from . import kernels

    cache_dir = os.environ.get("NUMBA_CACHE_DIR")
    folder = Path(cache_dir) if cache_dir else Path(kernels.__file__).parent / "__pycache__"
    return any(folder.rglob("kernels.rk_stage*.nbi")) if folder.exists() else False
