"""Bad input to the keys of gradient descent and SGD (issue 12): exit code 2, one line on stderr
naming the key at fault, no traceback, no output file.

Reference: the exit codes of README.md, "Command line" (bad input: exit 2, ONE line naming the bad
key and what was expected) and the issue's list: batch_size above n or below 1, momentum outside
[0, 1), negative label_noise or weight_decay, and keys that mean nothing with the method. Each
case is written from scratch here with the word its message must contain.
"""

from __future__ import annotations

import numpy as np
import pytest

from ddln_fast.cli import main

SMALL = "[problem]\nn = 6\nd = 5\nsparsity = 2\n[run]\nseeds = 2\ncheckpoints = 2\n"


def _config(tmp, integrator: str, run: str = "", model: str = "") -> str:
    path = tmp / "bad.toml"
    path.write_text(SMALL.replace("[run]\n", f"[run]\n{run}\n") + f"[integrator]\nt_end = 0.5\n{integrator}\n"
                    + (f"[model]\n{model}\n" if model else ""))
    return str(path)


def _data_config(tmp, integrator: str) -> str:
    """A data file of 3 samples (the batch size is checked once the data is read)."""
    rng = np.random.default_rng(0)
    np.savez(tmp / "data.npz", X=rng.standard_normal((3, 5)), y=rng.standard_normal(3))
    path = tmp / "bad.toml"
    path.write_text(f'[problem]\npath = "data.npz"\n[run]\nseeds = 2\ncheckpoints = 2\n'
                    f"[integrator]\nt_end = 0.5\n{integrator}\n")
    return str(path)


SGD = 'method = "sgd"\nbatch_size = 2\n'
CASES = [
    ("batch-above-n", lambda t: _config(t, 'method = "sgd"\nbatch_size = 7'), "batch_size"),
    ("batch-above-n-of-data-file", lambda t: _data_config(t, 'method = "sgd"\nbatch_size = 4'), "batch_size"),
    ("batch-negative", lambda t: _config(t, 'method = "sgd"\nbatch_size = -1'), "batch_size"),
    ("batch-zero", lambda t: _config(t, 'method = "sgd"\nbatch_size = 0'), "batch_size"),
    ("batch-missing", lambda t: _config(t, 'method = "sgd"'), "batch_size"),
    ("batch-float", lambda t: _config(t, 'method = "sgd"\nbatch_size = 2.5'), "batch_size"),
    ("batch-with-dopri5", lambda t: _config(t, 'method = "dopri5"\nbatch_size = 2'), "batch_size"),
    ("batch-with-euler", lambda t: _config(t, 'method = "euler"\nbatch_size = 2'), "batch_size"),
    ("sampling-unknown", lambda t: _config(t, SGD + 'sampling = "shuffled"'), "sampling"),
    ("sampling-with-euler", lambda t: _config(t, 'method = "euler"\nsampling = "with_replacement"'), "sampling"),
    ("momentum-one", lambda t: _config(t, SGD + "momentum = 1.0"), "momentum"),
    ("momentum-negative", lambda t: _config(t, SGD + "momentum = -0.1"), "momentum"),
    ("momentum-with-rk4", lambda t: _config(t, 'method = "rk4"\nmomentum = 0.5'), "momentum"),
    ("momentum-with-dopri5", lambda t: _config(t, "momentum = 0.5"), "momentum"),
    ("momentum-with-mirror", lambda t: _config(t, 'method = "mirror"\nmomentum = 0.5'), "momentum"),
    ("nesterov-without-momentum", lambda t: _config(t, SGD + "nesterov = true"), "nesterov"),
    ("label-noise-negative", lambda t: _config(t, SGD + "label_noise = -0.5"), "label_noise"),
    ("label-noise-nan", lambda t: _config(t, SGD + "label_noise = nan"), "label_noise"),
    ("label-noise-with-dopri5", lambda t: _config(t, "label_noise = 0.1"), "label_noise"),
    ("weight-decay-negative", lambda t: _config(t, 'method = "euler"\nweight_decay = -1.0'), "weight_decay"),
    ("weight-decay-with-rk4", lambda t: _config(t, 'method = "rk4"\nweight_decay = 0.1'), "weight_decay"),
    ("schedule-unknown", lambda t: _config(t, SGD + 'schedule = "cosine"'), "schedule"),
    ("schedule-with-dopri5", lambda t: _config(t, 'schedule = "step"\ndecay_every = 3'), "schedule"),
    ("step-schedule-without-decay-every", lambda t: _config(t, SGD + 'schedule = "step"'), "decay_every"),
    ("decay-every-with-constant", lambda t: _config(t, SGD + "decay_every = 5"), "decay_every"),
    ("decay-factor-with-constant", lambda t: _config(t, SGD + "decay_factor = 0.5"), "decay_factor"),
    ("decay-factor-zero", lambda t: _config(t, SGD + 'schedule = "step"\ndecay_every = 2\ndecay_factor = 0.0'),
     "decay_factor"),
    ("gain-at-depth-3", lambda t: _config(t, SGD, run="gain = true", model="depth = 3"), "run.gain"),
    ("gain-with-momentum", lambda t: _config(t, SGD + "momentum = 0.5", run="gain = true", model="depth = 2"),
     "run.gain"),
    ("gain-with-weight-decay", lambda t: _config(t, SGD + "weight_decay = 0.1", run="gain = true",
                                                 model="depth = 2"), "run.gain"),
    ("gain-with-rk4", lambda t: _config(t, 'method = "rk4"', run="gain = true", model="depth = 2"), "run.gain"),
    ("sharpness-not-bool", lambda t: _config(t, SGD, run='sharpness = "yes"'), "run.sharpness"),
]


@pytest.mark.parametrize("build, word", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_descent_keys_exit_2_with_one_line_and_no_file(tmp_path, capsys, monkeypatch, build, word):
    monkeypatch.chdir(tmp_path)
    config = build(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        main(["run", config, "-o", str(tmp_path / "out.h5")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert word in lines[0], lines[0]
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_a_good_sgd_config_runs(tmp_path, capsys):
    """The same template with good values runs (exit 0): the cases above fail for their key."""
    config = _config(tmp_path, SGD + 'momentum = 0.5\nnesterov = true\nschedule = "step"\ndecay_every = 3',
                     run="gain = false")
    with pytest.raises(SystemExit) as exit_info:
        main(["run", config, "-o", str(tmp_path / "out.h5"), "--threads", "1", "--quiet"])
    assert exit_info.value.code == 0, capsys.readouterr().err
    assert (tmp_path / "out.h5").exists()
