"""Thread policy, in one place: the OpenMP runtime Numba's kernels run on; one ``threads``
setting for Numba's parallel kernels and the BLAS pool together; when a small piece of work
runs in the calling thread instead; one BLAS thread for the theory's small dense algebra; and
the threads of each task of a sweep.

Two facts decide the OpenMP set-up (both measured on 2 cores, Euler steps of n = 200,
d = 5000, 64 seeds, depth 3):

- libgomp's default waiting spins after each parallel region; Numba's OpenMP threads and
  OpenBLAS's threads then take each other's cores between the kernels and the GEMMs (17.8 ms
  per default-size step against 0.5 ms with passive waiting). libgomp reads its wait policy once,
  when it is loaded, so ``OMP_WAIT_POLICY=PASSIVE`` must be in the environment before that.
- A library imported before ddln_fast can bring its own libgomp, loaded globally and already
  initialized with spinning (PyTorch does: ``torch/lib/libgomp.so.1``). Numba's OpenMP pool would
  bind its ``GOMP_*`` calls to that copy, the first one in the global scope, and the step became
  2.7x slower (8.2 ms against 3.1 ms). Loading Numba's pool with ``RTLD_DEEPBIND`` binds it to
  its own libgomp, which then starts with passive waiting whatever was imported before.

:func:`openmp_binding` reports which runtime Numba's pool uses and its wait policy, so tests can
check the set-up without timing anything.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import warnings
from pathlib import Path

import numba
import numpy as np
import threadpoolctl

_POOL_MODULE = "numba.np.ufunc.omppool"


def configure_openmp() -> None:
    """Passive OpenMP waiting and Numba's ``omp`` threading layer, bound to its own libgomp.

    Called once on ``import ddln_fast``, before any parallel kernel runs. The ``omp`` layer costs
    about 2 us per parallel launch and is thread-safe (``workqueue``: about 90 us, and it aborts
    on concurrent use; pip's ``tbb`` does not load from a virtual environment). A user's
    ``NUMBA_THREADING_LAYER`` and ``OMP_WAIT_POLICY`` are respected.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER = "omp"
    if numba.config.THREADING_LAYER != "omp" or _POOL_MODULE in sys.modules:
        return  # another layer, or Numba started its pool before ddln_fast was imported
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | getattr(os, "RTLD_DEEPBIND", 0))
    try:
        importlib.import_module(_POOL_MODULE)  # kept in sys.modules: Numba imports it from there
    except ImportError:  # no OpenMP runtime on this machine: Numba picks another layer
        pass
    finally:
        sys.setdlopenflags(flags)


def openmp_binding() -> dict:
    """Which libgomp Numba's OpenMP pool runs its parallel regions on, and its spin count
    (0: passive waiting).

    Returns ``{"library": path or None, "spin_count": int or None}``. A parallel kernel asks every
    loaded libgomp for ``omp_get_level()``: only the runtime that runs the region answers 1.
    ``omp_display_env`` of that runtime gives its spin count. Nothing here depends on timing.
    (A diagnostic: it compiles a small uncached kernel per runtime.)
    """
    import ctypes

    from numba import njit, prange

    if _POOL_MODULE not in sys.modules:
        return {"library": None, "spin_count": None}
    bound = []
    for path in (p for p in _mapped_files() if "libgomp" in Path(p).name):
        runtime = ctypes.CDLL(path)
        level = ctypes.CFUNCTYPE(ctypes.c_int)(("omp_get_level", runtime))

        @njit(parallel=True)
        def levels(out):
            for i in prange(out.size):
                out[i] = level()

        out = np.zeros(4, dtype=np.int64)
        levels(out)
        if np.all(out == 1):
            bound.append((path, runtime))
    if len(bound) != 1:
        return {"library": None, "spin_count": None}
    path, runtime = bound[0]
    return {"library": path, "spin_count": _spin_count(runtime)}


def _spin_count(runtime) -> int | None:
    """GOMP_SPINCOUNT as ``omp_display_env(verbose)`` prints it on stderr (fd 2, captured);
    None for a libgomp too old to have ``omp_display_env`` (OpenMP 5.1)."""
    import tempfile

    if not hasattr(runtime, "omp_display_env"):
        return None
    with tempfile.TemporaryFile(mode="w+") as capture:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            runtime.omp_display_env(1)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        for line in capture:
            if "GOMP_SPINCOUNT" in line:
                return int(line.split("=")[1].strip().strip("'"))
    return None


def _mapped_files() -> list[str]:
    """Paths of the shared objects mapped into this process (Linux /proc)."""
    try:
        with open("/proc/self/maps") as maps:
            rows = [line.split() for line in maps]
    except OSError:
        return []
    return sorted({row[5] for row in rows if len(row) >= 6 and row[5].startswith("/")})


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


#: Below these sizes the integrators run in the calling thread: multiply-adds of one product
#: with X (a GEMM below this runs seed by seed, no BLAS call), and elements of the active state
#: (m L d; the parallel kernels then run on one thread, and an adaptive run takes whole runs of
#: steps in one compiled call). Waking two threads costs tens of microseconds, and on a loaded
#: machine far more, while the work takes less (a straggler seed of dopri5). Results do not
#: depend on these: per-seed sums never depend on the thread count.
SERIAL_PRODUCT_WORK = 1_000_000
SERIAL_STATE_WORK = 32_768
#: Below this many (row x coordinate) items the clock map's loops run in the calling thread.
SERIAL_CLOCK_ITEMS = 2048


def kernel_threads(state_work: int, wanted: int) -> int:
    """Threads for the parallel kernels on an active state of ``state_work`` elements: one
    while it is at most :data:`SERIAL_STATE_WORK`, else ``wanted`` (the run's setting)."""
    return 1 if state_work <= SERIAL_STATE_WORK else wanted


def serial_blas():
    """One BLAS thread for the theory's small dense algebra (SVDs of n x d, n x n solves), as a
    context manager.

    Measured on the shared 2-core machine under load: an SVD of a 100 x 1000 matrix took 3.4 s
    with the default OpenBLAS pool and 0.046 s with one thread."""
    return threadpoolctl.threadpool_limits(limits=1, user_api="blas")


_HOT_LOOP_CONTROLLER = None


def hot_loop_serial_blas():
    """One BLAS thread, as a context manager cheap enough for a solver's inner loop (11 us
    against 1.1 ms for :func:`serial_blas`, which looks up the loaded libraries every time):
    it limits the BLAS libraries loaded at its first use: numpy's, and scipy's (loaded here
    first), the two the solvers call (the dual method's Jacobians use scipy's syrk)."""
    global _HOT_LOOP_CONTROLLER
    if _HOT_LOOP_CONTROLLER is None:
        import scipy.linalg.blas  # noqa: F401  (scipy's OpenBLAS, a library of its own: see above)

        _HOT_LOOP_CONTROLLER = threadpoolctl.ThreadpoolController()
    return _HOT_LOOP_CONTROLLER.limit(limits=1, user_api="blas")


def serial_products(work: int) -> bool:
    """Whether products of ``work`` multiply-adds per seed run on one BLAS thread
    (:func:`blas_for_products`)."""
    return work <= SERIAL_PRODUCT_WORK


def blas_for_products(work: int):
    """The BLAS pool for products of ``work`` multiply-adds per seed (batched over seeds), as a
    context manager: one thread up to :data:`SERIAL_PRODUCT_WORK`, else the pool as the run set it.

    Measured on the shared 2-core machine under load, the dual method on n = 100, d = 1000
    (to loss 1e-8): 2 seeds took 48 s with the default OpenBLAS pool and 0.95 s with one thread;
    8 seeds (batched GEMMs of 2.4 M multiply-adds) 43 s and 3.9 s. Such GEMMs and small
    factorizations gain little from a second thread and lose everything when its core is
    busy."""
    return hot_loop_serial_blas() if serial_products(work) else contextlib.nullcontext()


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity: a SLURM allocation, taskset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def task_threads(slots_per_host: dict[str, int] | None, threads: int | None) -> int:
    """Numba + BLAS threads for one task of a sweep: ``threads`` if given, else the cores of
    this host over the task slots of this host (no oversubscription).

    ``slots_per_host``: host -> task slots (Dask worker threads) when the sweep started; a
    worker on a host that joined later (adaptive scaling) asks the scheduler."""
    if threads:
        return threads
    cores = available_cores()
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # not on a Dask worker
        return cores
    host = worker.address.split("://")[-1].rsplit(":", 1)[0]
    if slots_per_host and host in slots_per_host:
        slots = slots_per_host[host]
    else:
        from distributed import get_client

        info = get_client().scheduler_info()["workers"].values()
        slots = sum(int(w["nthreads"]) for w in info if w["host"] == host) or worker.state.nthreads
    return max(1, cores // max(1, slots))
