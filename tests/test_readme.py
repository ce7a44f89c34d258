"""Every command and snippet of README.md, run as written, in fresh processes.

The commands are read from the README's fenced ``bash`` blocks (one command a line) and its
``python`` blocks (each run as a script). Training runs are shortened through one mechanism that
the CLI documents: ``WORLDMODELS_SMOKE_STEPS`` (see `experiments.train.apply_smoke_steps`). Each
command runs in its own empty working directory, so relative run directories (``runs/default``) are
its own; the commands that run on one pytest worker share its compile cache (tests/conftest.py).
What is not run is said by the test, never skipped silently: ``pip install`` steps (CI installs
before it runs the tests), the test command itself, and README lines marked with `NOT_RUN_MARK` and a reason (e.g. a
GPU-only command).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

SPREAD_OVER_WORKERS = True  # each test runs its own processes: tests/conftest.py spreads them over workers

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
NOT_RUN_MARK = "# not run by the README test:"  # a README line ending so says why it cannot run here
SMOKE_STEPS = "320"  # env steps per training run; it updates once or twice, at its end
TIMEOUT_S = 900


@dataclass(frozen=True)
class Command:
    text: str  # as the README has it
    script: str  # what runs: a bash line, or a Python script
    language: str  # "bash" or "python"
    not_run: str = ""  # why it is not run here ("" if it runs)


def _bash_command(line: str) -> Command:
    if NOT_RUN_MARK in line:
        return Command(line, "", "bash", line.split(NOT_RUN_MARK, 1)[1].strip() or "marked in the README")
    parts = [part.strip() for part in line.split("&&")]
    kept, dropped = [], []
    for part in parts:
        if part.startswith("pip install"):
            dropped.append("its install step, which CI runs before the tests")
        elif re.fullmatch(r"python3? -m pytest( .*)?", part):
            dropped.append("the test suite, which is this run")
        else:
            kept.append(part)
    if not kept:
        return Command(line, "", "bash", "; ".join(dropped))
    return Command(line, " && ".join(kept), "bash")


def readme_commands(text: str) -> list[Command]:
    """The commands of a README's fenced bash blocks (a line each; a trailing backslash continues it)
    and its python blocks (a script each), in order."""
    commands = []
    for language, body in re.findall(r"^```(bash|python)\n(.*?)^```", text, re.M | re.S):
        if language == "python":
            commands.append(Command(body, body, "python"))
            continue
        for line in body.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(_bash_command(line.strip()))
    return commands


COMMANDS = readme_commands(README.read_text())


def _id(command: Command) -> str:
    first = command.text.strip().splitlines()[0].split("  #")[0].strip()
    return first if command.language == "bash" else f"python snippet: {first}"


def run_command(command: Command, cwd: Path) -> tuple[int, str]:
    """Run one command in a fresh process in `cwd`: (exit code, its output)."""
    # `python` in a command is the interpreter that runs these tests (its environment has the package)
    bin_dir = cwd / ".bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("python", "python3"):  # a script, not a link: a venv's python finds its venv by its own path
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "WORLDMODELS_SMOKE_STEPS": SMOKE_STEPS,
           "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "TF_CPP_MIN_LOG_LEVEL": "1", "PYTHONUNBUFFERED": "1"}
    if command.language == "python":
        (cwd / "snippet.py").write_text(command.script)
        argv = [sys.executable, "snippet.py"]
    else:
        argv = ["bash", "-o", "pipefail", "-c", command.script]
    try:
        done = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        output = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return -1, output + f"\n(timed out after {TIMEOUT_S} s)"
    return done.returncode, done.stdout


def check(command: Command, cwd: Path) -> None:
    """Fail naming the command and its last output line unless it exits 0."""
    code, output = run_command(command, cwd)
    if code != 0:
        lines = [line for line in output.splitlines() if line.strip()]
        pytest.fail(f"README command failed (exit {code}): {_id(command)}\n"
                    f"last output line: {lines[-1] if lines else '(none)'}", pytrace=False)


def test_the_readme_has_its_commands():
    runs = [c for c in COMMANDS if not c.not_run]
    assert sum(c.language == "python" for c in runs) >= 1, "the Library use snippet was not found"
    assert any("experiments.train --preset size1m cartpole" in c.script for c in runs), \
        "the default run is not among the README commands"
    assert len(runs) >= 6, [c.text for c in COMMANDS]
    # the set-up lines install, and run the default run and the tests
    assert any(c.not_run.startswith("its install step") and "python -m pytest" in c.text for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=_id)
def test_readme_command(command: Command, tmp_path: Path):
    if command.not_run:
        pytest.skip(f"not run: {command.not_run}")
    check(command, tmp_path)


def test_a_broken_command_fails_naming_it_and_its_last_line(tmp_path: Path):
    # memory length 30 as if it were the id: refused before the config is printed, in one line
    broken = _bash_command("python -m experiments.train --env bsuite/memory_len/30")
    code, output = run_command(broken, tmp_path)
    assert code == 1
    assert output.strip().splitlines() == [output.strip()], output  # one line: no config, no traceback
    assert output.strip().endswith("memory_length 30 is 'bsuite/memory_len/15'")
    with pytest.raises(pytest.fail.Exception) as failure:
        check(broken, tmp_path)
    assert "experiments.train --env bsuite/memory_len/30" in str(failure.value)
    assert "'bsuite/memory_len/15'" in str(failure.value)


def test_readme_parsing():
    text = ("x\n```bash\npip install -e . && python -m experiments.train --preset a && python -m experiments.curve r\n"
            "# a comment\npython -m a \\\n  --b 1   # trailing\npython -m gpu_only  " + NOT_RUN_MARK + " needs a GPU\n"
            "pip install -e \".[test]\" && python -m pytest\n```\n```python\nprint(1)\n```\n")
    commands = readme_commands(text)
    assert [(c.script, c.language, c.not_run) for c in commands] == [
        ("python -m experiments.train --preset a && python -m experiments.curve r", "bash", ""),
        ("python -m a    --b 1   # trailing", "bash", ""),
        ("", "bash", "needs a GPU"),
        ("", "bash", "its install step, which CI runs before the tests; the test suite, which is this run"),
        ("print(1)\n", "python", ""),
    ]
