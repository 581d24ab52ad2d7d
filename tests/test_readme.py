"""The README's two commands are the project's contract with a new user; CI must run the test one verbatim."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    return re.findall(r"```bash\n(pip install torch[^\n]*)\n```", readme)


def test_readme_has_setup_and_test_commands():
    commands = _commands()
    assert any("pefrl train" in c for c in commands), "README lost its run command"
    assert any("pytest" in c for c in commands), "README lost its test command"


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = next(c for c in _commands() if "pytest" in c)
    ci = (REPO / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()
