"""Bad input through the real command line: exit code 2, one line "Error: ...", no traceback,
no output file.

Reference: the exit codes of README.md, "Command line" (2 on bad input: config, data file,
init file or argument, with ONE line on stderr that names what is wrong, and no file created;
never a traceback). Each case below builds its bad input from scratch in a temporary folder and
names a word the message must contain (the key, file or value at fault).

Every case runs through ``ddln_fast.cli.main`` in-process (the function the console script
calls, so the exit-code mapping is the real one); a subset also runs as a real subprocess of
the installed ``ddln`` script, to check the process exit status and stderr as a shell sees them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from ddln_fast.cli import main

GOOD_DATA = {"X": np.arange(12.0).reshape(3, 4), "y": np.ones(3)}


def _toml(tmp: Path, text: str, name: str = "bad.toml") -> str:
    path = tmp / name
    path.write_text(text)
    return str(path)


def _raw(tmp: Path, name: str, content: bytes) -> str:
    path = tmp / name
    path.write_bytes(content)
    return str(path)


def _data_config(tmp: Path, data_name: str, arrays: dict | None = None, raw: bytes | None = None,
                 seeds: int = 2) -> str:
    """A config whose problem is the data file ``data_name``, written from arrays or raw bytes."""
    data = tmp / data_name
    if arrays is not None:
        np.savez(data, **arrays)
    elif raw is not None:
        data.write_bytes(raw)
    return _toml(tmp, f'[problem]\nkind = "file"\npath = "{data_name}"\n[run]\nseeds = {seeds}\n')


def _init_config(tmp: Path, init_name: str, u0: np.ndarray | None) -> str:
    """A depth-2 config on 4-dimensional data whose layers come from ``init_name``."""
    np.savez(tmp / "data.npz", **GOOD_DATA)
    if u0 is not None:
        np.save(tmp / init_name, u0)
    return _toml(tmp, '[problem]\nkind = "file"\npath = "data.npz"\n'
                      f'[model]\ndepth = 2\ninit = "file"\ninit_path = "{init_name}"\n[run]\nseeds = 2\n')


def _existing_run(tmp: Path) -> Path:
    out = tmp / "out.h5"
    out.write_bytes(b"previous content")
    return out


# (id, builder(tmp) -> argv before "-o OUT", word the message must name)
CASES = [
    ("toml-syntax", lambda t: ["run", _toml(t, "[model\ndepth = 3\n")], "not valid TOML"),
    ("toml-duplicate-key", lambda t: ["run", _toml(t, "[model]\ndepth = 3\ndepth = 4\n")], "not valid TOML"),
    ("unknown-table", lambda t: ["run", _toml(t, "[modle]\ndepth = 3\n")], "[modle]"),
    ("unknown-key", lambda t: ["run", _toml(t, "[model]\ndpeth = 3\n")], "model.dpeth"),
    ("table-not-table", lambda t: ["run", _toml(t, "model = 3\n")], "[model]"),
    ("string-for-int", lambda t: ["run", _toml(t, '[model]\ndepth = "three"\n')], "model.depth"),
    ("float-for-int", lambda t: ["run", _toml(t, "[problem]\nn = 10.5\n")], "problem.n"),
    ("bool-for-int", lambda t: ["run", _toml(t, "[run]\nseeds = true\n")], "run.seeds"),
    ("bool-for-float", lambda t: ["run", _toml(t, "[model]\nalpha = true\n")], "model.alpha"),
    ("string-for-bool", lambda t: ["run", _toml(t, '[run]\nsave_layers = "yes"\n')], "run.save_layers"),
    ("unknown-method", lambda t: ["run", _toml(t, '[integrator]\nmethod = "rk45"\n')], "integrator.method"),
    ("unknown-init", lambda t: ["run", _toml(t, '[model]\ninit = "random"\n')], "model.init"),
    ("depth-0", lambda t: ["run", _toml(t, "[model]\ndepth = 0\n")], "model.depth"),
    ("alpha-negative", lambda t: ["run", _toml(t, "[model]\nalpha = -1.0\n")], "model.alpha"),
    ("alpha-nan-set", lambda t: ["run", "--set", "model.alpha=nan"], "model.alpha"),
    ("alpha-inf-toml", lambda t: ["run", _toml(t, "[model]\nalpha = inf\n")], "model.alpha"),
    ("rtol-0", lambda t: ["run", _toml(t, "[integrator]\nrtol = 0.0\n")], "integrator.rtol"),
    ("dt-negative-set", lambda t: ["run", "--set", "integrator.dt=-0.1"], "integrator.dt"),
    ("t_end-0", lambda t: ["run", "--set", "integrator.t_end=0"], "integrator.t_end"),
    ("checkpoints-1", lambda t: ["run", _toml(t, "[run]\ncheckpoints = 1\n")], "run.checkpoints"),
    ("seeds-0", lambda t: ["run", _toml(t, "[run]\nseeds = 0\n")], "run.seeds"),
    ("dtype-float16", lambda t: ["run", "--set", "run.dtype=float16"], "run.dtype"),
    ("sparsity-over-d", lambda t: ["run", _toml(t, "[problem]\nd = 4\nsparsity = 5\n")], "problem.sparsity"),
    ("shape-scales-length", lambda t: ["run", _toml(t, '[model]\ndepth = 3\ninit = "shape"\n'
                                                       "layer_scales = [1.0, 2.0]\n")], "layer_scales"),
    ("shape-scales-strings", lambda t: ["run", _toml(t, '[model]\ndepth = 2\ninit = "shape"\n'
                                                        'layer_scales = ["a", "b"]\n')], "layer_scales"),
    ("file-kind-without-path", lambda t: ["run", _toml(t, '[problem]\nkind = "file"\n')], "problem.path"),
    ("data-missing", lambda t: ["run", _data_config(t, "nowhere.npz")], "does not exist"),
    ("data-without-y", lambda t: ["run", _data_config(t, "noy.npz", {"X": np.ones((3, 4))})], "'y'"),
    ("data-shape-mismatch", lambda t: ["run", _data_config(t, "mis.npz", {"X": np.ones((3, 4)), "y": np.ones(5)})],
     "y in"),
    ("data-nan", lambda t: ["run", _data_config(t, "nan.npz", {"X": np.full((3, 4), np.nan), "y": np.ones(3)})],
     "non-finite"),
    ("data-text-named-npz", lambda t: ["run", _data_config(t, "text.npz", raw=b"X,y\n1,2\n")], "cannot be read"),
    ("data-1d-X", lambda t: ["run", _data_config(t, "flat.npz", {"X": np.ones(4), "y": np.ones(4)})], "X in"),
    ("data-per-seed-count", lambda t: ["run", _data_config(t, "ps.npz", {"X": np.ones((3, 5, 4)),
                                                                       "y": np.ones((3, 5))}, seeds=2)],
     "run.seeds"),
    ("data-strings", lambda t: ["run", _data_config(t, "str.npz", {"X": np.array([["a", "b"]]), "y": np.ones(1)})],
     "dtype"),
    ("data-wrong-suffix", lambda t: ["run", _data_config(t, "data.csv", raw=b"1,2\n")], "data.csv"),
    ("init-missing", lambda t: ["run", _init_config(t, "none.npy", None)], "does not exist"),
    ("init-wrong-shape", lambda t: ["run", _init_config(t, "u0.npy", np.ones((3, 4)))], "shape"),
    ("init-nan", lambda t: ["run", _init_config(t, "u0.npy", np.full((2, 4), np.nan))], "non-finite"),
    ("config-missing", lambda t: ["run", str(t / "none.toml")], "does not exist"),
    ("config-is-dir", lambda t: ["run", str(t)], "directory"),
    ("config-not-utf8", lambda t: ["run", _raw(t, "latin.toml", b"[model]\ninit = '\xe9'\n")], "cannot be read"),
    ("set-no-equals", lambda t: ["run", "--set", "model.depth"], "KEY=VALUE"),
    ("set-empty-value", lambda t: ["run", "--set", "model.depth="], "missing value"),
    ("set-unknown-section", lambda t: ["run", "--set", "modle.depth=3"], "modle"),
    ("set-no-section", lambda t: ["run", "--set", "depth=3"], "SECTION.KEY"),
    ("set-bad-toml", lambda t: ["run", "--set", "model.alpha=[1,"], "not a TOML value"),
    ("set-unknown-key", lambda t: ["run", "--set", "model.dpeth=3"], "model.dpeth"),
    ("threads-negative", lambda t: ["run", "--threads", "-1"], "--threads"),
    ("threads-not-int", lambda t: ["run", "--threads", "abc"], "--threads"),
    ("unknown-option", lambda t: ["run", "--bogus"], "--bogus"),
    ("resume-and-overwrite", lambda t: ["run", "--resume", "--overwrite"], "--resume"),
]


def _run_main(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def _check_one_line_error(code, err, word):
    assert code == 2, f"exit code {code}, stderr {err!r}"
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert lines[0].startswith("Error: "), lines[0]
    assert word in lines[0], f"the message should name {word!r}: {lines[0]}"


@pytest.mark.parametrize("build,word", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_run(tmp_path, monkeypatch, capsys, build, word):
    monkeypatch.chdir(tmp_path)  # relative names, and any stray default output, land here
    argv = build(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    out = tmp_path / "out" / "run.h5"
    code, _, err = _run_main([*argv, "-o", str(out), "--no-progress"], capsys)
    _check_one_line_error(code, err, word)
    assert not out.exists() and not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing created at all


def test_existing_output_is_refused_and_kept(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = _existing_run(tmp_path)
    code, _, err = _run_main(["run", "--set", "problem.d=10", "--set", "problem.n=5", "-o", str(out)], capsys)
    _check_one_line_error(code, err, "--overwrite")
    assert out.read_bytes() == b"previous content"


def test_output_that_is_a_folder_is_refused(tmp_path, capsys):
    folder = tmp_path / "runs"
    folder.mkdir()
    code, _, err = _run_main(["run", "--set", "problem.d=10", "-o", str(folder)], capsys)
    _check_one_line_error(code, err, "directory")
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("content,word", [
    (None, "does not exist"),
    (b"not an hdf5 file", "not an HDF5 file"),
    ("h5-foreign", "not a ddln_fast run"),
])
def test_bad_input_inspect(tmp_path, capsys, content, word):
    path = tmp_path / "run.h5"
    if content == "h5-foreign":
        with h5py.File(path, "w") as f:
            f["data"] = np.ones(3)
    elif content is not None:
        path.write_bytes(content)
    code, _, err = _run_main(["inspect", str(path)], capsys)
    _check_one_line_error(code, err, word)


def _ddln_command() -> list[str]:
    script = Path(sys.executable).parent / "ddln"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ddln_fast.cli"]


SUBPROCESS_CASES = ["toml-syntax", "unknown-key", "alpha-nan-set", "data-text-named-npz", "set-no-equals",
                    "threads-not-int"]


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_bad_input_real_process(tmp_path, case_id):
    """The installed console script, as a shell runs it: status 2, one stderr line, no file."""
    _, build, word = next(case for case in CASES if case[0] == case_id)
    argv = build(tmp_path)
    out = tmp_path / "run.h5"
    proc = subprocess.run([*_ddln_command(), *argv, "-o", str(out)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "80"})
    _check_one_line_error(proc.returncode, proc.stderr, word)
    assert not out.exists()


# --- positive controls: the same machinery accepts good input -----------------------------------


def test_empty_file_and_resolved_toml_are_valid(tmp_path):
    """An empty file is a valid run with every default (README.md, "Configuration"); the resolved
    TOML that a run stores reads back to the same config (so a stored config can be re-run)."""
    from ddln_fast import Config
    from ddln_fast.config import parse_override

    empty = tmp_path / "empty.toml"
    empty.write_text("")
    config = Config.from_toml(empty)
    assert config == Config()
    defaults = {"problem.n": 100, "problem.d": 1000, "problem.sparsity": 5, "model.depth": 3,
                "model.alpha": 0.1, "model.init": "first_layer_zero", "integrator.method": "dopri5",
                "integrator.rtol": 1e-8, "integrator.atol": 1e-12, "integrator.t_end": 100.0,
                "integrator.max_steps": 10_000_000, "run.seeds": 8, "run.checkpoints": 200,
                "run.spacing": "log", "run.save_layers": True, "run.dtype": "float64", "run.threads": 0}
    flat = config.flat()
    for key, value in defaults.items():
        assert flat[key] == value, key
    resolved = tmp_path / "resolved.toml"
    changed = config.with_overrides(dict(parse_override(text) for text in
                                         ("model.depth=4", "model.init=shape", "model.layer_scales=[1, 2, 3, 4]",
                                          "integrator.rtol=1e-10", "model.signs=random")))
    resolved.write_text(changed.to_toml())
    assert Config.from_toml(resolved) == changed
    assert changed.model.layer_scales == (1.0, 2.0, 3.0, 4.0) and changed.model.init == "shape"
