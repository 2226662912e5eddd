"""The README's Usage block lists exactly the options each command's --help has, so that the two cannot drift apart."""

import re
from pathlib import Path

import click
import pytest

from acttail_export.cli import cli

README = Path(__file__).parent.parent / "README.md"


def usage_options() -> dict[str, set[str]]:
    """Command name -> the option names its lines in the README's Usage block mention."""
    text = README.read_text()
    block = text[text.index("## Usage"):]
    block = block[block.index("```bash\n") + 8:]
    block = block[:block.index("```")]
    options: dict[str, set[str]] = {}
    command = None
    for line in block.splitlines():
        if line.startswith("acttail-export "):
            command = line.split()[1]
            options.setdefault(command, set())
        line = line.split("#")[0]  # a comment may mention options of something else
        options[command] |= set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", line))
    return options


def help_options(command: click.Command) -> list[tuple[str, ...]]:
    """Each option's names (a boolean pair --x/--no-x has two)."""
    return [tuple(p.opts + p.secondary_opts) for p in command.params if isinstance(p, click.Option)]


def test_readme_lists_every_command():
    assert sorted(usage_options()) == sorted(cli.commands)


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_readme_usage_matches_help(name):
    readme = usage_options()[name]
    options = help_options(cli.commands[name])
    missing = [names[0] for names in options if not readme & set(names)]
    unknown = sorted(readme - {n for names in options for n in names})
    assert (missing, unknown) == ([], []), f"README usage of {name}: missing {missing}, not an option {unknown}"


def test_readme_says_how_model_may_be_omitted():
    text = README.read_text()
    assert "acttail-export export [MODEL] OUT" in text and "**MODEL omitted**" in text
