"""Run a ddln sweep on a SLURM (or PBS) cluster with dask-jobqueue.

Run this on a login node (the Dask scheduler and the sweep's client live here for the whole
sweep, so use ``screen``/``tmux`` or a small long job); the workers are batch jobs:

    python examples/sweep_on_slurm.py data/sweeps/paper_grid.toml -o sweeps/paper \\
        --jobs 4 --cores 32 --processes 16 --memory 64GB --walltime 02:00:00 \\
        --queue normal --account myproject

    python examples/sweep_on_slurm.py ... --pbs              # PBS Pro / Torque instead
    python examples/sweep_on_slurm.py ... --dry-run          # print the job script, submit nothing

Each job books ``--cores`` CPUs and runs ``--processes`` Dask workers with ONE task slot each
(Dask's ``cores`` = ``processes``; SLURM's ``--cpus-per-task`` = ``--cores``), and every task
limits Numba and BLAS to cores // processes threads (``NUMBA_NUM_THREADS`` in the job
prologue caps it), so a node is never oversubscribed. Many small tasks: processes = cores.

Rerunning the same command continues the sweep: complete runs are skipped, runs cut by a
walltime or a preemption resume from their last checkpoint. The same sweep also runs from the
command line against this cluster's scheduler: ``ddln sweep SWEEP.toml -o OUT --scheduler ADDRESS``.

Warm the Numba cache once before fanning out (e.g. ``ddln run data/default.toml --set
integrator.t_end=1 -o /tmp/warm.h5 --overwrite`` on a compute node) so the workers load the
compiled kernels instead of all compiling them at once; the cache dir must be on a shared
file system (or node-local, one per CPU model).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def make_cluster(args):
    """A SLURMCluster or PBSCluster whose workers have one task slot each."""
    threads_per_task = max(1, args.cores // args.processes)
    cache = os.path.abspath(args.numba_cache)
    prologue = [
        f"export NUMBA_CACHE_DIR={cache}",  # shared compiled kernels
        f"export NUMBA_NUM_THREADS={threads_per_task}",  # caps Numba per task (and the omp pool)
        "export OMP_WAIT_POLICY=PASSIVE",  # see ddln_fast/__init__.py
    ]
    if args.venv:
        prologue.insert(0, f"source {os.path.abspath(args.venv)}/bin/activate")
    common = dict(
        cores=args.processes,  # Dask's view: one task slot per worker process
        processes=args.processes,
        memory=args.memory,
        walltime=args.walltime,
        queue=args.queue,
        account=args.account,
        job_script_prologue=prologue,
        local_directory=args.local_directory,
        log_directory=args.log_directory,
        # a worker's task dies with the job at walltime: its .part file resumes elsewhere
        worker_extra_args=["--lifetime", args.lifetime, "--lifetime-stagger", "2m"] if args.lifetime else [],
    )
    if args.pbs:
        from dask_jobqueue import PBSCluster

        return PBSCluster(resource_spec=f"select=1:ncpus={args.cores}:mem={args.memory}", **common)
    from dask_jobqueue import SLURMCluster

    return SLURMCluster(job_cpu=args.cores, **common)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", nargs="?", help="sweep file (TOML)")
    parser.add_argument("-o", "--output", help="sweep output directory")
    parser.add_argument("--jobs", type=int, default=2, help="batch jobs to start (default 2)")
    parser.add_argument("--adapt", type=int, metavar="MAX_JOBS", help="scale between 0 and MAX_JOBS jobs instead")
    parser.add_argument("--cores", type=int, default=32, help="CPUs booked per job")
    parser.add_argument("--processes", type=int, default=16, help="Dask workers (task slots) per job")
    parser.add_argument("--memory", default="64GB", help="memory per job")
    parser.add_argument("--walltime", default="02:00:00")
    parser.add_argument("--queue", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--lifetime", default=None, help="retire workers before the walltime, e.g. 110m")
    parser.add_argument("--pbs", action="store_true", help="PBSCluster instead of SLURMCluster")
    parser.add_argument("--venv", default=None, help="virtualenv to activate in the job")
    parser.add_argument("--numba-cache", default=".numba_cache")
    parser.add_argument("--local-directory", default=None, help="node-local scratch for Dask")
    parser.add_argument("--log-directory", default="dask-logs")
    parser.add_argument("--dry-run", action="store_true", help="print the job script and exit")
    args = parser.parse_args(argv)

    cluster = make_cluster(args)
    try:
        if args.dry_run:
            print(cluster.job_script())
            return 0
        if not args.sweep or not args.output:
            parser.error("SWEEP and -o OUTDIR are needed unless --dry-run")
        from distributed import Client

        from ddln_fast.errors import InputError
        from ddln_fast.sweep import load_sweep, run_sweep

        try:
            sweep = load_sweep(args.sweep)  # validated before any job is submitted
        except InputError as err:
            print(f"Error: {err}", file=sys.stderr)
            return 2
        if args.adapt:
            cluster.adapt(minimum_jobs=0, maximum_jobs=args.adapt)
        else:
            cluster.scale(jobs=args.jobs)
        with Client(cluster) as client:
            print(f"scheduler {cluster.scheduler_address}; waiting for the first worker...")
            client.wait_for_workers(1)
            result = run_sweep(sweep, Path(args.output), client=client, progress=True)
        print(f"{len(result.rows) - result.failed} of {len(result.rows)} tasks complete, "
              f"{result.failed} failed; summary in {args.output}/summary.csv")
        return 1 if result.failed or result.interrupted else 0
    finally:
        cluster.close()


if __name__ == "__main__":
    sys.exit(main())
