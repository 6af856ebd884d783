"""`carajax --help` and every `carajax CMD --help`: each option says what it does and shows its
default, and the text fits a terminal and tells no project history."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from carajax.cli import build_parser, main

COMMANDS = ("demo", "pull", "simulate", "serve", "profile", "route", "ray", "replay")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def undocumented(parser: argparse.ArgumentParser) -> list[str]:
    """Each option (but -h) with no help, or with a default (not None / False) that its help, as
    printed, does not show."""
    bad = []
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = "/".join(action.option_strings) or action.dest
        if not (action.help or "").strip():
            bad.append(f"{flag}: no help")
            continue
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS:
            continue
        if str(default) not in formatter._expand_help(action):
            bad.append(f"{flag}: default {default!r} not in its help")
    return bad


def test_the_check_finds_options_without_help_or_default():
    p = argparse.ArgumentParser()
    p.add_argument("--bare", type=int, default=3)
    p.add_argument("--hidden", type=int, default=7, help="a number")
    p.add_argument("--shown", type=int, default=7, help="a number (default: %(default)s)")
    p.add_argument("--literal", default="x,y", help="letters, x,y unless given")
    p.add_argument("--optional", default=None, help="a path")
    p.add_argument("--flag", action="store_true", help="a switch")
    assert undocumented(p) == ["--bare: no help", "--hidden: default 7 not in its help"]


def test_every_option_of_every_command_has_help_that_shows_its_default():
    parser = build_parser()
    commands = subcommands(parser)
    assert sorted(commands) == sorted(COMMANDS)
    bad = [f"carajax {name} {what}" for name, p in commands.items() for what in undocumented(p)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_exits_0_fits_the_terminal_and_tells_no_history(command, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps option help to it
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"] if command else ["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: carajax {command}".rstrip())
    wide = [line for line in out.splitlines() if len(line) > 120]
    assert not wide, wide
    assert "issue " not in out.lower()


def test_python_m_carajax_is_the_command():
    env = {**os.environ, "COLUMNS": "100"}
    proc = subprocess.run([sys.executable, "-m", "carajax", "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: carajax")
    assert all(c in proc.stdout for c in COMMANDS)
