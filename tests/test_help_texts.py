"""Every option of every kflow command and script has help text, and its --help shows the default."""
import argparse
import importlib.util
import re
from pathlib import Path

import pytest

from kflow.cli import HelpFormatter, plot_main
from kflow.molecular import commands

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def parser_of(main, monkeypatch):
    """The parser ``main`` builds: stopped at parse_args, before any work."""
    def capture(self, *args, **kwargs):
        raise _Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Captured) as caught:
        main([])
    return caught.value.parser


def script_main(path):
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def shows_default(action) -> bool:
    """Options whose default means something to show (a flag is off, None/empty means 'not given')."""
    default = action.default
    return bool(action.option_strings) and not (default is None or default is False or default is argparse.SUPPRESS
                                                or isinstance(default, (list, tuple)) and not default)


def help_block(text: str, action) -> str:
    """The lines --help prints for ``action``: its invocation line and the indented help below it."""
    name = action.option_strings[0] if action.option_strings else action.metavar or action.dest
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if re.match(rf"  {re.escape(name)}(?=[ ,]|$)", ln))
    block = [lines[start]]
    for ln in lines[start + 1:]:
        if not ln.strip() or not ln.startswith(" " * 3):  # a blank line, a section, or the next option
            break
        block.append(ln)
    return " ".join(" ".join(block).split())


def check_parser(parser):
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        label = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
        assert action.help and action.help is not argparse.SUPPRESS, f"{label}: no help text"
        if shows_default(action):
            assert "default" in help_block(text, action), f"{label}: --help hides its default {action.default!r}"


@pytest.mark.parametrize("name", ["assemble", "train", "sample", "evaluate", "train_pretrained"])
def test_molecular_commands_show_defaults(name):
    check_parser(getattr(commands, f"{name}_parser")(prog=f"kflow {name}"))


def test_kflow_plot_shows_defaults(monkeypatch):
    check_parser(parser_of(lambda argv: plot_main(argv, prog="kflow plot"), monkeypatch))


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_every_script_shows_defaults(path, monkeypatch):
    check_parser(parser_of(script_main(path), monkeypatch))


def test_the_checks_catch_a_hidden_default_and_a_missing_help():
    plain = argparse.ArgumentParser(prog="plain")
    plain.add_argument("--steps", type=int, default=5, help="steps")
    with pytest.raises(AssertionError, match="hides its default"):
        check_parser(plain)
    silent = argparse.ArgumentParser(prog="silent", formatter_class=HelpFormatter)
    silent.add_argument("--num", type=int, default=64)
    with pytest.raises(AssertionError, match="no help text"):
        check_parser(silent)


def test_formatter_shows_values_as_typed_and_skips_what_means_not_given():
    p = argparse.ArgumentParser(prog="p", formatter_class=HelpFormatter)
    p.add_argument("--ratio", default="50%", help="a share")
    p.add_argument("--datasets", nargs="+", default=["csd500", "demo"], help="data sets")
    p.add_argument("--out", default=None, help="folder")
    p.add_argument("--fast", action="store_true", help="go fast")
    text = " ".join(p.format_help().split())
    assert "a share (default: 50%)" in text and "data sets (default: csd500 demo)" in text
    assert "folder (default" not in text and "go fast (default" not in text
