"""Resume, stop requests, refusals and per-seed divergence, in-process (fast).

References:
- bit-identical resume: an uninterrupted run of the same config at the same thread count
  (threads = 1), compared byte for byte (docs/design.md, "Crash safety");
- stops between checkpoints: the saved state's times, checked against the checkpoint times of
  ``checkpoint_times`` recomputed here by hand (linspace, whole Euler steps);
- divergence: numpy's largest eigenvalue of X^T X / n of each seed, so that the bad seed has
  dt > 2 / lambda_max and the others dt < 2 / lambda_max; the healthy seeds must equal, byte for
  byte, a run on a data file without the bad seed (per-seed data: seeds do not interact);
- underflow: 10 ** (depth * log10(alpha)) and numpy's finfo, computed in the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest

from faults_support import assert_prefix_equal, assert_same_run_file, committed_arrays, file_fingerprint

BASE = {
    "problem": {"n": 16, "d": 24, "sparsity": 3},
    "model": {"depth": 3, "alpha": 0.5},
    "integrator": {"dt": 0.01, "t_end": 2.0, "rtol": 1e-7, "atol": 1e-10},
    "run": {"seeds": 3, "checkpoints": 9, "spacing": "linear"},
}


def config(method: str, **run):
    from ddln_fast import Config

    tables = {k: dict(v) for k, v in BASE.items()}
    tables["integrator"]["method"] = method
    tables["run"].update(run)
    return Config.from_dict(tables)


def reference_run(cfg, path):
    from ddln_fast.simulate import run_simulation

    run_simulation(cfg, path, threads=1).run.close()
    return path


def stop_request(at_checkpoint: int, after_evaluations: int, product: str = "residual_and_gradient"):
    """An on_checkpoint hook that, after checkpoint ``at_checkpoint``, sends SIGINT to this
    process at the ``after_evaluations``-th call of the solver's ``products.<product>`` (a
    gradient evaluation; 0: right away, i.e. at the checkpoint). The handler only sets a flag;
    the integrator stops before its next step."""

    def hook(k, t, integrator):
        if k != at_checkpoint:
            return
        if after_evaluations == 0:
            os.kill(os.getpid(), signal.SIGINT)
            return
        integrator.compiled_loop_work = -1  # every step from Python, through the products below
        products = integrator.products
        original = getattr(products, product)
        calls = [0]

        def counting(*args, **kwargs):
            calls[0] += 1
            if calls[0] == after_evaluations:
                os.kill(os.getpid(), signal.SIGINT)
            return original(*args, **kwargs)

        setattr(products, product, counting)

    return hook


@pytest.mark.parametrize("method, evaluations", [
    ("euler", 3), ("euler", 0), ("rk4", 9), ("dopri5", 2), ("dopri5", 0)])
def test_stop_then_resume_is_bit_identical(tmp_path, method, evaluations):
    """A stop between two checkpoints (evaluations > 0) saves the state where it is; a stop at a
    checkpoint (0) resumes from that checkpoint's state. Either way: the reference's bytes."""
    from ddln_fast import open_run
    from ddln_fast.simulate import checkpoint_times, run_simulation

    cfg = config(method)
    ref = reference_run(cfg, tmp_path / "reference.h5")
    _, ref_arrays, _ = committed_arrays(ref)
    out = tmp_path / "stopped.h5"
    report = run_simulation(cfg, out, threads=1, on_checkpoint=stop_request(3, evaluations))
    report.run.close()
    assert report.interrupted == "SIGINT"
    k, arrays, complete = committed_arrays(out)
    assert not complete and k == 4
    assert_prefix_equal(ref_arrays, arrays, k)
    times = np.linspace(0.0, BASE["integrator"]["t_end"], BASE["run"]["checkpoints"])
    assert np.allclose(checkpoint_times(cfg), times)
    with open_run(out) as run:
        index, state = run.state()
    assert index == 3
    if evaluations:  # strictly between checkpoints 3 and 4
        assert np.all((state["t"] > times[3]) & (state["t"] < times[4])), state["t"]
    else:
        assert np.all(state["t"] == times[3])
    resumed = run_simulation(cfg, out, resume=True, threads=1)
    resumed.run.close()
    assert resumed.resumed_from == 3 and not resumed.interrupted
    assert_same_run_file(ref, out)


@pytest.mark.parametrize("method, evaluations, model, descent", [
    ("euler", 3, {"parametrization": "difference", "depth": 3}, {}),
    ("dopri5", 2, {"parametrization": "difference", "depth": 2}, {}),
    ("rk4", 5, {"parametrization": "power", "power": 2.5, "init": "balanced"}, {}),
    ("dopri5", 2, {"parametrization": "power", "power": 3.0, "init": "gaussian", "jitter": 0.1}, {}),
    ("euler", 3, {"parametrization": "difference", "depth": 3}, {"momentum": 0.5, "weight_decay": 0.01}),
    ("euler", 4, {"parametrization": "power", "power": 2.5, "init": "balanced"},
     {"momentum": 0.5, "nesterov": True, "label_noise": 0.1})])
def test_stop_then_resume_is_bit_identical_for_every_parametrization(tmp_path, method, evaluations, model,
                                                                      descent):
    """As above, for the difference and power parametrizations (2L or 2 layer rows), also with
    momentum (the velocity of both halves is part of the saved state)."""
    from ddln_fast import Config
    from ddln_fast.simulate import run_simulation

    tables = {k: dict(v) for k, v in BASE.items()}
    tables["integrator"].update(method=method, **descent)
    tables["model"].update(model)
    cfg = Config.from_dict(tables)
    ref = reference_run(cfg, tmp_path / "reference.h5")
    out = tmp_path / "stopped.h5"
    report = run_simulation(cfg, out, threads=1, on_checkpoint=stop_request(3, evaluations))
    report.run.close()
    assert report.interrupted == "SIGINT" and committed_arrays(out)[0] == 4
    run_simulation(cfg, out, resume=True, threads=1).run.close()
    assert_same_run_file(ref, out)


def test_dopri5_resume_from_its_first_checkpoint(tmp_path):
    """At checkpoint 0 dopri5 has no FSAL stage yet (it is computed by the first step): the
    resume must start it, not reuse the zeros of the slot."""
    from ddln_fast.simulate import run_simulation

    cfg = config("dopri5")
    ref = reference_run(cfg, tmp_path / "reference.h5")
    out = tmp_path / "stopped.h5"
    run_simulation(cfg, out, threads=1, on_checkpoint=stop_request(0, 0)).run.close()
    assert committed_arrays(out)[0] == 1
    run_simulation(cfg, out, resume=True, threads=1).run.close()
    assert_same_run_file(ref, out)


def test_file_without_a_committed_checkpoint_is_started_again(tmp_path):
    """A run killed after creating its file but before committing checkpoint 0."""
    from ddln_fast.init import initial_layers
    from ddln_fast.integrators import Integrator
    from ddln_fast.problem import make_problem
    from ddln_fast.simulate import run_simulation
    from ddln_fast.provenance import provenance
    from ddln_fast.store import RunWriter

    cfg = config("euler")
    ref = reference_run(cfg, tmp_path / "reference.h5")
    out = tmp_path / "empty.h5"
    problem = make_problem(cfg)
    u0 = initial_layers(cfg, problem.d)
    shapes = Integrator("euler", problem, u0).state_shapes()
    writer = RunWriter.create(out, cfg, problem, u0, provenance(1), shapes)
    writer.close()
    assert committed_arrays(out)[0] == 0
    run_simulation(cfg, out, resume=True, threads=1).run.close()
    assert_same_run_file(ref, out)


def cli(argv, capsys):
    """``ddln ARGV`` in this process: (exit code, stdout, stderr)."""
    from ddln_fast.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def write_toml(path, cfg):
    path.write_text(cfg.to_toml())
    return path


def test_resume_of_a_complete_run_says_so_and_changes_nothing(tmp_path, capsys):
    cfg = config("euler")
    toml = write_toml(tmp_path / "c.toml", cfg)
    out = reference_run(cfg, tmp_path / "done.h5")
    before = file_fingerprint(out)
    code, stdout, stderr = cli(["run", toml, "-o", out, "--resume", "--threads", 1], capsys)
    assert code == 0 and "already complete" in stdout and stderr == ""
    assert file_fingerprint(out) == before


@pytest.mark.parametrize("overrides, keys", [
    (["--set", "model.alpha=0.25"], ["model.alpha"]),
    (["--set", "integrator.t_end=3.0", "--set", "run.seeds=2"], ["integrator.t_end", "run.seeds"]),
])
def test_resume_with_another_config_is_refused_naming_the_keys(tmp_path, capsys, overrides, keys):
    from ddln_fast.simulate import run_simulation

    cfg = config("euler")
    toml = write_toml(tmp_path / "c.toml", cfg)
    out = tmp_path / "stopped.h5"
    run_simulation(cfg, out, threads=1, on_checkpoint=stop_request(2, 0)).run.close()
    before = file_fingerprint(out)
    code, stdout, stderr = cli(["run", toml, *overrides, "-o", out, "--resume", "--threads", 1], capsys)
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    for key in keys:
        assert key in stderr
    assert "differs" in stderr
    assert file_fingerprint(out) == before


def test_resume_with_other_threads_warns(tmp_path):
    """The resume runs as a ddln process with NUMBA_NUM_THREADS = 2, so that 2 threads exist
    whatever the number of cores here."""
    from faults_support import cli_env
    from ddln_fast.simulate import run_simulation

    cfg = config("euler")
    toml = write_toml(tmp_path / "c.toml", cfg)
    out = tmp_path / "stopped.h5"
    run_simulation(cfg, out, threads=1, on_checkpoint=stop_request(2, 0)).run.close()
    resumed = subprocess.run([sys.executable, "-m", "ddln_fast.cli", "run", str(toml), "-o", str(out),
                              "--resume", "--threads", "2", "--quiet"], capture_output=True, text=True,
                             timeout=300, env={**cli_env(), "NUMBA_NUM_THREADS": "2"})
    assert resumed.returncode == 0, resumed.stderr
    assert "threads 1 -> 2" in resumed.stderr and "not be bit-identical" in resumed.stderr


def _foreign_hdf5(path):
    import h5py

    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)


def _truncated_run(path, source):
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 3])


@pytest.mark.parametrize("kind", ["foreign_hdf5", "truncated_run", "not_hdf5", "empty", "directory"])
def test_resume_of_a_file_that_is_not_a_resumable_run_is_refused(tmp_path, capsys, kind):
    cfg = config("euler")
    toml = write_toml(tmp_path / "c.toml", cfg)
    out = tmp_path / "bad.h5"
    if kind == "foreign_hdf5":
        _foreign_hdf5(out)
    elif kind == "truncated_run":
        _truncated_run(out, reference_run(cfg, tmp_path / "whole.h5"))
    elif kind == "not_hdf5":
        out.write_text("x = 1\n")
    elif kind == "empty":
        out.write_bytes(b"")
    else:
        out.mkdir()
    before = file_fingerprint(out) if out.is_file() else None
    code, stdout, stderr = cli(["run", toml, "-o", out, "--resume", "--threads", 1], capsys)
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert "Traceback" not in stderr and str(out) in stderr
    if before is not None:
        assert file_fingerprint(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if ".creating" in p.name or ".rebuild" in p.name) == []


def test_existing_output_is_refused_without_overwrite_and_replaced_with_it(tmp_path, capsys):
    cfg = config("euler")
    toml = write_toml(tmp_path / "c.toml", cfg)
    out = tmp_path / "old.h5"
    out.write_bytes(b"precious data")
    before = file_fingerprint(out)
    code, _, stderr = cli(["run", toml, "-o", out, "--threads", 1], capsys)
    assert code == 2 and "exists" in stderr and "--overwrite" in stderr and "--resume" in stderr
    assert file_fingerprint(out) == before
    code, stdout, stderr = cli(["run", toml, "-o", out, "--overwrite", "--threads", 1], capsys)
    assert code == 0, stderr
    ref = reference_run(cfg, tmp_path / "reference.h5")
    assert_same_run_file(ref, out)


def test_a_file_being_written_by_another_process_is_not_resumed(tmp_path, capsys):
    """The writer lock: another process holds it (a second process is needed, POSIX locks do
    not exclude their own process)."""
    from ddln_fast.simulate import run_simulation

    cfg = config("euler")
    toml = write_toml(tmp_path / "c.toml", cfg)
    out = tmp_path / "busy.h5"
    run_simulation(cfg, out, threads=1, on_checkpoint=stop_request(2, 0)).run.close()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(out)!r}, os.O_RDWR)\n"
        "fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 1 << 62)\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = file_fingerprint(out)
        code, _, stderr = cli(["run", toml, "-o", out, "--resume", "--threads", 1], capsys)
        assert code == 2 and "being written by another" in stderr, stderr
        code, _, stderr = cli(["run", toml, "-o", out, "--overwrite", "--threads", 1], capsys)
        assert code == 2 and "being written by another" in stderr, stderr
        assert file_fingerprint(out) == before
    finally:
        holder.kill()
        holder.wait()


# -- divergence -----------------------------------------------------------------------------------
def _per_seed_data(scale_seed1: float):
    from ddln_fast.problem import planted_sparse_regression

    rng = np.random.default_rng(7)
    S, n, d = 3, 16, 24
    X, y, star = np.empty((S, n, d)), np.empty((S, n)), np.empty((S, d))
    for s in range(S):
        X[s], y[s], star[s] = planted_sparse_regression(n, d, 3, 0.0, rng)
    X[1] *= scale_seed1
    y[1] *= scale_seed1
    return X, y, star


def _file_config(method, path, seeds, dt=0.05):
    from ddln_fast import Config

    return Config.from_dict({
        "problem": {"kind": "file", "path": str(path)}, "model": {"depth": 3, "alpha": 0.5},
        "integrator": {"method": method, "dt": dt, "t_end": 10.0, "rtol": 1e-7},
        "run": {"seeds": seeds, "checkpoints": 11, "spacing": "linear"}})


def test_a_diverging_seed_is_frozen_and_flagged_and_the_others_are_untouched(tmp_path, capsys):
    from ddln_fast import open_run
    from ddln_fast.integrators import STATUS_NAMES
    from ddln_fast.simulate import run_simulation

    dt = 0.05
    X, y, star = _per_seed_data(10.0)
    lam = np.array([np.linalg.eigvalsh(Xs.T @ Xs / Xs.shape[0]).max() for Xs in X])
    assert dt > 2 / lam[1] and np.all(dt < 2 / lam[[0, 2]])  # gradient descent's stability limit
    np.savez(tmp_path / "all.npz", X=X, y=y, theta_star=star)
    keep = [0, 2]
    np.savez(tmp_path / "healthy.npz", X=X[keep], y=y[keep], theta_star=star[keep])

    cfg = _file_config("euler", tmp_path / "all.npz", 3, dt)
    toml = write_toml(tmp_path / "all.toml", cfg)
    with warnings.catch_warnings():  # numpy's overflow warnings would not name the seed: the
        warnings.simplefilter("error", RuntimeWarning)  # status does, so none may escape
        code, stdout, stderr = cli(["run", toml, "-o", tmp_path / "all.h5", "--threads", 1], capsys)
    assert code == 0, stderr
    assert "seeds that did not finish: 1 (diverged)" in stdout
    run_simulation(_file_config("euler", tmp_path / "healthy.npz", 2, dt), tmp_path / "healthy.h5",
                   threads=1).run.close()

    with open_run(tmp_path / "all.h5") as run, open_run(tmp_path / "healthy.h5") as healthy:
        assert run.complete
        names = __import__("json").loads(run.file.attrs["status_names"])
        assert names == list(STATUS_NAMES)
        final = [names[v] for v in run.status[-1]]
        assert final == ["t_end", "diverged", "t_end"]
        t_stop = run.t_seed[-1, 1]
        assert 0 < t_stop < 10.0
        # frozen: from the checkpoint after it stopped on, its row does not change
        after = np.flatnonzero(run.t > t_stop)
        assert after.size >= 2 and np.all(run.t_seed[after, 1] == t_stop)
        assert np.all(run.status[after, 1] == names.index("diverged"))
        assert not np.isfinite(run.loss[-1, 1])
        assert np.all(run.nfev[after, 1] == run.nfev[after[0], 1])
        for name in ("t", "t_seed", "loss", "theta", "u", "invariant_drift", "nfev", "status"):
            a, b = getattr(run, name), getattr(healthy, name)
            if name != "t":
                a = a[:, keep]
            assert a.tobytes() == b.tobytes(), name


def test_a_seed_whose_adaptive_step_underflows_is_stalled_and_the_others_finish(tmp_path):
    """dopri5 on data scaled by 1e100 for seed 1: its stage derivatives overflow, every step is
    rejected and the step size shrinks below 16 eps t, the underflow test of Hairer's code."""
    from ddln_fast import open_run
    from ddln_fast.integrators import STATUS_NAMES
    from ddln_fast.simulate import run_simulation

    X, y, star = _per_seed_data(1e100)
    np.savez(tmp_path / "all.npz", X=X, y=y, theta_star=star)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # overflow inside the bad seed is expected, not printed
        run_simulation(_file_config("dopri5", tmp_path / "all.npz", 3), tmp_path / "all.h5",
                       threads=1).run.close()
    with open_run(tmp_path / "all.h5") as run:
        final = [STATUS_NAMES[v] for v in run.status[-1]]
        assert final[0] == final[2] == "t_end"
        assert final[1] in ("stalled", "diverged")
        assert run.complete and np.all(run.t_seed[-1, [0, 2]] == 10.0)


# -- initialization underflow ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype, alpha, depth", [("float64", 1e-20, 16), ("float32", 1e-4, 10)])
def test_initialization_underflow_is_warned_about_with_the_number(dtype, alpha, depth):
    from ddln_fast import Config
    from ddln_fast.init import initial_layers
    from ddln_fast.simulate import UnderflowWarning, check_initialization

    cfg = Config.from_dict({"problem": {"n": 4, "d": 5, "sparsity": 1},
                            "model": {"depth": depth, "alpha": alpha},
                            "run": {"seeds": 1, "dtype": dtype}})
    exponent = depth * np.log10(alpha)
    assert 10.0 ** exponent < np.finfo(dtype).tiny  # the case is an underflow indeed
    with pytest.warns(UnderflowWarning) as caught:
        check_initialization(cfg, initial_layers(cfg, 5))
    message = str(caught[0].message)
    assert f"e{int(np.floor(exponent))}" in message and f"{np.finfo(dtype).tiny:.3g}" in message
    safe = cfg.with_overrides({"model.alpha": 0.5})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnderflowWarning)
        check_initialization(safe, initial_layers(safe, 5))


# -- extending a finished run, warm starts ---------------------------------------------------------
def _seed_data(run, s):
    X, y = run.X, run.y
    return (X[s], y[s]) if X.ndim == 3 else (X, y)


def test_extending_t_end_continues_every_seed_in_the_same_file(tmp_path, capsys):
    """euler to t = 1, then --resume with t_end = 2: the old rows stay byte for byte, new rows
    follow, and the layers at t = 2 are 200 steps of the numpy gradient-descent loop."""
    from ddln_fast import open_run
    from references import gradient_descent

    cfg = config("euler").with_overrides({"integrator.t_end": 1.0})
    toml = write_toml(tmp_path / "c.toml", cfg)
    out = reference_run(cfg, tmp_path / "run.h5")
    _, before, _ = committed_arrays(out)
    code, stdout, stderr = cli(["run", toml, "--set", "integrator.t_end=2.0", "-o", out, "--resume",
                                "--threads", 1], capsys)
    assert code == 0, stderr
    k, after, complete = committed_arrays(out)
    assert complete and k > len(before["t"])
    assert_prefix_equal(before, {name: a[: len(before["t"])] for name, a in after.items()}, len(before["t"]))
    assert after["t"][-1] == pytest.approx(2.0) and np.all(np.diff(after["t"]) > 0)
    with open_run(out) as run:
        assert run.config.integrator.t_end == 2.0
        record = json.loads(run.file.attrs["extensions"])
        assert record[0]["changed"] == {"integrator.t_end": [1.0, 2.0]}
        assert record[0]["at_checkpoint"] == len(before["t"]) and record[0]["continued_seeds"] == [0, 1, 2]
        assert set(run.status_names()) == {"t_end"}
        for s in range(3):
            X, y = _seed_data(run, s)
            np.testing.assert_allclose(run.u[-1, s], gradient_descent(X, y, run.u0[s], 0.01, 200)[-1],
                                       rtol=0, atol=1e-12)


def test_extending_dopri5_matches_dop853(tmp_path):
    from ddln_fast import open_run
    from ddln_fast.simulate import run_simulation
    from references import reference_layers

    cfg = config("dopri5").with_overrides({"integrator.t_end": 1.0, "integrator.rtol": 1e-10,
                                           "integrator.atol": 1e-13})
    out = reference_run(cfg, tmp_path / "run.h5")
    run_simulation(cfg.with_overrides({"integrator.t_end": 3.0}), out, resume=True, threads=1).run.close()
    with open_run(out) as run:
        assert run.complete and run.t[-1] == 3.0
        for s in range(3):
            X, y = _seed_data(run, s)
            expected = reference_layers(X, y, run.u0[s], np.array([0.0, 3.0]))[-1]
            np.testing.assert_allclose(run.u[-1, s], expected, rtol=0, atol=1e-7)


def test_extending_max_steps_continues_the_seeds_it_stopped(tmp_path):
    """max_steps = 50 stops every seed at t = 0.5 of t_end = 2 (the run ends there, at its third
    checkpoint); max_steps = 1000 continues them through the remaining checkpoints to t = 2
    (200 numpy gradient-descent steps)."""
    from ddln_fast import open_run
    from ddln_fast.simulate import run_simulation
    from references import gradient_descent

    cfg = config("euler").with_overrides({"integrator.max_steps": 50})
    out = reference_run(cfg, tmp_path / "run.h5")
    with open_run(out) as run:
        assert set(run.status_names()) == {"max_steps"} and np.all(run.t_seed[-1] == 0.5)
        assert run.committed == 3
    run_simulation(cfg.with_overrides({"integrator.max_steps": 1000}), out, resume=True, threads=1).run.close()
    with open_run(out) as run:
        np.testing.assert_allclose(run.t, np.linspace(0.0, 2.0, 9), rtol=1e-15)
        assert set(run.status_names()) == {"t_end"} and np.all(run.t_seed[-1] == 2.0)
        for s in range(3):
            X, y = _seed_data(run, s)
            np.testing.assert_allclose(run.u[-1, s], gradient_descent(X, y, run.u0[s], 0.01, 200)[-1],
                                       rtol=0, atol=1e-12)


def test_extending_loss_tol_continues_below_the_new_tolerance(tmp_path):
    from ddln_fast import open_run
    from ddln_fast.simulate import run_simulation

    cfg = config("dopri5").with_overrides({"integrator.loss_tol": 1e-2, "integrator.t_end": 200.0})
    out = reference_run(cfg, tmp_path / "run.h5")
    with open_run(out) as run:
        assert set(run.status_names()) == {"loss_tol"}
    run_simulation(cfg.with_overrides({"integrator.loss_tol": 1e-5}), out, resume=True, threads=1).run.close()
    with open_run(out) as run:
        assert set(run.status_names()) == {"loss_tol"} and np.all(run.loss[-1] < 1e-5)


@pytest.mark.parametrize("overrides, expected", [
    (["--set", "integrator.t_end=1.0"], "may only make it larger"),
    (["--set", "integrator.loss_tol=0.1"], "may only make it smaller"),
    (["--set", "integrator.t_end=3.0", "--set", "model.alpha=0.25"], "model.alpha"),
])
def test_extensions_that_tighten_a_limit_or_change_the_run_are_refused(tmp_path, capsys, overrides, expected):
    cfg = config("euler")
    toml = write_toml(tmp_path / "c.toml", cfg)
    out = reference_run(cfg, tmp_path / "run.h5")
    before = file_fingerprint(out)
    code, _, stderr = cli(["run", toml, *overrides, "-o", out, "--resume", "--threads", 1], capsys)
    assert code == 2 and expected in stderr and len(stderr.strip().splitlines()) == 1
    assert file_fingerprint(out) == before


def test_an_extension_with_nothing_to_continue_says_so_and_changes_nothing(tmp_path, capsys):
    cfg = config("euler")
    toml = write_toml(tmp_path / "c.toml", cfg)
    out = reference_run(cfg, tmp_path / "run.h5")
    before = file_fingerprint(out)
    code, stdout, stderr = cli(["run", toml, "--set", "integrator.max_steps=20000000", "-o", out, "--resume"],
                               capsys)
    assert code == 0 and "nothing to extend" in stdout
    assert file_fingerprint(out) == before


def test_warm_start_from_the_last_layers_of_a_run(tmp_path, capsys):
    """A run to t = 1 (100 Euler steps), then a run of 100 more steps started from its last
    layers: the layers of 200 numpy steps from the first run's u0."""
    from ddln_fast import open_run
    from ddln_fast.simulate import run_simulation
    from references import gradient_descent

    first_cfg = config("euler").with_overrides({"integrator.t_end": 1.0})
    first = reference_run(first_cfg, tmp_path / "first.h5")
    warm = first_cfg.with_overrides({"model.init": "file", "model.init_path": str(first),
                                     "model.init_from": "last"})
    run_simulation(warm, tmp_path / "warm.h5", threads=1).run.close()
    with open_run(first) as a, open_run(tmp_path / "warm.h5") as b:
        assert b.u0.tobytes() == a.u[-1].tobytes()
        for s in range(3):
            X, y = _seed_data(a, s)
            np.testing.assert_allclose(b.u[-1, s], gradient_descent(X, y, a.u0[s], 0.01, 200)[-1],
                                       rtol=0, atol=1e-12)
    initial = first_cfg.with_overrides({"model.init": "file", "model.init_path": str(first)})
    run_simulation(initial, tmp_path / "again.h5", threads=1).run.close()
    with open_run(first) as a, open_run(tmp_path / "again.h5") as b:
        assert b.u0.tobytes() == a.u0.tobytes()  # "initial", the default, is the run's u0


def test_warm_start_from_a_run_without_saved_layers_is_refused(tmp_path, capsys):
    cfg = config("euler").with_overrides({"run.save_layers": False})
    first = reference_run(cfg, tmp_path / "first.h5")
    toml = write_toml(tmp_path / "c.toml", config("euler"))
    code, _, stderr = cli(["run", toml, "--set", "model.init=file", "--set", f'model.init_path="{first}"',
                           "--set", "model.init_from=last", "-o", tmp_path / "warm.h5"], capsys)
    assert code == 2 and "no saved layers" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "warm.h5").exists()


def test_a_recovery_copy_left_by_a_kill_is_removed_on_resume(tmp_path):
    """A process killed while it copied a run file into RUN.h5.rebuild leaves that copy; the
    next resume (which holds the writer lock) removes it and finishes the run exactly."""
    from ddln_fast.simulate import run_simulation

    cfg = config("euler")
    ref = reference_run(cfg, tmp_path / "reference.h5")
    out = tmp_path / "stopped.h5"
    run_simulation(cfg, out, threads=1, on_checkpoint=stop_request(2, 0)).run.close()
    stale = tmp_path / "stopped.h5.rebuild"
    stale.write_bytes(b"half a copy")
    run_simulation(cfg, out, resume=True, threads=1).run.close()
    assert not stale.exists()
    assert_same_run_file(ref, out)
