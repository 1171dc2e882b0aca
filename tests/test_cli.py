"""Every entry point's command line, walked: its usage names the command as it is typed, every
option says what it is for, ``--help`` exits 0, a config read takes ``--set``, and one concept
has one name across all of them (``pali3_train/cli.py``)."""

from __future__ import annotations

import argparse
import importlib

import pytest

# usage line -> module whose build_parser() makes that command's parser
ENTRY_POINTS = {
    "launcher/run.py": "pali3_train.launcher.run",
    "python launcher/curriculum.py": "pali3_train.launcher.curriculum",
    "python -m pali3_train.cluster.plan": "pali3_train.cluster.plan",
    "python -m pali3_train.cluster.submit": "pali3_train.cluster.submit",
    "python -m pali3_train.data_pipeline.write_shards": "pali3_train.data_pipeline.write_shards",
    "python -m pali3_train.data_pipeline.demo_corpus": "pali3_train.data_pipeline.demo_corpus",
    "python -m pali3_train.convert": "pali3_train.convert.__main__",
    "python -m pali3_train.generate": "pali3_train.generate",
    "python -m pali3_train.tokenizer": "pali3_train.tokenizer",
    "python -m pali3_train.params": "pali3_train.params",
    "python -m pali3_train.engine.export": "pali3_train.engine.export",
}
# a name some entry point once used -> the one name of that concept
ONE_NAME = {"--gpus": "--world-size", "--num-gpus": "--world-size",
            "--image-size": "--image-size-px", "--output": "--out", "--output-dir": "--out",
            "--overrides": "--set"}  # fmt: skip


def _parsers(parser: argparse.ArgumentParser):
    """The parser and those of its subcommands."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for p in _parsers(parser) for a in p._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]  # fmt: skip


@pytest.fixture(params=sorted(ENTRY_POINTS), ids=lambda prog: prog.split()[-1])
def entry(request):
    prog = request.param
    return prog, importlib.import_module(ENTRY_POINTS[prog]).build_parser()


def test_the_usage_line_is_the_command_as_typed_and_help_exits_0(entry, capsys):
    prog, parser = entry
    assert parser.prog == prog
    with pytest.raises(SystemExit) as done:
        parser.parse_args(["--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {prog} ")


def test_every_option_says_what_it_is_for(entry):
    _, parser = entry
    silent = [a.dest for a in _options(parser) if a.help != argparse.SUPPRESS and not a.help]
    assert not silent


def test_one_concept_has_one_name_and_a_config_takes_set(entry):
    _, parser = entry
    names = {name for a in _options(parser) for name in a.option_strings}
    assert not {old: new for old, new in ONE_NAME.items() if old in names}
    assert ("--config" not in names) or ("--set" in names)


def test_defaults_are_shown_in_the_help():
    parser = importlib.import_module("pali3_train.generate").build_parser()
    text = " ".join(parser.format_help().split())
    assert "inputs per forward (default: 8)" in text
    assert "(default: None)" not in text
