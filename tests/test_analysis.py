"""analysis.py and the ``ddln predict`` / ``ddln analyze`` commands.

References (independent of the package): the PL constant as the smallest eigenvalue of
X X^T / n (numpy eigvalsh), c_A = min_i prod_{k != j*} ((u^k_i)^2 - (u^{j*}_i)^2) by a loop over
layers, the time to epsilon by a direct scan of the stored losses, the asymptotic rate of the
linearized mirror flow, between 2 lambda_min^+ and 2 lambda_max of H^{1/2} X^T X H^{1/2} / n at the limit; the convergence
bounds are theorems (docs/theory.md, "Convergence bounds"), checked at every checkpoint of dopri5
runs at rtol 1e-10. Bad input: exit code 2 and one line on stderr, no traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from ddln_fast import Config, simulate
from ddln_fast.analysis import EPSILON, analyze, analyze_run
from ddln_fast.cli import main
from ddln_fast.simulate import run_simulation


def c_a_reference(u0):
    L, d = u0.shape
    values = []
    for i in range(d):
        mags = np.abs(u0[:, i])
        j = int(np.argmin(mags))
        values.append(np.prod([u0[k, i] ** 2 - u0[j, i] ** 2 for k in range(L) if k != j]))
    return min(values)


def h_of_layers(u):
    """h = sum_j prod_{k != j} (u^k)^2 of layers u (L, d), by a loop over the layers."""
    return sum(np.prod(np.delete(u, j, axis=0) ** 2, axis=0) for j in range(u.shape[0]))


def random_config(L, seed, **extra):
    tables = {"problem": {"n": 6, "d": 14, "sparsity": 3, "seed": seed, "per_seed_data": False},
              "model": {"depth": L, "alpha": 0.6, "init": "gaussian", "jitter": 0.4, "signs": "random"},
              "integrator": {"rtol": 1e-10, "atol": 1e-14, "t_end": 400.0},
              "run": {"seeds": 2, "checkpoints": 60, "seed": seed}}
    for key, value in extra.items():
        section, name = key.split("__")
        tables[section][name] = value
    return Config.from_dict(tables)


@pytest.mark.parametrize("L,seed", [(2, 1), (3, 2), (4, 3)])
def test_bounds_hold_at_every_checkpoint_and_rates(L, seed):
    run = simulate(random_config(L, seed))
    result = analyze_run(run)
    X = run.X
    mu_ref = np.linalg.eigvalsh(X @ X.T / X.shape[0]).min()
    np.testing.assert_allclose(result.mu[0], mu_ref, rtol=1e-10)
    for sa in result.seeds:
        assert sa.bound_pl_c_a_held and sa.bound_pl_trajectory_held and sa.bound_sublinear_held
        np.testing.assert_allclose(sa.pl_rate, 2 * mu_ref * c_a_reference(run.u0[sa.seed]), rtol=1e-10)
        # the curves themselves: loss gap below every bound at every checkpoint
        c = sa.curves
        for name in ("bound_pl_c_a", "bound_pl_trajectory", "bound_sublinear"):
            assert np.all(c["gap"] <= c[name] * (1 + 1e-6) + 1e-13 * c["gap"][0]), name
        # the integral of min h is at least c_A t: the trajectory bound is the sharper one
        assert np.all(c["bound_pl_trajectory"] <= c["bound_pl_c_a"] * (1 + 1e-12))
        # asymptotic rate of the linearized mirror flow at the limit, 2 lambda_min^+(H^1/2 X^T X H^1/2 / n),
        # h from the last simulated layers (at the limit to the run's tolerance)
        H = np.sqrt(h_of_layers(run.u[-1, sa.seed]))
        M = (H[:, None] * (X.T @ X) * H[None, :]) / X.shape[0]
        eig = np.linalg.eigvalsh(M)
        eig = eig[eig > 1e-9 * eig.max()]
        # near the limit f - f* is a mixture of exp(-2 lambda t) over these eigenvalues: the
        # fitted rate lies between the slowest and the fastest (5%: the fit window's curvature)
        assert 0.95 * 2 * eig.min() <= sa.fitted_rate <= 1.05 * 2 * eig.max()
        assert sa.fitted_rate >= 0.95 * sa.pl_rate_at_limit
        # time to epsilon: the first stored time with relative gap <= EPSILON brackets it
        t = run.t_seed[:, sa.seed]
        rel = (run.loss[:, sa.seed] - sa.f_star) / (run.loss[0, sa.seed] - sa.f_star)
        k = int(np.flatnonzero(rel <= EPSILON)[0])
        assert t[k - 1] <= sa.time_to_epsilon <= t[k]
        assert sa.gap_to_prediction < 1e-6 and sa.kkt_residual < 1e-8


def test_bound_violation_is_detected():
    """A positive control of analyze_seed itself: the loss curve of a real run passes its checks,
    the same run with f - f* decaying at half the guaranteed PL rate (2 mu c_A, computed here
    from numpy's eigenvalues and the c_A loop) fails the PL bound with c_A."""
    from ddln_fast.analysis import analyze_seed

    run = simulate(random_config(3, 4))
    X, y = run.X, run.y
    t, theta = run.t_seed[:, 0], run.theta[:, 0]
    mu = np.linalg.eigvalsh(X @ X.T / X.shape[0]).min()
    rate = 2 * mu * c_a_reference(run.u0[0])
    drift = float(run.invariant_drift[:, 0].max())
    real = analyze_seed(0, t, run.loss[:, 0], theta, run.u0[0], X, y, drift, "t_end")
    assert real.bound_pl_c_a_held and real.bound_pl_trajectory_held and real.bound_sublinear_held
    f_star = real.f_star
    slow = f_star + (run.loss[0, 0] - f_star) * np.exp(-0.5 * rate * t)
    flagged = analyze_seed(0, t, slow, theta, run.u0[0], X, y, drift, "t_end")
    assert flagged.bound_pl_c_a_held is False


def test_analyze_sees_a_run_while_it_is_being_written(tmp_path):
    """At checkpoint 8 of a streaming run another process runs ``ddln analyze --json``: it sees
    the committed checkpoints only, and the file is marked incomplete."""
    out = tmp_path / "live.h5"
    seen = {}

    def on_checkpoint(k, t, integrator):
        if k == 8:
            proc = subprocess.run([sys.executable, "-m", "ddln_fast.cli", "analyze", str(out), "--json"],
                                  capture_output=True, text=True, timeout=300)
            seen["proc"] = proc

    run_simulation(random_config(3, 5), out, on_checkpoint=on_checkpoint)
    proc = seen["proc"]
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["complete"] is False and data["committed_checkpoints"] == 9
    assert len(data["seeds"]) == 2
    final = analyze(out)
    assert final.complete and final.committed == 60


def test_analyze_cli_json_and_plots(tmp_path, capsys):
    out = tmp_path / "run.h5"
    simulate(random_config(2, 6), out)
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", str(out), "--json", "--plots", str(tmp_path / "plots")])
    assert exit_info.value.code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["seeds"][0]["bound_sublinear_held"] is True
    for name in ("loss.png", "theta_seed0.png", "theta_seed1.png", "gap.png"):
        png = tmp_path / "plots" / name
        assert png.stat().st_size > 10_000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_cli_json(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[problem]\nn = 6\nd = 20\nsparsity = 2\n[model]\ndepth = 3\nalpha = 0.01\n[run]\nseeds = 2\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(cfg), "--json", "--set", "model.alpha=0.001"])
    assert exit_info.value.code == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["seeds"]) == 2 and not data["projected"]
    # tiny uniform init: the limit is (close to) the minimum-l1 interpolator
    for row in data["seeds"]:
        assert row["distance_to_min_l1"] < 1e-2 * row["min_l1_norm"]
        assert row["dual_residual"] <= 1e-12


def _bad(argv, capsys, expect):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "Traceback" not in err, err
    assert expect in lines[0], lines[0]


def test_bad_input_exit_2_one_line(tmp_path, capsys):
    good = tmp_path / "run.h5"
    simulate(random_config(2, 7).with_overrides({"integrator.t_end": 5.0, "run.checkpoints": 5}), good)
    (tmp_path / "text.h5").write_text("not hdf5\n")
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = np.arange(3)
    data = good.read_bytes()
    (tmp_path / "truncated.h5").write_bytes(data[: len(data) // 3])
    balanced_run = tmp_path / "balanced.h5"
    with pytest.warns(UserWarning):
        simulate(random_config(2, 8).with_overrides({"model.init": "balanced", "model.jitter": 0.0,
                                                       "integrator.t_end": 2.0, "run.checkpoints": 3}),
                 balanced_run)
    balanced = tmp_path / "balanced.toml"
    balanced.write_text('[model]\ninit = "balanced"\ndepth = 3\n[problem]\nd = 20\nn = 5\n')
    cases = [
        (["analyze", str(tmp_path / "missing.h5")], "does not exist"),
        (["analyze", str(tmp_path / "text.h5")], "not an HDF5"),
        (["analyze", str(tmp_path / "foreign.h5")], "not a ddln_fast run"),
        (["analyze", str(tmp_path / "truncated.h5")], "truncated.h5"),
        (["analyze", str(tmp_path)], "directory"),
        (["predict", str(tmp_path / "missing.toml")], "does not exist"),
        (["predict", str(balanced)], "assumption (A)"),
        (["predict", str(balanced), "--set", "model.depth=zero"], "model.depth"),
        (["predict", str(balanced), "--set", "nokey"], "KEY=VALUE"),
    ]
    for argv, expect in cases:
        _bad(argv, capsys, expect)


def test_analyze_a_run_without_assumption_a_reports_what_it_can(tmp_path, capsys):
    """A balanced (sign-trap) run: exit 0; f - f*, the max drift and t(1e-6) per seed, read off
    the stored losses here, are printed; the prediction, KKT residual and bounds are n/a, said so."""
    out = tmp_path / "balanced.h5"
    with pytest.warns(UserWarning):
        run = simulate(random_config(2, 8).with_overrides({"model.init": "balanced", "model.jitter": 0.0,
                                                           "integrator.t_end": 50.0}), out)
    loss, drift = run.loss, run.invariant_drift
    run.close()
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", str(out), "--json"])
    assert exit_info.value.code == 0
    data = json.loads(capsys.readouterr().out)
    for s, seed in enumerate(data["seeds"]):
        assert "assumption (A)" in seed["note"]
        assert seed["gap_to_prediction"] is None and seed["bound_pl_c_a_held"] is None
        assert seed["max_invariant_drift"] == pytest.approx(drift[:, s].max(), rel=1e-15)
        assert seed["final_loss"] - seed["f_star"] == pytest.approx(loss[-1, s] - seed["f_star"], rel=1e-12)
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", str(out)])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "seed 0: assumption (A) fails" in text and "n/a n/a n/a" in text


def test_analyze_plots_the_chosen_seeds_and_says_which(tmp_path, capsys):
    out = tmp_path / "run.h5"
    simulate(random_config(2, 6).with_overrides({"run.seeds": 6, "integrator.t_end": 50.0}), out).close()
    with pytest.raises(SystemExit):
        main(["analyze", str(out), "--plots", str(tmp_path / "default")])
    text = capsys.readouterr().out
    assert "plots of seeds 0, 1, 2, 3 of 6" in text
    assert sorted(p.name for p in (tmp_path / "default").glob("theta_seed*.png")) == \
        [f"theta_seed{s}.png" for s in range(4)]
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", str(out), "--plots", str(tmp_path / "chosen"), "--seeds", "5,2"])
    assert exit_info.value.code == 0
    assert "plots of seeds 2, 5 of 6" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "chosen").glob("theta_seed*.png")) == \
        ["theta_seed2.png", "theta_seed5.png"]
    _bad(["analyze", str(out), "--plots", str(tmp_path / "bad"), "--seeds", "7"], capsys, "seeds 7")


def test_run_and_analyze_print_the_same_max_drift(tmp_path, capsys):
    """Both print the largest invariant drift over the checkpoints, read here with h5py."""
    config = tmp_path / "c.toml"
    config.write_text(random_config(3, 9).to_toml())
    out = tmp_path / "run.h5"
    with pytest.raises(SystemExit):
        main(["run", str(config), "-o", str(out), "--threads", "1"])
    run_text = capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["analyze", str(out)])
    analyze_text = capsys.readouterr().out
    with h5py.File(out, "r") as f:
        expected = f["checkpoints/invariant_drift"][:].max(axis=0)
    assert "max drift" in run_text and "max drift" in analyze_text
    for s, value in enumerate(expected):
        run_row = next(line.split() for line in run_text.splitlines() if line.split()[:2] == [str(s), "t_end"])
        analyze_row = next(line.split() for line in analyze_text.splitlines() if line.split()[:2] == [str(s), "t_end"])
        assert run_row[5] == analyze_row[4] == f"{value:.3g}"


def test_predict_warns_for_every_seed_whose_newton_is_not_at_tolerance(tmp_path, capsys):
    """alpha = 1e-8 at depth 3: the dual Newton stops above 1e-12 (the issue's case). One warning
    per such seed, naming it and the residual that --json reports."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("[problem]\nn = 20\nd = 60\n[model]\ndepth = 3\nalpha = 1e-8\n[run]\nseeds = 2\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(cfg), "--json"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 0
    data = json.loads(captured.out)
    warned = [line for line in captured.err.splitlines() if "not at tolerance" in line]
    bad = [row for row in data["seeds"] if row["dual_residual"] > 1e-12]
    assert bad and len(warned) == len(bad)
    for row in bad:
        line = next(w for w in warned if f"seed {row['seed']}:" in w)
        assert f"{row['dual_residual']:.2g}" in line
    cfg.write_text("[problem]\nn = 20\nd = 60\n[model]\ndepth = 3\nalpha = 0.5\n[run]\nseeds = 2\n")
    with pytest.raises(SystemExit):
        main(["predict", str(cfg), "--json"])
    captured = capsys.readouterr()
    assert all(row["dual_residual"] <= 1e-12 for row in json.loads(captured.out)["seeds"])
    assert "not at tolerance" not in captured.err


def test_bounds_are_not_checked_on_runs_that_are_not_gradient_flow():
    """The bounds are theorems about gradient flow: on sgd with batches and on momentum they are
    n/a (None), never VIOLATED; on plain full-batch gradient descent with a small step they are
    checked (and hold)."""
    base = {"problem.n": 12, "problem.d": 30, "problem.sparsity": 3, "model.depth": 2,
            "model.alpha": 0.5, "model.init": "gaussian", "model.jitter": 0.2, "run.seeds": 2,
            "run.checkpoints": 20, "integrator.method": "euler", "integrator.dt": 0.01,
            "integrator.t_end": 20.0}
    plain = analyze_run(simulate(Config().with_overrides(base)))
    assert all(sa.bound_pl_c_a_held is True and sa.bound_sublinear_held is True for sa in plain.seeds)
    for extra in ({"integrator.method": "sgd", "integrator.batch_size": 3},
                  {"integrator.momentum": 0.5}):
        result = analyze_run(simulate(Config().with_overrides({**base, **extra})))
        assert all(sa.bound_pl_c_a_held is None and sa.bound_pl_trajectory_held is None
                   and sa.bound_sublinear_held is None for sa in result.seeds), extra
