"""Command lines that read alike: every entry point builds its parser here, so that its usage
line names the command as it is typed (``python -m pali3_train.generate``), its description is
its module docstring's first paragraph, and its help shows each option's default.

Names are one per concept across the entry points (``tests/test_cli.py`` walks them all):
``--config`` and ``--set`` wherever a config is read, ``--stage``, ``--world-size`` (devices in
all), ``--gpus-per-node``, ``--image-size-px``, ``--out`` for what a command writes (``--input``
or a positional argument for what it reads), ``--dry-run``, ``--verbose``.
"""

from __future__ import annotations

import argparse


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks, and appends ``(default: X)`` to an option's help
    when it has a default worth showing (not None, False or an empty list) that the help does
    not already state."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = default not in (None, False, [], argparse.SUPPRESS) and "default" not in text
        if shown and action.option_strings and action.nargs != 0:
            text += " (default: %(default)s)"
        return text


def command_parser(
    prog: str, doc: str, parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser
) -> argparse.ArgumentParser:
    """The parser of the entry point typed as ``prog``, described by ``doc`` (its module
    docstring)."""
    return parser_class(prog=prog, description=doc.split("\n\n")[0], formatter_class=_Formatter)


def subcommand_options() -> dict:
    """What ``add_subparsers().add_parser(...)`` takes so that subcommands format alike."""
    return {"formatter_class": _Formatter}
