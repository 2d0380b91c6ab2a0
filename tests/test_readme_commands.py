"""CI runs README's two commands exactly as README writes them.

A new user types README's commands; CI (``.ci/run``) must run the same text,
or a command that fails for users (a missing dependency, a changed flag)
passes in CI. This reads the bash blocks under README's "The two commands"
and requires each, verbatim, as a line of ``.ci/run``, in README's order.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## The two commands"


def readme_commands(readme: str) -> list[str]:
    """The bash code blocks of README's "The two commands" section, each as its text."""
    start = readme.index(SECTION)
    end = readme.find("\n## ", start + len(SECTION))
    section = readme[start:end if end != -1 else None]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)]


def ci_lines(script: str) -> list[str]:
    return [line.strip() for line in script.splitlines()]


def missing_or_out_of_order(commands: list[str], script: str) -> list[str]:
    """Commands not found as whole lines of ``script`` after the one before them (empty: all there)."""
    lines, problems, after = ci_lines(script), [], -1
    for command in commands:
        where = [i for i, line in enumerate(lines) if line == command and i > after]
        if not where:
            problems.append(command)
        else:
            after = where[0]
    return problems


def test_readme_has_the_two_commands():
    commands = readme_commands((ROOT / "README.md").read_text())
    assert len(commands) == 2, commands
    first, second = commands
    assert "\n" not in first and "\n" not in second  # one line each: CI compares whole lines
    assert "tpm submit" in first and "install-vllm" not in first  # the first answers without vLLM
    assert "install-vllm.sh cpu" in second and "python -m pytest" in second


def test_ci_runs_both_readme_commands_verbatim_in_order():
    commands = readme_commands((ROOT / "README.md").read_text())
    assert missing_or_out_of_order(commands, (ROOT / ".ci" / "run").read_text()) == []


def test_a_drifted_command_is_caught():
    """The comparison itself fails on a changed flag, a missing command, or a swapped order."""
    commands = readme_commands((ROOT / "README.md").read_text())
    script = (ROOT / ".ci" / "run").read_text()
    drifted = script.replace(commands[0], commands[0].replace('-e ".[test]"', "-e ."))
    assert missing_or_out_of_order(commands, drifted) == [commands[0]]
    without_first = "\n".join(line for line in script.splitlines() if line.strip() != commands[0])
    assert missing_or_out_of_order(commands, without_first) == [commands[0]]
    swapped = f"{commands[1]}\n{commands[0]}\n"
    assert missing_or_out_of_order(commands, swapped) == [commands[1]]
