"""How every `deltaserve` command's --help reads: each option's default shown
(unless its help already says it), descriptions wrapped or kept as written."""

from __future__ import annotations

import argparse
from typing import Any


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`(default: X)` after an option's help, where the help does not already name
    its default; on/off flags and options without one (None) are left as they are."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, argparse.SUPPRESS):
            return text
        if isinstance(action, argparse._StoreConstAction | argparse._HelpAction):
            return text  # store_true / store_false / --help / --version
        if not action.option_strings and action.nargs in ("*", "+", "?"):
            return text
        if action.default in ("", [], ()):
            return text + " (default: none)"
        return text + " (default: %(default)s)"


class RawHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """The same, with the description printed as written (a docstring)."""


class Parser(argparse.ArgumentParser):
    """A subcommand's parser: HelpFormatter unless it names another."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
