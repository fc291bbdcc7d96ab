"""Sweeps on Dask distributed (issue 5).

References, all independent of the sweep code:

- every task's result is compared with a plain ``ddln run`` of the task's config (the config
  written to a TOML file and run through the CLI with ``--threads 1``, the thread count every
  sweep task gets on these 2-worker, 2-core clusters). Same code, same threads, so the
  checkpoints must be BITWISE equal; any difference means the sweep changed the run (another
  config, other threads, a resume that is not exact, a file from the wrong task);
- the list of tasks is ``itertools.product`` of the grid in the test, times the zip entries;
- the summary metrics are recomputed here with numpy from the reference files (max/median of
  the final loss, sum of nfev, median l1 norm of the final theta);
- "no simulation work on rerun" and "exactly once" are read from the file system (inode and
  mtime of each run file) and from OUTDIR/sweep.log (one line per task event, all workers),
  never from timings.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

pytest.importorskip("distributed")

VENV_BIN = Path(sys.executable).parent
DEPTHS = [2, 3]
ALPHAS = [0.5, 1.0, 2.0]
SEEDS = [0, 1]  # zipped: problem.seed and run.seed together
CHECKPOINT_NAMES = ("t", "loss", "theta", "nfev", "status", "t_seed", "invariant_drift")

# per_seed_data: each seed's products are its own kernel call, whose bits do not depend on the
# thread count, so the 1-thread references hold whatever threads a task gets on this machine.
BASE_TOML = """\
[problem]
n = 10
d = 30
sparsity = 3
per_seed_data = true
[integrator]
method = "dopri5"
t_end = 50.0
[run]
seeds = 2
checkpoints = 60
"""

SWEEP_TOML = f"""\
base = "base.toml"
[set]
"run.save_layers" = false
[grid]
"model.depth" = {DEPTHS}
model.alpha = {ALPHAS}
[zip]
"problem.seed" = {SEEDS}
"run.seed" = {SEEDS}
"""


def call_ddln(*args) -> tuple[int, str, str]:
    """``ddln ARGS`` in this process through the console entry point: (exit code, stdout, stderr)."""
    from ddln_fast.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code or 0
    return code, out.getvalue(), err.getvalue()


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def log_events(outdir) -> list[tuple[str, str, int]]:
    """(event, task, pid) for every line of OUTDIR/sweep.log."""
    path = Path(outdir) / "sweep.log"
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        parts = line.split()
        events.append((parts[1], parts[2], int(parts[4])))
    return events


def run_files(outdir) -> dict[str, Path]:
    return {p.name: p for p in (Path(outdir) / "runs").iterdir()}


def file_identity(outdir) -> dict[str, tuple[int, int]]:
    return {name: (p.stat().st_ino, p.stat().st_mtime_ns) for name, p in run_files(outdir).items()}


def assert_same_checkpoints(path, reference):
    with h5py.File(path, "r") as a, h5py.File(reference, "r") as b:
        assert bool(a.attrs["complete"]) and bool(b.attrs["complete"])
        ka, kb = int(a["checkpoints/committed"][0]), int(b["checkpoints/committed"][0])
        assert ka == kb
        for name in CHECKPOINT_NAMES:
            np.testing.assert_array_equal(a["checkpoints"][name][:ka], b["checkpoints"][name][:kb],
                                          err_msg=f"{path}: /checkpoints/{name}")


def assert_all_tasks_match_references(outdir, tasks, references):
    files = run_files(outdir)
    assert sorted(files) == sorted(f"{t.id}.h5" for t in tasks), "exactly one complete file per task"
    for task in tasks:
        assert_same_checkpoints(files[f"{task.id}.h5"], references[task.id])


# -- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sweepdef")
    (folder / "base.toml").write_text(BASE_TOML)
    path = folder / "s12.toml"
    path.write_text(SWEEP_TOML)
    return path


@pytest.fixture(scope="module")
def tasks(sweep_file):
    from ddln_fast.sweep import load_sweep

    return load_sweep(sweep_file).tasks


@pytest.fixture(scope="module")
def references(tasks, tmp_path_factory) -> dict[str, Path]:
    """A plain ``ddln run`` of every task's config, 1 thread (also warms Numba's cache)."""
    folder = tmp_path_factory.mktemp("references")
    out = {}
    for task in tasks:
        config_path = folder / f"{task.id}.toml"
        config_path.write_text(task.config.to_toml())
        ref = folder / f"{task.id}.h5"
        code, stdout, stderr = call_ddln("run", config_path, "-o", ref, "--threads", "1", "--quiet",
                                         "--no-progress")
        assert code == 0, stderr
        out[task.id] = ref
    return out


@pytest.fixture(scope="module")
def local_sweep(sweep_file, references, tmp_path_factory):
    """The 12-task sweep through the CLI on a LocalCluster of 2 workers: (OUTDIR, stdout)."""
    outdir = tmp_path_factory.mktemp("local") / "out"
    code, stdout, stderr = call_ddln("sweep", sweep_file, "-o", outdir, "--workers", "2", "--no-progress")
    assert code == 0, stderr
    return outdir, stdout


def _start(args, log, **kw):
    return subprocess.Popen([str(a) for a in args], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, **kw)


def _stop(proc):
    """SIGKILL a process group this test started (and reap it)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory, references):
    """A real ``dask scheduler`` and two ``dask worker`` processes (1 thread each) on 127.0.0.1,
    on free ports chosen by the OS (``--port 0``); always stopped. Yields (address, workers)."""
    folder = tmp_path_factory.mktemp("dask")
    procs = []
    try:
        log = open(folder / "scheduler.log", "w")
        procs.append(_start([VENV_BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", "0",
                             "--no-dashboard"], log))
        address = None
        deadline = time.monotonic() + 60
        while address is None and time.monotonic() < deadline:
            found = re.search(r"Scheduler at:\s+(tcp://127\.0\.0\.1:\d+)", (folder / "scheduler.log").read_text())
            address = found.group(1) if found else None
            time.sleep(0.1)
        assert address, (folder / "scheduler.log").read_text()
        workers = []
        for name in ("wA", "wB"):
            wlog = open(folder / f"{name}.log", "w")
            proc = _start([VENV_BIN / "dask", "worker", address, "--nthreads", "1", "--nworkers", "1",
                           "--host", "127.0.0.1", "--no-dashboard", "--name", name,
                           "--local-directory", folder / name], wlog)
            procs.append(proc)
            workers.append(proc)
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        yield address, workers
    finally:
        for proc in reversed(procs):
            _stop(proc)


# -- the sweep file ------------------------------------------------------------------------------------
def test_tasks_are_the_grid_times_the_zip_with_stable_ids(sweep_file, tasks, tmp_path):
    from ddln_fast.sweep import load_sweep

    expected = [(d, a, s) for d, a in itertools.product(DEPTHS, ALPHAS) for s in SEEDS]
    got = [(t.point["model.depth"], t.point["model.alpha"], t.point["problem.seed"]) for t in tasks]
    assert got == expected
    for task in tasks:  # zip: varied together; set: applied everywhere; base: read
        assert task.config.run.seed == task.config.problem.seed
        assert task.config.run.save_layers is False and task.config.problem.d == 30
        assert task.config.model.depth == task.point["model.depth"]
    assert len({t.id for t in tasks}) == 12
    again = load_sweep(sweep_file).tasks  # same file, same ids: the rerun finds its files
    assert [t.id for t in again] == [t.id for t in tasks]
    other = tmp_path / "s.toml"  # one value changed: that task's id changes, the others' not
    (tmp_path / "base.toml").write_text(BASE_TOML)
    other.write_text(SWEEP_TOML.replace("2.0]", "3.0]"))
    changed = {t.id for t in load_sweep(other).tasks} ^ {t.id for t in tasks}
    assert len(changed) == 2 * 4


def test_task_ids_do_not_depend_on_where_the_sweep_lives(tmp_path):
    """The same sweep, with its data file, in two folders gives the same ids (the configs hold
    absolute paths, which differ); other data content gives other ids; a sweep without files
    keeps the id of its config (SHA-256 of the TOML without run.threads and without the keys
    added after the first release at their defaults, recomputed here)."""
    import hashlib

    import tomli_w

    from ddln_fast.config import ADDED_KEYS, Config
    from ddln_fast.sweep import load_sweep

    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((8, 12)), rng.standard_normal(8)
    text = '[set]\n"problem.path" = "data.npz"\n"run.seeds" = 1\n[grid]\n"model.depth" = [2, 3]\n'
    sweeps = []
    for place in ("a", "b/c"):
        folder = tmp_path / place
        folder.mkdir(parents=True)
        np.savez(folder / "data.npz", X=X, y=y)
        (folder / "s.toml").write_text(text)
        sweeps.append(load_sweep(folder / "s.toml").tasks)
    first, second = sweeps
    assert [t.config.problem.path for t in first] != [t.config.problem.path for t in second]
    assert [t.id for t in first] == [t.id for t in second]
    np.savez(tmp_path / "b/c/data.npz", X=X + 1.0, y=y)
    assert {t.id for t in load_sweep(tmp_path / "b/c/s.toml").tasks}.isdisjoint(t.id for t in first)

    (tmp_path / "plain.toml").write_text('[grid]\n"model.depth" = [2, 3]\n')
    for task in load_sweep(tmp_path / "plain.toml").tasks:
        tables, defaults = task.config.to_dict(), Config().to_dict()
        del tables["run"]["threads"]
        for section, key in (dotted.split(".") for dotted in ADDED_KEYS):
            if tables[section][key] == defaults[section][key]:
                del tables[section][key]
        assert task.id == hashlib.sha256(tomli_w.dumps(tables).encode()).hexdigest()[:16]


# -- LocalCluster --------------------------------------------------------------------------------------
def test_local_sweep_matches_plain_runs(local_sweep, sweep_file, tasks, references):
    from ddln_fast.store.schema import ROOT_ATTRIBUTES
    from ddln_fast.threads import available_cores

    outdir, stdout = local_sweep
    per_task = max(1, available_cores() // 2)  # cores // workers, whatever this machine has
    assert f"LocalCluster of 2 workers x 1 thread, {per_task} Numba/BLAS threads per task" in stdout
    assert_all_tasks_match_references(outdir, tasks, references)
    assert (outdir / "sweep.toml").read_text() == sweep_file.read_text()
    rows = read_csv(outdir / "summary.csv")
    assert len(rows) == 12 and all(r["status"] == "complete" for r in rows)
    assert [r["task"] for r in rows] == [t.id for t in tasks]
    for row, task in zip(rows, tasks):
        assert float(row["model.alpha"]) == task.point["model.alpha"]
        assert int(row["model.depth"]) == task.point["model.depth"]
        with h5py.File(references[task.id], "r") as f:  # the metrics, recomputed from the reference
            loss = f["checkpoints/loss"][-1]
            theta = f["checkpoints/theta"][-1]
            nfev = f["checkpoints/nfev"][-1]
            t_seed = f["checkpoints/t_seed"][-1]
        assert float(row["final_loss_max"]) == loss.max()
        assert float(row["final_loss_median"]) == np.median(loss)
        assert int(row["nfev"]) == nfev.sum()
        assert float(row["t_final"]) == t_seed.max()
        assert float(row["l1_norm"]) == pytest.approx(np.median(np.abs(theta).sum(axis=1)), rel=1e-15)
        assert float(row["seconds"]) > 0
    with h5py.File(outdir / "summary.h5", "r") as f:  # the same table
        table = f["summary"][:]
    assert [s.decode() for s in table["task"]] == [r["task"] for r in rows]
    np.testing.assert_array_equal(table["final_loss_max"], [float(r["final_loss_max"]) for r in rows])
    np.testing.assert_array_equal(table["model.depth"], [int(r["model.depth"]) for r in rows])
    for task, row in zip(tasks, rows):  # the task's attributes, added atomically to a closed file
        with h5py.File(outdir / "runs" / f"{task.id}.h5", "r") as f:
            assert f.attrs["sweep_task"] == task.id and int(f.attrs["sweep_threads"]) == per_task
            assert set(f.attrs) <= set(ROOT_ATTRIBUTES), "every attribute documented in the schema table"
            assert json.loads(f.attrs["sweep_summary"])["final_loss_max"] == float(row["final_loss_max"])
    starts = [e for e in log_events(outdir) if e[0] == "start"]
    assert sorted(t for _, t, _ in starts) == sorted(t.id for t in tasks)
    assert len({pid for *_, pid in starts}) == 2, "both workers ran tasks"


def test_summary_theory_columns(local_sweep, tasks, references):
    """gap_to_prediction = median over seeds of ||theta_K - theta_inf|| / ||theta_inf||, with
    theta_inf from ``predict_limit`` of the task's config (no run involved) and theta_K from the
    reference run; time_to_eps = median over seeds of the first time at which
    (f - f*) / (f0 - f*) <= 1e-6, interpolated log-linearly between checkpoints, recomputed
    here with f* from numpy's lstsq."""
    from ddln_fast.prediction import predict_limit

    outdir, _ = local_sweep
    rows = {r["task"]: r for r in read_csv(outdir / "summary.csv")}
    for task in tasks:
        row = rows[task.id]
        theta_inf = predict_limit(task.config)  # (S, d)
        with h5py.File(references[task.id], "r") as f:
            theta = f["checkpoints/theta"][-1]
            loss, t_seed = f["checkpoints/loss"][:], f["checkpoints/t_seed"][:]
            X, y = f["problem/X"][:], f["problem/y"][:]
        gaps = np.linalg.norm(theta - theta_inf, axis=1) / np.linalg.norm(theta_inf, axis=1)
        # both solve the projection onto {X theta = y} to 1e-12; the gaps here are 1e-10 .. 1e-2
        assert float(row["gap_to_prediction"]) == pytest.approx(np.median(gaps), rel=1e-6, abs=1e-10)
        assert float(row["predicted_l1_norm"]) == pytest.approx(np.median(np.abs(theta_inf).sum(axis=1)),
                                                                rel=1e-9)
        rate = float(row["fitted_rate"])
        assert np.isnan(rate) or rate > 0
        times = []
        for s in range(loss.shape[1]):
            solution = np.linalg.lstsq(X[s], y[s], rcond=None)[0]
            f_star = np.sum((X[s] @ solution - y[s]) ** 2) / (2 * len(y[s]))
            excess = np.maximum(loss[:, s] - f_star, 0.0) / (loss[0, s] - f_star)
            k = next((k for k in range(len(excess)) if excess[k] <= 1e-6), None)
            if k is None:
                continue
            lo, hi = np.log(excess[k - 1]), np.log(excess[k])
            times.append(t_seed[k - 1, s] + (lo - np.log(1e-6)) / (lo - hi) * (t_seed[k, s] - t_seed[k - 1, s]))
        expected = np.median(times) if times else float("nan")
        assert float(row["time_to_eps"]) == pytest.approx(expected, rel=1e-6, nan_ok=True)


def test_summary_reads_into_pandas(local_sweep, tasks):
    """summary_frame: pandas' read_csv of summary.csv, metrics as floats, equal to the CSV."""
    pandas = pytest.importorskip("pandas")
    from ddln_fast.sweep import METRICS, summary_frame

    outdir, _ = local_sweep
    frame = summary_frame(outdir)
    rows = read_csv(outdir / "summary.csv")
    assert list(frame["task"]) == [t.id for t in tasks]
    assert list(frame.columns) == list(rows[0])
    for metric in METRICS:
        assert pandas.api.types.is_numeric_dtype(frame[metric]), metric
        np.testing.assert_array_equal(frame[metric].to_numpy(dtype=float), [float(r[metric]) for r in rows])


def test_rerun_does_no_simulation_work(local_sweep, sweep_file):
    outdir, _ = local_sweep
    before, log_before = file_identity(outdir), log_events(outdir)
    code, stdout, stderr = call_ddln("sweep", sweep_file, "-o", outdir, "--no-progress")
    assert code == 0, stderr
    assert "12 complete, 0 to run" in stdout and "engine:" not in stdout  # no cluster at all
    assert file_identity(outdir) == before  # same inodes, same mtimes: no run file rewritten
    assert log_events(outdir) == log_before  # no task started anywhere
    assert len(read_csv(outdir / "summary.csv")) == 12


def test_sweep_report_prints_and_plots_the_pivot(local_sweep, tasks, references, tmp_path):
    outdir, _ = local_sweep
    code, stdout, stderr = call_ddln("sweep-report", outdir, "--metric", "l1_norm", "--x", "model.alpha",
                                     "--by", "model.depth", "--plots", tmp_path / "plots")
    assert code == 0, stderr
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("l1_norm: model.alpha"))
    assert lines[header].split()[-2:] == ["2", "3"]
    for i, alpha in enumerate(ALPHAS):  # median over the zipped tasks of each (alpha, depth)
        cells = lines[header + 1 + i].split()
        assert float(cells[0]) == alpha
        for j, depth in enumerate(DEPTHS):
            values = []
            for t in tasks:
                if t.point["model.alpha"] == alpha and t.point["model.depth"] == depth:
                    with h5py.File(references[t.id], "r") as f:
                        values.append(np.median(np.abs(f["checkpoints/theta"][-1]).sum(axis=1)))
            assert float(cells[1 + j]) == pytest.approx(np.median(values), rel=5e-3)  # 3 digits printed
    png = tmp_path / "plots" / "l1_norm_vs_model.alpha.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failing_task_is_reported_and_the_others_complete(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("good_a", "good_b", "bad"):
        X = rng.standard_normal((8, 12))
        if name == "bad":
            X[3, 4] = np.nan
        np.savez(tmp_path / f"{name}.npz", X=X, y=rng.standard_normal(8))
    sweep = tmp_path / "fail.toml"
    sweep.write_text('[set]\n"problem.kind" = "file"\n"run.seeds" = 1\n"run.checkpoints" = 5\n'
                     '"integrator.t_end" = 5.0\n'
                     '[grid]\n"problem.path" = ["good_a.npz", "bad.npz", "good_b.npz"]\n'
                     '"model.depth" = [2, 3]\n')
    code, stdout, stderr = call_ddln("sweep", sweep, "-o", tmp_path / "out", "--workers", "2", "--no-progress")
    assert code == 1
    failed_lines = [line for line in stderr.splitlines() if line.startswith("failed ")]
    assert len(failed_lines) == 2 and all("bad.npz" in line and "non-finite" in line for line in failed_lines)
    rows = read_csv(tmp_path / "out" / "summary.csv")
    assert len(rows) == 6
    for row in rows:
        bad = row["problem.path"].endswith("bad.npz")
        assert row["status"] == ("failed" if bad else "complete")
        assert ("non-finite" in row["message"]) == bad
    assert sorted(run_files(tmp_path / "out")) == sorted(f"{r['task']}.h5" for r in rows
                                                         if r["status"] == "complete")


# -- a real scheduler and workers, one killed mid-sweep ------------------------------------------
def test_remote_cluster_with_a_worker_killed_mid_sweep(dask_cluster, sweep_file, tasks, references, tmp_path):
    address, (worker_a, worker_b) = dask_cluster
    outdir = tmp_path / "out"
    with open(tmp_path / "sweep.out", "w") as out:
        sweep = _start([VENV_BIN / "ddln", "sweep", sweep_file, "-o", outdir, "--scheduler", address,
                        "--no-progress"], out)
        try:
            victim = _running_task_with_a_checkpoint(outdir, worker_b.pid, sweep)
            assert victim, "no task of worker B was caught running with a committed checkpoint"
            os.killpg(worker_b.pid, signal.SIGKILL)
            worker_b.wait(timeout=10)
            code = sweep.wait(timeout=180)
        finally:
            _stop(sweep)
    output = (tmp_path / "sweep.out").read_text()
    assert code == 0, output
    assert "12 of 12 tasks complete" in output
    names = sorted(os.listdir(outdir / "runs"))
    assert names == sorted(f"{t.id}.h5" for t in tasks), "no .part, no duplicates"
    assert_all_tasks_match_references(outdir, tasks, references)
    rows = read_csv(outdir / "summary.csv")
    assert sorted(r["task"] for r in rows) == sorted(t.id for t in tasks)
    assert all(r["status"] == "complete" for r in rows)
    events = log_events(outdir)
    done = [t for e, t, _ in events if e == "done"]
    assert sorted(done) == sorted(t.id for t in tasks), "every task completed exactly once"
    finisher = [pid for e, t, pid in events if e == "done" and t == victim][0]
    assert os.getpgid(finisher) == worker_a.pid, "the killed worker's task was retried on the other"
    retried = [e for e, t, _ in events if t == victim]
    assert retried[0] == "start" and retried[1] in ("resume", "restart", "start")


def _running_task_with_a_checkpoint(outdir, worker_pgid, sweep, timeout=120.0):
    """The first task that worker ``worker_pgid`` started, has committed a checkpoint to its .part
    file and has not finished: polled until one is seen (a task that finishes first is passed
    over for the next one). None if the sweep ended or the time ran out."""
    from ddln_fast import open_run

    passed_over = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and sweep.poll() is None:
        events = log_events(outdir)
        done = {t for e, t, _ in events if e == "done"}
        passed_over |= done
        for event, tid, pid in events:
            if event != "start" or tid in passed_over:
                continue
            try:
                if os.getpgid(pid) != worker_pgid:
                    continue
            except ProcessLookupError:
                continue
            part = Path(outdir) / "runs" / f"{tid}.h5.part"
            try:
                with open_run(part) as run:
                    committed = run.committed
            except Exception:  # noqa: BLE001 - not created yet, or renamed away: look again
                continue
            if committed >= 1 and part.exists():
                return tid
        time.sleep(0.002)
    return None


# -- interrupted and resumed -----------------------------------------------------------------------
def test_interrupted_sweep_completes_on_rerun(sweep_file, tasks, references, tmp_path):
    outdir = tmp_path / "out"
    with open(tmp_path / "sweep.out", "w") as out:
        sweep = _start([VENV_BIN / "ddln", "sweep", sweep_file, "-o", outdir, "--workers", "2",
                        "--no-progress"], out)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and sweep.poll() is None:
                events = log_events(outdir)
                done = {t for e, t, _ in events if e == "done"}
                running = [t for e, t, _ in events if e == "start" and t not in done
                           and (outdir / "runs" / f"{t}.h5.part").exists()]
                if len(done) >= 2 and running:
                    break
                time.sleep(0.05)
            os.killpg(sweep.pid, signal.SIGKILL)  # client, nannies and workers: a hard crash
            sweep.wait(timeout=10)
        finally:
            _stop(sweep)
    complete_before = {n: v for n, v in file_identity(outdir).items() if n.endswith(".h5")}
    parts_before = [n[:-len(".h5.part")] for n in os.listdir(outdir / "runs") if n.endswith(".part")]
    assert 2 <= len(complete_before) < 12 and parts_before, "the kill should land mid-sweep"
    events_before = len(log_events(outdir))

    code, stdout, stderr = call_ddln("sweep", sweep_file, "-o", outdir, "--workers", "2", "--no-progress")
    assert code == 0, stderr
    assert f"{len(complete_before)} complete, {12 - len(complete_before)} to run" in stdout
    assert_all_tasks_match_references(outdir, tasks, references)
    after = file_identity(outdir)
    assert all(after[n] == v for n, v in complete_before.items()), "finished runs were not touched"
    new_events = log_events(outdir)[events_before:]
    rerun = {t for e, t, _ in new_events if e in ("start", "resume", "restart")}
    assert rerun == {t.id for t in tasks} - {n[:-3] for n in complete_before}
    for tid in parts_before:  # a .part is continued (or restarted, said so), not silently redone
        assert [e for e, t, _ in new_events if t == tid][0] in ("resume", "restart")
    rows = read_csv(outdir / "summary.csv")
    assert len(rows) == 12 and all(r["status"] == "complete" for r in rows)


# -- bad sweep files ---------------------------------------------------------------------------------
BAD_SWEEPS = {
    "unknown top-level key": ('[grdi]\n"model.depth" = [2, 3]\n', "unknown top-level key 'grdi'"),
    "run-config table at top level": ("[model]\ndepth = 3\n", "put fixed values in [set]"),
    "zip lists of unequal length": ('[zip]\n"problem.seed" = [0, 1]\n"run.seed" = [0, 1, 2]\n',
                                    "equal lengths"),
    "empty list": ('[grid]\n"model.alpha" = []\n', "empty list"),
    "not a list": ('[grid]\n"model.depth" = 3\n', "expected a list"),
    "unknown config key": ('[grid]\n"model.deepth" = [2, 3]\n', 'unknown config key (did you mean "depth"?)'),
    "value failing validation": ('[grid]\n"model.depth" = [2, 0]\n', "model.depth = 0: expected an integer"),
    "wrong type for one task": ('[zip]\n"model.alpha" = [0.1, "big"]\n', "model.alpha = 'big'"),
    "same key in set and grid": ('[set]\n"model.depth" = 2\n[grid]\n"model.depth" = [2, 3]\n',
                                 "in both [set] and [grid]"),
    "missing base": ('base = "nope.toml"\n[grid]\n"model.depth" = [2]\n', "nope.toml does not exist"),
    "duplicate task": ('[grid]\n"model.depth" = [2, 2]\n', "are the same run"),
    "invalid TOML": ('[grid\n"model.depth" = [2]\n', "is not valid TOML"),
    "swept run.threads": ('[grid]\n"run.threads" = [1, 2]\n', "run.threads cannot be swept"),
    "key without section": ('[grid]\ndepth = [2, 3]\n', "expected SECTION.KEY"),
    "missing data file": ('[grid]\n"problem.path" = ["nope.npz"]\n', "cannot be read (No such file"),
}


@pytest.mark.parametrize("case", list(BAD_SWEEPS))
def test_bad_sweep_file_exit_2_one_line(case, tmp_path):
    text, expected = BAD_SWEEPS[case]
    path = tmp_path / "bad.toml"
    path.write_text(text)
    outdir = tmp_path / "out"
    code, stdout, stderr = call_ddln("sweep", path, "-o", outdir)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], stderr
    assert "Traceback" not in stderr
    assert not outdir.exists(), "nothing is created before the sweep file is valid"


def test_bad_arguments_exit_2_one_line(sweep_file, tmp_path):
    cases = [
        (("sweep", sweep_file, "-o", tmp_path / "o1", "--workers", "0"), "--workers 0"),
        (("sweep", sweep_file, "-o", tmp_path / "o2", "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"),
         "exclude each other"),
        (("sweep", tmp_path / "missing.toml", "-o", tmp_path / "o3"), "does not exist"),
        (("sweep", sweep_file, "-o", tmp_path / "o5", "--scheduler", "nonsense"), "cannot connect"),
        (("sweep", sweep_file, "-o", tmp_path / "o4", "--resume"), "no sweep to resume"),
        (("sweep-report", tmp_path / "nothing"), "does not exist"),
    ]
    (tmp_path / "afile").write_text("x")
    cases.append((("sweep", sweep_file, "-o", tmp_path / "afile"), "is a file"))
    for args, expected in cases:
        code, stdout, stderr = call_ddln(*args)
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and expected in lines[0], (args, stderr)
        assert not any(Path(a).exists() for a in args if str(a).startswith(str(tmp_path / "o")))


def test_outdir_of_another_sweep_needs_resume(local_sweep, tmp_path):
    outdir, _ = local_sweep
    other = tmp_path / "other.toml"
    other.write_text('[grid]\n"model.depth" = [2]\n')
    code, stdout, stderr = call_ddln("sweep", other, "-o", outdir)
    assert code == 2 and "holds a different sweep" in stderr and len(stderr.strip().splitlines()) == 1


# -- the dask-jobqueue example -----------------------------------------------------------------------
def test_jobqueue_example_writes_a_slurm_job_script(tmp_path):
    pytest.importorskip("dask_jobqueue")
    example = Path(__file__).resolve().parents[1] / "examples" / "sweep_on_slurm.py"
    result = subprocess.run([sys.executable, example, "--dry-run", "--jobs", "2", "--cores", "8",
                             "--processes", "4"], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert "#SBATCH" in script and "--cpus-per-task=8" in script and "--nthreads 1" in script
    assert "--nworkers 4" in script and "NUMBA_NUM_THREADS=2" in script
    assert "NUMBA_CACHE_DIR" in script


def test_a_second_sweep_on_the_same_outdir_is_refused(local_sweep, sweep_file):
    import fcntl

    outdir, _ = local_sweep
    with open(outdir / ".lock", "a+") as held:  # as a running ddln sweep holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = file_identity(outdir)
        code, stdout, stderr = call_ddln("sweep", sweep_file, "-o", outdir)
    assert code == 2 and "another ddln sweep is running" in stderr and len(stderr.strip().splitlines()) == 1
    assert file_identity(outdir) == before


def test_sweep_report_bad_arguments_exit_2_one_line(local_sweep, tmp_path):
    outdir, _ = local_sweep
    for args, expected in [(("--metric", "speed"), "--metric speed: expected one of"),
                           (("--x", "model.width"), "--x model.width: expected a swept key"),
                           (("--x", "model.depth", "--by", "model.depth"), "two different swept keys")]:
        code, stdout, stderr = call_ddln("sweep-report", outdir, *args, "--plots", tmp_path / "p")
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and expected in lines[0], (args, stderr)
        assert not (tmp_path / "p").exists()


def test_run_task_is_idempotent(tasks, references, tmp_path):
    """A task run twice (a retry after its result was lost) returns the same row without
    simulating again; a leftover .part that cannot be resumed is restarted, and says so."""
    from ddln_fast.sweep import run_task

    task = tasks[0]
    (tmp_path / "runs").mkdir()
    first = run_task(task.id, task.config, str(tmp_path), threads=1)
    final = tmp_path / "runs" / f"{task.id}.h5"
    identity = (final.stat().st_ino, final.stat().st_mtime_ns)
    second = run_task(task.id, task.config, str(tmp_path), threads=1)
    assert (final.stat().st_ino, final.stat().st_mtime_ns) == identity
    assert [e for e, t, _ in log_events(tmp_path)] == ["start", "done", "found"]
    assert {k: v for k, v in second.items() if k != "message"} == \
        {k: v for k, v in first.items() if k not in ("message", "analysis")}
    assert_same_checkpoints(final, references[task.id])

    other = tasks[1]  # garbage where a killed worker left its .part
    (tmp_path / "runs" / f"{other.id}.h5.part").write_bytes(b"not an HDF5 file")
    row = run_task(other.id, other.config, str(tmp_path), threads=1)
    assert row["status"] == "complete" and "restarted (could not resume" in row["message"]
    assert_same_checkpoints(tmp_path / "runs" / f"{other.id}.h5", references[other.id])


def test_summary_after_an_interrupt_reads_the_tasks_files(tmp_path, monkeypatch):
    """Ctrl-C arrives after the workers finished their tasks but before the client collected
    the results: the summary must report them from their files (complete), not as "not run"."""
    import distributed

    from ddln_fast.sweep import run_sweep

    (tmp_path / "base.toml").write_text(BASE_TOML)
    sweep = tmp_path / "two.toml"
    sweep.write_text('base = "base.toml"\n[grid]\n"model.depth" = [2, 3]\n')

    def interrupted(futures):
        distributed.wait(futures)  # every task ran to its end on a worker
        raise KeyboardInterrupt
        yield  # a generator, like distributed.as_completed

    monkeypatch.setattr(distributed, "as_completed", interrupted)
    result = run_sweep(sweep, tmp_path / "out", workers=2, progress=False, echo=lambda line: None)
    assert result.interrupted
    rows = read_csv(tmp_path / "out" / "summary.csv")
    assert [r["status"] for r in rows] == ["complete", "complete"]
    for row in rows:
        with h5py.File(tmp_path / "out" / "runs" / f"{row['task']}.h5", "r") as f:
            assert float(row["final_loss_max"]) == f["checkpoints/loss"][-1].max()


def test_report_plots_have_titles_log_axes_and_an_outside_legend(tmp_path, monkeypatch):
    """Values over three decades: log y axis; the legend sits right of the axes (no curve under
    it); a title names the metric and the keys."""
    import matplotlib.pyplot as plt

    from ddln_fast.sweep import plot_report

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    table = np.array([[1.0, 10.0], [30.0, 300.0], [900.0, 2000.0]])
    plot_report([0.5, 1.0, 2.0], [2, 3], table, "time_to_eps", "model.alpha", "model.depth",
                tmp_path / "p.png")
    ax = figures[0].axes[0]
    assert "time_to_eps" in ax.get_title() and "model.alpha" in ax.get_title() and "model.depth" in ax.get_title()
    assert ax.get_yscale() == "log"
    legend = ax.get_legend()
    assert legend is not None and len(legend.get_texts()) == 2
    figures[0].canvas.draw()
    box = legend.get_window_extent().transformed(ax.transAxes.inverted())
    assert box.x0 >= 1.0  # entirely right of the axes
