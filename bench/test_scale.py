"""Scale and start-up: peak memory on D (d = 10^6), the cost of streaming 200 checkpoints to
HDF5 on A, and the time of the first ``ddln run`` (cold Numba compile) and of later runs.

References: memory is compared with the arrays a run cannot do without (X, the state U, two
checkpoint rows of theta and u: the one being written and the one being made); HDF5
streaming with the integration of the same run; start-up with the 30 s / 3 s of issue 6.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import bench_config, record
from ddln_fast.integrators import Integrator
from ddln_fast.simulate import run_simulation

REPO = Path(__file__).resolve().parents[1]
DDLN = Path(sys.executable).with_name("ddln")

MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, tracemalloc, resource
    import numpy as np
    sys.path.insert(0, {bench!r})
    from conftest import bench_config
    from ddln_fast.simulate import run_simulation

    def rss_mib():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

    # compile (or load from cache) outside the measurement
    small = bench_config("D", problem__d=64, integrator__t_end=2e-3, run__checkpoints=2)
    run_simulation(small, out=None)
    base = rss_mib()
    config = bench_config("D", integrator__t_end=3e-3, run__checkpoints=2)
    tracemalloc.start()
    run_simulation(config, out={out!r}, overwrite=True)
    traced = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(dict(traced_peak=traced, rss_peak=peak, rss_base=base)))
""")


def test_memory_D(benchmark, tmp_path):
    """Peak memory of an Euler run on D (n=100, d=10^6, 8 seeds, depth 3), in a subprocess."""
    script = MEMORY_SCRIPT.format(bench=str(Path(__file__).parent), out=str(tmp_path / "d.h5"))

    def run():
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              cwd=REPO, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    result = benchmark.pedantic(run, rounds=1, iterations=1)
    n, d, S, L = 100, 1_000_000, 8, 3
    mib = 8 / 2**20
    X, state, checkpoint = n * d * mib, S * L * d * mib, (S * d + S * L * d) * mib
    # two checkpoints: the one being written (the writer's copy) while the next is computed
    budget = X + state + 2 * checkpoint
    record(benchmark, "D", "peak traced memory / (X + state + 2 checkpoints)",
           result["traced_peak"] / budget, 1.3,
           note=f"tracemalloc peak {result['traced_peak']:.0f} MiB; X {X:.0f} + U {state:.0f} + "
                f"2 x checkpoint {checkpoint:.0f} = {budget:.0f} MiB")
    record(benchmark, "D", "peak RSS growth / (X + state + 2 checkpoints)",
           (result["rss_peak"] - result["rss_base"]) / budget, 1.3,
           note=f"maxrss {result['rss_peak']:.0f} MiB - {result['rss_base']:.0f} MiB after imports "
                f"and compile")


HDF5_STEPS = int(os.environ.get("DDLN_BENCH_HDF5_STEPS", "2000"))


@pytest.mark.timeout(1800)
def test_hdf5_streaming_A(benchmark, tmp_path):
    """An Euler run on A with 200 checkpoints streamed to an HDF5 file (one every 10 steps), with
    every part of a checkpoint accounted inside the same run (so that the load of a shared
    machine falls on all parts alike), in wall time and in CPU time of the thread doing it:

    - storage: what the integrating thread spends in the writer (copying the row and the state
      into the writer's buffers, waiting for the previous checkpoint when it is not written yet,
      the completion mark); the target of issue 13 (HDF5 overhead <= 5 %);
    - the checkpoint values (theta, the invariant drift, and the loss: both products with X,
      whose gradient the next Euler step uses instead of computing its own), which the
      integrator computes for the row whatever the storage;
    - the writer thread's own time (the HDF5 writes and flushes, overlapped with integration).
    """
    import importlib

    from ddln_fast.store import RunWriter

    # the package exports the function simulate(), which hides the module of the same name
    simulate_module = importlib.import_module("ddln_fast.simulate")

    dt = 1e-3
    t_end = HDF5_STEPS * dt
    config = bench_config("A", integrator__t_end=t_end, run__checkpoints=200, run__spacing="linear")
    out = tmp_path / "a.h5"
    parts = ("integrate", "values", "storage", "writer thread")
    spent = {part: [0.0, 0.0] for part in parts}  # wall, thread CPU

    def accounted(fn, part):
        def wrapper(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[part][0] += time.perf_counter() - wall
                spent[part][1] += time.thread_time() - cpu
        return wrapper

    patches = [(Integrator, "advance_to", "integrate"), (simulate_module, "_checkpoint_row", "values"),
               *[(RunWriter, name, "storage") for name in ("append", "save_state", "wait", "finish")],
               (RunWriter, "_guarded", "writer thread")]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, part in patches:
        setattr(owner, name, accounted(getattr(owner, name), part))
    try:
        small = bench_config("A", problem__d=64, integrator__t_end=10 * dt, run__checkpoints=3)
        run_simulation(small, out=tmp_path / "warm.h5", overwrite=True)  # compile
        for part in parts:
            spent[part] = [0.0, 0.0]
        report = benchmark.pedantic(lambda: run_simulation(config, out=out, overwrite=True),
                                    rounds=1, iterations=1)
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
    assert report.checkpoints_written == 200
    integrate = spent["integrate"]

    def ratios(part):
        return spent[part][0] / integrate[0], spent[part][1] / integrate[1]

    storage, values, thread = ratios("storage"), ratios("values"), ratios("writer thread")
    per = {part: spent[part][0] / 200 * 1e3 for part in parts}
    record(benchmark, "A", f"HDF5 200 checkpoints ({HDF5_STEPS} Euler steps): storage / integration",
           storage[0], 0.05,
           note=f"{per['storage']:.1f} ms per checkpoint in the integrating thread (CPU time ratio "
                f"{storage[1]:.3f}); {out.stat().st_size / 2**20:.0f} MiB file")
    record(benchmark, "A", "  checkpoint values (theta, loss, drift) / integration", values[0],
           note=f"{per['values']:.1f} ms per checkpoint (CPU time ratio {values[1]:.3f}); both products "
                f"with X, taken from the next step")
    record(benchmark, "A", "  writer thread (HDF5 writes, overlapped) / integration", thread[0],
           note=f"{per['writer thread']:.1f} ms per checkpoint (CPU time ratio {thread[1]:.3f})")


END_TO_END_ROUNDS = int(os.environ.get("DDLN_BENCH_HDF5_ROUNDS", "3"))


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("threads", [0, 1], ids=["all-threads", "1-thread"])
def test_checkpoints_end_to_end_A(benchmark, tmp_path, threads):
    """The whole cost of checkpoints as a user sees it: the driver's wall time of an Euler run
    on A with a checkpoint every 10 steps (streamed to a file) against the same steps with only
    the first and last checkpoint, alternating, the minimum over rounds of each. Unlike the
    accounting above, this includes what the writer thread takes from the integration when no
    core is free (then the writes cannot overlap): at 1 thread a core is free for the writer.

    A third variant keeps every checkpoint but skips the HDF5 writes of the rows and the state
    (the writer only counts them): its difference to the streamed run is the HDF5 overhead, the
    rest is computing the checkpoints' values (theta, the drift).
    """
    import importlib

    from ddln_fast.store import RunWriter

    simulate_module = importlib.import_module("ddln_fast.simulate")
    steps = max(20, HDF5_STEPS // 5)
    drive, write = simulate_module._drive, RunWriter._write_checkpoint
    seconds = {}

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return drive(*args, **kwargs)
        finally:
            seconds["drive"] = time.perf_counter() - start

    def counted_only(self, rows, state, from_rows, events):
        self.committed += 1

    simulate_module._drive = timed
    best = {}
    many = steps // 10 + 1
    try:
        small = bench_config("A", problem__d=64, integrator__t_end=0.01, run__checkpoints=3,
                             run__threads=threads)
        run_simulation(small, out=tmp_path / "warm.h5", overwrite=True)  # compile
        for _ in range(END_TO_END_ROUNDS):
            for variant, count in (("streamed", many), ("no writes", many), ("2 checkpoints", 2)):
                RunWriter._write_checkpoint = counted_only if variant == "no writes" else write
                config = bench_config("A", integrator__t_end=steps * 1e-3, run__checkpoints=count,
                                      run__spacing="linear", run__threads=threads)
                run_simulation(config, out=tmp_path / f"e{count}.h5", overwrite=True).run.close()
                best[variant] = min(best.get(variant, float("inf")), seconds["drive"])
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    finally:
        simulate_module._drive = drive
        RunWriter._write_checkpoint = write
    streamed, unwritten, two = best["streamed"], best["no writes"], best["2 checkpoints"]
    label = "all threads" if threads == 0 else f"{threads} thread"
    record(benchmark, "A", f"checkpoint every 10 steps, end to end ({steps} Euler steps, {label})",
           streamed / two - 1,
           note=f"{streamed:.2f} s against {two:.2f} s with 2 checkpoints (min of {END_TO_END_ROUNDS} "
                f"alternating rounds)")
    record(benchmark, "A", f"  of which HDF5 (streamed - no writes) / 2 checkpoints ({label})",
           (streamed - unwritten) / two, 0.05,
           note=f"{unwritten:.2f} s with every checkpoint computed but not written")


TINY = ["--set", "problem.d=50", "--set", "run.seeds=2", "--set", "integrator.t_end=1.0",
        "--set", "run.checkpoints=5"]


def test_cold_and_warm_start(benchmark, tmp_path):
    """``ddln run`` of data/default.toml shrunk to a tiny problem: with an empty Numba cache
    (compiles every kernel it uses), then again with the cache filled."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba_cache"))

    def ddln_run(name):
        start = time.perf_counter()
        done = subprocess.run([str(DDLN), "run", "data/default.toml", "-o", str(tmp_path / name),
                               "--overwrite", "--quiet", *TINY], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return time.perf_counter() - start

    cold = ddln_run("cold.h5")
    warm = [ddln_run(f"warm{i}.h5") for i in range(3)]
    benchmark.pedantic(lambda: ddln_run("timed.h5"), rounds=1, iterations=1)
    record(benchmark, "-", "first `ddln run` (cold compile) s", cold, 30.0,
           note="data/default.toml with d=50, 2 seeds, t_end=1 (dopri5, per-seed data)")
    record(benchmark, "-", "later `ddln run` s", min(warm), 3.0,
           note=f"warm runs: {', '.join(f'{w:.2f}' for w in warm)} s")
