"""Every example of README.md runs as written.

Reference: the README itself. Its shell examples (lines ``$ ddln ...`` in code blocks, a
trailing ``\\`` continuing a command) run in README order, with the command string exactly as
printed, in a scratch folder holding a copy of ``data/`` (so ``data/small.toml`` resolves as
in the repository and outputs stay out of it). Each must exit with the code the README shows:

- ``$ echo $?`` after a command: the number printed below it;
- a command whose output shows ``Error: ...``: 2 (bad input), and that line is printed as is;
- a command marked ``# Ctrl-C``: it gets SIGINT once its file holds a committed checkpoint,
  and exits with 130;
- otherwise 0.

The ``python`` code blocks run too, in the same folder. Commands depend on earlier ones (a
resume needs the run before it), so run this module as a whole.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")

#: Commands of the README not run here, with the reason.
EXCLUDED = {
    "ddln run data/default.toml -o runs/default.h5 --overwrite --threads 1":
        "the default run of `make run` (about 10 s on one core); CI runs it with `make run`",
    "ddln inspect runs/default.h5": "reads the file of the default run above",
}
INTERRUPT = "# Ctrl-C"
STARTUP_SECONDS = 120


@dataclass
class Example:
    command: str
    output: list[str] = field(default_factory=list)
    exit_code: int = 0
    interrupt: bool = False


def code_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(language, lines) of every fenced block, and of every indented (4 spaces) block as
    language "" (the README writes short shell sessions that way)."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            blocks.append((fence.group(1), lines[i + 1:end]))
            i = end + 1
        elif lines[i].startswith("    ") and (i == 0 or not lines[i - 1].strip()):
            end = i
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            blocks.append(("", [line[4:] for line in lines[i:end]]))
            i = end
        else:
            i += 1
    return blocks


def shell_examples(text: str) -> list[Example]:
    examples: list[Example] = []
    for language, lines in code_blocks(text):
        if language not in ("", "sh", "console"):
            continue
        session: list[Example] = []
        continuing = False
        for line in lines:
            if continuing:
                session[-1].command += " " + line.strip().rstrip("\\").strip()
            elif line.startswith("$ "):
                session.append(Example(line[2:].rstrip("\\").strip()))
            elif session:
                session[-1].output.append(line)
            # a trailing backslash continues a command, not an output line or a synopsis
            continuing = (continuing or line.startswith("$ ")) and line.rstrip().endswith("\\")
        for ex in session:
            ex.command = re.sub(r"\s+", " ", ex.command)
            ex.interrupt = ex.command.endswith(INTERRUPT)
        for before, ex in zip(session, session[1:]):
            if ex.command == "echo $?":
                before.exit_code = int(ex.output[0])
        for ex in session:
            if any(line.startswith("Error: ") for line in ex.output):
                ex.exit_code = 2
            if ex.interrupt:
                ex.exit_code = 130
        examples += [ex for ex in session if ex.command.startswith("ddln ")]
    return examples


def python_examples(text: str) -> list[str]:
    return ["\n".join(lines) for language, lines in code_blocks(text) if language == "python"]


EXAMPLES = [ex for ex in shell_examples(README) if ex.command not in EXCLUDED]


def test_the_readme_has_examples_and_every_exclusion_is_one_of_them():
    commands = [ex.command for ex in shell_examples(README)]
    assert len(EXAMPLES) >= 15 and python_examples(README)
    assert all(excluded in commands for excluded in EXCLUDED), "an exclusion names no README command"
    assert any(ex.interrupt for ex in EXAMPLES) and any(ex.exit_code == 1 for ex in EXAMPLES)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A scratch folder with a copy of data/, and an environment whose ``ddln`` is this
    interpreter's."""
    folder = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "data", folder / "data")
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache"))
    return folder, env


def output_file(command: str) -> str:
    return re.search(r"-o (\S+)", command).group(1)


def committed(path: Path) -> int:
    try:
        with h5py.File(path, "r", swmr=True) as f:
            return int(f["checkpoints/committed"][0])
    except (OSError, KeyError):
        return 0


def run_interrupted(command: str, folder: Path, env: dict) -> subprocess.CompletedProcess:
    """Start the command, send SIGINT once its output holds a committed checkpoint (what a user
    pressing Ctrl-C does), and wait for it."""
    words = shlex.split(command.removesuffix(INTERRUPT))  # no shell: the signal goes to ddln itself
    executable = shutil.which(words[0], path=env["PATH"])
    proc = subprocess.Popen([executable, *words[1:]], cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    target = folder / output_file(command)
    deadline = time.monotonic() + STARTUP_SECONDS
    while proc.poll() is None and committed(target) < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=STARTUP_SECONDS)
    return subprocess.CompletedProcess(words, proc.returncode, out)


@pytest.mark.parametrize("example", EXAMPLES, ids=[ex.command[:70] for ex in EXAMPLES])
def test_shell_example_runs_as_written(example, workdir):
    folder, env = workdir
    if example.interrupt:
        result = run_interrupted(example.command, folder, env)
    else:
        result = subprocess.run(example.command, shell=True, cwd=folder, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert result.returncode == example.exit_code, (
        f"{example.command}\nexit {result.returncode}, README shows {example.exit_code}:\n{result.stdout}")
    printed = result.stdout.splitlines()
    for line in example.output:
        if line.startswith("Error: "):
            assert line in printed, f"{example.command}: the README's line\n{line}\nis not printed:\n{result.stdout}"


@pytest.mark.parametrize("index", range(len(python_examples(README))))
def test_python_example_runs(index, workdir):
    folder, env = workdir
    code = python_examples(README)[index]
    result = subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert result.returncode == 0, f"README python block {index}:\n{code}\n{result.stdout}"
