"""Defaults and API edges that must not give a silent wrong answer: a data path without a kind,
seeds that are copies of one run, --set values that are paths, a thread count above the cores,
--resume of a missing file, and the Python API (config paths, numpy scalars, error wording,
Run's repr).

References: the data a run used is compared with the arrays written to the .npz by the test; the
seeds' data and initial layers are compared with each other; everything else is the behaviour
the issue asks for, written out by hand.
"""

from __future__ import annotations

import re
import warnings

import h5py
import numpy as np
import pytest

from ddln_fast.cli import main

SMALL = "[problem]\nn = 6\nd = 9\nsparsity = 2\n[integrator]\nt_end = 1.0\n[run]\nseeds = 3\ncheckpoints = 3\n"


def _main(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def _data(path, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((6, 9))
    np.savez(path, X=X, y=X @ rng.standard_normal(9))
    return X


# -- problem.path and problem.kind ------------------------------------------------------------------
def test_a_data_path_without_a_kind_is_the_data(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    X = _data(tmp_path / "mydata.npz")
    (tmp_path / "c.toml").write_text(SMALL)
    code, out, err = _main(["run", "c.toml", "--set", "problem.path=mydata.npz", "-o", "r.h5", "--quiet"], capsys)
    assert code == 0, err
    with h5py.File(tmp_path / "r.h5", "r") as f:
        np.testing.assert_array_equal(f["problem/X"][:], X)
    from ddln_fast import Config

    assert Config.from_dict({"problem": {"path": str(tmp_path / "mydata.npz")}}).problem.kind == "file"


def test_a_data_path_with_kind_gaussian_is_refused(tmp_path, capsys):
    _data(tmp_path / "d.npz")
    (tmp_path / "c.toml").write_text(f'[problem]\nkind = "gaussian"\npath = "{tmp_path / "d.npz"}"\n')
    code, out, err = _main(["run", tmp_path / "c.toml", "-o", tmp_path / "r.h5"], capsys)
    assert code == 2 and "problem.path" in err and 'kind = "gaussian"' in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r.h5").exists()


# -- seeds that differ ----------------------------------------------------------------------------------
def test_default_seeds_are_different_runs():
    """An empty config: each seed has its own data (so its own trajectory)."""
    from ddln_fast import Config
    from ddln_fast.init import initial_layers
    from ddln_fast.problem import make_problem
    from ddln_fast.simulate import check_seeds_differ

    config = Config().with_overrides({"problem.n": 5, "problem.d": 8, "problem.sparsity": 2})
    problem = make_problem(config)
    assert problem.X.shape == (8, 5, 8)
    assert all(not np.array_equal(problem.X[0], problem.X[s]) for s in range(1, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_seeds_differ(config, problem, initial_layers(config, problem.d))


@pytest.mark.parametrize("overrides, warned", [
    ({"problem.per_seed_data": False}, True),
    ({"problem.per_seed_data": False, "model.jitter": 0.1}, False),
    ({"problem.per_seed_data": False, "model.signs": "random"}, False),
    ({"problem.per_seed_data": False, "run.seeds": 1}, False),
    ({}, False),
])
def test_identical_seeds_are_warned_about_naming_the_fix(overrides, warned):
    from ddln_fast import Config, simulate
    from ddln_fast.simulate import IdenticalSeedsWarning

    config = Config().with_overrides({"problem.n": 5, "problem.d": 8, "problem.sparsity": 2,
                                      "integrator.t_end": 0.1, "run.checkpoints": 2, **overrides})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = simulate(config)
    messages = [str(w.message) for w in caught if issubclass(w.category, IdenticalSeedsWarning)]
    assert bool(messages) == warned
    if warned:
        assert "problem.per_seed_data = true" in messages[0] and "model.jitter" in messages[0]
        assert np.all(run.theta[-1] == run.theta[-1, :1])  # indeed one run repeated


# -- the command line -------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, value", [
    ("problem.path=mydata.npz", "mydata.npz"), ("problem.path=../data/x-1.npz", "../data/x-1.npz"),
    ("problem.path=/abs/2024-data.h5", "/abs/2024-data.h5"), ("model.init=balanced", "balanced"),
    ('problem.path="quoted.npz"', "quoted.npz"), ("model.depth=4", 4), ("model.alpha=1e-3", 1e-3),
])
def test_set_values_are_toml_or_strings(raw, value):
    from ddln_fast.config import parse_override

    assert parse_override(raw)[1] == value


@pytest.mark.parametrize("raw", ["model.alpha=1.5.2", "model.layer_scales=[1, 2", 'problem.path="open'])
def test_malformed_set_values_are_refused(raw):
    from ddln_fast import InputError
    from ddln_fast.config import parse_override

    with pytest.raises(InputError, match="not a TOML value"):
        parse_override(raw)


def test_more_threads_than_cores_says_what_was_used(tmp_path, monkeypatch, capsys):
    import numba

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.toml").write_text(SMALL)
    available = numba.config.NUMBA_NUM_THREADS
    code, out, err = _main(["run", "c.toml", "-o", "r.h5", "--threads", available + 1], capsys)
    assert code == 0, err
    assert f"threads = {available + 1}" in err and f"using {available}" in err
    with h5py.File(tmp_path / "r.h5", "r") as f:
        assert int(f.attrs["threads"]) == available
    code, out, err = _main(["run", "c.toml", "-o", "s.h5", "--threads", available], capsys)
    assert code == 0 and "using" not in err


def test_resume_of_a_missing_file_is_refused(tmp_path, capsys):
    (tmp_path / "c.toml").write_text(SMALL)
    code, out, err = _main(["run", tmp_path / "c.toml", "-o", tmp_path / "none.h5", "--resume"], capsys)
    assert code == 2 and "does not exist" in err and "--resume" in err
    assert not (tmp_path / "none.h5").exists()
    from ddln_fast import InputError, simulate

    with pytest.raises(InputError, match="does not exist"):
        simulate(str(tmp_path / "c.toml"), out=tmp_path / "none.h5", resume=True)


# -- the Python API ---------------------------------------------------------------------------------------
def test_simulate_takes_a_config_path(tmp_path):
    from ddln_fast import Config, simulate

    (tmp_path / "c.toml").write_text(SMALL)
    by_path = simulate(str(tmp_path / "c.toml"))
    by_config = simulate(Config.from_toml(tmp_path / "c.toml"))
    assert by_path.theta.tobytes() == by_config.theta.tobytes()
    assert simulate(tmp_path / "c.toml").theta.tobytes() == by_path.theta.tobytes()


def test_numpy_scalars_are_accepted_as_overrides():
    from ddln_fast import Config

    config = Config().with_overrides({"model.depth": np.int64(4), "model.alpha": np.float32(0.5),
                                      "run.save_layers": np.bool_(False), "model.init": np.str_("gaussian")})
    assert (config.model.depth, config.model.alpha, config.run.save_layers) == (4, 0.5, False)
    assert type(config.model.depth) is int and config.model.init == "gaussian"


def test_python_errors_do_not_name_command_line_options(tmp_path):
    from ddln_fast import InputError, simulate

    (tmp_path / "c.toml").write_text(SMALL)
    out = tmp_path / "r.h5"
    simulate(str(tmp_path / "c.toml"), out=out).close()
    for kwargs in ({}, {"resume": True}):
        config = str(tmp_path / "c.toml")
        if kwargs:  # another config: refused by resume
            (tmp_path / "d.toml").write_text(SMALL.replace("seeds = 3", "seeds = 2"))
            config = str(tmp_path / "d.toml")
        with pytest.raises(InputError) as err:
            simulate(config, out=out, **kwargs)
        assert not re.search(r"--[a-z]", str(err.value)), str(err.value)
        assert re.search(r"--[a-z]", err.value.for_cli()), err.value.for_cli()


def test_run_repr_names_path_state_checkpoints_seeds_and_method(tmp_path):
    from ddln_fast import open_run, simulate

    (tmp_path / "c.toml").write_text(SMALL)
    out = tmp_path / "r.h5"
    simulate(str(tmp_path / "c.toml"), out=out).close()
    with open_run(out) as run:
        text = repr(run)
    assert str(out) in text and "complete" in text and "3 committed checkpoints" in text
    assert "3 seeds" in text and "dopri5" in text
    assert "in memory" in repr(simulate(str(tmp_path / "c.toml")))
