"""Sweeps over the step size and the batch size of SGD (issue 12), and the sweep report's mark of
the largest step at which every seed converged.

References: the run files themselves (each task's statuses, read with h5py) for the summary,
and rows written by hand for :func:`largest_converged_step` (the largest step whose tasks have
only loss_tol statuses, per batch size).
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

pytest.importorskip("distributed")


def test_largest_converged_step_per_line():
    from ddln_fast.sweep import largest_converged_step

    def row(dt, b, status, state="complete"):
        return {"integrator.dt": dt, "integrator.batch_size": b, "status": state, "seed_status": status}

    rows = [row(0.1, 2, "4xloss_tol"), row(0.2, 2, "4xloss_tol"), row(0.3, 2, "1xdiverged 3xloss_tol"),
            row(0.1, 5, "4xloss_tol"), row(0.2, 5, "4xloss_tol"), row(0.2, 5, "4xmax_steps"),  # pooled
            row(0.3, 5, "4xloss_tol"),  # larger steps converge again: the largest counts
            row(0.1, 20, "4xt_end"), row(0.2, 20, "", "failed")]
    assert largest_converged_step(rows, "integrator.dt", "integrator.batch_size") == {2: 0.2, 5: 0.3, 20: None}
    # without --by every task at a step counts: at 0.1 batch 20 ran out of time, so no step qualifies
    assert largest_converged_step(rows, "integrator.dt", None) == {None: None}
    assert largest_converged_step(rows[:4], "integrator.dt", None) == {None: 0.2}


def test_sweep_over_step_and_batch_size_and_its_report(tmp_path):
    """2 batch sizes x 3 steps on one worker: every task completes; the report names, per batch
    size, the largest step whose seeds all reached loss_tol (checked against the run files) and
    draws it as a vertical line in the plot."""
    import csv
    import json

    import matplotlib

    matplotlib.use("Agg")
    from click.testing import CliRunner

    from ddln_fast.cli import cli
    from ddln_fast.sweep import load_sweep, run_sweep

    (tmp_path / "base.toml").write_text(
        '[problem]\nn = 10\nd = 20\nsparsity = 2\nper_seed_data = false\n[model]\ndepth = 2\nalpha = 0.5\n'
        '[integrator]\nmethod = "sgd"\nbatch_size = 2\nt_end = 400.0\nloss_tol = 1e-12\n'
        '[run]\nseeds = 3\ncheckpoints = 20\nsave_layers = false\n')
    (tmp_path / "sweep.toml").write_text(
        'base = "base.toml"\n[grid]\n"integrator.batch_size" = [2, 10]\n"integrator.dt" = [0.05, 0.2, 3.0]\n')
    result = run_sweep(load_sweep(tmp_path / "sweep.toml"), tmp_path / "out", workers=1, progress=False,
                       echo=lambda line: None)
    assert result.failed == 0 and len(result.rows) == 6
    with open(tmp_path / "out" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    expected = {}
    for r in rows:
        with h5py.File(tmp_path / "out" / "runs" / f"{r['task']}.h5", "r") as f:
            names = json.loads(f.attrs["status_names"])
            status = {names[v] for v in f["checkpoints/status"][-1]}
        b, dt = int(r["integrator.batch_size"]), float(r["integrator.dt"])
        if status == {"loss_tol"}:
            expected[b] = max(expected.get(b, 0.0), dt)
    assert set(expected) == {2, 10} and 3.0 not in expected.values()  # a step of 3 diverges
    plots = tmp_path / "plots"
    out = CliRunner().invoke(cli, ["sweep-report", str(tmp_path / "out"), "--x", "integrator.dt", "--by",
                                   "integrator.batch_size", "--metric", "l1_norm", "--plots", str(plots)])
    assert out.exit_code == 0, out.output
    line = next(x for x in out.output.splitlines() if x.startswith("largest integrator.dt"))
    for b, dt in expected.items():
        assert f"{dt:g} (integrator.batch_size = {b})" in line
    assert (plots / "l1_norm_vs_integrator.dt.png").exists()


def test_report_plot_marks_the_largest_converged_step(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from ddln_fast.sweep import plot_report

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    table = np.array([[7.7, 7.7], [7.9, 7.1], [8.3, np.nan]])
    plot_report([0.05, 0.2, 0.6], [2, 20], table, "l1_norm", "integrator.dt", "integrator.batch_size",
                tmp_path / "p.png", converged={2: 0.2, 20: 0.6})
    ax = figures[0].axes[0]
    vertical = sorted(line.get_xdata()[0] for line in ax.get_lines()
                      if len(set(line.get_xdata())) == 1 and len(line.get_xdata()) == 2)
    assert vertical == [0.2, 0.6]
    assert sum("every seed at loss_tol" in t.get_text() for t in ax.get_legend().get_texts()) == 2


def test_task_ids_of_configs_without_the_new_keys_are_unchanged():
    """The id of a task that leaves the keys of issue 12 at their defaults is the SHA-256 of its
    TOML as it was before they existed (written here from the keys of that schema), so that a
    sweep run then finds its files again; setting one of them changes the id."""
    import hashlib

    import tomli_w

    from ddln_fast import Config
    from ddln_fast.sweep import task_id

    config = Config().with_overrides({"model.depth": 2, "integrator.method": "euler"})
    before = {"problem": ["kind", "n", "d", "sparsity", "noise", "seed", "per_seed_data", "path"],
              "model": ["depth", "alpha", "init", "jitter", "layer_scales", "init_path", "init_from", "signs"],
              "integrator": ["method", "dt", "rtol", "atol", "t_end", "max_steps", "loss_tol"],
              "run": ["seeds", "seed", "checkpoints", "spacing", "save_layers", "dtype", "swmr"]}
    tables = config.to_dict()
    old = {section: {key: tables[section][key] for key in keys} for section, keys in before.items()}
    assert task_id(config) == hashlib.sha256(tomli_w.dumps(old).encode()).hexdigest()[:16]
    assert task_id(config.with_overrides({"integrator.momentum": 0.5})) != task_id(config)
    assert task_id(config.with_overrides({"run.gain": True})) != task_id(config)
