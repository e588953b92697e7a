"""The README agrees with the CLI: every command it shows parses with the real options, every flag it
names exists, and every default it states (its tables) is the default the CLI has."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click

from spra_tools.cli import cli

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _shell_blocks(text: str) -> list[str]:
    """The README's ```bash blocks."""
    blocks, current, language = [], None, None
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            if current is None:
                current, language = [], line[3:].strip()
            else:
                if language == "bash":
                    blocks.append("".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def _commands() -> list[list[str]]:
    """Each `spra-tools ...` (or `-m spra_tools ...`) line of the README's shell blocks, as argv."""
    found = []
    for block in _shell_blocks(README):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for i, word in enumerate(words):
                if word.endswith("spra-tools") or (word == "spra_tools" and words[i - 1] == "-m"):
                    found.append([w for w in words[i + 1 :] if w != "..."])
                    break
    return found


def _option_names(command: click.Command) -> set[str]:
    return {name for p in command.params if isinstance(p, click.Option) for name in p.opts + p.secondary_opts}


def test_every_command_shown_parses_with_the_real_options():
    commands = _commands()
    assert len(commands) >= 30 and {c[0] for c in commands if c} >= {"create", "train", "merge", "apply"}
    for argv in commands:
        if not argv:  # `spra-tools` alone
            continue
        name, *args = argv
        assert name in cli.commands, argv
        with click.Context(cli) as parent:
            # Parsing checks option names, choices and types and required arguments; nothing runs.
            cli.commands[name].make_context(name, args, parent=parent)


def test_every_flag_named_exists():
    known = _option_names(cli) | {n for c in cli.commands.values() for n in _option_names(c)}
    known |= set(click.Context(cli, **cli.context_settings).help_option_names)
    named = set(re.findall(r"`(--[a-z][a-z0-9-]*)", README))
    assert named and named <= known, sorted(named - known)


def _table(first: str) -> list[list[str]]:
    """The README's markdown table whose header starts with `first`: its header, then its rows."""
    match = re.search(rf"^(\| {re.escape(first)} \|.*)\n\|[-| ]+\|\n((?:\|.*\n)+)", README, flags=re.M)
    assert match, f"no table headed {first!r} in README.md"
    lines = [match.group(1), *match.group(2).splitlines()]
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]


def _default(option: click.Option, ctx: click.Context) -> str:
    """The default as --help shows it: a config field's (train), else the option's own."""
    shown = getattr(option, "shown_default", None)
    if shown is not None:
        return shown
    value = option.get_default(ctx)
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value) if isinstance(value, (str, int, float)) else ""  # no default: None, or click's "unset"


def train_options_table() -> str:
    """The README's table of train options, rendered from the CLI (which renders TrainConfig)."""
    command = cli.commands["train"]
    ctx = click.Context(command)
    rows = ["| train option | default | what it sets |", "|---|---|---|"]
    for option in command.params:
        if isinstance(option, click.Option):
            spec = option.get_help_record(ctx)[0].replace("|", "\\|")
            default = _default(option, ctx)
            rows.append(f"| `{spec}` | {f'`{default}`' if default else ''} | {option.help} |")
    return "\n".join(rows) + "\n"


def test_the_train_options_table_is_the_cli_s():
    expected = train_options_table()
    assert expected in README, "README.md's train options table differs from the CLI; it should read:\n" + expected


def test_the_defaults_stated_for_other_commands_are_the_cli_s():
    header, *rows = _table("option")
    assert rows and header[0] == "option" and all(c.strip("`") in cli.commands for c in header[1:]), header
    for flag, *cells in rows:
        for name, cell in zip(header[1:], cells):
            command = cli.commands[name.strip("`")]
            (option,) = [p for p in command.params if isinstance(p, click.Option) and f"`{p.opts[-1]}`" == flag]
            assert cell == f"`{_default(option, click.Context(command))}`", (flag, name)


def test_the_quick_start_offers_a_cpu_only_install():
    """A CPU-only machine installs the CPU build of torch before the package (else pip pulls the CUDA one)."""
    (block,) = [b for b in _shell_blocks(README) if "download.pytorch.org/whl/cpu" in b]
    torch_line = block.index("pip install torch --index-url https://download.pytorch.org/whl/cpu")
    assert torch_line < block.index('pip install -e ".[dev]"')
