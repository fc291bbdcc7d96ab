"""`ddln run` and `ddln inspect` as a user runs them.

Reference: the command line of README.md, "Command line" (``ddln run [CONFIG.toml] [-o OUT.h5]
[--set KEY=VALUE]``, ``ddln inspect RUN.h5``) and the issue's promise for the summary (final loss
per seed or its quantiles, wall time, gradient evaluations, the file path). What the commands print is checked
against the file they wrote, read back with plain h5py, and against the config they were given.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import h5py
import numpy as np
import pytest

from ddln_fast.cli import main

TINY = """
[problem]
n = 6
d = 9
sparsity = 2

[model]
depth = 3
alpha = 0.5

[integrator]
t_end = 2.0

[run]
seeds = 2
checkpoints = 4
"""


def _ddln(*args, cwd) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "ddln"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "ddln_fast.cli"]
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "100"})


def _main(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_run_as_a_process_writes_the_file_and_names_it(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    out = tmp_path / "new folder" / "tiny.h5"  # a folder that does not exist yet
    proc = _ddln("run", str(config), "-o", str(out), "--set", "model.depth=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "ckpt" not in proc.stderr and "%|" not in proc.stderr  # not a terminal: no progress bar
    assert f"wrote {out}" in proc.stdout and "(complete)" in proc.stdout
    assert "wall time" in proc.stdout and "gradient evaluations" in proc.stdout
    with h5py.File(out, "r") as f:
        assert bool(f.attrs["complete"])
        assert tomllib.loads(f.attrs["config"])["model"]["depth"] == 2  # --set won over the file
        assert f["init/u"].shape == (2, 2, 9)
        loss = f["checkpoints/loss"][-1]
        nfev = f["checkpoints/nfev"][-1]
    # one summary line per seed (<= 8 seeds), with its final loss and gradient evaluations
    for s in range(2):
        line = next(row for row in proc.stdout.splitlines() if row.split()[:2] == [str(s), "t_end"])
        assert f"{loss[s]:.3g}" in line and str(nfev[s]) in line
    assert f"{int(nfev.sum())} gradient evaluations" in proc.stdout


def test_run_quiet_prints_only_the_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    code, out, err = _main(["run", str(config), "-o", "q.h5", "--quiet", "--no-progress"], capsys)
    assert code == 0, err
    assert out.strip() == "q.h5"
    # again without --overwrite is refused, with it replaces the file
    code, _, err = _main(["run", str(config), "-o", "q.h5", "--quiet"], capsys)
    assert code == 2 and "--overwrite" in err
    code, out, err = _main(["run", str(config), "-o", "q.h5", "--quiet", "--overwrite", "--set", "run.seeds=3"],
                           capsys)
    assert code == 0, err
    with h5py.File(tmp_path / "q.h5", "r") as f:
        assert f["init/u"].shape[0] == 3


def test_progress_flag_forces_the_bar(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    code, _, err = _main(["run", str(config), "-o", "p.h5", "--progress"], capsys)
    assert code == 0
    assert "ckpt" in err  # tqdm's bar, counted in checkpoints


def test_run_summary_of_many_seeds_gives_quantiles(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    code, out, err = _main(["run", str(config), "-o", "many.h5", "--set", "run.seeds=9", "--no-progress"], capsys)
    assert code == 0, err
    with h5py.File(tmp_path / "many.h5", "r") as f:
        loss = f["checkpoints/loss"][-1]
    assert "final loss over 9 seeds" in out
    assert f"min {np.min(loss):.3g}" in out and f"max {np.max(loss):.3g}" in out
    assert "wrote many.h5 (complete)" in out


def test_data_path_is_relative_to_the_config_file(tmp_path, monkeypatch, capsys):
    """problem.path in a TOML file is read relative to that file, not to the working folder."""
    folder = tmp_path / "configs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    X = rng.standard_normal((5, 7))
    np.savez(folder / "data.npz", X=X, y=X @ np.ones(7))
    (folder / "file.toml").write_text('[problem]\nkind = "file"\npath = "data.npz"\n'
                                      "[integrator]\nt_end = 1.0\n[run]\nseeds = 1\ncheckpoints = 3\n")
    monkeypatch.chdir(tmp_path)
    code, _, err = _main(["run", "configs/file.toml", "-o", "f.h5", "--quiet"], capsys)
    assert code == 0, err
    with h5py.File(tmp_path / "f.h5", "r") as f:
        np.testing.assert_array_equal(f["problem/X"][:], X)


def test_inspect_prints_config_shapes_and_status(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    code, _, err = _main(["run", str(config), "-o", "run.h5", "--quiet"], capsys)
    assert code == 0, err
    code, out, err = _main(["inspect", "run.h5"], capsys)
    assert code == 0, err
    with h5py.File(tmp_path / "run.h5", "r") as f:
        k = int(f["checkpoints/committed"][0])
        shapes = {name: f[name].shape for name in ("problem/X", "init/u", "checkpoints/theta", "checkpoints/u")}
        last_loss = f["checkpoints/loss"][-1]
    assert "complete" in out and f"{k} committed checkpoints" in out
    assert "seed status: 2 t_end" in out
    assert f"min {np.min(last_loss):.3g}" in out
    for name, shape in shapes.items():
        line = next(row for row in out.splitlines() if row.strip().startswith(f"/{name} "))
        assert str(shape) in line
    # the full resolved config, every table
    for table in ("[problem]", "[model]", "[integrator]", "[run]"):
        assert table in out
    assert "depth = 3" in out and "d = 9" in out
