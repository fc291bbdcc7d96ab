"""One ``threads`` setting for Numba's parallel kernels and the BLAS pool together."""

from __future__ import annotations

import contextlib
import warnings

import numba
import threadpoolctl


def resolve_threads(threads: int) -> int:
    """0 means every core Numba may use (respects CPU affinity, e.g. SLURM cgroups)."""
    available = numba.config.NUMBA_NUM_THREADS
    if threads > available:
        warnings.warn(f"threads = {threads} is more than the {available} cores available here "
                      f"(NUMBA_NUM_THREADS): using {available}", ThreadsWarning, stacklevel=3)
    return available if threads <= 0 else min(threads, available)


class ThreadsWarning(UserWarning):
    """Fewer threads are used than were asked for."""


@contextlib.contextmanager
def limit_threads(threads: int):
    """Run the body with ``threads`` Numba threads (thread-local, so set here, in the thread
    that launches the kernels) and the same number of BLAS threads."""
    n = resolve_threads(threads)
    previous = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        with threadpoolctl.threadpool_limits(limits=n, user_api="blas"):
            yield n
    finally:
        numba.set_num_threads(previous)
