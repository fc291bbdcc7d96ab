"""Bad input to ``ddln run`` and ``ddln inspect``: exit code 2, one line on stderr that names
what is wrong, no traceback, and no file created or changed.

Reference: the exit codes of README.md, "Command line" (2 on bad input: config, data file,
init file or argument, with ONE line on stderr that names what is wrong; never a traceback) and
the issue's "no file created or changed": every file under the test folder (which is also the
working directory, where a default output would go) is fingerprinted (mtime, size, sha256)
before and after. Each case lists a word the message must contain, written from the input,
not copied from the code's messages.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from faults_support import file_fingerprint

GOOD = """
[problem]
n = 6
d = 5
sparsity = 2
[integrator]
method = "euler"
dt = 0.1
t_end = 0.2
[run]
seeds = 2
checkpoints = 2
"""


def _npz(path, **arrays):
    np.savez(path, **arrays)


def _good_data(path, seeds=None, **changes):
    rng = np.random.default_rng(0)
    shape = (6, 5) if seeds is None else (seeds, 6, 5)
    arrays = {"X": rng.standard_normal(shape), "y": rng.standard_normal(shape[:-1])}
    arrays.update(changes)
    _npz(path, **arrays)


def _run_file(path):
    """A small complete run file (in-process, a tiny Euler run)."""
    from ddln_fast import Config
    from ddln_fast.simulate import run_simulation

    import tomllib

    run_simulation(Config.from_dict(tomllib.loads(GOOD)), path, threads=1).run.close()


def _foreign_h5(path):
    with h5py.File(path, "w") as f:
        f["X"] = np.zeros(3)


# (case id, setup(tmp) -> None, argv (with {tmp} placeholders), word the message must contain)
CASES = [
    ("config_missing", None, ["run", "{tmp}/nope.toml"], "nope.toml"),
    ("config_is_dir", lambda t: (t / "cfgdir.toml").mkdir(), ["run", "{tmp}/cfgdir.toml"], "directory"),
    ("config_not_toml", lambda t: (t / "c.toml").write_text("[model\ndepth = 3"), ["run", "{tmp}/c.toml"], "TOML"),
    ("unknown_table", lambda t: (t / "c.toml").write_text("[modle]\ndepth = 3\n"), ["run", "{tmp}/c.toml"], "modle"),
    ("unknown_key", lambda t: (t / "c.toml").write_text(GOOD + "[model]\ndepht = 3\n"), ["run", "{tmp}/c.toml"], "depht"),
    ("wrong_type", None, ["run", "--set", 'model.depth="3"'], "model.depth"),
    ("depth_zero", None, ["run", "--set", "model.depth=0"], "model.depth"),
    ("unknown_method", None, ["run", "--set", "integrator.method=rk5"], "integrator.method"),
    ("one_checkpoint", None, ["run", "--set", "run.checkpoints=1"], "run.checkpoints"),
    ("float16", None, ["run", "--set", "run.dtype=float16"], "run.dtype"),
    ("negative_dt", None, ["run", "--set", "integrator.dt=-0.1"], "integrator.dt"),
    ("rtol_above_one", None, ["run", "--set", "integrator.rtol=2.0"], "integrator.rtol"),
    ("alpha_nan", None, ["run", "--set", "model.alpha=nan"], "model.alpha"),
    ("sparsity_above_d", None, ["run", "--set", "problem.d=3", "--set", "problem.sparsity=4"], "sparsity"),
    ("file_kind_without_path", None, ["run", "--set", "problem.kind=file"], "problem.path"),
    ("data_missing", None, ["run", "--set", "problem.kind=file", "--set", 'problem.path="{tmp}/none.npz"'], "none.npz"),
    ("data_without_y", lambda t: _npz(t / "d.npz", X=np.ones((6, 5))),
     ["run", "--set", "problem.kind=file", "--set", 'problem.path="{tmp}/d.npz"'], "'y'"),
    ("data_with_nan", lambda t: _good_data(t / "d.npz", X=np.full((6, 5), np.nan)),
     ["run", "--set", "problem.kind=file", "--set", 'problem.path="{tmp}/d.npz"'], "non-finite"),
    ("data_seed_count", lambda t: _good_data(t / "d.npz", seeds=3),
     ["run", "--set", "problem.kind=file", "--set", 'problem.path="{tmp}/d.npz"', "--set", "run.seeds=2"], "run.seeds"),
    ("data_y_shape", lambda t: _good_data(t / "d.npz", y=np.ones(7)),
     ["run", "--set", "problem.kind=file", "--set", 'problem.path="{tmp}/d.npz"'], "shape"),
    ("data_garbage_npz", lambda t: (t / "d.npz").write_bytes(b"not a zip file at all"),
     ["run", "--set", "problem.kind=file", "--set", 'problem.path="{tmp}/d.npz"'], "d.npz"),
    ("data_wrong_suffix", lambda t: (t / "d.csv").write_text("1,2\n"),
     ["run", "--set", "problem.kind=file", "--set", 'problem.path="{tmp}/d.csv"'], "d.csv"),
    ("shape_init_scales", None, ["run", "--set", "model.init=shape", "--set", "model.layer_scales=[1.0]"], "layer_scales"),
    ("file_init_without_path", None, ["run", "--set", "model.init=file"], "init_path"),
    ("init_file_missing", None, ["run", "--set", "model.init=file", "--set", 'model.init_path="{tmp}/u0.npy"'], "u0.npy"),
    ("set_without_equals", None, ["run", "--set", "model.depth"], "KEY=VALUE"),
    ("set_without_value", None, ["run", "--set", "model.depth="], "model.depth"),
    ("set_unknown_table", None, ["run", "--set", "modle.depth=3"], "modle"),
    ("negative_threads", None, ["run", "--threads", "-1"], "--threads"),
    ("resume_and_overwrite", None, ["run", "-o", "{tmp}/o.h5", "--resume", "--overwrite"], "--overwrite"),
    ("resume_without_output", None, ["run", "--resume"], "-o"),
    ("output_exists", lambda t: (t / "taken.h5").write_bytes(b"someone's data"), ["run", "-o", "{tmp}/taken.h5"], "taken.h5"),
    ("output_is_dir", lambda t: (t / "out.h5").mkdir(), ["run", "-o", "{tmp}/out.h5"], "directory"),
    ("output_under_a_file", lambda t: (t / "f.txt").write_text("x"), ["run", "-o", "{tmp}/f.txt/run.h5"], "f.txt"),
    ("unknown_option", None, ["run", "--fast"], "--fast"),
    ("inspect_missing", None, ["inspect", "{tmp}/none.h5"], "none.h5"),
    ("inspect_dir", lambda t: (t / "d.h5").mkdir(), ["inspect", "{tmp}/d.h5"], "directory"),
    ("inspect_not_hdf5", lambda t: (t / "t.h5").write_text("hello"), ["inspect", "{tmp}/t.h5"], "not an HDF5"),
    ("inspect_empty", lambda t: (t / "e.h5").write_bytes(b""), ["inspect", "{tmp}/e.h5"], "e.h5"),
    ("inspect_foreign_hdf5", lambda t: _foreign_h5(t / "f.h5"), ["inspect", "{tmp}/f.h5"], "not a ddln_fast run"),
    ("inspect_truncated_run", lambda t: (_run_file(t / "r.h5"),
                                         (t / "r.h5").write_bytes((t / "r.h5").read_bytes()[:2000])),
     ["inspect", "{tmp}/r.h5"], "r.h5"),
    ("inspect_no_argument", None, ["inspect"], "RUN.h5"),
    ("inspect_two_arguments", lambda t: _run_file(t / "r.h5"), ["inspect", "{tmp}/r.h5", "{tmp}/r.h5"], "argument"),
]


def _snapshot(folder):
    return {str(p.relative_to(folder)): file_fingerprint(p) if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("setup, argv, word", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_touches_no_file(tmp_path, monkeypatch, capsys, setup, argv, word):
    from ddln_fast.cli import main

    monkeypatch.chdir(tmp_path)  # a default output (runs/...) would land here, and be seen
    if setup is not None:
        setup(tmp_path)
    capsys.readouterr()
    before = _snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert "Traceback" not in err + out
    assert word in lines[0], lines[0]
    assert _snapshot(tmp_path) == before

