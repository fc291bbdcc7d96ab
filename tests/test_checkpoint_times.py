"""Checkpoint times: the run ends where it says, fixed steps are whole steps, nothing is dropped
silently.

References: hand-written expectations (t = 0 first, t_end last, strictly increasing, whole
multiples of dt for euler/rk4, as many times as asked when there are enough steps) and, for the
issue's case (euler, dt = 0.05, t_end = 15, two checkpoints), the plain numpy gradient-descent
loop of references.py run for 300 steps.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from references import gradient_descent, small_config_tables


def _config(**overrides):
    from ddln_fast import Config

    return Config.from_dict(small_config_tables(overrides))


@pytest.mark.parametrize("count", [2, 3, 4, 5])
@pytest.mark.parametrize("spacing", ["log", "linear"])
@pytest.mark.parametrize("method, dt, t_end", [("euler", 0.05, 15.0), ("rk4", 0.01, 2.0),
                                               ("dopri5", 0.01, 2.0), ("dopri5", 5.0, 2.0),
                                               ("mirror", 0.01, 2.0)])
def test_last_checkpoint_is_t_end_for_every_count_spacing_and_method(count, spacing, method, dt, t_end):
    from ddln_fast.simulate import checkpoint_times

    times = checkpoint_times(_config(**{"run.checkpoints": count, "run.spacing": spacing,
                                        "integrator.method": method, "integrator.dt": dt,
                                        "integrator.t_end": t_end}))
    assert len(times) == count and times[0] == 0.0 and times[-1] == pytest.approx(t_end, rel=1e-12)
    assert np.all(np.diff(times) > 0)
    if method in ("euler", "rk4"):
        steps = times / dt
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-9)


@pytest.mark.parametrize("spacing", ["log", "linear"])
def test_fixed_step_runs_keep_every_checkpoint_asked_for(spacing):
    """200 checkpoints over 300 steps: 200 distinct whole steps (the old code kept 121 or 5)."""
    from ddln_fast.simulate import checkpoint_times

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        times = checkpoint_times(_config(**{"run.checkpoints": 200, "run.spacing": spacing,
                                            "integrator.method": "euler", "integrator.dt": 0.05,
                                            "integrator.t_end": 15.0}))
    steps = np.round(times / 0.05).astype(int)
    assert len(set(steps)) == 200 and steps[0] == 0 and steps[-1] == 300


def test_fewer_steps_than_checkpoints_stores_every_step_and_says_so():
    from ddln_fast.simulate import CheckpointWarning, checkpoint_times

    with pytest.warns(CheckpointWarning, match="only 10 steps.*11 checkpoints"):
        times = checkpoint_times(_config(**{"run.checkpoints": 200, "integrator.method": "rk4",
                                            "integrator.dt": 0.1, "integrator.t_end": 1.0}))
    np.testing.assert_allclose(times, np.arange(11) * 0.1)


def test_t_end_between_two_steps_ends_on_the_last_whole_step_and_says_so():
    from ddln_fast.simulate import CheckpointWarning, checkpoint_times

    with pytest.warns(CheckpointWarning, match="after 3 steps, at t = 0.9"):
        times = checkpoint_times(_config(**{"run.checkpoints": 3, "integrator.method": "euler",
                                            "integrator.dt": 0.3, "integrator.t_end": 1.0}))
    assert times[-1] == pytest.approx(0.9)


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_t_end_shorter_than_one_step_is_refused(method):
    from ddln_fast import InputError

    with pytest.raises(InputError, match="shorter than one step"):
        _config(**{"integrator.method": method, "integrator.dt": 0.1, "integrator.t_end": 0.05})


def test_the_issue_case_runs_to_t_end(tmp_path, capsys):
    """euler, dt = 0.05, t_end = 15, two checkpoints: 300 steps, stored at t = 0 and 15, equal
    to 300 steps of the numpy loop."""
    from ddln_fast import simulate

    run = simulate(_config(**{"integrator.method": "euler", "integrator.dt": 0.05, "integrator.t_end": 15.0,
                              "run.checkpoints": 2, "run.spacing": "log", "model.alpha": 0.3}))
    np.testing.assert_array_equal(run.t, [0.0, 15.0])
    assert np.all(run.t_seed[-1] == 15.0) and np.all(run.nfev[-1] == 300)
    for s in range(run.u0.shape[0]):
        layers = gradient_descent(run.X, run.y, run.u0[s], 0.05, 300)[-1]
        np.testing.assert_allclose(run.u[-1, s], layers, rtol=0, atol=1e-12)
